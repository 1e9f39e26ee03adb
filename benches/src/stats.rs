//! Latency and throughput accounting shared by the load generators: an HDR histogram of
//! microseconds, a once-a-second progress line, and a final summary (printable and JSON).

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub seconds: f64,
    pub ops: u64,
    pub errors: u64,
    pub bytes: u64,
    pub ops_per_sec: f64,
    pub mb_per_sec: f64,
    pub latency_us: Percentiles,
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
}

#[derive(Debug)]
pub struct Recorder {
    hist: Histogram<u64>,
    window: Histogram<u64>,
    ops: u64,
    errors: u64,
    bytes: u64,
    window_ops: u64,
    window_bytes: u64,
    window_errors: u64,
    start: Instant,
    window_start: Instant,
}

fn new_hist() -> Histogram<u64> {
    // 1 us .. 60 s with 3 significant digits; bounds are constants, so creation cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            hist: new_hist(),
            window: new_hist(),
            ops: 0,
            errors: 0,
            bytes: 0,
            window_ops: 0,
            window_bytes: 0,
            window_errors: 0,
            start: now,
            window_start: now,
        }
    }

    pub fn restart(&mut self) {
        *self = Self::new();
    }

    pub fn ok(&mut self, latency: Duration, bytes: u64) {
        let us = (latency.as_micros() as u64).clamp(1, 60_000_000);
        let _ = self.hist.record(us);
        let _ = self.window.record(us);
        self.ops += 1;
        self.bytes += bytes;
        self.window_ops += 1;
        self.window_bytes += bytes;
    }

    pub fn error(&mut self) {
        self.errors += 1;
        self.window_errors += 1;
    }

    /// Prints the progress line for the last window and starts a new one.
    pub fn tick(&mut self, label: &str, in_flight: usize) {
        let secs = self.window_start.elapsed().as_secs_f64().max(1e-9);
        let w = &self.window;
        eprintln!(
            "{label}: {:>9.0} msg/s {:>8.1} MB/s | latency ms p50 {:.3} p99 {:.3} p99.9 {:.3} | in-flight {in_flight} | errors {}",
            self.window_ops as f64 / secs,
            self.window_bytes as f64 / secs / 1e6,
            w.value_at_quantile(0.5) as f64 / 1000.0,
            w.value_at_quantile(0.99) as f64 / 1000.0,
            w.value_at_quantile(0.999) as f64 / 1000.0,
            self.window_errors,
        );
        self.window.reset();
        self.window_ops = 0;
        self.window_bytes = 0;
        self.window_errors = 0;
        self.window_start = Instant::now();
    }

    pub fn summary(&self, scenario: &str) -> Summary {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let h = &self.hist;
        Summary {
            scenario: scenario.to_string(),
            seconds: secs,
            ops: self.ops,
            errors: self.errors,
            bytes: self.bytes,
            ops_per_sec: self.ops as f64 / secs,
            mb_per_sec: self.bytes as f64 / secs / 1e6,
            latency_us: Percentiles {
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                p999: h.value_at_quantile(0.999),
                p9999: h.value_at_quantile(0.9999),
                max: h.max(),
            },
        }
    }
}

impl Summary {
    pub fn print(&self) {
        let l = &self.latency_us;
        let ms = |v: u64| v as f64 / 1000.0;
        println!(
            "{}: {} ops in {:.1}s = {:.0} ops/s, {:.1} MB/s, {} errors\n  latency ms: p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} p99.99 {:.3} max {:.3}",
            self.scenario,
            self.ops,
            self.seconds,
            self.ops_per_sec,
            self.mb_per_sec,
            self.errors,
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.p999),
            ms(l.p9999),
            ms(l.max)
        );
    }
}
