//! `magnetar admin` as an operator runs it, against a real `magnetar standalone`: tenants and
//! namespaces with policies, topics and their stats, subscription backlog, skip-all and reset
//! (then a real consumer receives the messages again), and the errors a user sees.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Instant;

use serde_json::Value;
use support::{DEADLINE, StandaloneProc, magnetar};

const TOPIC: &str = "persistent://acme/orders/events";

/// `magnetar admin --url URL ...` against one broker.
struct Admin {
    url: String,
}

impl Admin {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(magnetar())
            .arg("admin")
            .args(args)
            .arg("--url")
            .arg(&self.url)
            .env_remove("MAGNETAR_ADMIN_URL")
            .stdin(Stdio::null())
            .output()
            .expect("run magnetar admin")
    }

    /// Runs a command that must succeed; returns its standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "magnetar admin {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf8")
    }

    /// Runs a command with `--json` that must succeed; returns the parsed answer.
    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let text = self.ok(&args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}):\n{text}"))
    }

    /// Runs a command that must fail; returns its standard error.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "magnetar admin {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).expect("utf8")
    }

    /// The backlog of `sub` on `topic` from `topics stats --json`.
    fn backlog(&self, topic: &str, sub: &str) -> Option<u64> {
        let stats = self.json(&["topics", "stats", topic]);
        stats["subscriptions"].as_array()?.iter().find(|s| s["name"] == sub)?["backlog"].as_u64()
    }

    /// Waits until `sub`'s backlog is `expected`.
    fn wait_backlog(&self, topic: &str, sub: &str, expected: u64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let backlog = self.backlog(topic, sub);
            if backlog == Some(expected) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "backlog of {sub} never reached {expected} (last {backlog:?}); stats:\n{}",
                self.ok(&["topics", "stats", topic])
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits until no consumer is attached to `sub` (a consumer process that exited detaches).
    fn wait_no_consumers(&self, topic: &str, sub: &str) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let subs = self.json(&["subscriptions", "list", topic]);
            let consumers =
                subs.as_array().and_then(|a| a.iter().find(|s| s["name"] == sub)).map(|s| s["consumers"].clone());
            if consumers == Some(Value::from(0)) {
                return;
            }
            assert!(Instant::now() < deadline, "{sub} still has consumers: {subs}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

fn run_ok(mut c: Command) -> String {
    let out = c.stdin(Stdio::null()).output().expect("run magnetar");
    assert!(out.status.success(), "{c:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf8")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().expect("a JSON list").iter().map(|s| s.as_str().expect("a string").to_string()).collect()
}

#[test]
fn admin_lists_topics_shows_backlog_and_resets_a_subscription() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sa = StandaloneProc::start(&dir.path().join("data"));
    let admin = Admin { url: format!("http://{}", sa.http) };

    // The cluster: one broker, one bookie.
    let brokers = admin.json(&["brokers", "list"]);
    assert_eq!(brokers.as_array().map(Vec::len), Some(1), "{brokers}");
    assert_eq!(brokers[0]["broker_url"], sa.url.as_str());
    assert_eq!(admin.json(&["bookies", "list"]).as_array().map(Vec::len), Some(1));

    // A tenant and a namespace with retention.
    assert_eq!(admin.ok(&["tenants", "create", "acme"]), "created tenant acme\n");
    assert!(strings(&admin.json(&["tenants", "list"])).contains(&"acme".to_string()));
    assert_eq!(
        admin.ok(&["namespaces", "create", "acme/orders", "--retention-time", "2h", "--retention-size", "1GiB"]),
        "created namespace acme/orders\n"
    );
    assert_eq!(strings(&admin.json(&["namespaces", "list", "acme"])), ["acme/orders"]);
    let ns = admin.json(&["namespaces", "get", "acme/orders"]);
    assert_eq!(ns["policies"]["retention"]["time"], "2h", "{ns}");
    let size: bytesize::ByteSize = ns["policies"]["retention"]["size"].as_str().expect("size").parse().expect("a size");
    assert_eq!(size, bytesize::ByteSize::gib(1));
    // set-policies changes what is given and keeps the rest.
    admin.ok(&["namespaces", "set-policies", "acme/orders", "--bundles", "2"]);
    let ns = admin.json(&["namespaces", "get", "acme/orders"]);
    assert_eq!(ns["policies"]["bundles"], 2, "{ns}");
    assert_eq!(ns["effective"]["bundles"], 2, "{ns}");
    assert_eq!(ns["policies"]["retention"]["time"], "2h", "retention kept: {ns}");
    let text = admin.ok(&["namespaces", "get", "acme/orders"]);
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["retention.time", "2h", "2h"]), "{text}");
    assert_eq!(admin.json(&["namespaces", "bundles", "acme/orders"]).as_array().map(Vec::len), Some(2));

    // A topic with ten messages, one per `magnetar produce` (so ten entries), then two
    // subscriptions: one from the earliest message, one after the latest.
    assert_eq!(admin.ok(&["topics", "create", "acme/orders/events"]), format!("created topic {TOPIC}\n"));
    let mut ids = Vec::new();
    for i in 0..10 {
        let line = run_ok(sa.client_command(&["produce", TOPIC, "-m", &format!("m{i}")]));
        let (id, payload) = line.trim_end().split_once('\t').expect("ID<TAB>PAYLOAD");
        assert_eq!(payload, format!("m{i}"));
        ids.push(id.to_string());
    }
    admin.ok(&["subscriptions", "create", TOPIC, "audit", "--position", "earliest"]);
    admin.ok(&["subscriptions", "create", "acme/orders/events", "late"]);

    // The topic is listed, and the backlog shows in the stats.
    assert_eq!(strings(&admin.json(&["topics", "list", "acme/orders"])), [TOPIC]);
    assert!(admin.ok(&["topics", "list", "acme/orders"]).lines().any(|l| l == TOPIC));
    admin.wait_backlog(TOPIC, "audit", 10);
    admin.wait_backlog(TOPIC, "late", 0);
    let stats = admin.json(&["topics", "stats", TOPIC]);
    assert_eq!(stats["entries"], 10, "{stats}");
    assert_eq!(stats["owner"], sa.url.as_str(), "{stats}");
    let text = admin.ok(&["topics", "stats", TOPIC]);
    let audit: Vec<&str> =
        text.lines().find(|l| l.starts_with("audit ")).expect("a row for audit").split_whitespace().collect();
    assert_eq!(audit[..3], ["audit", "10", "0"], "{text}");

    // skip-all empties the backlog; reset to earliest brings it back, and a consumer gets it all.
    admin.ok(&["subscriptions", "skip-all", TOPIC, "audit"]);
    admin.wait_backlog(TOPIC, "audit", 0);
    admin.ok(&["subscriptions", "reset", TOPIC, "audit", "--to", "earliest"]);
    admin.wait_backlog(TOPIC, "audit", 10);
    let got = run_ok(sa.client_command(&["consume", TOPIC, "-s", "audit", "-n", "10", "--timeout", "30s"]));
    let expected: String = (0..10).map(|i| format!("m{i}\n")).collect();
    assert_eq!(got, expected);
    admin.wait_backlog(TOPIC, "audit", 0);

    // Reset to a message id: it and everything after it are delivered again.
    admin.ok(&["subscriptions", "reset", TOPIC, "audit", "--to", &ids[5]]);
    admin.wait_backlog(TOPIC, "audit", 5);
    let got = run_ok(sa.client_command(&["consume", TOPIC, "-s", "audit", "-n", "5", "--timeout", "30s"]));
    assert_eq!(got, (5..10).map(|i| format!("m{i}\n")).collect::<String>());

    // Retention (2h, 1 GiB) keeps everything that young and small.
    let trimmed = admin.json(&["topics", "apply-retention", TOPIC]);
    assert_eq!(trimmed["deleted_ledgers"], serde_json::json!([]), "{trimmed}");
    assert_eq!(admin.ok(&["topics", "apply-retention", TOPIC]), format!("retention of {TOPIC}: nothing to delete\n"));

    // Owner, unload, and the topic comes back on the next request with its subscriptions.
    let owner = admin.json(&["topics", "lookup", TOPIC]);
    assert_eq!(owner["broker_url"], sa.url.as_str(), "{owner}");
    assert_eq!(admin.json(&["topics", "unload", TOPIC])["unloaded"], true);
    admin.wait_backlog(TOPIC, "late", 0);
    let subs = admin.json(&["subscriptions", "list", TOPIC]);
    assert_eq!(subs.as_array().map(Vec::len), Some(2), "{subs}");

    // Errors: a message naming what is wrong, a non-zero exit, nothing changed.
    let err = admin.fails(&["namespaces", "get", "acme/nope"]);
    assert!(err.contains("namespace acme/nope does not exist") && err.contains("404"), "{err}");
    let err = admin.fails(&["topics", "list", "acme/nope"]);
    assert!(err.contains("acme/nope") && err.contains("404"), "{err}");
    let err = admin.fails(&["topics", "stats", "acme/nope/t"]);
    assert!(err.contains("namespace acme/nope does not exist"), "{err}");
    let err = admin.fails(&["tenants", "delete", "acme"]);
    assert!(err.contains("tenant acme still has namespaces") && err.contains("409"), "{err}");
    let err = admin.fails(&["namespaces", "create", "acme/bad", "--retention-time", "soon"]);
    assert!(err.contains("--retention-time") && err.contains("soon"), "{err}");
    let err = admin.fails(&["namespaces", "create", "acme/bad", "--retention-size", "lots"]);
    assert!(err.contains("--retention-size") && err.contains("lots"), "{err}");
    let err = admin.fails(&["namespaces", "create", "acme/bad", "--retention-time", "0s", "--retention-size", "1GiB"]);
    assert!(err.contains("retention time and size") && err.contains("400"), "{err}");
    let err = admin.fails(&["namespaces", "create", "acme/bad", "--ensemble-size", "1", "--write-quorum", "2"]);
    assert!(err.contains("ensemble_size >= write_quorum") && err.contains("400"), "{err}");
    assert_eq!(strings(&admin.json(&["namespaces", "list", "acme"])), ["acme/orders"], "no partial state");
    let err = admin.fails(&["namespaces", "get", "acme"]);
    assert!(err.contains("TENANT/NAMESPACE"), "{err}");
    let err = admin.fails(&["namespaces", "set-policies", "acme/orders", "--bundles", "4"]);
    assert!(err.contains("bundles cannot change") && err.contains("409"), "{err}");
    let err = admin.fails(&["subscriptions", "reset", TOPIC, "audit", "--to", "sideways"]);
    assert!(err.contains("LEDGER:ENTRY"), "{err}");
    let err = admin.fails(&["subscriptions", "create", TOPIC, "audit"]);
    assert!(err.contains("already exists") && err.contains("409"), "{err}");
    let err = admin.fails(&["namespaces", "delete", "acme/orders"]);
    assert!(err.contains("still has 1 topics") && err.contains("409"), "{err}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let out = Command::new(magnetar()).args(["admin", "tenants", "list", "--url", &closed_url]).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("is a broker listening on {closed_url}?")), "{err}");

    // Clean-up in order: retention cleared, subscriptions and topic, namespace, tenant.
    admin.ok(&["namespaces", "set-policies", "acme/orders", "--clear-retention"]);
    let ns = admin.json(&["namespaces", "get", "acme/orders"]);
    assert!(ns["policies"]["retention"].as_object().is_none_or(|r| r.is_empty()), "{ns}");
    admin.wait_no_consumers(TOPIC, "audit");
    admin.ok(&["subscriptions", "delete", TOPIC, "late"]);
    assert_eq!(admin.json(&["subscriptions", "list", TOPIC]).as_array().map(Vec::len), Some(1));
    assert_eq!(admin.ok(&["topics", "delete", TOPIC]), format!("deleted topic {TOPIC}\n"));
    assert!(admin.fails(&["topics", "stats", TOPIC]).contains("404"));
    admin.ok(&["namespaces", "delete", "acme/orders"]);
    admin.ok(&["tenants", "delete", "acme"]);
    assert!(!strings(&admin.json(&["tenants", "list"])).contains(&"acme".to_string()));
}
