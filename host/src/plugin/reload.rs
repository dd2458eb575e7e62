//! Live reload of a plugin directory: what changed since the last apply is applied while
//! everything else keeps running. A new `NAME.wasm` starts; a removed one stops on request;
//! a changed `NAME.wasm` or `NAME.toml` (content hashes, not times) is compiled and checked
//! first (a broken version is refused and the running one keeps running), then its
//! instances are upgraded one at a time (`RoutineHandle::upgrade`: same name, same mailbox,
//! every message kept); a changed `instances` adds or stops replicas; an unchanged plugin is
//! left alone. A changed `gorch.toml`, or a changed supervision or mailbox setting (restart
//! policy, backoff, intensity, `max-deliveries`, `queue-capacity`, `idle-timeout`), is
//! reported as needing a restart of the host: the new code still runs, under the old
//! settings. A changed `limits.metering` is a changed limit like the others: the component
//! is compiled for the other engine and the instances are upgraded to it (their fuel count
//! becomes absent with `time`, and counts on from where it was with `fuel`). Reloads are
//! serialized; a reload during shutdown is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::dir::{DIR_CONFIG, MAX_MANIFEST_BYTES, PluginDir, PluginSpec};
use super::manifest::{MAX_INSTANCES, PluginManifest};
use super::status::PluginBoard;
use crate::orchestrator::Orchestrator;
use crate::supervisor::Group;
use crate::wasm::{WasmComponent, WasmEngine};

/// What a reload did to one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReloadAction {
    /// A new plugin: loaded and started.
    Started,
    /// New code or limits: every instance replaced, one at a time.
    Upgraded,
    /// Only `instances` changed: replicas added or stopped.
    Scaled,
    /// Its file is gone: its routines were stopped on request.
    Stopped,
    /// Nothing changed.
    Unchanged,
    /// The new version could not be loaded: the running one (if any) keeps running.
    Failed,
    /// A change that takes effect only when the host restarts (see the module doc).
    NeedsRestart,
}

/// One line of a [`ReloadReport`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginChange {
    /// The plugin (file stem), or `gorch.toml`.
    pub plugin: String,
    /// The file.
    pub file: String,
    /// What was done.
    pub action: ReloadAction,
    /// The version now running (first 12 hex digits of the component's SHA-256).
    pub version: Option<String>,
    /// Why it failed, or what needs a restart.
    pub error: Option<String>,
}

/// What [`Reloader::apply`] did, plugin by plugin (sorted by file).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    /// One entry per plugin of the directory (and per plugin that left it).
    pub plugins: Vec<PluginChange>,
    /// How many entries failed.
    pub failed: usize,
}

/// What is running from one plugin file.
/// The SHA-256 of a small file (a manifest, `gorch.toml`), `None` when there is none.
type FileHash = Option<[u8; 32]>;

#[derive(Clone)]
struct Applied {
    wasm_hash: [u8; 32],
    toml_hash: FileHash,
    manifest: PluginManifest,
    routines: Vec<String>,
    version: String,
}

/// Applies the state of a plugin directory to a running host (see the module doc).
/// Cheap to clone.
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

struct Inner {
    orch: Orchestrator,
    engine: WasmEngine,
    dir: PathBuf,
    board: PluginBoard,
    /// The groups formed at start-up: new members join them.
    groups: parking_lot::Mutex<BTreeMap<String, Group>>,
    /// What runs; the lock serializes reloads.
    applied: tokio::sync::Mutex<Running>,
}

/// What runs from the directory: each plugin by stem, and the hash of `gorch.toml`.
struct Running {
    plugins: BTreeMap<String, Applied>,
    config: FileHash,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").field("dir", &self.inner.dir).finish()
    }
}

impl Reloader {
    /// A reloader for `dir`, taking the files of `scanned` (hashed now, before they are
    /// loaded) as the running state. Call [`adopt`](Self::adopt) once they
    /// were started: a plugin that did not start is then new to the next reload.
    pub fn new(
        orch: &Orchestrator,
        engine: &WasmEngine,
        dir: &Path,
        scanned: &PluginDir,
        board: &PluginBoard,
    ) -> Self {
        let mut applied = BTreeMap::new();
        for spec in &scanned.plugins {
            let Ok((_, wasm_hash, toml_hash)) = read_hashed(spec, engine.max_component_bytes())
            else {
                continue;
            };
            let routines = spec.manifest.routine_names(&spec.stem);
            let manifest = spec.manifest.clone();
            let version = String::new();
            applied.insert(
                spec.stem.clone(),
                Applied { wasm_hash, toml_hash, manifest, routines, version },
            );
        }
        let config = file_hash(&dir.join(DIR_CONFIG));
        Reloader {
            inner: Arc::new(Inner {
                orch: orch.clone(),
                engine: engine.clone(),
                dir: dir.to_path_buf(),
                board: board.clone(),
                groups: parking_lot::Mutex::new(BTreeMap::new()),
                applied: tokio::sync::Mutex::new(Running { plugins: applied, config }),
            }),
        }
    }

    /// After start-up (`started` is what [`start_plugins`](super::start_plugins) did): keeps
    /// the plugins whose routines run (with their version) and forgets the others, so that
    /// the next reload tries them again; new members of a group join its group.
    pub async fn adopt(&self, started: &super::StartReport) {
        *self.inner.groups.lock() = started.groups.clone();
        let orch = &self.inner.orch;
        let mut running = self.inner.applied.lock().await;
        // A routine of that name started from another file (a name clash) is not this one's.
        let own = |stem: &str, n: &String| orch.get_by_name(n).filter(|h| h.plugin() == stem);
        running.plugins.retain(|stem, p| match p.routines.iter().find_map(|n| own(stem, n)) {
            Some(h) => {
                p.version = h.version();
                true
            }
            None => false,
        });
    }

    /// The directory it reloads.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Re-scans the directory and applies what changed. Concurrent calls run one after
    /// the other; during shutdown the reload is refused (one failed entry says so). Each
    /// change and a summary line are logged.
    pub async fn apply(&self) -> ReloadReport {
        self.apply_with(true).await
    }

    /// Like [`apply`](Self::apply), but a plugin whose files are missing keeps running
    /// (`--watch` applying a directory that is still being written: a plugin not copied
    /// yet is not stopped); a later `apply` stops it.
    pub async fn apply_keeping_missing(&self) -> ReloadReport {
        self.apply_with(false).await
    }

    async fn apply_with(&self, remove_missing: bool) -> ReloadReport {
        let mut report = self.apply_quietly(remove_missing).await;
        report.plugins.sort_by(|a, b| a.file.cmp(&b.file));
        for c in &report.plugins {
            match c.action {
                ReloadAction::Unchanged => {}
                ReloadAction::Failed => {
                    let why = c.error.as_deref().unwrap_or("failed");
                    tracing::error!("reload: {}", super::status::about_file(&c.file, why))
                }
                _ => tracing::info!("reload: {}: {}", c.file, c.action.as_str()),
            }
        }
        // One result line for every reload, even one that changed nothing (a SIGHUP would
        // otherwise leave no trace of its outcome).
        tracing::info!("reload: {}", report.summary());
        report
    }

    async fn apply_quietly(&self, remove_missing: bool) -> ReloadReport {
        let inner = &*self.inner;
        let mut guard = inner.applied.lock().await;
        let mut report = ReloadReport::default();
        if inner.orch.is_shut_down() {
            report.push(change(
                DIR_CONFIG,
                &inner.dir,
                ReloadAction::Failed,
                None,
                Some("the host is shutting down: reload refused".into()),
            ));
            return report;
        }
        // The names that run keep their plugin: a new file asking for one is refused.
        let owned: BTreeMap<String, (String, PathBuf)> = guard
            .plugins
            .iter()
            .map(|(stem, a)| (stem, a, inner.dir.join(format!("{stem}.wasm"))))
            // A plugin whose file is gone stops in this reload: its names are free.
            .filter(|(_, _, wasm)| wasm.exists())
            .flat_map(|(stem, a, wasm)| {
                a.routines.iter().map(move |n| (n.clone(), (stem.clone(), wasm.clone())))
            })
            .collect();
        let scanned = match PluginDir::scan_owned(&inner.dir, &owned) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("cannot read {}: {e}", inner.dir.display());
                report.push(change(DIR_CONFIG, &inner.dir, ReloadAction::Failed, None, Some(why)));
                return report;
            }
        };
        let Running { plugins: applied, config } = &mut *guard;
        let config_now = file_hash(&inner.dir.join(DIR_CONFIG));
        if config_now != *config {
            let why = "gorch.toml changed: groups are re-formed when the host restarts".into();
            let path = inner.dir.join(DIR_CONFIG);
            report.push(change(DIR_CONFIG, &path, ReloadAction::NeedsRestart, None, Some(why)));
            *config = config_now;
        }
        if let Err(why) = inner.check_room(&scanned) {
            report.push(change(DIR_CONFIG, &inner.dir, ReloadAction::Failed, None, Some(why)));
            return report;
        }
        // A plugin whose files are broken now is reported; if it runs, it keeps running.
        let broken: Vec<String> = scanned.errors.iter().map(|e| stem_of(e.path())).collect();
        for (e, stem) in scanned.errors.iter().zip(&broken) {
            let file = e.path().display().to_string();
            let mut why = e.to_string();
            if applied.contains_key(stem) {
                why.push_str("; the running version keeps running");
                inner.board.note(stem, why.clone());
            } else {
                inner.board.failed(stem, &file, why.clone());
            }
            report.push(change(stem, e.path(), ReloadAction::Failed, None, Some(why)));
        }
        let present = |stem: &String| {
            scanned.plugins.iter().any(|p| &p.stem == stem) || broken.contains(stem)
        };
        // What left the directory stops first: its routine names are free for the others.
        let gone: Vec<String> = match remove_missing {
            true => applied.keys().filter(|s| !present(s)).cloned().collect(),
            false => Vec::new(),
        };
        for stem in gone {
            let old = applied.remove(&stem).expect("listed above");
            inner.stop_all(&old.routines).await;
            inner.board.remove(&stem);
            let file = inner.dir.join(format!("{stem}.wasm"));
            report.push(change(&stem, &file, ReloadAction::Stopped, Some(old.version), None));
        }
        // Smallest first, as at start-up: a small plugin does not wait for a large compile.
        let mut order: Vec<&PluginSpec> = scanned.plugins.iter().collect();
        order.sort_by_key(|p| std::fs::metadata(&p.wasm).map_or(0, |m| m.len()));
        for spec in order {
            let c = inner.apply_one(spec, &scanned, applied).await;
            report.push(c);
        }
        // What is neither in the directory nor running leaves the board (and /readyz).
        for p in inner.board.list() {
            if !present(&p.plugin) && !applied.contains_key(&p.plugin) {
                inner.board.remove(&p.plugin);
            }
        }
        report
    }
}

impl ReloadReport {
    /// One line: how many plugins, and how many of them each action took, such as `6
    /// plugin(s): 1 upgraded, 5 unchanged`.
    pub fn summary(&self) -> String {
        use ReloadAction::*;
        let counts: Vec<String> =
            [Started, Upgraded, Scaled, Stopped, NeedsRestart, Failed, Unchanged]
                .into_iter()
                .filter_map(|a| {
                    let n = self.plugins.iter().filter(|c| c.action == a).count();
                    (n > 0).then(|| format!("{n} {}", a.as_str()))
                })
                .collect();
        match counts.is_empty() {
            true => "nothing to apply".to_string(),
            false => format!("{} plugin(s): {}", self.plugins.len(), counts.join(", ")),
        }
    }
}

impl ReloadAction {
    /// The report's name: `started`, `upgraded`, `needs-restart`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadAction::Started => "started",
            ReloadAction::Upgraded => "upgraded",
            ReloadAction::Scaled => "scaled",
            ReloadAction::Stopped => "stopped",
            ReloadAction::Unchanged => "unchanged",
            ReloadAction::Failed => "failed",
            ReloadAction::NeedsRestart => "needs-restart",
        }
    }
}

fn stem_of(path: &Path) -> String {
    path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

impl ReloadReport {
    fn push(&mut self, c: PluginChange) {
        if c.action == ReloadAction::Failed {
            self.failed += 1;
        }
        self.plugins.push(c);
    }
}

fn change(
    plugin: &str,
    file: &Path,
    action: ReloadAction,
    version: Option<String>,
    error: Option<String>,
) -> PluginChange {
    PluginChange {
        plugin: plugin.to_string(),
        file: file.display().to_string(),
        action,
        version,
        error,
    }
}

impl Inner {
    /// Refuses a directory that asks for more instances than this host has room for.
    fn check_room(&self, scanned: &PluginDir) -> Result<(), String> {
        let total = scanned.instances();
        let max = MAX_INSTANCES as usize;
        let room = self.engine.pool_size().map_or(max, |n| (n as usize).min(max));
        if total > room {
            return Err(format!(
                "the directory asks for {total} instances, more than the {room} this host has \
                 room for: restart the host to size its instance pool for them (at most {max})"
            ));
        }
        Ok(())
    }

    /// Applies one plugin of the new scan against what runs.
    async fn apply_one(
        &self,
        spec: &PluginSpec,
        scanned: &PluginDir,
        applied: &mut BTreeMap<String, Applied>,
    ) -> PluginChange {
        let stem = spec.stem.as_str();
        let fail = |why: String| change(stem, &spec.wasm, ReloadAction::Failed, None, Some(why));
        let file = spec.wasm.display().to_string();
        let (bytes, wasm_hash, toml_hash) =
            match read_hashed(spec, self.engine.max_component_bytes()) {
                Ok(h) => h,
                Err(e) => {
                    // On the board too (a file made unreadable, say), not only in the report.
                    match applied.contains_key(stem) {
                        true => {
                            self.board.note(stem, format!("{e}; the running version keeps running"))
                        }
                        false => self.board.failed(stem, &file, e.clone()),
                    }
                    return fail(e);
                }
            };
        let old = applied.get(stem).cloned();
        if let Some(old) = &old {
            if old.wasm_hash == wasm_hash && old.toml_hash == toml_hash {
                let v = Some(old.version.clone());
                let ended: Vec<String> =
                    old.routines.iter().filter(|n| !self.runs(stem, n)).cloned().collect();
                if ended.is_empty() {
                    let note = self.rolled_back(stem, old);
                    return change(stem, &spec.wasm, ReloadAction::Unchanged, v, note);
                }
                // Routines that had been rolled back from this file and ended since: the
                // file stays refused until it changes.
                if let Some(ran) = ended.iter().find_map(|n| self.ran_other_version(n, old)) {
                    let note = format!(
                        "version {} gave up after its upgrade and was rolled back to version \
                         {ran}, whose routines have ended since; the file is tried again when \
                         it changes",
                        old.version
                    );
                    self.board.note(stem, note.clone());
                    return change(stem, &spec.wasm, ReloadAction::Unchanged, v, Some(note));
                }
                return self.restart_ended(spec, scanned, bytes, &ended).await;
            }
            if let Some(why) = renames(&old.manifest, &spec.manifest) {
                let v = Some(old.version.clone());
                return change(stem, &spec.wasm, ReloadAction::NeedsRestart, v, Some(why));
            }
        }
        // Compile and check first, off the threads that run guests: a broken version is
        // refused and the running one keeps running.
        let started = std::time::Instant::now();
        let size = bytes.len() as u64;
        let component = match self.load(spec, bytes).await {
            Ok(c) => c,
            Err(e) => {
                match old {
                    None => self.board.failed(stem, &spec.wasm.display().to_string(), e.clone()),
                    Some(_) => self.board.note(stem, format!("new version refused: {e}")),
                }
                return fail(e);
            }
        };
        let took = started.elapsed().as_secs_f64();
        let names = spec.manifest.routine_names(stem);
        let version = component.version().to_string();
        let (action, note) = match &old {
            None => {
                if let Err(e) = self.spawn_all(spec, scanned, &component, &names) {
                    // Nothing of a plugin that did not start whole keeps running: the next
                    // reload tries it again.
                    let started: Vec<String> =
                        names.iter().filter(|n| self.runs(stem, n)).cloned().collect();
                    self.stop_all(&started).await;
                    self.board.failed(stem, &spec.wasm.display().to_string(), e.clone());
                    return fail(e);
                }
                (ReloadAction::Started, None)
            }
            Some(old) => {
                let code_changed =
                    old.wasm_hash != wasm_hash || limits_changed(&old.manifest, &spec.manifest);
                let rolled = self.roll(spec, scanned, &component, old, &names, code_changed).await;
                if let Err(e) = rolled {
                    let e = format!("upgrade refused: {e}");
                    self.board.note(stem, e.clone());
                    return fail(e);
                }
                let note = settings_note(&old.manifest, &spec.manifest);
                let action = match (&note, code_changed) {
                    (Some(_), _) => ReloadAction::NeedsRestart,
                    (None, true) => ReloadAction::Upgraded,
                    (None, false) => ReloadAction::Scaled,
                };
                (action, note)
            }
        };
        let running = names.iter().filter(|n| self.orch.get_by_name(n).is_some()).count();
        self.board.starting(stem, &spec.wasm.display().to_string());
        self.board.loaded(stem, size, took);
        self.board.running(stem, running);
        let manifest = spec.manifest.clone();
        let entry =
            Applied { wasm_hash, toml_hash, manifest, routines: names, version: version.clone() };
        applied.insert(stem.to_string(), entry);
        change(stem, &spec.wasm, action, Some(version), note)
    }

    /// The version the ended routine `name` last ran, when it is not the applied one (it
    /// was rolled back), from the history.
    fn ran_other_version(&self, name: &str, old: &Applied) -> Option<String> {
        let last = self.orch.history().into_iter().rev().find(|s| s.name == name)?;
        (!old.version.is_empty() && last.version != old.version).then_some(last.version)
    }

    /// Whether the routine `name` of plugin `stem` is live.
    fn runs(&self, stem: &str, name: &str) -> bool {
        self.orch.get_by_name(name).is_some_and(|h| h.plugin() == stem)
    }

    /// An unchanged plugin some of whose routines ended (stopped on request, or ended by
    /// their policy): the directory says they run, so they start again.
    async fn restart_ended(
        &self,
        spec: &PluginSpec,
        scanned: &PluginDir,
        bytes: Vec<u8>,
        ended: &[String],
    ) -> PluginChange {
        let stem = spec.stem.as_str();
        let fail = |why: String| change(stem, &spec.wasm, ReloadAction::Failed, None, Some(why));
        let component = match self.load(spec, bytes).await {
            Ok(c) => c,
            Err(e) => return fail(e),
        };
        if let Err(e) = self.spawn_all(spec, scanned, &component, ended) {
            return fail(e);
        }
        let names = spec.manifest.routine_names(stem);
        self.board.running(stem, names.iter().filter(|n| self.runs(stem, n)).count());
        let note = format!("{} of its routines had ended: started again", ended.len());
        let v = Some(component.version().to_string());
        change(stem, &spec.wasm, ReloadAction::Started, v, Some(note))
    }

    /// A note when routines of `stem` run another version than the one applied: the new
    /// version gave up within its rollback window and the previous one came back. The file
    /// is not tried again until it changes; the board says so.
    fn rolled_back(&self, stem: &str, old: &Applied) -> Option<String> {
        let running = old
            .routines
            .iter()
            .filter_map(|n| self.orch.get_by_name(n))
            .find(|h| h.plugin() == stem && h.version() != old.version)?
            .version();
        let note = format!(
            "version {} gave up after its upgrade and version {running} runs again; the file is \
             tried again when it changes",
            old.version
        );
        self.board.note(stem, note.clone());
        Some(note)
    }

    /// Compiles and checks `bytes` (the file as hashed) on the blocking pool, for the engine
    /// of its `limits.metering`.
    async fn load(&self, spec: &PluginSpec, bytes: Vec<u8>) -> Result<WasmComponent, String> {
        let engine = self.engine.clone();
        let path = spec.wasm.clone();
        let metering = spec.manifest.limits.metering;
        tokio::task::spawn_blocking(move || {
            engine.load_bytes_metered(&path, &bytes, metering).map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("loading panicked: {e}")))
    }

    /// Spawns `names` of `spec`, in its group if `gorch.toml` puts it in one; the reasons
    /// of those that did not start, joined.
    fn spawn_all(
        &self,
        spec: &PluginSpec,
        scanned: &PluginDir,
        component: &WasmComponent,
        names: &[String],
    ) -> Result<(), String> {
        let group = scanned.group_of(spec).and_then(|g| self.groups.lock().get(g).cloned());
        let (_, errors) =
            super::start::spawn_routines(&self.orch, spec, component, names, group.as_ref());
        match errors.is_empty() {
            true => Ok(()),
            false => Err(errors.join("; ")),
        }
    }

    /// Rolling replacement: the instances that stay are upgraded one at a time (when the
    /// code or the limits changed), new replicas start, surplus ones stop.
    async fn roll(
        &self,
        spec: &PluginSpec,
        scanned: &PluginDir,
        component: &WasmComponent,
        old: &Applied,
        names: &[String],
        code_changed: bool,
    ) -> Result<(), String> {
        let added: Vec<String> =
            names.iter().filter(|n| !old.routines.contains(n)).cloned().collect();
        let removed: Vec<String> =
            old.routines.iter().filter(|n| !names.contains(n)).cloned().collect();
        if code_changed {
            for name in names.iter().filter(|n| old.routines.contains(n)) {
                match self.orch.get_by_name(name) {
                    Some(h) => {
                        // One at a time; a refused state hand-over stops the roll-out (the
                        // instances not yet upgraded keep the running version).
                        h.upgrade(component, spec.manifest.wasm_options())
                            .await
                            .map_err(|e| format!("{name}: {e}"))?;
                    }
                    // It ended meanwhile (by its policy): start the new version.
                    None => self.spawn_all(spec, scanned, component, std::slice::from_ref(name))?,
                }
            }
        }
        self.spawn_all(spec, scanned, component, &added)?;
        self.stop_all(&removed).await;
        Ok(())
    }

    /// Stops these routines on request and waits for their end.
    async fn stop_all(&self, names: &[String]) {
        let handles: Vec<_> = names.iter().filter_map(|n| self.orch.get_by_name(n)).collect();
        for h in &handles {
            h.stop();
        }
        for h in &handles {
            h.wait().await;
        }
    }
}

/// Whether the per-instance settings that an upgrade applies (limits, WASI grants) changed.
fn limits_changed(old: &PluginManifest, new: &PluginManifest) -> bool {
    old.limits != new.limits || old.wasi != new.wasi
}

/// The settings fixed when a routine is spawned that changed, if any: they need a restart.
fn settings_note(old: &PluginManifest, new: &PluginManifest) -> Option<String> {
    let mut changed = Vec::new();
    if old.restart != new.restart {
        changed.push("restart")
    }
    if old.backoff != new.backoff {
        changed.push("backoff")
    }
    if old.intensity != new.intensity {
        changed.push("intensity")
    }
    if old.max_deliveries != new.max_deliveries {
        changed.push("max-deliveries")
    }
    if old.rollback_window != new.rollback_window {
        changed.push("rollback-window")
    }
    if old.queue_capacity != new.queue_capacity {
        changed.push("queue-capacity")
    }
    if old.idle_timeout != new.idle_timeout {
        changed.push("idle-timeout")
    }
    (!changed.is_empty())
        .then(|| format!("{} changed: takes effect when the host restarts", changed.join(", ")))
}

/// Why a changed manifest would rename the routines (and so lose their mailboxes), if it
/// would: a new `name`, or `instances` going from 1 to more or back (`echo` / `echo-1`..).
/// Such a change is not applied; it takes effect when the host restarts.
fn renames(old: &PluginManifest, new: &PluginManifest) -> Option<String> {
    let why = if old.name != new.name {
        "name changed"
    } else if (old.instances > 1) != (new.instances > 1) {
        "instances changed between 1 and more (the routines are named `NAME` or `NAME-1`..)"
    } else {
        return None;
    };
    Some(format!(
        "{why}: that renames the routines, so nothing was applied; it takes effect when the host restarts"
    ))
}

/// The component's bytes (what is then loaded), their SHA-256, and the SHA-256 of the
/// manifest (`None` when there is none).
fn read_hashed(spec: &PluginSpec, limit: u64) -> Result<(Vec<u8>, [u8; 32], FileHash), String> {
    let wasm = crate::fsread::read_regular(&spec.wasm, limit)
        .map_err(|e| format!("{}: {e}", spec.wasm.display()))?;
    let hash = Sha256::digest(&wasm).into();
    Ok((wasm, hash, file_hash(&spec.wasm.with_extension("toml"))))
}

/// SHA-256 of a small file; `None` when it cannot be read (missing).
fn file_hash(path: &Path) -> FileHash {
    let bytes = crate::fsread::read_regular(path, MAX_MANIFEST_BYTES).ok()?;
    Some(Sha256::digest(&bytes).into())
}
