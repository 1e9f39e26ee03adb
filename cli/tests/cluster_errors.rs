//! Bad input to a cluster, as an operator or a client gives it: an etcd that is not there (or
//! does not answer), configurations that `--check-config` must refuse naming the key, two bookies
//! claiming one identity, and a topic in a namespace that does not exist. Each must end in a clear
//! error and a non-zero exit, never a hang, and leave nothing behind.

mod support;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use magnetar_common::testing::EtcdServer;
use support::{BookieProc, BrokerProc, DEADLINE, StandaloneProc, http_get, magnetar};

/// What a finished command printed.
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// The `error: ...` line the binary prints before exiting non-zero.
    fn error_line(&self) -> &str {
        self.stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {self:?}"))
    }
}

/// Runs `cmd` to its end, its output going to files in `dir` (a process that wrongly keeps
/// running cannot block on a full pipe). Fails the test if it is still running at the deadline.
fn run_to_exit(dir: &Path, name: &str, cmd: &mut Command) -> Finished {
    std::fs::create_dir_all(dir).expect("mkdir");
    let (out, err) = (dir.join(format!("{name}.out")), dir.join(format!("{name}.err")));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("spawn magnetar");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{name} still running after {DEADLINE:?}; stderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        status,
        stdout: std::fs::read_to_string(out).unwrap_or_default(),
        stderr: std::fs::read_to_string(err).unwrap_or_default(),
    }
}

fn magnetar_cmd(args: &[&str], file: &Path) -> Command {
    let mut c = Command::new(magnetar());
    c.args(args).arg(file).env("RUST_LOG", "info");
    c
}

fn broker_toml(metadata_url: &str, dir: &Path) -> String {
    format!(
        "quic_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nmetadata_url = \"{metadata_url}\"\n\
         data_dir = \"{}\"\n",
        dir.join("data").display()
    )
}

#[test]
fn broker_and_bookie_without_a_reachable_etcd_exit_naming_the_endpoints() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // Accepts TCP connections (the kernel completes them) but never answers: an etcd that hangs.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent = silent.local_addr().expect("addr").to_string();
    let cases = [
        ("closed-port", "etcd://127.0.0.1:1/x".to_string(), vec!["127.0.0.1:1"]),
        ("silent", format!("etcd://{silent}/x"), vec![silent.as_str()]),
        ("both", format!("etcd://127.0.0.1:1,{silent}/x"), vec!["127.0.0.1:1", silent.as_str()]),
    ];
    for (name, url, named) in &cases {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("broker.toml");
        std::fs::write(&config, broker_toml(url, &dir)).expect("write");
        let run = run_to_exit(&dir, "broker", &mut magnetar_cmd(&["broker", "--config"], &config));
        assert!(!run.status.success(), "{name}: broker started without etcd: {run:?}");
        assert!(!run.stdout.contains("listening"), "{name}: {run:?}");
        let error = run.error_line();
        assert!(error.contains("metadata store"), "{name}: {error}");
        for endpoint in named {
            assert!(error.contains(endpoint), "{name}: the error should name {endpoint}: {error}");
        }
    }

    let dir = tmp.path().join("bookie");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = dir.join("bookie.toml");
    let toml = format!(
        "bookie_id = \"b\"\nlisten_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
         metadata_url = \"etcd://127.0.0.1:1/x\"\njournal_dir = \"{d}/journal\"\nledger_dir = \"{d}/ledgers\"\n",
        d = dir.display()
    );
    std::fs::write(&config, toml).expect("write");
    let run = run_to_exit(&dir, "bookie", &mut magnetar_cmd(&["bookie", "--config"], &config));
    assert!(!run.status.success(), "bookie started without etcd: {run:?}");
    let error = run.error_line();
    assert!(error.contains("metadata store") && error.contains("127.0.0.1:1"), "{error}");
}

#[test]
fn check_config_refuses_bad_cluster_settings_naming_the_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let broker_cases = [
        ("scheme", "metadata_url = \"zk://127.0.0.1:2181/m\"\n", "metadata_url"),
        ("no-endpoint", "metadata_url = \"etcd:///m\"\n", "metadata_url"),
        ("bad-port", "metadata_url = \"etcd://127.0.0.1:abc/m\"\n", "metadata_url"),
        ("quic-any", "quic_addr = \"0.0.0.0:6650\"\n", "advertised_addr"),
        ("http-any", "http_addr = \"0.0.0.0:8080\"\nadvertised_addr = \"b1:6650\"\n", "advertised_http_addr"),
        ("lease-ttl", "[cluster]\nlease_ttl = \"1s\"\n", "cluster.lease_ttl"),
        ("bundles", "[cluster]\ndefault_bundles = 0\n", "cluster.default_bundles"),
    ];
    for (name, toml, key) in broker_cases {
        let file = tmp.path().join(format!("broker-{name}.toml"));
        std::fs::write(&file, toml).expect("write");
        let run = run_to_exit(tmp.path(), name, &mut magnetar_cmd(&["broker", "--check-config"], &file));
        assert!(!run.status.success(), "{name}: accepted: {run:?}");
        assert!(!run.stdout.contains("valid broker configuration"), "{name}: {run:?}");
        let error = run.error_line();
        assert!(error.contains(key), "{name}: the error should name {key}: {error}");
        assert!(error.contains(&file.display().to_string()), "{name}: the error should name the file: {error}");
    }
    // The same key still passes with a good value, so the refusals above are about the values.
    let file = tmp.path().join("broker-good.toml");
    std::fs::write(
        &file,
        "quic_addr = \"0.0.0.0:6650\"\nadvertised_addr = \"b1:6650\"\n[cluster]\nlease_ttl = \"2s\"\n",
    )
    .expect("write");
    let run = run_to_exit(tmp.path(), "good", &mut magnetar_cmd(&["broker", "--check-config"], &file));
    assert!(run.status.success(), "{run:?}");

    let file = tmp.path().join("bookie-bad-port.toml");
    std::fs::write(&file, "metadata_url = \"etcd://127.0.0.1:99999/m\"\n").expect("write");
    let run = run_to_exit(tmp.path(), "bookie", &mut magnetar_cmd(&["bookie", "--check-config"], &file));
    assert!(!run.status.success(), "{run:?}");
    assert!(run.error_line().contains("metadata_url"), "{run:?}");
}

#[test]
fn a_second_bookie_claiming_a_live_bookies_id_is_refused_and_the_first_keeps_serving() {
    let etcd = EtcdServer::start().expect("start etcd");
    let url = etcd.url("/dup");
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut first = BookieProc::start(&tmp.path().join("first"), "bookie-dup", &url, "");
    let broker = BrokerProc::start(
        &tmp.path().join("broker"),
        &url,
        "[ledger]\nensemble_size = 1\nwrite_quorum = 1\nack_quorum = 1\n",
    );
    let out = broker.client_command(&["produce", "dup-topic", "-m", "before"]).output().expect("produce");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Same id, its own (empty) directories.
    let dir = tmp.path().join("second");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = dir.join("bookie.toml");
    let toml = format!(
        "bookie_id = \"bookie-dup\"\nlisten_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
         metadata_url = \"{url}\"\njournal_dir = \"{d}/journal\"\nledger_dir = \"{d}/ledgers\"\n",
        d = dir.display()
    );
    std::fs::write(&config, toml).expect("write");
    let run = run_to_exit(&dir, "other-disks", &mut magnetar_cmd(&["bookie", "--config"], &config));
    assert!(!run.status.success(), "a second bookie-dup started: {run:?}");
    let error = run.error_line();
    assert!(error.contains("bookie-dup"), "{error}");
    assert!(error.contains("already registered") || error.contains("holds data"), "{error}");

    // Same id and the same directories (the first one's config started twice).
    let run = run_to_exit(&dir, "same-disks", &mut magnetar_cmd(&["bookie", "--config"], &first.config));
    assert!(!run.status.success(), "a second process started on bookie-dup's disks: {run:?}");
    assert!(run.error_line().contains("already"), "{run:?}");

    // The first bookie is still registered as itself and still serves reads and writes.
    let (status, body) = http_get(&first.http, "/health");
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_get(&broker.http, "/admin/v1/bookies");
    assert_eq!(status, 200, "{body}");
    let bookies: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(bookies.as_array().map(Vec::len), Some(1), "{bookies}");
    assert_eq!(bookies[0]["bookie_id"], "bookie-dup", "{bookies}");
    assert_eq!(bookies[0]["address"], first.addr.as_str(), "{bookies}");
    let out = broker.client_command(&["produce", "dup-topic", "-m", "after"]).output().expect("produce");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let consume = ["consume", "dup-topic", "-s", "check", "--position", "earliest", "-n", "2", "--timeout", "60s"];
    let out = broker.client_command(&consume).output().expect("consume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "before\nafter\n");

    // Its identity on disk and in etcd is intact: it restarts on its own disks.
    assert!(first.stop().success(), "{}", first.log());
    first.restart();
    let (status, body) = http_get(&first.http, "/health");
    assert_eq!(status, 200, "{body}");
}

#[test]
fn producing_into_a_missing_namespace_fails_naming_it_and_creates_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sa = StandaloneProc::start(&tmp.path().join("standalone"));
    let logs = tmp.path().join("runs");
    for (topic, namespace, tenant_exists) in
        [("acme/ns/t", "acme/ns", false), ("public/missing/t", "public/missing", true)]
    {
        let run =
            run_to_exit(&logs, "produce", sa.client_command(&["produce", topic, "-m", "x"]).env("RUST_LOG", "info"));
        assert!(!run.status.success(), "{topic}: produced: {run:?}");
        assert!(run.stdout.is_empty(), "{topic}: {run:?}");
        let error = run.error_line();
        assert!(
            error.contains(&format!("namespace {namespace}")),
            "{topic}: the error should name {namespace}: {error}"
        );

        let consume = ["consume", topic, "-s", "s", "--timeout", "30s"];
        let run = run_to_exit(&logs, "consume", sa.client_command(&consume).env("RUST_LOG", "info"));
        assert!(!run.status.success(), "{topic}: subscribed: {run:?}");
        assert!(run.error_line().contains(namespace), "{run:?}");

        // Nothing was created: no topic, no namespace, no tenant.
        let (status, body) = http_get(&sa.http, "/admin/v1/topics/public/default");
        assert_eq!(status, 200, "{body}");
        let listed: Vec<String> = serde_json::from_str(&body).expect("a JSON list of topics");
        assert!(!listed.iter().any(|t| t.ends_with("/t")), "{body}");
        let (status, body) = http_get(&sa.http, &format!("/admin/v1/topics/{namespace}"));
        assert_eq!(status, 404, "{body}");
        let (status, body) = http_get(&sa.http, &format!("/admin/v1/topics/{topic}/stats"));
        assert_eq!(status, 404, "{body}");
        let (tenant, ns) = namespace.split_once('/').expect("tenant/ns");
        let (status, body) = http_get(&sa.http, &format!("/admin/v1/namespaces/{tenant}"));
        if tenant_exists {
            assert_eq!(status, 200, "{body}");
            assert!(!body.contains(ns), "{body}");
        } else {
            assert_eq!(status, 404, "{body}");
            let (_, tenants) = http_get(&sa.http, "/admin/v1/tenants");
            assert!(!tenants.contains(tenant), "{tenants}");
        }
    }
}
