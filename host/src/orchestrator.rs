//! The orchestrator: registry of routines, spawning, lookup, history, stats and bounded
//! shutdown. It owns the bus that routines share.

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Display};
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio_util::task::TaskTracker;

use crate::bus::{Bus, BusError, DEFAULT_TOPIC_CAPACITY, TopicStats, validate_routine_name};
use crate::channel::Channel;
use crate::routine::{
    CallError, InFlight, Message, RoutineContext, RoutineHandle, RoutineShared, RunControl,
    Snapshot, Source, State, dur_nanos, now_nanos,
};
use crate::supervisor::{
    Group, GroupInner, Intensity, RestartPolicy, RestartWindow, Strategy, Supervision,
};

/// Default mailbox capacity.
pub const DEFAULT_QUEUE_CAPACITY: usize = 128;
/// Default grace period between a stop request and the kill.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);
/// Default per-message size limit (1 MiB).
pub const DEFAULT_MESSAGE_BYTES: u64 = 1 << 20;
/// Default number of finished routines kept in the history.
pub const DEFAULT_HISTORY: usize = 256;
/// How long after the kill signal a wasm instance gets to reach an epoch check before its
/// future is dropped (it may be blocked in a host call that does not watch cancellation).
const KILL_WAIT: Duration = Duration::from_millis(100);

/// Why a routine could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The orchestrator has been shut down.
    #[error("the orchestrator is shut down")]
    ShutDown,
    /// A live routine already has this name.
    #[error("a routine named {0:?} is already running")]
    NameTaken(String),
    /// The name is not valid.
    #[error("invalid routine name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Options of a spawned routine. `SpawnOptions::new(name)` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// Unique name (non-empty, at most 255 bytes, no control characters).
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
}

impl SpawnOptions {
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
        }
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

/// How one run of a routine ended, before supervision maps it to a [`State`].
#[derive(Debug)]
pub(crate) enum Outcome {
    Ok,
    Err(String),
    Panicked(String),
    /// Killed by the host (the epoch callback, or the future dropped).
    Killed,
}

/// Something a routine runs: a native closure or a wasm component instance.
pub(crate) trait Work: Send + Sync + 'static {
    /// Starts one run.
    fn start(&self, ctx: RoutineContext) -> BoxFuture<'static, Outcome>;
    /// Whether the run can be interrupted in place (wasm: the epoch callback) so the driver
    /// should wait a little after the kill signal instead of dropping the future at once.
    fn interruptible(&self) -> bool;
}

struct NativeWork<F>(F);

impl<F, Fut, E> Work for NativeWork<F>
where
    F: Fn(RoutineContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    fn start(&self, ctx: RoutineContext) -> BoxFuture<'static, Outcome> {
        let fut = (self.0)(ctx);
        async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(())) => Outcome::Ok,
                Ok(Err(e)) => Outcome::Err(e.to_string()),
                Err(payload) => Outcome::Panicked(panic_message(&*payload)),
            }
        }
        .boxed()
    }
    fn interruptible(&self) -> bool {
        false
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
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
    tracker: TaskTracker,
    shutting_down: AtomicBool,
    shutdown_report: tokio::sync::OnceCell<ShutdownReport>,
    bus: Bus<Message>,
}

impl OrchInner {
    pub(crate) fn mailbox_of(&self, name: &str) -> Option<Channel<Message>> {
        self.by_name.read().get(name).map(|r| r.mailbox.clone())
    }

    pub(crate) fn topic(&self, name: &str) -> Result<Channel<Message>, CallError> {
        self.bus.topic(name, DEFAULT_TOPIC_CAPACITY).map_err(|e| match e {
            BusError::InvalidName { name, .. } => CallError::InvalidName(name),
            BusError::TooManyTopics { max } => CallError::Limit(format!("at most {max} topics")),
        })
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
        Orchestrator {
            inner: Arc::new(OrchInner {
                next_id: AtomicU64::new(1),
                routines: RwLock::new(HashMap::new()),
                by_name: RwLock::new(HashMap::new()),
                history: Mutex::new(VecDeque::new()),
                history_cap: DEFAULT_HISTORY,
                tracker: TaskTracker::new(),
                shutting_down: AtomicBool::new(false),
                shutdown_report: tokio::sync::OnceCell::new(),
                bus,
            }),
        }
    }

    /// The bus shared by this orchestrator's routines.
    pub fn bus(&self) -> &Bus<Message> {
        &self.inner.bus
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
        let shared = {
            let mut by_name = self.inner.by_name.write();
            if by_name.contains_key(&opts.name) {
                return Err(SpawnError::NameTaken(opts.name));
            }
            let id = self.inner.next_id.fetch_add(1, Relaxed);
            let shared = Arc::new(RoutineShared::new(id, &opts, plugin));
            by_name.insert(opts.name.clone(), shared.clone());
            if let Some(g) = &shared.group {
                g.members.lock().push(shared.clone());
            }
            self.inner.routines.write().insert(id, shared.clone());
            shared
        };
        let orch = self.inner.clone();
        self.inner.tracker.spawn(drive(orch, shared.clone(), work));
        Ok(RoutineHandle { shared })
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
        self.inner.routines.read().get(&id).map(|s| RoutineHandle { shared: s.clone() })
    }

    /// The live routine with this name.
    pub fn get_by_name(&self, name: &str) -> Option<RoutineHandle> {
        self.inner.by_name.read().get(name).map(|s| RoutineHandle { shared: s.clone() })
    }

    /// Every live routine, by id.
    pub fn list(&self) -> Vec<RoutineHandle> {
        let mut v: Vec<RoutineHandle> = self
            .inner
            .routines
            .read()
            .values()
            .map(|s| RoutineHandle { shared: s.clone() })
            .collect();
        v.sort_by_key(|h| h.id());
        v
    }

    pub(crate) fn shared_list(&self) -> Vec<Arc<RoutineShared>> {
        let mut v: Vec<Arc<RoutineShared>> = self.inner.routines.read().values().cloned().collect();
        v.sort_by_key(|r| r.id);
        v
    }

    /// Snapshots of every live routine, by id.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.list().iter().map(|h| h.snapshot()).collect()
    }

    /// Snapshots of finished routines, oldest first (a bounded ring).
    pub fn history(&self) -> Vec<Snapshot> {
        self.inner.history.lock().iter().cloned().collect()
    }

    /// Stats of every bus topic.
    pub fn topics(&self) -> Vec<TopicStats> {
        self.inner.bus.topics()
    }

    /// Asks every live routine to stop (each gets its grace period, then is killed).
    pub fn kill_all(&self) {
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
    let mut killed = Vec::new();
    if tokio::time::timeout_at(kill_at, inner.tracker.wait()).await.is_err() {
        let remaining: Vec<Arc<RoutineShared>> = inner.routines.read().values().cloned().collect();
        for r in &remaining {
            killed.push(r.name.clone());
            r.hard_kill();
        }
    }
    let mut unstoppable = Vec::new();
    if tokio::time::timeout_at(deadline, inner.tracker.wait()).await.is_err() {
        for r in inner.routines.read().values() {
            unstoppable.push(r.name.clone());
        }
    }
    inner.bus.close_all();
    killed.retain(|n| !unstoppable.contains(n));
    killed.sort();
    unstoppable.sort();
    ShutdownReport { stopped: live.len().saturating_sub(unstoppable.len()), killed, unstoppable }
}

/// A future that adds the time spent in each of its polls to a counter: exact CPU time of
/// the routine's work on the executor thread (wasm execution and host-side work alike).
struct Timed<'a, F> {
    fut: F,
    busy: &'a AtomicU64,
}

impl<F: Future + Unpin> Future for Timed<'_, F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let start = Instant::now();
        let r = Pin::new(&mut self.fut).poll(cx);
        self.busy.fetch_add(dur_nanos(start.elapsed()), Relaxed);
        r
    }
}

/// Completes when the routine has not beaten for its idle timeout.
async fn idle_watchdog(shared: &RoutineShared) {
    let Some(timeout) = shared.idle_timeout else {
        return std::future::pending().await;
    };
    loop {
        let idle = shared.idle_for();
        if idle >= timeout {
            return;
        }
        tokio::time::sleep(timeout - idle).await;
    }
}

/// The routine's task: runs the work, restarts it as its supervision says, and records the
/// end. Each run gets fresh stop signals; the routine's id, name and mailbox stay.
async fn drive(orch: Arc<OrchInner>, shared: Arc<RoutineShared>, work: Arc<dyn Work>) {
    // Make sure the routine is finalized even if this task is aborted.
    let mut guard = FinishGuard { orch: orch.clone(), shared: shared.clone(), armed: true };
    let sup = &shared.supervision;
    let mut window = RestartWindow::default();
    let mut attempt: u32 = 0;
    let group = shared.group.clone();
    let state = loop {
        let run = Arc::new(RunControl::new(&shared.stop));
        *shared.current_run.lock() = Some(run.clone());
        let ctx = RoutineContext { shared: shared.clone(), orch: orch.clone(), run: run.clone() };
        // tokio's clock, so that paused-time tests see real backoff and windows.
        let started = tokio::time::Instant::now();
        let state = run_once(&shared, &run, ctx, &*work).await;
        shared.count_termination(state);
        let by_group = run.group_restart.load(Relaxed) && !shared.stop.is_cancelled();
        if state == State::Stopped && !run.cancel.is_cancelled() {
            // A clean return acknowledges the message in flight.
            *shared.in_flight.lock() = None;
        } else {
            requeue_in_flight(&orch, &shared);
        }
        if let Some(reason) = group.as_ref().and_then(|g| g.gave_up()) {
            shared.set_last_error(Some(reason));
            break State::Failed;
        }
        if shared.stop.is_cancelled() {
            break state;
        }
        let delay = if by_group {
            // Restarted along with another member: no backoff of its own.
            Duration::ZERO
        } else {
            if !sup.restart.restarts_after(state) {
                break state;
            }
            if started.elapsed() >= sup.backoff.stable_after {
                attempt = 0;
            }
            let last = shared.last_error.lock().clone().unwrap_or_else(|| state.to_string());
            let now = tokio::time::Instant::now();
            match &group {
                Some(g) => {
                    if !g.allow_restart(now, &last) {
                        shared.set_last_error(g.gave_up());
                        break State::Failed;
                    }
                    g.restart_others(&shared);
                }
                None => {
                    if !window.allow(&sup.intensity, now) {
                        shared.set_last_error(Some(format!(
                            "gave up: more than {} restarts within {}; last: {last}",
                            sup.intensity.max_restarts,
                            humantime::format_duration(sup.intensity.within)
                        )));
                        break State::Failed;
                    }
                }
            }
            let delay = sup.backoff.delay(attempt, rand::random::<f64>());
            attempt = attempt.saturating_add(1);
            tracing::info!(
                routine = %shared.name,
                "{state}; restarting in {}",
                humantime::format_duration(round_ms(delay))
            );
            delay
        };
        shared.set_state(State::Backoff);
        if delay.is_zero() {
            // The timer wheel has millisecond resolution: a zero sleep would cost 1 ms. Still
            // yield, so that a routine failing at once cannot monopolize its worker thread.
            tokio::task::yield_now().await;
            if shared.stop.is_cancelled() {
                break State::Stopped;
            }
        } else {
            tokio::select! {
                biased;
                _ = shared.stop.cancelled() => break State::Stopped,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        // Members of a group restart in start order.
        if let Some(g) = &group
            && !wait_turn(g, &shared).await
        {
            break State::Stopped;
        }
        shared.restarts.fetch_add(1, Relaxed);
    };
    guard.armed = false;
    finish(&orch, &shared, state);
}

/// Waits until every member started before this one is running again; false if the
/// routine is stopped meanwhile.
async fn wait_turn(g: &GroupInner, shared: &RoutineShared) -> bool {
    loop {
        let changed = g.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if g.my_turn(shared) {
            return true;
        }
        tokio::select! {
            _ = shared.stop.cancelled() => return false,
            _ = changed => {}
        }
    }
}

/// One run: start the work, watch for stop requests and the idle timeout, enforce the grace
/// period and the kill. Returns the state the run ended in.
async fn run_once(
    shared: &RoutineShared,
    run: &RunControl,
    ctx: RoutineContext,
    work: &dyn Work,
) -> State {
    shared.started_at.store(now_nanos(), Relaxed);
    shared.beat();
    shared.set_state(State::Running);
    let fut = work.start(ctx);
    let mut timed = Timed { fut, busy: &shared.busy_ns };

    let outcome = tokio::select! {
        biased;
        o = &mut timed => o,
        _ = run.cancel.cancelled() => stop_run(shared, run, &mut timed, work).await,
        _ = idle_watchdog(shared) => {
            let idle = shared.idle_for();
            run.idle_timed_out.store(true, Relaxed);
            run.cancel.cancel();
            shared.set_last_error(Some(format!(
                "idle timeout: no beat for {}",
                humantime::format_duration(round_ms(idle))
            )));
            stop_run(shared, run, &mut timed, work).await
        }
    };
    drop(timed);
    shared.started_at.store(0, Relaxed);
    shared.memory_bytes.store(0, Relaxed);

    if run.idle_timed_out.load(Relaxed) {
        return State::TimedOut;
    }
    let requested = shared.stop.is_cancelled();
    match outcome {
        Outcome::Ok => State::Stopped,
        Outcome::Killed => {
            shared.set_last_error(Some("killed".to_string()));
            State::Stopped
        }
        Outcome::Err(e) => {
            shared.set_last_error(Some(e));
            if requested { State::Stopped } else { State::Failed }
        }
        Outcome::Panicked(e) => {
            shared.set_last_error(Some(e));
            if requested { State::Stopped } else { State::Panicked }
        }
    }
}

/// After a run that did not end cleanly: the message in flight goes back to the head of the
/// queue it came from, or to `dead-letter` once it has been delivered `max-deliveries` times.
fn requeue_in_flight(orch: &OrchInner, shared: &RoutineShared) {
    let Some(InFlight { msg, source }) = shared.in_flight.lock().take() else { return };
    if msg.deliveries >= shared.supervision.max_deliveries {
        dead_letter(orch, shared, msg, &source);
        return;
    }
    let back = match &source {
        Source::Mailbox => shared.mailbox.push_front(msg),
        Source::Topic(_, ch) => ch.push_front(msg),
    };
    if back.is_err() {
        tracing::warn!(routine = %shared.name, "in-flight message dropped: its queue is closed");
    }
}

/// The topic that receives messages delivered `max-deliveries` times without success.
pub const DEAD_LETTER_TOPIC: &str = "dead-letter";

/// A dead letter, as JSON on the `dead-letter` topic.
#[derive(serde::Serialize)]
struct DeadLetter<'a> {
    routine: &'a str,
    error: Option<String>,
    source: String,
    deliveries: u32,
    payload: &'a [u8],
}

fn dead_letter(orch: &OrchInner, shared: &RoutineShared, msg: Message, source: &Source) {
    let letter = DeadLetter {
        routine: &shared.name,
        error: shared.last_error.lock().clone(),
        source: match source {
            Source::Mailbox => "mailbox".to_string(),
            Source::Topic(t, _) => format!("topic:{t}"),
        },
        deliveries: msg.deliveries,
        payload: &msg.payload,
    };
    let json = serde_json::to_vec(&letter).unwrap_or_default();
    shared.dead_letters.fetch_add(1, Relaxed);
    tracing::warn!(
        routine = %shared.name,
        "message from {} failed {} deliveries: sent to {DEAD_LETTER_TOPIC}",
        letter.source,
        msg.deliveries
    );
    match orch.topic(DEAD_LETTER_TOPIC) {
        Ok(ch) => {
            if ch.try_send(Message::from(json)).is_err() {
                tracing::error!("the {DEAD_LETTER_TOPIC} topic is full; a dead letter was dropped");
            }
        }
        Err(e) => tracing::error!("cannot reach the {DEAD_LETTER_TOPIC} topic: {e}"),
    }
}

/// The stop sequence after a stop request: wait for the run to return within the grace
/// period (or until a hard kill), then kill it.
async fn stop_run<F>(
    shared: &RoutineShared,
    run: &RunControl,
    fut: &mut F,
    work: &dyn Work,
) -> Outcome
where
    F: Future<Output = Outcome> + Unpin,
{
    shared.set_state(State::Stopping);
    tokio::select! {
        biased;
        o = &mut *fut => return o,
        _ = tokio::time::sleep(shared.grace) => {}
        _ = shared.kill.cancelled() => {}
    }
    run.killed.store(true, Relaxed);
    if work.interruptible() {
        // The epoch callback traps the instance at its next tick; a guest blocked in a
        // host call that does not watch cancellation is dropped after the wait.
        if let Ok(o) = tokio::time::timeout(KILL_WAIT, &mut *fut).await {
            return match o {
                Outcome::Panicked(_) | Outcome::Killed => Outcome::Killed,
                other => other,
            };
        }
    }
    Outcome::Killed
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn finish(orch: &OrchInner, shared: &Arc<RoutineShared>, state: State) {
    shared.started_at.store(0, Relaxed);
    shared.memory_bytes.store(0, Relaxed);
    shared.mailbox.close();
    orch.routines.write().remove(&shared.id);
    {
        let mut by_name = orch.by_name.write();
        if by_name.get(&shared.name).is_some_and(|r| Arc::ptr_eq(r, shared)) {
            by_name.remove(&shared.name);
        }
    }
    shared.set_state(state);
    let snap = shared.snapshot();
    {
        let mut h = orch.history.lock();
        if h.len() >= orch.history_cap {
            h.pop_front();
        }
        h.push_back(snap);
    }
    match state {
        State::Stopped => tracing::info!(routine = %shared.name, "routine ended: {state}"),
        _ => tracing::warn!(
            routine = %shared.name,
            error = shared.last_error.lock().as_deref().unwrap_or(""),
            "routine ended: {state}"
        ),
    }
    shared.finish(state);
}

struct FinishGuard {
    orch: Arc<OrchInner>,
    shared: Arc<RoutineShared>,
    armed: bool,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.set_last_error(Some("aborted: could not be stopped in time".into()));
            finish(&self.orch, &self.shared, State::Stopped);
        }
    }
}

/// Writes the stats table (shared by `print_stats` and `gorch-host ps`).
pub fn write_stats_table(w: &mut dyn io::Write, snaps: &[Snapshot]) -> io::Result<()> {
    writeln!(
        w,
        "{:>5}  {:<20} {:<12} {:<9} {:<12} {:>4} {:>9} {:>8} {:>9} {:>12} {:>9} {:>9} {:>8} {:>8}  LAST ERROR",
        "ID",
        "NAME",
        "PLUGIN",
        "STATE",
        "HEALTH",
        "RST",
        "UPTIME",
        "IDLE",
        "BUSY",
        "FUEL",
        "MEM",
        "QUEUE",
        "IN",
        "OUT"
    )?;
    for s in snaps {
        writeln!(
            w,
            "{:>5}  {:<20} {:<12} {:<9} {:<12} {:>4} {:>8.1}s {:>7.1}s {:>8.3}s {:>12} {:>9} {:>9} {:>8} {:>8}  {}",
            s.id,
            truncate(&s.name, 20),
            truncate(&s.plugin, 12),
            s.state.as_str(),
            s.health.as_str(),
            s.restarts,
            s.uptime_seconds,
            s.idle_seconds,
            s.busy_seconds,
            s.fuel_consumed,
            human_bytes(s.memory_bytes),
            format!("{}/{}", s.queue_len, s.queue_cap),
            s.messages_in,
            s.messages_out,
            s.last_error
                .as_deref()
                .map(|e| truncate(e.lines().next().unwrap_or(""), 60))
                .unwrap_or_default(),
        )?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `65536` → `64.0KiB`.
pub(crate) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 { format!("{b}B") } else { format!("{v:.1}{}", UNITS[i]) }
}
