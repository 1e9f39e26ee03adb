//! The `magnetar` binary: every role and tool behind one command.

mod admin;
mod bookie;
mod broker;
mod client_cmd;
mod standalone;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// jemalloc returns freed memory to the OS and keeps fragmentation low across the many threads
/// of a bookie or broker; glibc's per-thread arenas held on to released write-cache memory.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up configuration (a C string it reads through this exported symbol): freed
/// pages go back to the OS after 1 s instead of the default 10 s. A flush frees half the write
/// cache at once; with 10 s those pages stayed resident while new adds refilled the cache, and
/// the bookie's peak memory exceeded its configured caches by ~100 MiB. Measured with
/// `benches/run-bookie-bench.sh`; `_RJEM_MALLOC_CONF` in the environment still overrides it.
#[allow(unsafe_code, non_upper_case_globals)] // exporting a symbol is `unsafe` in edition 2024; this is data only
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 20] = b"dirty_decay_ms:1000\0";

#[derive(Debug, Parser)]
#[command(
    name = "magnetar",
    version,
    about = "Magnetar: a Pulsar-style streaming broker with storage and compute separated"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process: metadata store, bookie and broker, data under one directory.
    Standalone(standalone::StandaloneArgs),
    /// Run a broker: serves producers and consumers, stores through bookies.
    Broker(broker::BrokerArgs),
    /// Run a bookie: durable ledger storage.
    Bookie(bookie::BookieArgs),
    /// Publish messages (from arguments or standard input); prints "ID<TAB>PAYLOAD" per stored message.
    Produce(client_cmd::ProduceArgs),
    /// Receive and acknowledge messages; prints one payload per line.
    Consume(client_cmd::ConsumeArgs),
    /// Load-test tools.
    Perf(magnetar_benches::cli::PerfArgs),
    /// Administer a cluster through a broker's admin HTTP API: tenants, namespaces, topics,
    /// subscriptions, brokers, bookies.
    Admin(admin::AdminArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// Returns every arena's unused dirty pages to the OS at once (jemalloc's `arena.<all>.purge`).
/// Called after each write-cache flush, which frees half the cache in one go: with the 1 s decay
/// above those pages stayed resident while adds refilled the cache, and the bookie's peak memory
/// exceeded its caches by ~70 MiB. A decay of 0 for the whole process would do the same but
/// costs the broker's small allocations a third of its throughput.
#[allow(unsafe_code)] // FFI call into the allocator; no pointers are passed besides the name
fn purge_freed_memory() {
    // MALLCTL_ARENAS_ALL is 4096 in jemalloc 5.
    const NAME: &[u8] = b"arena.4096.purge\0";
    // SAFETY: a NUL-terminated name, no old or new value; purging has no other effect.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            NAME.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        tracing::debug!(rc, "jemalloc purge");
    }
}

fn main() -> ExitCode {
    magnetar_bookie::storage::set_after_flush_hook(purge_freed_memory);
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Standalone(args) => standalone::run(args).await,
            Command::Broker(args) => broker::run(args).await,
            Command::Bookie(args) => bookie::run(args).await,
            Command::Produce(args) => client_cmd::produce(args).await,
            Command::Consume(args) => client_cmd::consume(args).await,
            Command::Perf(args) => magnetar_benches::cli::run(args).await,
            Command::Admin(args) => admin::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves when the process is asked to stop (Ctrl-C or SIGTERM).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = ctrl_c => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
    }
}
