//! Starting a scanned plugin directory: components are loaded (compiled, or read from the
//! compile cache) concurrently, bounded by the cores, off the threads that run guests; each
//! plugin's routines are spawned as soon as its component is ready (the members of a group
//! once the whole group is, in start order). A bad plugin is reported by file on the
//! [`PluginBoard`] and in the log, and skipped; the others start. Start-up can be cut short
//! by a cancellation token (a signal during start-up).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::dir::{DIR_CONFIG, PluginDir, PluginError, PluginSpec};
use super::status::PluginBoard;
use crate::orchestrator::Orchestrator;
use crate::supervisor::Group;
use crate::wasm::{CacheStatus, WasmComponent, WasmEngine};

/// What [`start_plugins`] did.
#[derive(Debug, Clone, Default)]
pub struct StartReport {
    /// Routines spawned.
    pub routines: usize,
    /// Plugins loaded and started.
    pub started: usize,
    /// Problems: plugins (or directory files) that failed; details are on the board.
    pub failed: usize,
    /// True if start-up was cancelled before every plugin was handled.
    pub interrupted: bool,
    /// The groups of `gorch.toml`, by name (a reload adds new members to them).
    pub groups: BTreeMap<String, Group>,
}

/// The members of a group loaded so far (index in the scan, component), and how many are
/// still loading.
#[derive(Default)]
struct GroupWait {
    loaded: Vec<(usize, WasmComponent)>,
    left: usize,
}

/// One finished load: the plugin's index in the scan, the component or the error, and how
/// long it took.
type Loaded = (usize, Result<WasmComponent, String>, Duration);

/// Loads every plugin `scanned` from `dir` and spawns its routines, recording each plugin's
/// progress on `board`. Stops early (without spawning more) when `cancel` fires.
pub async fn start_plugins(
    orch: &Orchestrator,
    engine: &WasmEngine,
    dir: &Path,
    scanned: &PluginDir,
    board: &PluginBoard,
    cancel: &CancellationToken,
) -> StartReport {
    let mut report = StartReport::default();
    for e in &scanned.errors {
        report_scan_error(board, e);
        report.failed += 1;
    }
    if scanned.plugins.is_empty() {
        tracing::warn!("no *.wasm components in {}", dir.display());
    }
    let mut starter = Starter::new(orch, scanned, board, report);
    let (_workers, mut loads) = spawn_loads(engine, scanned, cancel);
    // Until every plugin is handled (not until the workers are gone: a signal in between
    // would look like one during start-up).
    while starter.handled < scanned.plugins.len() {
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => {
                starter.report.interrupted = true;
                break;
            }
            next = loads.recv() => next,
        };
        match next {
            None => break,
            Some((i, result, took)) => starter.handle(i, result, took),
        }
    }
    if let Some(cache) = engine.cache_dir() {
        tracing::info!(
            "{} of {} component(s) from the compile cache {}",
            starter.reused,
            starter.loaded,
            cache.display()
        );
    }
    let mut report = starter.report;
    report.groups = starter.groups.into_iter().map(|(n, g)| (n.to_string(), g)).collect();
    report
}

/// Spawns what loads as it loads: a plugin at once, the members of a group once the whole
/// group has loaded (in start order).
struct Starter<'a> {
    orch: &'a Orchestrator,
    scanned: &'a PluginDir,
    board: &'a PluginBoard,
    groups: BTreeMap<&'a str, Group>,
    waiting: BTreeMap<&'a str, GroupWait>,
    report: StartReport,
    loaded: usize,
    reused: usize,
    /// Plugins whose load finished (loaded or failed).
    handled: usize,
}

impl<'a> Starter<'a> {
    fn new(
        orch: &'a Orchestrator,
        scanned: &'a PluginDir,
        board: &'a PluginBoard,
        report: StartReport,
    ) -> Self {
        let groups = scanned
            .groups
            .iter()
            .map(|(n, g)| (n.as_str(), orch.group(n.clone(), g.strategy, g.intensity.clone())))
            .collect();
        let mut waiting: BTreeMap<&str, GroupWait> = BTreeMap::new();
        for spec in &scanned.plugins {
            board.starting(&spec.stem, &spec.wasm.display().to_string());
            if let Some(g) = scanned.group_of(spec) {
                waiting.entry(g).or_default().left += 1;
            }
        }
        Starter { orch, scanned, board, groups, waiting, report, loaded: 0, reused: 0, handled: 0 }
    }

    /// Plugin `i` has loaded (or failed to) in `took`.
    fn handle(&mut self, i: usize, result: Result<WasmComponent, String>, took: Duration) {
        let spec = &self.scanned.plugins[i];
        self.handled += 1;
        let component = match result {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("plugin failed: {e}");
                self.board.failed(&spec.stem, &spec.wasm.display().to_string(), e);
                self.report.failed += 1;
                if let Some(g) = self.scanned.group_of(spec) {
                    self.member_done(g, None);
                }
                return;
            }
        };
        self.loaded += 1;
        self.reused += usize::from(component.cache_status() == CacheStatus::Hit);
        log_loaded(spec, &component, took, self.board, (self.handled, self.scanned.plugins.len()));
        match self.scanned.group_of(spec) {
            None => start_one(self.orch, spec, &component, None, self.board, &mut self.report),
            Some(g) => self.member_done(g, Some((i, component))),
        }
    }

    /// A member of group `g` is done loading; the last one starts the group.
    fn member_done(&mut self, g: &str, loaded: Option<(usize, WasmComponent)>) {
        let entry = self.waiting.get_mut(g).expect("counted in new");
        entry.loaded.extend(loaded);
        entry.left -= 1;
        if entry.left == 0 {
            let members = std::mem::take(&mut entry.loaded);
            let (orch, scanned, board) = (self.orch, self.scanned, self.board);
            start_group(orch, scanned, &self.groups[g], members, board, &mut self.report);
        }
    }
}

/// Loads the plugins on one worker per core, **smallest component first**, off the threads
/// that run guests (the blocking pool), so guests keep running and the control plane stays
/// responsive; each result is sent as it is ready. Smallest first keeps small plugins from
/// waiting for a large one: an 18 MB Python component compiles for tens of seconds, and its
/// many function jobs would fill wasmtime's parallel-compilation pool ahead of a small
/// component's. The workers stop when the returned set is dropped.
fn spawn_loads(
    engine: &WasmEngine,
    scanned: &PluginDir,
    cancel: &CancellationToken,
) -> (JoinSet<()>, mpsc::UnboundedReceiver<Loaded>) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // On a terminal, say when each compile begins too (debug level otherwise): a large
    // component takes a while on a small machine. Logs keep one line per plugin.
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let size = |i: usize| std::fs::metadata(&scanned.plugins[i].wasm).map_or(0, |m| m.len());
    let mut order: Vec<(u64, usize)> = (0..scanned.plugins.len()).map(|i| (size(i), i)).collect();
    order.sort();
    let jobs: Vec<Job> = order
        .into_iter()
        .map(|(size, i)| {
            let spec = &scanned.plugins[i];
            // Compiled for the engine its manifest asks for (`limits.metering`).
            Job { i, size, path: spec.wasm.clone(), metering: spec.manifest.limits.metering }
        })
        .collect();
    let queue = Arc::new(parking_lot::Mutex::new(std::collections::VecDeque::from(jobs)));
    let (tx, rx) = mpsc::unbounded_channel();
    let mut workers = JoinSet::new();
    for _ in 0..cores.min(scanned.plugins.len()) {
        let (engine, queue, tx, cancel) =
            (engine.clone(), queue.clone(), tx.clone(), cancel.clone());
        workers.spawn(async move {
            loop {
                // Taken and announced under the lock: the log shows the order of the queue.
                let job = {
                    let mut q = queue.lock();
                    let job = q.pop_front();
                    if let Some(j) = &job {
                        let (path, size) = (j.path.display(), kib(j.size));
                        match progress {
                            true => tracing::info!("loading {path} ({size})..."),
                            false => tracing::debug!("loading {path} ({size})..."),
                        }
                    }
                    job
                };
                let Some(Job { i, path, metering, .. }) = job else { return };
                if cancel.is_cancelled() {
                    let why = Err(format!("{}: start-up interrupted", path.display()));
                    let _ = tx.send((i, why, Duration::ZERO));
                    continue;
                }
                let started = Instant::now();
                let engine = engine.clone();
                let result = tokio::task::spawn_blocking(move || {
                    engine
                        .load_file_metered(&path, metering)
                        .map_err(|e| PluginError::from(e).to_string())
                })
                .await
                .unwrap_or_else(|e| Err(format!("loading panicked: {e}")));
                let _ = tx.send((i, result, started.elapsed()));
            }
        });
    }
    (workers, rx)
}

/// One plugin to load: its index in the scan, its size, its file and its metering.
struct Job {
    i: usize,
    size: u64,
    path: std::path::PathBuf,
    metering: crate::wasm::Metering,
}

fn report_scan_error(board: &PluginBoard, e: &PluginError) {
    let path = e.path();
    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if e.is_dir_config() {
        // Not a plugin: every plugin still starts, on its own.
        tracing::error!("invalid {DIR_CONFIG} in the plugin directory: {e}");
    } else {
        tracing::error!("plugin failed: {e}");
    }
    board.failed(&name, &path.display().to_string(), e.to_string());
}

/// The one line per plugin: size, compiled or cached, time, and how many of the `total`
/// plugins are done.
fn log_loaded(
    spec: &PluginSpec,
    component: &WasmComponent,
    took: Duration,
    board: &PluginBoard,
    (done, total): (usize, usize),
) {
    let size = std::fs::metadata(&spec.wasm).map(|m| m.len()).unwrap_or(0);
    board.loaded(&spec.stem, size, took.as_secs_f64());
    let how = match component.cache_status() {
        CacheStatus::Hit => "from the compile cache",
        _ => "compiled",
    };
    tracing::info!(
        "loaded {} ({}, {how} in {} ms) [{done}/{total}]",
        spec.wasm.display(),
        kib(size),
        took.as_millis()
    );
}

/// A file size for the start-up lines: `12.3 KiB`.
fn kib(bytes: u64) -> String {
    format!("{:.1} KiB", bytes as f64 / 1024.0)
}

/// Spawns the members of a group that loaded, in start order.
fn start_group(
    orch: &Orchestrator,
    scanned: &PluginDir,
    group: &Group,
    mut members: Vec<(usize, WasmComponent)>,
    board: &PluginBoard,
    report: &mut StartReport,
) {
    members.sort_by_key(|(i, _)| *i);
    for (i, component) in members {
        let spec = &scanned.plugins[i];
        start_one(orch, spec, &component, Some(group), board, report);
    }
}

/// Spawns the routines of one loaded plugin and records the result on the board.
fn start_one(
    orch: &Orchestrator,
    spec: &PluginSpec,
    component: &WasmComponent,
    group: Option<&Group>,
    board: &PluginBoard,
    report: &mut StartReport,
) {
    let file = spec.wasm.display().to_string();
    let names = spec.manifest.routine_names(&spec.stem);
    let (started, errors) = spawn_routines(orch, spec, component, &names, group);
    report.routines += started;
    if errors.is_empty() {
        board.running(&spec.stem, started);
        report.started += 1;
    } else {
        board.failed(&spec.stem, &file, errors.join("; "));
        report.failed += 1;
    }
}

/// Spawns the routines `names` of `spec` (in `group`, if any): how many started, and why
/// the others did not (each also logged).
pub(super) fn spawn_routines(
    orch: &Orchestrator,
    spec: &PluginSpec,
    component: &WasmComponent,
    names: &[String],
    group: Option<&Group>,
) -> (usize, Vec<String>) {
    let mut started = 0;
    let mut errors = Vec::new();
    for name in names {
        let mut opts = spec.manifest.spawn_options(name.clone());
        if let Some(g) = group {
            opts = opts.group(g);
        }
        match orch.spawn_wasm_as(opts, spec.stem.clone(), component, spec.manifest.wasm_options()) {
            Ok(_) => started += 1,
            Err(e) => {
                tracing::error!("{}: cannot start {name}: {e}", spec.wasm.display());
                errors.push(format!("cannot start {name}: {e}"));
            }
        }
    }
    (started, errors)
}
