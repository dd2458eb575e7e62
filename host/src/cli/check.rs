//! `gorch-host check FILE...`: load each component as `run` would and print its world,
//! imports and exports.

use std::io::Write;
use std::path::PathBuf;

use anyhow::bail;

use super::EngineArgs;
use crate::wasm::{EngineConfig, WasmEngine};

/// `gorch-host check FILE...`.
#[derive(Debug, clap::Args)]
pub struct CheckCmd {
    /// Component files to validate.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Engine flags (compile cache).
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl CheckCmd {
    /// Validates each file; fails if any is bad.
    pub fn run(self) -> anyhow::Result<()> {
        let engine = WasmEngine::new(EngineConfig { pooling: false, ..self.engine.config(0) })?;
        let mut bad = 0;
        let mut out = std::io::stdout().lock();
        for f in &self.files {
            match engine.load_file(f) {
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
                }
            }
        }
        if bad > 0 {
            bail!("{bad} of {} file(s) failed the check", self.files.len());
        }
        Ok(())
    }
}
