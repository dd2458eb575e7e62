//! Supervision settings: [`RestartPolicy`], exponential [`Backoff`] with jitter, restart
//! [`Intensity`], and [`Supervision`] which bundles them with `max-deliveries`. Each default
//! is written once, here; the manifest's tables deserialize into these types.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::routine::State;

/// When the supervisor restarts a routine. There are two defaults, on purpose:
/// [`Supervision::default`] (routines spawned from code) never restarts, like a tokio task;
/// [`Supervision::for_plugin`] (a manifest that says nothing) restarts `on-failure`, since a
/// plugin is a service that should stay up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never restart.
    Never,
    /// Restart after `FAILED`, `PANICKED` or `TIMED_OUT`.
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

/// The longest `backoff.initial`, `backoff.max`, `backoff.stable-after` and
/// `intensity.within` a manifest may ask for: one day. Longer ones are mistakes (a restart
/// a year later is no restart), and bounded values keep every computation with them exact.
pub const MAX_POLICY_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks that the duration of `key` is at most [`MAX_POLICY_DURATION`].
pub(crate) fn check_bound(key: &'static str, value: Duration) -> Result<(), PolicyError> {
    if value > MAX_POLICY_DURATION {
        return Err(PolicyError::TooLong { key, value, max: MAX_POLICY_DURATION });
    }
    Ok(())
}

/// A `humantime_serde` duration, bounded by [`MAX_POLICY_DURATION`]: the error points at
/// the value.
fn bounded<'de, D: serde::Deserializer<'de>>(
    key: &'static str,
    d: D,
) -> Result<Option<Duration>, D::Error> {
    let v: Option<Duration> = humantime_serde::option::deserialize(d)?;
    if let Some(v) = v {
        check_bound(key, v).map_err(serde::de::Error::custom)?;
    }
    Ok(v)
}

macro_rules! bounded_field {
    ($fn:ident, $key:literal) => {
        fn $fn<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            bounded($key, d)
        }
    };
}
bounded_field!(bounded_initial, "backoff.initial");
bounded_field!(bounded_max, "backoff.max");
bounded_field!(bounded_stable_after, "backoff.stable-after");
bounded_field!(bounded_within, "intensity.within");

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawBackoff {
    #[serde(default, deserialize_with = "bounded_initial")]
    initial: Option<Duration>,
    #[serde(default, deserialize_with = "bounded_max")]
    max: Option<Duration>,
    multiplier: Option<f64>,
    jitter: Option<f64>,
    #[serde(default, deserialize_with = "bounded_stable_after")]
    stable_after: Option<Duration>,
}

impl TryFrom<RawBackoff> for Backoff {
    type Error = PolicyError;
    fn try_from(r: RawBackoff) -> Result<Self, PolicyError> {
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
    /// Checks the settings: multiplier ≥ 1, jitter in [0, 1], max ≥ initial, every
    /// duration at most [`MAX_POLICY_DURATION`]. (Settings that fail it still never make
    /// [`Backoff::delay`] panic: it saturates.)
    pub fn validate(&self) -> Result<(), PolicyError> {
        check_bound("backoff.initial", self.initial)?;
        check_bound("backoff.max", self.max)?;
        check_bound("backoff.stable-after", self.stable_after)?;
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(PolicyError::Multiplier(self.multiplier));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(PolicyError::Jitter(self.jitter));
        }
        if self.max < self.initial {
            return Err(PolicyError::MaxBelowInitial { initial: self.initial, max: self.max });
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
    #[serde(default, deserialize_with = "bounded_within")]
    within: Option<Duration>,
}

impl TryFrom<RawIntensity> for Intensity {
    type Error = PolicyError;
    fn try_from(r: RawIntensity) -> Result<Self, PolicyError> {
        let d = Intensity::default();
        let i = Intensity {
            max_restarts: r.max_restarts.unwrap_or(d.max_restarts),
            within: r.within.unwrap_or(d.within),
        };
        if i.within.is_zero() {
            return Err(PolicyError::ZeroWindow);
        }
        check_bound("intensity.within", i.within)?;
        Ok(i)
    }
}

/// A supervision setting that is out of range (the message names the manifest key).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// `backoff.multiplier` below 1 or not finite.
    #[error("backoff.multiplier must be at least 1, got {0}")]
    Multiplier(f64),
    /// `backoff.jitter` outside [0, 1].
    #[error("backoff.jitter must be between 0 and 1, got {0}")]
    Jitter(f64),
    /// `backoff.max` below `backoff.initial`.
    #[error(
        "backoff.max ({}) is less than backoff.initial ({})",
        humantime::format_duration(*.max),
        humantime::format_duration(*.initial)
    )]
    MaxBelowInitial {
        /// `backoff.initial`.
        initial: Duration,
        /// `backoff.max`.
        max: Duration,
    },
    /// `intensity.within` of zero.
    #[error("intensity.within must not be zero")]
    ZeroWindow,
    /// A duration above [`MAX_POLICY_DURATION`].
    #[error(
        "{key} must be at most {} (MAX_POLICY_DURATION), got {}",
        humantime::format_duration(*.max),
        humantime::format_duration(*.value)
    )]
    TooLong {
        /// The manifest key.
        key: &'static str,
        /// Its value.
        value: Duration,
        /// The bound.
        max: Duration,
    },
}

/// A routine's supervision settings. `Default` never restarts (see [`RestartPolicy`]);
/// [`Supervision::for_plugin`] is what a manifest starts from.
#[derive(Debug, Clone, PartialEq)]
pub struct Supervision {
    /// When to restart.
    pub restart: RestartPolicy,
    /// Delays between restarts.
    pub backoff: Backoff,
    /// How many restarts are too many.
    pub intensity: Intensity,
    /// Deliveries of one message before it goes to `dead-letter` (at least 1: 0 counts as
    /// 1).
    pub max_deliveries: u32,
    /// A live-upgraded routine that gives up (its restart intensity exceeded) within this
    /// long after the upgrade is put back on the version it ran before, mailbox and all,
    /// instead of ending `FAILED`; zero turns it off. Default [`DEFAULT_ROLLBACK_WINDOW`].
    pub rollback_window: Duration,
}

/// Default [`Supervision::rollback_window`].
pub const DEFAULT_ROLLBACK_WINDOW: Duration = Duration::from_secs(60);

/// Default `max-deliveries`.
pub const DEFAULT_MAX_DELIVERIES: u32 = 3;

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            restart: RestartPolicy::Never,
            backoff: Backoff::default(),
            intensity: Intensity::default(),
            max_deliveries: DEFAULT_MAX_DELIVERIES,
            rollback_window: DEFAULT_ROLLBACK_WINDOW,
        }
    }
}

impl Supervision {
    /// The defaults of a plugin whose manifest says nothing: as [`Default`], but restarting
    /// `on-failure`.
    pub fn for_plugin() -> Self {
        Supervision { restart: RestartPolicy::OnFailure, ..Supervision::default() }
    }
}

impl RestartPolicy {
    /// Whether a run that ended in `state` (not stopped on request) is restarted.
    pub fn restarts_after(self, state: State) -> bool {
        use State::*;
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => matches!(state, Failed | Panicked | TimedOut),
            RestartPolicy::Always => true,
        }
    }
}

impl Backoff {
    /// The delay before restart number `attempt` (0-based), before jitter:
    /// `initial × multiplier^attempt`, capped at `max`. Saturating: any settings, even
    /// invalid ones (a NaN multiplier, `Duration::MAX`), give a delay and never panic.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let f = self.multiplier.powi(attempt.min(1024) as i32);
        let secs = self.initial.as_secs_f64() * f;
        if secs.is_nan() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            secs_saturating(secs)
        }
    }

    /// The delay with jitter, `base × (1 + jitter × (2u − 1))` for `u` in [0, 1): within
    /// `base × (1 ± jitter)`. Saturating like [`Backoff::base_delay`]: an out-of-range
    /// `jitter` or `u` cannot make it panic either.
    pub fn delay(&self, attempt: u32, u: f64) -> Duration {
        let base = self.base_delay(attempt);
        let factor = 1.0 + self.jitter * (2.0 * u - 1.0);
        if factor.is_nan() {
            return base;
        }
        secs_saturating(base.as_secs_f64() * factor)
    }
}

/// `secs` as a duration: negative and NaN give zero, too large gives `Duration::MAX`.
fn secs_saturating(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
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
