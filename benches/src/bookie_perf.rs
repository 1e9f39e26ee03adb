//! `magnetar perf bookie`: adds entries straight to a bookie, measuring acknowledged throughput
//! and add latency. At a fixed `--rate`, latency is measured from each add's intended send time,
//! so a stall is charged to every add it delays (no coordinated omission).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use magnetar_bookie::client::conn::BookieConn;
use magnetar_common::bookie_proto::{Reply, Request};
use magnetar_common::entry::encode_entry;
use rand::RngCore;
use tokio::sync::{Mutex, Semaphore};

use crate::stats::Recorder;

#[derive(Debug, Args)]
pub struct BookiePerfArgs {
    /// Bookie protocol address.
    #[arg(long, default_value = "127.0.0.1:3181")]
    pub bookie: String,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Adds per second (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Most adds in flight at once.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Seconds to run (after warm-up).
    #[arg(long, default_value_t = 10)]
    pub time: u64,
    /// Seconds of warm-up not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup: u64,
    /// Number of ledgers written round-robin.
    #[arg(long, default_value_t = 4)]
    pub ledgers: u64,
    /// First ledger id used (pick one the bookie has not seen).
    #[arg(long, default_value_t = 1_000_000)]
    pub first_ledger: u64,
    /// Write a JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// How often, at most, the pacer wakes up.
const PACE_TICK: Duration = Duration::from_micros(100);

/// Paces a fixed rate from a dedicated thread: `std::thread::sleep` is precise to tens of
/// microseconds, where the async timer rounds to whole milliseconds and would charge its own lag
/// to every measured latency. Sends the intended send times of the adds that are due, every
/// add's own time, in one message per wake-up: it wakes at most every [`PACE_TICK`], because
/// waking once per add (tens of thousands of times a second) costs the load generator a core's
/// worth of context switches that a small machine takes from the bookie it measures.
pub(crate) fn pace(start: Instant, end: Instant, rate: u64) -> tokio::sync::mpsc::UnboundedReceiver<Vec<Instant>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    std::thread::spawn(move || {
        let mut i = 0u64;
        loop {
            let now = Instant::now();
            let mut due = Vec::new();
            let next = loop {
                let t = start + interval.mul_f64(i as f64);
                if t > now || t >= end {
                    break t;
                }
                due.push(t);
                i += 1;
            };
            if !due.is_empty() && tx.send(due).is_err() {
                return;
            }
            if next >= end {
                return;
            }
            if let Some(wait) = next.max(now + PACE_TICK).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    });
    rx
}

pub async fn run(args: BookiePerfArgs) -> anyhow::Result<()> {
    if args.size == 0 || args.in_flight == 0 || args.ledgers == 0 {
        bail!("--size, --in-flight and --ledgers must be positive");
    }
    let conn = Arc::new(BookieConn::new("bench".into(), args.bookie.clone(), Duration::from_secs(5)));
    conn.call(Request::Health, Duration::from_secs(5))
        .await
        .with_context(|| format!("reach bookie at {}", args.bookie))?;
    let mut noise = vec![0u8; (args.size * 2).max(1 << 20)];
    rand::rng().fill_bytes(&mut noise);
    let noise = Bytes::from(noise);
    let rec = Arc::new(Mutex::new(Recorder::new()));
    let sem = Arc::new(Semaphore::new(args.in_flight));
    let next_entry: Vec<u64> = vec![0; args.ledgers as usize];
    let next_entry = Arc::new(std::sync::Mutex::new(next_entry));
    let start = Instant::now();
    let warm_end = start + Duration::from_secs(args.warmup);
    let end = warm_end + Duration::from_secs(args.time);
    let label = format!("bookie add {}B", args.size);
    let ticker = {
        let rec = rec.clone();
        let sem = sem.clone();
        let in_flight = args.in_flight;
        let label = label.clone();
        tokio::spawn(async move {
            let mut t =
                tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
            let mut warm = true;
            loop {
                t.tick().await;
                let mut r = rec.lock().await;
                if warm && Instant::now() >= warm_end {
                    warm = false;
                    r.restart();
                    continue;
                }
                r.tick(if warm { "warm-up" } else { &label }, in_flight - sem.available_permits());
            }
        })
    };
    let mut i = 0u64;
    let mut pacer = (args.rate > 0).then(|| pace(start, end, args.rate));
    let mut due = Vec::new().into_iter();
    let mut tasks = tokio::task::JoinSet::new();
    while Instant::now() < end {
        let intended = match pacer.as_mut() {
            Some(rx) => match due.next() {
                Some(t) => t,
                None => match rx.recv().await {
                    Some(batch) => {
                        due = batch.into_iter();
                        continue;
                    }
                    None => break,
                },
            },
            None => Instant::now(),
        };
        let permit = sem.clone().acquire_owned().await?;
        let ledger_slot = i % args.ledgers;
        let entry_id = {
            let mut n = next_entry.lock().unwrap_or_else(|p| p.into_inner());
            let e = n[ledger_slot as usize];
            n[ledger_slot as usize] += 1;
            e
        };
        let ledger = args.first_ledger + ledger_slot;
        let off = (i as usize * 61) % (noise.len() - args.size);
        let entry = encode_entry(ledger, entry_id, entry_id as i64 - 1, &noise[off..off + args.size]);
        let conn = conn.clone();
        let rec = rec.clone();
        let size = args.size as u64;
        tasks.spawn(async move {
            let r = conn.call(Request::Add { flags: 0, entry }, Duration::from_secs(30)).await;
            let lat = intended.elapsed();
            let mut rec = rec.lock().await;
            match r {
                Ok(Reply::Add { .. }) => rec.ok(lat, size),
                _ => rec.error(),
            }
            drop(permit);
        });
        while tasks.try_join_next().is_some() {}
        i += 1;
    }
    while tasks.join_next().await.is_some() {}
    ticker.abort();
    let summary = rec.lock().await.summary(&label);
    summary.print();
    crate::cli::write_json(&args.json, &summary)?;
    Ok(())
}
