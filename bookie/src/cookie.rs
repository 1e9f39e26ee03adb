//! Bookie identity ("cookies", as BookKeeper calls them).
//!
//! A bookie writes a cookie naming its id and instance to each of its directories and to the
//! metadata store. It refuses to start on a disk whose cookie names another bookie or instance,
//! or on an empty disk while the metadata store says this bookie holds data: a wiped or swapped
//! disk must never pass for the bookie that held the acknowledged entries. Nor does it start
//! when its disks hold data and the metadata store does not know it (as BookKeeper refuses):
//! the bookie was pointed at another cluster's store, or the store was replaced, and ledgers of
//! that store could be given ids its disks already hold. Disks that hold nothing but the cookie
//! (a first start that stopped before registering) are registered again.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use magnetar_common::metadata::{MetadataError, PutOptions, SharedStore};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

const FILE: &str = "COOKIE";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cookie {
    pub bookie_id: String,
    pub instance_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CookieError {
    #[error(
        "the metadata store says bookie {bookie_id} holds data (instance {instance_id}) but {dir} has no cookie: \
         the disk was wiped or replaced. Start the empty disk under a new bookie_id; reusing this id with an empty disk would make \
         it answer \"not found\" for entries it acknowledged. Only if its ledgers are known to be safe elsewhere, \
         delete metadata key {key} to reuse the id"
    )]
    EmptyDiskKnownBookie { bookie_id: String, instance_id: String, dir: String, key: String },
    #[error(
        "{dir} belongs to bookie {found_id} (instance {found_instance}), not to {bookie_id} (instance {expected_instance})"
    )]
    ForeignDisk { dir: String, found_id: String, found_instance: String, bookie_id: String, expected_instance: String },
    #[error(
        "{dir} holds data of bookie {bookie_id} (instance {instance_id}), but the metadata store has no cookie for it \
         (key {key}): the bookie is pointed at another cluster's metadata store, or the store was replaced. Point it \
         at its own store; to give this bookie to this cluster, empty its journal and ledger directories first \
         (their ledgers are not this store's)"
    )]
    UnknownToStore { bookie_id: String, instance_id: String, dir: String, key: String },
    #[error("{with} has a cookie but {without} has none: one of the bookie's disks was replaced")]
    Mismatch { with: String, without: String },
    #[error("read or write cookie in {dir}: {error}")]
    Io { dir: String, error: std::io::Error },
    #[error("cookie in {dir} is unreadable: {error}")]
    Corrupt { dir: String, error: String },
    #[error("metadata store: {0}")]
    Metadata(#[from] MetadataError),
}

pub fn metadata_key(bookie_id: &str) -> String {
    format!("/bookies/cookies/{bookie_id}")
}

fn read_disk(dir: &Path) -> Result<Option<Cookie>, CookieError> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| CookieError::Corrupt { dir: dir.display().to_string(), error: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(CookieError::Io { dir: dir.display().to_string(), error }),
    }
}

/// Whether `dir` holds anything besides the cookie (a journal file, entry logs, the index) and
/// the `lost+found` of a fresh ext4 volume mounted there. An unreadable directory counts as
/// holding data.
fn holds_data(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().any(|e| e.file_name() != FILE && e.file_name() != "lost+found"),
        Err(_) => true,
    }
}

fn write_disk(dir: &Path, cookie: &Cookie) -> Result<(), CookieError> {
    let io = |error| CookieError::Io { dir: dir.display().to_string(), error };
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    let body = serde_json::to_vec_pretty(cookie).map_err(|e| io(std::io::Error::other(e)))?;
    f.write_all(&body).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(FILE)).map_err(io)?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

/// Checks (or, for a new bookie, creates) the cookies; returns this bookie's instance id.
pub async fn verify_or_create(store: &SharedStore, bookie_id: &str, dirs: &[PathBuf]) -> Result<String, CookieError> {
    let mut on_disk: Vec<(String, Option<Cookie>)> = Vec::new();
    for d in dirs {
        std::fs::create_dir_all(d).map_err(|error| CookieError::Io { dir: d.display().to_string(), error })?;
        on_disk.push((d.display().to_string(), read_disk(d)?));
    }
    let with = on_disk.iter().find(|(_, c)| c.is_some()).cloned();
    let without = on_disk.iter().find(|(_, c)| c.is_none()).cloned();
    if let (Some((w, _)), Some((wo, _))) = (&with, &without) {
        return Err(CookieError::Mismatch { with: w.clone(), without: wo.clone() });
    }
    let key = metadata_key(bookie_id);
    let meta: Option<Cookie> = match store.get(&key).await? {
        Some(v) => Some(
            serde_json::from_slice(&v.value)
                .map_err(|e| CookieError::Corrupt { dir: format!("metadata key {key}"), error: e.to_string() })?,
        ),
        None => None,
    };
    match (with, meta) {
        (None, Some(m)) => Err(CookieError::EmptyDiskKnownBookie {
            bookie_id: bookie_id.into(),
            instance_id: m.instance_id,
            dir: dirs.first().map(|d| d.display().to_string()).unwrap_or_default(),
            key,
        }),
        (None, None) => {
            let cookie = Cookie { bookie_id: bookie_id.into(), instance_id: uuid::Uuid::new_v4().to_string() };
            for d in dirs {
                write_disk(d, &cookie)?;
            }
            let body = Bytes::from(serde_json::to_vec(&cookie).unwrap_or_default());
            store.put(&key, body, PutOptions::absent()).await?;
            info!(bookie_id, instance_id = %cookie.instance_id, "new bookie: cookies written");
            Ok(cookie.instance_id)
        }
        (Some((_, disk)), meta) => {
            let disk = disk.unwrap_or_else(|| Cookie { bookie_id: String::new(), instance_id: String::new() });
            for (dir, c) in &on_disk {
                if c.as_ref() != Some(&disk) || disk.bookie_id != bookie_id {
                    let c = c.clone().unwrap_or_else(|| disk.clone());
                    return Err(CookieError::ForeignDisk {
                        dir: dir.clone(),
                        found_id: c.bookie_id,
                        found_instance: c.instance_id,
                        bookie_id: bookie_id.into(),
                        expected_instance: disk.instance_id.clone(),
                    });
                }
            }
            match meta {
                Some(m) if m == disk => Ok(disk.instance_id),
                Some(m) => Err(CookieError::ForeignDisk {
                    dir: on_disk.first().map(|(d, _)| d.clone()).unwrap_or_default(),
                    found_id: disk.bookie_id,
                    found_instance: disk.instance_id,
                    bookie_id: bookie_id.into(),
                    expected_instance: m.instance_id,
                }),
                None => {
                    if let Some(dir) = dirs.iter().find(|d| holds_data(d)) {
                        return Err(CookieError::UnknownToStore {
                            bookie_id: bookie_id.into(),
                            instance_id: disk.instance_id,
                            dir: dir.display().to_string(),
                            key,
                        });
                    }
                    warn!(bookie_id, "disks hold only a cookie the metadata store lacks; registering it");
                    let body = Bytes::from(serde_json::to_vec(&disk).unwrap_or_default());
                    store.put(&key, body, PutOptions::absent()).await?;
                    Ok(disk.instance_id)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use magnetar_common::metadata::embedded::EmbeddedStore;
    use std::sync::Arc;

    #[tokio::test]
    async fn new_then_same_then_wiped_then_foreign() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store: SharedStore = Arc::new(EmbeddedStore::open(&tmp.path().join("meta")).expect("store"));
        let dirs = vec![tmp.path().join("j"), tmp.path().join("l")];
        let id = verify_or_create(&store, "b1", &dirs).await.expect("new bookie");
        assert_eq!(verify_or_create(&store, "b1", &dirs).await.expect("restart"), id);
        // Another bookie id on the same disks is refused.
        let err = verify_or_create(&store, "b2", &dirs).await.expect_err("foreign");
        assert!(matches!(err, CookieError::ForeignDisk { .. }), "{err}");
        // One disk replaced.
        std::fs::remove_file(dirs[1].join(FILE)).expect("rm");
        let err = verify_or_create(&store, "b1", &dirs).await.expect_err("mismatch");
        assert!(matches!(err, CookieError::Mismatch { .. }), "{err}");
        // Both wiped while the metadata store knows the bookie.
        std::fs::remove_file(dirs[0].join(FILE)).expect("rm");
        let err = verify_or_create(&store, "b1", &dirs).await.expect_err("wiped");
        assert!(err.to_string().contains("wiped or replaced"), "{err}");
    }

    #[tokio::test]
    async fn disks_with_data_unknown_to_the_store_are_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dirs = vec![tmp.path().join("j"), tmp.path().join("l")];
        let first: SharedStore = Arc::new(EmbeddedStore::open(&tmp.path().join("meta1")).expect("store"));
        let id = verify_or_create(&first, "b1", &dirs).await.expect("new bookie");
        // Only the cookies on disk (a first start that stopped before registering, or that did
        // nothing; a volume's lost+found does not count): another store takes the bookie.
        std::fs::create_dir(dirs[1].join("lost+found")).expect("mkdir");
        let second: SharedStore = Arc::new(EmbeddedStore::open(&tmp.path().join("meta2")).expect("store"));
        assert_eq!(verify_or_create(&second, "b1", &dirs).await.expect("registered again"), id);
        assert!(second.get(&metadata_key("b1")).await.expect("get").is_some());
        // With data on disk, a third store that does not know the bookie is refused.
        std::fs::write(dirs[0].join("0000000000000001.jnl"), b"records").expect("write");
        let third: SharedStore = Arc::new(EmbeddedStore::open(&tmp.path().join("meta3")).expect("store"));
        let err = verify_or_create(&third, "b1", &dirs).await.expect_err("unknown to the store");
        assert!(matches!(err, CookieError::UnknownToStore { .. }), "{err}");
        assert!(err.to_string().contains("another cluster's metadata store"), "{err}");
        assert!(third.get(&metadata_key("b1")).await.expect("get").is_none(), "not registered");
        // The store that knows it still takes it.
        assert_eq!(verify_or_create(&second, "b1", &dirs).await.expect("its own store"), id);
    }
}
