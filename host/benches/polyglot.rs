//! Python and JavaScript workers next to a Rust one, a bench binary:
//! `scripts/build-guests-py.sh && scripts/build-guests-js.sh && cargo bench -p gorch-host
//! --bench polyglot`.
//!
//! The three echo workers (`examples/guests/echo`, `examples/guests-py`, `examples/guests-js`:
//! each republishes its mailbox on a topic) are measured the same way:
//! - start: load the component (first: compile with an empty compile cache and store it;
//!   cached: a new engine reading that cache), spawn it, send one message, until its echo
//!   arrives: what a plugin costs before it does its first piece of work;
//! - memory: 20 idle instances (blocked in a mailbox receive): resident memory of the
//!   process per instance, and the linear memory each reports;
//! - messaging: a native routine floods the worker's mailbox, another drains its topic;
//!   messages per second through the worker (64-byte payloads) and the wasm fuel (about
//!   instructions) each message took; a native routine on the same path is the ceiling.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gorch_host::{
    CallError, EngineConfig, Message, Orchestrator, PluginManifest, SpawnOptions, WasmComponent,
    WasmEngine,
};

const IDLE: usize = 20;

struct Guest {
    lang: &'static str,
    path: PathBuf,
    topic: &'static str,
    messages: u64,
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let guests = [
        Guest {
            lang: "Rust",
            path: gorch_artifacts::path("echo"),
            topic: "echo",
            messages: 200_000,
        },
        Guest {
            lang: "Python",
            path: root.join("target/guests-py/echo-py.wasm"),
            topic: "echo-py",
            messages: 20_000,
        },
        Guest {
            lang: "JavaScript",
            path: root.join("target/guests-js/echo-js.wasm"),
            topic: "echo-js",
            messages: 20_000,
        },
    ];
    for g in &guests {
        assert!(
            g.path.exists(),
            "{} is missing: run scripts/build-guests-py.sh and scripts/build-guests-js.sh",
            g.path.display()
        );
    }
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    println!(
        "| worker | component | first start (compile + store) | cached start | RSS per idle instance | linear memory per instance | mailbox → worker → topic | fuel per message |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for g in &guests {
        let cache = tempfile::tempdir().unwrap();
        let engine = |cache: &Path| {
            WasmEngine::new(EngineConfig {
                cache_dir: Some(cache.to_path_buf()),
                ..Default::default()
            })
            .unwrap()
        };
        let first_engine = engine(cache.path());
        let (first, _) = rt.block_on(start(&first_engine, g));
        drop(first_engine);
        let cached_engine = engine(cache.path());
        let (cached, component) = rt.block_on(start(&cached_engine, g));
        let (rss, linear) = rt.block_on(idle_memory(&component));
        let (rate, fuel) = rt.block_on(messaging(&component, g));
        let size = std::fs::metadata(&g.path).unwrap().len();
        println!(
            "| {} | {:.2} MB | {:.2} s | {:.1} ms | {:.0} KB | {:.0} KB | {:.1} k msg/s | {fuel} |",
            g.lang,
            size as f64 / 1e6,
            first.as_secs_f64(),
            cached.as_secs_f64() * 1e3,
            rss as f64 / 1e3,
            linear as f64 / 1e3,
            rate / 1e3
        );
    }
    let native = rt.block_on(messaging_native(200_000));
    println!(
        "| native routine (the host's ceiling) | — | — | — | — | — | {:.1} k msg/s | — |",
        native / 1e3
    );
}

/// The same path with a native routine as the worker: what the host itself allows.
async fn messaging_native(count: u64) -> f64 {
    let orch = Orchestrator::new();
    orch.bus().topic("echo-native", 1024).unwrap();
    orch.spawn(SpawnOptions::new("w").queue_capacity(1024), |ctx| async move {
        while let Some(m) = ctx.recv(None).await? {
            ctx.publish("echo-native", m).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
    let t = Instant::now();
    let drain = orch
        .spawn(SpawnOptions::new("drain"), move |ctx| async move {
            for _ in 0..count {
                ctx.bus_recv("echo-native", None).await?;
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    orch.spawn(SpawnOptions::new("flood"), move |ctx| async move {
        for _ in 0..count {
            ctx.send("w", vec![7u8; 64]).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
    drain.wait().await;
    let rate = count as f64 / t.elapsed().as_secs_f64();
    orch.shutdown(Duration::from_secs(5)).await;
    rate
}

/// Load (compile or from the cache), spawn, one message echoed: the time it took.
async fn start(engine: &WasmEngine, g: &Guest) -> (Duration, WasmComponent) {
    let t = Instant::now();
    let component = engine.load_file(&g.path).unwrap();
    let orch = Orchestrator::new();
    let out = orch.bus().topic(g.topic, 16).unwrap();
    let m = PluginManifest::default();
    let h = orch.spawn_wasm(m.spawn_options("w".into()), &component, m.wasm_options()).unwrap();
    h.mailbox().send(Message::new(b"hi".to_vec())).await.unwrap();
    out.recv_timeout(Duration::from_secs(300)).await.expect("no echo");
    let took = t.elapsed();
    orch.shutdown(Duration::from_secs(5)).await;
    (took, component)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Resident memory per idle instance (process RSS before and after), and the linear memory
/// each instance reports.
async fn idle_memory(component: &WasmComponent) -> (u64, u64) {
    let orch = Orchestrator::new();
    let m = PluginManifest::default();
    let before = rss_bytes();
    let mut handles = Vec::new();
    for i in 0..IDLE {
        let opts = m.spawn_options(format!("idle-{i}"));
        handles.push(orch.spawn_wasm(opts, component, m.wasm_options()).unwrap());
    }
    // Idle: each has run its start-up and waits in its mailbox receive (it beats once a
    // second; its linear memory is reported once it ran).
    let deadline = Instant::now() + Duration::from_secs(120);
    while handles.iter().any(|h| h.snapshot().memory_bytes == 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = rss_bytes();
    let linear = handles.iter().map(|h| h.snapshot().memory_bytes).sum::<u64>() / IDLE as u64;
    orch.shutdown(Duration::from_secs(5)).await;
    (after.saturating_sub(before) / IDLE as u64, linear)
}

/// Messages per second from a native flooder through the worker's mailbox to a native
/// drainer of its topic (64-byte payloads).
async fn messaging(component: &WasmComponent, g: &Guest) -> (f64, u64) {
    let orch = Orchestrator::new();
    orch.bus().topic(g.topic, 1024).unwrap();
    let m = PluginManifest::default();
    let opts = m.spawn_options("w".into()).queue_capacity(1024);
    let worker = orch.spawn_wasm(opts, component, m.wasm_options()).unwrap();
    let (count, topic) = (g.messages, g.topic);
    let t = Instant::now();
    let drain = orch
        .spawn(SpawnOptions::new("drain"), move |ctx| async move {
            for _ in 0..count {
                ctx.bus_recv(topic, None).await?;
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    orch.spawn(SpawnOptions::new("flood"), move |ctx| async move {
        for _ in 0..count {
            ctx.send("w", vec![7u8; 64]).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
    drain.wait().await;
    let rate = count as f64 / t.elapsed().as_secs_f64();
    let fuel = worker.snapshot().fuel_consumed.unwrap_or(0) / count;
    orch.shutdown(Duration::from_secs(5)).await;
    (rate, fuel)
}
