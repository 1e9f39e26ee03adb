//! The segment object format: bytes in, bytes out, no I/O.
//!
//! A segment holds consecutive entries of one ledger, then a sparse index, then a fixed footer:
//!
//! ```text
//! data    entry*   each [u32 len][len bytes: the entry exactly as bookies store it,
//!                  common/src/entry.rs: u64 ledger, u64 entry, i64 lac, u32 crc32c, payload]
//! index   record*  each [u64 entry_id][u64 offset of that entry's length prefix]: the first
//!                  entry, then the first entry starting at or after every INDEX_INTERVAL_BYTES
//! footer  FOOTER_BYTES, see below
//! ```
//!
//! Every integer is big-endian, as in the other Magnetar formats. The entry's own CRC32C covers
//! its ids and its payload, so a reader verifies each entry with `Entry::parse` and checks its
//! (ledger, entry) ids: a corrupted length prefix misframes the next entry and fails that check.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the length prefix before each entry.
pub const LEN_PREFIX_BYTES: usize = 4;
/// One index record: `[u64 entry_id][u64 offset]`.
pub const INDEX_RECORD_BYTES: usize = 16;
/// An index record is written for the first entry starting at or after every multiple of this
/// many data bytes, so finding any entry costs at most this many extra bytes read.
pub const INDEX_INTERVAL_BYTES: u64 = 256 * 1024;
/// Last 8 bytes of every segment object.
pub const MAGIC: [u8; 8] = *b"MGSEGMNT";
/// Format version written by this code, and the only one it reads.
pub const VERSION: u32 = 1;
/// Size of the footer.
pub const FOOTER_BYTES: usize = 68;

/// The footer, the last [`FOOTER_BYTES`] of a segment object:
///
/// | Offset | Size | Field |
/// |---|---|---|
/// | 0  | 4 | version (1) |
/// | 4  | 8 | ledger id |
/// | 12 | 8 | first entry id |
/// | 20 | 8 | last entry id |
/// | 28 | 8 | entry count (`last - first + 1`) |
/// | 36 | 8 | index offset (= bytes of data) |
/// | 44 | 8 | index length in bytes |
/// | 52 | 4 | CRC32C of the index bytes |
/// | 56 | 4 | CRC32C of footer bytes 0..56 |
/// | 60 | 8 | magic `MGSEGMNT` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub ledger_id: u64,
    pub first_entry: u64,
    pub last_entry: u64,
    pub entries: u64,
    pub index_offset: u64,
    pub index_len: u64,
    pub index_crc: u32,
}

impl Footer {
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(VERSION);
        out.put_u64(self.ledger_id);
        out.put_u64(self.first_entry);
        out.put_u64(self.last_entry);
        out.put_u64(self.entries);
        out.put_u64(self.index_offset);
        out.put_u64(self.index_len);
        out.put_u32(self.index_crc);
        let crc = crc32c::crc32c(&out[start..]);
        out.put_u32(crc);
        out.put_slice(&MAGIC);
    }

    /// Decodes and checks a footer: magic, version, its own CRC and the consistency of its fields.
    pub fn decode(raw: &[u8]) -> Result<Footer, String> {
        if raw.len() != FOOTER_BYTES {
            return Err(format!("footer is {} bytes, expected {FOOTER_BYTES}", raw.len()));
        }
        if raw[60..] != MAGIC {
            return Err("no segment magic at the end of the object".into());
        }
        let u32_at = |i: usize| u32::from_be_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
        let u64_at = |i: usize| u64::from_be_bytes(raw[i..i + 8].try_into().unwrap_or([0; 8]));
        let (stored, computed) = (u32_at(56), crc32c::crc32c(&raw[..56]));
        if stored != computed {
            return Err(format!("footer checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"));
        }
        let version = u32_at(0);
        if version != VERSION {
            return Err(format!("segment format version {version}, this build reads only {VERSION}"));
        }
        let footer = Footer {
            ledger_id: u64_at(4),
            first_entry: u64_at(12),
            last_entry: u64_at(20),
            entries: u64_at(28),
            index_offset: u64_at(36),
            index_len: u64_at(44),
            index_crc: u32_at(52),
        };
        if footer.last_entry < footer.first_entry || footer.entries != footer.last_entry - footer.first_entry + 1 {
            return Err(format!(
                "footer entries {}..={} do not match its count {}",
                footer.first_entry, footer.last_entry, footer.entries
            ));
        }
        if footer.index_len == 0 || !footer.index_len.is_multiple_of(INDEX_RECORD_BYTES as u64) {
            return Err(format!("footer index length {} is not a positive multiple of 16", footer.index_len));
        }
        Ok(footer)
    }
}

/// Builds the sparse index while entries are written.
#[derive(Debug, Default)]
pub struct IndexBuilder {
    records: BytesMut,
    next_boundary: u64,
}

impl IndexBuilder {
    /// Notes an entry whose length prefix starts at `offset`.
    pub fn add(&mut self, entry_id: u64, offset: u64) {
        if self.records.is_empty() || offset >= self.next_boundary {
            self.records.put_u64(entry_id);
            self.records.put_u64(offset);
            self.next_boundary = (offset / INDEX_INTERVAL_BYTES + 1) * INDEX_INTERVAL_BYTES;
        }
    }

    pub fn finish(self) -> Bytes {
        self.records.freeze()
    }
}

/// A decoded sparse index: `(entry id, offset)` in increasing order of both.
#[derive(Debug, Clone)]
pub struct Index {
    records: Vec<(u64, u64)>,
    data_len: u64,
}

impl Index {
    /// Decodes the index bytes and checks them against the footer.
    pub fn decode(raw: &[u8], footer: &Footer) -> Result<Index, String> {
        if raw.len() as u64 != footer.index_len {
            return Err(format!("index is {} bytes, footer says {}", raw.len(), footer.index_len));
        }
        let (stored, computed) = (footer.index_crc, crc32c::crc32c(raw));
        if stored != computed {
            return Err(format!("index checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"));
        }
        let mut records = Vec::with_capacity(raw.len() / INDEX_RECORD_BYTES);
        for record in raw.chunks_exact(INDEX_RECORD_BYTES) {
            let entry = u64::from_be_bytes(record[..8].try_into().unwrap_or([0; 8]));
            let offset = u64::from_be_bytes(record[8..].try_into().unwrap_or([0; 8]));
            records.push((entry, offset));
        }
        let ordered = records.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        let in_range = records
            .iter()
            .all(|&(e, o)| (footer.first_entry..=footer.last_entry).contains(&e) && o < footer.index_offset);
        if records.first() != Some(&(footer.first_entry, 0)) || !ordered || !in_range {
            return Err("index records are out of order or outside the segment".into());
        }
        Ok(Index { records, data_len: footer.index_offset })
    }

    /// Where to start reading to find `entry`: the last indexed `(entry id, offset)` at or before
    /// it. `entry` must be within the segment.
    pub fn seek(&self, entry: u64) -> (u64, u64) {
        let i = self.records.partition_point(|&(e, _)| e <= entry);
        self.records[i.saturating_sub(1)]
    }

    /// An offset at or after the end of `entry`: the next indexed entry's offset, or the end of
    /// the data.
    pub fn end_bound(&self, entry: u64) -> u64 {
        let i = self.records.partition_point(|&(e, _)| e <= entry);
        self.records.get(i).map_or(self.data_len, |&(_, o)| o)
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// Writes one framed entry.
pub fn put_entry(out: &mut BytesMut, raw_entry: &[u8]) {
    out.put_u32(raw_entry.len() as u32);
    out.put_slice(raw_entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer() -> Footer {
        Footer {
            ledger_id: 7,
            first_entry: 10,
            last_entry: 19,
            entries: 10,
            index_offset: 1000,
            index_len: 32,
            index_crc: 0xdead_beef,
        }
    }

    #[test]
    fn footer_round_trip_and_golden_bytes() {
        let mut out = BytesMut::new();
        footer().encode(&mut out);
        assert_eq!(out.len(), FOOTER_BYTES);
        assert_eq!(Footer::decode(&out), Ok(footer()));
        let mut want = Vec::new();
        want.extend_from_slice(&1u32.to_be_bytes());
        for v in [7u64, 10, 19, 10, 1000, 32] {
            want.extend_from_slice(&v.to_be_bytes());
        }
        want.extend_from_slice(&0xdead_beefu32.to_be_bytes());
        want.extend_from_slice(&crc32c::crc32c(&want).to_be_bytes());
        want.extend_from_slice(b"MGSEGMNT");
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn every_footer_bit_flip_and_truncation_is_detected() {
        let mut out = BytesMut::new();
        footer().encode(&mut out);
        for i in 0..out.len() * 8 {
            let mut bad = out.to_vec();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(Footer::decode(&bad).is_err(), "bit {i} flip undetected");
        }
        for n in 0..out.len() {
            assert!(Footer::decode(&out[..n]).is_err());
        }
    }

    #[test]
    fn sparse_index_seeks_and_bounds() {
        let mut b = IndexBuilder::default();
        // Entries of 100 KiB: offsets 0, 100K, 200K, 300K (past 256K: indexed), ...
        let size = 100 * 1024;
        for e in 0..10u64 {
            b.add(100 + e, e * size);
        }
        let raw = b.finish();
        let f = Footer {
            ledger_id: 1,
            first_entry: 100,
            last_entry: 109,
            entries: 10,
            index_offset: 10 * size,
            index_len: raw.len() as u64,
            index_crc: crc32c::crc32c(&raw),
        };
        let index = Index::decode(&raw, &f).expect("valid index");
        // Indexed: entry 100 @0, 103 @300K (first at or after 256K), 106 @600K (>= 512K), 108 @800K.
        assert_eq!(index.len(), 4);
        assert_eq!(index.seek(100), (100, 0));
        assert_eq!(index.seek(102), (100, 0));
        assert_eq!(index.seek(103), (103, 3 * size));
        assert_eq!(index.seek(109), (108, 8 * size));
        assert_eq!(index.end_bound(102), 3 * size);
        assert_eq!(index.end_bound(109), 10 * size);
        let mut bad = raw.to_vec();
        bad[5] ^= 1;
        assert!(Index::decode(&bad, &f).is_err());
        assert!(Index::decode(&raw[..16], &f).is_err());
    }
}
