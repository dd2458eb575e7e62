//! The wasm runtime, by concept (as wasmtime's own `runtime/component/` is split):
//!
//! - `engine`: one [`WasmEngine`]: wasmtime with fuel metering and epoch interruption, the
//!   pooling allocator, the epoch ticker thread, and the linker; a second wasmtime engine
//!   without fuel instrumentation, created on demand for [`Metering::Time`];
//! - `component`: loading a file into a [`WasmComponent`] (compile or cache, world check);
//! - `store`: the data of a `Store` (the WASI context, the routine's context, the memory
//!   limiter) and [`Metering`];
//! - `instance`: one `Store` per run: [`WasmOptions`], the sandbox, fuel and the kill;
//! - `upgrade`: [`RoutineHandle::upgrade`](crate::RoutineHandle::upgrade), live upgrade to
//!   another component;
//! - `host`: the WIT bindings and the host side of the `gorch:worker` imports;
//! - `stdio`: a guest's stdout and stderr as log lines;
//! - `cache`: the on-disk cache of compiled components.
//!
//! Spawning a component as a routine is [`Orchestrator::spawn_wasm`](crate::Orchestrator::spawn_wasm).

mod cache;
mod component;
mod engine;
mod host;
mod instance;
mod stdio;
mod store;
mod upgrade;

pub use cache::{CacheStatus, CompileCache};
pub use component::{LoadError, WasmComponent};
pub use engine::{
    DEFAULT_EPOCH_TICK, DEFAULT_MAX_COMPONENT_BYTES, DEFAULT_MAX_WASM_STACK,
    DEFAULT_MEMORY_RESERVATION, DEFAULT_POOL_SIZE, EngineConfig, EngineError, FUEL_YIELD_INTERVAL,
    WasmEngine,
};
pub(crate) use instance::WasmWork;
pub use instance::{DEFAULT_MEMORY_LIMIT, OptionsError, WasmOptions};
pub use store::Metering;
pub use upgrade::UpgradeError;
