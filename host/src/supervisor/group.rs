//! Groups of routines supervised together, with OTP's strategies ([`Strategy`]): members
//! start in spawn order, restart in start order, and share one intensity limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::routine::{RoutineShared, State};
use crate::supervisor::policy::{Intensity, RestartWindow};

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
