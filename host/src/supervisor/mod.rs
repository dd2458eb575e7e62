//! Supervision: what happens when a run ends.
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
//! up as `FAILED`, with the reason in `lastError`. Its id, name and mailbox survive restarts;
//! the message it was processing is redelivered (see `delivery`).
//!
//! Groups follow OTP's strategies: when a member is to be restarted, `one-for-one` restarts
//! only it, `one-for-all` stops and restarts every member, `rest-for-one` the members started
//! after it; members restart in start order. The group's intensity limit counts the
//! restarts of all its members; past it, the whole group ends (`FAILED`).
//!
//! - `policy`: the settings ([`RestartPolicy`], [`Backoff`], [`Intensity`],
//!   [`Supervision`]) and the sliding restart window;
//! - `group`: [`Strategy`] and [`Group`];
//! - `driver`: the task that runs a routine: the restart loop, the idle watchdog, the grace
//!   period and the kill.

pub(crate) mod driver;
mod group;
mod policy;

pub(crate) use group::GroupInner;
pub use group::{Group, Strategy};
pub(crate) use policy::check_bound;
pub use policy::{
    Backoff, DEFAULT_MAX_DELIVERIES, DEFAULT_ROLLBACK_WINDOW, Intensity, MAX_POLICY_DURATION,
    PolicyError, RestartPolicy, Supervision,
};
