//! Start-up of `gorch-host run` on the example plugins (P8), a bench binary:
//! `cargo bench -p gorch-host --bench startup`.
//!
//! Starts the real binary and times spawn → `/readyz` answers 200 (every plugin loaded and
//! started), then stops it with SIGINT. Three ways, interleaved in the same run: with an
//! empty compile cache (first start), with the cache the previous start filled (second
//! start), and with `--no-cache`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gorch-host");
const ROUNDS: usize = 5;

fn main() {
    let plugins = gorch_artifacts::DEMO_PLUGINS_DIR;
    let n = std::fs::read_dir(plugins)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "wasm"))
        .count();
    println!(
        "## `gorch-host run` on the demo plugins ({n} components) until /readyz: {ROUNDS} rounds"
    );
    let (mut first, mut second, mut none) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let cache = tempfile::tempdir().unwrap();
        first.push(start(plugins, &["--cache-dir", cache.path().to_str().unwrap()]));
        second.push(start(plugins, &["--cache-dir", cache.path().to_str().unwrap()]));
        none.push(start(plugins, &["--no-cache"]));
    }
    let (first, second, none) = (median(first), median(second), median(none));
    println!("| start | median | vs first start |");
    println!("|---|---|---|");
    println!("| first (empty cache: compile + store) | {first:.1?} | 1.00 |");
    println!("| second (from the cache) | {second:.1?} | {:.3} |", ratio(second, first));
    println!("| `--no-cache` (compile) | {none:.1?} | {:.3} |", ratio(none, first));
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Starts the host, waits until it is ready, stops it; returns the time to ready.
fn start(plugins: &str, extra: &[&str]) -> Duration {
    let addr = free_addr();
    let t = Instant::now();
    let mut child = Command::new(BIN)
        .arg("run")
        .arg(Path::new(plugins))
        .args(["--addr", &addr.to_string()])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gorch-host");
    let deadline = t + Duration::from_secs(120);
    while !ready(addr) {
        if Instant::now() > deadline {
            stop(&mut child);
            panic!("not ready within 120 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let took = t.elapsed();
    stop(&mut child);
    took
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
    let _ = child.wait();
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

fn ready(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200")
}
