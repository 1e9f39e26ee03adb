//! Magnetar's shared pieces: wire codecs that do no I/O, identifiers, configuration helpers,
//! and the metadata-store trait with its etcd and embedded implementations.

pub mod addr;
pub mod batch;
pub mod bookie_proto;
pub mod config;
pub mod entry;
pub mod ids;
pub mod metadata;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod topic;
pub mod udp;
pub mod wire;
