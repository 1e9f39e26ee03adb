//! `magnetar standalone`, `produce` and `consume` as a user runs them: the real binary over real
//! QUIC, including `kill -9` in the middle of a producer's stream.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use support::{DEADLINE, StandaloneProc, http_get, magnetar};

fn run_ok(mut c: Command) -> String {
    let out = c.stderr(Stdio::piped()).output().expect("run magnetar");
    assert!(
        out.status.success(),
        "{c:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(name_and_labels)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn quick_start_produce_then_consume_as_a_user_would() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sa = StandaloneProc::start(&dir.path().join("data"));
    let (status, health) = http_get(&sa.http, "/health");
    assert_eq!(status, 200, "{health}");

    // A consumer on a new subscription (starting at the latest message) waits first.
    let mut consumer = Command::new(magnetar())
        .args(["consume", "my-topic", "-s", "first-sub", "-n", "10", "--url", &sa.url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn consume");
    wait_subscribed(&mut consumer, "first-sub");
    // No --tls-trust-cert: a local standalone's certificate is found.
    let produced = run_ok({
        let mut c = Command::new(magnetar());
        c.args(["produce", "my-topic", "--messages", "hello", "-n", "10", "--url", &sa.url]);
        c
    });
    let lines: Vec<&str> = produced.lines().collect();
    assert_eq!(lines.len(), 10, "{produced}");
    for l in &lines {
        let (id, payload) = l.split_once('\t').expect("ID<TAB>PAYLOAD");
        assert_eq!(id.split(':').count(), 3, "message id {id}");
        assert_eq!(payload, "hello");
    }
    let out = consumer.wait_with_output().expect("consume");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n".repeat(10));

    // The counts and the backlog are visible in /metrics.
    let topic = "topic=\"persistent://public/default/my-topic\"";
    let backlog = format!("magnetar_broker_subscription_backlog_entries{{{topic},subscription=\"first-sub\"}}");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, body) = http_get(&sa.http, "/metrics");
        let ins = metric(&body, &format!("magnetar_broker_messages_in_total{{{topic}}}"));
        let outs = metric(&body, &format!("magnetar_broker_messages_out_total{{{topic}}}"));
        if ins == Some(10.0) && outs == Some(10.0) && metric(&body, &backlog) == Some(0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "metrics never showed 10 in, 10 out, backlog 0:\n{body}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Messages nobody consumed yet are backlog.
    run_ok(sa.client_command(&["produce", "my-topic", "-m", "later"]));
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, body) = http_get(&sa.http, "/metrics");
        if metric(&body, &backlog) == Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "backlog never reached 1:\n{body}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Ctrl-C drains and exits cleanly; a restart keeps the subscription's position.
    assert!(sa.interrupt().success(), "clean exit; log:\n{}", sa.log());
    sa.restart();
    let out = run_ok(sa.client_command(&["consume", "my-topic", "-s", "first-sub", "-n", "1", "--timeout", "30s"]));
    assert_eq!(out, "later\n");
    // Bad input gets a clear error and a non-zero exit.
    let out = sa.client_command(&["produce", "bad topic", "-m", "x"]).output().expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid topic name"), "{out:?}");
    let out = sa.client_command(&["consume", "t", "-s", "s", "--type", "weird"]).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown subscription type"), "{out:?}");
    // A second consumer on an exclusive subscription is refused while the first is attached.
    let mut first = sa.client_command(&["consume", "my-topic", "-s", "first-sub", "-n", "1"]);
    let mut first = first.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn");
    wait_subscribed(&mut first, "first-sub");
    let busy = sa.client_command(&["consume", "my-topic", "-s", "first-sub", "-n", "1"]).output().expect("run");
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("already has a consumer"), "{busy:?}");
    let _ = first.kill();
    let _ = first.wait();
}

/// Reads a `magnetar consume` child's standard error until it reports its subscription.
fn wait_subscribed(child: &mut std::process::Child, subscription: &str) {
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines.next().expect("consume exited before subscribing").expect("read");
        if line.starts_with(&format!("subscribed {subscription} ")) {
            break;
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
}

/// A disk over the bookie's usage threshold: standalone starts, says at once that its bookie is
/// read-only and why, and a producer gets an error that names it, not a hang.
#[test]
fn a_full_disk_is_reported_at_start_and_to_producers() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Any disk is "full" at a threshold of one millionth.
    let sa = StandaloneProc::start_with_env(
        &dir.path().join("data"),
        &[],
        &[
            ("MAGNETAR_BOOKIE_DISK__USAGE_THRESHOLD", "0.000001"),
            ("MAGNETAR_BOOKIE_DISK__USAGE_LOW_WATER_MARK", "0.000001"),
        ],
    );
    let warning = sa.banner.iter().find(|l| l.starts_with("WARNING:")).expect("a warning in the banner");
    assert!(warning.contains("read-only") && warning.contains("threshold"), "{warning}");
    let out = sa.client_command(&["produce", "full-disk", "-m", "x"]).output().expect("run produce");
    assert!(!out.status.success(), "produced on a read-only bookie: {out:?}");
    assert!(out.stdout.is_empty(), "printed an acknowledgement: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read-only"), "{err}");
}

#[test]
fn untrusted_certificate_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sa = StandaloneProc::start(&dir.path().join("data"));
    let other = tempfile::tempdir().expect("tempdir");
    // A different self-signed certificate, generated by a second standalone's first start.
    let mut sa2 = StandaloneProc::start(&other.path().join("data"));
    let wrong = sa2.cert.clone();
    sa2.kill9();
    let out = Command::new(magnetar())
        .args(["produce", "t", "-m", "x", "--url", &sa.url, "--tls-trust-cert"])
        .arg(&wrong)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

/// Runs `magnetar produce` reading lines from a pipe; collects the acknowledged lines.
struct StreamingProducer {
    child: std::process::Child,
    acked: Arc<Mutex<Vec<String>>>,
}

impl StreamingProducer {
    fn start(sa: &StandaloneProc, topic: &str, prefix: &str) -> Self {
        let mut child = sa
            .client_command(&["produce", topic])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn produce");
        let mut stdin = child.stdin.take().expect("stdin");
        let prefix = prefix.to_string();
        std::thread::spawn(move || {
            for i in 0.. {
                if writeln!(stdin, "{prefix}-{i:06}").is_err() {
                    return;
                }
            }
        });
        let acked = Arc::new(Mutex::new(Vec::new()));
        let sink = acked.clone();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let payload = line.split_once('\t').map(|(_, p)| p.to_string()).unwrap_or_default();
                sink.lock().expect("lock").push(payload);
            }
        });
        Self { child, acked }
    }

    fn acked_count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// Stops the producer (its broker was killed; it would only notice at its idle timeout) and
    /// returns the lines it printed as acknowledged.
    fn finish(mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread ends with the pipe; give it the deadline to drain.
        let deadline = Instant::now() + DEADLINE;
        while Arc::strong_count(&self.acked) > 1 && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.acked.lock().expect("lock").clone()
    }
}

#[test]
fn kill_9_while_producing_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sa = StandaloneProc::start(&dir.path().join("data"));
    let mut acked_all = Vec::new();
    for (round, kill_after) in [1usize, 200, 3000].into_iter().enumerate() {
        let producer = StreamingProducer::start(&sa, "crash", &format!("r{round}"));
        let deadline = Instant::now() + DEADLINE;
        while producer.acked_count() < kill_after {
            assert!(Instant::now() < deadline, "only {} acknowledged; log:\n{}", producer.acked_count(), sa.log());
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        sa.kill9();
        let acked = producer.finish();
        assert!(acked.len() >= kill_after);
        acked_all.extend(acked);
        sa.restart();
    }
    // Everything acknowledged comes back from the earliest position, in order. Messages stored
    // but not acknowledged before a kill may appear too (at-least-once); duplicates may not.
    // A marker produced last tells the reader it has seen everything.
    run_ok(sa.client_command(&["produce", "crash", "-m", "zz-end"]));
    let consumed = read_until_marker(&sa, "crash", "zz-end");
    let mut sorted = consumed.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), consumed.len(), "no duplicates");
    assert!(consumed.windows(2).all(|w| w[0] < w[1]), "in order");
    let have: std::collections::HashSet<&str> = consumed.iter().map(String::as_str).collect();
    let missing: Vec<&String> = acked_all.iter().filter(|a| !have.contains(a.as_str())).collect();
    assert!(missing.is_empty(), "{} acknowledged messages lost, first {:?}", missing.len(), missing.first());
}

/// Every payload of `topic` from the earliest position up to (not including) `marker`.
fn read_until_marker(sa: &StandaloneProc, topic: &str, marker: &str) -> Vec<String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let client = magnetar_client::Client::builder(&sa.url).tls_trust_cert(&sa.cert).build().await.expect("connect");
        let consumer = client
            .subscribe(topic, "verify")
            .initial_position(magnetar_client::InitialPosition::Earliest)
            .subscribe()
            .await
            .expect("subscribe");
        let mut out = Vec::new();
        loop {
            let m = tokio::time::timeout(DEADLINE, consumer.receive()).await.expect("in time").expect("receive");
            consumer.ack(&m.id).expect("ack");
            let text = String::from_utf8(m.payload.to_vec()).expect("utf8");
            if text == marker {
                return out;
            }
            out.push(text);
        }
    })
}

#[test]
fn perf_tools_count_and_check_what_they_move() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sa = StandaloneProc::start(&dir.path().join("data"));
    let json = dir.path().join("e2e.json");
    let json_arg = json.to_string_lossy().into_owned();
    let out = sa
        .client_command(&[
            "perf",
            "e2e",
            "perf-topic",
            "-n",
            "3000",
            "--size",
            "200",
            "--warmup",
            "0",
            "--json",
            &json_arg,
        ])
        .output()
        .expect("run perf e2e");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("parse");
    assert_eq!(report["check"]["messages"], 3000, "{report}");
    assert_eq!(report["check"]["gaps"], 0);
    assert_eq!(report["check"]["duplicates"], 0);
    assert_eq!(report["produced"]["ops"], 3000);
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 gaps, 0 duplicates, 0 malformed: OK"));
    // A separate consumer reads the same messages back from the beginning.
    let json = dir.path().join("consume.json");
    let json_arg = json.to_string_lossy().into_owned();
    let out = sa
        .client_command(&[
            "perf",
            "consume",
            "perf-topic",
            "-s",
            "again",
            "--position",
            "earliest",
            "-n",
            "3000",
            "--warmup",
            "0",
            "--json",
            &json_arg,
        ])
        .output()
        .expect("run perf consume");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).expect("json")).expect("parse");
    assert_eq!(report["check"]["messages"], 3000, "{report}");
    assert_eq!(report["check"]["gaps"], 0);
}
