//! The state of a routine's live upgrades: the new code waiting for the current run to end,
//! the state the old instance handed over (`save`), the upgrade being settled (the new
//! version's `restore` can still fail, and then the old version comes back), the version
//! and the count. The driver swaps the code between runs; the wasm instance calls `save`
//! and `restore`; `RoutineHandle::upgrade` waits for the outcome.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::routine::work::Work;

/// An upgrade swapped in and not yet settled: what to go back to if `restore` fails.
pub(crate) struct Settling {
    seq: u64,
    /// The code and version that ran before.
    pub previous: Arc<dyn Work>,
    pub previous_version: String,
    /// A copy of the handed-over state, for the old version to restore.
    pub saved: Option<Vec<u8>>,
    /// Set when the new version's `restore` failed.
    pub failed: Option<String>,
}

/// See the module documentation.
pub(crate) struct UpgradeSlot {
    pending: Mutex<Option<(u64, Arc<dyn Work>)>>,
    settling: Mutex<Option<Settling>>,
    /// The last upgrade that settled, and when: within the rollback window, a new version
    /// that gives up goes back to its `previous` ([`crash_rollback`](Self::crash_rollback)).
    /// The driver lets go of it when the window ends ([`expire`](Self::expire)): the
    /// previous component is not kept in memory longer.
    settled: Mutex<Option<(Settling, tokio::time::Instant)>>,
    settled_changed: tokio::sync::Notify,
    rollback_window: std::time::Duration,
    /// Whether `settling` or `settled` holds a previous version: read on every receive
    /// ([`keeps_previous`](Self::keeps_previous)) without taking the locks.
    kept: std::sync::atomic::AtomicBool,
    handover: Mutex<Option<Vec<u8>>>,
    seq: AtomicU64,
    upgrades: AtomicU64,
    version: Mutex<String>,
    /// The last settled request: its sequence number and its error, if it failed.
    done: watch::Sender<(u64, Option<String>)>,
}

impl UpgradeSlot {
    pub fn new(version: String, rollback_window: std::time::Duration) -> Self {
        UpgradeSlot {
            pending: Mutex::new(None),
            settling: Mutex::new(None),
            settled: Mutex::new(None),
            settled_changed: tokio::sync::Notify::new(),
            rollback_window,
            kept: std::sync::atomic::AtomicBool::new(false),
            handover: Mutex::new(None),
            seq: AtomicU64::new(0),
            upgrades: AtomicU64::new(0),
            version: Mutex::new(version),
            done: watch::channel((0, None)).0,
        }
    }

    /// Queues `work` (a later request replaces an earlier one); returns its number.
    pub fn request(&self, work: Arc<dyn Work>) -> u64 {
        let seq = self.seq.fetch_add(1, Relaxed) + 1;
        *self.pending.lock() = Some((seq, work));
        seq
    }

    pub fn is_pending(&self) -> bool {
        self.pending.lock().is_some()
    }

    /// Whether the pending new code takes a handed-over state (so `save` is worth calling).
    pub fn pending_takes_state(&self) -> bool {
        self.pending.lock().as_ref().is_some_and(|(_, w)| w.stateful())
    }

    /// Swaps the pending code in: returns it; `current` is what ran before.
    pub fn swap_in(&self, current: &Arc<dyn Work>) -> Option<Arc<dyn Work>> {
        let (seq, work) = self.pending.lock().take()?;
        let previous_version = std::mem::replace(&mut *self.version.lock(), work.version());
        *self.settling.lock() = Some(Settling {
            seq,
            previous: current.clone(),
            previous_version,
            saved: self.handover.lock().clone(),
            failed: None,
        });
        self.refresh_kept();
        Some(work)
    }

    /// The new version is running (its `restore` succeeded, or there was nothing to
    /// restore): the upgrade counts. With `Err`, `restore` failed: the driver goes back
    /// (and a later `Ok` for the same upgrade changes nothing).
    pub fn settle(&self, result: Result<(), String>) {
        let mut settling = self.settling.lock();
        let Some(s) = settling.as_mut().filter(|s| s.failed.is_none()) else { return };
        match result {
            Ok(()) => {
                let done = settling.take().expect("matched above");
                drop(settling);
                let seq = done.seq;
                self.keep_for_rollback(done);
                self.refresh_kept();
                self.upgrades.fetch_add(1, Relaxed);
                self.done.send_replace((seq, None));
            }
            Err(e) => s.failed = Some(e),
        }
    }

    /// Keeps the previous version of the upgrade that just settled for the rollback window.
    fn keep_for_rollback(&self, done: Settling) {
        if self.rollback_window.is_zero() {
            return;
        }
        *self.settled.lock() = Some((done, tokio::time::Instant::now()));
        self.settled_changed.notify_waiters();
    }

    /// Whether a previous version is kept, or may be once the upgrade being settled settles
    /// (with a rollback window).
    pub fn keeps_previous(&self) -> bool {
        self.kept.load(Relaxed)
    }

    /// Recomputes [`keeps_previous`](Self::keeps_previous) after a change of either slot.
    fn refresh_kept(&self) {
        let kept = !self.rollback_window.is_zero()
            && (self.settled.lock().is_some() || self.settling.lock().is_some());
        self.kept.store(kept, Relaxed);
    }

    /// Lets go of each kept previous version when its rollback window ends; never returns
    /// (the driver runs it beside each run).
    pub async fn expire(&self) {
        loop {
            let changed = self.settled_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let end = self.settled.lock().as_ref().map(|(_, at)| *at + self.rollback_window);
            match end {
                Some(end) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(end) => {
                            {
                                let mut s = self.settled.lock();
                                let over = |(_, at): &(Settling, tokio::time::Instant)| {
                                    *at + self.rollback_window <= end
                                };
                                if s.as_ref().is_some_and(over) {
                                    *s = None;
                                }
                            }
                            self.refresh_kept();
                        }
                        _ = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// The version that ran gave up: if its upgrade settled within `window`, that upgrade
    /// is undone like a failed `restore` (the driver's next [`take_rollback`](Self::take_rollback)
    /// brings back the previous code and its saved state) and true is returned.
    pub fn crash_rollback(&self, why: String) -> bool {
        let taken = self.settled.lock().take();
        let Some((mut s, at)) = taken else { return false };
        if at.elapsed() > self.rollback_window || self.is_pending() {
            self.refresh_kept();
            return false;
        }
        s.failed = Some(why);
        *self.settling.lock() = Some(s);
        self.refresh_kept();
        true
    }

    /// Whether the upgrade being settled failed (the driver must go back).
    pub fn rollback_pending(&self) -> bool {
        self.settling.lock().as_ref().is_some_and(|s| s.failed.is_some())
    }

    /// After a run: the failed upgrade to undo, if `restore` failed. The old version and
    /// its saved state come back; the waiting caller learns why.
    pub fn take_rollback(&self) -> Option<Settling> {
        let mut settling = self.settling.lock();
        if settling.as_ref().is_none_or(|s| s.failed.is_none()) {
            return None;
        }
        let s = settling.take()?;
        drop(settling);
        self.refresh_kept();
        *self.version.lock() = s.previous_version.clone();
        *self.handover.lock() = s.saved.clone();
        self.done.send_replace((s.seq, s.failed.clone()));
        Some(s)
    }

    /// The state the old instance saved, for the new one.
    pub fn put_handover(&self, state: Vec<u8>) {
        *self.handover.lock() = Some(state);
    }

    pub fn take_handover(&self) -> Option<Vec<u8>> {
        self.handover.lock().take()
    }

    pub fn upgrades(&self) -> u64 {
        self.upgrades.load(Relaxed)
    }

    pub fn version(&self) -> String {
        self.version.lock().clone()
    }

    /// Waits until request `seq` is settled (or a later one): `Ok`, or why it failed.
    pub async fn wait(&self, seq: u64) -> Result<(), String> {
        let mut rx = self.done.subscribe();
        let r = rx.wait_for(|(done, _)| *done >= seq).await;
        match r {
            Ok(v) if v.0 == seq => v.1.clone().map_or(Ok(()), Err),
            Ok(_) => Ok(()),
            Err(_) => Err("the routine ended".into()),
        }
    }
}
