//! Runtime benchmarks (a bench binary, `cargo bench -p gorch-host --bench runtime`):
//! timer lateness under spinning guests, restart latency, stop latency of a `loop {}` guest,
//! spawn cost against raw wasmtime. Each figure is measured next to its baseline in the same
//! run; BENCHMARKS.md records the numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use gorch_host::{
    Backoff, Intensity, Orchestrator, RestartPolicy, SpawnOptions, State, Supervision, WasmEngine,
    WasmOptions, example_guests,
};

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let engine = WasmEngine::new(Default::default()).expect("engine");
    let testkit = engine.load_file(example_guests::path("testkit")).expect("testkit");
    println!("machine: {} cores; epoch tick {:?}", num_cpus(), gorch_host::DEFAULT_EPOCH_TICK);
    println!();
    if std::env::args().any(|a| a == "--spawn") {
        spawn_cost(&engine, &testkit);
        return;
    }
    if std::env::args().any(|a| a == "--quick") {
        restart_latency(&testkit);
        return;
    }
    timer_lateness(&testkit);
    stop_latency(&testkit);
    restart_latency(&testkit);
    spawn_cost(&engine, &testkit);
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// How late a 5 ms tokio timer fires while N guests spin in `loop {}` on a 2-thread runtime,
/// with gorch-host's event interval (1) and tokio's default (61).
fn timer_lateness(testkit: &gorch_host::WasmComponent) {
    println!("## timer lateness: 5 ms sleep, 200 samples, 2 worker threads");
    println!("| spinners | event_interval | p50 late | p99 late | max late |");
    println!("|---|---|---|---|---|");
    for spinners in [0usize, 2, 8] {
        for interval in [gorch_host::EVENT_INTERVAL, 61] {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .event_interval(interval)
                .build()
                .unwrap();
            let mut late = rt.block_on(async {
                let orch = Orchestrator::new();
                for i in 0..spinners {
                    orch.spawn_wasm(
                        SpawnOptions::new(format!("spin-{i}")),
                        testkit,
                        WasmOptions::default().env("MODE", "spin"),
                    )
                    .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                // Measured from a task like any other routine, not from block_on's thread.
                let samples = tokio::spawn(async {
                    let mut v = Vec::new();
                    for _ in 0..200 {
                        let t = Instant::now();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        v.push(t.elapsed().saturating_sub(Duration::from_millis(5)));
                    }
                    v
                })
                .await
                .unwrap();
                orch.shutdown(Duration::from_secs(2)).await;
                samples
            });
            let p50 = percentile(&mut late, 0.5);
            let p99 = percentile(&mut late, 0.99);
            let max = *late.iter().max().unwrap();
            println!("| {spinners} | {interval} | {p50:.2?} | {p99:.2?} | {max:.2?} |");
        }
    }
    println!();
}

/// From `kill_now()` to the end of a guest spinning in `loop {}`, against the epoch tick.
fn stop_latency(testkit: &gorch_host::WasmComponent) {
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    let mut v = rt.block_on(async {
        let orch = Orchestrator::new();
        let mut v = Vec::new();
        for i in 0..50 {
            let h = orch
                .spawn_wasm(
                    SpawnOptions::new(format!("spin-{i}")),
                    testkit,
                    WasmOptions::default().env("MODE", "spin"),
                )
                .unwrap();
            while h.snapshot().fuel_consumed == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t = Instant::now();
            h.kill_now();
            h.wait().await;
            v.push(t.elapsed());
        }
        orch.shutdown(Duration::from_secs(2)).await;
        v
    });
    let tick = gorch_host::DEFAULT_EPOCH_TICK;
    let p50 = percentile(&mut v, 0.5);
    let max = *v.iter().max().unwrap();
    println!("## stop latency of a loop {{}} guest (kill_now → ended), 50 runs");
    println!("| p50 | max | epoch tick | max / tick |");
    println!("|---|---|---|---|");
    println!(
        "| {p50:.2?} | {max:.2?} | {tick:?} | {:.2} |",
        max.as_secs_f64() / tick.as_secs_f64()
    );
    println!();
}

/// Crash → running again with zero backoff: native and wasm (a trap, a fresh instance).
fn restart_latency(testkit: &gorch_host::WasmComponent) {
    let zero = Supervision {
        restart: RestartPolicy::Always,
        backoff: Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            multiplier: 1.0,
            jitter: 0.0,
            stable_after: Duration::from_secs(3600),
        },
        intensity: Intensity { max_restarts: 1_000_000, within: Duration::from_secs(3600) },
        max_deliveries: 3,
    };
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    println!("## restart latency (end of a run → next run started, zero backoff)");
    println!("| routine | restarts | mean per restart |");
    println!("|---|---|---|");
    rt.block_on(async {
        let orch = Orchestrator::new();
        // Native: each run fails at once; measures the supervisor loop.
        let n = 20_000u64;
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        let t = Instant::now();
        let h = orch
            .spawn(SpawnOptions::new("native").supervision(zero.clone()), move |_| {
                let c = c.clone();
                async move {
                    if c.fetch_add(1, Relaxed) + 1 >= n {
                        std::future::pending::<()>().await;
                    }
                    Err::<(), _>("fail")
                }
            })
            .unwrap();
        while count.load(Relaxed) < n {
            tokio::task::yield_now().await;
        }
        let per = t.elapsed() / n as u32;
        println!("| native (fails at once) | {} | {per:.2?} |", h.restarts());
        h.kill_now();
        h.wait().await;

        // Wasm: the guest panics at once; each restart instantiates a fresh instance.
        let n = 2_000u64;
        let t = Instant::now();
        let h = orch
            .spawn_wasm(
                SpawnOptions::new("wasm").supervision(zero.clone()),
                testkit,
                WasmOptions::default().env("MODE", "panic"),
            )
            .unwrap();
        while h.restarts() < n {
            tokio::task::yield_now().await;
        }
        let per = t.elapsed() / n as u32;
        println!(
            "| wasm (traps at once; includes the trap and a new instance) | {n} | {per:.2?} |"
        );
        h.kill_now();
        assert!(matches!(h.wait().await, State::Stopped));
        orch.shutdown(Duration::from_secs(2)).await;
    });
    println!();
}

/// Spawn → `run` returned, for a trivial guest, sequentially: the `hello-command` WASI
/// command through the orchestrator, against raw wasmtime (`CommandPre::instantiate_async` +
/// `wasi:cli/run` on the same engine and component) in the same run; and the `testkit`
/// worker (MODE=ok) through the orchestrator.
fn spawn_cost(engine: &WasmEngine, testkit: &gorch_host::WasmComponent) {
    let hello = engine.load_file(example_guests::path("hello-command")).unwrap();
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    let n = 2_000u32;
    let through = |component: gorch_host::WasmComponent, wasm: WasmOptions| async move {
        let orch = Orchestrator::new();
        let t = Instant::now();
        for i in 0..n {
            let h = orch
                .spawn_wasm(SpawnOptions::new(format!("s{i}")), &component, wasm.clone())
                .unwrap();
            h.wait().await;
        }
        let per = t.elapsed() / n;
        orch.shutdown(Duration::from_secs(2)).await;
        per
    };
    let ours = rt.block_on(through(hello.clone(), WasmOptions::default()));
    let raw = rt.block_on(raw_spawn(engine, n));
    let worker = rt.block_on(through(testkit.clone(), WasmOptions::default().env("MODE", "ok")));
    println!("## spawn + join of a trivial guest, sequential, {n} runs");
    println!("| guest | through the orchestrator | raw wasmtime instantiate + call | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| hello-command (WASI command) | {ours:.2?} ({:.0}/s) | {raw:.2?} ({:.0}/s) | {:.2} |",
        1.0 / ours.as_secs_f64(),
        1.0 / raw.as_secs_f64(),
        ours.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "| testkit, MODE=ok (worker) | {worker:.2?} ({:.0}/s) | — | — |",
        1.0 / worker.as_secs_f64()
    );
    println!();
}

struct RawState {
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl wasmtime_wasi::WasiView for RawState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

async fn raw_spawn(engine: &WasmEngine, n: u32) -> Duration {
    use wasmtime::component::{Component, Linker};
    let engine = engine.engine();
    let bytes = std::fs::read(example_guests::path("hello-command")).unwrap();
    let component = Component::new(engine, &bytes).unwrap();
    let mut linker: Linker<RawState> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    let pre =
        wasmtime_wasi::p2::bindings::CommandPre::new(linker.instantiate_pre(&component).unwrap())
            .unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let wasi = wasmtime_wasi::WasiCtxBuilder::new().build();
        let mut store = wasmtime::Store::new(
            engine,
            RawState { wasi, table: wasmtime::component::ResourceTable::new() },
        );
        store.set_fuel(u64::MAX).unwrap();
        store.set_epoch_deadline(1_000_000);
        let command = pre.instantiate_async(&mut store).await.unwrap();
        command.wasi_cli_run().call_run(&mut store).await.unwrap().unwrap();
    }
    t.elapsed() / n
}
