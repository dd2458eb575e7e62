//! `gorch-host check FILE...`: load each component as `run` would and print its world,
//! imports and exports; a manifest beside it (`NAME.toml` next to `NAME.wasm`) is parsed as
//! `run` parses it, and the component compiled for its `metering`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;

use super::EngineArgs;
use crate::plugin::PluginManifest;
use crate::wasm::{EngineConfig, Metering, WasmEngine};

/// `gorch-host check FILE...`.
#[derive(Debug, clap::Args)]
pub struct CheckCmd {
    /// Component files to validate (with the manifest beside each, `NAME.toml`, if any).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Engine flags (compile cache).
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// The `build.sh` of a project made by `gorch-host new` that builds `file` (as
/// `plugins/NAME.wasm`), if there is one.
fn build_script_for(file: &std::path::Path) -> Option<std::path::PathBuf> {
    let plugins = file.parent()?;
    if plugins.file_name()? != "plugins" {
        return None;
    }
    let project = plugins.parent()?;
    let project = if project.as_os_str().is_empty() { std::path::Path::new(".") } else { project };
    let script = project.join("build.sh");
    script.is_file().then_some(script)
}

impl CheckCmd {
    /// Validates each file; fails if any is bad.
    pub fn run(self) -> anyhow::Result<()> {
        // What `run` would use (pooling) for the manifests' warnings; no pool to check.
        let run_config = self.engine.config(0);
        let engine = WasmEngine::new(EngineConfig { pooling: false, ..run_config.clone() })?;
        let mut bad = 0;
        let mut out = std::io::stdout().lock();
        for f in &self.files {
            let manifest = f.with_extension("toml");
            let mut metering = Metering::Fuel;
            if f.extension().is_some_and(|e| e == "wasm") && manifest.is_file() {
                match PluginManifest::from_file(&manifest) {
                    Ok(m) => {
                        metering = m.limits.metering;
                        writeln!(out, "{}: ok", manifest.display())?;
                        for w in m.warnings(&run_config) {
                            writeln!(out, "  warning: {w}")?;
                        }
                    }
                    Err(e) => {
                        bad += 1;
                        writeln!(out, "error: {e}")?;
                        continue;
                    }
                }
            }
            match engine.load_file_metered(f, metering) {
                Ok(c) => {
                    let world =
                        if c.is_command() { "wasi:cli/command" } else { "gorch:worker/worker" };
                    writeln!(out, "{}: ok ({world})", f.display())?;
                    for i in c.imports() {
                        writeln!(out, "  import {i}")?;
                    }
                    for e in c.exports() {
                        writeln!(out, "  export {e}")?;
                    }
                }
                Err(e) => {
                    bad += 1;
                    writeln!(out, "error: {e}")?;
                    if !f.exists()
                        && let Some(build) = build_script_for(f)
                    {
                        writeln!(
                            out,
                            "  the component is not built yet: run {} first",
                            build.display()
                        )?;
                    }
                }
            }
        }
        if bad > 0 {
            bail!("{bad} of {} file(s) failed the check", self.files.len());
        }
        Ok(())
    }
}
