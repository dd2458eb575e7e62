//! [`ObsState`]: what the routes of the observability server share (the orchestrator, the
//! plugin board, readiness, the token, the limits), in a file of its own so that the read
//! routes (`routes`) and the write routes (`control`) both use it without using each other.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};

use prometheus::Registry;

use crate::orchestrator::{DEFAULT_MESSAGE_BYTES, Orchestrator};
use crate::plugin::{PluginBoard, Reloader};

/// The most bytes of request bodies read at once (reserved before reading: the declared
/// `Content-Length`, or the message limit when there is none): past it, 503.
pub const INGRESS_READING_BYTES: u64 = 64 << 20;

/// What the routes share.
#[derive(Clone)]
pub struct ObsState {
    pub(super) orch: Orchestrator,
    pub(super) registry: Arc<Registry>,
    pub(super) ready: Arc<AtomicBool>,
    pub(super) token: Option<Arc<str>>,
    pub(super) plugins: PluginBoard,
    message_limit: Arc<AtomicU64>,
    reloader: Arc<std::sync::OnceLock<Reloader>>,
    pub(super) routine_limit: Arc<AtomicUsize>,
    /// Whether the last scrape was past the routine limit (logged when it changes).
    pub(super) over_limit: Arc<AtomicBool>,
    /// Why the write routes refuse messages for now (see [`ObsState::hold_ingress`]).
    ingress_held: Arc<parking_lot::RwLock<Option<String>>>,
    /// The bytes of request bodies being read and not yet queued, in KiB: reserved before a
    /// body is read ([`INGRESS_READING_BYTES`]).
    pub(super) reading: Arc<tokio::sync::Semaphore>,
}

impl ObsState {
    /// State for `orch`; `/metrics` serves its `gorch_*` metrics and the `process_*` ones.
    pub fn new(orch: &Orchestrator, token: Option<String>) -> Self {
        ObsState {
            orch: orch.clone(),
            registry: Arc::new(super::process::registry()),
            ready: Arc::new(AtomicBool::new(false)),
            token: token.map(Arc::from),
            plugins: PluginBoard::new(),
            message_limit: Arc::new(AtomicU64::new(DEFAULT_MESSAGE_BYTES)),
            reloader: Arc::new(std::sync::OnceLock::new()),
            routine_limit: Arc::new(AtomicUsize::new(super::metrics::DEFAULT_ROUTINE_LIMIT)),
            over_limit: Arc::new(AtomicBool::new(false)),
            ingress_held: Arc::default(),
            reading: Arc::new(tokio::sync::Semaphore::new((INGRESS_READING_BYTES >> 10) as usize)),
        }
    }

    /// With `Some(why)`, the publish and send routes answer 503 (with `Retry-After` and
    /// `why`) instead of taking messages; `None` takes them again. The CLI holds them while
    /// the host joins its cluster: a message taken before would go to the in-memory bus of
    /// a host whose topics are about to be the cluster's, and never be delivered.
    pub fn hold_ingress(&self, why: Option<String>) {
        *self.ingress_held.write() = why;
    }

    /// Why messages are refused for now (see [`hold_ingress`](Self::hold_ingress)).
    pub fn ingress_held(&self) -> Option<String> {
        self.ingress_held.read().clone()
    }

    /// Up to `limit` live routines `/metrics` has per-routine series; beyond, per-plugin
    /// series only (`--metrics-routine-limit`).
    pub fn set_metrics_routine_limit(&self, limit: usize) {
        self.routine_limit.store(limit, Relaxed);
    }

    /// Serves `POST /gorchestra/api/reload` with `reloader` (set once, after start-up).
    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.reloader.set(reloader);
    }

    /// True once start-up is done (see [`set_ready`](Self::set_ready)).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed)
    }

    /// The reloader of the plugin directory, once set.
    pub fn reloader(&self) -> Option<&Reloader> {
        self.reloader.get()
    }

    /// The orchestrator the routes show and steer.
    pub fn orch(&self) -> &Orchestrator {
        &self.orch
    }

    /// The largest message the write routes accept (default
    /// [`DEFAULT_MESSAGE_BYTES`]); the CLI sets the largest `limits.message-bytes` of the
    /// plugins.
    pub fn set_message_limit(&self, bytes: u64) {
        self.message_limit.store(bytes, Relaxed);
    }

    /// See [`set_message_limit`](Self::set_message_limit).
    pub fn message_limit(&self) -> u64 {
        self.message_limit.load(Relaxed)
    }

    /// Marks start-up done (or, with `false`, the host going away): `/readyz` answers 200
    /// from now on unless a plugin failed.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Relaxed);
    }

    /// The load status of the plugins, which `/readyz`, `/gorchestra/api/plugins` and the
    /// dashboard show (empty for an embedder that loads no plugin directory).
    pub fn plugins(&self) -> &PluginBoard {
        &self.plugins
    }
}
