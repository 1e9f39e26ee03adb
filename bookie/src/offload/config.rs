//! Object-store configuration (the `[offload]` section of a role's config) and opening a store.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use magnetar_common::config::ConfigError;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};

/// S3's smallest multipart part (all parts but the last).
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;
/// S3's largest multipart part.
pub const MAX_PART_BYTES: u64 = 5 * 1024 * 1024 * 1024;

/// Where offloaded ledgers go and how the store is reached.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadConfig {
    /// `s3://bucket[/prefix]`, `file:///absolute/dir[/...]` or `memory://[prefix]` (tests: one
    /// fresh in-memory store per `open`).
    pub url: String,
    /// S3 endpoint, e.g. `http://127.0.0.1:9000` for MinIO. Unset: `AWS_ENDPOINT_URL` /
    /// `AWS_ENDPOINT` if set, else AWS.
    pub endpoint: Option<String>,
    /// S3 region. Unset: `AWS_REGION` / `AWS_DEFAULT_REGION` if set, else `us-east-1`.
    pub region: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which MinIO and most S3-compatible servers
    /// need. `false`: virtual-hosted style (`bucket.endpoint/key`), as AWS prefers.
    pub path_style: bool,
    /// Allow plain `http://` endpoints.
    pub allow_http: bool,
    /// Static credentials; both or neither. Unset: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, then the usual AWS providers (web identity, instance metadata).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// One HTTP request, from sending to the end of the body.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// TCP (and TLS) connect.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Retries of a failed request (5xx, 503 SlowDown, timeouts, connection errors).
    pub max_retries: usize,
    /// No retry starts after this much time since the first attempt.
    #[serde(with = "humantime_serde")]
    pub retry_timeout: Duration,
    /// First backoff between retries; doubles up to `retry_max_backoff`.
    #[serde(with = "humantime_serde")]
    pub retry_initial_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Size of multipart upload parts (the last part may be smaller). A segment smaller than
    /// one part is written with a single PUT. At least 5 MiB (S3's minimum); at most
    /// 10,000 parts per object.
    pub part_bytes: ByteSize,
    /// Parts uploaded at once per segment.
    pub upload_concurrency: usize,
    /// A read that misses the cache fetches at least this much (to the end of the segment's
    /// data at most), so sequential catch-up reads make few, large GETs.
    pub read_ahead_bytes: ByteSize,
    /// Bytes of fetched segment data kept in memory (shared by every reader of this store).
    /// 0 disables the cache; read-ahead then only serves the read that fetched it.
    pub cache_bytes: ByteSize,
}

impl Default for OffloadConfig {
    fn default() -> Self {
        let retry = RetryConfig::default();
        let backoff = BackoffConfig::default();
        Self {
            url: String::new(),
            endpoint: None,
            region: None,
            path_style: false,
            allow_http: false,
            access_key_id: None,
            secret_access_key: None,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_retries: retry.max_retries,
            retry_timeout: retry.retry_timeout,
            retry_initial_backoff: backoff.init_backoff,
            retry_max_backoff: backoff.max_backoff,
            part_bytes: ByteSize::mib(8),
            upload_concurrency: 4,
            read_ahead_bytes: ByteSize::mib(8),
            cache_bytes: ByteSize::mib(128),
        }
    }
}

impl std::fmt::Debug for OffloadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("allow_http", &self.allow_http)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "<redacted>"))
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .field("retry_initial_backoff", &self.retry_initial_backoff)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("part_bytes", &self.part_bytes)
            .field("upload_concurrency", &self.upload_concurrency)
            .field("read_ahead_bytes", &self.read_ahead_bytes)
            .field("cache_bytes", &self.cache_bytes)
            .finish()
    }
}

/// What `url` points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Location {
    S3 { bucket: String, prefix: String },
    Local { dir: PathBuf },
    Memory { prefix: String },
}

/// An opened backend: the client, the key prefix, and for `file://` the directory.
pub(crate) type Built = (Arc<dyn ObjectStore>, Path, Option<PathBuf>);

fn fail<T>(msg: String) -> Result<T, ConfigError> {
    Err(ConfigError(msg))
}

impl OffloadConfig {
    /// Checks values that parse but make no sense; the message names the key (`offload.KEY`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.location()?;
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return fail("offload.access_key_id and offload.secret_access_key must be set together".into());
        }
        if let Some(endpoint) = &self.endpoint {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return fail(format!("offload.endpoint {endpoint:?} must start with http:// or https://"));
            }
            if endpoint.starts_with("http://") && !self.allow_http {
                return fail(format!("offload.endpoint {endpoint:?} is plain HTTP: set offload.allow_http = true"));
            }
        }
        let part = self.part_bytes.as_u64();
        if !(MIN_PART_BYTES..=MAX_PART_BYTES).contains(&part) {
            return fail(format!("offload.part_bytes is {}; it must be between 5 MiB and 5 GiB", self.part_bytes));
        }
        if !(1..=64).contains(&self.upload_concurrency) {
            return fail(format!(
                "offload.upload_concurrency is {}; it must be between 1 and 64",
                self.upload_concurrency
            ));
        }
        let read_ahead = self.read_ahead_bytes.as_u64();
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&read_ahead) {
            return fail(format!(
                "offload.read_ahead_bytes is {}; it must be between 1 MiB and 1 GiB",
                self.read_ahead_bytes
            ));
        }
        if self.max_retries > 100 {
            return fail(format!("offload.max_retries is {}; it must be at most 100", self.max_retries));
        }
        for (name, d) in [
            ("offload.request_timeout", self.request_timeout),
            ("offload.connect_timeout", self.connect_timeout),
            ("offload.retry_initial_backoff", self.retry_initial_backoff),
            ("offload.retry_max_backoff", self.retry_max_backoff),
        ] {
            if d.is_zero() {
                return fail(format!("{name} must be positive"));
            }
        }
        if self.retry_max_backoff < self.retry_initial_backoff {
            return fail("offload.retry_max_backoff must be at least offload.retry_initial_backoff".into());
        }
        Ok(())
    }

    pub(crate) fn location(&self) -> Result<Location, ConfigError> {
        let url = self.url.as_str();
        let bad = |why: &str| fail(format!("offload.url {url:?} {why}"));
        if url.is_empty() {
            return fail("offload.url must be set (s3://bucket/prefix, file:///dir or memory://)".into());
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
            if !(3..=63).contains(&bucket.len()) || !bucket.chars().all(valid) {
                return bad("has no valid bucket name (3 to 63 of a-z 0-9 . -)");
            }
            return Ok(Location::S3 { bucket: bucket.into(), prefix: check_prefix(url, prefix)? });
        }
        if let Some(rest) = url.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return bad("must name an absolute directory: file:///abs/dir");
            }
            if rest.split('/').any(|c| c == "..") {
                return bad("must not contain ..");
            }
            return Ok(Location::Local { dir: PathBuf::from(rest) });
        }
        if let Some(rest) = url.strip_prefix("memory://") {
            return Ok(Location::Memory { prefix: check_prefix(url, rest)? });
        }
        bad("must start with s3://, file:// or memory://")
    }

    /// Builds the object_store backend and the key prefix everything goes under.
    pub(crate) fn build(&self) -> Result<Built, ConfigError> {
        self.validate()?;
        match self.location()? {
            Location::Memory { prefix } => Ok((Arc::new(InMemory::new()), Path::from(prefix), None)),
            Location::Local { dir } => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| ConfigError(format!("offload.url: create directory {}: {e}", dir.display())))?;
                let store = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| ConfigError(format!("offload.url: open directory {}: {e}", dir.display())))?;
                Ok((Arc::new(store), Path::default(), Some(dir)))
            }
            Location::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_virtual_hosted_style_request(!self.path_style)
                    .with_allow_http(self.allow_http)
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig {
                            init_backoff: self.retry_initial_backoff,
                            max_backoff: self.retry_max_backoff,
                            base: 2.0,
                        },
                        max_retries: self.max_retries,
                        retry_timeout: self.retry_timeout,
                    })
                    .with_client_options(
                        ClientOptions::new()
                            .with_allow_http(self.allow_http)
                            .with_timeout(self.request_timeout)
                            .with_connect_timeout(self.connect_timeout),
                    );
                if let Some(endpoint) = &self.endpoint {
                    b = b.with_endpoint(endpoint);
                }
                if let Some(region) = &self.region {
                    b = b.with_region(region);
                }
                if let (Some(id), Some(secret)) = (&self.access_key_id, &self.secret_access_key) {
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                }
                let store = b.build().map_err(|e| ConfigError(format!("offload: S3 store for {}: {e}", self.url)))?;
                Ok((Arc::new(store), Path::from(prefix), None))
            }
        }
    }
}

fn check_prefix(url: &str, prefix: &str) -> Result<String, ConfigError> {
    let prefix = prefix.trim_matches('/');
    let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    let bad_part = |part: &str| part.is_empty() || part == "." || part == ".." || !part.chars().all(valid);
    if !prefix.is_empty() && prefix.split('/').any(bad_part) {
        return fail(format!("offload.url {url:?}: the prefix may only hold segments of A-Z a-z 0-9 - _ ."));
    }
    Ok(prefix.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> OffloadConfig {
        OffloadConfig { url: url.into(), ..OffloadConfig::default() }
    }

    #[test]
    fn urls() {
        assert_eq!(
            with_url("s3://bucket-1/a/b/").location().ok(),
            Some(Location::S3 { bucket: "bucket-1".into(), prefix: "a/b".into() })
        );
        assert_eq!(
            with_url("s3://bucket").location().ok(),
            Some(Location::S3 { bucket: "bucket".into(), prefix: String::new() })
        );
        assert_eq!(with_url("file:///tmp/x").location().ok(), Some(Location::Local { dir: "/tmp/x".into() }));
        assert_eq!(with_url("memory://").location().ok(), Some(Location::Memory { prefix: String::new() }));
        for (url, words) in [
            ("", "must be set"),
            ("s3://", "bucket"),
            ("s3://Upper/x", "bucket"),
            ("s3://bucket/a//b", "prefix"),
            ("s3://bucket/a b", "prefix"),
            ("file://rel/dir", "absolute"),
            ("file:///a/../b", ".."),
            ("gs://bucket", "must start with"),
        ] {
            let err = with_url(url).validate().expect_err(url).0;
            assert!(err.contains("offload.url") && err.contains(words), "{url}: {err}");
        }
    }

    #[test]
    fn validation_names_the_key() {
        let base = with_url("s3://bucket/p");
        let cases: Vec<(OffloadConfig, &str)> = vec![
            (OffloadConfig { part_bytes: ByteSize::mib(4), ..base.clone() }, "offload.part_bytes"),
            (OffloadConfig { upload_concurrency: 0, ..base.clone() }, "offload.upload_concurrency"),
            (OffloadConfig { read_ahead_bytes: ByteSize::kib(4), ..base.clone() }, "offload.read_ahead_bytes"),
            (OffloadConfig { request_timeout: Duration::ZERO, ..base.clone() }, "offload.request_timeout"),
            (OffloadConfig { access_key_id: Some("a".into()), ..base.clone() }, "offload.secret_access_key"),
            (OffloadConfig { endpoint: Some("127.0.0.1:9000".into()), ..base.clone() }, "offload.endpoint"),
            (OffloadConfig { endpoint: Some("http://127.0.0.1:9000".into()), ..base.clone() }, "offload.allow_http"),
        ];
        for (config, key) in cases {
            let err = config.validate().expect_err(key).0;
            assert!(err.contains(key), "{key}: {err}");
        }
        base.validate().expect("defaults are valid");
    }

    #[test]
    fn toml_keys_and_defaults() {
        let c: OffloadConfig = toml::from_str(
            r#"
            url = "s3://magnetar/offload"
            endpoint = "http://127.0.0.1:9000"
            region = "us-east-1"
            path_style = true
            allow_http = true
            access_key_id = "minioadmin"
            secret_access_key = "minioadmin"
            request_timeout = "10s"
            part_bytes = "16MiB"
            "#,
        )
        .expect("parses");
        c.validate().expect("valid");
        assert_eq!(c.part_bytes, ByteSize::mib(16));
        assert_eq!(c.request_timeout, Duration::from_secs(10));
        assert_eq!(format!("{c:?}").matches("minioadmin").count(), 1, "the secret must not be printed");
        assert!(format!("{c:?}").contains("<redacted>"));
        let unknown = toml::from_str::<OffloadConfig>("url = \"memory://\"\nbucket = \"x\"");
        assert!(unknown.is_err_and(|e| e.to_string().contains("unknown field")));
    }
}
