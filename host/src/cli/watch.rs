//! Applying the plugin directory on request: SIGHUP at once, `--watch` changes once the
//! directory has gone quiet (bounded: constant writes delay a change by at most
//! [`MAX_DELAY`]). The watcher looks at `*.wasm` and `*.toml` only (a log file written into
//! the directory changes nothing), and follows the directory when it is replaced (`mv`,
//! `rm` + `mkdir`, a symlink swap).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::plugin::Reloader;

/// A request to apply the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Request {
    /// SIGHUP: at once.
    Now,
    /// A watched file changed: once the directory is quiet.
    Changed,
}

/// How long the directory must stay quiet before a change is applied: editors and deploy
/// tools write a temporary file and rename it, or write several files.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// The longest a change waits for quiet: under constant writes it is applied anyway.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// How often the watcher checks that the directory is still the one it watches.
const REARM_EVERY: Duration = Duration::from_secs(1);

/// Applies the directory on each request, one reload at a time (see the module doc).
pub(super) async fn reload_loop(
    reloader: Reloader,
    mut requests: mpsc::Receiver<Request>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            r = requests.recv() => match r {
                Some(r) => r,
                None => return,
            },
        };
        if first == Request::Changed {
            let deadline = Instant::now() + MAX_DELAY;
            loop {
                let quiet = (Instant::now() + DEBOUNCE).min(deadline);
                match tokio::time::timeout_at(quiet, requests.recv()).await {
                    Ok(Some(Request::Changed)) => {}
                    Ok(Some(Request::Now)) | Err(_) => break,
                    Ok(None) => return,
                }
            }
        }
        if stop.is_cancelled() {
            return;
        }
        // It logs each change and a summary line.
        reloader.apply().await;
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
pub(super) fn watch_dir(dir: &Path, reload: mpsc::Sender<Request>) -> anyhow::Result<DirWatch> {
    let watcher = arm(dir, reload.clone())?;
    tracing::info!("watching {} for changes", dir.display());
    let task = tokio::spawn(follow(dir.to_path_buf(), reload, watcher, identity(dir)));
    Ok(DirWatch { task })
}

fn arm(dir: &Path, reload: mpsc::Sender<Request>) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if !event.kind.is_access() && event.paths.iter().any(|p| watched(p)) {
            let _ = reload.try_send(Request::Changed);
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

/// Checks every [`REARM_EVERY`] that `dir` is still the directory watched; when it was
/// replaced, watches the new one and asks for a reload.
async fn follow(
    dir: PathBuf,
    reload: mpsc::Sender<Request>,
    mut _watcher: notify::RecommendedWatcher,
    mut watched: Option<(u64, u64)>,
) {
    let mut told_missing = false;
    loop {
        tokio::time::sleep(REARM_EVERY).await;
        let now = identity(&dir);
        if now == watched {
            continue;
        }
        let Some(_) = now else {
            if !told_missing {
                tracing::warn!("{} is gone: watching for it to come back", dir.display());
                told_missing = true;
            }
            continue;
        };
        match arm(&dir, reload.clone()) {
            Ok(w) => {
                _watcher = w;
                watched = now;
                told_missing = false;
                tracing::info!("{} was replaced: watching the new directory", dir.display());
                let _ = reload.try_send(Request::Changed);
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
}
