//! The engine: wasmtime configured for this host (fuel metering, epoch interruption, the
//! pooling allocator with an on-demand fallback), the epoch ticker thread, and the
//! [`Linker`] every component is checked against. A second wasmtime engine, without fuel
//! instrumentation, is created on first use for the plugins with `metering = "time"`
//! ([`Metering::Time`]); the same ticker drives its epochs and it shares the compile cache
//! (its compatibility hash differs, so its entries have other names). Loading components
//! is in `component`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::cache::CompileCache;
use super::host;
use super::store::{HostState, Metering};

/// Default epoch tick: the time slice of a CPU-bound guest, and the resolution of kills.
pub const DEFAULT_EPOCH_TICK: Duration = Duration::from_millis(5);
/// Default wasm stack limit per instance (512 KiB, wasmtime's default).
pub const DEFAULT_MAX_WASM_STACK: usize = 512 << 10;
/// Default virtual reservation per linear memory (4 GiB: no bounds checks in compiled code).
pub const DEFAULT_MEMORY_RESERVATION: u64 = 4 << 30;
/// Default number of concurrent instances the pooling allocator reserves room for.
pub const DEFAULT_POOL_SIZE: u32 = 1000;
/// Default size limit of a component file (256 MiB); see [`EngineConfig::max_component_bytes`].
pub const DEFAULT_MAX_COMPONENT_BYTES: u64 = 256 << 20;
/// Fuel between two forced write-backs of the fuel counter (a yield point): bounds how
/// much of a killed instance's fuel can go unrecorded, at a negligible cost.
pub const FUEL_YIELD_INTERVAL: u64 = 1_000_000;
/// Bytes of each pooled memory and table reset with memset instead of madvise when an
/// instance ends.
const POOL_KEEP_RESIDENT: usize = 64 << 10;
/// Freed pool slots decommitted together (one TLB shootdown for the batch).
const POOL_DECOMMIT_BATCH: usize = 64;

/// Why the [`WasmEngine`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// wasmtime refused the configuration.
    #[error("cannot create the wasmtime engine: {0:#}")]
    Engine(wasmtime::Error),
    /// The WIT host side or WASI could not be linked.
    #[error("cannot link the host functions: {0:#}")]
    Linker(wasmtime::Error),
    /// The epoch ticker thread could not be started.
    #[error("cannot start the epoch ticker thread: {0}")]
    Ticker(#[source] std::io::Error),
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
    /// Largest component file [`WasmEngine::load_file`] reads
    /// ([`DEFAULT_MAX_COMPONENT_BYTES`]): a larger one is refused before it is read (and so
    /// is one that grows past it while being read), so a huge or endless file cannot exhaust
    /// memory. Only regular files are read at all (a FIFO or device is refused).
    pub max_component_bytes: u64,
    /// Fuel metering (default true). Only for measuring its cost: without it
    /// `fuelConsumed` stays 0 and fuel limits do nothing.
    #[doc(hidden)]
    pub fuel: bool,
    /// Epoch interruption (default true). Only for measuring its cost: without it a
    /// spinning guest can be neither time-sliced nor killed.
    #[doc(hidden)]
    pub epochs: bool,
    /// The fuel yield interval of fuel-metered stores (default
    /// `Some(`[`FUEL_YIELD_INTERVAL`]`)`). Only for measuring
    /// its cost: `None` leaves a killed `loop {}` guest's fuel unrecorded.
    #[doc(hidden)]
    pub fuel_yield_interval: Option<u64>,
    /// Changes the wasmtime `Config` of both engines after gorch-host set it up. Only for
    /// measuring code-generation knobs (the accounting bench); `None` by default.
    #[doc(hidden)]
    pub tune: Option<fn(&mut Config)>,
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
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            fuel: true,
            epochs: true,
            fuel_yield_interval: Some(FUEL_YIELD_INTERVAL),
            tune: None,
        }
    }
}

/// One wasmtime engine and the linker built for it: what a component is compiled for.
pub(super) struct Flavor {
    pub(super) engine: Engine,
    pub(super) linker: Linker<HostState>,
    pub(super) metering: Metering,
    pooling: bool,
}

impl Flavor {
    /// An engine for `metering` (pooling allocator if asked for and possible) and its linker.
    fn new(config: &EngineConfig, metering: Metering) -> Result<Flavor, EngineError> {
        let fuel = config.fuel && metering == Metering::Fuel;
        let build = |pooling| Engine::new(&wasmtime_config(config, fuel, pooling));
        let (engine, pooling) = if config.pooling {
            match build(true) {
                Ok(e) => (e, true),
                Err(e) => {
                    tracing::warn!(
                        "pooling allocator unavailable ({e}); using on-demand allocation \
                         ({metering} metering)"
                    );
                    (build(false).map_err(EngineError::Engine)?, false)
                }
            }
        } else {
            (build(false).map_err(EngineError::Engine)?, false)
        };
        let linker = host::linker(&engine).map_err(EngineError::Linker)?;
        Ok(Flavor { engine, linker, metering, pooling })
    }
}

pub(super) struct EngineInner {
    /// The default engine, with fuel metering.
    pub(super) fuel: Arc<Flavor>,
    /// The engine without fuel instrumentation, once a component asked for it (the ticker
    /// thread increments its epoch too).
    time: Arc<OnceLock<Arc<Flavor>>>,
    /// Serializes the creation of `time` (one pool reservation, not two).
    time_init: parking_lot::Mutex<()>,
    /// What `time` is built from.
    config: EngineConfig,
    /// See [`EngineConfig::fuel_yield_interval`].
    pub(super) fuel_yield_interval: Option<u64>,
    pool_size: u32,
    pub(super) cache: Option<CompileCache>,
    pub(super) max_component_bytes: u64,
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
/// let ticker = engine.load_file("plugins/ticker.wasm")?;
/// let orch = Orchestrator::new();
/// let h = orch.spawn_wasm(SpawnOptions::new("ticker"), &ticker, WasmOptions::default())?;
/// h.stop();
/// h.wait().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct WasmEngine {
    pub(super) inner: Arc<EngineInner>,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine").field("pooling", &self.inner.fuel.pooling).finish()
    }
}

impl WasmEngine {
    /// Builds the engine (pooling allocator if possible), the linker, and starts the epoch
    /// ticker thread (stopped when the last clone of the engine is dropped).
    pub fn new(config: EngineConfig) -> Result<Self, EngineError> {
        let fuel = Arc::new(Flavor::new(&config, Metering::Fuel)?);
        let time: Arc<OnceLock<Arc<Flavor>>> = Arc::default();
        let ticker_stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = fuel.engine.clone();
            let time = time.clone();
            let stop = ticker_stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("gorch-epoch".into())
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        std::thread::park_timeout(tick);
                        engine.increment_epoch();
                        if let Some(t) = time.get() {
                            t.engine.increment_epoch();
                        }
                    }
                })
                .map_err(EngineError::Ticker)?
        };
        Ok(WasmEngine {
            inner: Arc::new(EngineInner {
                fuel,
                time,
                time_init: parking_lot::Mutex::new(()),
                pool_size: config.pool_size,
                cache: config.cache_dir.clone().map(CompileCache::new),
                max_component_bytes: config.max_component_bytes,
                fuel_yield_interval: config.fuel_yield_interval,
                config,
                ticker_stop,
                ticker: Some(ticker),
            }),
        })
    }

    /// The engine that compiles and runs components with `metering`: the fuel engine, or
    /// the one without fuel instrumentation (created on the first call that asks for it).
    pub(super) fn flavor(&self, metering: Metering) -> Result<Arc<Flavor>, EngineError> {
        let inner = &self.inner;
        if metering == Metering::Fuel {
            return Ok(inner.fuel.clone());
        }
        if let Some(t) = inner.time.get() {
            return Ok(t.clone());
        }
        let _one = inner.time_init.lock();
        if let Some(t) = inner.time.get() {
            return Ok(t.clone());
        }
        let t = Arc::new(Flavor::new(&inner.config, Metering::Time)?);
        tracing::info!(
            "created the wasm engine without fuel instrumentation (metering = \"time\"){}",
            if t.pooling { "" } else { ", on-demand allocation" }
        );
        let _ = inner.time.set(t.clone());
        Ok(t)
    }

    /// Whether the engine without fuel instrumentation has been created (a component was
    /// loaded for [`Metering::Time`]).
    pub fn has_time_engine(&self) -> bool {
        self.inner.time.get().is_some()
    }

    /// The largest component file it loads (see [`EngineConfig::max_component_bytes`]).
    pub fn max_component_bytes(&self) -> u64 {
        self.inner.max_component_bytes
    }

    /// How many concurrent instances the pooling allocator has room for (`None` without
    /// it: on-demand allocation has no fixed room).
    pub fn pool_size(&self) -> Option<u32> {
        self.inner.fuel.pooling.then_some(self.inner.pool_size)
    }

    /// Whether the pooling allocator is in use.
    pub fn is_pooling(&self) -> bool {
        self.inner.fuel.pooling
    }

    /// The compile cache's directory, if the engine has one.
    pub fn cache_dir(&self) -> Option<&Path> {
        self.inner.cache.as_ref().map(|c| c.dir())
    }

    /// The underlying wasmtime engine (the default one, with fuel metering).
    pub fn engine(&self) -> &Engine {
        &self.inner.fuel.engine
    }

    /// The wasmtime engine for `metering`, created on first use for [`Metering::Time`].
    pub fn engine_for(&self, metering: Metering) -> Result<Engine, EngineError> {
        Ok(self.flavor(metering)?.engine.clone())
    }
}

fn wasmtime_config(c: &EngineConfig, fuel: bool, pooling: bool) -> Config {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    cfg.consume_fuel(fuel);
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
    if let Some(tune) = c.tune {
        tune(&mut cfg);
    }
    cfg
}
