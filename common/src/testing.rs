//! Test support (feature `testing`): a throw-away single-member etcd server, a throw-away
//! S3-compatible server ([`S3Server`], in `testing/s3.rs`), and waiting for a condition
//! ([`wait_until`], [`wait_for`], in `testing/wait.rs`).
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
mod wait;
pub use s3::{MOTO_SERVER_ENV, S3Server};
pub use wait::{WAIT, wait_for, wait_until};

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
    /// The member name, unique per server: tells this etcd from another one that took the port.
    name: String,
    data: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd (from `PATH` or `/usr/bin/etcd`) on two free ports and waits until it answers
    /// its health check as the member it was started as. Tries new ports if the chosen ones were
    /// taken meanwhile (by anything, including another test's etcd).
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
        let name = data.path().file_name().map_or_else(|| "magnetar-etcd".into(), |n| n.to_string_lossy().into_owned());
        let child = Command::new(binary)
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", data.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={name}={peer_url}"))
            .arg("--initial-cluster-state=new")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", binary.display())))?;
        let mut server = EtcdServer { child, client_port, name, data };
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
                match member_names(address) {
                    Ok(names) if names == [self.name.as_str()] => return Ok(()),
                    Ok(names) => {
                        return Err(StartError::PortTaken(io::Error::other(format!(
                            "another etcd (members {names:?}) answers on {address}, not {}",
                            self.name
                        ))));
                    }
                    Err(_) => {}
                }
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

    /// Freezes etcd (SIGSTOP) and waits until all its threads are stopped: from then on,
    /// connections stay open but nothing answers.
    pub fn pause(&self) -> io::Result<()> {
        signal_child(&self.child, "etcd", Signal::Stop)
    }

    /// Lets a paused etcd run again (SIGCONT) and waits until none of its threads is stopped.
    pub fn resume(&self) -> io::Result<()> {
        signal_child(&self.child, "etcd", Signal::Cont)
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
    let request = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    exchange(address, request, PROBE_TIMEOUT).is_ok_and(|r| r.contains("\"health\":\"true\""))
}

/// The member names in etcd's member list (the JSON gateway of the v3 API).
fn member_names(address: SocketAddr) -> io::Result<Vec<String>> {
    let request = "POST /v3/cluster/member/list HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n\r\n{}";
    let response = exchange(address, request, PROBE_TIMEOUT)?;
    let names = values_between(&response, "\"name\":\"", "\"");
    if names.is_empty() {
        return Err(io::Error::other(format!("no members in the member list: {response:.300}")));
    }
    Ok(names)
}

/// The text between every `open` and the next `close` in `text`, in order (no nesting).
fn values_between(text: &str, open: &str, close: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(close) else { break };
        out.push(after[..end].to_string());
        rest = &after[end + close.len()..];
    }
    out
}

/// One HTTP/1.0 exchange on a new connection: writes `request`, reads the response to its end.
fn exchange(address: SocketAddr, request: &str, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The two job-control signals tests send to a server they started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Stop,
    Cont,
}

/// How long a signalled server gets until all its threads are stopped (or running again).
const SIGNAL_DEADLINE: Duration = Duration::from_secs(10);

/// Sends `signal` to `child` (`what` names it in errors) and waits until every one of its threads
/// is stopped (`Stop`) or none is (`Cont`). An error if the child has exited: a test that pauses a
/// server must know that nothing answers from then on.
fn signal_child(child: &Child, what: &str, signal: Signal) -> io::Result<()> {
    let pid = child.id();
    let (flag, raw) = match signal {
        Signal::Stop => ("SIGSTOP", rustix::process::Signal::STOP),
        Signal::Cont => ("SIGCONT", rustix::process::Signal::CONT),
    };
    rustix::process::kill_process(rustix::process::Pid::from_child(child), raw)
        .map_err(|e| io::Error::other(format!("{flag} to {what} (pid {pid}): {e}")))?;
    let deadline = Instant::now() + SIGNAL_DEADLINE;
    loop {
        let states = thread_states(pid)
            .map_err(|e| io::Error::new(e.kind(), format!("{what} (pid {pid}) after {flag}: {e}")))?;
        if matches!(states.first(), None | Some('Z' | 'X')) {
            return Err(io::Error::other(format!("{what} (pid {pid}) has exited; it cannot be paused or resumed")));
        }
        let stopped = states.iter().filter(|&&s| s == 'T').count();
        let done = match signal {
            Signal::Stop => stopped == states.len(),
            Signal::Cont => stopped == 0,
        };
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} (pid {pid}): thread states {states:?} {SIGNAL_DEADLINE:?} after {flag}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The state letter (`R`, `S`, `T`, `Z`, ...) of each thread of process `pid`, the main thread
/// first, from `/proc`. Empty if the process is gone.
fn thread_states(pid: u32) -> io::Result<Vec<char>> {
    let state = |tid: &str| -> io::Result<Option<char>> {
        match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) {
            // "tid (comm) S ...": the command may hold spaces and parentheses, the state follows
            // the last ')'.
            Ok(stat) => Ok(stat.rsplit_once(')').and_then(|(_, rest)| rest.trim_start().chars().next())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    };
    let Some(main) = state(&pid.to_string())? else { return Ok(Vec::new()) };
    let mut states = vec![main];
    let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
        Ok(tasks) => tasks,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    for task in tasks {
        let tid = task?.file_name().to_string_lossy().into_owned();
        if tid != pid.to_string()
            && let Some(s) = state(&tid)?
        {
            states.push(s);
        }
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_for(pid: u32, what: &str, done: impl Fn(&[char]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&thread_states(pid).expect("thread states")) {
            assert!(Instant::now() < deadline, "{what}: states {:?}", thread_states(pid));
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_paused_child_is_stopped_until_resumed() {
        let mut child = Command::new("sleep").arg("60").spawn().expect("spawn sleep");
        signal_child(&child, "sleep", Signal::Stop).expect("pause");
        assert_eq!(thread_states(child.id()).expect("states"), ['T']);
        signal_child(&child, "sleep", Signal::Cont).expect("resume");
        assert!(!thread_states(child.id()).expect("states").contains(&'T'));
        child.kill().expect("kill");
        child.wait().expect("reap");
    }

    #[test]
    fn a_child_that_exited_cannot_be_paused() {
        let mut child = Command::new("true").spawn().expect("spawn true");
        // Exited but not reaped: the pid still names it (a zombie), and a signal to it succeeds.
        wait_for(child.id(), "true exits", |states| states == ['Z']);
        let err = signal_child(&child, "true", Signal::Stop).expect_err("a zombie cannot stop");
        assert!(err.to_string().contains("has exited"), "{err}");
        child.wait().expect("reap");
    }

    #[test]
    fn every_thread_of_this_process_is_listed() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::spawn(move || rx.recv());
        let states = thread_states(std::process::id()).expect("states");
        assert!(states.len() >= 2, "{states:?}");
        assert!(states.contains(&'R'), "the thread reading them is running: {states:?}");
        drop(tx);
        helper.join().expect("join").expect_err("sender dropped");
    }
}
