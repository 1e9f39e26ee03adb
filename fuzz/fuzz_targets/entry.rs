//! Arbitrary bytes as ledger entries: parsing must never panic, and an accepted entry must
//! re-encode to the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use magnetar_common::entry::{Entry, encode_entry};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Entry::parse(Bytes::copy_from_slice(data)) {
        assert_eq!(&encode_entry(e.ledger_id, e.entry_id, e.lac, &e.payload())[..], data);
    }
});
