//! [`RoutineShared`]: everything about a routine that outlives a single run (identity,
//! settings, counters, mailbox, stop signals), and [`RunControl`], the stop signals of one
//! run. The fields are private: the driver, the context, the wasm runtime and the metrics
//! reach them through the methods below, each named after what it does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::channel::Channel;
use crate::clock::{nanos, now_nanos};
use crate::delivery::{InFlightSlot, Message};
use crate::logguard::LogLimiter;
use crate::routine::snapshot::Snapshot;
use crate::routine::state::{Health, State};
use crate::routine::upgrade::UpgradeSlot;
use crate::routine::work::Work;
use crate::supervisor::{GroupInner, Supervision};

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
    /// The run was ended by a restart request (`RoutineHandle::restart`, the HTTP route).
    pub restart_requested: AtomicBool,
}

impl RunControl {
    fn new(stop: &CancellationToken) -> Self {
        RunControl {
            cancel: stop.child_token(),
            killed: AtomicBool::new(false),
            idle_timed_out: AtomicBool::new(false),
            group_restart: AtomicBool::new(false),
            restart_requested: AtomicBool::new(false),
        }
    }
}

/// What a routine is given at spawn and keeps for its whole life.
pub(crate) struct Settings {
    /// Unique name on this host.
    pub name: String,
    /// Mailbox capacity.
    pub queue_capacity: usize,
    /// Idle watchdog (`None` or zero: off).
    pub idle_timeout: Option<Duration>,
    /// Time between a stop request and the kill.
    pub grace: Duration,
    /// Largest payload it may send or publish.
    pub message_bytes: u64,
    /// Restart policy, backoff, intensity, `max-deliveries`.
    pub supervision: Supervision,
    /// The group it belongs to.
    pub group: Option<Arc<GroupInner>>,
}

/// See the module documentation.
pub(crate) struct RoutineShared {
    id: u64,
    name: String,
    plugin: String,
    state: AtomicU8,
    restarts: AtomicU64,
    /// `now_nanos()` when the current run started; 0 when not running.
    started_at: AtomicU64,
    last_beat: AtomicU64,
    busy_ns: AtomicU64,
    fuel: AtomicU64,
    /// Whether the code it runs counts fuel (`Work::counts_fuel`): else `fuelConsumed` is
    /// absent. Follows the code across upgrades.
    counts_fuel: AtomicBool,
    memory_bytes: AtomicU64,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    last_error: Mutex<Option<String>>,
    idle_timeout: Option<Duration>,
    grace: Duration,
    message_bytes: u64,
    mailbox: Channel<Message>,
    supervision: Supervision,
    group: Option<Arc<GroupInner>>,
    /// The current run's stop signals (for the group to end it).
    current_run: Mutex<Option<Arc<RunControl>>>,
    in_flight: InFlightSlot,
    /// Summarizes the lines a restart storm repeats.
    log_limiter: LogLimiter,
    dead_letters: AtomicU64,
    /// Runs ended, by end state (in the order of [`State::TERMINAL`]).
    terminations: [AtomicU64; 4],
    /// Stop on request (permanent: no restart follows).
    stop: CancellationToken,
    /// Hard stop: skip what is left of the grace period.
    kill: CancellationToken,
    /// Wakes a routine waiting in `BACKOFF` when a restart is requested.
    restart_wake: tokio::sync::Notify,
    /// Live upgrades: pending code, hand-over, version, count.
    upgrade: UpgradeSlot,

    done: watch::Sender<Option<State>>,
}

impl RoutineShared {
    pub fn new(id: u64, opts: Settings, plugin: String, version: String) -> Self {
        RoutineShared {
            id,
            name: opts.name,
            plugin,
            state: AtomicU8::new(State::Init as u8),
            restarts: AtomicU64::new(0),
            started_at: AtomicU64::new(0),
            last_beat: AtomicU64::new(now_nanos()),
            busy_ns: AtomicU64::new(0),
            fuel: AtomicU64::new(0),
            counts_fuel: AtomicBool::new(true),
            memory_bytes: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            last_error: Mutex::new(None),
            idle_timeout: opts.idle_timeout.filter(|d| !d.is_zero()),
            grace: opts.grace,
            message_bytes: opts.message_bytes,
            mailbox: Channel::new(opts.queue_capacity),
            supervision: opts.supervision.clone(),
            group: opts.group,
            current_run: Mutex::new(None),
            in_flight: InFlightSlot::default(),
            log_limiter: LogLimiter::default(),
            dead_letters: AtomicU64::new(0),
            terminations: Default::default(),
            stop: CancellationToken::new(),
            kill: CancellationToken::new(),
            restart_wake: tokio::sync::Notify::new(),
            upgrade: UpgradeSlot::new(version, opts.supervision.rollback_window),

            done: watch::channel(None).0,
        }
    }

    // ---- identity and settings (fixed at spawn) ----

    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The plugin the routine runs (the file stem; empty for a native routine).
    pub fn plugin(&self) -> &str {
        &self.plugin
    }
    pub fn supervision(&self) -> &Supervision {
        &self.supervision
    }
    pub fn group(&self) -> Option<&Arc<GroupInner>> {
        self.group.as_ref()
    }
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }
    pub fn grace(&self) -> Duration {
        self.grace
    }
    /// The largest payload this routine may send or publish.
    pub fn message_bytes(&self) -> u64 {
        self.message_bytes
    }
    pub fn mailbox(&self) -> &Channel<Message> {
        &self.mailbox
    }
    /// The log rate limiter of this routine (restart storms).
    pub fn log_limiter(&self) -> &LogLimiter {
        &self.log_limiter
    }
    /// The message this routine is processing (see `delivery`).
    pub fn in_flight(&self) -> &InFlightSlot {
        &self.in_flight
    }

    // ---- state ----

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

    /// Records the final state and wakes everyone waiting for the end.
    pub fn finish(&self, s: State) {
        self.set_state(s);
        self.done.send_replace(Some(s));
    }

    /// Waits until the routine has ended for good.
    pub async fn wait(&self) -> State {
        let mut rx = self.done.subscribe();
        loop {
            if let Some(s) = *rx.borrow_and_update() {
                return s;
            }
            if rx.changed().await.is_err() {
                return self.state();
            }
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    pub fn set_last_error(&self, e: Option<String>) {
        *self.last_error.lock() = e;
    }

    // ---- runs ----

    /// Starts a run: fresh stop signals (kept for the group to end the run), the start
    /// time, a heartbeat, `RUNNING`.
    pub fn begin_run(&self) -> Arc<RunControl> {
        let run = Arc::new(RunControl::new(&self.stop));
        *self.current_run.lock() = Some(run.clone());
        self.started_at.store(now_nanos(), Relaxed);
        self.beat();
        self.set_state(State::Running);
        if self.upgrade_pending() {
            // Requested while this run was being set up: end it at once, the new code waits.
            run.cancel.cancel();
        }
        run
    }

    /// The run ended: no uptime, no linear memory.
    pub fn end_run(&self) {
        self.started_at.store(0, Relaxed);
        self.memory_bytes.store(0, Relaxed);
    }

    /// Ends the current run (a stop request to it alone), marking why with `why`.
    fn end_current_run(&self, why: impl FnOnce(&RunControl)) {
        if let Some(run) = self.current_run.lock().as_ref() {
            why(run);
            run.cancel.cancel();
        }
    }

    /// Ends the current run so that the routine restarts with its group.
    pub fn restart_by_group(&self) {
        self.end_current_run(|run| run.group_restart.store(true, Relaxed));
    }

    /// Asks for a restart now: the current run is stopped (grace period, then kill) and a
    /// new one starts at once; a routine waiting in `BACKOFF` starts at once. Neither a
    /// backoff nor the intensity limit applies: it is not a failure.
    pub fn request_restart(&self) {
        self.end_current_run(|run| run.restart_requested.store(true, Relaxed));
        // No stored permit: a request that finds no backoff must not cut a later one short.
        self.restart_wake.notify_waiters();
    }

    /// Completes when a restart or an upgrade was requested (ends a backoff early), also
    /// when it was requested just before the wait began.
    pub async fn restart_requested_wait(&self) {
        let woken = self.restart_wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let asked = self.upgrade_pending()
            || self.current_run.lock().as_ref().is_some_and(|r| r.restart_requested.load(Relaxed));
        if !asked {
            woken.await
        }
    }

    /// Asks to replace the routine's code with `work`: the current run is stopped on
    /// request (grace period, then kill; its in-flight message goes back to the head of the
    /// mailbox), then `work` runs under the same name, with the same mailbox. Not a failure:
    /// no backoff, no intensity count. A later request replaces an earlier pending one.
    /// Returns the request's number (see [`UpgradeSlot::wait`]).
    pub fn request_upgrade(&self, work: Arc<dyn Work>) -> u64 {
        let seq = self.upgrade.request(work);
        self.end_current_run(|_| {});
        self.restart_wake.notify_waiters();
        seq
    }

    /// The live-upgrade state.
    pub fn upgrade(&self) -> &UpgradeSlot {
        &self.upgrade
    }

    /// Whether a new version may still be rolled back (its rollback window; a member of a
    /// group is not rolled back): a message it crashes on is then not counted against
    /// `max-deliveries`, it goes back for the version that may come back.
    pub fn rollback_possible(&self) -> bool {
        self.group.is_none() && self.upgrade.keeps_previous()
    }

    /// `max-deliveries`, or no limit while [`rollback_possible`](Self::rollback_possible).
    pub fn max_deliveries(&self) -> u32 {
        match self.rollback_possible() {
            true => u32::MAX,
            false => self.supervision.max_deliveries,
        }
    }

    /// True while an upgrade waits for the current run to end.
    pub fn upgrade_pending(&self) -> bool {
        self.upgrade.is_pending()
    }

    pub fn upgrades(&self) -> u64 {
        self.upgrade.upgrades()
    }

    pub fn version(&self) -> String {
        self.upgrade.version()
    }

    /// Asks the routine to stop for good (no restart follows).
    pub fn request_stop(&self) {
        self.stop.cancel();
    }

    /// Stops the routine without waiting for the grace period.
    pub fn hard_kill(&self) {
        self.stop.cancel();
        self.kill.cancel();
    }

    /// True once a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Completes when a stop is requested.
    pub async fn stop_requested_wait(&self) {
        self.stop.cancelled().await
    }

    /// Completes when a hard kill is requested.
    pub async fn kill_requested(&self) {
        self.kill.cancelled().await
    }

    // ---- counters ----

    pub fn beat(&self) {
        self.last_beat.store(now_nanos(), Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        Duration::from_nanos(now_nanos().saturating_sub(self.last_beat.load(Relaxed)))
    }

    pub fn add_busy(&self, d: Duration) {
        self.busy_ns.fetch_add(nanos(d), Relaxed);
    }

    pub fn fuel(&self) -> u64 {
        self.fuel.load(Relaxed)
    }

    pub fn set_fuel(&self, total: u64) {
        self.fuel.store(total, Relaxed);
    }

    /// Whether the code it now runs counts fuel (set at spawn and when the code changes).
    pub fn set_counts_fuel(&self, counts: bool) {
        self.counts_fuel.store(counts, Relaxed);
    }

    /// The fuel used, all runs; `None` when no code it ran counted fuel. A routine switched
    /// to `metering = "time"` by a reload keeps what it counted before (a counter that
    /// vanished or fell would read as a reset to Prometheus).
    pub fn fuel_consumed(&self) -> Option<u64> {
        let fuel = self.fuel();
        (self.counts_fuel.load(Relaxed) || fuel > 0).then_some(fuel)
    }

    pub fn set_memory(&self, bytes: u64) {
        self.memory_bytes.store(bytes, Relaxed);
    }

    pub fn count_in_n(&self, n: u64) {
        self.messages_in.fetch_add(n, Relaxed);
    }

    pub fn count_out(&self) {
        self.messages_out.fetch_add(1, Relaxed);
    }

    pub fn count_out_n(&self, n: u64) {
        self.messages_out.fetch_add(n, Relaxed);
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Relaxed)
    }

    pub fn count_restart(&self) {
        self.restarts.fetch_add(1, Relaxed);
    }

    /// Counts the end of a run in `state` (a final state).
    pub fn count_termination(&self, state: State) {
        if let Some(i) = State::TERMINAL.iter().position(|s| *s == state) {
            self.terminations[i].fetch_add(1, Relaxed);
        }
    }

    /// Runs ended so far, in the order of [`State::TERMINAL`].
    pub fn terminations(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.terminations[i].load(Relaxed))
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.load(Relaxed)
    }

    pub fn count_dead_letter(&self) {
        self.dead_letters.fetch_add(1, Relaxed);
    }

    // ---- views ----

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
            restarts: self.restarts(),
            uptime_seconds: if started == 0 { 0.0 } else { (now - started) as f64 / 1e9 },
            idle_seconds: self.idle_for().as_secs_f64(),
            busy_seconds: self.busy_ns.load(Relaxed) as f64 / 1e9,
            fuel_consumed: self.fuel_consumed(),
            memory_bytes: self.memory_bytes.load(Relaxed),
            queue_len: mb.len,
            queue_cap: mb.cap,
            queue_bytes: mb.approx_bytes,
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            last_error: self.last_error(),
            version: self.version(),
            upgrades: self.upgrades(),
        }
    }

    /// The figures `/metrics` adds up per plugin, read without building a snapshot.
    pub fn totals(&self) -> Totals<'_> {
        Totals {
            plugin: &self.plugin,
            state: self.state(),
            restarts: self.restarts(),
            busy_ns: self.busy_ns.load(Relaxed),
            fuel: self.fuel_consumed(),
            memory_bytes: self.memory_bytes.load(Relaxed),
            queue_len: self.mailbox.len(),
            messages_in: self.messages_in.load(Relaxed),
            messages_out: self.messages_out.load(Relaxed),
            dead_letters: self.dead_letters(),
        }
    }

    /// The busy-time counter, for the driver's timed polls.
    pub fn busy_counter(&self) -> &AtomicU64 {
        &self.busy_ns
    }
}

/// A routine's counters, as [`RoutineShared::totals`] reads them.
pub struct Totals<'a> {
    pub plugin: &'a str,
    pub state: State,
    pub restarts: u64,
    pub busy_ns: u64,
    /// `None` for code that does not count fuel (`metering = "time"`).
    pub fuel: Option<u64>,
    pub memory_bytes: u64,
    pub queue_len: usize,
    pub messages_in: u64,
    pub messages_out: u64,
    pub dead_letters: u64,
}

/// A plugin's routine counters added up: [`add_live`](Self::add_live) for what `/metrics`
/// sums at a scrape, [`add_ended`](Self::add_ended) for the orchestrator's running totals of
/// the routines that have left the host, so that the per-plugin counters never go down
/// when a routine ends (a counter that falls reads as a reset to Prometheus).
#[derive(Debug, Default, Clone)]
pub(crate) struct PluginSums {
    /// Live routines (gauge).
    pub routines: u64,
    pub restarts: u64,
    pub busy_ns: u64,
    /// `None` while no routine of the plugin has counted fuel.
    pub fuel: Option<u64>,
    /// Linear memory of the live routines (gauge).
    pub memory: u64,
    /// Messages queued for the live routines (gauge).
    pub queue: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub dead_letters: u64,
    /// Routines that have ended for good, by final state in the order of [`State::TERMINAL`].
    pub ended: [u64; 4],
}

impl PluginSums {
    /// Adds a live routine: its gauges and its counters.
    pub fn add_live(&mut self, t: &Totals<'_>) {
        self.routines += 1;
        self.memory += t.memory_bytes;
        self.queue += t.queue_len as u64;
        self.add_counters(t);
    }

    /// Adds a routine that has ended for good in `state`: its counters, and one end.
    pub fn add_ended(&mut self, t: &Totals<'_>, state: State) {
        self.add_counters(t);
        if let Some(i) = State::TERMINAL.iter().position(|s| *s == state) {
            self.ended[i] += 1;
        }
    }

    fn add_counters(&mut self, t: &Totals<'_>) {
        self.restarts += t.restarts;
        self.busy_ns += t.busy_ns;
        if let Some(fuel) = t.fuel {
            self.fuel = Some(self.fuel.unwrap_or(0) + fuel);
        }
        self.messages_in += t.messages_in;
        self.messages_out += t.messages_out;
        self.dead_letters += t.dead_letters;
    }
}
