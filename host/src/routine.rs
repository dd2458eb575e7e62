//! A routine: one supervised unit of work (a wasm instance or a native async closure), its
//! state machine, counters, mailbox, and the handle and context that reach it.

use std::fmt;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};

use crate::supervisor::{GroupInner, Supervision};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::channel::{Channel, RecvError, SendError};
use crate::orchestrator::OrchInner;

/// Lifecycle state of a routine (DESIGN.md names; serialized in upper case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u8)]
pub enum State {
    /// Created, not yet running.
    Init = 0,
    /// Running.
    Running = 1,
    /// Waiting to be restarted by its supervisor.
    Backoff = 2,
    /// Asked to stop; waiting for it to return (or for the grace period to end).
    Stopping = 3,
    /// Returned `ok`, or was stopped on request.
    Stopped = 4,
    /// Returned `err`.
    Failed = 5,
    /// Stopped by the idle watchdog.
    TimedOut = 6,
    /// Trapped (guest panic, `unreachable`, out of bounds, stack overflow, out of fuel,
    /// memory limit) or, for native routines, panicked.
    Panicked = 7,
}

impl State {
    /// All states, in declaration order.
    pub const ALL: [State; 8] = [
        State::Init,
        State::Running,
        State::Backoff,
        State::Stopping,
        State::Stopped,
        State::Failed,
        State::TimedOut,
        State::Panicked,
    ];

    fn from_u8(v: u8) -> State {
        State::ALL[usize::from(v).min(7)]
    }

    /// True for the end states.
    pub fn is_final(self) -> bool {
        matches!(self, State::Stopped | State::Failed | State::TimedOut | State::Panicked)
    }

    /// The DESIGN.md name: `RUNNING`, `TIMED_OUT`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            State::Init => "INIT",
            State::Running => "RUNNING",
            State::Backoff => "BACKOFF",
            State::Stopping => "STOPPING",
            State::Stopped => "STOPPED",
            State::Failed => "FAILED",
            State::TimedOut => "TIMED_OUT",
            State::Panicked => "PANICKED",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The end states, in the order of `RoutineShared::terminations`.
pub(crate) const TERMINAL_STATES: [State; 4] =
    [State::Stopped, State::Failed, State::TimedOut, State::Panicked];

/// Health of a routine, derived from its state and heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Health {
    /// Running (and beating in time, if it has an idle timeout), or ended cleanly.
    Ok,
    /// No beat for more than half the idle timeout.
    Idle,
    /// Stopped by the idle watchdog.
    IdleTimeout,
    /// Waiting to restart.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Trapped or panicked.
    Panic,
    /// Returned an error.
    Failed,
}

impl Health {
    /// The DESIGN.md name: `OK`, `IDLE_TIMEOUT`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "OK",
            Health::Idle => "IDLE",
            Health::IdleTimeout => "IDLE_TIMEOUT",
            Health::Backoff => "BACKOFF",
            Health::Stopping => "STOPPING",
            Health::Panic => "PANIC",
            Health::Failed => "FAILED",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a routine's host call did not complete; mirrors the WIT `error` variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The routine is being stopped: return promptly.
    #[error("cancelled")]
    Cancelled,
    /// The mailbox or topic is closed and empty.
    #[error("closed")]
    Closed,
    /// No live routine has this name.
    #[error("no such routine: {0}")]
    NoSuchRoutine(String),
    /// The payload is larger than the per-message limit (bytes).
    #[error("payload too large (limit {0} bytes)")]
    TooLarge(u64),
    /// A host limit was reached.
    #[error("limit reached: {0}")]
    Limit(String),
    /// The topic or routine name is not valid.
    #[error("invalid name: {0}")]
    InvalidName(String),
}

/// Nanoseconds since a process-wide base instant: lets timestamps live in atomics.
pub(crate) fn now_nanos() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = *BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A message in a mailbox or topic: the payload, and how many times it was delivered
/// already (it is delivered again when its receiver crashes while processing it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The bytes.
    pub payload: Vec<u8>,
    /// Deliveries so far (0 for a message never received).
    pub deliveries: u32,
}

impl Message {
    /// A fresh message.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Message { payload: payload.into(), deliveries: 0 }
    }
}

impl From<Vec<u8>> for Message {
    fn from(payload: Vec<u8>) -> Self {
        Message { payload, deliveries: 0 }
    }
}

impl From<&[u8]> for Message {
    fn from(payload: &[u8]) -> Self {
        Message::new(payload)
    }
}

impl From<&str> for Message {
    fn from(payload: &str) -> Self {
        Message::new(payload.as_bytes())
    }
}

impl crate::channel::Sizer for Message {
    fn approx_size(&self) -> usize {
        self.payload.len()
    }
}

/// Where an in-flight message came from, so that a crash can put it back.
pub(crate) enum Source {
    Mailbox,
    Topic(String, Channel<Message>),
}

/// The message a routine received last, until its next receive or a clean return.
pub(crate) struct InFlight {
    pub msg: Message,
    pub source: Source,
}

/// Stop signals of one run (one instance): a restart gets fresh ones.
pub(crate) struct RunControl {
    /// Asks the run to stop: `cancelled()` turns true, blocking host calls return
    /// `cancelled`. A child of the routine's permanent stop token.
    pub cancel: CancellationToken,
    /// Set when the instance must die now: the epoch callback traps it at the next tick.
    pub killed: AtomicBool,
    /// The idle watchdog fired.
    pub idle_timed_out: AtomicBool,
    /// The run was ended by its group, to restart with another member.
    pub group_restart: AtomicBool,
}

impl RunControl {
    pub fn new(stop: &CancellationToken) -> Self {
        RunControl {
            cancel: stop.child_token(),
            killed: AtomicBool::new(false),
            idle_timed_out: AtomicBool::new(false),
            group_restart: AtomicBool::new(false),
        }
    }
}

/// Everything about a routine that outlives a single run: identity, counters, mailbox,
/// stop signals. Shared by the driver task, the handle, the context and the registry.
pub(crate) struct RoutineShared {
    pub id: u64,
    pub name: String,
    pub plugin: String,
    state: AtomicU8,
    pub restarts: AtomicU64,
    /// `now_nanos()` when the current run started; 0 when not running.
    pub started_at: AtomicU64,
    pub last_beat: AtomicU64,
    pub busy_ns: AtomicU64,
    pub fuel: AtomicU64,
    pub memory_bytes: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub idle_timeout: Option<Duration>,
    pub grace: Duration,
    pub message_bytes: u64,
    pub mailbox: Channel<Message>,
    pub supervision: Supervision,
    pub group: Option<Arc<GroupInner>>,
    /// The current run's stop signals (for the group to end it).
    pub current_run: Mutex<Option<Arc<RunControl>>>,
    pub in_flight: Mutex<Option<InFlight>>,
    pub dead_letters: AtomicU64,
    /// Runs ended, by end state (STOPPED, FAILED, TIMED_OUT, PANICKED).
    pub terminations: [AtomicU64; 4],
    /// Stop on request (permanent: no restart follows).
    pub stop: CancellationToken,
    /// Hard stop: skip what is left of the grace period.
    pub kill: CancellationToken,
    done: watch::Sender<Option<State>>,
}

impl RoutineShared {
    pub fn new(id: u64, opts: &crate::orchestrator::SpawnOptions, plugin: String) -> Self {
        RoutineShared {
            id,
            name: opts.name.clone(),
            plugin,
            state: AtomicU8::new(State::Init as u8),
            restarts: AtomicU64::new(0),
            started_at: AtomicU64::new(0),
            last_beat: AtomicU64::new(now_nanos()),
            busy_ns: AtomicU64::new(0),
            fuel: AtomicU64::new(0),
            memory_bytes: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            last_error: Mutex::new(None),
            idle_timeout: opts.idle_timeout.filter(|d| !d.is_zero()),
            grace: opts.grace,
            message_bytes: opts.message_bytes,
            mailbox: Channel::new(opts.queue_capacity),
            supervision: opts.supervision.clone(),
            group: opts.group.as_ref().map(|g| g.inner.clone()),
            current_run: Mutex::new(None),
            in_flight: Mutex::new(None),
            dead_letters: AtomicU64::new(0),
            terminations: Default::default(),
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            done: watch::channel(None).0,
        }
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Relaxed))
    }

    pub fn set_state(&self, s: State) {
        self.state.store(s as u8, Relaxed);
        if let Some(g) = &self.group
            && (s == State::Running || s.is_final())
        {
            g.changed.notify_waiters();
        }
    }

    pub fn beat(&self) {
        self.last_beat.store(now_nanos(), Relaxed);
    }

    /// Asks the routine to stop for good (no restart follows).
    pub fn request_stop(&self) {
        self.stop.cancel();
    }

    /// Counts the end of a run in `state` (a final state).
    pub fn count_termination(&self, state: State) {
        if let Some(i) = TERMINAL_STATES.iter().position(|s| *s == state) {
            self.terminations[i].fetch_add(1, Relaxed);
        }
    }

    /// Ends the current run so that the routine restarts with its group.
    pub fn restart_by_group(&self) {
        if let Some(run) = self.current_run.lock().as_ref() {
            run.group_restart.store(true, Relaxed);
            run.cancel.cancel();
        }
    }

    /// Stops the routine without waiting for the grace period.
    pub fn hard_kill(&self) {
        self.stop.cancel();
        self.kill.cancel();
    }

    pub fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock() = e;
    }

    pub fn finish(&self, s: State) {
        self.set_state(s);
        self.done.send_replace(Some(s));
    }

    pub fn health(&self) -> Health {
        match self.state() {
            State::Init | State::Stopped => Health::Ok,
            State::Running => match self.idle_timeout {
                Some(t) if self.idle_for() > t / 2 => Health::Idle,
                _ => Health::Ok,
            },
            State::Backoff => Health::Backoff,
            State::Stopping => Health::Stopping,
            State::Failed => Health::Failed,
            State::TimedOut => Health::IdleTimeout,
            State::Panicked => Health::Panic,
        }
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_nanos(now_nanos().saturating_sub(self.last_beat.load(Relaxed)))
    }

    pub fn snapshot(&self) -> Snapshot {
        let started = self.started_at.load(Relaxed);
        let now = now_nanos();
        let mb = self.mailbox.stats();
        Snapshot {
            id: self.id,
            name: self.name.clone(),
            plugin: self.plugin.clone(),
            state: self.state(),
            health: self.health(),
            restarts: self.restarts.load(Relaxed),
            uptime_seconds: if started == 0 { 0.0 } else { (now - started) as f64 / 1e9 },
            idle_seconds: self.idle_for().as_secs_f64(),
            busy_seconds: self.busy_ns.load(Relaxed) as f64 / 1e9,
            fuel_consumed: self.fuel.load(Relaxed),
            memory_bytes: self.memory_bytes.load(Relaxed),
            queue_len: mb.len,
            queue_cap: mb.cap,
            queue_bytes: mb.approx_bytes,
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }
}

/// A point-in-time view of a routine, as served by `/gorchestra/api/routines` (camelCase
/// JSON field names of DESIGN.md).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Stable id (unchanged across restarts).
    pub id: u64,
    /// Unique name.
    pub name: String,
    /// The plugin it came from (empty for native routines).
    pub plugin: String,
    /// Lifecycle state.
    pub state: State,
    /// Health.
    pub health: Health,
    /// Restarts so far.
    pub restarts: u64,
    /// Seconds since the current run started (0 when not running).
    pub uptime_seconds: f64,
    /// Seconds since the last heartbeat.
    pub idle_seconds: f64,
    /// CPU time of the routine's task plus `add-busy`, all runs.
    pub busy_seconds: f64,
    /// Wasm fuel units used, all runs.
    pub fuel_consumed: u64,
    /// Linear memory of the current instance.
    pub memory_bytes: u64,
    /// Messages in the mailbox.
    pub queue_len: usize,
    /// Mailbox capacity.
    pub queue_cap: usize,
    /// Approximate bytes in the mailbox.
    pub queue_bytes: usize,
    /// Messages taken from the mailbox and topics.
    pub messages_in: u64,
    /// Messages sent to mailboxes and published on topics.
    pub messages_out: u64,
    /// The last error, trap or stop reason.
    pub last_error: Option<String>,
}

/// A handle to a spawned routine. Cheap to clone; does not keep the routine alive.
#[derive(Clone)]
pub struct RoutineHandle {
    pub(crate) shared: Arc<RoutineShared>,
}

impl fmt::Debug for RoutineHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutineHandle")
            .field("id", &self.shared.id)
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish()
    }
}

impl RoutineHandle {
    /// Stable id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }
    /// Unique name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
    /// Current state.
    pub fn state(&self) -> State {
        self.shared.state()
    }
    /// Current health.
    pub fn health(&self) -> Health {
        self.shared.health()
    }
    /// Records a heartbeat on the routine's behalf.
    pub fn beat(&self) {
        self.shared.beat()
    }
    /// Adds busy time the host cannot observe.
    pub fn add_busy(&self, d: Duration) {
        self.shared.busy_ns.fetch_add(dur_nanos(d), Relaxed);
    }
    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Relaxed)
    }
    /// The routine's snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }
    /// The routine's mailbox (send to it from the host side).
    pub fn mailbox(&self) -> &Channel<Message> {
        &self.shared.mailbox
    }
    /// Asks the routine to stop: `cancelled()` turns true and blocking calls return
    /// `cancelled`; after the grace period a wasm instance is killed by epoch interruption.
    /// Returns at once; use [`wait`](Self::wait) for the end.
    pub fn kill(&self) {
        self.shared.request_stop();
    }
    /// Stops the routine now, without a grace period.
    pub fn kill_now(&self) {
        self.shared.hard_kill();
    }
    /// Waits until the routine has ended for good and returns its final state.
    pub async fn wait(&self) -> State {
        let mut rx = self.shared.done.subscribe();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                return self.state();
            }
        }
    }
}

pub(crate) fn dur_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// What a running routine uses to talk to the host: heartbeat, accounting, cancellation,
/// its mailbox, other routines' mailboxes and the bus. Native routines receive one; wasm
/// guests reach the same functions through the WIT imports.
#[derive(Clone)]
pub struct RoutineContext {
    pub(crate) shared: Arc<RoutineShared>,
    pub(crate) orch: Arc<OrchInner>,
    pub(crate) run: Arc<RunControl>,
}

impl fmt::Debug for RoutineContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutineContext").field("name", &self.shared.name).finish()
    }
}

impl RoutineContext {
    /// Stable id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }
    /// Unique name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }
    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Relaxed)
    }
    /// Heartbeat: resets the idle watchdog.
    pub fn beat(&self) {
        self.shared.beat()
    }
    /// Adds busy time the host cannot observe.
    pub fn add_busy(&self, d: Duration) {
        self.shared.busy_ns.fetch_add(dur_nanos(d), Relaxed);
    }
    /// True once the host has asked this routine to stop.
    pub fn is_cancelled(&self) -> bool {
        self.run.cancel.is_cancelled()
    }
    /// Completes when the host asks this routine to stop.
    pub async fn cancelled(&self) {
        self.run.cancel.cancelled().await
    }
    /// The cancellation token of the current stop request.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.run.cancel
    }
    /// Sleeps; returns false if cut short by cancellation.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.run.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Next message from this routine's mailbox; `None` timeout waits without limit;
    /// `Ok(None)` means the wait timed out.
    ///
    /// Receiving acknowledges the previous message; the one returned stays in flight until
    /// the next receive or a clean return (see [`crate::supervisor`]).
    pub async fn recv(&self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, CallError> {
        self.ack();
        let r = self.shared.mailbox.recv_until(Some(&self.run.cancel), timeout).await;
        self.took(r, || Source::Mailbox)
    }

    /// Delivers `payload` to the mailbox of the routine named `to`, waiting while it is full.
    pub async fn send(&self, to: &str, payload: Vec<u8>) -> Result<(), CallError> {
        self.check_size(payload.len())?;
        let target = self.orch.mailbox_of(to).ok_or_else(|| {
            if crate::bus::validate_routine_name(to).is_err() {
                CallError::InvalidName(to.to_string())
            } else {
                CallError::NoSuchRoutine(to.to_string())
            }
        })?;
        self.sent(target.send_cancellable(Message::from(payload), &self.run.cancel).await)
    }

    /// Publishes `payload` on `topic` (created on first use), waiting while it is full.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), CallError> {
        self.check_size(payload.len())?;
        let ch = self.orch.topic(topic)?;
        self.sent(ch.send_cancellable(Message::from(payload), &self.run.cancel).await)
    }

    /// Next message on `topic` (created on first use); `Ok(None)` means the wait timed out.
    /// Like [`recv`](Self::recv), the message stays in flight until the next receive.
    pub async fn bus_recv(
        &self,
        topic: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<Vec<u8>>, CallError> {
        let ch = self.orch.topic(topic)?;
        self.ack();
        let r = ch.recv_until(Some(&self.run.cancel), timeout).await;
        self.took(r, || Source::Topic(topic.to_string(), ch.clone()))
    }

    /// The previous message was processed: it is no longer in flight.
    fn ack(&self) {
        *self.shared.in_flight.lock() = None;
    }

    /// Writes a log line attributed to this routine.
    pub fn log(&self, level: tracing::Level, message: &str) {
        crate::wasm::log_line(&self.shared.name, level, message);
    }

    pub(crate) fn check_size(&self, len: usize) -> Result<(), CallError> {
        if len as u64 > self.shared.message_bytes {
            return Err(CallError::TooLarge(self.shared.message_bytes));
        }
        Ok(())
    }

    fn took(
        &self,
        r: Result<Message, RecvError>,
        source: impl FnOnce() -> Source,
    ) -> Result<Option<Vec<u8>>, CallError> {
        match r {
            Ok(mut m) => {
                self.shared.messages_in.fetch_add(1, Relaxed);
                m.deliveries += 1;
                let keep = Message { payload: m.payload.clone(), deliveries: m.deliveries };
                *self.shared.in_flight.lock() = Some(InFlight { msg: keep, source: source() });
                Ok(Some(m.payload))
            }
            Err(RecvError::Timeout) => Ok(None),
            Err(RecvError::Cancelled) => Err(CallError::Cancelled),
            Err(RecvError::Closed | RecvError::Empty) => Err(CallError::Closed),
        }
    }

    fn sent(&self, r: Result<(), SendError<Message>>) -> Result<(), CallError> {
        match r {
            Ok(()) => {
                self.shared.messages_out.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(SendError::Cancelled(_)) => Err(CallError::Cancelled),
            Err(SendError::Closed(_) | SendError::Full(_)) => Err(CallError::Closed),
        }
    }
}
