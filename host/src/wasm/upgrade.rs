//! Live upgrade of a routine to another component ([`RoutineHandle::upgrade`]): the wasm
//! side of `routine::upgrade` (which holds the pending code, the hand-over and the
//! rollback).

use std::sync::Arc;

use super::component::WasmComponent;
use super::instance::{OptionsError, WasmOptions, WasmWork};
use crate::routine::{RoutineHandle, State};

/// Why a live upgrade did not take place ([`RoutineHandle::upgrade`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// The options do not fit the new component (nothing was changed).
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The new version did not take the handed-over state (its `restore` refused it or
    /// trapped): the old version runs again, with its state. The text says why.
    #[error("{0}")]
    Refused(String),
    /// The routine ended before the new version started.
    #[error("the routine ended ({0}) before the upgrade")]
    Ended(State),
}

impl RoutineHandle {
    /// Replaces the routine's code with `component` (live upgrade) and waits until the new
    /// version runs: the current run is stopped on request (`cancelled`, its grace period,
    /// then the kill), and the new instance starts under the same name, with the same
    /// mailbox; queued messages stay queued and the in-flight one is delivered again first.
    /// Not a failure: no backoff, no intensity count. When both versions export
    /// `gorch:worker/upgrade`, the old one's `save` is handed to the new one's `restore`; if
    /// that fails, the old version is started again with its state and the error is
    /// returned. The old version's last run is kept in the history.
    pub async fn upgrade(
        &self,
        component: &WasmComponent,
        wasm: WasmOptions,
    ) -> Result<(), UpgradeError> {
        wasm.check(component)?;
        let shared = self.shared();
        let seq = shared.request_upgrade(Arc::new(WasmWork::new(component, wasm)));
        tokio::select! {
            r = shared.upgrade().wait(seq) => r.map_err(UpgradeError::Refused),
            s = shared.wait() => Err(UpgradeError::Ended(s)),
        }
    }
}
