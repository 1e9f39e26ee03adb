//! The metadata-store conformance suite against both stores, plus what only one store has:
//! the embedded store's durability across `kill -9` and reopen, and the etcd store's behaviour
//! when etcd stops answering.
//!
//! Run with `cargo test -p magnetar-common --features testing --test metadata_conformance`.
//! The etcd tests need the `etcd` binary (`apt-get install etcd-server`).
#![cfg(feature = "testing")]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use magnetar_common::metadata::embedded::EmbeddedStore;
use magnetar_common::metadata::etcd::{EtcdStore, REQUEST_TIMEOUT};
use magnetar_common::metadata::{self, MetadataError, MetadataStore, PutOptions, conformance};
use magnetar_common::testing::EtcdServer;

/// Tells the `child_writer` test, run as a child process, where its store is.
const CHILD_DIR_ENV: &str = "MAGNETAR_TEST_CHILD_WRITER_DIR";
const LEASED_KEY: &str = "/leased";

async fn start_etcd() -> EtcdServer {
    tokio::task::spawn_blocking(EtcdServer::start).await.expect("etcd start task").expect("start etcd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("embedded://{}", dir.path().join("meta").display());
    let store = metadata::connect(&url).await.expect("open embedded store");
    conformance::run_all(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let server = start_etcd().await;
    let store = metadata::connect(&server.url("conformance")).await.expect("connect to etcd");
    conformance::run_all(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_stores_share_one_etcd_under_different_roots() {
    let server = start_etcd().await;
    let a = metadata::connect(&server.url("a")).await.expect("connect a");
    let b = metadata::connect(&server.url("b")).await.expect("connect b");
    a.put("/k", Bytes::from_static(b"a"), PutOptions::any()).await.expect("put in a");
    assert_eq!(b.get("/k").await.expect("get in b"), None, "roots must isolate");
    assert_eq!(a.list("/").await.expect("list a").len(), 1);
    let watch = a.watch("/").await.expect("watch a");
    assert_eq!(watch.initial[0].key, "/k", "keys come back without the root");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_paused_gives_unavailable_not_a_hang() {
    let server = start_etcd().await;
    let store = metadata::connect(&server.url("pause")).await.expect("connect");
    store.put("/k", Bytes::from_static(b"x"), PutOptions::any()).await.expect("put");
    server.pause().expect("pause etcd");
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT * 4, store.get("/k")).await;
    server.resume().expect("resume etcd");
    let result = outcome.expect("a request to a paused etcd must end by its timeout");
    assert!(matches!(result, Err(MetadataError::Unavailable(_))), "{result:?}");
    magnetar_common::testing::wait_until("etcd answers again", magnetar_common::testing::WAIT, || async {
        store.get("/k").await.is_ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_closes_when_etcd_dies() {
    let server = start_etcd().await;
    let store = metadata::connect(&server.url("die")).await.expect("connect");
    let mut watch = store.watch("/").await.expect("watch");
    drop(server);
    let end = tokio::time::timeout(Duration::from_secs(60), watch.events.recv()).await;
    assert_eq!(end.expect("the watch channel must close"), None);
}

#[tokio::test]
async fn etcd_connect_to_nothing_is_unavailable() {
    // A port bound but not listening: connections are refused, and while the socket is held
    // nothing else can take the port (a closed listener's port could be taken meanwhile).
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let port = socket.local_addr().expect("local addr").port();
    let result = EtcdStore::connect(&[format!("http://127.0.0.1:{port}")], "/x").await;
    drop(socket);
    assert!(matches!(result, Err(MetadataError::Unavailable(_))), "{result:?}");
}

#[tokio::test]
async fn embedded_reopen_keeps_data_drops_leased_keys_and_never_reuses_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (version, lease) = {
        let store = EmbeddedStore::open(dir.path()).expect("open");
        let second = EmbeddedStore::open(dir.path());
        assert!(matches!(second, Err(MetadataError::Storage(_))), "one process at a time");
        let version = store.put("/kept", Bytes::from_static(b"v"), PutOptions::any()).await;
        let lease = store.grant_lease(Duration::from_secs(60)).await.expect("grant");
        let options = PutOptions::any().with_lease(lease);
        store.put("/leased", Bytes::from_static(b"l"), options).await.expect("put leased");
        (version.expect("put"), lease)
    };
    let store = EmbeddedStore::open(dir.path()).expect("reopen");
    let kept = store.get("/kept").await.expect("get").expect("plain key survives");
    assert_eq!((kept.value, kept.version), (Bytes::from_static(b"v"), version));
    assert_eq!(store.get("/leased").await.expect("get"), None, "leased keys die with the process");
    let put = store.put("/x", Bytes::new(), PutOptions::any().with_lease(lease)).await;
    assert!(matches!(put, Err(MetadataError::LeaseExpired(_))), "{put:?}");
    let next = store.grant_lease(Duration::from_secs(60)).await.expect("grant after reopen");
    assert!(next > lease, "lease ids are never reused ({next} after {lease})");
    let newer = store.put("/kept", Bytes::new(), PutOptions::version(version)).await;
    assert!(newer.expect("cas after reopen") > version, "versions keep growing");
}

/// Not a test on its own: when [`CHILD_DIR_ENV`] is set, this is the writer process of
/// `embedded_survives_kill_9`. It puts `/k0`, `/k1`, ... and prints `PUT i version` after each
/// put returns, until it is killed.
#[tokio::test]
async fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return;
    };
    let store = EmbeddedStore::open(Path::new(&dir)).expect("child: open store");
    let lease = store.grant_lease(Duration::from_secs(600)).await.expect("child: grant");
    let options = PutOptions::any().with_lease(lease);
    store.put(LEASED_KEY, Bytes::from_static(b"l"), options).await.expect("child: put leased");
    for i in 0u64.. {
        let value = Bytes::from(format!("value-{i}"));
        let version = store.put(&format!("/k{i}"), value, PutOptions::any()).await;
        let version = version.expect("child: put");
        let mut out = std::io::stdout().lock();
        writeln!(out, "PUT {i} {version}").and_then(|()| out.flush()).expect("child: stdout");
    }
}

#[test]
fn embedded_survives_kill_9() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    for kill_after in [5, 50, 200] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut child = Command::new(std::env::current_exe().expect("test binary path"))
            .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_DIR_ENV, dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child writer");
        let stdout = child.stdout.take().expect("child stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut acked: Vec<(u64, u64)> = Vec::new();
        let parse = |line: &str| -> Option<(u64, u64)> {
            let mut words = line.strip_prefix("PUT ")?.split(' ');
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        };
        while acked.len() < kill_after {
            let line = lines.next().expect("child writer stopped early").expect("read child");
            acked.extend(parse(&line));
        }
        child.kill().expect("kill -9 the child");
        let status = child.wait().expect("reap the child");
        assert!(!status.success(), "the child must die by the signal");
        // Lines printed before the kill are acknowledged writes too.
        for line in lines {
            acked.extend(parse(&line.expect("read child")));
        }

        let store = EmbeddedStore::open(dir.path()).expect("reopen after kill -9");
        runtime.block_on(async {
            for &(i, version) in &acked {
                let got = store.get(&format!("/k{i}")).await.expect("get");
                let got = got.unwrap_or_else(|| panic!("acknowledged /k{i} lost (kill after {kill_after})"));
                assert_eq!(got.value, Bytes::from(format!("value-{i}")));
                assert_eq!(got.version, version);
            }
            assert_eq!(store.get(LEASED_KEY).await.expect("get"), None);
            let last = acked.last().map_or(0, |a| a.1);
            let next = store.put("/after", Bytes::new(), PutOptions::any()).await.expect("put");
            assert!(next > last, "versions keep growing after a crash");
        });
        drop(store);
    }
}
