//! How cost grows with the number of wasm workers (P2 density, P7 scrape, and the scaling
//! note), a bench binary: `cargo bench -p gorch-host --bench scale` (sizes 10, 100, 1,000,
//! 10,000), or `... -- 100000` for other sizes.
//!
//! Each size runs in a fresh child process (memory freed by one size would otherwise be
//! reused by the next): it starts one `testkit` worker in mode `park` (announces itself on
//! a topic, then blocks in `mailbox::recv`) and reads the resident memory of the host with
//! that one worker, the baseline. It then spawns the other N-1 the same way, timing spawn
//! to all parked, reads memory again, and times `GET /metrics` (median of 20) and
//! `GET /gorchestra/api/routines` through the real HTTP server. Memory per worker is
//! (RSS with N - RSS with 1) / (N-1); PSS is given too, because RSS counts each instance's
//! mapping of the shared, copy-on-write memory image again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use gorch_host::{
    EngineConfig, ObsConfig, ObsServer, Orchestrator, SpawnOptions, WasmEngine, WasmOptions,
};

/// Above this many workers the default 4 GiB reservation per memory would not fit the
/// address space; the bench then reserves 64 MiB per memory (`memory_reservation`).
const BIG: usize = 20_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if let [flag, kind, n] = &args[..]
        && flag == "--child"
    {
        child(kind == "native", n.parse().expect("size"));
        return;
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![10, 100, 1_000, 10_000]
    } else {
        args.iter().map(|a| a.parse().expect("sizes are numbers")).collect()
    };
    println!(
        "## scaling: N idle wasm workers (testkit, blocked in recv), {} cores",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!(
        "| workers | spawn to all parked | per spawn | spawns/s | RSS, 1 worker | RSS per extra worker | of which linear memory / fiber stack / host | PSS per extra worker | mappings per extra worker | /metrics | /metrics bytes | /api/routines |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let runs = sizes
        .iter()
        .map(|&n| ("wasm", n))
        .chain(sizes.iter().filter(|&&n| n <= BIG).max().map(|&n| ("native", n)));
    for (kind, n) in runs {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--child", kind, &n.to_string()])
            .output()
            .expect("child");
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            println!(
                "| {n} | failed: {} {} |",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            continue;
        }
        print!("{text}");
    }
}

/// One size in this process: N routines parked in `recv` (wasm: the testkit guest; native:
/// an async closure doing the same, the orchestrator's own share).
fn child(native: bool, n: usize) {
    // Shows why the pooling allocator could not be created, if it could not.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::WARN)
        .init();
    let config = EngineConfig {
        pool_size: (n + 16) as u32,
        memory_reservation: if n > BIG {
            64 << 20
        } else {
            gorch_host::wasm::DEFAULT_MEMORY_RESERVATION
        },
        ..Default::default()
    };
    let engine = WasmEngine::new(config).expect("engine");
    assert!(
        engine.is_pooling(),
        "no pooling allocator for {n} instances (see the warning above); vm.max_map_count is {}",
        std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap_or_default().trim()
    );
    let testkit = engine.load_file(gorch_artifacts::path("testkit")).expect("testkit");
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    rt.block_on(async {
        let orch = Orchestrator::new();
        let server = ObsServer::start(
            &orch,
            &ObsConfig { addr: "127.0.0.1:0".parse().unwrap(), ..Default::default() },
        )
        .unwrap();
        let parked = orch.bus().topic("parked", 1024).unwrap();
        let wasm = WasmOptions::default().env("MODE", "park");
        let spawn = move |orch: &Orchestrator, i: usize| {
            let opts = SpawnOptions::new(format!("w{i}"));
            if native {
                orch.spawn(opts, |ctx| async move {
                    ctx.publish("parked", Vec::new()).await?;
                    ctx.recv(None).await.map(drop)
                })
            } else {
                orch.spawn_wasm(opts, &testkit, wasm.clone())
            }
            .expect("spawn")
        };
        spawn(&orch, 0);
        parked.recv().await.unwrap();
        let one = Memory::read();
        let t = Instant::now();
        let spawner = {
            let orch = orch.clone();
            let spawn = spawn.clone();
            tokio::spawn(async move {
                for i in 1..n {
                    spawn(&orch, i);
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        };
        for _ in 1..n {
            parked.recv().await.unwrap();
        }
        let took = t.elapsed();
        spawner.await.unwrap();
        let all = Memory::read();
        let addr = server.local_addr();
        let (metrics, bytes) = timed_get(addr, "/metrics").await;
        let (api, _) = timed_get(addr, "/gorchestra/api/routines").await;
        let extra = (n - 1).max(1) as f64;
        let kb = |a: u64, b: u64| b.saturating_sub(a) as f64 / extra / 1024.0;
        println!(
            "| {n}{} | {took:.1?} | {:.1?} | {:.0} | {:.1} MB | {:.1} KB | {:.1} / {:.1} / {:.1} KB | {:.1} KB | {:.1} | {metrics:.2?} | {bytes} | {api:.2?} |",
            if native { " native" } else { "" },
            took / (n.max(2) - 1) as u32,
            extra / took.as_secs_f64(),
            one.rss() as f64 / 1e6,
            kb(one.rss(), all.rss()),
            kb(one.rss_by_kind[0], all.rss_by_kind[0]),
            kb(one.rss_by_kind[1], all.rss_by_kind[1]),
            kb(one.rss_by_kind[2], all.rss_by_kind[2]),
            kb(one.pss, all.pss),
            all.mappings.saturating_sub(one.mappings) as f64 / extra,
        );
        orch.shutdown(Duration::from_secs(30)).await;
        server.shutdown().await;
    });
}

/// Median time of 20 GETs of `path`, and the body size.
async fn timed_get(addr: SocketAddr, path: &'static str) -> (Duration, usize) {
    tokio::task::spawn_blocking(move || {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..20 {
            let t = Instant::now();
            let mut s = TcpStream::connect(addr).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).unwrap();
            times.push(t.elapsed());
            assert!(
                buf.starts_with(b"HTTP/1.1 200"),
                "{path}: {}",
                String::from_utf8_lossy(&buf[..80.min(buf.len())])
            );
            size = buf.len();
        }
        times.sort();
        (times[times.len() / 2], size)
    })
    .await
    .unwrap()
}

/// This process's memory, from one read of `/proc/self/smaps`.
struct Memory {
    /// Resident bytes by kind of mapping: linear memories incl. their copy-on-write images,
    /// fiber stacks, everything else (the host's heap, binary and libraries). The pools are
    /// the two huge anonymous reservations: linear memories (terabytes of address space) and
    /// fiber stacks (gigabytes).
    rss_by_kind: [u64; 3],
    /// Proportional set size: shared pages divided among their users.
    pss: u64,
    /// Mappings (each counts against `vm.max_map_count`).
    mappings: usize,
}

impl Memory {
    fn read() -> Memory {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut m = Memory { rss_by_kind: [0; 3], pss: 0, mappings: 0 };
        let kb =
            |v: &str| v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
        let mut kind = 2;
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                m.mappings += 1;
                let name = words.nth(4).unwrap_or("");
                let size = b - a;
                kind = if name.contains("memfd") || (name.is_empty() && size >= 64 << 30) {
                    0
                } else if name.is_empty() && size >= 256 << 20 {
                    1
                } else {
                    2
                };
            } else if let Some(v) = line.strip_prefix("Rss:") {
                m.rss_by_kind[kind] += kb(v);
            } else if let Some(v) = line.strip_prefix("Pss:") {
                m.pss += kb(v);
            }
        }
        m
    }

    fn rss(&self) -> u64 {
        self.rss_by_kind.iter().sum()
    }
}
