//! On-disk format of journal files, and the scanner used by replay.
//!
//! A file is a 16-byte header (`MAGJRNL1`, file id) followed by records
//! `[u32 len][u32 crc32c][u8 kind][body]` where `len = 1 + body length` and the CRC covers the
//! file id, kind and body. Files are preallocated or recycled (a checkpointed file is reused under
//! a new id, so its blocks are already written and a sync needs no filesystem metadata update);
//! the valid data ends at the first record whose length is zero, runs past the file, or fails its
//! checksum: a torn tail left by a crash, or a record left from the file's previous use, whose
//! CRC was salted with another file id. Scanning stops there and keeps everything before it.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};

pub const MAGIC: &[u8; 8] = b"MAGJRNL1";
pub const HEADER_BYTES: u64 = 16;
pub const RECORD_HEADER_BYTES: usize = 9;
/// Record kind: an added entry (body: the encoded entry).
pub const KIND_ADD: u8 = 1;
/// Record kind: a ledger was fenced (body: the ledger id, 8 bytes).
pub const KIND_FENCE: u8 = 2;
/// Record kind: a ledger was deleted (body: the ledger id, 8 bytes).
pub const KIND_DELETE: u8 = 3;

fn record_crc(file_id: u64, kind: u8, body: &[u8]) -> u32 {
    let mut salt = [0u8; 9];
    salt[..8].copy_from_slice(&file_id.to_be_bytes());
    salt[8] = kind;
    crc32c::crc32c_append(crc32c::crc32c(&salt), body)
}

/// Appends a record of journal file `file_id` to `buf`.
pub fn put_record(buf: &mut BytesMut, file_id: u64, kind: u8, body: &[u8]) {
    let crc = record_crc(file_id, kind, body);
    buf.put_u32(1 + body.len() as u32);
    buf.put_u32(crc);
    buf.put_u8(kind);
    buf.put_slice(body);
}

pub fn header(file_id: u64) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[..8].copy_from_slice(MAGIC);
    h[8..].copy_from_slice(&file_id.to_be_bytes());
    h
}

pub fn file_name(dir: &Path, file_id: u64) -> PathBuf {
    dir.join(format!("{file_id:016x}.jnl"))
}

/// Name of a checkpointed file kept for reuse.
pub fn recycle_name(dir: &Path, old_id: u64) -> PathBuf {
    dir.join(format!("{old_id:016x}.recycle"))
}

/// Files kept for reuse in `dir`.
pub fn list_recycled(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_str().is_some_and(|n| n.ends_with(".recycle")) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

/// Journal file ids present in `dir`, ascending.
pub fn list_files(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_suffix(".jnl")
            && let Ok(id) = u64::from_str_radix(hex, 16)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Zero length: the clean end of written data.
    Clean,
    /// A record ran past the end of the file.
    Truncated,
    /// A record failed its checksum or had an impossible length.
    Corrupt { offset: u64 },
}

/// Reads records of one journal file from `start` (0 means just after the header).
/// Calls `f(kind, body, end_offset)` for each valid record; returns why the scan stopped and
/// the offset just after the last valid record.
pub fn scan_file(
    path: &Path,
    file_id: u64,
    start: u64,
    max_record_bytes: usize,
    mut f: impl FnMut(u8, Bytes, u64),
) -> io::Result<(ScanEnd, u64)> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut hdr = [0u8; HEADER_BYTES as usize];
    if len < HEADER_BYTES {
        return Ok((ScanEnd::Truncated, 0));
    }
    file.read_exact(&mut hdr)?;
    if &hdr[..8] != MAGIC || hdr[8..] != file_id.to_be_bytes() {
        return Ok((ScanEnd::Corrupt { offset: 0 }, 0));
    }
    let mut pos = start.max(HEADER_BYTES);
    file.seek(SeekFrom::Start(pos))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    loop {
        if pos + RECORD_HEADER_BYTES as u64 > len {
            return Ok((if pos == len { ScanEnd::Clean } else { ScanEnd::Truncated }, pos));
        }
        let mut rh = [0u8; RECORD_HEADER_BYTES];
        reader.read_exact(&mut rh)?;
        let rlen = u32::from_be_bytes([rh[0], rh[1], rh[2], rh[3]]) as usize;
        if rlen == 0 {
            return Ok((ScanEnd::Clean, pos));
        }
        if rlen > max_record_bytes + 1 {
            return Ok((ScanEnd::Corrupt { offset: pos }, pos));
        }
        if pos + 8 + rlen as u64 > len {
            return Ok((ScanEnd::Truncated, pos));
        }
        let crc = u32::from_be_bytes([rh[4], rh[5], rh[6], rh[7]]);
        let kind = rh[8];
        let mut body = vec![0u8; rlen - 1];
        reader.read_exact(&mut body)?;
        if record_crc(file_id, kind, &body) != crc {
            return Ok((ScanEnd::Corrupt { offset: pos }, pos));
        }
        pos += 8 + rlen as u64;
        f(kind, Bytes::from(body), pos);
    }
}
