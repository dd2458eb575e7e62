//! The orchestrator: the registry of routines (by id and by name), every way to spawn one
//! (native closures and wasm components), lookup, the history of finished routines, stats,
//! and the bounded shutdown. It owns the bus that routines share.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::{self, Display};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, TopicStats};
use crate::channel::Channel;
use crate::delivery::Message;
use crate::logguard::escape;
use crate::names::{NameError, validate_routine_name};
use crate::routine::{
    NativeWork, PluginSums, RoutineContext, RoutineHandle, RoutineShared, Settings, Snapshot,
    State, Work, write_stats_table,
};
use crate::supervisor::driver::{KILL_WAIT, Keeper, drive};
use crate::supervisor::{Group, GroupInner, Intensity, RestartPolicy, Strategy, Supervision};
use crate::transport::{Directory, Link, Local, LocalTransport, Transport};
use crate::wasm::{OptionsError, WasmComponent, WasmOptions, WasmWork};

/// Default mailbox capacity.
pub const DEFAULT_QUEUE_CAPACITY: usize = 128;
/// Default grace period between a stop request and the kill.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);
/// Default per-message size limit (1 MiB).
pub const DEFAULT_MESSAGE_BYTES: u64 = 1 << 20;
/// Default number of finished routines kept in the history.
pub const DEFAULT_HISTORY: usize = 256;

/// Why a routine could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The orchestrator has been shut down.
    #[error("the orchestrator is shut down")]
    ShutDown,
    /// A live routine already has this name.
    #[error("a routine named {0:?} is already running")]
    NameTaken(String),
    /// A live routine of this name runs on another node of the cluster, and this one or
    /// that one is cluster-unique.
    #[error(
        "a routine named {name:?} already runs on node {node:?} of the cluster, and it is \
         cluster-unique there or here (cluster-unique = true runs a name on one node only)"
    )]
    NameTakenInCluster {
        /// The name.
        name: String,
        /// The node that runs it.
        node: String,
    },
    /// The name is not valid.
    #[error("invalid routine name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: NameError,
    },
    /// The wasm options do not fit the component (see [`WasmOptions::check`]): another
    /// metering than it was loaded for, or a fuel limit without fuel metering.
    #[error(transparent)]
    Options(#[from] OptionsError),
}

/// Options of a spawned routine. `SpawnOptions::new(name)` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Unique name (see [`validate_routine_name`](crate::names::validate_routine_name): at
    /// most 255 bytes, no control, bidi or invisible characters, no `/`).
    pub name: String,
    /// Mailbox capacity; default [`DEFAULT_QUEUE_CAPACITY`].
    pub queue_capacity: usize,
    /// Idle watchdog: stop the routine as `TIMED_OUT` when it has not beaten for this
    /// long. `None` (the default) or zero turns it off.
    pub idle_timeout: Option<Duration>,
    /// Time between a stop request and the kill; default [`DEFAULT_GRACE`].
    pub grace: Duration,
    /// Largest payload the routine may send or publish; default [`DEFAULT_MESSAGE_BYTES`].
    pub message_bytes: u64,
    /// Restart policy, backoff, intensity and `max-deliveries`; default: never restart.
    pub supervision: Supervision,
    /// The group the routine belongs to, if any.
    pub group: Option<Group>,
    /// In a cluster: whether the name runs on one node only (default false: several nodes
    /// may run it, and a plain-name send reaches one of them, this node's first).
    pub cluster_unique: bool,
}

impl SpawnOptions {
    /// What the routine itself keeps of these options.
    fn settings(&self) -> Settings {
        Settings {
            name: self.name.clone(),
            queue_capacity: self.queue_capacity,
            idle_timeout: self.idle_timeout,
            grace: self.grace,
            message_bytes: self.message_bytes,
            supervision: self.supervision.clone(),
            group: self.group.as_ref().map(|g| g.inner.clone()),
        }
    }

    /// Options with the defaults above.
    pub fn new(name: impl Into<String>) -> Self {
        SpawnOptions {
            name: name.into(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            idle_timeout: None,
            grace: DEFAULT_GRACE,
            message_bytes: DEFAULT_MESSAGE_BYTES,
            supervision: Supervision::default(),
            group: None,
            cluster_unique: false,
        }
    }
    /// Whether this name runs on one node of a cluster only (see
    /// [`cluster_unique`](Self::cluster_unique)).
    pub fn cluster_unique(mut self, unique: bool) -> Self {
        self.cluster_unique = unique;
        self
    }
    /// Sets the mailbox capacity.
    pub fn queue_capacity(mut self, cap: usize) -> Self {
        self.queue_capacity = cap;
        self
    }
    /// Turns the idle watchdog on.
    pub fn idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = Some(t);
        self
    }
    /// Sets the grace period.
    pub fn grace(mut self, g: Duration) -> Self {
        self.grace = g;
        self
    }
    /// Sets the per-message size limit.
    pub fn message_bytes(mut self, n: u64) -> Self {
        self.message_bytes = n;
        self
    }
    /// Sets the supervision settings.
    pub fn supervision(mut self, s: Supervision) -> Self {
        self.supervision = s;
        self
    }
    /// Makes the routine a member of `group` (members start in spawn order).
    pub fn group(mut self, group: &Group) -> Self {
        self.group = Some(group.clone());
        self
    }
    /// Sets the restart policy (keeping the other supervision settings).
    pub fn restart(mut self, policy: RestartPolicy) -> Self {
        self.supervision.restart = policy;
        self
    }
}

/// What [`Orchestrator::shutdown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Routines that ended (by themselves, on request, or killed) within the bound.
    pub stopped: usize,
    /// Routines that had to be killed after their grace period or the shutdown bound.
    pub killed: Vec<String>,
    /// Routines that could not be stopped at all within the bound (their tasks were
    /// aborted).
    pub unstoppable: Vec<String>,
}

pub(crate) struct OrchInner {
    next_id: AtomicU64,
    routines: RwLock<HashMap<u64, Arc<RoutineShared>>>,
    by_name: RwLock<HashMap<String, Arc<RoutineShared>>>,
    history: Mutex<VecDeque<Snapshot>>,
    history_cap: usize,
    /// Per plugin, the counters of its routines that have left the host (see
    /// [`PluginSums`]); one entry per plugin name ever run.
    ended: Mutex<BTreeMap<String, PluginSums>>,
    tracker: TaskTracker,
    shutting_down: AtomicBool,
    shutdown_report: tokio::sync::OnceCell<ShutdownReport>,
    /// The in-memory bus and mailboxes, always here (a cluster's transport wraps them).
    local: Arc<LocalTransport>,
    /// Where messages travel: `local` until [`Orchestrator::set_transport`] (a cluster).
    transport: RwLock<Arc<dyn Transport>>,
    /// Whether `transport` was replaced already.
    replaced: AtomicBool,
}

impl Directory for OrchInner {
    fn mailbox(&self, name: &str) -> Option<Channel<Message>> {
        self.by_name.read().get(name).map(|r| r.mailbox().clone())
    }
}

impl Keeper for OrchInner {
    fn link(&self, name: &str, mailbox: &Channel<Message>) -> Arc<dyn Link> {
        self.transport.read().link(name, mailbox)
    }

    fn record_history(&self, snap: Snapshot) {
        let mut h = self.history.lock();
        if h.len() >= self.history_cap {
            h.pop_front();
        }
        h.push_back(snap);
    }

    fn retire(&self, shared: &Arc<RoutineShared>, state: State) {
        OrchInner::retire(self, shared, state);
    }
}

impl OrchInner {
    /// The routine has ended for good in `state`: closes its mailbox, moves it from the
    /// registry to the history, logs the end and wakes those waiting for it.
    pub(crate) fn retire(&self, shared: &Arc<RoutineShared>, state: State) {
        shared.end_run();
        shared.mailbox().close();
        {
            // Under the lock of the ended sums: a scrape counts the routine either live or
            // ended, never both or neither (see `Orchestrator::routines_and_ended`).
            let totals = shared.totals();
            let mut ended = self.ended.lock();
            self.routines.write().remove(&shared.id());
            ended.entry(totals.plugin.to_string()).or_default().add_ended(&totals, state);
        }
        {
            let mut by_name = self.by_name.write();
            if by_name.get(shared.name()).is_some_and(|r| Arc::ptr_eq(r, shared)) {
                by_name.remove(shared.name());
                self.transport.read().unregister(shared.name());
            }
        }
        shared.set_state(state);
        Keeper::record_history(self, shared.snapshot());
        // The summaries of a restart storm's suppressed lines are due now.
        shared.log_limiter().flush(shared.name());
        let routine = escape(shared.name());
        match state {
            State::Stopped => tracing::info!(routine = %routine, "routine ended: {state}"),
            _ => tracing::warn!(
                routine = %routine,
                error = shared.last_error().as_deref().unwrap_or(""),
                "routine ended: {state}"
            ),
        }
        shared.finish(state);
    }
}

/// Runs routines and keeps them visible. Cheap to clone (all clones share one registry).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use gorch_host::{Orchestrator, SpawnOptions, State};
/// use std::time::Duration;
///
/// let orch = Orchestrator::new();
/// let h = orch
///     .spawn(SpawnOptions::new("greeter"), |ctx| async move {
///         ctx.beat();
///         ctx.log(tracing::Level::INFO, "hello");
///         Ok::<(), String>(())
///     })
///     .unwrap();
/// assert_eq!(h.wait().await, State::Stopped);
/// let report = orch.shutdown(Duration::from_secs(1)).await;
/// assert!(report.unstoppable.is_empty());
/// # });
/// ```
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<OrchInner>,
}

impl fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Orchestrator").field("routines", &self.inner.routines.read().len()).finish()
    }
}

impl Default for Orchestrator {
    fn default() -> Self {
        Self::new()
    }
}

impl Orchestrator {
    /// An orchestrator with a bus of default limits.
    pub fn new() -> Self {
        Self::with_bus(Bus::new())
    }

    /// An orchestrator whose routines share `bus` (for example one with another topic limit).
    pub fn with_bus(bus: Bus<Message>) -> Self {
        let inner = Arc::new_cyclic(|me: &Weak<OrchInner>| {
            let names: Weak<dyn Directory> = me.clone();
            let local = Arc::new(LocalTransport::new(bus, names));
            OrchInner {
                next_id: AtomicU64::new(1),
                routines: RwLock::new(HashMap::new()),
                by_name: RwLock::new(HashMap::new()),
                history: Mutex::new(VecDeque::new()),
                ended: Mutex::default(),
                history_cap: DEFAULT_HISTORY,
                tracker: TaskTracker::new(),
                shutting_down: AtomicBool::new(false),
                shutdown_report: tokio::sync::OnceCell::new(),
                transport: RwLock::new(Arc::new(Local(local.clone()))),
                local,
                replaced: AtomicBool::new(false),
            }
        });
        Orchestrator { inner }
    }

    /// The in-memory bus of this orchestrator's routines (in a cluster, the topics are
    /// JetStream streams and this bus stays empty).
    pub fn bus(&self) -> &Bus<Message> {
        self.inner.local.bus()
    }

    pub(crate) fn from_inner(inner: Arc<OrchInner>) -> Self {
        Orchestrator { inner }
    }

    pub(crate) fn downgrade(&self) -> Weak<OrchInner> {
        Arc::downgrade(&self.inner)
    }

    /// Where this host's messages travel now.
    pub(crate) fn transport(&self) -> Arc<dyn Transport> {
        self.inner.transport.read().clone()
    }

    /// The in-memory transport (which a cluster's transport wraps).
    pub(crate) fn local_transport(&self) -> Arc<LocalTransport> {
        self.inner.local.clone()
    }

    /// Replaces the in-memory transport (joining a cluster); false if it was replaced
    /// already. Runs started before keep their links until they end.
    pub(crate) fn set_transport(&self, transport: Arc<dyn Transport>) -> bool {
        if self.inner.replaced.swap(true, Relaxed) {
            return false;
        }
        *self.inner.transport.write() = transport;
        true
    }

    /// The number of live routines.
    pub fn routine_count(&self) -> usize {
        self.inner.routines.read().len()
    }

    /// Spawns a native routine. `f` is called for each run with the routine's context; an
    /// `Err` ends the routine as `FAILED`, a panic as `PANICKED`.
    ///
    /// Must be called within a tokio runtime.
    pub fn spawn<F, Fut, E>(&self, opts: SpawnOptions, f: F) -> Result<RoutineHandle, SpawnError>
    where
        F: Fn(RoutineContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        self.spawn_work(opts, String::new(), Arc::new(NativeWork(f)))
    }

    /// Spawns a routine that runs `component` (one fresh instance per run). Its plugin name
    /// (shown in snapshots) is the component file's stem.
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
        wasm.check(component)?;
        self.spawn_work(opts, plugin, Arc::new(WasmWork::new(component, wasm)))
    }

    pub(crate) fn spawn_work(
        &self,
        opts: SpawnOptions,
        plugin: String,
        work: Arc<dyn Work>,
    ) -> Result<RoutineHandle, SpawnError> {
        if self.inner.shutting_down.load(Relaxed) {
            return Err(SpawnError::ShutDown);
        }
        validate_routine_name(&opts.name)
            .map_err(|reason| SpawnError::InvalidName { name: opts.name.clone(), reason })?;
        let transport = self.transport();
        if let Some(node) = transport.clash(&opts.name, opts.cluster_unique) {
            return Err(SpawnError::NameTakenInCluster { name: opts.name, node });
        }
        let shared = {
            let mut by_name = self.inner.by_name.write();
            if by_name.contains_key(&opts.name) {
                return Err(SpawnError::NameTaken(opts.name));
            }
            let id = self.inner.next_id.fetch_add(1, Relaxed);
            let shared = Arc::new(RoutineShared::new(id, opts.settings(), plugin, work.version()));
            shared.set_counts_fuel(work.counts_fuel());
            by_name.insert(opts.name.clone(), shared.clone());
            if let Some(g) = shared.group() {
                g.members.lock().push(shared.clone());
            }
            self.inner.routines.write().insert(id, shared.clone());
            shared
        };
        transport.register(&opts.name, opts.cluster_unique);
        let keeper: Arc<dyn Keeper> = self.inner.clone();
        self.inner.tracker.spawn(drive(keeper, shared.clone(), work));
        Ok(RoutineHandle::new(shared))
    }

    /// A group of routines supervised together with `strategy`; its `intensity` limit
    /// counts the restarts of all members and, when exceeded, ends the whole group.
    pub fn group(
        &self,
        name: impl Into<String>,
        strategy: Strategy,
        intensity: Intensity,
    ) -> Group {
        Group { inner: Arc::new(GroupInner::new(name.into(), strategy, intensity)) }
    }

    /// The live routine with this id.
    pub fn get(&self, id: u64) -> Option<RoutineHandle> {
        self.inner.routines.read().get(&id).map(|s| RoutineHandle::new(s.clone()))
    }

    /// The live routine with this name.
    pub fn get_by_name(&self, name: &str) -> Option<RoutineHandle> {
        self.inner.by_name.read().get(name).map(|s| RoutineHandle::new(s.clone()))
    }

    /// Every live routine, by id.
    pub fn list(&self) -> Vec<RoutineHandle> {
        self.shared_list().into_iter().map(RoutineHandle::new).collect()
    }

    /// The live routines (by id) and, per plugin, the counters of its routines that have
    /// ended, read together: a routine is in exactly one of the two.
    pub(crate) fn routines_and_ended(
        &self,
    ) -> (Vec<Arc<RoutineShared>>, BTreeMap<String, PluginSums>) {
        let ended = self.inner.ended.lock();
        (self.shared_list(), ended.clone())
    }

    /// Every live routine, by id. Sorted by the map's keys (the ids): comparing through the
    /// routines would read each one's memory, cold at scale, log(n) times (with 100,000
    /// routines that sort took about 20 ms of every `/metrics` scrape).
    pub(crate) fn shared_list(&self) -> Vec<Arc<RoutineShared>> {
        let mut v: Vec<(u64, Arc<RoutineShared>)> =
            self.inner.routines.read().iter().map(|(id, r)| (*id, r.clone())).collect();
        v.sort_unstable_by_key(|(id, _)| *id);
        v.into_iter().map(|(_, r)| r).collect()
    }

    /// Snapshots of every live routine, by id.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.list().iter().map(|h| h.snapshot()).collect()
    }

    /// Snapshots of finished routines, oldest first (a bounded ring).
    pub fn history(&self) -> Vec<Snapshot> {
        self.inner.history.lock().iter().cloned().collect()
    }

    /// Stats of every topic (in a cluster: of every cluster topic, from its stream).
    pub fn topics(&self) -> Vec<TopicStats> {
        self.transport().topics()
    }

    /// Asks every live routine to stop (each gets its grace period, then is killed).
    pub fn stop_all(&self) {
        for r in self.inner.routines.read().values() {
            r.request_stop();
        }
    }

    /// True once [`shutdown`](Self::shutdown) has begun.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shutting_down.load(Relaxed)
    }

    /// Stops everything within `timeout`: asks all routines to stop, kills those still
    /// running near the bound, and reports what could not be stopped. Spawning afterwards
    /// is an error. Idempotent: later calls wait for and return the first call's report.
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.inner.shutting_down.store(true, Relaxed);
        let inner = self.inner.clone();
        self.inner.shutdown_report.get_or_init(|| shutdown_inner(inner, timeout)).await.clone()
    }

    /// Writes a table of all live routines (like gorchestra's `PrintStats`).
    pub fn print_stats(&self, w: &mut dyn io::Write) -> io::Result<()> {
        write_stats_table(w, &self.snapshots())
    }
}

/// How long a shutdown waits quietly before it logs which routines it still waits for.
const SLOW_STOP: Duration = Duration::from_millis(250);

async fn shutdown_inner(inner: Arc<OrchInner>, timeout: Duration) -> ShutdownReport {
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    // Leave a part of the bound for the kill to land (an epoch tick, or the kill wait).
    let kill_at = deadline - (timeout / 5).min(KILL_WAIT * 2);
    inner.tracker.close();
    let live: Vec<Arc<RoutineShared>> = inner.routines.read().values().cloned().collect();
    for r in &live {
        r.request_stop();
    }
    // Say what the wait is for when it is not over at once (a guest that does not answer
    // the stop request is killed after its grace period): an exit that lags looks hung.
    let soon = (start + SLOW_STOP).min(kill_at);
    if tokio::time::timeout_at(soon, inner.tracker.wait()).await.is_err() {
        let mut names: Vec<String> =
            inner.routines.read().values().map(|r| r.name().to_string()).collect();
        names.sort();
        if !names.is_empty() {
            tracing::info!(
                "waiting for {} routine(s) to stop: {} (a routine that does not stop is \
                 killed after its grace period)",
                names.len(),
                names.join(", ")
            );
        }
    }
    let mut killed = Vec::new();
    if tokio::time::timeout_at(kill_at, inner.tracker.wait()).await.is_err() {
        let remaining: Vec<Arc<RoutineShared>> = inner.routines.read().values().cloned().collect();
        for r in &remaining {
            killed.push(r.name().to_string());
            r.hard_kill();
        }
    }
    let mut unstoppable = Vec::new();
    if tokio::time::timeout_at(deadline, inner.tracker.wait()).await.is_err() {
        for r in inner.routines.read().values() {
            unstoppable.push(r.name().to_string());
        }
    }
    inner.transport.read().close();
    killed.retain(|n| !unstoppable.contains(n));
    killed.sort();
    unstoppable.sort();
    ShutdownReport { stopped: live.len().saturating_sub(unstoppable.len()), killed, unstoppable }
}
