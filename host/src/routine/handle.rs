//! [`RoutineHandle`]: what a spawner keeps to watch, stop and wait for a routine.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::channel::Channel;
use crate::delivery::Message;
use crate::routine::shared::RoutineShared;
use crate::routine::snapshot::Snapshot;
use crate::routine::state::{Health, State};

/// A handle to a spawned routine. Cheap to clone; does not keep the routine alive.
#[derive(Clone)]
pub struct RoutineHandle {
    shared: Arc<RoutineShared>,
}

impl fmt::Debug for RoutineHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutineHandle")
            .field("id", &self.shared.id())
            .field("name", &self.shared.name())
            .field("state", &self.state())
            .finish()
    }
}

impl RoutineHandle {
    pub(crate) fn new(shared: Arc<RoutineShared>) -> Self {
        RoutineHandle { shared }
    }
    /// What the handle points at (the wasm runtime's live upgrade uses it).
    pub(crate) fn shared(&self) -> &Arc<RoutineShared> {
        &self.shared
    }
    /// Stable id.
    pub fn id(&self) -> u64 {
        self.shared.id()
    }
    /// Unique name.
    pub fn name(&self) -> &str {
        self.shared.name()
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
        self.shared.add_busy(d);
    }
    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts()
    }
    /// The routine's snapshot.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }
    /// The routine's mailbox (send to it from the host side).
    pub fn mailbox(&self) -> &Channel<Message> {
        self.shared.mailbox()
    }
    /// Asks the routine to stop, for good: `cancelled()` turns true and blocking calls
    /// return `cancelled`; after the grace period a wasm instance is killed by epoch
    /// interruption. No restart follows. Returns at once; use [`wait`](Self::wait) for the
    /// end.
    pub fn stop(&self) {
        self.shared.request_stop();
    }
    /// Stops the routine for good with `reason` as its last error (its name was taken by
    /// another owner).
    pub(crate) fn fail_and_stop(&self, reason: String) {
        self.shared.set_last_error(Some(reason));
        self.shared.request_stop();
    }
    /// Restarts the routine now: the current run is stopped like [`stop`](Self::stop) does
    /// (its in-flight message is redelivered), then a new run starts at once, with no
    /// backoff and without counting against the restart intensity. A routine waiting in
    /// `BACKOFF` starts at once.
    pub fn restart(&self) {
        self.shared.request_restart();
    }
    /// Live upgrades so far.
    pub fn upgrades(&self) -> u64 {
        self.shared.upgrades()
    }
    /// The plugin it runs (the file stem it was started from; empty for a native routine).
    pub fn plugin(&self) -> &str {
        self.shared.plugin()
    }
    /// The version of the code it runs (see [`Snapshot::version`]).
    pub fn version(&self) -> String {
        self.shared.version()
    }
    /// Kills the routine now, without a grace period (no restart follows).
    pub fn kill(&self) {
        self.shared.hard_kill();
    }
    /// Waits until the routine has ended for good and returns its final state.
    pub async fn wait(&self) -> State {
        self.shared.wait().await
    }
}
