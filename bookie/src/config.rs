//! The bookie's configuration: one serde struct, loaded from a commented TOML file
//! (see `config/bookie.toml`) and `MAGNETAR_BOOKIE_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use magnetar_common::addr::HostPort;
use magnetar_common::config::{ConfigError, RoleConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BookieConfig {
    /// Stable identity of this bookie in the cluster. Empty: the advertised address.
    pub bookie_id: String,
    /// Where the bookie protocol (TCP) listens.
    pub listen_addr: SocketAddr,
    /// Address writers use to reach this bookie. Empty: `listen_addr` (after binding).
    pub advertised_addr: String,
    /// Where `/health` and `/metrics` are served (HTTP).
    pub http_addr: SocketAddr,
    /// Metadata store URL: `etcd://host:port[,host:port]/root` or `embedded:/dir`.
    pub metadata_url: String,
    /// How long the bookie's registration outlives a silent bookie.
    #[serde(with = "humantime_serde")]
    pub registration_ttl: Duration,
    /// Journal directory (put it on its own fast disk when there is one).
    pub journal_dir: PathBuf,
    /// Entry logs and index directory.
    pub ledger_dir: PathBuf,
    /// Largest entry accepted (payload plus its 28-byte header).
    pub max_entry_bytes: ByteSize,
    pub journal: JournalConfig,
    pub storage: StorageConfig,
    pub disk: DiskConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JournalConfig {
    /// fdatasync each group commit before acknowledging. Turning this off acknowledges adds that
    /// are only in the OS page cache: a power loss or kernel crash loses them (a process crash
    /// does not). Replicas on other bookies are then the only protection.
    pub fsync: bool,
    /// With `flush_when_idle = false`: how long a group waits for more records to arrive.
    #[serde(with = "humantime_serde")]
    pub group_commit_max_wait: Duration,
    /// A group commit is issued once this many bytes are buffered.
    pub group_commit_max_bytes: ByteSize,
    /// Commit as soon as no more records are waiting (lowest latency at low load).
    pub flush_when_idle: bool,
    /// Journal files rotate at this size.
    pub max_file_bytes: ByteSize,
    /// Journal files grow by preallocated chunks of this size.
    pub preallocate_bytes: ByteSize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Memory for entries acknowledged but not yet in entry logs. Flushed at half; when full,
    /// adds wait up to `write_cache_max_wait` and then fail with "bookie overloaded".
    pub write_cache_bytes: ByteSize,
    #[serde(with = "humantime_serde")]
    pub write_cache_max_wait: Duration,
    /// Checkpoint (flush write cache to entry logs, then trim the journal) at least this often.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Entry log files rotate at this size.
    pub entry_log_max_bytes: ByteSize,
    /// How often deleted ledgers' space is reclaimed.
    #[serde(with = "humantime_serde")]
    pub gc_interval: Duration,
    /// Entry logs whose live share falls below this are compacted (0 disables compaction;
    /// fully dead logs are always deleted).
    pub compaction_threshold: f64,
    /// How often the bookie looks for ledgers it stores whose metadata is gone (deleted while
    /// this bookie was down or unreachable) or says they live in object storage only, and
    /// deletes its copies; the first sweep runs one interval after start. `0s` turns it off.
    #[serde(with = "humantime_serde")]
    pub orphan_sweep_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Above this share of used space on the journal or ledger disk the bookie turns read-only.
    pub usage_threshold: f64,
    /// Below this share it accepts writes again.
    pub usage_low_water_mark: f64,
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for BookieConfig {
    fn default() -> Self {
        Self {
            bookie_id: String::new(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 3181)),
            advertised_addr: String::new(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            metadata_url: "etcd://127.0.0.1:2379/magnetar".into(),
            registration_ttl: Duration::from_secs(10),
            journal_dir: PathBuf::from("data/bookie/journal"),
            ledger_dir: PathBuf::from("data/bookie/ledgers"),
            // Above the broker's default max_message_bytes (5 MiB) plus the entry header.
            max_entry_bytes: ByteSize::mib(6),
            journal: JournalConfig::default(),
            storage: StorageConfig::default(),
            disk: DiskConfig::default(),
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            fsync: true,
            group_commit_max_wait: Duration::from_millis(1),
            group_commit_max_bytes: ByteSize::kib(512),
            flush_when_idle: true,
            max_file_bytes: ByteSize::mib(256),
            preallocate_bytes: ByteSize::mib(16),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            write_cache_bytes: ByteSize::mib(256),
            write_cache_max_wait: Duration::from_secs(1),
            flush_interval: Duration::from_secs(10),
            entry_log_max_bytes: ByteSize::gib(1),
            gc_interval: Duration::from_secs(60),
            compaction_threshold: 0.5,
            orphan_sweep_interval: Duration::from_secs(3600),
        }
    }
}

impl Default for DiskConfig {
    fn default() -> Self {
        Self { usage_threshold: 0.95, usage_low_water_mark: 0.90, check_interval: Duration::from_secs(5) }
    }
}

/// The largest `max_entry_bytes` a configuration may set.
pub const MAX_ENTRY_BYTES_LIMIT: u64 = 64 * 1024 * 1024;

fn fail<T>(msg: String) -> Result<T, ConfigError> {
    Err(ConfigError(msg))
}

impl RoleConfig for BookieConfig {
    const ENV_PREFIX: &'static str = "MAGNETAR_BOOKIE_";

    fn validate(&self) -> Result<(), ConfigError> {
        if self.metadata_url.is_empty() {
            return fail("metadata_url must be set (etcd://host:port/root or embedded:/dir)".into());
        }
        if !(self.metadata_url.starts_with("etcd://") || self.metadata_url.starts_with("embedded:")) {
            return fail(format!("metadata_url {:?} must start with etcd:// or embedded:", self.metadata_url));
        }
        if self.advertised_addr.is_empty() {
            if self.listen_addr.ip().is_unspecified() {
                return fail(format!(
                    "listen_addr {} listens on every interface: set advertised_addr to the host:port brokers reach this bookie at",
                    self.listen_addr
                ));
            }
        } else if let Err(why) = HostPort::parse(&self.advertised_addr, None) {
            return fail(format!("advertised_addr {:?} must be host:port: {why}", self.advertised_addr));
        }
        if self.journal_dir.as_os_str().is_empty() || self.ledger_dir.as_os_str().is_empty() {
            return fail("journal_dir and ledger_dir must be set".into());
        }
        let max_entry = self.max_entry_bytes.as_u64();
        if !(64..=MAX_ENTRY_BYTES_LIMIT).contains(&max_entry) {
            return fail(format!("max_entry_bytes is {max_entry}; it must be between 64 B and 64 MiB"));
        }
        if self.storage.write_cache_bytes.as_u64() < 2 * max_entry {
            return fail(format!(
                "storage.write_cache_bytes ({}) must be at least twice max_entry_bytes ({})",
                self.storage.write_cache_bytes, self.max_entry_bytes
            ));
        }
        if self.journal.max_file_bytes.as_u64() < 2 * max_entry {
            return fail("journal.max_file_bytes must be at least twice max_entry_bytes".into());
        }
        if self.journal.group_commit_max_bytes.as_u64() == 0 {
            return fail("journal.group_commit_max_bytes must be positive".into());
        }
        if self.storage.entry_log_max_bytes.as_u64() < 2 * max_entry {
            return fail("storage.entry_log_max_bytes must be at least twice max_entry_bytes".into());
        }
        if !(0.0..1.0).contains(&self.storage.compaction_threshold) {
            return fail("storage.compaction_threshold must be in [0, 1)".into());
        }
        let d = &self.disk;
        if !(d.usage_threshold > 0.0 && d.usage_threshold <= 1.0) {
            return fail(format!("disk.usage_threshold is {}; it must be in (0, 1]", d.usage_threshold));
        }
        if !(d.usage_low_water_mark > 0.0 && d.usage_low_water_mark <= d.usage_threshold) {
            return fail("disk.usage_low_water_mark must be in (0, disk.usage_threshold]".into());
        }
        if self.registration_ttl < Duration::from_secs(1) {
            return fail("registration_ttl must be at least 1s".into());
        }
        for (name, d) in [
            ("storage.flush_interval", self.storage.flush_interval),
            ("storage.gc_interval", self.storage.gc_interval),
            ("disk.check_interval", d.check_interval),
        ] {
            if d.is_zero() {
                return fail(format!("{name} must be positive"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_common::config::from_toml;

    #[test]
    fn defaults_are_valid_and_units_parse() {
        BookieConfig::default().validate().expect("defaults valid");
        let c: BookieConfig = from_toml(
            "max_entry_bytes = \"1MiB\"\n[journal]\ngroup_commit_max_wait = \"2ms\"\n[storage]\nwrite_cache_bytes = \"64MiB\"\n",
        )
        .expect("parses");
        assert_eq!(c.max_entry_bytes, ByteSize::mib(1));
        assert_eq!(c.journal.group_commit_max_wait, Duration::from_millis(2));
        assert_eq!(c.storage.write_cache_bytes, ByteSize::mib(64));
    }

    #[test]
    fn bad_values_name_the_field() {
        let e = from_toml::<BookieConfig>("[disk]\nusage_threshold = 1.5\n").expect_err("invalid");
        assert!(e.0.contains("disk.usage_threshold"), "{e}");
        let e = from_toml::<BookieConfig>("no_such_key = 1\n").expect_err("unknown key");
        assert!(e.0.contains("no_such_key"), "{e}");
    }

    #[test]
    fn the_advertised_address_is_one_brokers_can_reach() {
        // Brokers would be told to connect to 0.0.0.0.
        let e = from_toml::<BookieConfig>("listen_addr = \"0.0.0.0:3181\"\n").expect_err("wildcard");
        assert!(e.0.contains("set advertised_addr"), "{e}");
        let c: BookieConfig =
            from_toml("listen_addr = \"0.0.0.0:3181\"\nadvertised_addr = \"bookie-0.bookies:3181\"\n").expect("set");
        assert_eq!(c.advertised_addr, "bookie-0.bookies:3181");
        for (bad, why) in [("bookie-0", "expected HOST:PORT"), ("fd00::5:3181", "brackets"), ("b:0", "1 to 65535")] {
            let e = from_toml::<BookieConfig>(&format!("advertised_addr = \"{bad}\"\n")).expect_err(bad);
            assert!(e.0.contains("advertised_addr") && e.0.contains(why), "{bad}: {e}");
        }
        from_toml::<BookieConfig>("advertised_addr = \"[fd00::5]:3181\"\n").expect("bracketed IPv6");
    }
}
