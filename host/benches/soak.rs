//! A soak of `gorch-host run` (issue 14), a bench binary:
//! `cargo bench -p gorch-host --bench soak -- --minutes N [--interval SECS]`.
//!
//! Runs the real binary on a temporary plugin directory of `testkit` guests: a restart
//! storm (`--storm`, default 50 instances panicking at once, `restart = "always"`, 1–50 ms
//! backoff, an intensity limit they never reach), idle workers (`--idle`, default 200,
//! parked in `recv`) and flooding workers (`--flood`, default 1 pair: one publishing 64-byte
//! messages as fast as it can, one draining them). The host's stdout and stderr (the log)
//! go to a file. Every interval (default 10 s, or a sixth of the run when that is shorter)
//! it prints one line sampled from `/proc/PID`: RSS, open file descriptors, threads, CPU,
//! and from the host's `/metrics` (plain HTTP on a free loopback port): restarts/s and
//! flood messages/s; and the log bytes written in the interval.
//!
//! At the end, a leak verdict per series from the least-squares slope over the second half
//! of the run (the first half is warm-up): flat if RSS grows by less than
//! [`RSS_FLAT_KB_PER_MIN`] and file descriptors and threads by less than
//! [`COUNT_FLAT_PER_MIN`] per minute. Then SIGINT, and the host must exit 0 within its
//! shutdown bound (plus a margin). The process exits 1 if the host died, did not stop in
//! time or exited non-zero; a "grows" verdict is reported, not failed (a short run is
//! mostly warm-up).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gorch-host");
/// RSS growth (least-squares slope over the second half) below which RSS is flat.
const RSS_FLAT_KB_PER_MIN: f64 = 1024.0;
/// File descriptor and thread growth below which they are flat.
const COUNT_FLAT_PER_MIN: f64 = 1.0;
/// The host's `--shutdown-timeout`, and the margin allowed on top of it for the exit.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(5);
const EXIT_MARGIN: Duration = Duration::from_secs(5);
/// The kernel's clock ticks per second for `/proc/PID/stat` (`getconf CLK_TCK`; 100 on
/// every Linux this runs on).
const CLK_TCK: f64 = 100.0;

struct Args {
    minutes: f64,
    interval: Duration,
    storm: u32,
    idle: u32,
    flood: u32,
}

impl Args {
    fn parse() -> Args {
        let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
        let get = |flag: &str| -> Option<f64> {
            let v = args.iter().skip_while(|a| *a != flag).nth(1)?;
            Some(v.parse().unwrap_or_else(|_| panic!("{flag} takes a number, got {v:?}")))
        };
        let minutes = get("--minutes").unwrap_or(1.0);
        assert!(minutes > 0.0 && minutes <= 24.0 * 60.0, "--minutes must be in (0, 1440]");
        let secs = get("--interval").unwrap_or_else(|| (minutes * 60.0 / 6.0).min(10.0));
        assert!(secs >= 0.5, "--interval must be at least 0.5 s");
        let count = |flag, default| get(flag).map_or(default, |v| v as u32);
        Args {
            minutes,
            interval: Duration::from_secs_f64(secs),
            storm: count("--storm", 50).max(1),
            idle: count("--idle", 200).max(1),
            flood: count("--flood", 1).max(1),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    write_plugins(&plugins, &args);
    let log_path = dir.path().join("host.log");
    let addr = free_addr();
    let log = File::create(&log_path).unwrap();
    let mut child = Command::new(BIN)
        .arg("run")
        .arg(&plugins)
        .args(["--addr", &addr.to_string()])
        .args(["--cache-dir", dir.path().join("cache").to_str().unwrap()])
        .args(["--shutdown-timeout", &format!("{}s", SHUTDOWN_BOUND.as_secs())])
        .env_remove("RUST_LOG")
        .env_remove("GORCH_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start gorch-host");
    let pid = child.id();
    println!(
        "## soak: `gorch-host run` (pid {pid}) for {} min, a sample every {:.1?}: restart storm \
         {} × testkit panic, {} idle (park), {} flood + {} drain; log: {}",
        args.minutes,
        args.interval,
        args.storm,
        args.idle,
        args.flood,
        args.flood,
        log_path.display()
    );
    let t0 = Instant::now();
    while !ready(addr) {
        if t0.elapsed() > Duration::from_secs(120) || child.try_wait().unwrap().is_some() {
            stop(&mut child);
            eprintln!("not ready within 120 s:\n{}", tail(&log_path));
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("ready after {:.0?}", t0.elapsed());
    let samples = match soak(&args, &mut child, addr, &log_path) {
        Ok(s) => s,
        Err(e) => {
            stop(&mut child);
            eprintln!("{e}\n{}", tail(&log_path));
            return ExitCode::FAILURE;
        }
    };
    let verdict_flat = verdict(&samples);
    let clean = shutdown(&mut child, &log_path);
    println!(
        "verdict: {}; shutdown: {}",
        if verdict_flat { "flat (no leak seen)" } else { "GROWS (see above)" },
        if clean { "clean" } else { "FAILED" }
    );
    if clean { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The plugin directory: copies of the testkit guest with their manifests.
fn write_plugins(dir: &Path, args: &Args) {
    std::fs::create_dir_all(dir).unwrap();
    let testkit = gorch_artifacts::path("testkit");
    let plugins = [
        (
            "storm",
            format!(
                "instances = {}\nrestart = \"always\"\n\
                 [backoff]\ninitial = \"1ms\"\nmax = \"50ms\"\n\
                 [intensity]\nmax-restarts = 1000\nwithin = \"1s\"\n\
                 [wasi]\nenv = {{ MODE = \"panic\" }}\n",
                args.storm
            ),
        ),
        ("idle", format!("instances = {}\n[wasi]\nenv = {{ MODE = \"park\" }}\n", args.idle)),
        // Long runs that restart now and then (a run of ~10 s resets the backoff).
        (
            "flood",
            format!(
                "instances = {}\nrestart = \"always\"\n\
                 [backoff]\ninitial = \"1ms\"\nmax = \"1s\"\nstable-after = \"5s\"\n\
                 [wasi]\nenv = {{ MODE = \"flood\", TOPIC = \"soak\", SIZE = \"64\", \
                 COUNT = \"10000000\" }}\n",
                args.flood
            ),
        ),
        (
            "drain",
            format!(
                "instances = {}\nrestart = \"always\"\n\
                 [backoff]\ninitial = \"1ms\"\nmax = \"1s\"\nstable-after = \"5s\"\n\
                 [wasi]\nenv = {{ MODE = \"drain\", TOPIC = \"soak\", COUNT = \"10000000\" }}\n",
                args.flood
            ),
        ),
    ];
    for (name, manifest) in plugins {
        std::fs::copy(&testkit, dir.join(format!("{name}.wasm"))).unwrap();
        std::fs::write(dir.join(format!("{name}.toml")), manifest).unwrap();
    }
}

/// One sample of the host.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Minutes since ready.
    t: f64,
    rss_kb: f64,
    fds: f64,
    threads: f64,
    /// utime + stime, seconds.
    cpu_s: f64,
    restarts: f64,
    storm_restarts: f64,
    published: f64,
    log_bytes: f64,
    /// The machine's 1-minute load average (other processes compete for the CPUs).
    load: f64,
}

/// Samples every interval until the end of the run; prints one line per interval.
fn soak(
    args: &Args,
    child: &mut Child,
    addr: SocketAddr,
    log: &Path,
) -> Result<Vec<Sample>, String> {
    let pid = child.id();
    let start = Instant::now();
    let end = Duration::from_secs_f64(args.minutes * 60.0);
    let mut samples = vec![sample(pid, addr, log, 0.0)?];
    println!(
        "| t | RSS | fds | threads | CPU | restarts/s (storm) | flood msg/s | log bytes | log/s \
         | load |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    print_row(&samples[0], None);
    let mut next = args.interval;
    while next <= end + Duration::from_millis(1) {
        std::thread::sleep(next.saturating_sub(start.elapsed()));
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("the host exited during the soak: {status}"));
        }
        let s = sample(pid, addr, log, start.elapsed().as_secs_f64() / 60.0)?;
        print_row(&s, samples.last());
        samples.push(s);
        next += args.interval;
    }
    let (first, last) = (samples[0], *samples.last().unwrap());
    let secs = (last.t - first.t) * 60.0;
    let bytes = last.log_bytes - first.log_bytes;
    let restarts = last.restarts - first.restarts;
    println!(
        "log: {} bytes in {secs:.0} s = {:.1} MB/hour ({:.1} bytes per restart); restarts: {:.0} \
         ({:.0}/s); RSS {:.1} → {:.1} MB",
        bytes,
        bytes / secs * 3600.0 / 1e6,
        if restarts > 0.0 { bytes / restarts } else { 0.0 },
        restarts,
        restarts / secs,
        first.rss_kb / 1024.0,
        last.rss_kb / 1024.0
    );
    let (lines, summaries) = log_lines(log);
    println!(
        "log lines: {lines}, of which {summaries} summarize suppressed lines (the log rate \
         limiting of restart storms; 0 without it)"
    );
    Ok(samples)
}

fn print_row(s: &Sample, prev: Option<&Sample>) {
    let rate = |f: fn(&Sample) -> f64| match prev {
        Some(p) if s.t > p.t => (f(s) - f(p)) / ((s.t - p.t) * 60.0),
        _ => 0.0,
    };
    println!(
        "| {:.2} min | {:.1} MB | {} | {} | {:.0} % | {:.0} ({:.0}) | {:.0} | {} | {:.0} | {:.2} |",
        s.t,
        s.rss_kb / 1024.0,
        s.fds,
        s.threads,
        rate(|s| s.cpu_s) * 100.0,
        rate(|s| s.restarts),
        rate(|s| s.storm_restarts),
        rate(|s| s.published),
        s.log_bytes - prev.map_or(0.0, |p| p.log_bytes),
        rate(|s| s.log_bytes),
        s.load,
    );
}

fn sample(pid: u32, addr: SocketAddr, log: &Path, t: f64) -> Result<Sample, String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    let field = |key: &str| -> f64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let (rss_kb, threads) = (field("VmRSS:"), field("Threads:"));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))?
        .count() as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th of them (fields 14 and 15 of proc(5)).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 =
        after.split_whitespace().skip(11).take(2).filter_map(|v| v.parse::<f64>().ok()).sum();
    // After the /proc reads: our own connection is not among the counted descriptors.
    let metrics = get(addr, "/metrics")?;
    let sum = |series: &str, label: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(series) && l[series.len()..].starts_with('{'))
            .filter(|l| l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    Ok(Sample {
        t,
        rss_kb,
        fds,
        threads,
        cpu_s: ticks / CLK_TCK,
        restarts: sum("gorch_routine_restarts_total", ""),
        storm_restarts: sum("gorch_routine_restarts_total", "name=\"storm"),
        published: sum("gorch_topic_published_total", "topic=\"soak\""),
        log_bytes: std::fs::metadata(log).map_err(|e| e.to_string())?.len() as f64,
        load: std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN),
    })
}

/// Least-squares slope of `y` over `t` (per minute).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mt, my) = points.iter().fold((0.0, 0.0), |(a, b), (t, y)| (a + t / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (t, y)| {
        (num + (t - mt) * (y - my), den + (t - mt) * (t - mt))
    });
    if den > 0.0 { num / den } else { 0.0 }
}

/// A series of the verdict: name, value of a sample, flat threshold, unit.
type Series = (&'static str, fn(&Sample) -> f64, f64, &'static str);

/// Prints the slope of each series over the second half of the run; true if all are flat.
fn verdict(samples: &[Sample]) -> bool {
    let half = samples.last().unwrap().t / 2.0;
    let late: Vec<&Sample> = samples.iter().filter(|s| s.t >= half).collect();
    println!(
        "leak verdict: least-squares slope over the second half ({} samples from {half:.2} min; \
         the first half is warm-up). Flat: RSS < {RSS_FLAT_KB_PER_MIN:.0} KB/min, fds and \
         threads < {COUNT_FLAT_PER_MIN} per minute.",
        late.len()
    );
    if late.len() < 3 {
        println!("too few samples for a slope (use a longer run or a shorter --interval)");
        return true;
    }
    let series: [Series; 3] = [
        ("RSS", |s| s.rss_kb, RSS_FLAT_KB_PER_MIN, "KB/min"),
        ("fds", |s| s.fds, COUNT_FLAT_PER_MIN, "/min"),
        ("threads", |s| s.threads, COUNT_FLAT_PER_MIN, "/min"),
    ];
    let mut flat = true;
    for (name, f, limit, unit) in series {
        let pts: Vec<(f64, f64)> = late.iter().map(|s| (s.t, f(s))).collect();
        let k = slope(&pts);
        let ok = k < limit;
        flat &= ok;
        println!(
            "- {name}: {k:+.1} {unit} ({}; {:.0} → {:.0})",
            if ok { "flat" } else { "GROWS" },
            pts[0].1,
            pts[pts.len() - 1].1
        );
    }
    flat
}

/// SIGINT, then waits for the exit within the shutdown bound plus a margin; true if the
/// host exited 0 in time.
fn shutdown(child: &mut Child, log: &Path) -> bool {
    let t = Instant::now();
    signal(child, "-INT");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let took = t.elapsed();
            println!(
                "SIGINT → {status} in {took:.0?} (bound {SHUTDOWN_BOUND:?} + {EXIT_MARGIN:?})"
            );
            if !status.success() {
                eprintln!("{}", tail(log));
            }
            return status.success();
        }
        if t.elapsed() > SHUTDOWN_BOUND + EXIT_MARGIN {
            stop(child);
            println!("SIGINT → still running after {:?}: killed", SHUTDOWN_BOUND + EXIT_MARGIN);
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal(child: &Child, sig: &str) {
    let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
}

fn stop(child: &mut Child) {
    signal(child, "-KILL");
    let _ = child.wait();
}

/// Lines in the log, and how many of them are summaries of suppressed lines.
fn log_lines(log: &Path) -> (u64, u64) {
    let Ok(file) = File::open(log) else { return (0, 0) };
    let mut out = (0, 0);
    for line in BufReader::new(file).split(b'\n').map_while(Result::ok) {
        out.0 += 1;
        if line.windows(10).any(|w| w == b"suppressed") {
            out.1 += 1;
        }
    }
    out
}

/// The last lines of the log, to explain a failure.
fn tail(log: &Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(4096)..]).into_owned();
    format!("--- the end of {} ---\n{text}", log.display())
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A plain HTTP/1.0 GET (the response is delimited by the close, never chunked).
fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).map_err(|e| format!("GET {path}: {e}"))?;
    match buf.split_once("\r\n\r\n") {
        Some((head, body)) if head.get(8..12) == Some(" 200") => Ok(body.to_string()),
        _ => Err(format!("GET {path}: {}", buf.lines().next().unwrap_or("no answer"))),
    }
}

fn ready(addr: SocketAddr) -> bool {
    get(addr, "/readyz").is_ok()
}
