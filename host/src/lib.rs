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
//! - [`Supervision`]: restart policies, backoff, intensity, groups ([`Group`]); the
//!   at-least-once delivery rule (a [`Message`] stays in flight until its receiver asks for
//!   the next one, and is redelivered after a crash, up to `max-deliveries`).
//! - [`Cluster`]: several hosts as one over NATS JetStream (topics and sends span nodes).
//! - [`ObsServer`]: `/metrics`, the dashboard and the JSON API ([`obs`]).
//! - [`defaults`]: the defaults and bounds of the core, by area (the server's are in
//!   [`obs`], the manifest's in [`plugin`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use gorch_host::{Orchestrator, SpawnOptions, WasmEngine, WasmOptions};
//! use std::time::Duration;
//!
//! let orch = Orchestrator::new();
//! let engine = WasmEngine::new(Default::default())?;
//! let echo = engine.load_file("plugins/echo.wasm")?;
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

// The types are at the crate root; the modules are private except the observability server
// (`obs`), the plugin directory (`plugin`), the core's constants (`defaults`) and the CLI,
// so each type has one page in the docs. ARCHITECTURE.md says what each module owns.
mod bus;
mod channel;
#[doc(hidden)]
pub mod cli;
mod clock;
mod cluster;
mod delivery;
mod fsread;
mod logguard;
mod names;
pub mod obs;
mod orchestrator;
pub mod plugin;
mod routine;
mod supervisor;
mod transport;
mod wasm;

pub use bus::{Bus, BusError, ClusterTopicStats, TopicStats};
pub use channel::{Channel, ChannelStats, RecvError, SendError, Sizer};
pub use cluster::{
    Cluster, ClusterConfig, ClusterError, ClusterRoutines, ClusterView, NodeInfo, NodeRoutines,
};
pub use delivery::{DEAD_LETTER_TOPIC, Message};
pub use names::{NameError, validate_routine_name, validate_topic_name};
pub use obs::{ObsConfig, ObsServer};
pub use orchestrator::{Orchestrator, ShutdownReport, SpawnError, SpawnOptions};
pub use plugin::{PluginDir, PluginError, PluginManifest};
pub use routine::{Health, RoutineContext, RoutineHandle, Snapshot, State, write_stats_table};
pub use supervisor::{
    Backoff, Group, Intensity, PolicyError, RestartPolicy, Strategy, Supervision,
};
pub use transport::{CallError, Limit};
pub use wasm::{
    CacheStatus, CompileCache, EngineConfig, EngineError, LoadError, Metering, OptionsError,
    UpgradeError, WasmComponent, WasmEngine, WasmOptions,
};

/// The defaults and bounds of the core, by area (the observability server's are in
/// [`obs`], the manifest's in [`plugin`]).
pub mod defaults {
    pub use crate::bus::{DEFAULT_MAX_TOPICS, DEFAULT_TOPIC_CAPACITY};
    pub use crate::cluster::{
        DEFAULT_ACK_WAIT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_LEAVE_BOUND, DUPLICATE_WINDOW,
        HEARTBEAT, LEASE, MIN_ACK_WAIT, REMOTE_SEND_TIMEOUT,
    };
    pub use crate::names::MAX_NAME_BYTES;
    pub use crate::orchestrator::{
        DEFAULT_GRACE, DEFAULT_HISTORY, DEFAULT_MESSAGE_BYTES, DEFAULT_QUEUE_CAPACITY,
    };
    pub use crate::supervisor::{
        DEFAULT_MAX_DELIVERIES, DEFAULT_ROLLBACK_WINDOW, MAX_POLICY_DURATION,
    };
    pub use crate::wasm::{
        DEFAULT_EPOCH_TICK, DEFAULT_MAX_COMPONENT_BYTES, DEFAULT_MAX_WASM_STACK,
        DEFAULT_MEMORY_LIMIT, DEFAULT_MEMORY_RESERVATION, DEFAULT_POOL_SIZE, FUEL_YIELD_INTERVAL,
    };
}

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
