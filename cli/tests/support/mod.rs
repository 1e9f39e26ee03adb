//! Shared helpers of the integration tests: real `magnetar` processes on ephemeral ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous deadline for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn magnetar() -> &'static str {
    env!("CARGO_BIN_EXE_magnetar")
}

/// A `magnetar bookie` child process.
#[derive(Debug)]
pub struct BookieProc {
    pub id: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub addr: String,
    pub http: String,
    child: Option<Child>,
}

impl BookieProc {
    /// Writes a config (`extra` TOML appended) and starts the bookie; waits until it listens.
    pub fn start(dir: &Path, id: &str, metadata_url: &str, extra: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let config = dir.join("bookie.toml");
        let mut toml = format!(
            "bookie_id = \"{id}\"\nlisten_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\n\
             metadata_url = \"{metadata_url}\"\nregistration_ttl = \"3s\"\n\
             journal_dir = \"{j}\"\nledger_dir = \"{l}\"\n{extra}\n",
            j = dir.join("journal").display(),
            l = dir.join("ledgers").display(),
        );
        if !extra.contains("[disk]") {
            // Only tests that configure `[disk]` are about a full disk; in the others the host's
            // own disk usage (a CI machine's disk may be over 95 % used) must not turn the bookie
            // read-only.
            toml.push_str("[disk]\nusage_threshold = 1.0\n");
        }
        std::fs::write(&config, toml).expect("write config");
        let mut b =
            Self { id: id.into(), dir: dir.into(), config, addr: String::new(), http: String::new(), child: None };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("bookie.log")).expect("log file");
        let mut child = Command::new(magnetar())
            .args(["bookie", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn magnetar bookie");
        let rx = stdout_lines(&mut child);
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains(" listening on ") => {
                    // "bookie ID listening on ADDR (http ADDR)"
                    let parts: Vec<&str> = line.split_whitespace().collect();
                    self.addr = parts[4].to_string();
                    self.http = parts[6].trim_end_matches(')').to_string();
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    panic!("bookie {} did not start; log:\n{}", self.id, self.log());
                }
            }
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bookie.log")).unwrap_or_default()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("wait");
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let c = self.child.take().expect("running");
        let pid = c.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        wait_exit(c)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    /// Runs the bookie expecting it to refuse to start; returns its stderr.
    pub fn start_expecting_failure(&self) -> String {
        let out = Command::new(magnetar())
            .args(["bookie", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn")
            .wait_with_output()
            .expect("wait");
        assert!(!out.status.success(), "bookie was expected to refuse to start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn wait_exit(mut c: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(s) = c.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for BookieProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The child's standard output, line by line, read on a thread until the pipe closes.
fn stdout_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Deterministic payload for (ledger, entry) of a given size.
pub fn payload(ledger: u64, entry: u64, size: usize) -> Vec<u8> {
    let mut x = ledger.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ entry.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) | 1;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A blocking HTTP GET of `http://addr/path`, returning (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(DEADLINE)).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
    (status, body)
}

/// A `magnetar standalone` child process on ephemeral ports.
#[derive(Debug)]
pub struct StandaloneProc {
    pub dir: PathBuf,
    pub url: String,
    pub http: String,
    pub cert: PathBuf,
    /// What it printed on standard output up to its "Try:" line.
    pub banner: Vec<String>,
    child: Option<Child>,
    /// More arguments of `magnetar standalone` (e.g. `--broker-config FILE`).
    args: Vec<std::ffi::OsString>,
    /// Environment variables set for it (after the test defaults, so they win).
    env: Vec<(String, String)>,
}

impl StandaloneProc {
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// Starts standalone with broker and bookie configuration files written from `broker` and
    /// `bookie` (TOML) next to `dir`.
    pub fn start_configured(dir: &Path, broker: &str, bookie: &str) -> Self {
        let parent = dir.parent().expect("data dir has a parent");
        let (broker_file, bookie_file) = (parent.join("broker.toml"), parent.join("bookie.toml"));
        std::fs::write(&broker_file, broker).expect("write broker config");
        std::fs::write(&bookie_file, bookie).expect("write bookie config");
        let args = [
            "--broker-config".into(),
            broker_file.into_os_string(),
            "--bookie-config".into(),
            bookie_file.into_os_string(),
        ];
        Self::start_with(dir, &args)
    }

    pub fn start_with(dir: &Path, args: &[std::ffi::OsString]) -> Self {
        Self::start_with_env(dir, args, &[])
    }

    pub fn start_with_env(dir: &Path, args: &[std::ffi::OsString], env: &[(&str, &str)]) -> Self {
        let mut s = Self {
            dir: dir.into(),
            url: String::new(),
            http: String::new(),
            cert: PathBuf::new(),
            banner: Vec::new(),
            child: None,
            args: args.to_vec(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).expect("mkdir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("standalone.log"))
            .expect("log file");
        let mut child = Command::new(magnetar())
            .args(["standalone", "--quic-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&self.dir)
            .args(&self.args)
            // No standalone test is about a full disk: the host's own disk usage must not turn
            // the bookie read-only (the variable overrides the bookie's config file).
            .env("MAGNETAR_BOOKIE_DISK__USAGE_THRESHOLD", "1.0")
            .env("RUST_LOG", "info")
            .envs(self.env.clone())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn magnetar standalone");
        let rx = stdout_lines(&mut child);
        let deadline = Instant::now() + DEADLINE;
        self.banner.clear();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    self.banner.push(line.clone());
                    let value = line.rsplit(' ').next().unwrap_or_default().to_string();
                    if line.contains("clients (QUIC/UDP):") {
                        self.url = value;
                    } else if line.contains("HTTP (/health, /metrics):") {
                        self.http = value.trim_start_matches("http://").to_string();
                    } else if line.contains("TLS certificate:") {
                        self.cert = PathBuf::from(value);
                    } else if line.starts_with("Try:") {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("standalone did not start; log:\n{}", self.log());
                }
            }
        }
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("standalone.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("wait");
        }
    }

    /// SIGINT (Ctrl-C) and wait for a clean exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        let c = self.child.take().expect("running");
        let pid = c.id().to_string();
        Command::new("kill").args(["-INT", &pid]).status().expect("kill -INT");
        wait_exit(c)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop it first");
        self.spawn();
    }

    /// A `magnetar` client command against this standalone (URL and certificate given).
    pub fn client_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(magnetar());
        c.args(args).arg("--url").arg(&self.url).arg("--tls-trust-cert").arg(&self.cert);
        c
    }
}

impl Drop for StandaloneProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `magnetar broker` child process on ephemeral ports, against a shared metadata store.
#[derive(Debug)]
pub struct BrokerProc {
    pub dir: PathBuf,
    pub url: String,
    pub http: String,
    pub cert: PathBuf,
    child: Option<Child>,
}

impl BrokerProc {
    /// Writes a config (`extra` TOML appended) and starts the broker; waits until it listens.
    pub fn start(dir: &Path, metadata_url: &str, extra: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        let config = dir.join("broker.toml");
        let toml = format!(
            "quic_addr = \"127.0.0.1:0\"\nhttp_addr = \"127.0.0.1:0\"\nmetadata_url = \"{metadata_url}\"\n\
             data_dir = \"{d}\"\n{extra}\n",
            d = dir.display(),
        );
        std::fs::write(&config, toml).expect("write config");
        let log = std::fs::File::create(dir.join("broker.log")).expect("log file");
        let mut child = Command::new(magnetar())
            .args(["broker", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn magnetar broker");
        let rx = stdout_lines(&mut child);
        let line = match rx.recv_timeout(DEADLINE) {
            Ok(line) if line.starts_with("broker listening on ") => line,
            other => {
                let _ = child.kill();
                let log = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
                panic!("broker did not start ({other:?}); log:\n{log}");
            }
        };
        // "broker listening on quic://ADDR (http ADDR)"
        let parts: Vec<&str> = line.split_whitespace().collect();
        Self {
            dir: dir.into(),
            url: parts[3].to_string(),
            http: parts[5].trim_end_matches(')').to_string(),
            cert: dir.join("tls/cert.pem"),
            child: Some(child),
        }
    }

    /// A `magnetar` client command against this broker (URL and certificate given).
    pub fn client_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(magnetar());
        c.args(args).arg("--url").arg(&self.url).arg("--tls-trust-cert").arg(&self.cert);
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL");
            c.wait().expect("wait");
        }
    }

    /// SIGINT (Ctrl-C), without waiting for the exit.
    pub fn interrupt_nowait(&mut self) -> Child {
        let c = self.child.take().expect("running");
        Command::new("kill").args(["-INT", &c.id().to_string()]).status().expect("kill -INT");
        c
    }

    /// SIGINT (Ctrl-C) and wait for a clean exit.
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        let c = self.interrupt_nowait();
        wait_exit(c)
    }
}

/// Waits for a child to exit (up to the deadline).
pub fn wait_child(c: Child) -> std::process::ExitStatus {
    wait_exit(c)
}

impl Drop for BrokerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
