//! Test support (feature `testing`): a throw-away single-member etcd server, and a throw-away
//! S3-compatible server ([`S3Server`], in `testing/s3.rs`).
//!
//! This module owns the etcd child process of a test: its temporary data directory, its two
//! ports and its log file. It never touches an etcd it did not start, and it kills (and reaps)
//! its own on drop, so no test leaves a server behind.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod s3;
pub use s3::{MOTO_SERVER_ENV, S3Server};

/// How long etcd gets to start answering.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between two readiness checks.
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Starts tried before giving up when ports turn out to be taken.
const START_ATTEMPTS: usize = 5;
/// Timeout of one readiness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A single-member etcd listening on 127.0.0.1, with its data in a temporary directory.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    client_port: u16,
    data: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd (from `PATH` or `/usr/bin/etcd`) on two free ports and waits until it answers
    /// its health check. Tries new ports if the chosen ones were taken meanwhile.
    pub fn start() -> io::Result<EtcdServer> {
        let binary = find_etcd()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(&binary) {
                Ok(server) => return Ok(server),
                Err(StartError::PortTaken(e)) => last_error = Some(e),
                Err(StartError::Other(e)) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("etcd did not start")))
    }

    fn start_once(binary: &Path) -> Result<EtcdServer, StartError> {
        let data = tempfile::Builder::new().prefix("magnetar-etcd-").tempdir()?;
        let client_port = free_port()?;
        let peer_port = free_port()?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log_path = data.path().join("etcd.log");
        let log = File::create(&log_path)?;
        let child = Command::new(binary)
            .arg("--name=magnetar-test")
            .arg(format!("--data-dir={}", data.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=magnetar-test={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", binary.display())))?;
        let mut server = EtcdServer { child, client_port, data };
        server.wait_ready(&log_path)?;
        Ok(server)
    }

    fn wait_ready(&mut self, log_path: &Path) -> Result<(), StartError> {
        let deadline = Instant::now() + START_DEADLINE;
        let address = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        loop {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                let error = io::Error::other(format!("etcd exited with {status} at start:\n{log}"));
                return Err(if log.contains("address already in use") {
                    StartError::PortTaken(error)
                } else {
                    StartError::Other(error)
                });
            }
            if healthy(address) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                return Err(StartError::Other(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("etcd did not become healthy within {START_DEADLINE:?}:\n{log}"),
                )));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// `127.0.0.1:PORT` of the client listener.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// A metadata-store URL for this server with keys under `/root`.
    pub fn url(&self, root: &str) -> String {
        format!("etcd://{}/{}", self.endpoint(), root.trim_start_matches('/'))
    }

    /// The temporary directory holding etcd's data and its log (`etcd.log`).
    pub fn dir(&self) -> PathBuf {
        self.data.path().to_owned()
    }

    /// Freezes etcd (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) -> io::Result<()> {
        self.signal("-STOP")
    }

    /// Lets a paused etcd run again (SIGCONT).
    pub fn resume(&self) -> io::Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, signal: &str) -> io::Result<()> {
        let status = Command::new("kill").arg(signal).arg(self.child.id().to_string()).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill {signal} {} failed: {status}", self.child.id())))
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // SIGKILL works on a paused process too; wait to reap it before the tempdir goes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum StartError {
    PortTaken(io::Error),
    Other(io::Error),
}

impl From<io::Error> for StartError {
    fn from(e: io::Error) -> Self {
        StartError::Other(e)
    }
}

fn find_etcd() -> io::Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("etcd"));
    on_path.chain([PathBuf::from("/usr/bin/etcd")]).find(|p| p.is_file()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "etcd not found on PATH nor at /usr/bin/etcd: run scripts/test.sh, or \
             `apt-get install etcd-server`",
        )
    })
}

/// A port that was free a moment ago (bound to :0 and released).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether etcd answers `GET /health` with `"health":"true"`.
fn healthy(address: SocketAddr) -> bool {
    let probe = || -> io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&address, PROBE_TIMEOUT)?;
        stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
        stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
        stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    probe().is_ok_and(|r| r.contains("\"health\":\"true\""))
}
