//! The driver: the tokio task that runs one routine from spawn to its end. Each run gets
//! fresh stop signals; between runs the policy decides (restart after a backoff, or end);
//! during a run the driver watches for stop requests and the idle timeout, enforces the
//! grace period and the kill, and times every poll of the work (busy time).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::channel::Channel;
use crate::clock::{nanos, round_ms};
use crate::delivery::{self, Message};
use crate::logguard::{Kind, escape};
use crate::routine::{Outcome, RoutineContext, RoutineShared, RunControl, Snapshot, State, Work};
use crate::supervisor::group::GroupInner;
use crate::supervisor::policy::RestartWindow;
use crate::transport::{Link, Queue};

/// How long after the kill signal a wasm instance gets to reach an epoch check before its
/// future is dropped (it may be blocked in a host call that does not watch cancellation).
pub(crate) const KILL_WAIT: Duration = Duration::from_millis(100);

/// What the driver is handed by whoever keeps the routines (the orchestrator): where a
/// run's messages travel, and where a routine's past goes.
pub(crate) trait Keeper: Send + Sync {
    /// The transport link of a run of the routine `name`, whose mailbox is `mailbox`.
    fn link(&self, name: &str, mailbox: &Channel<Message>) -> Arc<dyn Link>;
    /// Keeps `snap` in the history of finished runs and routines.
    fn record_history(&self, snap: Snapshot);
    /// The routine has ended for good in `state`: it leaves the registry.
    fn retire(&self, shared: &Arc<RoutineShared>, state: State);
}

/// The routine's task: runs the work, restarts it as its supervision says, and records the
/// end. The routine's id, name and mailbox stay across runs.
pub(crate) async fn drive(
    keeper: Arc<dyn Keeper>,
    shared: Arc<RoutineShared>,
    work: Arc<dyn Work>,
) {
    // Make sure the routine is finalized even if this task is aborted.
    let mut guard = FinishGuard { keeper: keeper.clone(), shared: shared.clone(), armed: true };
    let mut restarts = Restarts::default();
    let mut work = work;
    let mut last = State::Init;
    let state = loop {
        // A live upgrade swaps the code between runs (also when it finds us in BACKOFF); a
        // failed one (the new version's `restore` refused the state) swaps it back.
        rollback(&*keeper, &shared, last, &mut work);
        if shared.upgrade_pending() {
            upgrade(&*keeper, &shared, last, &mut work);
        }
        let run = shared.begin_run();
        if !work.stateful() {
            // Nothing to restore: an upgrade to this code has succeeded by starting it.
            shared.upgrade().settle(Ok(()));
        }
        let link = keeper.link(shared.name(), shared.mailbox());
        let ctx = RoutineContext { shared: shared.clone(), run: run.clone(), link };
        // tokio's clock, so that paused-time tests see real backoff and windows.
        let started = tokio::time::Instant::now();
        let state = match shared.upgrade().keeps_previous() {
            false => run_once(&shared, &run, ctx, &*work).await,
            true => tokio::select! {
                biased;
                state = run_once(&shared, &run, ctx, &*work) => state,
                // Never ends: lets go of the previous version when the rollback window is
                // over (only after an upgrade: other runs do not pay for it).
                _ = shared.upgrade().expire() => unreachable!(),
            },
        };
        // A new version that ended before settling (it failed to start) is still the code.
        shared.upgrade().settle(Ok(()));
        last = state;
        shared.count_termination(state);
        let clean = state == State::Stopped && !run.cancel.is_cancelled();
        // `None` while the run's version may be rolled back: its crash is not the message's.
        let max = (!shared.rollback_possible()).then(|| shared.supervision().max_deliveries);
        let error = || shared.last_error();
        let counted = || shared.count_dead_letter();
        delivery::settle(shared.in_flight(), shared.name(), error, max, clean, counted);
        let delay = match next_step(&shared, &run, state, started, &mut restarts) {
            Step::End(state) => break state,
            Step::Restart(delay) => delay,
            Step::Upgrade => continue,
            Step::RollBack => {
                // The version that comes back starts afresh: no backoff, a new window.
                restarts = Restarts::default();
                continue;
            }
        };
        if !wait_backoff(&shared, delay).await {
            break State::Stopped;
        }
        shared.count_restart();
    };
    if shared.stop_requested() {
        // Stopped on request (a stop, a removed plugin, shutdown): what is queued ends
        // with it, said out loud.
        let left = shared.mailbox().len();
        if left > 0 {
            tracing::warn!(
                routine = %escape(shared.name()),
                "dropped {left} queued message(s) of its mailbox: the routine was stopped"
            );
        }
    } else {
        dead_letter_mailbox(&*keeper, &shared).await;
    }
    guard.armed = false;
    keeper.retire(&shared, state);
}

/// The routine ended for good on its own (it gave up, or its policy does not restart it):
/// its mailbox closes, and what is queued there goes to `dead-letter` (counted) instead of
/// vanishing with it.
async fn dead_letter_mailbox(keeper: &dyn Keeper, shared: &RoutineShared) {
    shared.mailbox().close();
    let link = keeper.link(shared.name(), shared.mailbox());
    let never = tokio_util::sync::CancellationToken::new();
    let mut out = Vec::new();
    while let Ok(Some(origin)) =
        link.recv(Queue::Mailbox, usize::MAX, Some(Duration::ZERO), &never, &mut out).await
    {
        let msgs = std::mem::take(&mut out);
        let counted = || shared.count_dead_letter();
        delivery::dead_letter_queued(&*origin, shared.name(), shared.last_error(), msgs, counted);
    }
}

/// The restart history of one routine: the backoff attempt and the intensity window.
#[derive(Default)]
struct Restarts {
    attempt: u32,
    window: RestartWindow,
}

enum Step {
    End(State),
    Restart(Duration),
    /// New code replaces the old at once (a live upgrade).
    Upgrade,
    /// The upgraded version gave up within the rollback window: the previous one comes back
    /// at once.
    RollBack,
}

/// Swaps in the upgrade's code; the old version's last run (which ended in `state`) goes
/// to the history, marked.
fn upgrade(keeper: &dyn Keeper, shared: &RoutineShared, state: State, work: &mut Arc<dyn Work>) {
    let old = shared.version();
    let mut snap = shared.snapshot();
    let Some(new) = shared.upgrade().swap_in(work) else { return };
    snap.state = state;
    snap.last_error = Some(format!("upgraded to version {}", new.version()));
    keeper.record_history(snap);
    tracing::info!(
        routine = %escape(shared.name()),
        "upgrading from version {old} to {}",
        new.version()
    );
    shared.set_counts_fuel(new.counts_fuel());
    *work = new;
}

/// Undoes an upgrade whose new version refused the handed-over state, or gave up within the
/// rollback window: the old code runs again and restores that state; the error is the
/// routine's last error, and the new version's last run (which ended in `state`) goes to the
/// history with it.
fn rollback(keeper: &dyn Keeper, shared: &RoutineShared, state: State, work: &mut Arc<dyn Work>) {
    let Some(s) = shared.upgrade().take_rollback() else { return };
    let why = s.failed.unwrap_or_default();
    let msg = format!(
        "upgrade to version {} failed: {why}; version {} started again",
        work.version(),
        s.previous_version
    );
    let mut snap = shared.snapshot();
    snap.state = state;
    snap.version = work.version();
    snap.last_error = Some(msg.clone());
    keeper.record_history(snap);
    tracing::warn!(routine = %escape(shared.name()), "{msg}");
    shared.set_last_error(Some(msg));
    shared.set_counts_fuel(s.previous.counts_fuel());
    *work = s.previous;
}

/// What follows a run that ended in `state`: the end of the routine, or a restart after a
/// delay (the policy, the intensity limit, the group's strategy and the backoff decide).
fn next_step(
    shared: &RoutineShared,
    run: &RunControl,
    state: State,
    started: tokio::time::Instant,
    restarts: &mut Restarts,
) -> Step {
    let group = shared.group();
    let by_group = run.group_restart.load(Relaxed) && !shared.stop_requested();
    if let Some(reason) = group.and_then(|g| g.gave_up()) {
        shared.set_last_error(Some(reason));
        return Step::End(State::Failed);
    }
    if shared.stop_requested() {
        return Step::End(state);
    }
    if shared.upgrade_pending() || shared.upgrade().rollback_pending() {
        // Whatever ended the run (the upgrade's stop request, or a crash meanwhile): the
        // new version (or, when it refused the state, the old one again) starts now, with
        // no backoff and no intensity count.
        return Step::Upgrade;
    }
    if by_group || run.restart_requested.load(Relaxed) {
        // Restarted along with another member, or on request: no backoff, no intensity.
        return Step::Restart(Duration::ZERO);
    }
    let sup = shared.supervision();
    if !sup.restart.restarts_after(state) {
        // A new version that fails where its policy does not restart: as one that gives up.
        let why = || {
            let last = shared.last_error().unwrap_or_else(|| state.to_string());
            format!(
                "it ended {state} and its restart policy does not restart it; last: {last} \
                 (within {} of the upgrade: rolled back)",
                humantime::format_duration(sup.rollback_window)
            )
        };
        let alone = shared.group().is_none();
        if alone && state != State::Stopped && shared.upgrade().crash_rollback(why()) {
            return Step::RollBack;
        }
        return Step::End(state);
    }
    if started.elapsed() >= sup.backoff.stable_after {
        restarts.attempt = 0;
    }
    let last = shared.last_error().unwrap_or_else(|| state.to_string());
    let now = tokio::time::Instant::now();
    match group {
        Some(g) => {
            if !g.allow_restart(now, &last) {
                shared.set_last_error(g.gave_up());
                return Step::End(State::Failed);
            }
            g.restart_others(shared);
        }
        None => {
            if !restarts.window.allow(&sup.intensity, now) {
                let gave_up = format!(
                    "gave up: more than {} restarts within {}; last: {last}",
                    sup.intensity.max_restarts,
                    humantime::format_duration(sup.intensity.within)
                );
                let window = sup.rollback_window;
                let why = format!(
                    "it {gave_up} (within {} of the upgrade: rolled back)",
                    humantime::format_duration(window)
                );
                if shared.upgrade().crash_rollback(why) {
                    return Step::RollBack;
                }
                shared.set_last_error(Some(gave_up));
                return Step::End(State::Failed);
            }
        }
    }
    let delay = sup.backoff.delay(restarts.attempt, rand::random::<f64>());
    restarts.attempt = restarts.attempt.saturating_add(1);
    // A restart storm logs the first restarts of each window, then one summary.
    if shared.log_limiter().admit(Kind::Restart, shared.name()) {
        tracing::info!(
            routine = %escape(shared.name()),
            "{state}; restarting in {}",
            humantime::format_duration(round_ms(delay))
        );
    }
    Step::Restart(delay)
}

/// `BACKOFF` for `delay`, then (in a group) until it is this member's turn. False if the
/// routine was stopped meanwhile.
async fn wait_backoff(shared: &RoutineShared, delay: Duration) -> bool {
    shared.set_state(State::Backoff);
    if delay.is_zero() {
        // The timer wheel has millisecond resolution: a zero sleep would cost 1 ms. Still
        // yield, so that a routine failing at once cannot monopolize its worker thread.
        tokio::task::yield_now().await;
        if shared.stop_requested() {
            return false;
        }
    } else {
        tokio::select! {
            biased;
            _ = shared.stop_requested_wait() => return false,
            _ = shared.restart_requested_wait() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
    // Members of a group restart in start order.
    match shared.group() {
        Some(g) => wait_turn(g, shared).await,
        None => true,
    }
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
            _ = shared.stop_requested_wait() => return false,
            // An upgrade or a requested restart does not wait for the other members.
            _ = shared.restart_requested_wait() => return true,
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
    let fut = work.start(ctx);
    let mut timed = Timed { fut, busy: shared.busy_counter() };

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
    shared.end_run();

    if run.idle_timed_out.load(Relaxed) {
        return State::TimedOut;
    }
    // Ended because the host asked (a stop, a requested restart, an upgrade): not a failure.
    let requested =
        shared.stop_requested() || run.restart_requested.load(Relaxed) || shared.upgrade_pending();
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
        _ = tokio::time::sleep(shared.grace()) => {}
        _ = shared.kill_requested() => {}
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

/// Completes when the routine has not beaten for its idle timeout.
async fn idle_watchdog(shared: &RoutineShared) {
    let Some(timeout) = shared.idle_timeout() else {
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
        self.busy.fetch_add(nanos(start.elapsed()), Relaxed);
        r
    }
}

/// Finalizes the routine if its task is aborted (at the shutdown bound) before it ended.
struct FinishGuard {
    keeper: Arc<dyn Keeper>,
    shared: Arc<RoutineShared>,
    armed: bool,
}

impl Drop for FinishGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.set_last_error(Some("aborted: could not be stopped in time".into()));
            self.keeper.retire(&self.shared, State::Stopped);
        }
    }
}
