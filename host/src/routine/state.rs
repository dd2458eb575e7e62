//! The lifecycle [`State`] of a routine and its [`Health`], with the names of the contract
//! (the JSON API, the metrics' `state` label and the dashboard use them).

use std::fmt;

/// Lifecycle state of a routine (serialized in upper case: `RUNNING`, `TIMED_OUT`, ...).
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

    /// The end states, in the order of the routine's termination counters.
    pub const TERMINAL: [State; 4] =
        [State::Stopped, State::Failed, State::TimedOut, State::Panicked];

    pub(crate) fn from_u8(v: u8) -> State {
        State::ALL[usize::from(v).min(7)]
    }

    /// True for the end states.
    pub fn is_final(self) -> bool {
        matches!(self, State::Stopped | State::Failed | State::TimedOut | State::Panicked)
    }

    /// The contract's name: `RUNNING`, `TIMED_OUT`, ...
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
    /// The contract's name: `OK`, `IDLE_TIMEOUT`, ...
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
