//! Applying the plugin directory on request: SIGHUP at once, `--watch` changes once the
//! directory has gone quiet (bounded: constant writes delay a change by at most
//! [`MAX_DELAY`]); a change stops no plugin whose files are missing until the directory has
//! been quiet for [`REMOVE_AFTER`] (a slow copy or a replaced directory is not a removal
//! of what is not copied yet). The watcher
//! looks at `*.wasm` and `*.toml` only (a log file written into the directory changes
//! nothing), and follows the directory when it is replaced (`mv`, `rm` + `mkdir`, a symlink
//! swap).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::plugin::Reloader;

/// What asks for a reload: SIGHUP (at once, never dropped), or the watcher (a watched file
/// changed: once the directory is quiet).
#[derive(Clone)]
pub(super) struct Requests {
    now: Arc<Notify>,
    changed: mpsc::Sender<()>,
}

impl Requests {
    /// The requests and the receiving end of the watcher's.
    pub(super) fn new() -> (Requests, mpsc::Receiver<()>) {
        let (changed, rx) = mpsc::channel(1);
        (Requests { now: Arc::new(Notify::new()), changed }, rx)
    }

    /// SIGHUP: a reload at once (a second one while it waits is the same reload).
    pub(super) fn now(&self) {
        self.now.notify_one();
    }

    /// A watched file changed (dropped when a change is already waiting: the same reload).
    fn changed(&self) {
        let _ = self.changed.try_send(());
    }
}

/// How long the directory must stay quiet before a change is applied: editors and deploy
/// tools write a temporary file and rename it, or write several files.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// The longest a change waits for quiet: under constant writes it is applied anyway.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// How often the watcher checks that the directory is still the one it watches.
const REARM_EVERY: Duration = Duration::from_secs(1);

/// How long the directory must stay quiet before a change removes plugins: a directory
/// replaced or copied slowly must not stop the plugins whose files are not there yet.
const REMOVE_AFTER: Duration = Duration::from_secs(2);

/// Applies the directory on each request, one reload at a time (see the module doc). A
/// change is applied without stopping plugins whose files are missing; those stop once the
/// directory has been quiet for [`REMOVE_AFTER`] (SIGHUP applies everything at once).
pub(super) async fn reload_loop(
    reloader: Reloader,
    requests: Requests,
    mut changed: mpsc::Receiver<()>,
    stop: CancellationToken,
) {
    // When plugins whose files are missing are stopped, unless another change comes first.
    let mut removals: Option<Instant> = None;
    loop {
        let due = removals.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let on_change = tokio::select! {
            _ = stop.cancelled() => return,
            _ = requests.now.notified() => false,
            _ = tokio::time::sleep_until(due), if removals.is_some() => false,
            r = changed.recv() => match r {
                Some(()) => true,
                None => return,
            },
        };
        let mut full = !on_change;
        if on_change {
            let deadline = Instant::now() + MAX_DELAY;
            loop {
                let until = (Instant::now() + DEBOUNCE).min(deadline);
                tokio::select! {
                    r = changed.recv() => match r {
                        Some(()) if Instant::now() >= deadline => break,
                        Some(()) => {}
                        None => return,
                    },
                    _ = requests.now.notified() => { full = true; break }
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
        if !full && !reloader.dir().is_dir() {
            // Gone for now: the watcher asks again when it is back.
            removals = None;
            continue;
        }
        // Each logs every change and a summary line.
        if full {
            removals = None;
            reloader.apply().await;
        } else {
            removals = Some(Instant::now() + REMOVE_AFTER);
            reloader.apply_keeping_missing().await;
        }
    }
}

/// `--watch`: the watcher of the directory, re-armed when the directory is replaced. Stops
/// when dropped.
pub(super) struct DirWatch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches `dir` (not recursively) and asks for a reload when a `*.wasm` or `*.toml` in it
/// changes.
pub(super) fn watch_dir(dir: &Path, requests: Requests) -> anyhow::Result<DirWatch> {
    let removed = Arc::new(AtomicBool::new(false));
    let watcher = arm(dir, requests.clone(), removed.clone())?;
    tracing::info!("watching {} for changes", dir.display());
    let task = tokio::spawn(follow(dir.to_path_buf(), requests, watcher, identity(dir), removed));
    Ok(DirWatch { task })
}

/// A watcher of `dir`: a change of a watched file asks for a reload; the removal of `dir`
/// itself sets `removed` (it may come back with the same inode number).
fn arm(
    dir: &Path,
    requests: Requests,
    removed: Arc<AtomicBool>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    // notify reports absolute paths: the directory as given, made absolute.
    let watched_dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        if event.kind.is_remove() && event.paths.iter().any(|p| p == &watched_dir) {
            removed.store(true, Relaxed);
        }
        if event.paths.iter().any(|p| watched(p)) {
            requests.changed();
        }
    })
    .context("cannot watch the plugin directory")?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(watcher)
}

/// The files a reload reads: components and manifests (`gorch.toml` included).
fn watched(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("wasm" | "toml"))
}

/// What `dir` is now (following symlinks): device and inode, `None` while it is missing.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    let m = std::fs::metadata(dir).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        Some((0, 0))
    }
}

/// Checks every [`REARM_EVERY`] that `dir` is still the directory watched (its identity,
/// and no removal reported); when it was replaced, watches the new one and asks for a
/// reload.
async fn follow(
    dir: PathBuf,
    requests: Requests,
    mut _watcher: notify::RecommendedWatcher,
    mut watched: Option<(u64, u64)>,
    removed: Arc<AtomicBool>,
) {
    let mut told_missing = false;
    loop {
        tokio::time::sleep(REARM_EVERY).await;
        let now = identity(&dir);
        if now == watched && !removed.load(Relaxed) {
            continue;
        }
        let Some(_) = now else {
            if !told_missing {
                tracing::warn!("{} is gone: watching for it to come back", dir.display());
                told_missing = true;
            }
            continue;
        };
        removed.store(false, Relaxed);
        match arm(&dir, requests.clone(), removed.clone()) {
            Ok(w) => {
                _watcher = w;
                watched = now;
                told_missing = false;
                tracing::info!("{} was replaced: watching the new directory", dir.display());
                requests.changed();
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}
