//! Messaging between real guests: `cargo bench -p gorch-host --bench messaging`.
//! guest → topic → guest throughput for 64 B and 4 KiB payloads next to a pair of native
//! routines over the same bus, and guest ↔ guest ping-pong round trips next to native.

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
    let rt = gorch_host::runtime_builder_with_interval(interval).worker_threads(2).build().unwrap();
    println!("## one way: publisher → topic (capacity 1024) → receiver");
    println!("| payload | guest → guest | native → native | guest / native |");
    println!("|---|---|---|---|");
    for size in [64usize, 4096] {
        let count = if size == 64 { 400_000u64 } else { 200_000 };
        let g = rt.block_on(one_way_guest(&testkit, size, count));
        let n = rt.block_on(one_way_native(size, count));
        println!("| {size} B | {:.2} M msg/s | {:.2} M msg/s | {:.2} |", g / 1e6, n / 1e6, g / n);
    }
    println!();
    println!("## ping-pong round trips over mailboxes");
    println!("| guest ↔ guest | native ↔ native | guest / native |");
    println!("|---|---|---|");
    let count = 200_000u64;
    let g = rt.block_on(ping_pong_guest(&testkit, count));
    let n = rt.block_on(ping_pong_native(count));
    println!("| {:.0} k rt/s | {:.0} k rt/s | {:.2} |", g / 1e3, n / 1e3, g / n);
}

async fn one_way_guest(testkit: &WasmComponent, size: usize, count: u64) -> f64 {
    let orch = Orchestrator::new();
    let env = |mode: &str| {
        WasmOptions::default()
            .env("MODE", mode)
            .env("TOPIC", "bench")
            .env("SIZE", size.to_string())
            .env("COUNT", count.to_string())
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

async fn one_way_native(size: usize, count: u64) -> f64 {
    let orch = Orchestrator::new();
    orch.bus().topic("bench", 1024).unwrap();
    let t = Instant::now();
    let rx = orch
        .spawn(SpawnOptions::new("drain"), move |ctx| async move {
            for _ in 0..count {
                ctx.bus_recv("bench", None).await?;
            }
            Ok::<(), CallError>(())
        })
        .unwrap();
    let tx = orch
        .spawn(SpawnOptions::new("flood"), move |ctx| async move {
            for _ in 0..count {
                ctx.publish("bench", vec![7u8; size]).await?;
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
