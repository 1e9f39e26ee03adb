//! `magnetar perf object-store`: the raw throughput of the object store the offloader uses, with
//! the same object_store client, timeouts, part size and upload concurrency, and none of
//! Magnetar's format, index or verification. It is the baseline the offload benchmark compares
//! uploads and catch-up reads of offloaded ledgers with.
//!
//! PUT: objects of `--object-size` written one after another as multipart uploads of
//! `offload.part_bytes` parts, `offload.upload_concurrency` parts in flight (what a segment
//! writer does). GET: the same objects read back one after another, each in one streamed GET
//! (one sequential reader, as one catching-up consumer), then again as sequential range GETs of
//! `offload.read_ahead_bytes`.
//!
//! Then the same bytes through Magnetar's offload layer alone, without broker or network:
//! segments of 64 KiB entries written with `SegmentWriter` (format, index, multipart parts) and
//! read back in order with `SegmentReader` (streamed read-ahead, block cache, every entry's
//! checksum verified), in reads of 4 MiB as a broker's dispatcher asks for them. Next to the raw
//! figures, they show what the offload layer costs; what a consumer gets end to end is measured
//! by `benches/run-offload-bench.sh`.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use clap::Args;
use futures::TryStreamExt;
use magnetar_bookie::offload::{OffloadConfig, OffloadStore, SegmentInfo};
use magnetar_common::entry::{Entry, encode_entry};
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
    /// Segments of 64 KiB entries written with the offload layer's `SegmentWriter`.
    pub segment_write_mb_per_sec: f64,
    /// The same segments read back in order with `SegmentReader` (entries verified).
    pub segment_read_mb_per_sec: f64,
}

/// Entry payload size of the segment phase (the offload benchmark's message size).
const ENTRY_BYTES: usize = 64 * 1024;
/// Bytes per read of the segment phase (a broker's default `dispatch.read_batch_bytes`).
const READ_BYTES: u64 = 4 * 1024 * 1024;

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

    // The offload layer: entries prepared before the clock starts (a broker has them from the
    // bookies), segments written one after another, then read back in order.
    let per_segment = (object_bytes as usize / ENTRY_BYTES).max(1) as u64;
    let segments: Vec<Vec<Entry>> = (0..objects)
        .map(|ledger| {
            (0..per_segment)
                .map(|id| Entry::parse(encode_entry(ledger, id, id as i64 - 1, &data[..ENTRY_BYTES.min(data.len())])))
                .collect::<Result<Vec<_>, _>>()
        })
        .collect::<Result<_, _>>()?;
    let entry_bytes: u64 = segments.iter().flatten().map(|e| e.payload().len() as u64).sum();
    let started = Instant::now();
    let mut infos: Vec<SegmentInfo> = Vec::with_capacity(segments.len());
    for (ledger, entries) in segments.iter().enumerate() {
        let mut writer = store.segment_writer(ledger as u64);
        for entry in entries {
            writer.append(entry).await?;
        }
        infos.push(writer.finish().await?);
    }
    let segment_write_secs = started.elapsed().as_secs_f64();
    let segment_write = entry_bytes as f64 / 1e6 / segment_write_secs;
    println!(
        "segments: write {segment_write:.1} MB/s of entry payload ({entry_bytes} bytes in {segment_write_secs:.2} s)"
    );
    drop(segments);

    let gets_before = store.metrics().requests_of("get");
    let started = Instant::now();
    let mut read = 0u64;
    for info in &infos {
        let reader = store.open_segment(info).await?;
        let mut next = info.first_entry;
        while next <= info.last_entry {
            for entry in reader.read(next, info.last_entry, READ_BYTES).await? {
                anyhow::ensure!(
                    entry.entry_id == next,
                    "segment {} returned entry {} for {next}",
                    info.key,
                    entry.entry_id
                );
                read += entry.payload().len() as u64;
                next += 1;
            }
        }
    }
    let segment_read_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(read == entry_bytes, "read {read} bytes of entries back, wrote {entry_bytes}");
    let segment_read = entry_bytes as f64 / 1e6 / segment_read_secs;
    let gets = store.metrics().requests_of("get") - gets_before;
    println!(
        "segments: read {segment_read:.1} MB/s of entry payload ({entry_bytes} bytes in {segment_read_secs:.2} s, {gets} GETs for {} segments)",
        infos.len()
    );
    for info in &infos {
        store.delete_segment(&info.key).await?;
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
        segment_write_mb_per_sec: segment_write,
        segment_read_mb_per_sec: segment_read,
    };
    crate::cli::write_json(&args.json, &summary)
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}
