//! Supervision: restart policies, exponential backoff with jitter, restart intensity, and
//! the delivery guarantee across crashes.
//!
//! | policy | after `STOPPED` (returned ok) | after `FAILED` / `PANICKED` / `TIMED_OUT` | after a stop on request |
//! |---|---|---|---|
//! | `never` | ends | ends | ends |
//! | `on-failure` | ends | restarts after a backoff | ends |
//! | `always` | restarts after a backoff | restarts after a backoff | ends |
//!
//! Between restarts the routine is `BACKOFF` for `initial × multiplierⁿ` (capped at `max`),
//! scaled by `1 ± jitter·U` with `U` uniform in [0, 1); a run that lasted `stable-after`
//! resets `n` to 0. More than `max-restarts` restarts within `within` and the routine gives
//! up as `FAILED`, with the reason in `lastError`. Its id, name and mailbox survive restarts.
//!
//! Groups follow OTP's strategies: when a member is to be restarted, `one-for-one` restarts
//! only it, `one-for-all` stops and restarts every member, `rest-for-one` the members started
//! after it; members restart in start order. The group's intensity limit counts the
//! restarts of all its members; past it, the whole group ends (`FAILED`).
//!
//! Delivery: the message a routine received last (from its mailbox or a topic) stays in
//! flight until its next receive or until `run` returns `ok`. If the run ends any other way
//! (error, trap, idle timeout, kill), the message goes back to the head of the queue it came
//! from, so the restarted instance (or, for a topic, any consumer) receives it again first:
//! at-least-once. After `max-deliveries` deliveries it goes to the `dead-letter` topic instead.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::routine::{RoutineShared, State};

use serde::Deserialize;

/// When the supervisor restarts a routine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    Never,
    /// Restart after `FAILED`, `PANICKED` or `TIMED_OUT` (the default).
    #[default]
    OnFailure,
    /// Restart after every end but a stop on request.
    Always,
}

/// The `[backoff]` table: exponential backoff between restarts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawBackoff")]
pub struct Backoff {
    /// First delay (default 200ms).
    pub initial: Duration,
    /// Largest delay (default 5s).
    pub max: Duration,
    /// Factor between delays, at least 1 (default 2.0).
    pub multiplier: f64,
    /// Random spread: delay × (1 ± jitter·U), in [0, 1] (default 0.2).
    pub jitter: f64,
    /// A run that lasted this long resets the backoff (default 30s).
    pub stable_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            multiplier: 2.0,
            jitter: 0.2,
            stable_after: Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBackoff {
    #[serde(default, with = "humantime_serde::option")]
    initial: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    max: Option<Duration>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
    #[serde(default, with = "humantime_serde::option")]
    stable_after: Option<Duration>,
}

impl TryFrom<RawBackoff> for Backoff {
    type Error = String;
    fn try_from(r: RawBackoff) -> Result<Self, String> {
        let d = Backoff::default();
        let b = Backoff {
            initial: r.initial.unwrap_or(d.initial),
            max: r.max.unwrap_or(d.max),
            multiplier: r.multiplier.unwrap_or(d.multiplier),
            jitter: r.jitter.unwrap_or(d.jitter),
            stable_after: r.stable_after.unwrap_or(d.stable_after),
        };
        b.validate()?;
        Ok(b)
    }
}

impl Backoff {
    /// Checks the settings: multiplier ≥ 1, jitter in [0, 1], max ≥ initial.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(format!("backoff.multiplier must be at least 1, got {}", self.multiplier));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!("backoff.jitter must be between 0 and 1, got {}", self.jitter));
        }
        if self.max < self.initial {
            return Err(format!(
                "backoff.max ({}) is less than backoff.initial ({})",
                humantime::format_duration(self.max),
                humantime::format_duration(self.initial)
            ));
        }
        Ok(())
    }
}

/// The `[intensity]` table: at most `max-restarts` within `within`, then give up.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawIntensity")]
pub struct Intensity {
    /// Restarts allowed in the window (default 5).
    pub max_restarts: u32,
    /// The window (default 10s; not zero).
    pub within: Duration,
}

impl Default for Intensity {
    fn default() -> Self {
        Intensity { max_restarts: 5, within: Duration::from_secs(10) }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawIntensity {
    max_restarts: Option<u32>,
    #[serde(default, with = "humantime_serde::option")]
    within: Option<Duration>,
}

impl TryFrom<RawIntensity> for Intensity {
    type Error = String;
    fn try_from(r: RawIntensity) -> Result<Self, String> {
        let d = Intensity::default();
        let i = Intensity {
            max_restarts: r.max_restarts.unwrap_or(d.max_restarts),
            within: r.within.unwrap_or(d.within),
        };
        if i.within.is_zero() {
            return Err("intensity.within must not be zero".into());
        }
        Ok(i)
    }
}

/// A routine's supervision settings. `Default` never restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct Supervision {
    /// When to restart.
    pub restart: RestartPolicy,
    /// Delays between restarts.
    pub backoff: Backoff,
    /// How many restarts are too many.
    pub intensity: Intensity,
    /// Deliveries of one message before it goes to `dead-letter` (at least 1).
    pub max_deliveries: u32,
}

/// Default `max-deliveries`.
pub const DEFAULT_MAX_DELIVERIES: u32 = 3;

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            restart: RestartPolicy::Never,
            backoff: Backoff::default(),
            intensity: Intensity::default(),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
        }
    }
}

impl RestartPolicy {
    /// Whether a run that ended in `state` (not stopped on request) is restarted.
    pub fn restarts_after(self, state: crate::State) -> bool {
        use crate::State::*;
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => matches!(state, Failed | Panicked | TimedOut),
            RestartPolicy::Always => true,
        }
    }
}

impl Backoff {
    /// The delay before restart number `attempt` (0-based), before jitter:
    /// `initial × multiplier^attempt`, capped at `max`.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let f = self.multiplier.powi(attempt.min(1024) as i32);
        let secs = self.initial.as_secs_f64() * f;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay with jitter, `base × (1 + jitter × (2u − 1))` for `u` in [0, 1): within
    /// `base × (1 ± jitter)`.
    pub fn delay(&self, attempt: u32, u: f64) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        Duration::from_secs_f64((base * (1.0 + self.jitter * (2.0 * u - 1.0))).max(0.0))
    }
}

/// Counts restarts in a sliding window for the intensity limit.
#[derive(Debug, Default)]
pub(crate) struct RestartWindow {
    times: VecDeque<Instant>,
}

impl RestartWindow {
    /// Records a restart at `now`; false if that makes more than `max_restarts` within
    /// the window (the routine must give up).
    pub fn allow(&mut self, i: &Intensity, now: Instant) -> bool {
        while self.times.front().is_some_and(|t| now.duration_since(*t) >= i.within) {
            self.times.pop_front();
        }
        if self.times.len() as u64 >= u64::from(i.max_restarts) {
            return false;
        }
        self.times.push_back(now);
        true
    }
}

/// How a group restarts its members when one of them is to be restarted (OTP's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Restart only the member that ended.
    #[default]
    OneForOne,
    /// Restart every member.
    OneForAll,
    /// Restart the member that ended and those started after it.
    RestForOne,
}

/// A group of routines supervised together. Create it with
/// [`Orchestrator::group`](crate::Orchestrator::group), then spawn members with
/// [`SpawnOptions::group`](crate::SpawnOptions::group); start order is spawn order.
#[derive(Clone)]
pub struct Group {
    pub(crate) inner: Arc<GroupInner>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.inner.name)
            .field("strategy", &self.inner.strategy)
            .finish()
    }
}

impl Group {
    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }
    /// Its strategy.
    pub fn strategy(&self) -> Strategy {
        self.inner.strategy
    }
    /// Whether the group's intensity limit was exceeded (all members ended).
    pub fn gave_up(&self) -> bool {
        self.inner.gave_up.load(Relaxed)
    }
}

pub(crate) struct GroupInner {
    pub name: String,
    pub strategy: Strategy,
    pub intensity: Intensity,
    pub members: Mutex<Vec<Arc<RoutineShared>>>,
    window: Mutex<RestartWindow>,
    gave_up: AtomicBool,
    reason: Mutex<Option<String>>,
    /// Notified when a member starts running or ends.
    pub changed: Notify,
}

impl GroupInner {
    pub fn new(name: String, strategy: Strategy, intensity: Intensity) -> Self {
        GroupInner {
            name,
            strategy,
            intensity,
            members: Mutex::new(Vec::new()),
            window: Mutex::new(RestartWindow::default()),
            gave_up: AtomicBool::new(false),
            reason: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    pub fn gave_up(&self) -> Option<String> {
        if self.gave_up.load(Relaxed) { self.reason.lock().clone() } else { None }
    }

    /// Records a restart against the group's intensity; past it, the group gives up and
    /// every member is stopped. Returns false when the group gave up.
    pub fn allow_restart(&self, now: Instant, last: &str) -> bool {
        if self.window.lock().allow(&self.intensity, now) {
            return true;
        }
        *self.reason.lock() = Some(format!(
            "group {} gave up: more than {} restarts within {}; last: {last}",
            self.name,
            self.intensity.max_restarts,
            humantime::format_duration(self.intensity.within)
        ));
        self.gave_up.store(true, Relaxed);
        for m in self.members.lock().iter() {
            m.request_stop();
        }
        false
    }

    /// The member `who` is to be restarted: ends the current runs of the other members its
    /// strategy takes along, so that they restart too.
    pub fn restart_others(&self, who: &RoutineShared) {
        let members = self.members.lock();
        let Some(pos) = members.iter().position(|m| std::ptr::eq(&**m, who)) else { return };
        let others: Vec<&Arc<RoutineShared>> = match self.strategy {
            Strategy::OneForOne => return,
            Strategy::OneForAll => members.iter().filter(|m| !std::ptr::eq(&***m, who)).collect(),
            Strategy::RestForOne => members.iter().skip(pos + 1).collect(),
        };
        for m in others {
            m.restart_by_group();
        }
    }

    /// Whether every member started before `who` is running (or ended): `who` may start.
    pub fn my_turn(&self, who: &RoutineShared) -> bool {
        let members = self.members.lock();
        members
            .iter()
            .take_while(|m| !std::ptr::eq(&***m, who))
            .all(|m| !matches!(m.state(), State::Init | State::Backoff | State::Stopping))
    }
}
