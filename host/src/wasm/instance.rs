//! One running instance: the per-instance settings ([`WasmOptions`]), the data of its
//! `Store` (`HostState`: the deny-by-default WASI context, the routine's context, the memory
//! limiter), and the run itself: set up fuel and the epoch callback, instantiate, call
//! `run`, and map the result (or the trap) to an outcome.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use futures::FutureExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use wasmtime::{CallHook, ResourceLimiter, Store, Trap, UpdateDeadline, WasmBacktrace};
use wasmtime_wasi::WasiCtxBuilder;

use super::component::{ComponentInner, Kind, WasmComponent};
use super::host;
use super::stdio::GuestOutput;
use super::store::{HostState, Metering};
use crate::logguard::escape;
use crate::routine::{Outcome, RoutineContext, RoutineShared, Work};

/// Default linear memory limit per instance (64 MiB).
pub const DEFAULT_MEMORY_LIMIT: u64 = 64 << 20;

/// Per-instance settings of a wasm routine (the `[limits]` and `[wasi]` manifest tables).
#[derive(Debug, Clone)]
pub struct WasmOptions {
    /// Linear memory limit in bytes ([`DEFAULT_MEMORY_LIMIT`]).
    pub memory: u64,
    /// Fuel per run; 0 means unlimited (the default). Must be 0 with [`Metering::Time`].
    pub fuel: u64,
    /// How the routine is accounted for ([`Metering::Fuel`] by default). It must be the
    /// metering the component was loaded for ([`WasmComponent::metering`]; see
    /// [`WasmEngine::load_file_metered`](super::WasmEngine::load_file_metered)), else the
    /// spawn (or upgrade) is refused.
    pub metering: Metering,
    /// Environment variables the guest sees (none by default).
    pub env: Vec<(String, String)>,
    /// Arguments the guest sees (none by default).
    pub args: Vec<String>,
}

impl Default for WasmOptions {
    fn default() -> Self {
        WasmOptions {
            memory: DEFAULT_MEMORY_LIMIT,
            fuel: 0,
            metering: Metering::Fuel,
            env: Vec::new(),
            args: Vec::new(),
        }
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
    /// Sets the metering (see [`Metering`]).
    pub fn metering(mut self, metering: Metering) -> Self {
        self.metering = metering;
        self
    }

    /// Why these options cannot run `component`, if they cannot: a metering other than the
    /// one it was compiled for, or a fuel limit without fuel metering.
    pub fn check(&self, component: &WasmComponent) -> Result<(), OptionsError> {
        if self.metering != component.metering() {
            return Err(OptionsError::Metering {
                path: component.path().to_path_buf(),
                loaded: component.metering(),
                asked: self.metering,
            });
        }
        if self.metering == Metering::Time && self.fuel > 0 {
            return Err(OptionsError::FuelWithoutFuelMetering { fuel: self.fuel });
        }
        Ok(())
    }
}

/// Why [`WasmOptions`] cannot run a component ([`WasmOptions::check`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// The component was compiled for another metering than the options ask for.
    #[error(
        "{} was loaded for {loaded} metering but the options ask for {asked}: load it with \
         WasmEngine::load_file_metered(path, Metering::{asked:?})",
        path.display()
    )]
    Metering {
        /// The component's file.
        path: std::path::PathBuf,
        /// The metering it was compiled for.
        loaded: Metering,
        /// The metering the options ask for.
        asked: Metering,
    },
    /// A fuel limit was set with `metering = "time"`.
    #[error("a fuel limit ({fuel}) needs fuel metering, not time")]
    FuelWithoutFuelMetering {
        /// The limit asked for.
        fuel: u64,
    },
}

/// A wasm component as a routine's work: one fresh instance per run.
pub(crate) struct WasmWork {
    component: WasmComponent,
    opts: Arc<WasmOptions>,
}

impl WasmWork {
    pub fn new(component: &WasmComponent, opts: WasmOptions) -> Self {
        WasmWork { component: component.clone(), opts: Arc::new(opts) }
    }
}

impl Work for WasmWork {
    fn start(&self, ctx: RoutineContext) -> BoxFuture<'static, Outcome> {
        run_instance(self.component.inner.clone(), self.opts.clone(), ctx).boxed()
    }
    fn interruptible(&self) -> bool {
        true
    }
    fn version(&self) -> String {
        self.component.version().to_string()
    }
    fn stateful(&self) -> bool {
        self.component.is_stateful()
    }
    fn counts_fuel(&self) -> bool {
        self.component.metering() == Metering::Fuel
    }
}

/// The fuel a store started with and the routine's total before it: what turns the fuel
/// left into the routine's `fuelConsumed`.
#[derive(Clone, Copy)]
struct FuelBase {
    initial: u64,
    before: u64,
}

impl FuelBase {
    fn record(self, shared: &RoutineShared, left: u64) {
        shared.set_fuel(self.before + (self.initial - left));
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
    let (mut store, fuel) = new_store(&comp, &opts, ctx, stderr_tail.clone());
    let result = call(&comp, &mut store).await;
    if let Ok(left) = store.get_fuel() {
        fuel.record(&shared, left);
    }
    drop(store);
    match result {
        Ok(Ok(Ok(()))) => Outcome::Ok,
        Ok(Ok(Err(msg))) => Outcome::Err(msg),
        // A trap in a start function is a trap like any other (one line, PANICKED).
        Err(e) if e.downcast_ref::<Trap>().is_none() || run.killed.load(Relaxed) => {
            Outcome::Err(format!("cannot instantiate: {e:#}"))
        }
        Err(e) | Ok(Err(e)) => {
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
            log_backtrace(&shared, &e);
            Outcome::Panicked(trap_message(&e, &stderr_tail.lock()))
        }
    }
}

/// A store for one run: the sandbox (no files, sockets or environment beyond the grants;
/// stdout and stderr to the log), the memory limiter, fuel, and the epoch callback that
/// slices a spinning guest and kills a stopped one.
fn new_store(
    comp: &ComponentInner,
    opts: &WasmOptions,
    ctx: RoutineContext,
    stderr_tail: Arc<Mutex<String>>,
) -> (Store<HostState>, FuelBase) {
    let shared = ctx.shared.clone();
    let run = ctx.run.clone();
    let wasi = WasiCtxBuilder::new()
        .stdout(GuestOutput::stdout(&shared))
        .stderr(GuestOutput::stderr(&shared, stderr_tail))
        .envs(&opts.env)
        .args(&opts.args)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build();
    let state = HostState::new(wasi, ctx, opts.memory);
    let mut store = Store::new(&comp.flavor.engine, state);
    store.limiter(|s| s as &mut dyn ResourceLimiter);
    let fuel = FuelBase {
        initial: if opts.fuel == 0 { u64::MAX } else { opts.fuel },
        before: shared.fuel(),
    };
    let metered = comp.flavor.metering == Metering::Fuel;
    if metered {
        // Fuel is configured on this engine: these cannot fail.
        let _ = store.set_fuel(fuel.initial);
        let _ = store.fuel_async_yield_interval(comp.engine.fuel_yield_interval);
    }
    store.set_epoch_deadline(1);
    {
        let shared = shared.clone();
        store.epoch_deadline_callback(move |cx| {
            if run.killed.load(Relaxed) {
                return Ok(UpdateDeadline::Interrupt);
            }
            if metered && let Ok(left) = cx.get_fuel() {
                fuel.record(&shared, left);
            }
            // tokio's yield_now lets the worker poll timers and I/O before resuming us.
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(tokio::task::yield_now())))
        });
    }
    // Keeps the live fuel figure fresh for guests that mostly wait in host calls and so
    // rarely reach an epoch callback. Without fuel there is nothing to refresh: no hook.
    if metered {
        store.call_hook(move |cx, hook| {
            if matches!(hook, CallHook::CallingHost)
                && let Ok(left) = cx.get_fuel()
            {
                fuel.record(&shared, left);
            }
            Ok(())
        });
    }
    (store, fuel)
}

/// Instantiates the component and calls its `run` (or `wasi:cli/run`). The outer error is
/// a failed instantiation; the middle one a trap; the inner one what `run` returned.
async fn call(
    comp: &ComponentInner,
    store: &mut Store<HostState>,
) -> Result<wasmtime::Result<Result<(), String>>, wasmtime::Error> {
    Ok(match &comp.kind {
        Kind::Worker(pre) => return call_worker(pre, comp.stateful, store).await,
        Kind::Command(pre) => pre
            .instantiate_async(&mut *store)
            .await?
            .wasi_cli_run()
            .call_run(store)
            .await
            .map(|r| r.map_err(|()| "command exited with an error".to_string())),
    })
}

/// A worker's run: instantiate, take over the state the previous version saved (`restore`,
/// when it exports `gorch:worker/upgrade`), call `run`, and, when the run was ended for an
/// upgrade to a version that takes state, hand this one's state over (`save`).
async fn call_worker(
    pre: &host::WorkerPre<HostState>,
    stateful: bool,
    store: &mut Store<HostState>,
) -> Result<wasmtime::Result<Result<(), String>>, wasmtime::Error> {
    let instance = pre.instance_pre().instantiate_async(&mut *store).await?;
    let worker = host::Worker::new(&mut *store, &instance)?;
    let fns = if stateful { Some(StateFns::find(&instance, &mut *store)?) } else { None };
    let shared = store.data().ctx.shared.clone();
    if let Some(state) = shared.upgrade().take_handover() {
        match &fns {
            Some(f) => match f.restore.call_async(&mut *store, (state,)).await {
                Ok((Ok(()),)) => {}
                Ok((Err(why),)) => {
                    shared.upgrade().settle(Err(format!("restore refused the state: {why}")));
                    return Ok(Ok(Err(format!("restore refused the saved state: {why}"))));
                }
                Err(trap) => {
                    shared.upgrade().settle(Err(format!("restore trapped: {trap}")));
                    return Ok(Err(trap));
                }
            },
            None => tracing::info!(
                routine = %escape(shared.name()),
                "the saved state is dropped: this version does not export {}",
                host::UPGRADE_EXPORT
            ),
        }
    }
    shared.upgrade().settle(Ok(()));
    let result = worker.call_run(&mut *store).await;
    if let (Ok(_), Some(f)) = (&result, &fns)
        && shared.upgrade().pending_takes_state()
    {
        f.save(store, &shared).await;
    }
    Ok(result)
}

/// The functions of the `gorch:worker/upgrade` export.
struct StateFns {
    save: wasmtime::component::TypedFunc<(), (Vec<u8>,)>,
    restore: wasmtime::component::TypedFunc<(Vec<u8>,), (Result<(), String>,)>,
}

impl StateFns {
    fn find(
        instance: &wasmtime::component::Instance,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<StateFns> {
        let iface = instance
            .get_export_index(&mut *store, None, host::UPGRADE_EXPORT)
            .ok_or_else(|| wasmtime::format_err!("no {} export", host::UPGRADE_EXPORT))?;
        let func = |store: &mut Store<HostState>, name: &str| {
            instance
                .get_export_index(&mut *store, Some(&iface), name)
                .ok_or_else(|| wasmtime::format_err!("{} has no `{name}`", host::UPGRADE_EXPORT))
        };
        let save = func(store, "save")?;
        let restore = func(store, "restore")?;
        Ok(StateFns {
            save: instance.get_typed_func(&mut *store, save)?,
            restore: instance.get_typed_func(&mut *store, restore)?,
        })
    }

    /// Calls `save` and keeps the state for the next version, if it fits the message limit.
    async fn save(&self, store: &mut Store<HostState>, shared: &RoutineShared) {
        let routine = escape(shared.name()).into_owned();
        match self.save.call_async(&mut *store, ()).await {
            Ok((state,)) if state.len() as u64 <= shared.message_bytes() => {
                shared.upgrade().put_handover(state);
            }
            Ok((state,)) => tracing::warn!(
                routine,
                "saved state of {} bytes is over limits.message-bytes ({}): dropped",
                state.len(),
                shared.message_bytes()
            ),
            Err(e) => tracing::warn!(routine, "save failed, no state handed over: {e}"),
        }
    }
}

/// `wasm trap: ... (in guest_fn); panicked at src/lib.rs:9:20: the message`.
/// Logs the guest's wasm backtrace of a trap at DEBUG, on one line (frames from the
/// innermost, names demangled and escaped: they come from the guest's name section).
fn log_backtrace(shared: &RoutineShared, e: &wasmtime::Error) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let Some(bt) = e.downcast_ref::<WasmBacktrace>() else { return };
    let frames: Vec<String> = bt
        .frames()
        .iter()
        .map(|f| match f.func_name() {
            Some(n) => format!("{:#}", rustc_demangle::demangle(n)),
            None => format!("<func {}>", f.func_index()),
        })
        .collect();
    tracing::debug!(
        routine = &*escape(shared.name()),
        plugin = &*escape(shared.plugin()),
        "wasm backtrace: {}",
        escape(&frames.join(" <- "))
    );
}

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
