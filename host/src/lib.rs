//! gorch-host runs sandboxed plugin workers compiled to WebAssembly components and keeps
//! them alive and visible: the orchestration and observability of the Go library
//! *gorchestra*, for wasm components and native async Rust routines.
//!
//! - [`Orchestrator`]: spawns routines (wasm with [`Orchestrator::spawn_wasm`], native with
//!   [`Orchestrator::spawn`]), looks them up, snapshots them, shuts them down within a bound.
//! - [`WasmEngine`] / [`WasmComponent`]: wasmtime with fuel metering (exact busy measure)
//!   and epoch interruption (time slices, and kills even of a guest in `loop {}`).
//! - [`Channel`] and [`Bus`]: bounded queues with statistics; mailboxes and topics.
//! - [`PluginManifest`] / [`PluginDir`]: the `NAME.toml` manifests of a plugin directory.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use gorch_host::{Orchestrator, SpawnOptions, WasmEngine, WasmOptions};
//! use std::time::Duration;
//!
//! let orch = Orchestrator::new();
//! let engine = WasmEngine::new(Default::default())?;
//! let echo = engine.load_file("examples/plugins/echo.wasm")?;
//! orch.spawn_wasm(SpawnOptions::new("echo"), &echo, WasmOptions::default())?;
//! orch.spawn(SpawnOptions::new("native"), |ctx| async move {
//!     while ctx.sleep(Duration::from_secs(1)).await {
//!         ctx.beat();
//!         ctx.send("echo", b"hello".to_vec()).await?;
//!     }
//!     Ok::<(), gorch_host::CallError>(())
//! })?;
//! orch.print_stats(&mut std::io::stdout())?;
//! orch.shutdown(Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

mod bus;
mod cache;
mod channel;
pub mod cli;
pub mod metrics;
mod obs;
mod orchestrator;
mod plugin;
mod profile;
mod routine;
mod supervisor;
mod wasm;

pub use bus::{
    Bus, BusError, DEFAULT_MAX_TOPICS, DEFAULT_TOPIC_CAPACITY, MAX_NAME_BYTES, TopicStats,
    validate_name, validate_routine_name,
};
pub use cache::{CacheStatus, CompileCache};
pub use channel::{Channel, ChannelStats, RecvError, SendError, Sizer};
pub use obs::{
    BODY_LIMIT, DEFAULT_ADDR, HEADER_READ_TIMEOUT, MAX_PROFILE_SECONDS, ObsConfig, ObsServer,
    ObsState, router,
};
pub use orchestrator::{
    DEAD_LETTER_TOPIC, DEFAULT_GRACE, DEFAULT_HISTORY, DEFAULT_MESSAGE_BYTES,
    DEFAULT_QUEUE_CAPACITY, Orchestrator, ShutdownReport, SpawnError, SpawnOptions,
    write_stats_table,
};
pub use plugin::{
    ByteSize, DIR_CONFIG, DirConfig, GroupConfig, Limits, ManifestError, PluginDir, PluginManifest,
    PluginSpec, WasiGrants,
};
pub use routine::{CallError, Health, Message, RoutineContext, RoutineHandle, Snapshot, State};
pub use supervisor::{
    Backoff, DEFAULT_MAX_DELIVERIES, Group, Intensity, RestartPolicy, Strategy, Supervision,
};
pub use wasm::{
    DEFAULT_EPOCH_TICK, DEFAULT_MAX_WASM_STACK, DEFAULT_MEMORY_LIMIT, DEFAULT_MEMORY_RESERVATION,
    DEFAULT_POOL_SIZE, EngineConfig, FUEL_YIELD_INTERVAL, LoadError, WasmComponent, WasmEngine,
    WasmOptions,
};

/// How often a tokio worker checks timers and I/O, in polls. Tokio's default (61) lets a
/// timer fire hundreds of milliseconds late while guests spin in 5 ms slices; 1 keeps
/// timers on time (see BENCHMARKS.md, timer lateness).
pub const EVENT_INTERVAL: u32 = 1;

/// A multi-threaded tokio runtime builder configured for running guests fairly: all
/// drivers enabled and [`EVENT_INTERVAL`]. Embedders should build their runtime with it.
pub fn runtime_builder() -> tokio::runtime::Builder {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().event_interval(EVENT_INTERVAL).thread_name("gorch-worker");
    b
}

/// Like [`runtime_builder`], with another event interval (for measurements).
#[doc(hidden)]
pub fn runtime_builder_with_interval(interval: u32) -> tokio::runtime::Builder {
    let mut b = runtime_builder();
    b.event_interval(interval);
    b
}

/// Paths of the example and test guest components, built by this crate's build script.
#[doc(hidden)]
pub mod example_guests {
    /// Directory holding every built guest `.wasm`.
    pub const DIR: &str = env!("GORCH_GUEST_DIR");
    /// The `examples/plugins` directory (manifests and copies of the example guests).
    pub const PLUGINS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/plugins");

    /// The path of the guest named `name` (`ticker`, `testkit`, ...).
    pub fn path(name: &str) -> std::path::PathBuf {
        std::path::Path::new(DIR).join(format!("{name}.wasm"))
    }
}
