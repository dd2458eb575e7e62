//! This node's lease, as this node knows it: valid for a while after each renewal the
//! server confirmed, lapsed when renewals stop (NATS away, the process paused), lost for
//! good when another process took the node's name meanwhile.
//!
//! A lapsed lease fences what must run once: the receives of this node's cluster-unique
//! routines wait until the lease is renewed *and* their claims were checked (a routine
//! whose claim another node took meanwhile is stopped before it takes another message), and
//! requests from other nodes wait too. The lease is counted valid for [`VALID_FOR`] after a
//! renewal was *sent*, less than the bucket's expiry ([`LEASE`] after it was written), so
//! this node never believes in a lease the server has already dropped.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{HEARTBEAT, LEASE};
use crate::transport::CallError;

/// How long after a renewal was sent this node counts its lease valid.
pub(crate) const VALID_FOR: Duration = Duration::from_millis(LEASE.as_millis() as u64 * 4 / 5);

pub(crate) struct Lease {
    valid_until: Mutex<Option<Instant>>,
    renewed: Notify,
    lost: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl Lease {
    /// A lease just taken at `sent`.
    pub(crate) fn taken(sent: Instant) -> Self {
        Lease {
            valid_until: Mutex::new(Some(sent + VALID_FOR)),
            renewed: Notify::new(),
            lost: CancellationToken::new(),
            reason: Mutex::new(None),
        }
    }

    /// True while the last confirmed renewal is recent and the lease was not lost.
    pub(crate) fn is_valid(&self) -> bool {
        !self.lost.is_cancelled() && self.valid_until.lock().is_some_and(|t| Instant::now() < t)
    }

    /// True when the lease lapsed (no confirmed renewal for [`VALID_FOR`]).
    pub(crate) fn lapsed(&self) -> bool {
        self.valid_until.lock().is_none_or(|t| Instant::now() >= t)
    }

    /// A renewal sent at `sent` was confirmed (and, after a lapse, the claims checked).
    pub(crate) fn renewed(&self, sent: Instant) {
        *self.valid_until.lock() = Some(sent + VALID_FOR);
        self.renewed.notify_waiters();
    }

    /// Another process took this node's name: the lease is gone for good.
    pub(crate) fn lose(&self, reason: String) {
        *self.reason.lock() = Some(reason);
        *self.valid_until.lock() = None;
        self.lost.cancel();
        self.renewed.notify_waiters();
    }

    /// Why the lease was lost, once it was.
    pub(crate) fn lost_reason(&self) -> Option<String> {
        self.reason.lock().clone()
    }

    /// Completes when the lease is lost.
    pub(crate) async fn lost(&self) {
        self.lost.cancelled().await
    }

    /// Waits until the lease is valid: `Cancelled` when `cancel` fires or the lease is lost
    /// (the routine that waits is being stopped then).
    pub(crate) async fn wait_valid(&self, cancel: &CancellationToken) -> Result<(), CallError> {
        loop {
            let renewed = self.renewed.notified();
            tokio::pin!(renewed);
            renewed.as_mut().enable();
            if self.lost.is_cancelled() {
                return Err(CallError::Cancelled);
            }
            if self.is_valid() {
                return Ok(());
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(CallError::Cancelled),
                _ = renewed => {}
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }
}
