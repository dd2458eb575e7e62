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
//! - [`Supervision`]: restart policies, backoff, intensity, groups ([`supervisor`]); the
//!   at-least-once delivery rule ([`delivery`]).
//! - [`ObsServer`]: `/metrics`, the dashboard and the JSON API ([`obs`]).
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

// The core types are at the crate root; each module keeps its constants and secondary
// items (see ARCHITECTURE.md for what each module owns).
pub mod bus;
mod channel;
pub mod cli;
mod clock;
pub mod cluster;
pub mod delivery;
mod fsread;
mod logguard;
pub mod names;
pub mod obs;
pub mod orchestrator;
pub mod plugin;
pub mod routine;
pub mod supervisor;
pub mod wasm;

pub use bus::{Bus, BusError, TopicStats};
pub use channel::{Channel, ChannelStats, RecvError, SendError, Sizer};
pub use cluster::{Cluster, ClusterConfig, ClusterError};
pub use delivery::Message;
pub use obs::{ObsConfig, ObsServer};
pub use orchestrator::{Orchestrator, ShutdownReport, SpawnError, SpawnOptions};
pub use plugin::{PluginDir, PluginError, PluginManifest};
pub use routine::{CallError, Health, RoutineContext, RoutineHandle, Snapshot, State};
pub use supervisor::{Backoff, Group, Intensity, RestartPolicy, Strategy, Supervision};
pub use wasm::{
    EngineConfig, EngineError, LoadError, Metering, WasmComponent, WasmEngine, WasmOptions,
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
