//! `magnetar perf object-store`: the raw throughput of the object store the offloader uses, with
//! the same object_store client, timeouts, part size and upload concurrency, and none of
//! Magnetar's format, index or verification. It is the baseline the offload benchmark compares
//! uploads and catch-up reads of offloaded ledgers with.
//!
//! PUT: objects of `--object-size` written one after another as multipart uploads of
//! `offload.part_bytes` parts, `offload.upload_concurrency` parts in flight (what a segment
//! writer does). GET: the same objects read back one after another, each in one streamed GET
//! (one sequential reader, as one catching-up consumer), then again as sequential range GETs of
//! `offload.read_ahead_bytes` (the request pattern of a segment reader catching up).

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use clap::Args;
use futures::TryStreamExt;
use magnetar_bookie::offload::{OffloadConfig, OffloadStore};
use object_store::WriteMultipart;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

#[derive(Debug, Args)]
pub struct ObjectStorePerfArgs {
    /// A broker configuration file (TOML) whose `[offload]` section names the store.
    #[arg(long)]
    config: PathBuf,
    /// Bytes to write and read back, in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Size of each object, in MiB.
    #[arg(long, default_value_t = 64)]
    object_mib: u64,
    /// Write a JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    offload: Option<OffloadConfig>,
}

#[derive(Debug, Serialize)]
pub struct ObjectStoreSummary {
    pub url: String,
    pub objects: u64,
    pub object_bytes: u64,
    pub part_bytes: u64,
    pub upload_concurrency: usize,
    pub put_mb_per_sec: f64,
    pub get_mb_per_sec: f64,
    pub range_bytes: u64,
    pub range_get_mb_per_sec: f64,
}

pub async fn run(args: ObjectStorePerfArgs) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&args.config).map_err(|e| anyhow::anyhow!("read {}: {e}", args.config.display()))?;
    let file: ConfigFile = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.config.display()))?;
    let config = file.offload.ok_or_else(|| anyhow::anyhow!("{} has no [offload] section", args.config.display()))?;
    let store = OffloadStore::open(&config)?;
    let client = store.object_store().clone();
    let object_bytes = args.object_mib.max(1) * 1024 * 1024;
    let objects = (args.mib * 1024 * 1024).div_ceil(object_bytes).max(1);
    let part = config.part_bytes.as_u64() as usize;
    let concurrency = config.upload_concurrency;
    let run = uuid_like();
    let paths: Vec<Path> = (0..objects).map(|i| store.prefix().child("perf").child(format!("{run}-{i}"))).collect();
    // One buffer of random bytes, sliced into parts (no copy per part).
    let data = Bytes::from((0..part).map(|_| rand::random::<u8>()).collect::<Vec<u8>>());
    let total = objects * object_bytes;
    println!(
        "object store {}: {objects} objects of {} MiB, parts of {} MiB, {concurrency} in flight",
        config.url,
        object_bytes >> 20,
        part >> 20
    );

    let started = Instant::now();
    for path in &paths {
        let upload = client.put_multipart(path).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
        let mut left = object_bytes as usize;
        while left > 0 {
            let n = left.min(part);
            writer.wait_for_capacity(concurrency).await?;
            writer.put(data.slice(..n));
            left -= n;
        }
        writer.finish().await?;
    }
    let put_secs = started.elapsed().as_secs_f64();
    let put = total as f64 / 1e6 / put_secs;
    println!("PUT {:.1} MB/s ({total} bytes in {put_secs:.2} s)", put);

    let started = Instant::now();
    let mut read = 0u64;
    for path in &paths {
        let mut stream = client.get(path).await?.into_stream();
        while let Some(chunk) = stream.try_next().await? {
            read += chunk.len() as u64;
        }
    }
    let get_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(read == total, "read {read} bytes back, wrote {total}");
    let get = total as f64 / 1e6 / get_secs;
    println!("GET {:.1} MB/s ({total} bytes in {get_secs:.2} s)", get);

    let range = config.read_ahead_bytes.as_u64().max(1);
    let started = Instant::now();
    let mut read = 0u64;
    for path in &paths {
        let mut at = 0;
        while at < object_bytes {
            let end = (at + range).min(object_bytes);
            read += client.get_range(path, at..end).await?.len() as u64;
            at = end;
        }
    }
    let range_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(read == total, "read {read} bytes back in ranges, wrote {total}");
    let range_get = total as f64 / 1e6 / range_secs;
    println!("GET in ranges of {} MiB {:.1} MB/s ({total} bytes in {range_secs:.2} s)", range >> 20, range_get);
    for path in &paths {
        client.delete(path).await?;
    }
    let summary = ObjectStoreSummary {
        url: config.url.clone(),
        objects,
        object_bytes,
        part_bytes: part as u64,
        upload_concurrency: concurrency,
        put_mb_per_sec: put,
        get_mb_per_sec: get,
        range_bytes: range,
        range_get_mb_per_sec: range_get,
    };
    crate::cli::write_json(&args.json, &summary)
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}
