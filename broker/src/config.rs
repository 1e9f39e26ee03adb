//! The broker's configuration: one serde struct, loaded from a commented TOML file and
//! `MAGNETAR_BROKER_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use magnetar_bookie::client::{AutoRecoveryConfig, LedgerClientConfig};
use magnetar_bookie::offload::OffloadConfig;
use magnetar_common::addr::HostPort;
use magnetar_common::config::{ConfigError, RoleConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Where clients connect (QUIC, UDP).
    pub quic_addr: SocketAddr,
    /// Where `/health`, `/metrics` and the admin API are served (HTTP).
    pub http_addr: SocketAddr,
    /// `host:port` clients are told to connect to for this broker's topics; empty: `quic_addr`
    /// (which must then not be a wildcard address).
    pub advertised_addr: String,
    /// `host:port` other brokers and admin tools use for this broker's HTTP API; empty:
    /// `http_addr` (which must then not be a wildcard address).
    pub advertised_http_addr: String,
    /// Metadata store URL: `etcd://host:port[,host:port]/root` or `embedded:/dir`.
    pub metadata_url: String,
    /// TLS certificate chain (PEM) and private key (PEM). Both empty: generate a self-signed
    /// certificate for localhost under `data_dir/tls` (development only).
    pub tls_cert_file: PathBuf,
    pub tls_key_file: PathBuf,
    /// Where a generated certificate is kept.
    pub data_dir: PathBuf,
    /// Create topics when a producer or consumer first names them.
    pub allow_auto_topic_creation: bool,
    /// Largest batch (one `Send`) accepted, in bytes.
    pub max_message_bytes: ByteSize,
    pub ledger: ManagedLedgerConfig,
    pub dispatch: DispatchConfig,
    pub limits: LimitsConfig,
    /// Bytes of recently written entries kept for tailing consumers.
    pub cache_bytes: ByteSize,
    pub ledger_client: LedgerClientConfig,
    pub cluster: ClusterConfig,
    /// Re-replication of ledger copies lost with a dead bookie (one broker of the cluster at a
    /// time audits; see docs/ledgers.md).
    pub autorecovery: AutoRecoveryConfig,
    /// The object store sealed ledgers are offloaded to (`[offload]`; see docs/object-storage.md).
    /// Absent: nothing is offloaded, and ledgers offloaded earlier cannot be read.
    pub offload: Option<OffloadConfig>,
    /// When ledgers are offloaded (namespaces may set their own) and how uploads are paced.
    pub offload_policy: OffloadPolicyConfig,
}

/// `[offload_policy]`: the default offload policy of namespaces that set none, and the pacing of
/// uploads. Ledgers are offloaded oldest first, only once closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadPolicyConfig {
    /// Offload the oldest closed ledgers while the topic's data on bookies exceeds this. Unset:
    /// never on account of size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ByteSize>,
    /// Offload closed ledgers whose newest entry is older than this. Unset: never on account of
    /// age.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub age: Option<Duration>,
    /// How long the bookies keep their copies after a ledger is offloaded (reads stay local
    /// meanwhile). 0: delete at once.
    #[serde(with = "humantime_serde")]
    pub deletion_lag: Duration,
    /// How often each topic checks its policy (an admin request runs a check at once).
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// Ledgers uploading at once on this broker (each with `offload.upload_concurrency` parts in
    /// flight).
    pub max_concurrent_uploads: usize,
    /// Upload bandwidth of this broker, per second. 0: unlimited.
    pub max_upload_rate: ByteSize,
    /// After a failed upload the topic waits this long before trying again, doubling up to
    /// `retry_max_backoff`.
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
}

impl Default for OffloadPolicyConfig {
    fn default() -> Self {
        Self {
            threshold: None,
            age: None,
            deletion_lag: Duration::from_secs(4 * 3600),
            check_interval: Duration::from_secs(60),
            max_concurrent_uploads: 2,
            max_upload_rate: ByteSize::b(0),
            retry_initial_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(300),
        }
    }
}

impl OffloadPolicyConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.check_interval < Duration::from_millis(100) {
            return fail(format!(
                "offload_policy.check_interval is {:?}; it must be at least 100ms",
                self.check_interval
            ));
        }
        if !(1..=64).contains(&self.max_concurrent_uploads) {
            return fail(format!(
                "offload_policy.max_concurrent_uploads is {}; it must be between 1 and 64",
                self.max_concurrent_uploads
            ));
        }
        if self.retry_initial_backoff.is_zero() || self.retry_max_backoff < self.retry_initial_backoff {
            return fail(
                "offload_policy.retry_initial_backoff must be positive and retry_max_backoff at least as long".into(),
            );
        }
        Ok(())
    }
}

/// Ownership of topics by brokers: bundles, leases, placement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// A broker's registration and its bundle ownerships vanish this long after it stops
    /// renewing them (a crash): then another broker takes its topics. 2s to 60s.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Bundles (hash ranges of topic names) of a namespace that has not set its own number.
    pub default_bundles: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { lease_ttl: Duration::from_secs(3), default_bundles: 4 }
    }
}

/// How a topic's entries are stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagedLedgerConfig {
    /// Ensemble size, write quorum and ack quorum of new ledgers.
    pub ensemble_size: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
    /// A ledger is closed and a new one started after this many entries...
    pub rollover_max_entries: u64,
    /// ...or this many bytes...
    pub rollover_max_bytes: ByteSize,
    /// ...or when it is older than this (and not empty).
    #[serde(with = "humantime_serde")]
    pub rollover_max_age: Duration,
    /// Cursor positions are written to the metadata store at most this often (and on close).
    #[serde(with = "humantime_serde")]
    pub cursor_persist_interval: Duration,
    /// Most individually acknowledged ranges beyond the mark-delete position a cursor persists;
    /// beyond it the oldest ranges are kept and later acknowledgements are redelivered after a
    /// restart (at-least-once).
    pub cursor_max_persisted_ranges: usize,
    /// How often a topic applies its namespace's retention policy (deletes acknowledged ledgers
    /// beyond it). At least 1s.
    #[serde(with = "humantime_serde")]
    pub retention_check_interval: Duration,
}

/// How entries reach consumers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Most entries read from storage at once for a subscription.
    pub read_batch_entries: usize,
    /// Most bytes read from storage at once for a subscription.
    pub read_batch_bytes: ByteSize,
    /// Most permits a consumer may hold (a larger Flow is capped).
    pub max_consumer_permits: u32,
    /// Most entries a key_shared subscription holds back for busy consumers before it stops
    /// reading ahead.
    pub max_replay_entries: usize,
}

/// Bounds that keep a broker's memory fixed whatever its clients do.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Batches a producer may have in flight; beyond it the broker stops reading its stream.
    pub max_pending_publishes_per_producer: usize,
    /// Batches all producers of one connection may have in flight.
    pub max_pending_publishes_per_connection: usize,
    /// Bytes of in-flight publishes across the broker.
    pub max_publish_memory: ByteSize,
    /// Producers plus consumers per connection.
    pub max_streams_per_connection: u32,
    /// Connections idle this long are closed (QUIC keeps live ones alive).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 6650)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            advertised_addr: String::new(),
            advertised_http_addr: String::new(),
            metadata_url: "etcd://127.0.0.1:2379/magnetar".into(),
            tls_cert_file: PathBuf::new(),
            tls_key_file: PathBuf::new(),
            data_dir: PathBuf::from("data/broker"),
            allow_auto_topic_creation: true,
            max_message_bytes: ByteSize::mib(5),
            ledger: ManagedLedgerConfig::default(),
            dispatch: DispatchConfig::default(),
            limits: LimitsConfig::default(),
            cache_bytes: ByteSize::mib(128),
            ledger_client: LedgerClientConfig::default(),
            cluster: ClusterConfig::default(),
            autorecovery: AutoRecoveryConfig::default(),
            offload: None,
            offload_policy: OffloadPolicyConfig::default(),
        }
    }
}

impl Default for ManagedLedgerConfig {
    fn default() -> Self {
        Self {
            ensemble_size: 2,
            write_quorum: 2,
            ack_quorum: 2,
            rollover_max_entries: 50_000,
            rollover_max_bytes: ByteSize::gib(2),
            rollover_max_age: Duration::from_secs(4 * 3600),
            cursor_persist_interval: Duration::from_secs(1),
            cursor_max_persisted_ranges: 10_000,
            retention_check_interval: Duration::from_secs(60),
        }
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            read_batch_entries: 100,
            read_batch_bytes: ByteSize::mib(4),
            max_consumer_permits: 100_000,
            max_replay_entries: 10_000,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_pending_publishes_per_producer: 1000,
            max_pending_publishes_per_connection: 10_000,
            max_publish_memory: ByteSize::mib(128),
            max_streams_per_connection: 1000,
            idle_timeout: Duration::from_secs(10),
        }
    }
}

/// The largest `max_message_bytes` a configuration may set: clients accept frames of up to
/// 8 MiB plus headers.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 8 * 1024 * 1024;

fn fail<T>(msg: String) -> Result<T, ConfigError> {
    Err(ConfigError(msg))
}

impl RoleConfig for BrokerConfig {
    const ENV_PREFIX: &'static str = "MAGNETAR_BROKER_";

    fn validate(&self) -> Result<(), ConfigError> {
        if !(self.metadata_url.starts_with("etcd://") || self.metadata_url.starts_with("embedded:")) {
            return fail(format!("metadata_url {:?} must start with etcd:// or embedded:", self.metadata_url));
        }
        if self.tls_cert_file.as_os_str().is_empty() != self.tls_key_file.as_os_str().is_empty() {
            return fail("tls_cert_file and tls_key_file must be set together (or both left empty)".into());
        }
        let max = self.max_message_bytes.as_u64();
        if !(1024..=MAX_MESSAGE_BYTES_LIMIT).contains(&max) {
            return fail(format!("max_message_bytes is {max}; it must be between 1 KiB and 8 MiB"));
        }
        let l = &self.ledger;
        if !(l.ensemble_size >= l.write_quorum && l.write_quorum >= l.ack_quorum && l.ack_quorum >= 1) {
            return fail(format!(
                "ledger quorums must satisfy ensemble_size >= write_quorum >= ack_quorum >= 1, got {}/{}/{}",
                l.ensemble_size, l.write_quorum, l.ack_quorum
            ));
        }
        if l.rollover_max_entries == 0 || l.rollover_max_bytes.as_u64() < max {
            return fail(
                "ledger.rollover_max_entries must be positive and rollover_max_bytes at least max_message_bytes".into(),
            );
        }
        if l.cursor_persist_interval.is_zero() || l.rollover_max_age.is_zero() {
            return fail("ledger.cursor_persist_interval and ledger.rollover_max_age must be positive".into());
        }
        if l.retention_check_interval < Duration::from_secs(1) {
            return fail(format!(
                "ledger.retention_check_interval is {:?}; it must be at least 1s",
                l.retention_check_interval
            ));
        }
        let d = &self.dispatch;
        if d.read_batch_entries == 0 || d.max_consumer_permits == 0 || d.max_replay_entries == 0 {
            return fail("dispatch limits must be positive".into());
        }
        let lim = &self.limits;
        if lim.max_pending_publishes_per_producer == 0 || lim.max_pending_publishes_per_connection == 0 {
            return fail("limits.max_pending_publishes_* must be positive".into());
        }
        if lim.max_publish_memory.as_u64() < max {
            return fail(format!(
                "limits.max_publish_memory ({}) must be at least max_message_bytes ({})",
                lim.max_publish_memory, self.max_message_bytes
            ));
        }
        if lim.max_streams_per_connection == 0 || lim.idle_timeout < Duration::from_secs(1) {
            return fail("limits.max_streams_per_connection must be positive and idle_timeout at least 1s".into());
        }
        self.advertised_quic()?;
        self.advertised_http()?;
        let c = &self.cluster;
        if !(Duration::from_secs(2)..=Duration::from_secs(60)).contains(&c.lease_ttl) {
            return fail(format!("cluster.lease_ttl is {:?}; it must be between 2s and 60s", c.lease_ttl));
        }
        if !(1..=MAX_BUNDLES).contains(&c.default_bundles) {
            return fail(format!(
                "cluster.default_bundles is {}; it must be between 1 and {MAX_BUNDLES}",
                c.default_bundles
            ));
        }
        self.autorecovery.validate().map_err(ConfigError)?;
        if let Some(offload) = &self.offload {
            offload.validate()?;
        }
        self.offload_policy.validate()?;
        Ok(())
    }
}

/// Most bundles a namespace may have.
pub const MAX_BUNDLES: u32 = 1024;

impl BrokerConfig {
    /// `host:port` clients reach this broker's QUIC listener at.
    pub fn advertised_quic(&self) -> Result<String, ConfigError> {
        advertised("advertised_addr", &self.advertised_addr, "quic_addr", self.quic_addr)
    }

    /// `host:port` of this broker's HTTP API for other brokers and tools.
    pub fn advertised_http(&self) -> Result<String, ConfigError> {
        advertised("advertised_http_addr", &self.advertised_http_addr, "http_addr", self.http_addr)
    }
}

fn advertised(key: &str, value: &str, listen_key: &str, listen: SocketAddr) -> Result<String, ConfigError> {
    if value.is_empty() {
        if listen.ip().is_unspecified() {
            return fail(format!(
                "{listen_key} {listen} listens on every interface: set {key} to the host:port others reach it at"
            ));
        }
        return Ok(listen.to_string());
    }
    match HostPort::parse(value, None) {
        Ok(_) => Ok(value.to_string()),
        Err(why) => fail(format!("{key} {value:?} must be host:port: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_common::config::from_toml;

    #[test]
    fn defaults_are_valid_and_bad_values_are_named() {
        BrokerConfig::default().validate().expect("defaults valid");
        let c: BrokerConfig =
            from_toml("max_message_bytes = \"1MiB\"\n[ledger]\nrollover_max_age = \"10m\"\n").expect("parses");
        assert_eq!(c.max_message_bytes, ByteSize::mib(1));
        assert_eq!(c.ledger.rollover_max_age, Duration::from_secs(600));
        let err = from_toml::<BrokerConfig>("[ledger]\nensemble_size = 1\nwrite_quorum = 2\n").expect_err("quorum");
        assert!(err.to_string().contains("ensemble_size >= write_quorum"), "{err}");
        let err = from_toml::<BrokerConfig>("tls_cert_file = \"a.pem\"\n").expect_err("tls");
        assert!(err.to_string().contains("tls_key_file"), "{err}");
        assert!(from_toml::<BrokerConfig>("no_such_field = 1\n").is_err());
        let err = from_toml::<BrokerConfig>("quic_addr = \"0.0.0.0:6650\"\n").expect_err("wildcard");
        assert!(err.to_string().contains("set advertised_addr"), "{err}");
        let c: BrokerConfig =
            from_toml("quic_addr = \"0.0.0.0:6650\"\nadvertised_addr = \"broker-0.magnetar:6650\"\n").expect("parses");
        assert_eq!(c.advertised_quic().expect("advertised"), "broker-0.magnetar:6650");
        assert_eq!(c.advertised_http().expect("advertised"), "127.0.0.1:8080");
        let err = from_toml::<BrokerConfig>("advertised_addr = \"nohost\"\n").expect_err("no port");
        assert!(err.to_string().contains("host:port"), "{err}");
        // Clients are sent to quic://{advertised_addr}: an IPv6 address needs its brackets.
        let err = from_toml::<BrokerConfig>("advertised_addr = \"fd00::5:6650\"\n").expect_err("unbracketed");
        assert!(err.to_string().contains("must be in brackets"), "{err}");
        let c: BrokerConfig = from_toml("advertised_addr = \"[fd00::5]:6650\"\n").expect("bracketed");
        assert_eq!(c.advertised_quic().expect("advertised"), "[fd00::5]:6650");
        let err = from_toml::<BrokerConfig>("[cluster]\nlease_ttl = \"1s\"\n").expect_err("ttl");
        assert!(err.to_string().contains("lease_ttl"), "{err}");
        let err = from_toml::<BrokerConfig>("[ledger]\nretention_check_interval = \"10ms\"\n").expect_err("interval");
        assert!(err.to_string().contains("retention_check_interval"), "{err}");
    }
}
