//! `SegmentReader`: verified range reads of one segment object, with read-ahead and a shared
//! byte-bounded cache of fetched blocks.
//!
//! With a cache, a sequential reader is fed by one streamed GET from where it reads to the end
//! of the segment's data, consumed at most `read_ahead_bytes` ahead of the reader (the rest waits
//! in the connection's flow control). Each byte is requested once and a segment costs one
//! request, whatever the server does with ranges (some, like moto, read the whole object for
//! every range GET). A stream that fails or idles ends, and reads fall back to range GETs of
//! `read_ahead_bytes` until the next stream starts.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use magnetar_common::entry::{ENTRY_HEADER_BYTES, Entry};
use object_store::path::Path;
use object_store::{GetOptions, GetRange};
use tokio::sync::watch;

use super::format::{FOOTER_BYTES, Footer, INDEX_INTERVAL_BYTES, Index, LEN_PREFIX_BYTES};
use super::{OffloadError, OffloadStore, SegmentInfo};
use crate::config::MAX_ENTRY_BYTES_LIMIT;

/// Fetched data is cached in aligned blocks of this size.
pub const BLOCK_BYTES: u64 = 1024 * 1024;

/// A prefetch stream that no read has advanced for this long ends, releasing its connection.
const STREAM_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// A cache key: object key and block number.
pub(crate) type BlockKey = (Arc<str>, u64);

/// Reads entries of one segment. Cheap to share (`&self` reads run concurrently); open one per
/// segment with [`OffloadStore::open_segment`] and keep it while reads continue.
#[derive(Debug)]
pub struct SegmentReader {
    store: OffloadStore,
    info: SegmentInfo,
    path: Path,
    key: Arc<str>,
    index: Index,
    prefetch: Arc<Mutex<Option<Prefetch>>>,
}

/// A background streamed GET of blocks `blocks`, delivered in order into the cache; at most one
/// per reader.
#[derive(Debug)]
struct Prefetch {
    blocks: Range<u64>,
    /// The next block the stream delivers (those before it are in the cache, unless evicted).
    delivered: watch::Receiver<u64>,
    /// The furthest block a read has reached; the stream delivers up to `read_ahead` past it.
    wanted: watch::Sender<u64>,
    task: tokio::task::AbortHandle,
}

impl Prefetch {
    /// Whether this stream is running and delivers `block` without fetching more than
    /// `ahead` blocks nobody asked for.
    fn serves(&self, block: u64, ahead: u64) -> bool {
        !self.task.is_finished() && self.blocks.contains(&block) && block < *self.delivered.borrow() + ahead
    }

    /// A read reached `block`: the stream may deliver up to read-ahead past it.
    fn advance(&self, block: u64) {
        self.wanted.send_if_modified(|w| std::mem::replace(w, block.max(*w)) < block);
    }
}

impl SegmentReader {
    pub(crate) async fn open(store: OffloadStore, info: &SegmentInfo) -> Result<SegmentReader, OffloadError> {
        let corrupt = |reason: String| OffloadError::Corrupt {
            key: info.key.clone(),
            ledger_id: info.ledger_id,
            entry: None,
            reason,
        };
        let footer_at = info.size.checked_sub(FOOTER_BYTES as u64);
        if info.last_entry < info.first_entry || footer_at.is_none_or(|at| at <= info.index_offset) {
            return Err(OffloadError::Invalid(format!("segment description is inconsistent: {info:?}")));
        }
        let path = Path::from(info.key.as_str());
        // The index and footer in one GET: the last `size - index_offset` bytes. A suffix range
        // never fails on a short object, so a truncated object reads as corrupt, not unavailable.
        let tail_len = info.size - info.index_offset;
        let options = GetOptions { range: Some(GetRange::Suffix(tail_len)), ..GetOptions::default() };
        let get = |e| OffloadError::from_store("get segment index", &info.key, e);
        let result = store.inner.store.get_opts(&path, options).await.map_err(get)?;
        let object_size = result.meta.size;
        let tail = result.bytes().await.map_err(get)?;
        if object_size != info.size || tail.len() as u64 != tail_len {
            return Err(corrupt(format!("object is {object_size} bytes, the segment description says {}", info.size)));
        }
        let footer = Footer::decode(&tail[tail.len() - FOOTER_BYTES..]).map_err(corrupt)?;
        let expected = Footer {
            ledger_id: info.ledger_id,
            first_entry: info.first_entry,
            last_entry: info.last_entry,
            entries: info.entries(),
            index_offset: info.index_offset,
            index_len: tail_len - FOOTER_BYTES as u64,
            index_crc: footer.index_crc,
        };
        if footer != expected {
            return Err(corrupt(format!("footer {footer:?} does not match the segment description {info:?}")));
        }
        let index = Index::decode(&tail[..tail.len() - FOOTER_BYTES], &footer).map_err(corrupt)?;
        Ok(SegmentReader {
            store,
            key: Arc::from(info.key.as_str()),
            info: info.clone(),
            path,
            index,
            prefetch: Arc::default(),
        })
    }

    pub fn info(&self) -> &SegmentInfo {
        &self.info
    }

    /// Entries `first..=last` in order, each verified (digest and ids). Stops early once the
    /// entries' encoded bytes would pass `max_bytes`, but always returns at least one entry; a
    /// caller continues from the entry after the last one returned. A range outside the segment
    /// is `Invalid`; a bad entry is `Corrupt` naming it and is never returned.
    pub async fn read(&self, first: u64, last: u64, max_bytes: u64) -> Result<Vec<Entry>, OffloadError> {
        let info = &self.info;
        if first > last || first < info.first_entry || last > info.last_entry {
            return Err(OffloadError::Invalid(format!(
                "read {first}..={last} of segment {} which holds entries {}..={} of ledger {}",
                info.key, info.first_entry, info.last_entry, info.ledger_id
            )));
        }
        let (mut id, mut pos) = self.index.seek(first);
        // Without a cache, fetch no more than this read may use: entries from the indexed
        // position up to `first`, then about `max_bytes` (a hint: a larger entry is still fetched).
        let hint = pos.saturating_add(INDEX_INTERVAL_BYTES).saturating_add(max_bytes);
        let mut view = View::new(self, self.index.end_bound(last).min(hint));
        let mut out = Vec::new();
        let mut bytes = 0u64;
        while id <= last {
            let prefix = view.bytes(id, pos, LEN_PREFIX_BYTES as u64).await?;
            let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as u64;
            if len < ENTRY_HEADER_BYTES as u64 || len > MAX_ENTRY_BYTES_LIMIT {
                return Err(view.corrupt(id, pos, format!("entry length {len} at offset {pos} is impossible")));
            }
            let start = pos + LEN_PREFIX_BYTES as u64;
            if id >= first {
                if !out.is_empty() && bytes + len > max_bytes {
                    break;
                }
                let raw = view.bytes(id, start, len).await?;
                let entry = match Entry::parse(raw) {
                    Ok(entry) if entry.ledger_id == info.ledger_id && entry.entry_id == id => entry,
                    Ok(entry) => {
                        let why = format!("found entry {}:{} at offset {pos}", entry.ledger_id, entry.entry_id);
                        return Err(view.corrupt(id, start + len - 1, why));
                    }
                    Err(e) => return Err(view.corrupt(id, start + len - 1, format!("{e} (offset {pos})"))),
                };
                out.push(entry);
                bytes += len;
            }
            pos = start + len;
            id += 1;
            view.forget_before(pos);
        }
        self.start_prefetch(pos);
        Ok(out)
    }

    fn block_key(&self, block: u64) -> BlockKey {
        (self.key.clone(), block)
    }

    fn cached(&self, block: u64) -> Option<Bytes> {
        self.store.inner.cache.as_ref()?.get(&self.block_key(block))
    }

    fn last_block(&self) -> u64 {
        (self.info.index_offset - 1) / BLOCK_BYTES
    }

    fn read_ahead_blocks(&self) -> u64 {
        self.store.inner.read_ahead_bytes.div_ceil(BLOCK_BYTES).max(1)
    }

    /// Fetches `blocks` with one range GET; caches them.
    async fn fetch(&self, blocks: Range<u64>) -> Result<Vec<(u64, Bytes)>, OffloadError> {
        fetch_blocks(&self.store, &self.path, &self.key, self.info.index_offset, blocks).await
    }

    /// After a read that ended at `pos`: keep the stream going ahead of the reader, or start one
    /// if part of the next read-ahead window is not cached. Only with a cache to put it in.
    fn start_prefetch(&self, pos: u64) {
        if self.store.inner.cache.is_none() || pos >= self.info.index_offset {
            return;
        }
        let block = pos / BLOCK_BYTES;
        let window_end = (block + self.read_ahead_blocks()).min(self.last_block() + 1);
        match (block..window_end).find(|&b| self.cached(b).is_none()) {
            Some(missing) => {
                self.stream_for(missing, block);
            }
            None => self.note_position(block),
        }
    }

    /// Tells a running stream that a read reached `block`, so it may deliver further.
    fn note_position(&self, block: u64) {
        let slot = self.prefetch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = slot.as_ref().filter(|p| p.serves(block, self.read_ahead_blocks())) {
            p.advance(block);
        }
    }

    /// The stream that delivers `block` (a read being at `reader_at`): the running one if it
    /// serves the block, else a new one from `block` to the end of the data when none runs.
    /// `None` when another stream runs elsewhere in the segment (another reader's): the caller
    /// fetches for itself.
    fn stream_for(&self, block: u64, reader_at: u64) -> Option<watch::Receiver<u64>> {
        let ahead = self.read_ahead_blocks();
        let mut slot = self.prefetch.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = slot.as_ref() {
            if p.serves(block, ahead) {
                p.advance(reader_at);
                return Some(p.delivered.clone());
            }
            if !p.task.is_finished() {
                return None;
            }
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let blocks = block..self.last_block() + 1;
        let (delivered_tx, delivered) = watch::channel(block);
        let (wanted, wanted_rx) = watch::channel(reader_at.max(block));
        let stream = BlockStream {
            store: self.store.clone(),
            path: self.path.clone(),
            key: self.key.clone(),
            data_len: self.info.index_offset,
            blocks: blocks.clone(),
            ahead,
            delivered: delivered_tx,
            wanted: wanted_rx,
        };
        let task = runtime.spawn(stream.run()).abort_handle();
        *slot = Some(Prefetch { blocks, delivered: delivered.clone(), wanted, task });
        Some(delivered)
    }
}

impl Drop for SegmentReader {
    fn drop(&mut self) {
        if let Some(p) = self.prefetch.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.task.abort();
        }
    }
}

/// The task behind a [`Prefetch`]: one GET of `blocks`, cut into cache blocks as it arrives.
struct BlockStream {
    store: OffloadStore,
    path: Path,
    key: Arc<str>,
    data_len: u64,
    blocks: Range<u64>,
    ahead: u64,
    delivered: watch::Sender<u64>,
    wanted: watch::Receiver<u64>,
}

impl BlockStream {
    async fn run(mut self) {
        match self.stream().await {
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(key = %self.key, error = %e, "segment prefetch stream ended (reads fetch for themselves)")
            }
        }
    }

    async fn stream(&mut self) -> Result<(), OffloadError> {
        let Some(cache) = self.store.inner.cache.clone() else { return Ok(()) };
        let range = self.blocks.start * BLOCK_BYTES..self.data_len;
        // From the start: the whole object, index and footer too (a small tail, dropped). A
        // plain GET is the request every server serves best (moto answers a range by slicing a
        // copy of the whole object).
        let options =
            GetOptions { range: (range.start > 0).then(|| GetRange::Bounded(range.clone())), ..GetOptions::default() };
        let get = |e| OffloadError::from_store("get segment stream", &self.key, e);
        let mut body = self.store.inner.store.get_opts(&self.path, options).await.map_err(get)?.into_stream();
        let block_len = |b: u64| (((b + 1) * BLOCK_BYTES).min(self.data_len) - b * BLOCK_BYTES) as usize;
        let mut block = self.blocks.start;
        // Each block is filled in an allocation of its own size: one copy from the body.
        let mut filling = BytesMut::with_capacity(block_len(block));
        while block < self.blocks.end {
            let mut chunk = match body.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Err(get(e)),
                None => {
                    let why = format!("asked for bytes {range:?}, the body ended in block {block}");
                    return Err(short_body("get segment stream", &self.key, why));
                }
            };
            while !chunk.is_empty() && block < self.blocks.end {
                let take = (block_len(block) - filling.len()).min(chunk.len());
                filling.extend_from_slice(&chunk.split_to(take));
                if filling.len() < block_len(block) {
                    continue;
                }
                // Deliver within read-ahead of the furthest read; meanwhile the body waits in
                // the connection's flow control.
                while block >= *self.wanted.borrow_and_update() + self.ahead {
                    match tokio::time::timeout(STREAM_IDLE, self.wanted.changed()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) | Err(_) => return Ok(()),
                    }
                }
                let next_len = if block + 1 < self.blocks.end { block_len(block + 1) } else { 0 };
                let bytes = std::mem::replace(&mut filling, BytesMut::with_capacity(next_len)).freeze();
                cache.insert((self.key.clone(), block), bytes);
                block += 1;
                self.delivered.send_replace(block);
            }
        }
        Ok(())
    }
}

/// A GET that returned fewer bytes than asked for: retryable, like a dropped connection.
fn short_body(op: &'static str, key: &str, why: String) -> OffloadError {
    OffloadError::Unavailable {
        op,
        key: key.to_string(),
        source: object_store::Error::Generic { store: "offload", source: why.into() },
    }
}

async fn fetch_blocks(
    store: &OffloadStore,
    path: &Path,
    key: &Arc<str>,
    data_len: u64,
    blocks: Range<u64>,
) -> Result<Vec<(u64, Bytes)>, OffloadError> {
    let range = blocks.start * BLOCK_BYTES..(blocks.end * BLOCK_BYTES).min(data_len);
    let data = store
        .inner
        .store
        .get_range(path, range.clone())
        .await
        .map_err(|e| OffloadError::from_store("get segment range", key, e))?;
    if data.len() as u64 != range.end - range.start {
        let why = format!("asked for bytes {range:?}, got {} bytes", data.len());
        return Err(short_body("get segment range", key, why));
    }
    let mut out = Vec::with_capacity((blocks.end - blocks.start) as usize);
    for block in blocks {
        let start = (block * BLOCK_BYTES - range.start) as usize;
        let end = ((block + 1) * BLOCK_BYTES - range.start).min(data.len() as u64) as usize;
        let bytes = data.slice(start..end);
        if let Some(cache) = &store.inner.cache {
            cache.insert((key.clone(), block), bytes.clone());
        }
        out.push((block, bytes));
    }
    Ok(out)
}

/// The blocks one read holds on to: from the cache or fetched, dropped once read past.
struct View<'a> {
    reader: &'a SegmentReader,
    /// Without a cache, fetches stop here (unless the bytes asked for go further).
    needed_end: u64,
    blocks: BTreeMap<u64, Bytes>,
}

impl<'a> View<'a> {
    fn new(reader: &'a SegmentReader, needed_end: u64) -> View<'a> {
        View { reader, needed_end, blocks: BTreeMap::new() }
    }

    /// `len > 0` bytes at `pos` of the segment's data, for entry `id`.
    async fn bytes(&mut self, id: u64, pos: u64, len: u64) -> Result<Bytes, OffloadError> {
        let data_len = self.reader.info.index_offset;
        if pos + len > data_len {
            let why = format!("{len} bytes at offset {pos} run past the end of the data ({data_len})");
            return Err(self.corrupt(id, pos, why));
        }
        let (b0, b1) = (pos / BLOCK_BYTES, (pos + len - 1) / BLOCK_BYTES);
        for block in b0..=b1 {
            if self.blocks.contains_key(&block) {
                continue;
            }
            if let Some(bytes) = self.reader.cached(block) {
                self.blocks.insert(block, bytes);
                continue;
            }
            if self.reader.store.inner.cache.is_some()
                && let Some(mut delivered) = self.reader.stream_for(block, block)
            {
                // Err: the stream ended without the block; fetch it below.
                let _ = delivered.wait_for(|&next| next > block).await;
                if let Some(bytes) = self.reader.cached(block) {
                    self.blocks.insert(block, bytes);
                    continue;
                }
            }
            // Fetch from here: at least to b1, and read-ahead further when there is a cache to
            // keep it (without one, only what this read may still need).
            let reader = self.reader;
            let limit = if reader.store.inner.cache.is_some() {
                reader.last_block()
            } else {
                (self.needed_end - 1) / BLOCK_BYTES
            };
            let end = (block + reader.read_ahead_blocks() - 1).min(limit).max(b1);
            for (b, bytes) in reader.fetch(block..end + 1).await? {
                self.blocks.insert(b, bytes);
            }
        }
        if b0 == b1 {
            let start = (pos - b0 * BLOCK_BYTES) as usize;
            return Ok(self.blocks[&b0].slice(start..start + len as usize));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for block in b0..=b1 {
            let bytes = &self.blocks[&block];
            let from = pos.max(block * BLOCK_BYTES) - block * BLOCK_BYTES;
            let to = (pos + len).min((block + 1) * BLOCK_BYTES) - block * BLOCK_BYTES;
            out.extend_from_slice(&bytes[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }

    fn forget_before(&mut self, pos: u64) {
        let keep = pos / BLOCK_BYTES;
        while self.blocks.first_key_value().is_some_and(|(&b, _)| b < keep) {
            self.blocks.pop_first();
        }
    }

    /// A corruption error for entry `id`; drops the cached blocks this read used up to `pos`, so
    /// that bytes damaged on the way are fetched again next time.
    fn corrupt(&mut self, id: u64, pos: u64, reason: String) -> OffloadError {
        self.invalidate(pos);
        let info = &self.reader.info;
        OffloadError::Corrupt { key: info.key.clone(), ledger_id: info.ledger_id, entry: Some(id), reason }
    }

    fn invalidate(&mut self, pos: u64) {
        if let Some(cache) = &self.reader.store.inner.cache {
            let last = pos.min(self.reader.info.index_offset.saturating_sub(1)) / BLOCK_BYTES;
            for &block in self.blocks.keys().filter(|&&b| b <= last) {
                cache.invalidate(&self.reader.block_key(block));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use bytesize::ByteSize;
    use futures::stream::BoxStream;
    use magnetar_common::entry::encode_entry;
    use object_store::memory::InMemory;
    use object_store::{
        GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
        PutOptions, PutPayload, PutResult,
    };

    use super::*;
    use crate::offload::OffloadConfig;

    /// InMemory, counting GET requests and the bytes they return.
    #[derive(Debug, Default)]
    struct Counting {
        inner: InMemory,
        gets: AtomicU64,
        get_bytes: AtomicU64,
        /// When non-zero: bodies longer than this fail after this many bytes.
        break_bodies_after: AtomicU64,
        broken: Arc<AtomicU64>,
    }

    impl std::fmt::Display for Counting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Counting({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Counting {
        async fn put_opts(&self, at: &Path, payload: PutPayload, o: PutOptions) -> object_store::Result<PutResult> {
            self.inner.put_opts(at, payload, o).await
        }
        async fn put_multipart_opts(
            &self,
            at: &Path,
            o: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(at, o).await
        }
        async fn get_opts(&self, at: &Path, o: GetOptions) -> object_store::Result<GetResult> {
            let result = self.inner.get_opts(at, o).await?;
            self.gets.fetch_add(1, Ordering::SeqCst);
            self.get_bytes.fetch_add(result.range.end - result.range.start, Ordering::SeqCst);
            let limit = self.break_bodies_after.load(Ordering::SeqCst);
            if limit == 0 || result.range.end - result.range.start <= limit {
                return Ok(result);
            }
            let (meta, range, attributes) = (result.meta.clone(), result.range.clone(), result.attributes.clone());
            let broken = self.broken.clone();
            let mut sent = 0u64;
            // In 64 KiB chunks, as a network body arrives, failing once `limit` bytes are sent.
            let body = result
                .into_stream()
                .flat_map(|chunk| {
                    let pieces: Vec<object_store::Result<Bytes>> = match chunk {
                        Ok(c) => (0..c.len())
                            .step_by(64 * 1024)
                            .map(|i| Ok(c.slice(i..(i + 64 * 1024).min(c.len()))))
                            .collect(),
                        Err(e) => vec![Err(e)],
                    };
                    futures::stream::iter(pieces)
                })
                .map(move |chunk| {
                    let chunk = chunk?;
                    if sent >= limit {
                        broken.fetch_add(1, Ordering::SeqCst);
                        return Err(object_store::Error::Generic { store: "test", source: "connection reset".into() });
                    }
                    sent += chunk.len() as u64;
                    Ok(chunk)
                })
                .boxed();
            Ok(GetResult { payload: GetResultPayload::Stream(body), meta, range, attributes })
        }
        async fn delete(&self, at: &Path) -> object_store::Result<()> {
            self.inner.delete(at).await
        }
        fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }
        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    const ENTRY: usize = 800 * 1024;

    async fn segment(cache: ByteSize) -> (OffloadStore, Arc<Counting>, SegmentInfo) {
        let config = OffloadConfig {
            url: "memory://".into(),
            read_ahead_bytes: ByteSize::mib(8),
            cache_bytes: cache,
            ..OffloadConfig::default()
        };
        let counting = Arc::new(Counting::default());
        let store = OffloadStore::from_parts(counting.clone(), Path::default(), None, &config);
        let mut writer = store.segment_writer(1);
        for id in 0..40u64 {
            let entry = Entry::parse(encode_entry(1, id, id as i64 - 1, &vec![id as u8; ENTRY])).expect("entry");
            writer.append(&entry).await.expect("append");
        }
        let info = writer.finish().await.expect("finish");
        (store, counting, info)
    }

    async fn read_all(reader: &SegmentReader) {
        let mut next = 0;
        while next <= 39 {
            let batch = reader.read(next, 39, 1024 * 1024).await.expect("read");
            for e in &batch {
                assert_eq!((e.entry_id, e.payload().len(), e.payload()[0]), (next, ENTRY, next as u8));
                next += 1;
            }
        }
    }

    #[tokio::test]
    async fn a_sequential_read_is_one_streamed_get_kept_within_read_ahead() {
        let (store, counting, info) = segment(ByteSize::mib(64)).await;
        let reader = store.open_segment(&info).await.expect("open");
        assert_eq!(counting.gets.swap(0, Ordering::SeqCst), 1, "open: one GET for index and footer");
        counting.get_bytes.store(0, Ordering::SeqCst);

        let first = reader.read(0, 39, 1024 * 1024).await.expect("read");
        assert_eq!((first.len(), first[0].entry_id), (1, 0));
        // The stream runs on while the reader is still in block 0, up to 8 MiB (8 blocks) ahead
        // of it, and no further.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while (0..8).any(|b| reader.cached(b).is_none()) {
            assert!(std::time::Instant::now() < deadline, "blocks 0..8 not prefetched within 10s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(reader.cached(8).is_none(), "the stream went past the read-ahead window");

        read_all(&reader).await;
        let (gets, bytes) = (counting.gets.load(Ordering::SeqCst), counting.get_bytes.load(Ordering::SeqCst));
        assert_eq!(gets, 1, "a sequential read of the segment is one GET");
        assert_eq!(bytes, info.size, "from the start, the GET is the whole object, once");
    }

    #[tokio::test]
    async fn reads_survive_a_stream_that_breaks_and_restart_it() {
        let (store, counting, info) = segment(ByteSize::mib(64)).await;
        // Bodies longer than 9 MiB fail after 9 MiB: every stream breaks, range GETs of the
        // 8 MiB read-ahead do not.
        counting.break_bodies_after.store(9 * 1024 * 1024, Ordering::SeqCst);
        let reader = store.open_segment(&info).await.expect("open");
        counting.gets.store(0, Ordering::SeqCst);
        read_all(&reader).await;
        assert!(counting.gets.load(Ordering::SeqCst) >= 2, "a broken stream is followed by other GETs");
        assert!(counting.broken.load(Ordering::SeqCst) >= 1, "no stream broke: the test tests nothing");
    }

    #[tokio::test]
    async fn without_a_cache_a_read_fetches_what_it_uses() {
        let (store, counting, info) = segment(ByteSize::b(0)).await;
        let reader = store.open_segment(&info).await.expect("open");
        counting.get_bytes.store(0, Ordering::SeqCst);
        let got = reader.read(20, 39, 1024 * 1024).await.expect("read");
        assert_eq!(got.len(), 1);
        let bytes = counting.get_bytes.load(Ordering::SeqCst);
        assert!(bytes <= 3 * BLOCK_BYTES, "{bytes} bytes fetched to read one {ENTRY}-byte entry");
    }
}
