//! Starting a scanned plugin directory: load each component (compile or cache), spawn its
//! routines with the manifest's settings, in groups where `gorch.toml` says so. A bad
//! plugin is reported by file and skipped; the others start.

use std::collections::BTreeMap;
use std::path::Path;

use super::dir::{PluginDir, PluginError};
use crate::orchestrator::Orchestrator;
use crate::supervisor::Group;
use crate::wasm::{CacheStatus, WasmEngine};

/// Loads every plugin `scanned` from `dir` and spawns its routines. A bad plugin is reported
/// (by file, with the reason) and skipped; the others start. Returns how many routines
/// started.
pub fn start_plugins(
    orch: &Orchestrator,
    engine: &WasmEngine,
    dir: &Path,
    scanned: &PluginDir,
) -> usize {
    for e in &scanned.errors {
        tracing::error!("skipping plugin: {e}");
    }
    if scanned.plugins.is_empty() {
        tracing::warn!("no *.wasm components in {}", dir.display());
    }
    let groups: BTreeMap<&str, Group> = scanned
        .groups
        .iter()
        .map(|(name, g)| (name.as_str(), orch.group(name.clone(), g.strategy, g.intensity.clone())))
        .collect();
    let mut started = 0;
    let (mut loaded, mut reused) = (0, 0);
    for spec in &scanned.plugins {
        let component = match engine.load_file(&spec.wasm) {
            Ok(c) => {
                loaded += 1;
                reused += usize::from(c.cache_status() == CacheStatus::Hit);
                c
            }
            Err(e) => {
                tracing::error!("skipping plugin: {}", PluginError::from(e));
                continue;
            }
        };
        for name in spec.manifest.routine_names(&spec.stem) {
            let mut opts = spec.manifest.spawn_options(name.clone());
            if let Some(g) = scanned.group_of(spec).and_then(|g| groups.get(g)) {
                opts = opts.group(g);
            }
            match orch.spawn_wasm_as(
                opts,
                spec.stem.clone(),
                &component,
                spec.manifest.wasm_options(),
            ) {
                Ok(_) => started += 1,
                Err(e) => tracing::error!("{}: cannot start {name}: {e}", spec.wasm.display()),
            }
        }
    }
    if let Some(cache) = engine.cache_dir() {
        tracing::info!(
            "{reused} of {loaded} component(s) from the compile cache {}",
            cache.display()
        );
    }
    started
}
