//! The wasm runtime: one [`WasmEngine`] (wasmtime engine with fuel and epochs, an epoch
//! ticker thread, the linker with the WIT host side and a deny-by-default WASI), one
//! [`WasmComponent`] per loaded file (its `InstancePre`), and one `Store` per running
//! instance, driven as a tokio task by the orchestrator.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable, types::ComponentItem};
use wasmtime::{
    CallHook, Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter,
    Store, Trap, UpdateDeadline, WasmBacktrace,
};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cache::{CacheStatus, CompileCache};
use crate::orchestrator::{Orchestrator, Outcome, SpawnError, SpawnOptions, Work};
use crate::routine::{CallError, RoutineContext, RoutineHandle};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "worker",
        imports: {
            "gorch:worker/runtime.sleep": async | trappable,
            "gorch:worker/mailbox": async | trappable,
            "gorch:worker/bus": async | trappable,
            default: trappable,
        },
        exports: { default: async },
    });
}

use bindings::gorch::worker::{bus as wit_bus, mailbox as wit_mailbox, runtime, types};

/// Default epoch tick: the time slice of a CPU-bound guest, and the resolution of kills.
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(5);
/// Default linear memory limit per instance (64 MiB).
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;
/// Default wasm stack limit per instance (512 KiB, wasmtime's default).
pub const DEFAULT_MAX_WASM_STACK: usize = 512 << 10;
/// Default virtual reservation per linear memory (4 GiB: no bounds checks in compiled code).
pub const DEFAULT_MEMORY_RESERVATION: u64 = 4 << 30;
/// Default number of concurrent instances the pooling allocator reserves room for.
pub const DEFAULT_POOL_SIZE: u32 = 1000;
/// Bytes of each pooled memory and table reset with memset instead of madvise when an
/// instance ends.
const POOL_KEEP_RESIDENT: usize = 64 << 10;
/// Freed pool slots decommitted together (one TLB shootdown for the batch).
const POOL_DECOMMIT_BATCH: usize = 64;
/// Fuel between two forced write-backs of the fuel counter (a yield point): bounds how
/// much of a killed instance's fuel can go unrecorded, at a negligible cost.
pub const FUEL_YIELD_INTERVAL: u64 = 1_000_000;
/// How many bytes of a guest's stderr are kept to explain a trap.
const STDERR_TAIL: usize = 4096;

/// Why a component could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not WebAssembly at all.
    #[error("{path}: not a WebAssembly file (bad magic number)")]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    /// The file is a core wasm module, not a component.
    #[error(
        "{path}: is a core wasm module, not a component (build it with `--target wasm32-wasip2`)"
    )]
    CoreModule {
        /// The file.
        path: PathBuf,
    },
    /// wasmtime could not compile it.
    #[error("{path}: cannot compile: {message}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// wasmtime's explanation.
        message: String,
    },
    /// It does not fit the `gorch:worker/worker` world nor is a WASI command.
    #[error("{path}: {message}")]
    WrongWorld {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
}

/// Settings of the [`WasmEngine`]. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Epoch tick ([`DEFAULT_EPOCH_TICK`]): a spinning guest yields every tick, a killed one
    /// dies at the next.
    pub epoch_tick: Duration,
    /// Use the pooling allocator (default true); falls back to on-demand allocation if its
    /// reservation fails.
    pub pooling: bool,
    /// Concurrent instances the pool has room for ([`DEFAULT_POOL_SIZE`]).
    pub pool_size: u32,
    /// Wasm stack limit per instance ([`DEFAULT_MAX_WASM_STACK`]).
    pub max_wasm_stack: usize,
    /// Virtual address space reserved per linear memory ([`DEFAULT_MEMORY_RESERVATION`]),
    /// also the largest memory a pooled instance can grow to. With 4 GiB compiled code needs
    /// no bounds checks; smaller values (64 MiB, say) fit 100,000 pooled instances in the
    /// address space at the cost of explicit bounds checks. Nothing is committed up front.
    /// A memory limit above it (`limits.memory`) cannot be reached.
    pub memory_reservation: u64,
    /// Directory of the compiled-component cache (see [`CompileCache`]); `None` (the
    /// library's default) compiles every load. The CLI uses [`CompileCache::default_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Fuel metering (default true). Only for measuring its cost: without it
    /// `fuelConsumed` stays 0 and fuel limits do nothing.
    #[doc(hidden)]
    pub fuel: bool,
    /// Epoch interruption (default true). Only for measuring its cost: without it a
    /// spinning guest can be neither time-sliced nor killed.
    #[doc(hidden)]
    pub epochs: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            epoch_tick: DEFAULT_EPOCH_TICK,
            pooling: true,
            pool_size: DEFAULT_POOL_SIZE,
            max_wasm_stack: DEFAULT_MAX_WASM_STACK,
            memory_reservation: DEFAULT_MEMORY_RESERVATION,
            cache_dir: None,
            fuel: true,
            epochs: true,
        }
    }
}

struct EngineInner {
    engine: Engine,
    linker: Linker<HostState>,
    pooling: bool,
    cache: Option<CompileCache>,
    ticker_stop: Arc<AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Relaxed);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The wasmtime engine, its epoch ticker and the linker that every component shares.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use gorch_host::{Orchestrator, SpawnOptions, WasmEngine, WasmOptions};
/// let engine = WasmEngine::new(Default::default())?;
/// let ticker = engine.load_file("examples/plugins/ticker.wasm")?;
/// let orch = Orchestrator::new();
/// let h = orch.spawn_wasm(SpawnOptions::new("ticker"), &ticker, WasmOptions::default())?;
/// h.kill();
/// h.wait().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WasmEngine {
    inner: Arc<EngineInner>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine").field("pooling", &self.inner.pooling).finish()
    }
}

impl WasmEngine {
    /// Builds the engine (pooling allocator if possible), the linker, and starts the epoch
    /// ticker thread (stopped when the last clone of the engine is dropped).
    pub fn new(config: EngineConfig) -> anyhow::Result<Self> {
        let (engine, pooling) = if config.pooling {
            match Engine::new(&wasmtime_config(&config, true)) {
                Ok(e) => (e, true),
                Err(e) => {
                    tracing::warn!(
                        "pooling allocator unavailable ({e}); using on-demand allocation"
                    );
                    (Engine::new(&wasmtime_config(&config, false))?, false)
                }
            }
        } else {
            (Engine::new(&wasmtime_config(&config, false))?, false)
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Worker::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new().name("gorch-epoch".into()).spawn(move || {
                while !stop.load(Relaxed) {
                    std::thread::park_timeout(tick);
                    engine.increment_epoch();
                }
            })?
        };
        Ok(WasmEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                pooling,
                cache: config.cache_dir.map(CompileCache::new),
                ticker_stop,
                ticker: Some(ticker),
            }),
        })
    }

    /// Whether the pooling allocator is in use.
    pub fn is_pooling(&self) -> bool {
        self.inner.pooling
    }

    /// The compile cache's directory, if the engine has one.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.cache.as_ref().map(|c| c.dir())
    }

    /// The underlying wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// Loads and compiles a component file and checks it against the `gorch:worker/worker`
    /// world (or the WASI command world).
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<WasmComponent, LoadError> {
        let path = path.as_ref();
        let bytes =
            std::fs::read(path).map_err(|source| LoadError::Io { path: path.into(), source })?;
        self.load_bytes(path, &bytes)
    }

    /// Like [`load_file`](Self::load_file), from bytes; `path` names them in errors.
    pub fn load_bytes(
        &self,
        path: impl AsRef<Path>,
        bytes: &[u8],
    ) -> Result<WasmComponent, LoadError> {
        let path = path.as_ref().to_path_buf();
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
            return Err(LoadError::NotWasm { path });
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule { path });
        }
        let engine = &self.inner.engine;
        let (component, cache) = match &self.inner.cache {
            Some(cache) => cache.load(engine, bytes, &path),
            None => Component::new(engine, bytes).map(|c| (c, CacheStatus::Off)),
        }
        .map_err(|e| LoadError::Compile { path: path.clone(), message: format!("{e:#}") })?;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine).map(|(n, e)| describe(n, &e.ty)).collect();
        let exports: Vec<String> = ty.exports(engine).map(|(n, e)| describe(n, &e.ty)).collect();
        let has_run = ty.get_export(engine, "run").is_some();
        let has_cli_run = ty.exports(engine).any(|(n, _)| n.starts_with("wasi:cli/run@0.2"));
        let wrong = |message: String| LoadError::WrongWorld { path: path.clone(), message };
        let pre = self
            .inner
            .linker
            .instantiate_pre(&component)
            .map_err(|e| wrong(format!("imports do not fit the host: {e:#}")))?;
        let kind =
            if has_run {
                Kind::Worker(bindings::WorkerPre::new(pre).map_err(|e| {
                    wrong(format!("does not fit the gorch:worker/worker world: {e:#}"))
                })?)
            } else if has_cli_run {
                Kind::Command(wasmtime_wasi::p2::bindings::CommandPre::new(pre).map_err(|e| {
                    wrong(format!("does not fit the wasi:cli/command world: {e:#}"))
                })?)
            } else {
                return Err(wrong(
                    "exports neither `run` (world gorch:worker/worker) nor `wasi:cli/run`".into(),
                ));
            };
        Ok(WasmComponent {
            inner: Arc::new(ComponentInner {
                engine: self.inner.clone(),
                path,
                kind,
                imports,
                exports,
                cache,
            }),
        })
    }
}

fn describe(name: &str, item: &ComponentItem) -> String {
    let kind = match item {
        ComponentItem::ComponentFunc(_) => "func",
        ComponentItem::CoreFunc(_) => "core func",
        ComponentItem::Module(_) => "module",
        ComponentItem::Component(_) => "component",
        ComponentItem::ComponentInstance(_) => "instance",
        ComponentItem::Type(_) => "type",
        ComponentItem::Resource(_) => "resource",
    };
    format!("{kind} {name}")
}

fn wasmtime_config(c: &EngineConfig, pooling: bool) -> Config {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    cfg.consume_fuel(c.fuel);
    cfg.epoch_interruption(c.epochs);
    cfg.max_wasm_stack(c.max_wasm_stack);
    cfg.async_stack_size(c.max_wasm_stack + (1 << 20));
    cfg.memory_init_cow(true);
    cfg.memory_reservation(c.memory_reservation);
    if pooling {
        let n = c.pool_size.max(1);
        let mut p = PoolingAllocationConfig::new();
        p.total_component_instances(n);
        p.total_core_instances(n.saturating_mul(8));
        p.max_core_instances_per_component(32);
        p.total_memories(n.saturating_mul(2));
        p.max_memories_per_component(4);
        p.total_tables(n.saturating_mul(4));
        p.max_tables_per_component(8);
        p.total_stacks(n);
        p.max_memory_size(c.memory_reservation as usize);
        // Reset a freed slot with memset rather than madvise (which page-faults the next
        // instance in again and makes the kernel shoot down TLBs on every core), and batch
        // the madvise calls that remain: the two largest costs of a short-lived instance.
        p.linear_memory_keep_resident(POOL_KEEP_RESIDENT);
        p.table_keep_resident(POOL_KEEP_RESIDENT);
        p.decommit_batch_size(POOL_DECOMMIT_BATCH);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(p));
    }
    cfg
}

enum Kind {
    Worker(bindings::WorkerPre<HostState>),
    Command(wasmtime_wasi::p2::bindings::CommandPre<HostState>),
}

struct ComponentInner {
    // Keeps the engine (and its epoch ticker) alive while the component is.
    engine: Arc<EngineInner>,
    path: PathBuf,
    kind: Kind,
    imports: Vec<String>,
    exports: Vec<String>,
    cache: CacheStatus,
}

/// A compiled, linked component, ready to instantiate any number of times.
#[derive(Clone)]
pub struct WasmComponent {
    inner: Arc<ComponentInner>,
}

impl std::fmt::Debug for WasmComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmComponent").field("path", &self.inner.path).finish()
    }
}

impl WasmComponent {
    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// True for a plain WASI command (exports `wasi:cli/run`).
    pub fn is_command(&self) -> bool {
        matches!(self.inner.kind, Kind::Command(_))
    }
    /// Its imports, as `kind name` lines.
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }
    /// Its exports, as `kind name` lines.
    pub fn exports(&self) -> &[String] {
        &self.inner.exports
    }
    /// Whether it was compiled or came from the compile cache.
    pub fn cache_status(&self) -> CacheStatus {
        self.inner.cache
    }
}

/// Per-instance settings of a wasm routine (the `[limits]` and `[wasi]` manifest tables).
#[derive(Debug, Clone)]
pub struct WasmOptions {
    /// Linear memory limit in bytes ([`DEFAULT_MEMORY_LIMIT`]).
    pub memory: u64,
    /// Fuel per run; 0 means unlimited (the default).
    pub fuel: u64,
    /// Environment variables the guest sees (none by default).
    pub env: Vec<(String, String)>,
    /// Arguments the guest sees (none by default).
    pub args: Vec<String>,
}

impl Default for WasmOptions {
    fn default() -> Self {
        WasmOptions { memory: DEFAULT_MEMORY_LIMIT, fuel: 0, env: Vec::new(), args: Vec::new() }
    }
}

impl WasmOptions {
    /// Adds an environment variable.
    pub fn env(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Sets the memory limit.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }
    /// Sets the fuel limit per run (0 = unlimited).
    pub fn fuel(mut self, fuel: u64) -> Self {
        self.fuel = fuel;
        self
    }
}

impl Orchestrator {
    /// Spawns a routine that runs `component` (one fresh instance per run).
    pub fn spawn_wasm(
        &self,
        opts: SpawnOptions,
        component: &WasmComponent,
        wasm: WasmOptions,
    ) -> Result<RoutineHandle, SpawnError> {
        let plugin = component
            .path()
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.spawn_wasm_as(opts, plugin, component, wasm)
    }

    /// Like [`spawn_wasm`](Self::spawn_wasm), naming the plugin shown in snapshots.
    pub fn spawn_wasm_as(
        &self,
        opts: SpawnOptions,
        plugin: String,
        component: &WasmComponent,
        wasm: WasmOptions,
    ) -> Result<RoutineHandle, SpawnError> {
        let work = WasmWork { component: component.clone(), opts: Arc::new(wasm) };
        self.spawn_work(opts, plugin, Arc::new(work))
    }
}

struct WasmWork {
    component: WasmComponent,
    opts: Arc<WasmOptions>,
}

impl Work for WasmWork {
    fn start(&self, ctx: RoutineContext) -> BoxFuture<'static, Outcome> {
        run_instance(self.component.inner.clone(), self.opts.clone(), ctx).boxed()
    }
    fn interruptible(&self) -> bool {
        true
    }
}

/// The data of one instance's `Store`.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    ctx: RoutineContext,
    memory_limit: u64,
    memory_used: u64,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grown = self.memory_used + (desired - current) as u64;
        if grown > self.memory_limit {
            tracing::debug!(routine = %self.ctx.name(), "memory limit reached: {grown} bytes");
            return Ok(false);
        }
        self.memory_used = grown;
        self.ctx.shared.memory_bytes.store(grown, Relaxed);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

async fn run_instance(
    comp: Arc<ComponentInner>,
    opts: Arc<WasmOptions>,
    ctx: RoutineContext,
) -> Outcome {
    let shared = ctx.shared.clone();
    let run = ctx.run.clone();
    let stderr_tail = Arc::new(Mutex::new(String::new()));
    let wasi = WasiCtxBuilder::new()
        .stdout(GuestOutput { routine: shared.name.clone(), stderr: None })
        .stderr(GuestOutput { routine: shared.name.clone(), stderr: Some(stderr_tail.clone()) })
        .envs(&opts.env)
        .args(&opts.args)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build();
    let engine = comp.engine.engine.clone();
    let mut store = Store::new(
        &engine,
        HostState {
            wasi,
            table: ResourceTable::new(),
            ctx,
            memory_limit: opts.memory,
            memory_used: 0,
        },
    );
    store.limiter(|s| s as &mut dyn ResourceLimiter);
    let initial = if opts.fuel == 0 { u64::MAX } else { opts.fuel };
    let base = shared.fuel.load(Relaxed);
    // Fuel is configured on this engine: these cannot fail.
    let _ = store.set_fuel(initial);
    let _ = store.fuel_async_yield_interval(Some(FUEL_YIELD_INTERVAL));
    store.set_epoch_deadline(1);
    {
        let shared = shared.clone();
        let run = run.clone();
        store.epoch_deadline_callback(move |cx| {
            if run.killed.load(Relaxed) {
                return Ok(UpdateDeadline::Interrupt);
            }
            if let Ok(left) = cx.get_fuel() {
                shared.fuel.store(base + (initial - left), Relaxed);
            }
            // tokio's yield_now lets the worker poll timers and I/O before resuming us.
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
        });
    }
    {
        // Keeps the live fuel figure fresh for guests that mostly wait in host calls and so
        // rarely reach an epoch callback.
        let shared = shared.clone();
        store.call_hook(move |cx, hook| {
            if matches!(hook, CallHook::CallingHost)
                && let Ok(left) = cx.get_fuel()
            {
                shared.fuel.store(base + (initial - left), Relaxed);
            }
            Ok(())
        });
    }

    let result: wasmtime::Result<Result<(), String>> = match &comp.kind {
        Kind::Worker(pre) => match pre.instantiate_async(&mut store).await {
            Ok(w) => w.call_run(&mut store).await,
            Err(e) => return Outcome::Err(format!("cannot instantiate: {e:#}")),
        },
        Kind::Command(pre) => match pre.instantiate_async(&mut store).await {
            Ok(c) => c
                .wasi_cli_run()
                .call_run(&mut store)
                .await
                .map(|r| r.map_err(|()| "command exited with an error".to_string())),
            Err(e) => return Outcome::Err(format!("cannot instantiate: {e:#}")),
        },
    };
    if let Ok(left) = store.get_fuel() {
        shared.fuel.store(base + (initial - left), Relaxed);
    }
    drop(store);
    match result {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(msg)) => Outcome::Err(msg),
        Err(e) => {
            if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                return if exit.0 == 0 {
                    Outcome::Ok
                } else {
                    Outcome::Err(format!("exited with status {}", exit.0))
                };
            }
            if run.killed.load(Relaxed) {
                return Outcome::Killed;
            }
            Outcome::Panicked(trap_message(&e, &stderr_tail.lock()))
        }
    }
}

/// `wasm trap: ... (in guest_fn); panicked at src/lib.rs:9:20: the message`.
fn trap_message(e: &wasmtime::Error, stderr: &str) -> String {
    let mut msg = match e.downcast_ref::<Trap>() {
        Some(t) => t.to_string(),
        None => format!("{}", e.root_cause()),
    };
    if let Some(bt) = e.downcast_ref::<WasmBacktrace>() {
        // The first frame that is the guest's own code, not the panic machinery of std.
        let own = bt
            .frames()
            .iter()
            .filter_map(|f| f.func_name())
            .map(|n| format!("{:#}", rustc_demangle::demangle(n)))
            .find(|n| {
                !["std::", "core::", "alloc::", "__rust", "rust_panic", "abort", "<std", "<core"]
                    .iter()
                    .any(|p| n.starts_with(p))
            });
        if let Some(f) = own {
            msg.push_str(&format!(" (in {f})"));
        }
    }
    let stderr = stderr.trim();
    if let Some(i) = stderr.rfind("panicked at ") {
        let panic: Vec<&str> =
            stderr[i..].lines().take_while(|l| !l.starts_with("note: ")).map(str::trim).collect();
        msg.push_str("; ");
        msg.push_str(&panic.join(" "));
    } else if let Some(last) = stderr.lines().rev().find(|l| !l.starts_with("note: ")) {
        msg.push_str("; ");
        msg.push_str(last.trim());
    }
    msg
}

/// Emits one guest log line as a tracing event attributed to the routine.
pub(crate) fn log_line(routine: &str, level: tracing::Level, message: &str) {
    match level {
        tracing::Level::TRACE => tracing::trace!(target: "guest", routine, "{message}"),
        tracing::Level::DEBUG => tracing::debug!(target: "guest", routine, "{message}"),
        tracing::Level::INFO => tracing::info!(target: "guest", routine, "{message}"),
        tracing::Level::WARN => tracing::warn!(target: "guest", routine, "{message}"),
        _ => tracing::error!(target: "guest", routine, "{message}"),
    }
}

/// A guest's stdout or stderr: complete lines go to the log; stderr is also kept (its
/// tail) to explain a trap, since Rust guests print their panic message there.
struct GuestOutput {
    routine: String,
    stderr: Option<Arc<Mutex<String>>>,
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(LineLogger::new(&self.routine, self.stderr.clone()))
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(LineLogger::new(&self.routine, self.stderr.clone()))
    }
}

struct LineLogger {
    routine: String,
    tail: Option<Arc<Mutex<String>>>,
    buf: Vec<u8>,
}

impl LineLogger {
    fn new(routine: &str, tail: Option<Arc<Mutex<String>>>) -> Self {
        LineLogger { routine: routine.to_string(), tail, buf: Vec::new() }
    }

    fn push(&mut self, bytes: &[u8]) {
        if let Some(tail) = &self.tail {
            let mut t = tail.lock();
            t.push_str(&String::from_utf8_lossy(bytes));
            if t.len() > STDERR_TAIL {
                let mut cut = t.len() - STDERR_TAIL;
                while !t.is_char_boundary(cut) {
                    cut += 1;
                }
                t.drain(..cut);
            }
        }
        self.buf.extend_from_slice(bytes);
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            self.emit(&line[..line.len() - 1]);
        }
        // A guest that never writes a newline must not grow the host's memory.
        if self.buf.len() > 16 * 1024 {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return;
        }
        let level = if self.tail.is_some() { tracing::Level::WARN } else { tracing::Level::INFO };
        log_line(&self.routine, level, text);
    }
}

impl Drop for LineLogger {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            self.emit(&line);
        }
    }
}

impl OutputStream for LineLogger {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LineLogger {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LineLogger {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

// ---- The WIT host side: each call delegates to the routine's context. ----

impl HostState {
    /// A killed instance gets a trap from any host call, so that it dies even if it keeps
    /// calling the host instead of reaching an epoch check.
    fn alive(&self) -> wasmtime::Result<()> {
        if self.ctx.run.killed.load(Relaxed) {
            wasmtime::bail!("killed");
        }
        Ok(())
    }
}

fn wit_error(e: CallError) -> types::Error {
    match e {
        CallError::Cancelled => types::Error::Cancelled,
        CallError::Closed => types::Error::Closed,
        CallError::NoSuchRoutine(n) => types::Error::NoSuchRoutine(n),
        CallError::TooLarge(n) => types::Error::TooLarge(n),
        CallError::Limit(l) => types::Error::Limit(l),
        CallError::InvalidName(n) => types::Error::InvalidName(n),
    }
}

fn timeout(millis: Option<u64>) -> Option<Duration> {
    millis.map(Duration::from_millis)
}

impl types::Host for HostState {}

impl runtime::Host for HostState {
    fn beat(&mut self) -> wasmtime::Result<()> {
        self.alive()?;
        self.ctx.beat();
        Ok(())
    }
    fn add_busy(&mut self, nanos: u64) -> wasmtime::Result<()> {
        self.ctx.add_busy(Duration::from_nanos(nanos));
        Ok(())
    }
    fn id(&mut self) -> wasmtime::Result<u64> {
        Ok(self.ctx.id())
    }
    fn name(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.name().to_string())
    }
    fn restarts(&mut self) -> wasmtime::Result<u64> {
        Ok(self.ctx.restarts())
    }
    fn cancelled(&mut self) -> wasmtime::Result<bool> {
        self.alive()?;
        Ok(self.ctx.is_cancelled())
    }
    async fn sleep(&mut self, millis: u64) -> wasmtime::Result<bool> {
        self.alive()?;
        Ok(self.ctx.sleep(Duration::from_millis(millis)).await)
    }
    fn log(&mut self, level: runtime::Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            runtime::Level::Trace => tracing::Level::TRACE,
            runtime::Level::Debug => tracing::Level::DEBUG,
            runtime::Level::Info => tracing::Level::INFO,
            runtime::Level::Warn => tracing::Level::WARN,
            runtime::Level::Error => tracing::Level::ERROR,
        };
        self.ctx.log(level, &message);
        Ok(())
    }
}

impl wit_mailbox::Host for HostState {
    async fn recv(
        &mut self,
        timeout_millis: Option<u64>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, types::Error>> {
        self.alive()?;
        Ok(self.ctx.recv(timeout(timeout_millis)).await.map_err(wit_error))
    }
    async fn send(
        &mut self,
        to: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        self.alive()?;
        Ok(self.ctx.send(&to, payload).await.map_err(wit_error))
    }
}

impl wit_bus::Host for HostState {
    async fn publish(
        &mut self,
        topic: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        self.alive()?;
        Ok(self.ctx.publish(&topic, payload).await.map_err(wit_error))
    }
    async fn recv(
        &mut self,
        topic: String,
        timeout_millis: Option<u64>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, types::Error>> {
        self.alive()?;
        Ok(self.ctx.bus_recv(&topic, timeout(timeout_millis)).await.map_err(wit_error))
    }
}
