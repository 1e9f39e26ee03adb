//! `magnetar perf produce | consume | e2e`: load against a broker through the client library.
//!
//! Payloads carry a header `[u64 send time µs since the Unix epoch][u32 producer][u64 sequence]`
//! and random bytes after it, so consumers measure end-to-end latency and check per-producer
//! gaps and duplicates. At a fixed `--rate`, latency is measured from each message's intended
//! send time (no coordinated omission).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use clap::Args;
use magnetar_client::{Client, Compression, InitialPosition, SubscriptionType};
use rand::RngCore;
use serde::Serialize;

use crate::connect::ConnectArgs;
use crate::stats::{Recorder, Summary};

const HEADER_BYTES: usize = 8 + 4 + 8;

#[derive(Debug, Args, Clone)]
pub struct ProduceOpts {
    /// Messages per second across all producers (0: as fast as acknowledgements allow).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Payload bytes per message (at least 20: the timestamp and sequence header).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Producers per topic.
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Largest batch, in messages.
    #[arg(long, default_value_t = 1000)]
    pub batch_max_messages: u32,
    /// Largest batch, in bytes.
    #[arg(long, default_value_t = 128 * 1024)]
    pub batch_max_bytes: usize,
    /// Longest a message waits for its batch to fill, in microseconds.
    #[arg(long, default_value_t = 1000)]
    pub batch_max_delay_us: u64,
    /// Batch compression: none, lz4 or zstd.
    #[arg(long, default_value = "none")]
    pub compression: Compression,
    /// Messages each producer may have waiting for acknowledgement.
    #[arg(long, default_value_t = 10_000)]
    pub max_pending: usize,
}

#[derive(Debug, Args, Clone)]
pub struct RunOpts {
    /// Topic name (with --topics N > 1: NAME-0 .. NAME-(N-1)).
    pub topic: String,
    /// Number of topics.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Seconds to run after the warm-up (ignored when -n is given).
    #[arg(long, default_value_t = 10)]
    pub time: u64,
    /// Seconds of warm-up not counted in the summary.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Stop after this many messages per producer (0: run for --time).
    #[arg(short = 'n', long = "num-messages", default_value_t = 0)]
    pub num_messages: u64,
    /// Write a JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Args)]
pub struct ProducePerfArgs {
    #[command(flatten)]
    pub run: RunOpts,
    #[command(flatten)]
    pub produce: ProduceOpts,
}

#[derive(Debug, Args, Clone)]
pub struct ConsumeOpts {
    /// Subscription name.
    #[arg(long, short = 's', default_value = "perf")]
    pub subscription: String,
    /// Consumers per topic.
    #[arg(long, default_value_t = 1)]
    pub consumers: usize,
    /// Subscription type.
    #[arg(long = "type", default_value = "exclusive")]
    pub subscription_type: SubscriptionType,
    /// Where a new subscription starts.
    #[arg(long, default_value = "latest")]
    pub position: InitialPosition,
    /// Messages each consumer buffers (its flow permits).
    #[arg(long, default_value_t = 1000)]
    pub receiver_queue: u32,
}

#[derive(Debug, Args)]
pub struct ConsumePerfArgs {
    #[command(flatten)]
    pub run: RunOpts,
    #[command(flatten)]
    pub consume: ConsumeOpts,
}

#[derive(Debug, Args)]
pub struct E2ePerfArgs {
    #[command(flatten)]
    pub run: RunOpts,
    #[command(flatten)]
    pub produce: ProduceOpts,
    #[command(flatten)]
    pub consume: ConsumeOpts,
}

/// What a run reports (printed, and written with `--json`).
#[derive(Debug, Serialize)]
pub struct Report {
    pub produced: Option<Summary>,
    pub consumed: Option<Summary>,
    /// Consumed messages checked: count, gaps and duplicates per producer.
    pub check: Option<Check>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Check {
    pub messages: u64,
    pub gaps: u64,
    pub duplicates: u64,
    pub malformed: u64,
}

fn topics(run: &RunOpts) -> Vec<String> {
    if run.topics <= 1 {
        vec![run.topic.clone()]
    } else {
        (0..run.topics).map(|i| format!("{}-{i}", run.topic)).collect()
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Shared accounting: a recorder for the summary and a flag for the warm-up.
struct Meter {
    rec: Mutex<Recorder>,
    label: String,
}

impl Meter {
    fn new(label: String) -> Arc<Self> {
        Arc::new(Self { rec: Mutex::new(Recorder::new()), label })
    }
    fn ok(&self, latency: Duration, bytes: u64) {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).ok(latency, bytes);
    }
    fn error(&self) {
        self.rec.lock().unwrap_or_else(|p| p.into_inner()).error();
    }
}

fn start_ticker(
    meters: Vec<Arc<Meter>>,
    warmup: Duration,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let warm_end = Instant::now() + warmup;
        let mut warm = !warmup.is_zero();
        let mut t =
            tokio::time::interval_at(tokio::time::Instant::now() + Duration::from_secs(1), Duration::from_secs(1));
        loop {
            t.tick().await;
            let restart = warm && Instant::now() >= warm_end;
            for m in &meters {
                let mut r = m.rec.lock().unwrap_or_else(|p| p.into_inner());
                if restart {
                    r.restart();
                } else {
                    let label = if warm { format!("{} (warm-up)", m.label) } else { m.label.clone() };
                    r.tick(&label, in_flight.load(std::sync::atomic::Ordering::Relaxed));
                }
            }
            if restart {
                warm = false;
            }
        }
    })
}

async fn run_producers(
    client: &Client,
    run: &RunOpts,
    opts: &ProduceOpts,
    meter: Arc<Meter>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    end: Instant,
    acked: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    if opts.size < HEADER_BYTES {
        bail!("--size must be at least {HEADER_BYTES} bytes (timestamp and sequence header)");
    }
    let mut noise = vec![0u8; (opts.size * 2).max(1 << 20)];
    rand::rng().fill_bytes(&mut noise);
    let noise = Bytes::from(noise);
    let names = topics(run);
    let total_producers = names.len() * opts.producers.max(1);
    let per_producer_rate = if opts.rate == 0 { 0.0 } else { opts.rate as f64 / total_producers as f64 };
    let mut tasks = tokio::task::JoinSet::new();
    let mut id = 0u32;
    for topic in names {
        for _ in 0..opts.producers.max(1) {
            let producer = client
                .producer(&topic)
                .batching_max_messages(opts.batch_max_messages)
                .batching_max_bytes(opts.batch_max_bytes)
                .batching_max_delay(Duration::from_micros(opts.batch_max_delay_us))
                .compression(opts.compression)
                .max_pending_messages(opts.max_pending)
                .create()
                .await
                .with_context(|| format!("create a producer on {topic}"))?;
            let meter = meter.clone();
            let noise = noise.clone();
            let size = opts.size;
            let limit = run.num_messages;
            let in_flight = in_flight.clone();
            let acked = acked.clone();
            let producer_id = id;
            id += 1;
            tasks.spawn(async move {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(magnetar_client::SendReceipt, Instant)>();
                let collector = {
                    let meter = meter.clone();
                    let in_flight = in_flight.clone();
                    tokio::spawn(async move {
                        while let Some((receipt, intended)) = rx.recv().await {
                            match receipt.await {
                                Ok(_) => {
                                    meter.ok(intended.elapsed(), size as u64);
                                    acked.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => meter.error(),
                            }
                            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    })
                };
                let start = Instant::now();
                let interval = (per_producer_rate > 0.0).then(|| Duration::from_secs_f64(1.0 / per_producer_rate));
                let mut seq = 0u64;
                loop {
                    if (limit > 0 && seq >= limit) || (limit == 0 && Instant::now() >= end) {
                        break;
                    }
                    let intended = match interval {
                        Some(iv) => {
                            let t = start + iv.mul_f64(seq as f64);
                            if let Some(wait) = t.checked_duration_since(Instant::now())
                                && wait > Duration::from_micros(200)
                            {
                                tokio::time::sleep(wait).await;
                            }
                            t
                        }
                        None => Instant::now(),
                    };
                    let mut payload = BytesMut::with_capacity(size);
                    payload.put_u64(now_us());
                    payload.put_u32(producer_id);
                    payload.put_u64(seq);
                    let off = (seq as usize * 61) % (noise.len() - size);
                    payload.put_slice(&noise[off..off + size - HEADER_BYTES]);
                    match producer.send_async(payload.freeze()).await {
                        Ok(receipt) => {
                            in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if tx.send((receipt, intended)).is_err() {
                                break;
                            }
                        }
                        Err(_) => meter.error(),
                    }
                    seq += 1;
                }
                drop(tx);
                let _ = collector.await;
                producer.close().await.ok();
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.context("producer task")?;
    }
    Ok(())
}

/// Per-producer ordering check of consumed payloads.
#[derive(Default)]
struct Checker {
    next: HashMap<u32, u64>,
    check: Check,
}

impl Checker {
    /// Returns the send timestamp (µs) of a well-formed payload.
    fn see(&mut self, payload: &[u8], ordered: bool) -> Option<u64> {
        if payload.len() < HEADER_BYTES {
            self.check.malformed += 1;
            return None;
        }
        let ts = u64::from_be_bytes(payload[0..8].try_into().ok()?);
        let producer = u32::from_be_bytes(payload[8..12].try_into().ok()?);
        let seq = u64::from_be_bytes(payload[12..20].try_into().ok()?);
        self.check.messages += 1;
        let next = self.next.entry(producer).or_insert(seq);
        if ordered {
            if seq > *next {
                self.check.gaps += seq - *next;
            } else if seq < *next {
                self.check.duplicates += 1;
            }
        }
        *next = (*next).max(seq + 1);
        Some(ts)
    }
}

/// Starts consumers that run until `target` messages were consumed in all (u64::MAX: until
/// `end`), or nothing arrived for 30 s. Returns their checks' handles and the shared count.
async fn run_consumers(
    client: &Client,
    run: &RunOpts,
    opts: &ConsumeOpts,
    meter: Arc<Meter>,
    end: Instant,
    target: Arc<AtomicU64>,
    goal_changed: Arc<tokio::sync::Notify>,
) -> anyhow::Result<(Vec<tokio::task::JoinHandle<Check>>, Arc<AtomicU64>)> {
    let consumed = Arc::new(AtomicU64::new(0));
    let ordered = matches!(opts.subscription_type, SubscriptionType::Exclusive | SubscriptionType::Failover);
    let mut handles = Vec::new();
    for topic in topics(run) {
        for i in 0..opts.consumers.max(1) {
            let consumer = client
                .subscribe(&topic, &opts.subscription)
                .subscription_type(opts.subscription_type)
                .initial_position(opts.position)
                .receiver_queue_size(opts.receiver_queue)
                .consumer_name(format!("perf-{i}"))
                .subscribe()
                .await
                .with_context(|| format!("subscribe to {topic}"))?;
            let meter = meter.clone();
            let consumed = consumed.clone();
            let target = target.clone();
            let goal_changed = goal_changed.clone();
            handles.push(tokio::spawn(async move {
                let mut checker = Checker::default();
                loop {
                    // Registered before the goal is read, so a change in between is not missed.
                    let notified = goal_changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    let goal = target.load(Ordering::Relaxed);
                    if consumed.load(Ordering::Relaxed) >= goal || (goal == u64::MAX && Instant::now() >= end) {
                        break;
                    }
                    let wait = if goal == u64::MAX {
                        end.saturating_duration_since(Instant::now()).min(Duration::from_secs(1))
                    } else {
                        Duration::from_secs(30)
                    };
                    let m = tokio::select! {
                        r = tokio::time::timeout(wait, consumer.receive()) => match r {
                            Ok(Ok(m)) => m,
                            Ok(Err(_)) => break,
                            Err(_) if goal == u64::MAX => continue,
                            Err(_) => break,
                        },
                        // The goal was set (end-to-end runs learn it when producing ends).
                        _ = &mut notified => continue,
                    };
                    if let Some(ts) = checker.see(&m.payload, ordered) {
                        let lat = Duration::from_micros(now_us().saturating_sub(ts));
                        meter.ok(lat, m.payload.len() as u64);
                    }
                    if consumer.ack(&m.id).is_err() {
                        meter.error();
                    }
                    consumed.fetch_add(1, Ordering::Relaxed);
                }
                consumer.close().await.ok();
                checker.check
            }));
        }
    }
    Ok((handles, consumed))
}

fn finish(report: Report, json: &Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(s) = &report.produced {
        s.print();
    }
    if let Some(s) = &report.consumed {
        s.print();
    }
    if let Some(c) = &report.check {
        let verdict = if c.gaps == 0 && c.duplicates == 0 && c.malformed == 0 { "OK" } else { "PROBLEMS" };
        println!(
            "check: {} messages consumed, {} gaps, {} duplicates, {} malformed: {verdict}",
            c.messages, c.gaps, c.duplicates, c.malformed
        );
    }
    crate::cli::write_json(json, &report)
}

fn merge(checks: Vec<Check>) -> Check {
    checks.into_iter().fold(Check::default(), |a, c| Check {
        messages: a.messages + c.messages,
        gaps: a.gaps + c.gaps,
        duplicates: a.duplicates + c.duplicates,
        malformed: a.malformed + c.malformed,
    })
}

pub async fn produce(args: ProducePerfArgs) -> anyhow::Result<()> {
    let client = args.run.connect.connect().await?;
    let meter = Meter::new(format!("produce {}B", args.produce.size));
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticker = start_ticker(vec![meter.clone()], Duration::from_secs(args.run.warmup), in_flight.clone());
    let end = Instant::now() + Duration::from_secs(args.run.warmup + args.run.time);
    let acked = Arc::new(AtomicU64::new(0));
    run_producers(&client, &args.run, &args.produce, meter.clone(), in_flight, end, acked.clone()).await?;
    ticker.abort();
    let summary = meter.rec.lock().unwrap_or_else(|p| p.into_inner()).summary(&meter.label);
    client.close().await;
    println!("acknowledged: {} messages", acked.load(Ordering::Relaxed));
    finish(Report { produced: Some(summary), consumed: None, check: None }, &args.run.json)
}

pub async fn consume(args: ConsumePerfArgs) -> anyhow::Result<()> {
    let client = args.run.connect.connect().await?;
    let meter = Meter::new("consume".into());
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticker = start_ticker(vec![meter.clone()], Duration::from_secs(args.run.warmup), in_flight);
    let end = Instant::now() + Duration::from_secs(args.run.warmup + args.run.time);
    let target = Arc::new(AtomicU64::new(if args.run.num_messages > 0 { args.run.num_messages } else { u64::MAX }));
    let (handles, _) =
        run_consumers(&client, &args.run, &args.consume, meter.clone(), end, target, Arc::default()).await?;
    let mut checks = Vec::new();
    for h in handles {
        checks.push(h.await.context("consumer task")?);
    }
    ticker.abort();
    let summary = meter.rec.lock().unwrap_or_else(|p| p.into_inner()).summary(&meter.label);
    client.close().await;
    finish(Report { produced: None, consumed: Some(summary), check: Some(merge(checks)) }, &args.run.json)
}

pub async fn e2e(args: E2ePerfArgs) -> anyhow::Result<()> {
    let client = args.run.connect.connect().await?;
    let prod = Meter::new(format!("publish {}B", args.produce.size));
    let cons = Meter::new("end-to-end".into());
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticker =
        start_ticker(vec![prod.clone(), cons.clone()], Duration::from_secs(args.run.warmup), in_flight.clone());
    let end = Instant::now() + Duration::from_secs(args.run.warmup + args.run.time);
    let mut consume = args.consume.clone();
    consume.position = InitialPosition::Latest;
    // The consumers' goal is set once the producers know how many messages were acknowledged.
    let target = Arc::new(AtomicU64::new(u64::MAX - 1));
    let goal_changed = Arc::new(tokio::sync::Notify::new());
    let (handles, _) =
        run_consumers(&client, &args.run, &consume, cons.clone(), end, target.clone(), goal_changed.clone()).await?;
    let acked = Arc::new(AtomicU64::new(0));
    run_producers(&client, &args.run, &args.produce, prod.clone(), in_flight, end, acked.clone()).await?;
    let produced = prod.rec.lock().unwrap_or_else(|p| p.into_inner()).summary(&prod.label);
    target.store(acked.load(Ordering::Relaxed), Ordering::Relaxed);
    goal_changed.notify_waiters();
    let mut checks = Vec::new();
    for h in handles {
        checks.push(h.await.context("consumer task")?);
    }
    ticker.abort();
    let consumed = cons.rec.lock().unwrap_or_else(|p| p.into_inner()).summary(&cons.label);
    client.close().await;
    let check = merge(checks);
    println!("acknowledged: {} messages", acked.load(Ordering::Relaxed));
    let lost = acked.load(Ordering::Relaxed).saturating_sub(check.messages);
    let report = Report { produced: Some(produced), consumed: Some(consumed), check: Some(check) };
    finish(report, &args.run.json)?;
    if lost > 0 {
        bail!("{lost} acknowledged messages were not consumed");
    }
    Ok(())
}
