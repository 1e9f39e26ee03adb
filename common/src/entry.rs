//! The ledger entry format shared by writers, bookies and readers.
//!
//! An entry is `[u64 ledger][u64 entry][i64 last_add_confirmed][u32 crc32c][payload]`, big-endian.
//! The CRC32C digest covers the 24 header bytes before it and the payload, so corruption anywhere
//! between the writer and a reader (network, journal, entry log, object storage) is detected.
//! Bookies store and return entries verbatim; readers verify the digest before using a payload.
//! This module does no I/O.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes of the entry header that precedes the payload.
pub const ENTRY_HEADER_BYTES: usize = 28;

/// "No entry" for last-add-confirmed and last-entry fields.
pub const NO_ENTRY: i64 = -1;

/// Why bytes are not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry is {len} bytes, shorter than its {ENTRY_HEADER_BYTES}-byte header")]
    Truncated { len: usize },
    #[error("entry {ledger_id}:{entry_id} failed its checksum (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { ledger_id: u64, entry_id: u64, stored: u32, computed: u32 },
}

/// Encodes an entry with its digest.
pub fn encode_entry(ledger_id: u64, entry_id: u64, lac: i64, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(ENTRY_HEADER_BYTES + payload.len());
    buf.put_u64(ledger_id);
    buf.put_u64(entry_id);
    buf.put_i64(lac);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..24]), payload);
    buf.put_u32(crc);
    buf.put_slice(payload);
    buf.freeze()
}

/// A verified entry; the payload shares the original buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub ledger_id: u64,
    pub entry_id: u64,
    pub lac: i64,
    raw: Bytes,
}

impl Entry {
    /// Parses and verifies an encoded entry without copying it.
    pub fn parse(raw: Bytes) -> Result<Self, EntryError> {
        let (ledger_id, entry_id, lac) = peek_header(&raw)?;
        let stored = u32::from_be_bytes([raw[24], raw[25], raw[26], raw[27]]);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&raw[..24]), &raw[ENTRY_HEADER_BYTES..]);
        if stored != computed {
            return Err(EntryError::Checksum { ledger_id, entry_id, stored, computed });
        }
        Ok(Self { ledger_id, entry_id, lac, raw })
    }

    /// The payload, sharing the entry's buffer.
    pub fn payload(&self) -> Bytes {
        self.raw.slice(ENTRY_HEADER_BYTES..)
    }

    /// The encoded entry, as stored on bookies.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn into_raw(self) -> Bytes {
        self.raw
    }
}

/// Reads (ledger, entry, lac) from an encoded entry without checking its digest.
pub fn peek_header(raw: &[u8]) -> Result<(u64, u64, i64), EntryError> {
    if raw.len() < ENTRY_HEADER_BYTES {
        return Err(EntryError::Truncated { len: raw.len() });
    }
    let u = |i: usize| u64::from_be_bytes(raw[i..i + 8].try_into().unwrap_or([0; 8]));
    Ok((u(0), u(8), u(16) as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let raw = encode_entry(7, 42, 41, b"hello");
        let e = Entry::parse(raw.clone()).expect("valid");
        assert_eq!((e.ledger_id, e.entry_id, e.lac), (7, 42, 41));
        assert_eq!(&e.payload()[..], b"hello");
        assert_eq!(e.raw(), &raw);
    }

    #[test]
    fn golden_bytes() {
        let raw = encode_entry(1, 2, -1, b"x");
        let mut want = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2];
        want.extend_from_slice(&[0xff; 8]);
        let crc = crc32c::crc32c(&[&want[..], b"x"].concat());
        want.extend_from_slice(&crc.to_be_bytes());
        want.push(b'x');
        assert_eq!(&raw[..], &want[..]);
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let raw = encode_entry(3, 4, 2, b"payload bytes");
        for i in 0..raw.len() * 8 {
            let mut bad = raw.to_vec();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(Entry::parse(Bytes::from(bad)).is_err(), "bit {i} flip undetected");
        }
    }

    #[test]
    fn truncation_is_an_error() {
        let raw = encode_entry(3, 4, 2, b"p");
        for n in 0..raw.len() {
            assert!(Entry::parse(raw.slice(..n)).is_err(), "truncated to {n} accepted");
        }
    }
}
