//! Magnetar's load-test tool (`magnetar perf ...`) and benchmarks.

pub mod bookie_perf;
pub mod cli;
pub mod client_perf;
pub mod connect;
pub mod loopback;
pub mod object_store_perf;
pub mod stats;
