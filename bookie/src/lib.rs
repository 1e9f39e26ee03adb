//! Magnetar's bookie: durable ledger storage (journal, entry logs, index), the bookie service
//! (TCP protocol, HTTP health and metrics, registration), the ledger client brokers use, and the
//! object-store layer of the offload tier.

pub mod client;
pub mod config;
pub mod cookie;
pub mod entry_log;
pub mod error;
pub mod index;
pub mod journal;
pub mod metrics;
pub mod offload;
pub mod server;
pub mod storage;
