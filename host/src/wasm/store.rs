//! The data of one instance's `Store` ([`HostState`]: the deny-by-default WASI context, the
//! routine's context, the memory limiter) and how an instance is accounted for
//! ([`Metering`]). Its own file, as wasmtime keeps its store data in `runtime/store.rs`:
//! the engine, the linker and the component loader need these types, not the instance.

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::routine::RoutineContext;

/// How a wasm routine's work is accounted for (manifest `limits.metering`).
///
/// Both kinds time every poll of the instance (`busySeconds`) and use epoch interruption
/// (time slices, kills, even of a guest in `loop {}`). They differ in the compiled code:
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metering {
    /// Fuel instrumentation (the default): `fuelConsumed` counts every fuel unit, and
    /// `limits.fuel` can bound a run. Costs 1.6–2.4× on compute-bound code (`BENCHMARKS.md`, P5).
    #[default]
    Fuel,
    /// No fuel instrumentation: the component runs on a second engine, compiled without it
    /// (created on first use, sharing the compile cache). `fuelConsumed` is absent and a fuel
    /// limit cannot be set; busy time, slices and kills work as with fuel. Epochs alone
    /// cost 1.0–1.6× there.
    Time,
}

impl Metering {
    /// `fuel` or `time`, as in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Metering::Fuel => "fuel",
            Metering::Time => "time",
        }
    }
}

impl std::fmt::Display for Metering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The data of one instance's `Store`.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(super) ctx: RoutineContext,
    memory_limit: u64,
    memory_used: u64,
}

impl HostState {
    /// The data of a store that runs for `ctx`, with `wasi` and a memory limit.
    pub(super) fn new(wasi: WasiCtx, ctx: RoutineContext, memory_limit: u64) -> Self {
        HostState { wasi, table: ResourceTable::new(), ctx, memory_limit, memory_used: 0 }
    }
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
        self.ctx.shared.set_memory(grown);
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
