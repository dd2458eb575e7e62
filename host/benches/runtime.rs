//! Runtime benchmarks (a bench binary, `cargo bench -p gorch-host --bench runtime`):
//! timer lateness under spinning guests, restart latency, stop latency of a `loop {}` guest,
//! spawn cost against raw wasmtime, the cost of fuel + epoch accounting and of
//! `metering = "time"`, and cheaper fuel settings (`--accounting`; `--no-knobs` skips the
//! settings). Each figure is measured next to its baseline in the same run; BENCHMARKS.md
//! records the numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use gorch_host::{
    Backoff, Intensity, Metering, Orchestrator, RestartPolicy, SpawnOptions, State, Supervision,
    WasmEngine, WasmOptions,
};

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let engine = WasmEngine::new(Default::default()).expect("engine");
    let testkit = engine.load_file(gorch_artifacts::path("testkit")).expect("testkit");
    println!(
        "machine: {} cores; epoch tick {:?}",
        num_cpus(),
        gorch_host::defaults::DEFAULT_EPOCH_TICK
    );
    println!();
    if let Some(dir) = std::env::args().skip_while(|a| a != "--dump-code").nth(1) {
        dump_code(&dir);
        return;
    }
    if let Some(variant) = std::env::args().skip_while(|a| a != "--profile").nth(1) {
        profile_target(&variant);
        return;
    }
    if std::env::args().any(|a| a == "--accounting") {
        accounting();
        return;
    }
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
    accounting();
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

/// From `kill()` to the end of a guest spinning in `loop {}`, against the epoch tick.
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
            while h.snapshot().fuel_consumed.unwrap() == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let t = Instant::now();
            h.kill();
            h.wait().await;
            v.push(t.elapsed());
        }
        orch.shutdown(Duration::from_secs(2)).await;
        v
    });
    let tick = gorch_host::defaults::DEFAULT_EPOCH_TICK;
    let p50 = percentile(&mut v, 0.5);
    let max = *v.iter().max().unwrap();
    println!("## stop latency of a loop {{}} guest (kill → ended), 50 runs");
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
        rollback_window: Duration::ZERO,
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
        h.kill();
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
        h.kill();
        assert!(matches!(h.wait().await, State::Stopped));
        orch.shutdown(Duration::from_secs(2)).await;
    });
    println!();
}

/// Spawn → `run` returned, for a trivial guest (P1): the `hello-command` WASI command
/// through the orchestrator, against raw wasmtime (`CommandPre::instantiate_async` +
/// `wasi:cli/run` on the same engine and component) in the same run; and the `testkit`
/// worker (MODE=ok) through the orchestrator. Sequential (spawn, wait, repeat, from a task
/// of the runtime as a supervisor or the CLI would) and in waves of 500 concurrent spawns
/// (throughput).
fn spawn_cost(engine: &WasmEngine, testkit: &gorch_host::WasmComponent) {
    let hello = engine.load_file(gorch_artifacts::path("hello-command")).unwrap();
    let interval = std::env::var("GORCH_EVENT_INTERVAL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(gorch_host::EVENT_INTERVAL);
    let rt = gorch_host::runtime_builder_with_interval(interval).worker_threads(2).build().unwrap();
    let (n, total, wave) = (2_000u32, 20_000u32, 500u32);
    let through = |component: gorch_host::WasmComponent, wasm: WasmOptions, concurrent: bool| {
        rt.block_on(async move {
            tokio::spawn(async move {
                let orch = Orchestrator::new();
                let t = Instant::now();
                let runs = if concurrent { total } else { n };
                let step = if concurrent { wave } else { 1 };
                for w in (0..runs).step_by(step as usize) {
                    let hs: Vec<_> = (w..w + step)
                        .map(|i| {
                            orch.spawn_wasm(
                                SpawnOptions::new(format!("s{i}")),
                                &component,
                                wasm.clone(),
                            )
                            .unwrap()
                        })
                        .collect();
                    for h in hs {
                        assert_eq!(h.wait().await, State::Stopped);
                    }
                }
                let per = t.elapsed() / runs;
                orch.shutdown(Duration::from_secs(2)).await;
                per
            })
            .await
            .unwrap()
        })
    };
    let raw_pre = raw_pre(engine);
    // `None`: each run inline in one task; `Some(k)`: k tasks per wave, awaited together.
    let raw = |tasks: Option<u32>| {
        let pre = raw_pre.clone();
        rt.block_on(async move {
            tokio::spawn(async move {
                let runs = if tasks.unwrap_or(1) > 1 { total } else { n };
                let t = Instant::now();
                match tasks {
                    None => {
                        for _ in 0..runs {
                            raw_run(pre.clone()).await;
                        }
                    }
                    Some(k) => {
                        for _ in (0..runs).step_by(k as usize) {
                            let wave: Vec<_> =
                                (0..k).map(|_| tokio::spawn(raw_run(pre.clone()))).collect();
                            for task in wave {
                                task.await.unwrap();
                            }
                        }
                    }
                }
                t.elapsed() / runs
            })
            .await
            .unwrap()
        })
    };
    let ok = WasmOptions::default().env("MODE", "ok");
    let rows = [
        (
            "sequential spawn + join",
            through(hello.clone(), WasmOptions::default(), false),
            raw(None),
        ),
        (
            "waves of 500 concurrent spawns",
            through(hello.clone(), WasmOptions::default(), true),
            raw(Some(wave)),
        ),
    ];
    let raw_task = raw(Some(1));
    let worker_seq = through(testkit.clone(), ok.clone(), false);
    let worker_conc = through(testkit.clone(), ok, true);
    println!("## spawn → run returned, trivial guest ({n} sequential, {total} concurrent)");
    println!(
        "| how | hello-command through the orchestrator | raw wasmtime instantiate + call | ratio | testkit worker (MODE=ok) |"
    );
    println!("|---|---|---|---|---|");
    for ((how, ours, raw), worker) in rows.into_iter().zip([worker_seq, worker_conc]) {
        println!(
            "| {how} | {ours:.2?} ({:.0}/s) | {raw:.2?} ({:.0}/s) | {:.2} | {worker:.2?} ({:.0}/s) |",
            1.0 / ours.as_secs_f64(),
            1.0 / raw.as_secs_f64(),
            ours.as_secs_f64() / raw.as_secs_f64(),
            1.0 / worker.as_secs_f64(),
        );
    }
    println!(
        "\nRaw wasmtime in a fresh tokio task per run (spawn + await), sequential: \
         {raw_task:.2?} ({:.0}/s), {:.2}x raw: what being a task costs, without the orchestrator.",
        1.0 / raw_task.as_secs_f64(),
        raw_task.as_secs_f64() / rows[0].2.as_secs_f64()
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

type RawPre = wasmtime_wasi::p2::bindings::CommandPre<RawState>;

fn raw_pre(engine: &WasmEngine) -> RawPre {
    use wasmtime::component::{Component, Linker};
    let engine = engine.engine();
    let bytes = std::fs::read(gorch_artifacts::path("hello-command")).unwrap();
    let component = Component::new(engine, &bytes).unwrap();
    let mut linker: Linker<RawState> = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    wasmtime_wasi::p2::bindings::CommandPre::new(linker.instantiate_pre(&component).unwrap())
        .unwrap()
}

/// One raw run: store, instantiate, call `wasi:cli/run`.
async fn raw_run(pre: RawPre) {
    let wasi = wasmtime_wasi::WasiCtxBuilder::new().build();
    let mut store = wasmtime::Store::new(
        pre.engine(),
        RawState { wasi, table: wasmtime::component::ResourceTable::new() },
    );
    store.set_fuel(u64::MAX).unwrap();
    store.set_epoch_deadline(1_000_000);
    let command = pre.instantiate_async(&mut store).await.unwrap();
    command.wasi_cli_run().call_run(&mut store).await.unwrap().unwrap();
}

/// One way of running the compute workloads: an engine (its settings), the testkit
/// loaded on it for a metering, and the wasm options that go with that metering.
struct Variant {
    label: String,
    _engine: WasmEngine,
    testkit: gorch_host::WasmComponent,
    metering: Metering,
}

impl Variant {
    fn new(label: &str, config: gorch_host::EngineConfig, metering: Metering) -> Variant {
        let engine = WasmEngine::new(config).unwrap();
        let testkit = engine.load_file_metered(gorch_artifacts::path("testkit"), metering).unwrap();
        Variant { label: label.to_string(), _engine: engine, testkit, metering }
    }
}

fn engine_with(fuel: bool, epochs: bool) -> gorch_host::EngineConfig {
    gorch_host::EngineConfig { fuel, epochs, ..Default::default() }
}

/// Compute-bound guests through the orchestrator (P5): engines that differ only in fuel
/// metering and epoch interruption, next to the real `metering = "time"` path (the default
/// engine's second engine, without fuel, through `spawn_wasm` with `Metering::Time`). Then
/// cheaper fuel settings, each next to the same baseline. Median of 5 runs each,
/// interleaved; each run is spawn → end of a fresh instance.
fn accounting() {
    let main = vec![
        Variant::new("neither", engine_with(false, false), Metering::Fuel),
        Variant::new("epochs only", engine_with(false, true), Metering::Fuel),
        Variant::new("fuel only", engine_with(true, false), Metering::Fuel),
        Variant::new("fuel + epochs (default)", engine_with(true, true), Metering::Fuel),
        Variant::new("metering = \"time\"", engine_with(true, true), Metering::Time),
    ];
    println!("## accounting overhead: compute-bound guests, median of 5 runs, spawn to end");
    accounting_table(&main, &[3, 4]);
    if std::env::args().any(|a| a == "--no-knobs") {
        return;
    }
    // Cheaper fuel: settings that wasmtime 48 offers, each against neither and the default.
    let inline = |c: &mut wasmtime::Config| {
        c.compiler_inlining(wasmtime::Inlining::Yes);
    };
    let size = |c: &mut wasmtime::Config| {
        c.cranelift_opt_level(wasmtime::OptLevel::SpeedAndSize);
    };
    let knobs = vec![
        Variant::new("neither", engine_with(false, false), Metering::Fuel),
        Variant::new("default", engine_with(true, true), Metering::Fuel),
        Variant::new(
            "yield interval off",
            gorch_host::EngineConfig { fuel_yield_interval: None, ..Default::default() },
            Metering::Fuel,
        ),
        Variant::new(
            "yield interval 100 k",
            gorch_host::EngineConfig { fuel_yield_interval: Some(100_000), ..Default::default() },
            Metering::Fuel,
        ),
        Variant::new(
            "yield interval 100 M",
            gorch_host::EngineConfig {
                fuel_yield_interval: Some(100_000_000),
                ..Default::default()
            },
            Metering::Fuel,
        ),
        Variant::new(
            "operator_cost: control flow only",
            gorch_host::EngineConfig { tune: Some(control_flow_cost), ..Default::default() },
            Metering::Fuel,
        ),
        Variant::new(
            "compiler_inlining(Yes)",
            gorch_host::EngineConfig { tune: Some(inline), ..Default::default() },
            Metering::Fuel,
        ),
        Variant::new(
            "neither + compiler_inlining(Yes)",
            gorch_host::EngineConfig {
                fuel: false,
                epochs: false,
                tune: Some(inline),
                ..Default::default()
            },
            Metering::Fuel,
        ),
        Variant::new(
            "opt level SpeedAndSize",
            gorch_host::EngineConfig { tune: Some(size), ..Default::default() },
            Metering::Fuel,
        ),
    ];
    println!("## cheaper fuel settings (wasmtime 48), each x neither");
    accounting_table(&knobs, &[]);
}

/// An operator cost table in which only control flow that can repeat or leave the function
/// costs fuel (calls, branches, `if`): fuel then counts taken control transfers, not
/// instructions. Built through serde: `OperatorCost` has a field per operator.
fn control_flow_cost(c: &mut wasmtime::Config) {
    let mut v = serde_json::to_value(wasmtime::OperatorCost::new()).unwrap();
    let paid = ["Call", "CallIndirect", "Br", "BrIf", "BrTable", "If", "ReturnCall"];
    for (k, x) in v.as_object_mut().unwrap() {
        if x.is_number() {
            *x = serde_json::json!(u8::from(paid.contains(&k.as_str())));
        }
    }
    c.operator_cost(serde_json::from_value(v).unwrap());
}

/// Prints one table: every variant on the three workloads (median and × the first), and
/// the columns `bold` also in bold.
fn accounting_table(variants: &[Variant], bold: &[usize]) {
    let workloads: [(&str, &[(&str, &str)]); 3] = [
        ("tight loop (compute, 100M iterations)", &[("MODE", "compute"), ("ITERS", "100000000")]),
        ("calls (fib 35)", &[("MODE", "fib"), ("N", "35")]),
        ("memory + branches (sort 100k u32 x 20)", &[("MODE", "sort"), ("ROUNDS", "20")]),
    ];
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    print!("| workload |");
    for v in variants {
        print!(" {} |", v.label);
    }
    println!();
    println!("|---|{}", "---|".repeat(variants.len()));
    for (label, env) in workloads {
        let mut times = vec![Vec::new(); variants.len()];
        for _ in 0..5 {
            for (i, v) in variants.iter().enumerate() {
                let mut wasm = WasmOptions::default().metering(v.metering);
                for (k, val) in env {
                    wasm = wasm.env(*k, *val);
                }
                times[i].push(rt.block_on(async {
                    let orch = Orchestrator::new();
                    let t = Instant::now();
                    let h = orch.spawn_wasm(SpawnOptions::new("acct"), &v.testkit, wasm).unwrap();
                    assert_eq!(h.wait().await, State::Stopped);
                    let took = t.elapsed();
                    orch.shutdown(Duration::from_secs(1)).await;
                    took
                }));
            }
        }
        let med: Vec<Duration> = times.iter_mut().map(|v| percentile(v, 0.5)).collect();
        print!("| {label} |");
        for (i, m) in med.iter().enumerate() {
            let r = m.as_secs_f64() / med[0].as_secs_f64();
            if bold.contains(&i) {
                print!(" {m:.1?} (**{r:.2}x**) |");
            } else {
                print!(" {m:.1?} ({r:.2}x) |");
            }
        }
        println!();
    }
    println!();
}

/// A target for `perf record` (`-- --profile neither|default|time [MODE]`): runs one
/// compute workload (default `fib`) 20 times on that variant, with wasmtime writing
/// `/tmp/perf-PID.map` so that perf names the guest's functions.
fn profile_target(variant: &str) {
    let perfmap = |c: &mut wasmtime::Config| {
        c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    };
    let (fuel, epochs, metering) = match variant {
        "neither" => (false, false, Metering::Fuel),
        "default" => (true, true, Metering::Fuel),
        "time" => (true, true, Metering::Time),
        other => panic!("--profile neither|default|time, not {other}"),
    };
    let config =
        gorch_host::EngineConfig { fuel, epochs, tune: Some(perfmap), ..Default::default() };
    let v = Variant::new(variant, config, metering);
    let mode = std::env::args().skip_while(|a| a != "--profile").nth(2).unwrap_or("fib".into());
    let rt = gorch_host::runtime_builder().worker_threads(2).build().unwrap();
    let t = Instant::now();
    for _ in 0..20 {
        let wasm = WasmOptions::default()
            .metering(metering)
            .env("MODE", mode.as_str())
            .env("N", "35")
            .env("ITERS", "100000000")
            .env("ROUNDS", "20");
        rt.block_on(async {
            let orch = Orchestrator::new();
            let h = orch.spawn_wasm(SpawnOptions::new("prof"), &v.testkit, wasm).unwrap();
            assert_eq!(h.wait().await, State::Stopped);
            orch.shutdown(Duration::from_secs(1)).await;
        });
    }
    println!("{variant} {mode}: 20 runs in {:.2?}", t.elapsed());
}

/// Writes the testkit compiled with and without fuel + epochs (ELF files, for `objdump -d`)
/// to `dir`: how the accounting overhead of BENCHMARKS.md was explained.
fn dump_code(dir: &str) {
    let bytes = std::fs::read(gorch_artifacts::path("testkit")).unwrap();
    for (name, on) in [("neither", false), ("fuel-epochs", true)] {
        let engine = WasmEngine::new(gorch_host::EngineConfig {
            fuel: on,
            epochs: on,
            ..Default::default()
        })
        .unwrap();
        let code = engine.engine().precompile_component(&bytes).unwrap();
        let path = std::path::Path::new(dir).join(format!("testkit-{name}.cwasm"));
        std::fs::write(&path, code).unwrap();
        println!("wrote {}", path.display());
    }
}
