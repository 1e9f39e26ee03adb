//! The conformance suite of the [`MetadataStore`](super::MetadataStore) contract: every
//! implementation must pass it.
//!
//! Each check is a public async fn taking the store; [`run_all`] runs them one after another.
//! Every check works under its own unique key prefix, so suites can share one store (and one
//! etcd). Checks wait for asynchronous outcomes (lease expiry, watch events) by polling with a
//! generous deadline and never assert on how long something took. They panic on failure: this
//! module is test support, compiled only for tests and the `testing` feature.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::testing::wait_until;

use super::{
    KeyValue, LeaseKeeper, LeaseState, MAX_KEY_BYTES, MAX_VALUE_BYTES, MetadataError, PutOptions, SharedStore,
    WatchEvent,
};

/// How long a check waits for something that must happen soon (expiry, an event).
const DEADLINE: Duration = Duration::from_secs(30);
/// Short lease ttl used by the expiry checks (etcd rounds it up to its minimum, about 2 s).
const SHORT_TTL: Duration = Duration::from_secs(1);

/// One check of the suite, as stored by [`run_all`].
type Check = fn(&SharedStore) -> futures::future::BoxFuture<'_, ()>;

/// Runs every check of the suite against `store`.
pub async fn run_all(store: SharedStore) {
    let checks: [(&str, Check); 15] = [
        ("get_put_versions", |s| Box::pin(get_put_versions(s))),
        ("create_if_absent", |s| Box::pin(create_if_absent(s))),
        ("cas_conflict", |s| Box::pin(cas_conflict(s))),
        ("delete_if_version", |s| Box::pin(delete_if_version(s))),
        ("list_prefix", |s| Box::pin(list_prefix(s))),
        ("invalid_requests", |s| Box::pin(invalid_requests(s))),
        ("watch_events", |s| Box::pin(watch_events(s))),
        ("watch_consistent_under_writes", |s| Box::pin(watch_consistent_under_writes(s))),
        ("lease_expiry_deletes_keys", |s| Box::pin(lease_expiry_deletes_keys(s))),
        ("revoke_deletes_keys", |s| Box::pin(revoke_deletes_keys(s))),
        ("renew_keeps_keys", |s| Box::pin(renew_keeps_keys(s))),
        ("unknown_lease_put_fails", |s| Box::pin(unknown_lease_put_fails(s))),
        ("lease_keeper_renews_and_revokes", |s| Box::pin(lease_keeper_renews_and_revokes(s))),
        ("lease_keeper_detects_loss", |s| Box::pin(lease_keeper_detects_loss(s))),
        ("concurrent_cas", |s| Box::pin(concurrent_cas(s))),
    ];
    for (name, check) in checks {
        eprintln!("metadata conformance: {name} on {store:?}");
        check(&store).await;
    }
}

/// A key prefix no other check (in this or another process) uses.
pub fn unique_prefix(check: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("/conformance/{check}-{}-{nanos}-{n}/", std::process::id())
}

async fn next_event(events: &mut mpsc::Receiver<WatchEvent>) -> WatchEvent {
    match tokio::time::timeout(DEADLINE, events.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("watch channel closed while an event was expected"),
        Err(_) => panic!("no watch event within {DEADLINE:?}"),
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn is_conflict<T: std::fmt::Debug>(result: Result<T, MetadataError>) -> bool {
    matches!(result, Err(MetadataError::Conflict { .. }))
}

/// get/put round-trip; every write gives a new, larger version; a re-created key a fresh one.
pub async fn get_put_versions(store: &SharedStore) {
    let key = format!("{}k", unique_prefix("versions"));
    assert_eq!(store.get(&key).await.expect("get missing"), None);
    let v1 = store.put(&key, b("one"), PutOptions::any()).await.expect("put one");
    assert!(v1 > 0, "version 0 never names a stored key");
    let got = store.get(&key).await.expect("get").expect("key present");
    assert_eq!((got.value, got.version), (b("one"), v1));
    let v2 = store.put(&key, b("two"), PutOptions::any()).await.expect("put two");
    assert!(v2 > v1, "a write must give a larger version ({v2} after {v1})");
    let got = store.get(&key).await.expect("get").expect("key present");
    assert_eq!((got.value, got.version), (b("two"), v2));
    assert!(store.delete(&key, None).await.expect("delete"));
    assert_eq!(store.get(&key).await.expect("get deleted"), None);
    let v3 = store.put(&key, b("three"), PutOptions::any()).await.expect("re-create");
    assert!(v3 > v2, "a re-created key must not get an old version back");
    let empty = store.put(&key, Bytes::new(), PutOptions::any()).await.expect("put empty value");
    assert_eq!(store.get(&key).await.expect("get").expect("present").version, empty);
}

/// `PutOptions::absent()` creates once and then conflicts, until the key is deleted.
pub async fn create_if_absent(store: &SharedStore) {
    let key = format!("{}k", unique_prefix("absent"));
    let v1 = store.put(&key, b("first"), PutOptions::absent()).await.expect("create");
    assert!(is_conflict(store.put(&key, b("second"), PutOptions::absent()).await));
    let got = store.get(&key).await.expect("get").expect("present");
    assert_eq!((got.value, got.version), (b("first"), v1), "a failed create changes nothing");
    assert!(store.delete(&key, Some(v1)).await.expect("delete"));
    store.put(&key, b("again"), PutOptions::absent()).await.expect("create after delete");
}

/// Compare-and-swap succeeds on the current version only.
pub async fn cas_conflict(store: &SharedStore) {
    let prefix = unique_prefix("cas");
    let key = format!("{prefix}k");
    let v1 = store.put(&key, b("a"), PutOptions::any()).await.expect("put");
    let v2 = store.put(&key, b("b"), PutOptions::version(v1)).await.expect("cas on current");
    assert!(is_conflict(store.put(&key, b("c"), PutOptions::version(v1)).await), "stale cas");
    assert!(is_conflict(store.put(&key, b("c"), PutOptions::version(0)).await), "version 0");
    let got = store.get(&key).await.expect("get").expect("present");
    assert_eq!((got.value, got.version), (b("b"), v2));
    let missing = format!("{prefix}missing");
    assert!(is_conflict(store.put(&missing, b("x"), PutOptions::version(v2)).await));
    assert_eq!(store.get(&missing).await.expect("get"), None, "a failed cas creates nothing");
}

/// Conditional and unconditional deletes.
pub async fn delete_if_version(store: &SharedStore) {
    let key = format!("{}k", unique_prefix("delete"));
    assert!(!store.delete(&key, None).await.expect("delete missing"));
    assert!(is_conflict(store.delete(&key, Some(1)).await), "versioned delete of a missing key");
    let v1 = store.put(&key, b("a"), PutOptions::any()).await.expect("put");
    assert!(is_conflict(store.delete(&key, Some(v1 + 1000)).await), "wrong version");
    assert!(store.get(&key).await.expect("get").is_some(), "a failed delete deletes nothing");
    assert!(store.delete(&key, Some(v1)).await.expect("delete at version"));
    assert_eq!(store.get(&key).await.expect("get"), None);
    store.put(&key, b("b"), PutOptions::any()).await.expect("put again");
    assert!(store.delete(&key, None).await.expect("unconditional delete"));
    assert!(!store.delete(&key, None).await.expect("delete twice"));
}

/// `list` returns exactly the keys under the prefix, in key order, with their versions.
pub async fn list_prefix(store: &SharedStore) {
    let p = unique_prefix("list");
    // Neighbours of "b/" in byte order: '.' < '/' < '0'.
    let keys = ["b/2", "a", "b.", "b/1", "c", "b0", "b/10", "bz", "b/1/x"];
    for key in keys {
        store.put(&format!("{p}{key}"), b(key), PutOptions::any()).await.expect("put");
    }
    let listed = store.list(&format!("{p}b/")).await.expect("list b/");
    let names: Vec<&str> = listed.iter().map(|kv| &kv.key[p.len()..]).collect();
    assert_eq!(names, ["b/1", "b/1/x", "b/10", "b/2"]);
    for kv in &listed {
        let got = store.get(&kv.key).await.expect("get").expect("listed key present");
        assert_eq!((&got.value, got.version), (&kv.value, kv.version));
    }
    let all = store.list(&p).await.expect("list all");
    let mut sorted: Vec<String> = keys.iter().map(|k| format!("{p}{k}")).collect();
    sorted.sort();
    assert_eq!(all.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(), sorted);
    assert!(store.list(&format!("{p}nothing/")).await.expect("list empty").is_empty());
}

/// Empty keys, oversized keys and values, and zero ttls are rejected as invalid.
pub async fn invalid_requests(store: &SharedStore) {
    let invalid = |r: Result<_, MetadataError>| matches!(r, Err(MetadataError::Invalid(_)));
    assert!(invalid(store.get("").await.map(drop)), "empty key");
    assert!(invalid(store.put("", b("x"), PutOptions::any()).await.map(drop)), "empty key");
    let long = format!("{}{}", unique_prefix("invalid"), "k".repeat(MAX_KEY_BYTES));
    assert!(invalid(store.put(&long, b("x"), PutOptions::any()).await.map(drop)), "long key");
    let key = format!("{}k", unique_prefix("invalid"));
    let big = Bytes::from(vec![0u8; MAX_VALUE_BYTES + 1]);
    assert!(invalid(store.put(&key, big, PutOptions::any()).await.map(drop)), "big value");
    assert_eq!(store.get(&key).await.expect("get"), None);
    assert!(invalid(store.grant_lease(Duration::ZERO).await.map(drop)), "zero ttl");
}

/// A watch gives the state when it started, then each change under its prefix, in order.
pub async fn watch_events(store: &SharedStore) {
    let p = unique_prefix("watch");
    let va = store.put(&format!("{p}a"), b("a1"), PutOptions::any()).await.expect("put a");
    store.put(&format!("{p}.outside"), b("x"), PutOptions::any()).await.expect("put outside");
    let prefix = format!("{p}w/");
    let a = format!("{prefix}a");
    store.put(&a, b("a1"), PutOptions::any()).await.expect("put w/a");
    let mut watch = store.watch(&prefix).await.expect("watch");
    assert_eq!(watch.initial.len(), 1);
    assert_eq!((watch.initial[0].key.as_str(), &watch.initial[0].value), (a.as_str(), &b("a1")));
    let bkey = format!("{prefix}b");
    let vb = store.put(&bkey, b("b1"), PutOptions::any()).await.expect("put b");
    store.put(&format!("{p}a"), b("a2"), PutOptions::version(va)).await.expect("put outside");
    let va2 = store.put(&a, b("a2"), PutOptions::any()).await.expect("update a");
    assert!(store.delete(&bkey, Some(vb)).await.expect("delete b"));
    let vc = store.put(&format!("{prefix}c"), b("c1"), PutOptions::any()).await.expect("put c");
    let expected = [
        WatchEvent::Put(KeyValue { key: bkey.clone(), value: b("b1"), version: vb }),
        WatchEvent::Put(KeyValue { key: a.clone(), value: b("a2"), version: va2 }),
        WatchEvent::Delete { key: bkey },
        WatchEvent::Put(KeyValue { key: format!("{prefix}c"), value: b("c1"), version: vc }),
    ];
    for want in expected {
        assert_eq!(next_event(&mut watch.events).await, want);
    }
}

/// Under concurrent writes, the initial state plus the events rebuild the final state exactly:
/// no change is missed and none is delivered twice.
pub async fn watch_consistent_under_writes(store: &SharedStore) {
    let prefix = unique_prefix("watch-race");
    let writer = {
        let (store, prefix) = (Arc::clone(store), prefix.clone());
        tokio::spawn(async move {
            for i in 0..200u32 {
                let key = format!("{prefix}k{}", i % 7);
                if i % 5 == 4 {
                    store.delete(&key, None).await.expect("delete");
                } else {
                    store.put(&key, b(&i.to_string()), PutOptions::any()).await.expect("put");
                }
            }
        })
    };
    // Let the writer start, so the watch begins in the middle of its writes.
    while store.list(&prefix).await.expect("list").is_empty() {
        tokio::task::yield_now().await;
    }
    let mut watch = store.watch(&prefix).await.expect("watch");
    writer.await.expect("writer task");
    let last = store.list(&prefix).await.expect("final list");
    let mut state: std::collections::BTreeMap<String, KeyValue> =
        watch.initial.drain(..).map(|kv| (kv.key.clone(), kv)).collect();
    let target: std::collections::BTreeMap<String, KeyValue> =
        last.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
    while state != target {
        match next_event(&mut watch.events).await {
            WatchEvent::Put(kv) => {
                if let Some(old) = state.get(&kv.key) {
                    assert!(kv.version > old.version, "event {kv:?} repeats or reorders {old:?}");
                }
                state.insert(kv.key.clone(), kv);
            }
            WatchEvent::Delete { key } => {
                assert!(state.remove(&key).is_some(), "delete of {key}, which was not there");
            }
        }
    }
}

/// Keys attached to a lease that is not renewed are deleted when it expires.
pub async fn lease_expiry_deletes_keys(store: &SharedStore) {
    let p = unique_prefix("lease-expiry");
    let lease = store.grant_lease(SHORT_TTL).await.expect("grant");
    let key = format!("{p}leased");
    store.put(&key, b("x"), PutOptions::any().with_lease(lease)).await.expect("put leased");
    store.put(&format!("{p}kept"), b("y"), PutOptions::any()).await.expect("put plain");
    assert!(store.get(&key).await.expect("get").is_some());
    let mut watch = store.watch(&p).await.expect("watch");
    wait_until("leased key deleted", DEADLINE, || async { store.get(&key).await.expect("get").is_none() }).await;
    assert_eq!(next_event(&mut watch.events).await, WatchEvent::Delete { key: key.clone() });
    let renewed = store.renew_lease(lease).await;
    assert!(matches!(renewed, Err(MetadataError::LeaseExpired(id)) if id == lease), "{renewed:?}");
    let put = store.put(&key, b("z"), PutOptions::any().with_lease(lease)).await;
    assert!(matches!(put, Err(MetadataError::LeaseExpired(_))), "{put:?}");
    assert!(store.get(&format!("{p}kept")).await.expect("get").is_some(), "unleased key stays");
}

/// Revoking a lease deletes its keys at once (with watch events) and no others.
pub async fn revoke_deletes_keys(store: &SharedStore) {
    let p = unique_prefix("revoke");
    let lease = store.grant_lease(Duration::from_secs(60)).await.expect("grant");
    let (k1, k2, plain) = (format!("{p}a"), format!("{p}b"), format!("{p}plain"));
    store.put(&k1, b("1"), PutOptions::any().with_lease(lease)).await.expect("put k1");
    store.put(&k2, b("2"), PutOptions::absent().with_lease(lease)).await.expect("put k2");
    store.put(&plain, b("3"), PutOptions::any()).await.expect("put plain");
    let mut watch = store.watch(&p).await.expect("watch");
    store.revoke_lease(lease).await.expect("revoke");
    assert_eq!(store.get(&k1).await.expect("get"), None);
    assert_eq!(store.get(&k2).await.expect("get"), None);
    assert!(store.get(&plain).await.expect("get").is_some());
    let mut deleted = vec![next_event(&mut watch.events).await, next_event(&mut watch.events).await];
    deleted.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(deleted, [WatchEvent::Delete { key: k1 }, WatchEvent::Delete { key: k2 }]);
    let again = store.revoke_lease(lease).await;
    assert!(matches!(again, Err(MetadataError::LeaseExpired(_))), "{again:?}");
}

/// A renewed lease outlives its ttl, and so do its keys.
pub async fn renew_keeps_keys(store: &SharedStore) {
    let ttl = Duration::from_secs(3);
    let key = format!("{}k", unique_prefix("renew"));
    let lease = store.grant_lease(ttl).await.expect("grant");
    store.put(&key, b("x"), PutOptions::any().with_lease(lease)).await.expect("put");
    let start = Instant::now();
    while start.elapsed() < ttl * 2 {
        store.renew_lease(lease).await.expect("renew");
        assert!(store.get(&key).await.expect("get").is_some(), "key of a renewed lease vanished");
        tokio::time::sleep(ttl / 8).await;
    }
    store.revoke_lease(lease).await.expect("revoke");
}

/// A put naming a lease that does not exist fails and writes nothing.
pub async fn unknown_lease_put_fails(store: &SharedStore) {
    let key = format!("{}k", unique_prefix("unknown-lease"));
    let lease = store.grant_lease(Duration::from_secs(60)).await.expect("grant");
    store.revoke_lease(lease).await.expect("revoke");
    for options in [PutOptions::any(), PutOptions::absent()] {
        let put = store.put(&key, b("x"), options.with_lease(lease)).await;
        assert!(matches!(put, Err(MetadataError::LeaseExpired(id)) if id == lease), "{put:?}");
    }
    let never_granted = i64::MAX - 12_345;
    let put = store.put(&key, b("x"), PutOptions::any().with_lease(never_granted)).await;
    assert!(matches!(put, Err(MetadataError::LeaseExpired(_))), "{put:?}");
    assert_eq!(store.get(&key).await.expect("get"), None);
    let renew = store.renew_lease(never_granted).await;
    assert!(matches!(renew, Err(MetadataError::LeaseExpired(_))), "{renew:?}");
}

/// [`LeaseKeeper`] keeps its lease (and keys) alive past the ttl; `revoke` deletes them.
pub async fn lease_keeper_renews_and_revokes(store: &SharedStore) {
    let ttl = Duration::from_secs(3);
    let key = format!("{}k", unique_prefix("keeper"));
    let keeper = LeaseKeeper::start(Arc::clone(store), ttl).await.expect("start keeper");
    assert!(keeper.is_valid());
    store.put(&key, b("x"), PutOptions::any().with_lease(keeper.lease_id())).await.expect("put leased");
    let mut state = keeper.state();
    let first = *state.borrow_and_update();
    let start = Instant::now();
    while start.elapsed() < ttl * 2 {
        assert!(store.get(&key).await.expect("get").is_some(), "key of a kept lease vanished");
        tokio::time::sleep(ttl / 8).await;
    }
    let renewed = *state.borrow_and_update();
    match (first, renewed) {
        (LeaseState::Valid { valid_until: a }, LeaseState::Valid { valid_until: b }) => {
            assert!(b > a, "renewals must push valid_until forward");
        }
        other => panic!("lease keeper state {other:?}"),
    }
    keeper.revoke().await.expect("revoke");
    assert_eq!(*state.borrow(), LeaseState::Lost);
    assert_eq!(store.get(&key).await.expect("get"), None);
}

/// A keeper whose lease is revoked behind its back reports `Lost`.
pub async fn lease_keeper_detects_loss(store: &SharedStore) {
    let keeper = LeaseKeeper::start(Arc::clone(store), SHORT_TTL * 2).await.expect("start");
    store.revoke_lease(keeper.lease_id()).await.expect("revoke behind the keeper");
    let state = keeper.state();
    wait_until("keeper reports Lost", DEADLINE, || {
        let lost = *state.borrow() == LeaseState::Lost;
        async move { lost }
    })
    .await;
    assert!(!keeper.is_valid());
}

/// Several tasks incrementing one counter by compare-and-swap lose no update.
pub async fn concurrent_cas(store: &SharedStore) {
    const TASKS: usize = 6;
    const ATTEMPTS: usize = 30;
    let key = format!("{}counter", unique_prefix("concurrent-cas"));
    store.put(&key, b("0"), PutOptions::absent()).await.expect("create counter");
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, key) = (Arc::clone(store), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut won = 0u64;
            for _ in 0..ATTEMPTS {
                let current = store.get(&key).await.expect("get").expect("counter present");
                let n: u64 =
                    std::str::from_utf8(&current.value).expect("utf-8 counter").parse().expect("numeric counter");
                let next = b(&(n + 1).to_string());
                match store.put(&key, next, PutOptions::version(current.version)).await {
                    Ok(_) => won += 1,
                    Err(MetadataError::Conflict { .. }) => {}
                    Err(e) => panic!("cas increment: {e}"),
                }
            }
            won
        }));
    }
    let mut won = 0;
    for task in tasks {
        won += task.await.expect("cas task");
    }
    assert!(won > 0, "no compare-and-swap succeeded");
    let last = store.get(&key).await.expect("get").expect("counter present");
    assert_eq!(last.value, b(&won.to_string()), "final counter must equal successful CAS count");
}
