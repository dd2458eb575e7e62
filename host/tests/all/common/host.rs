//! The real `gorch-host` binary: its path, a host process killed when the test ends, its
//! log read line by line, its HTTP port, and free ports for servers the tests start.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `gorch-host` binary cargo built for this test binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_gorch-host");

/// A host process that is killed when the test ends, also when it fails half-way.
pub struct Host(pub std::process::Child);

impl std::ops::Deref for Host {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the binary with `args`, collecting stderr lines on a channel.
pub fn spawn_logged(args: &[&std::ffi::OsStr]) -> (Host, std::sync::mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    spawn_command(cmd.args(args).env("RUST_LOG", "info"))
}

/// Runs `cmd` (the binary, or a shell that execs it), collecting stderr lines on a channel.
pub fn spawn_command(cmd: &mut Command) -> (Host, std::sync::mpsc::Receiver<String>) {
    let mut child =
        cmd.env("NO_COLOR", "1").stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (Host(child), rx)
}

/// `gorch-host run --no-cache --addr 127.0.0.1:0 EXTRA... DIR`, logging to a channel.
pub fn run_host(
    dir: &std::path::Path,
    extra: &[&str],
) -> (Host, std::sync::mpsc::Receiver<String>) {
    let mut args: Vec<&std::ffi::OsStr> =
        ["run", "--no-cache", "--addr", "127.0.0.1:0"].iter().map(|a| a.as_ref()).collect();
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.push(dir.as_os_str());
    spawn_logged(&args)
}

/// Reads lines until one contains `needle` (the log so far is returned), failing after a
/// minute without it.
pub fn read_until(
    child: &mut std::process::Child,
    rx: &std::sync::mpsc::Receiver<String>,
    needle: &str,
) -> String {
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => {
                log.push_str(&l);
                log.push('\n');
                if l.contains(needle) {
                    return log;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("no {needle:?} within 60 s; log so far:\n{log}");
            }
        }
    }
}

/// The port of the host's HTTP server, from its `metrics: http://127.0.0.1:PORT/...` line.
pub fn port_of(log: &str) -> String {
    log.rsplit("metrics: http://127.0.0.1:").next().unwrap().split('/').next().unwrap().to_string()
}

/// GET `path` from the host on `port` (a plain HTTP/1.0 request); returns the body.
pub fn http_get(port: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// A free loopback port: bound and released, for a server the test starts next
/// (nats-server, Prometheus) or for an address where nothing listens.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A request to the host on `port` with `headers` (HTTP/1.0, `Host: 127.0.0.1:PORT` unless
/// given); returns the status and the body.
pub fn http_request(
    port: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// How many messages the routine(s) named `name` of the host on `port` took.
pub fn taken_by(port: &str, name: &str) -> u64 {
    let snaps: Vec<gorch_host::Snapshot> =
        serde_json::from_str(&http_get(port, "/gorchestra/api/routines")).unwrap();
    snaps.iter().filter(|s| s.name == name).map(|s| s.messages_in).sum()
}

/// Stops `host` with SIGINT and checks that it exits 0.
pub fn stop_cleanly(host: &mut Host) {
    let pid = host.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    assert!(host.wait().unwrap().success());
}
