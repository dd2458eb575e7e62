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
//!
//! At the largest size (up to 20,000) three more rows: `park, reused slots`, the same N
//! workers after N others have run and ended in the same pool slots (what a host that has
//! been running hands out: the pool keeps the first 64 KiB of a freed memory and table
//! resident, see `engine.rs`); `idler` (P2b), the smallest idle worker, a guest that only
//! loops on `mailbox::recv` (each gets one empty message, so the bench knows it has reached
//! `recv`: the mailbox counts the receive); and `native`, async closures doing what `park`
//! does (the orchestrator's own share).
//!
//! `GORCH_SCALE_SMAPS=FILE` copies `/proc/self/smaps` with all N workers to FILE;
//! `GORCH_SCALE_EXIT=1` exits right after the measurement, without freeing anything, so
//! that a heap profiler's "leaked" list is what the N workers hold
//! (`GORCH_SCALE_EXIT=1 heaptrack target/release/deps/scale-* --child wasm 3000`).
//!
//! It uses the allocator the `gorch-host` binary uses (the system's, glibc malloc, with its
//! defaults): see BENCHMARKS.md for the allocator settings that were measured and not kept.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use gorch_host::{
    EngineConfig, Message, ObsConfig, ObsServer, Orchestrator, RoutineHandle, SpawnOptions,
    WasmEngine, WasmOptions,
};

/// Above this many workers the default 4 GiB reservation per memory would not fit the
/// address space; the bench then reserves 64 MiB per memory (`memory_reservation`).
const BIG: usize = 20_000;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    if let [flag, kind, n] = &args[..]
        && flag == "--child"
    {
        let kind = match kind.as_str() {
            "native" => Kind::Native,
            "idler" => Kind::Idler,
            "reused" => Kind::Reused,
            _ => Kind::Park,
        };
        child(kind, n.parse().expect("size"));
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
        "| workers | spawn to all parked | per spawn | spawns/s | RSS, 1 worker | RSS per extra worker | of which linear memory / fiber stack / host | live host heap per extra worker | PSS per extra worker | mappings per extra worker | /metrics | /metrics bytes | /api/routines |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let largest = sizes.iter().filter(|&&n| n <= BIG).max();
    let runs = sizes
        .iter()
        .map(|&n| ("wasm", n))
        .chain(largest.map(|&n| ("reused", n)))
        .chain(largest.map(|&n| ("idler", n)))
        .chain(largest.map(|&n| ("native", n)));
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

/// What the N routines of a child are.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// `testkit` in mode `park`: publishes on `parked`, then waits in `recv` (P2).
    Park,
    /// The `idler` guest: only loops on `recv` (P2b).
    Idler,
    /// `Park` in pool slots that an earlier instance has used (see `Reused` in `child`).
    Reused,
    /// An async closure doing what `park` does: the orchestrator's own share.
    Native,
}

/// One size in this process: N routines parked in `recv`.
fn child(kind: Kind, n: usize) {
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
            gorch_host::defaults::DEFAULT_MEMORY_RESERVATION
        },
        ..Default::default()
    };
    let engine = WasmEngine::new(config).expect("engine");
    assert!(
        engine.is_pooling(),
        "no pooling allocator for {n} instances (see the warning above); vm.max_map_count is {}",
        std::fs::read_to_string("/proc/sys/vm/max_map_count").unwrap_or_default().trim()
    );
    let guest = if kind == Kind::Idler { "idler" } else { "testkit" };
    let component = engine.load_file(gorch_artifacts::path(guest)).expect(guest);
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    rt.block_on(async {
        let orch = Orchestrator::new();
        let server = ObsServer::start(
            &orch,
            &ObsConfig { addr: "127.0.0.1:0".parse().unwrap(), ..Default::default() },
        )
        .unwrap();
        let parked = orch.bus().topic("parked", 1024).unwrap();
        let wasm = match kind {
            Kind::Idler => WasmOptions::default(),
            _ => WasmOptions::default().env("MODE", "park"),
        };
        let spawn = move |orch: &Orchestrator, name: String| {
            let opts = SpawnOptions::new(name);
            let h = match kind {
                Kind::Native => orch.spawn(opts, |ctx| async move {
                    ctx.publish("parked", Vec::new()).await?;
                    ctx.recv(None).await.map(drop)
                }),
                _ => orch.spawn_wasm(opts, &component, wasm.clone()),
            }
            .expect("spawn");
            if kind == Kind::Idler {
                h.mailbox().try_send(Message::new(Vec::new())).expect("an empty mailbox");
            }
            h
        };
        // Until all of `handles` have reached `recv`: the idler announces nothing, but its
        // mailbox counts the receive of the one message it was given.
        let parked_idlers = async |handles: &[RoutineHandle]| {
            for h in handles {
                while h.mailbox().stats().recvs == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        let first = spawn(&orch, "w0".to_string());
        if kind == Kind::Idler {
            parked_idlers(std::slice::from_ref(&first)).await;
        } else {
            parked.recv().await.unwrap();
        }
        let one = Memory::read();
        if kind == Kind::Reused {
            // Every pool slot the N workers will get has been used once: what a host that
            // has been running (restarts, upgrades) hands out.
            let before: Vec<RoutineHandle> =
                (1..n).map(|i| spawn(&orch, format!("before{i}"))).collect();
            let warm_up = async {
                for _ in 1..n {
                    parked.recv().await.unwrap();
                }
                for h in &before {
                    h.stop();
                }
                for h in &before {
                    h.wait().await;
                }
            };
            // Fails, naming where the routines were, rather than hanging (it hung once, in
            // one of about ten runs, not reproduced since).
            if tokio::time::timeout(Duration::from_secs(120), warm_up).await.is_err() {
                let mut states = std::collections::BTreeMap::new();
                for h in &before {
                    *states.entry(h.state().as_str()).or_insert(0) += 1;
                }
                panic!("the warm-up did not end within 120 s: {states:?}");
            }
        }
        let t = Instant::now();
        let spawner = {
            let orch = orch.clone();
            let spawn = spawn.clone();
            tokio::spawn(async move {
                let mut handles = Vec::with_capacity(n);
                for i in 1..n {
                    handles.push(spawn(&orch, format!("w{i}")));
                    if i % 64 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                handles
            })
        };
        if kind != Kind::Idler {
            for _ in 1..n {
                parked.recv().await.unwrap();
            }
        }
        let handles = spawner.await.unwrap();
        if kind == Kind::Idler {
            parked_idlers(&handles).await;
        }
        let took = t.elapsed();
        drop(handles);
        let all = Memory::read();
        if let Some(path) = std::env::var_os("GORCH_SCALE_SMAPS") {
            std::fs::copy("/proc/self/smaps", path).unwrap();
        }
        if std::env::var_os("GORCH_SCALE_EXIT").is_some() {
            // For heap profilers: what is still allocated at exit is what the N workers hold.
            std::process::exit(0);
        }
        let addr = server.local_addr();
        let (metrics, bytes) = timed_get(addr, "/metrics").await;
        let (api, _) = timed_get(addr, "/gorchestra/api/routines").await;
        let extra = (n - 1).max(1) as f64;
        let kb = |a: u64, b: u64| b.saturating_sub(a) as f64 / extra / 1024.0;
        println!(
            "| {n}{} | {took:.1?} | {:.1?} | {:.0} | {:.1} MB | {:.1} KB | {:.1} / {:.1} / {:.1} KB | {:.1} KB | {:.1} KB | {:.1} | {metrics:.2?} | {bytes} | {api:.2?} |",
            match kind {
                Kind::Park => "",
                Kind::Idler => " idler",
                Kind::Reused => " park, reused slots",
                Kind::Native => " native",
            },
            took / (n.max(2) - 1) as u32,
            extra / took.as_secs_f64(),
            one.rss() as f64 / 1e6,
            kb(one.rss(), all.rss()),
            kb(one.rss_by_kind[0], all.rss_by_kind[0]),
            kb(one.rss_by_kind[1], all.rss_by_kind[1]),
            kb(one.rss_by_kind[2], all.rss_by_kind[2]),
            kb(one.heap_live, all.heap_live),
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
    /// fiber stacks (and tables), everything else (the host's heap, binary and libraries).
    /// See [`Memory::read`].
    rss_by_kind: [u64; 3],
    /// Proportional set size: shared pages divided among their users.
    pss: u64,
    /// Mappings (each counts against `vm.max_map_count`).
    mappings: usize,
    /// Bytes of heap in use (malloc's own count: the rest of the heap's resident memory is
    /// free space the allocator keeps, fragmentation).
    heap_live: u64,
}

impl Memory {
    /// Reads `/proc/self/smaps`. One mapping does not say what it is: the guard page of
    /// every fiber stack and the accessible part of every live memory split the pools'
    /// reservations into thousands of mappings, and the pools may lie next to each other.
    /// So: a copy-on-write memory image (`memfd`), a mapping of 64 GiB or more (the rest of
    /// the memory pool), and the anonymous mappings contiguous with an image (the
    /// accessible parts of memories) are linear memory; a mapping of exactly one fiber stack
    /// (`async_stack_size`), a 4 KiB guard page, and any other mapping of 256 MiB or more
    /// (the rest of the stack pool, the table pool) are fiber stacks (and tables); the rest
    /// (malloc's arenas of 64 MiB each, the main heap, binaries) is the host's.
    fn read() -> Memory {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
        let mut m = Memory { rss_by_kind: [0; 3], pss: 0, mappings: 0, heap_live: heap_live() };
        let kb =
            |v: &str| v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0) * 1024;
        let stack = (gorch_host::defaults::DEFAULT_MAX_WASM_STACK + (1 << 20)) as u64;
        // (start, end, anonymous or memfd, memfd, kind if the mapping alone says, rss)
        let mut maps: Vec<(u64, u64, bool, bool, Option<usize>, u64)> = Vec::new();
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                let perms = words.next().unwrap_or("");
                let name = words.nth(3).unwrap_or("");
                let (anon, memfd, size) = (name.is_empty(), name.contains("memfd"), b - a);
                let kind = if memfd || (anon && size >= 64 << 30) {
                    Some(0)
                } else if anon
                    && (size == stack
                        || (perms.starts_with("---") && size == 4096)
                        || size >= 256 << 20)
                {
                    Some(1)
                } else if !anon {
                    Some(2)
                } else {
                    None
                };
                maps.push((a, b, anon || memfd, memfd, kind, 0));
            } else if let Some(v) = line.strip_prefix("Rss:")
                && let Some(last) = maps.last_mut()
            {
                last.5 += kb(v);
            } else if let Some(v) = line.strip_prefix("Pss:") {
                m.pss += kb(v);
            }
        }
        m.mappings = maps.len();
        let mut i = 0;
        while i < maps.len() {
            let mut j = i + 1;
            while maps[i].2 && j < maps.len() && maps[j].2 && maps[j].0 == maps[j - 1].1 {
                j += 1;
            }
            let group = &maps[i..j];
            let images = group.iter().any(|g| g.3);
            for g in group {
                let kind = g.4.unwrap_or(if images { 0 } else { 2 });
                m.rss_by_kind[kind] += g.5;
            }
            i = j;
        }
        m
    }

    fn rss(&self) -> u64 {
        self.rss_by_kind.iter().sum()
    }
}

/// Heap bytes in use, as glibc's malloc counts them (all arenas, and its mmapped blocks).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_live() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    #[allow(unsafe_code)]
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as u64
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_live() -> u64 {
    0
}
