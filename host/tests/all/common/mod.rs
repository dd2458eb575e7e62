//! Helpers shared by the test modules: the engine and guests (compiled once per binary), a
//! runtime like the binary's, polling with deadlines, and the leaked-task check; by concern
//! in the submodules: the real binary ([`host`]), the observability router in-process
//! ([`http`]), the repository's files and FIFOs ([`fs`]), guests the tests build
//! ([`guests`]). A test module takes its helpers from here, never from another test module.

pub mod fs;
pub mod guests;
pub mod host;
pub mod http;
pub mod nats;

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

/// Held by the tests that load the machine for long (building and compiling Python and
/// JavaScript components, a three-server NATS cluster with replicated streams), so that no
/// two of them run at once on a 2-core machine: beside a Python compile, a replicated
/// stream took over a minute to move 300 messages.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
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

/// [`wait_until`] for a thread outside the runtime (a test driving processes, or a runtime
/// it enters with `block_on`): polls `cond` every 20 ms until it holds or `within` passes.
pub fn wait_until_blocking(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
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

/// Zero backoff, restart on failure, `max_deliveries` deliveries before `dead-letter`.
pub fn restart_at_once(max_deliveries: u32) -> gorch_host::Supervision {
    gorch_host::Supervision {
        restart: gorch_host::RestartPolicy::OnFailure,
        backoff: gorch_host::Backoff {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            multiplier: 1.0,
            jitter: 0.0,
            stable_after: Duration::from_secs(30),
        },
        max_deliveries,
        ..Default::default()
    }
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

/// Runs `f` with a fmt subscriber like the binary's (no colours), filtered by `filter` (an
/// `EnvFilter` directive such as `info`), as the thread's default; returns `f`'s result and
/// the log it wrote.
///
/// Tests run in parallel, some with a scoped subscriber and most without, and tracing caches
/// per call site, for the whole process, whether any subscriber wants it: when a call site
/// is first hit on a thread with no subscriber while only one scoped subscriber exists,
/// tracing asks that thread's (none) and caches "never", and the site stays silent for every
/// test until the next subscriber is created (seen as a guest's stdout lines missing from
/// one test's log under load). A subscriber that lives as long as the binary and wants every
/// call site keeps each one at "ask the current subscriber"; each test's own still filters.
pub fn capture_log<T>(filter: &str, f: impl FnOnce() -> T) -> (T, String) {
    static KEEP_ALL_LEVELS: OnceLock<tracing::Dispatch> = OnceLock::new();
    KEEP_ALL_LEVELS.get_or_init(|| tracing::Dispatch::new(AllLevels));
    let log = Captured::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    (out, text)
}

/// The bytes a capturing subscriber writes.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A subscriber that records nothing but asks for every level (see [`capture_log`]).
struct AllLevels;

impl tracing::Subscriber for AllLevels {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
