//! The load status of each plugin of the directory, as start-up goes: what `/readyz`, the
//! JSON API (`/gorchestra/api/plugins`) and the dashboard show. A plugin whose routines
//! later end by their policy is still `running` here: only failing to load or to start is a
//! failure.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

/// Where a plugin is in start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadState {
    /// Found; being compiled (or read from the cache) and started.
    Starting,
    /// Loaded, and its routines spawned.
    Running,
    /// Could not be loaded or started (see `error`); the other plugins are not affected.
    Failed,
}

/// One plugin (or directory file) in the board, as served by `/gorchestra/api/plugins`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    /// The file stem (`echo` for `echo.wasm`), or the file name for a directory file such
    /// as `gorch.toml`.
    pub plugin: String,
    /// The file the status is about.
    pub file: String,
    /// Where it is.
    pub status: LoadState,
    /// Routines started from it.
    pub routines: usize,
    /// Why it failed.
    pub error: Option<String>,
    /// The component's size in bytes, once read.
    pub bytes: Option<u64>,
    /// Seconds it took to load (compile or read from the cache), once loaded.
    pub load_seconds: Option<f64>,
}

impl PluginStatus {
    fn new(plugin: &str, file: &str, status: LoadState) -> Self {
        PluginStatus {
            plugin: plugin.to_string(),
            file: file.to_string(),
            status,
            routines: 0,
            error: None,
            bytes: None,
            load_seconds: None,
        }
    }
}

/// `error` as a line about `file`: errors usually name their file already; the others get
/// it in front.
pub fn about_file(file: &str, error: &str) -> String {
    if error.starts_with(file) { error.to_string() } else { format!("{file}: {error}") }
}

/// The status of every plugin of the directory, by plugin (file stem). Cheap to clone
/// (clones share the board).
#[derive(Debug, Clone, Default)]
pub struct PluginBoard {
    inner: Arc<RwLock<BTreeMap<String, PluginStatus>>>,
}

impl PluginBoard {
    /// An empty board (an embedder that loads no directory keeps it empty: always ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `plugin` (from `file`) as starting.
    pub fn starting(&self, plugin: &str, file: &str) {
        self.inner
            .write()
            .insert(plugin.to_string(), PluginStatus::new(plugin, file, LoadState::Starting));
    }

    /// Records that the component of `plugin` (`bytes` long) loaded in `seconds`.
    pub fn loaded(&self, plugin: &str, bytes: u64, seconds: f64) {
        self.update(plugin, |s| {
            s.bytes = Some(bytes);
            s.load_seconds = Some(seconds);
        });
    }

    /// Records that `plugin` is running `routines` routines (clearing an error noted by an
    /// earlier reload).
    pub fn running(&self, plugin: &str, routines: usize) {
        self.update(plugin, |s| {
            s.status = LoadState::Running;
            s.routines = routines;
            s.error = None;
        });
    }

    /// Notes an error about a plugin that keeps running (a refused upgrade: the running
    /// version serves on), shown on the dashboard and in the JSON API, not a failure for
    /// `/readyz`.
    pub fn note(&self, plugin: &str, error: String) {
        self.update(plugin, |s| s.error = Some(error));
    }

    /// Forgets `plugin` (its files left the directory).
    pub fn remove(&self, plugin: &str) {
        self.inner.write().remove(plugin);
    }

    /// Records that `plugin` (from `file`) failed, with the reason.
    pub fn failed(&self, plugin: &str, file: &str, error: String) {
        let mut board = self.inner.write();
        let s = board
            .entry(plugin.to_string())
            .or_insert_with(|| PluginStatus::new(plugin, file, LoadState::Failed));
        s.status = LoadState::Failed;
        s.file = file.to_string();
        s.error = Some(error);
    }

    fn update(&self, plugin: &str, f: impl FnOnce(&mut PluginStatus)) {
        if let Some(s) = self.inner.write().get_mut(plugin) {
            f(s);
        }
    }

    /// Every entry, by plugin.
    pub fn list(&self) -> Vec<PluginStatus> {
        self.inner.read().values().cloned().collect()
    }

    /// The entries in `state`.
    pub fn in_state(&self, state: LoadState) -> Vec<PluginStatus> {
        self.inner.read().values().filter(|s| s.status == state).cloned().collect()
    }
}
