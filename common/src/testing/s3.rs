//! A throw-away S3-compatible server for tests: moto's server mode (`moto_server`, PyPI
//! `moto[server]`, in memory), installed by `scripts/s3-server.sh install`.
//!
//! This module owns the moto child process of a test and its log file: it starts it on a
//! 127.0.0.1 port that moto picks itself (port 0) and reports in its log, so two servers never
//! race for one port, creates one bucket, and kills (and reaps) it on drop. It never touches a server
//! it did not start. If moto is not installed, `start` fails with a message saying how to install
//! it: tests that need S3 never skip.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Signal, exchange, signal_child, values_between};

/// Environment variable naming the `moto_server` binary (set by `scripts/test.sh`).
pub const MOTO_SERVER_ENV: &str = "MAGNETAR_MOTO_SERVER";
/// How long moto gets to start answering (a cold Python start takes a few seconds).
const START_DEADLINE: Duration = Duration::from_secs(60);
const POLL_EVERY: Duration = Duration::from_millis(50);
/// What werkzeug (moto's HTTP server) logs once it listens, followed by the port.
const LISTENING: &str = "Running on http://127.0.0.1:";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// moto's S3 on 127.0.0.1 with one bucket, [`S3Server::BUCKET`]. Any credentials are accepted.
#[derive(Debug)]
pub struct S3Server {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl S3Server {
    /// The bucket created at start.
    pub const BUCKET: &'static str = "magnetar";

    /// Starts `moto_server` on a port of its choosing, waits until it answers and creates
    /// [`Self::BUCKET`].
    pub fn start() -> io::Result<S3Server> {
        let binary = find_moto_server()?;
        let dir = tempfile::Builder::new().prefix("magnetar-s3-").tempdir()?;
        let log_path = dir.path().join("moto.log");
        let log = File::create(&log_path)?;
        let child = Command::new(&binary)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", binary.display())))?;
        let mut server = S3Server { child, port: 0, dir };
        server.wait_ready(&log_path)?;
        let (status, body) = server.request("PUT", &format!("/{}", Self::BUCKET))?;
        if status != 200 {
            return Err(io::Error::other(format!("create bucket {}: HTTP {status}: {body}", Self::BUCKET)));
        }
        Ok(server)
    }

    /// Waits for the port in the log, then for an answer on it.
    fn wait_ready(&mut self, log_path: &Path) -> io::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        let log = || std::fs::read_to_string(log_path).unwrap_or_default();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(io::Error::other(format!("moto_server exited with {status} at start:\n{}", log())));
            }
            if self.port == 0 {
                self.port = listening_port(&log()).unwrap_or(0);
            }
            if self.port != 0 && self.request("GET", "/").is_ok_and(|(status, _)| status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("moto_server did not answer within {START_DEADLINE:?}:\n{}", log()),
                ));
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// `http://127.0.0.1:PORT`: the endpoint to configure (path-style, plain HTTP).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The temporary directory holding the server's log (`moto.log`).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Multipart uploads of the bucket that were started and neither completed nor aborted.
    pub fn incomplete_multipart_uploads(&self) -> io::Result<usize> {
        let (status, body) = self.request("GET", &format!("/{}?uploads", Self::BUCKET))?;
        if status != 200 {
            return Err(io::Error::other(format!("list multipart uploads: HTTP {status}: {body}")));
        }
        Ok(body.matches("<UploadId>").count())
    }

    /// Keys of the bucket's objects under `prefix` (completed uploads only), in key order.
    pub fn object_keys(&self, prefix: &str) -> io::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{}?list-type=2&prefix={prefix}", Self::BUCKET);
            if let Some(t) = &token {
                let t = t.replace('%', "%25").replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
                path.push_str(&format!("&continuation-token={t}"));
            }
            let (status, body) = self.request("GET", &path)?;
            if status != 200 {
                return Err(io::Error::other(format!("list objects: HTTP {status}: {body}")));
            }
            keys.extend(xml_values(&body, "Key"));
            token = xml_values(&body, "NextContinuationToken").into_iter().next();
            if token.is_none() {
                break;
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Freezes the server (SIGSTOP) and waits until all its threads are stopped: from then on,
    /// connections are accepted by the kernel but nothing answers.
    pub fn pause(&self) -> io::Result<()> {
        signal_child(&self.child, "moto_server", Signal::Stop)
    }

    /// Lets a paused server run again (SIGCONT) and waits until none of its threads is stopped.
    pub fn resume(&self) -> io::Result<()> {
        signal_child(&self.child, "moto_server", Signal::Cont)
    }

    /// One unsigned HTTP/1.0 request (moto does not check signatures): status and body.
    fn request(&self, method: &str, target: &str) -> io::Result<(u16, String)> {
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let request =
            format!("{method} {target} HTTP/1.0\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\n\r\n", self.port);
        let response = exchange(address, &request, REQUEST_TIMEOUT)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad HTTP response: {response:.200}")))?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }
}

/// The port in werkzeug's " * Running on http://127.0.0.1:PORT" line, once it is logged.
fn listening_port(log: &str) -> Option<u16> {
    let after = &log[log.find(LISTENING)? + LISTENING.len()..];
    let digits = after.find(|c: char| !c.is_ascii_digit())?;
    after[..digits].parse().ok().filter(|&port| port != 0)
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // SIGKILL works on a paused process too; wait to reap it before the tempdir goes.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `$MAGNETAR_MOTO_SERVER`, else the venv of `scripts/s3-server.sh`, else `moto_server` on PATH.
fn find_moto_server() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os(MOTO_SERVER_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{MOTO_SERVER_ENV}={} is not a file: run scripts/s3-server.sh install", path.display()),
            ))
        };
    }
    let cache = std::env::var_os("MAGNETAR_S3_SERVER_CACHE").map(PathBuf::from).or_else(|| {
        let xdg = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from);
        let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache"));
        xdg.or(home).map(|c| c.join("magnetar/s3-server"))
    });
    let in_cache = cache.map(|c| c.join("venv/bin/moto_server"));
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("moto_server"));
    in_cache.into_iter().chain(on_path).find(|p| p.is_file()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "moto_server (the S3 server of the object-store tests) not found: run \
                 `scripts/s3-server.sh install` (installs moto[server] from PyPI into \
                 ~/.cache/magnetar/s3-server), or set {MOTO_SERVER_ENV}"
            ),
        )
    })
}

/// The text of every `<tag>…</tag>` in `xml` (no nesting, no entities beyond what keys use).
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    values_between(xml, &format!("<{tag}>"), &format!("</{tag}>"))
}

#[cfg(test)]
mod tests {
    use super::listening_port;

    #[test]
    fn the_port_is_read_from_a_complete_startup_line() {
        let log = "\u{1b}[31m\u{1b}[1mWARNING: This is a development server.\u{1b}[0m\n * Running on http://127.0.0.1:43893\n";
        assert_eq!(listening_port(log), Some(43893));
        assert_eq!(listening_port(" * Running on http://127.0.0.1:438"), None, "the line may still be written");
        assert_eq!(listening_port(" * Running on http://127.0.0.1:0\n"), None);
        assert_eq!(listening_port("moto starting\n"), None);
    }
}
