//! Magnetar's bookie: durable ledger storage (journal, entry logs, index), the bookie service
//! (TCP protocol, HTTP health and metrics, registration) and the ledger client brokers use.

pub mod client;
pub mod config;
pub mod cookie;
pub mod entry_log;
pub mod error;
pub mod index;
pub mod journal;
pub mod metrics;
pub mod server;
pub mod storage;
