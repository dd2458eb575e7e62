//! Messaging between real guests: `cargo bench -p gorch-host --bench messaging`.
//! guest → topic → guest throughput for 64 B and 4 KiB payloads next to a pair of native
//! routines over the same bus, and guest ↔ guest ping-pong round trips next to native.
//! The batch rows use `bus.recv-batch` in the receiver (batches of up to 64) and
//! `bus.publish-batch` in the publisher (64 per call), native routines the same calls of
//! `RoutineContext`. `GORCH_BENCH_ONLY=one-way` or `ping-pong` runs one part (for profiling), `GORCH_WORKERS`
//! sets the number of worker threads (2 by default).

use std::time::{Duration, Instant};

use gorch_host::{CallError, Orchestrator, SpawnOptions, WasmComponent, WasmEngine, WasmOptions};

fn main() {
    let engine = WasmEngine::new(Default::default()).expect("engine");
    let testkit = engine.load_file(gorch_artifacts::path("testkit")).expect("testkit");
    let interval: u32 = std::env::var("GORCH_EVENT_INTERVAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(gorch_host::EVENT_INTERVAL);
    println!("event_interval {interval}");
    // 2 worker threads, as the targets assume; GORCH_WORKERS changes it (to see what
    // cross-thread hand-offs cost).
    let workers: usize =
        std::env::var("GORCH_WORKERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    println!("worker_threads {workers}");
    let rt = gorch_host::runtime_builder_with_interval(interval)
        .worker_threads(workers)
        .build()
        .unwrap();
    let only = std::env::var("GORCH_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "one-way" {
        println!("## one way: publisher → topic (capacity 1024) → receiver");
        println!("| payload | calls | guest → guest | native → native | guest / native |");
        println!("|---|---|---|---|---|");
        for (size, batch) in [(64usize, 1u64), (64, 64), (4096, 1), (4096, 64)] {
            let count = if size == 64 { 400_000u64 } else { 200_000 };
            let g = rt.block_on(one_way_guest(&testkit, size, count, batch));
            let n = rt.block_on(one_way_native(size, count, batch as usize));
            let calls = if batch == 1 { "single".to_string() } else { format!("batch {batch}") };
            let (gm, nm) = (g / 1e6, n / 1e6);
            println!("| {size} B | {calls} | {gm:.2} M msg/s | {nm:.2} M msg/s | {:.2} |", g / n);
        }
        println!();
    }
    if only.is_empty() || only == "ping-pong" {
        println!("## ping-pong round trips over mailboxes");
        println!("| guest ↔ guest | native ↔ native | guest / native |");
        println!("|---|---|---|");
        let count = 200_000u64;
        let g = rt.block_on(ping_pong_guest(&testkit, count));
        let n = rt.block_on(ping_pong_native(count));
        println!("| {:.0} k rt/s | {:.0} k rt/s | {:.2} |", g / 1e3, n / 1e3, g / n);
    }
}

async fn one_way_guest(testkit: &WasmComponent, size: usize, count: u64, batch: u64) -> f64 {
    let orch = Orchestrator::new();
    let env = |mode: &str| {
        WasmOptions::default()
            .env("MODE", mode)
            .env("TOPIC", "bench")
            .env("SIZE", size.to_string())
            .env("COUNT", count.to_string())
            .env("BATCH", batch.to_string())
    };
    orch.bus().topic("bench", 1024).unwrap();
    let t = Instant::now();
    let rx = orch.spawn_wasm(SpawnOptions::new("drain"), testkit, env("drain")).unwrap();
    let tx = orch.spawn_wasm(SpawnOptions::new("flood"), testkit, env("flood")).unwrap();
    tx.wait().await;
    rx.wait().await;
    let rate = count as f64 / t.elapsed().as_secs_f64();
    orch.shutdown(Duration::from_secs(2)).await;
    rate
}

async fn one_way_native(size: usize, count: u64, batch: usize) -> f64 {
    let orch = Orchestrator::new();
    orch.bus().topic("bench", 1024).unwrap();
    let t = Instant::now();
    let rx = orch
        .spawn(SpawnOptions::new("drain"), move |ctx| async move {
            let mut left = count as usize;
            while left > 0 {
                if batch == 1 {
                    ctx.bus_recv("bench", None).await?;
                    left -= 1;
                } else {
                    left -= ctx.bus_recv_batch("bench", batch.min(left), None).await?.len();
                }
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    let tx = orch
        .spawn(SpawnOptions::new("flood"), move |ctx| async move {
            let mut left = count as usize;
            while left > 0 {
                if batch == 1 {
                    ctx.publish("bench", vec![7u8; size]).await?;
                    left -= 1;
                } else {
                    let n = batch.min(left);
                    ctx.publish_batch("bench", vec![vec![7u8; size]; n]).await?;
                    left -= n;
                }
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    tx.wait().await;
    rx.wait().await;
    let rate = count as f64 / t.elapsed().as_secs_f64();
    orch.shutdown(Duration::from_secs(2)).await;
    rate
}

async fn ping_pong_guest(testkit: &WasmComponent, count: u64) -> f64 {
    let orch = Orchestrator::new();
    let pong = orch
        .spawn_wasm(SpawnOptions::new("pong"), testkit, WasmOptions::default().env("MODE", "pong"))
        .unwrap();
    while pong.state() != gorch_host::State::Running {
        tokio::task::yield_now().await;
    }
    let t = Instant::now();
    let ping = orch
        .spawn_wasm(
            SpawnOptions::new("ping"),
            testkit,
            WasmOptions::default().env("MODE", "ping").env("COUNT", count.to_string()),
        )
        .unwrap();
    ping.wait().await;
    let rate = count as f64 / t.elapsed().as_secs_f64();
    orch.shutdown(Duration::from_secs(2)).await;
    rate
}

async fn ping_pong_native(count: u64) -> f64 {
    let orch = Orchestrator::new();
    orch.spawn(SpawnOptions::new("pong"), |ctx| async move {
        while let Some(m) = ctx.recv(None).await? {
            ctx.send("ping", m).await?;
        }
        Ok::<(), CallError>(())
    })
    .unwrap();
    let t = Instant::now();
    let ping = orch
        .spawn(SpawnOptions::new("ping"), move |ctx| async move {
            for _ in 0..count {
                ctx.send("pong", b"ping".to_vec()).await?;
                ctx.recv(None).await?;
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    ping.wait().await;
    let rate = count as f64 / t.elapsed().as_secs_f64();
    orch.shutdown(Duration::from_secs(2)).await;
    rate
}
