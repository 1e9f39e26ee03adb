//! Tenants and namespaces, and the policies a namespace sets for its topics (bundles, retention,
//! ledger quorums). All of it lives in the metadata store, shared by every broker:
//! `/admin/tenants/<tenant>` and `/admin/namespaces/<tenant>/<namespace>` (JSON).
//!
//! Must never: leave partial state (a namespace whose tenant does not exist), or accept a policy
//! that makes no sense (quorums out of order, zero bundles).

use std::time::Duration;

use bytes::Bytes;
use bytesize::ByteSize;
use magnetar_common::metadata::{MetadataError, PutOptions, SharedStore, Version};
use magnetar_common::topic::{DEFAULT_NAMESPACE, DEFAULT_TENANT, validate_name_part};
use serde::{Deserialize, Serialize};

use super::ServiceError;
use crate::config::{BrokerConfig, MAX_BUNDLES};

pub const TENANTS_PREFIX: &str = "/admin/tenants/";
pub const NAMESPACES_PREFIX: &str = "/admin/namespaces/";

/// What a tenant records (nothing but its existence so far, and when it was made).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TenantInfo {
    pub created_at_ms: u64,
}

/// How long and how much acknowledged data a namespace's topics keep. A ledger whose every entry
/// is acknowledged by all subscriptions is deleted once it is older than `time` or once the
/// acknowledged ledgers together exceed `size`. Unset means unlimited (nothing is deleted on that
/// account); both unset (the default) keeps everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionPolicy {
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub time: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<ByteSize>,
}

impl RetentionPolicy {
    /// Whether the policy ever deletes anything.
    pub fn is_unlimited(&self) -> bool {
        self.time.is_none() && self.size.is_none()
    }
}

/// When a namespace's closed ledgers go to object storage. A namespace that sets this policy
/// replaces the broker's `[offload_policy]` threshold and age as a whole (unset: not on that
/// account; `{}` offloads only on request); an unset `deletion_lag` takes the broker's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadPolicy {
    /// Offload the oldest closed ledgers while the topic's data on bookies exceeds this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<ByteSize>,
    /// Offload closed ledgers whose newest entry is older than this.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub age: Option<Duration>,
    /// How long bookies keep their copies after the upload.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub deletion_lag: Option<Duration>,
}

/// A topic's offload policy once defaults are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveOffloadPolicy {
    pub threshold: Option<ByteSize>,
    pub age: Option<Duration>,
    pub deletion_lag: Duration,
}

/// A namespace's policies; unset fields take the broker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespacePolicies {
    /// Hash ranges the namespace's topics are grouped into (each owned by one broker). Fixed once
    /// the namespace has topics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundles: Option<u32>,
    pub retention: RetentionPolicy,
    /// Quorums of new ledgers of the namespace's topics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ensemble_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_quorum: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ack_quorum: Option<usize>,
    /// Offload to object storage; unset: the broker's `[offload_policy]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offload: Option<OffloadPolicy>,
}

/// The quorums a namespace's new ledgers get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quorums {
    pub ensemble_size: usize,
    pub write_quorum: usize,
    pub ack_quorum: usize,
}

impl NamespacePolicies {
    /// Checks the policies against themselves and the broker defaults they fall back to.
    pub fn validate(&self, config: &BrokerConfig) -> Result<(), String> {
        if let Some(b) = self.bundles
            && !(1..=MAX_BUNDLES).contains(&b)
        {
            return Err(format!("bundles is {b}; it must be between 1 and {MAX_BUNDLES}"));
        }
        let q = self.quorums(config);
        if !(q.ensemble_size >= q.write_quorum && q.write_quorum >= q.ack_quorum && q.ack_quorum >= 1) {
            return Err(format!(
                "quorums must satisfy ensemble_size >= write_quorum >= ack_quorum >= 1, got {}/{}/{}",
                q.ensemble_size, q.write_quorum, q.ack_quorum
            ));
        }
        if q.ensemble_size > 64 {
            return Err(format!("ensemble_size is {}; at most 64 bookies", q.ensemble_size));
        }
        if self.retention.time.is_some_and(|t| t.is_zero()) != self.retention.size.is_some_and(|s| s.as_u64() == 0)
            && (self.retention.time.is_some() && self.retention.size.is_some())
        {
            return Err(
                "retention time and size: when one is zero (keep nothing acknowledged), so must the other be".into()
            );
        }
        Ok(())
    }

    pub fn quorums(&self, config: &BrokerConfig) -> Quorums {
        Quorums {
            ensemble_size: self.ensemble_size.unwrap_or(config.ledger.ensemble_size),
            write_quorum: self.write_quorum.unwrap_or(config.ledger.write_quorum),
            ack_quorum: self.ack_quorum.unwrap_or(config.ledger.ack_quorum),
        }
    }

    pub fn offload_policy(&self, config: &BrokerConfig) -> EffectiveOffloadPolicy {
        let d = &config.offload_policy;
        match &self.offload {
            Some(p) => EffectiveOffloadPolicy {
                threshold: p.threshold,
                age: p.age,
                deletion_lag: p.deletion_lag.unwrap_or(d.deletion_lag),
            },
            None => EffectiveOffloadPolicy { threshold: d.threshold, age: d.age, deletion_lag: d.deletion_lag },
        }
    }

    pub fn bundles(&self, config: &BrokerConfig) -> u32 {
        self.bundles.unwrap_or(config.cluster.default_bundles)
    }
}

pub fn tenant_key(tenant: &str) -> String {
    format!("{TENANTS_PREFIX}{tenant}")
}

pub fn namespace_key(tenant: &str, namespace: &str) -> String {
    format!("{NAMESPACES_PREFIX}{tenant}/{namespace}")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn encode<T: Serialize>(v: &T) -> Result<Bytes, ServiceError> {
    serde_json::to_vec(v).map(Bytes::from).map_err(|e| ServiceError::Internal(e.to_string()))
}

fn check_part(what: &str, part: &str) -> Result<(), ServiceError> {
    validate_name_part(what, part).map_err(ServiceError::BadRequest)
}

/// Tenants and namespaces as kept in the metadata store.
#[derive(Debug, Clone)]
pub struct Policies {
    store: SharedStore,
}

impl Policies {
    pub fn new(store: SharedStore) -> Self {
        Self { store }
    }

    /// Creates `public` and `public/default` if they do not exist yet.
    pub async fn ensure_defaults(&self) -> Result<(), ServiceError> {
        for r in [
            self.store
                .put(
                    &tenant_key(DEFAULT_TENANT),
                    encode(&TenantInfo { created_at_ms: now_ms() })?,
                    PutOptions::absent(),
                )
                .await,
            self.store
                .put(
                    &namespace_key(DEFAULT_TENANT, DEFAULT_NAMESPACE),
                    encode(&NamespacePolicies::default())?,
                    PutOptions::absent(),
                )
                .await,
        ] {
            match r {
                Ok(_) | Err(MetadataError::Conflict { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub async fn tenants(&self) -> Result<Vec<String>, ServiceError> {
        let kvs = self.store.list(TENANTS_PREFIX).await?;
        Ok(kvs.into_iter().map(|kv| kv.key[TENANTS_PREFIX.len()..].to_string()).collect())
    }

    pub async fn tenant_exists(&self, tenant: &str) -> Result<bool, ServiceError> {
        Ok(self.store.get(&tenant_key(tenant)).await?.is_some())
    }

    pub async fn create_tenant(&self, tenant: &str) -> Result<(), ServiceError> {
        check_part("tenant", tenant)?;
        let info = encode(&TenantInfo { created_at_ms: now_ms() })?;
        match self.store.put(&tenant_key(tenant), info, PutOptions::absent()).await {
            Ok(_) => Ok(()),
            Err(MetadataError::Conflict { .. }) => Err(ServiceError::AlreadyExists(format!("tenant {tenant}"))),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes an empty tenant (one without namespaces).
    pub async fn delete_tenant(&self, tenant: &str) -> Result<(), ServiceError> {
        check_part("tenant", tenant)?;
        let Some(v) = self.store.get(&tenant_key(tenant)).await? else {
            return Err(ServiceError::NotFound(format!("tenant {tenant}")));
        };
        if !self.namespaces(tenant).await?.is_empty() {
            return Err(ServiceError::Conflict(format!("tenant {tenant} still has namespaces; delete them first")));
        }
        self.delete_versioned(&tenant_key(tenant), v.version, &format!("tenant {tenant}")).await
    }

    /// `tenant/namespace` names of a tenant's namespaces.
    pub async fn namespaces(&self, tenant: &str) -> Result<Vec<String>, ServiceError> {
        check_part("tenant", tenant)?;
        let prefix = format!("{NAMESPACES_PREFIX}{tenant}/");
        let kvs = self.store.list(&prefix).await?;
        Ok(kvs.into_iter().map(|kv| format!("{tenant}/{}", &kv.key[prefix.len()..])).collect())
    }

    /// A namespace's policies, with the version to update them by.
    pub async fn namespace(&self, tenant: &str, namespace: &str) -> Result<(NamespacePolicies, Version), ServiceError> {
        check_part("tenant", tenant)?;
        check_part("namespace", namespace)?;
        let Some(v) = self.store.get(&namespace_key(tenant, namespace)).await? else {
            return Err(ServiceError::NotFound(format!("namespace {tenant}/{namespace}")));
        };
        let p = serde_json::from_slice(&v.value).map_err(|e| {
            ServiceError::Internal(format!("policies of namespace {tenant}/{namespace} are unreadable: {e}"))
        })?;
        Ok((p, v.version))
    }

    /// The policies of the namespace a topic is in, or NotFound naming the missing namespace
    /// ("namespace T/N does not exist": on the wire, code TopicNotFound; over HTTP, 404).
    /// Not TopicNotFound, whose message is about a missing topic with automatic creation off.
    pub async fn for_topic(&self, tenant: &str, namespace: &str) -> Result<NamespacePolicies, ServiceError> {
        Ok(self.namespace(tenant, namespace).await?.0)
    }

    pub async fn create_namespace(
        &self,
        tenant: &str,
        namespace: &str,
        policies: &NamespacePolicies,
        config: &BrokerConfig,
    ) -> Result<(), ServiceError> {
        check_part("tenant", tenant)?;
        check_part("namespace", namespace)?;
        policies.validate(config).map_err(ServiceError::BadRequest)?;
        if !self.tenant_exists(tenant).await? {
            return Err(ServiceError::NotFound(format!("tenant {tenant}")));
        }
        match self.store.put(&namespace_key(tenant, namespace), encode(policies)?, PutOptions::absent()).await {
            Ok(_) => Ok(()),
            Err(MetadataError::Conflict { .. }) => {
                Err(ServiceError::AlreadyExists(format!("namespace {tenant}/{namespace}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a namespace's policies (compare-and-swap on `version` from [`Self::namespace`]).
    pub async fn set_policies(
        &self,
        tenant: &str,
        namespace: &str,
        policies: &NamespacePolicies,
        version: Version,
        config: &BrokerConfig,
    ) -> Result<(), ServiceError> {
        policies.validate(config).map_err(ServiceError::BadRequest)?;
        match self.store.put(&namespace_key(tenant, namespace), encode(policies)?, PutOptions::version(version)).await {
            Ok(_) => Ok(()),
            Err(MetadataError::Conflict { .. }) => Err(ServiceError::Conflict(format!(
                "policies of namespace {tenant}/{namespace} changed meanwhile; read them again"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a namespace; the caller checked it has no topics.
    pub async fn delete_namespace(&self, tenant: &str, namespace: &str) -> Result<(), ServiceError> {
        let (_, version) = self.namespace(tenant, namespace).await?;
        self.delete_versioned(&namespace_key(tenant, namespace), version, &format!("namespace {tenant}/{namespace}"))
            .await
    }

    async fn delete_versioned(&self, key: &str, version: Version, what: &str) -> Result<(), ServiceError> {
        match self.store.delete(key, Some(version)).await {
            Ok(_) => Ok(()),
            Err(MetadataError::Conflict { .. }) => {
                Err(ServiceError::Conflict(format!("{what} changed meanwhile; retry")))
            }
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_with_human_units_and_bad_ones_are_named() {
        let p: NamespacePolicies =
            serde_json::from_str(r#"{"bundles":8,"retention":{"time":"2h","size":"1GiB"},"write_quorum":2}"#)
                .expect("parses");
        assert_eq!(p.bundles, Some(8));
        assert_eq!(p.retention.time, Some(Duration::from_secs(7200)));
        assert_eq!(p.retention.size, Some(ByteSize::gib(1)));
        let config = BrokerConfig::default();
        p.validate(&config).expect("valid");
        let bad = NamespacePolicies { ack_quorum: Some(3), ..p.clone() };
        assert!(bad.validate(&config).expect_err("quorum").contains("ensemble_size >= write_quorum"));
        let bad = NamespacePolicies { bundles: Some(0), ..p };
        assert!(bad.validate(&config).expect_err("bundles").contains("bundles is 0"));
        assert!(serde_json::from_str::<NamespacePolicies>(r#"{"retention":{"tim":"1h"}}"#).is_err());
        assert!(NamespacePolicies::default().retention.is_unlimited());
    }
}
