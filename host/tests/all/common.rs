//! Helpers shared by the test modules: the engine and guests (compiled once per binary), a
//! runtime like the binary's, polling with deadlines, and the leaked-task check.

use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gorch_host::{
    Orchestrator, RoutineHandle, SpawnOptions, WasmComponent, WasmEngine, WasmOptions,
};

/// One engine for the whole test binary (its epoch ticker is a plain thread).
pub fn engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        WasmEngine::new(gorch_host::EngineConfig { pool_size: 200, ..Default::default() })
            .expect("engine")
    })
}

/// The `testkit` guest, compiled once.
pub fn testkit() -> &'static WasmComponent {
    static C: OnceLock<WasmComponent> = OnceLock::new();
    C.get_or_init(|| engine().load_file(gorch_artifacts::path("testkit")).expect("testkit"))
}

/// The `testkit` guest compiled for `metering = "time"` (the engine without fuel), once.
pub fn testkit_time() -> &'static WasmComponent {
    static C: OnceLock<WasmComponent> = OnceLock::new();
    C.get_or_init(|| {
        engine()
            .load_file_metered(gorch_artifacts::path("testkit"), gorch_host::Metering::Time)
            .expect("testkit for time metering")
    })
}

/// Spawns the testkit guest in `mode`.
pub fn spawn_mode(orch: &Orchestrator, opts: SpawnOptions, mode: &str) -> RoutineHandle {
    spawn_mode_with(orch, opts, mode, WasmOptions::default())
}

/// Spawns the testkit guest in `mode` with extra wasm options.
pub fn spawn_mode_with(
    orch: &Orchestrator,
    opts: SpawnOptions,
    mode: &str,
    wasm: WasmOptions,
) -> RoutineHandle {
    orch.spawn_wasm(opts, testkit(), wasm.env("MODE", mode)).expect("spawn")
}

/// Runs `f` on a 2-thread runtime built like the binary's, then checks that the test left
/// no tokio task alive (the goleak idea).
pub fn run<F: Future>(f: F) -> F::Output {
    let rt = gorch_host::runtime_builder().worker_threads(2).build().expect("runtime");
    rt.block_on(async {
        let out = f.await;
        assert_no_leaked_tasks().await;
        out
    })
}

/// Runs `f` on a current-thread runtime with paused time: sleeps advance the clock
/// instantly when every task is idle, so backoff sequences are exact and tests fast.
pub fn run_paused<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let out = f.await;
        assert_no_leaked_tasks().await;
        out
    })
}

/// Polls `cond` in paused time (each step advances the clock 1 ms), up to a minute.
pub async fn wait_until_paused(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..60_000 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

/// Waits (with a deadline) until the runtime has no alive task but the caller.
pub async fn assert_no_leaked_tasks() {
    let handle = tokio::runtime::Handle::current();
    let ok = wait_until(Duration::from_secs(5), || handle.metrics().num_alive_tasks() == 0).await;
    assert!(ok, "leaked tasks: {} still alive", handle.metrics().num_alive_tasks());
}

/// Polls `cond` every few milliseconds until it holds or `within` passes.
pub async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits for the routine to end, failing the test after `within`.
pub async fn wait_end(h: &RoutineHandle, within: Duration) -> gorch_host::State {
    tokio::time::timeout(within, h.wait()).await.unwrap_or_else(|_| {
        panic!("{} did not end within {within:?}: {:?}", h.name(), h.snapshot())
    })
}

/// The last error of a finished routine, from the orchestrator's history.
pub fn last_error(orch: &Orchestrator, name: &str) -> String {
    orch.history()
        .into_iter()
        .rev()
        .find(|s| s.name == name)
        .and_then(|s| s.last_error)
        .unwrap_or_default()
}

/// Shuts down with a generous bound and checks that nothing was left running.
pub async fn shutdown(orch: &Orchestrator) {
    let r = orch.shutdown(Duration::from_secs(5)).await;
    assert!(r.unstoppable.is_empty(), "unstoppable: {:?}", r.unstoppable);
}

/// Restarts on failure after an hour of backoff: a failed routine stays in `BACKOFF` (for
/// tests of what cuts a backoff short).
pub fn hour_backoff() -> gorch_host::Supervision {
    gorch_host::Supervision {
        restart: gorch_host::RestartPolicy::OnFailure,
        backoff: gorch_host::Backoff {
            initial: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
            ..Default::default()
        },
        ..Default::default()
    }
}
