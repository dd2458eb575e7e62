//! The `gorch-host` command line: one clap struct per subcommand, each with `run()`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use crate::obs::{ObsConfig, ObsServer};
use crate::orchestrator::Orchestrator;
use crate::plugin::PluginDir;
use crate::wasm::{DEFAULT_POOL_SIZE, EngineConfig, WasmEngine};

/// Runs sandboxed WebAssembly component workers and keeps them alive and visible.
#[derive(Debug, Parser)]
#[command(name = "gorch-host", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load, validate and start every plugin in a directory; run until SIGINT/SIGTERM.
    Run(RunCmd),
    /// Validate component files against the gorch:worker world; print imports and exports.
    Check(CheckCmd),
    /// Print the stats table of a running host (from its JSON API).
    Ps(PsCmd),
}

impl Cli {
    /// Runs the chosen subcommand.
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Run(c) => c.run().await,
            Command::Check(c) => c.run(),
            Command::Ps(c) => c.run().await,
        }
    }
}

/// `gorch-host run DIR`.
#[derive(Debug, clap::Args)]
pub struct RunCmd {
    /// Directory with `NAME.wasm` components and optional `NAME.toml` manifests.
    pub dir: PathBuf,
    /// Bound on the graceful shutdown after the first signal (a second signal kills at once).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Address of the observability server (metrics, dashboard, JSON API).
    #[arg(long, default_value = crate::obs::DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// Do not serve the dashboard at /gorchestra.
    #[arg(long)]
    pub no_dashboard: bool,
    /// Serve a CPU profile at /debug/pprof/profile?seconds=N (off by default).
    #[arg(long)]
    pub pprof: bool,
    /// Require `Authorization: Bearer TOKEN` on every route but /healthz.
    #[arg(long, env = "GORCH_TOKEN")]
    pub token: Option<String>,
    /// Engine flags (compile cache).
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Engine settings shared by `run` and `check`.
#[derive(Debug, clap::Args)]
pub struct EngineArgs {
    /// Directory of compiled components, so later starts skip compilation
    /// [default: $XDG_CACHE_HOME/gorch-host or ~/.cache/gorch-host].
    #[arg(long, env = "GORCH_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Compile every component at start, without reading or writing the cache.
    #[arg(long, conflicts_with = "cache_dir")]
    pub no_cache: bool,
}

impl EngineArgs {
    /// The engine configuration these flags ask for, with room in the instance pool for
    /// `instances` concurrent instances (at least the default).
    pub fn config(&self, instances: usize) -> EngineConfig {
        let cache_dir = if self.no_cache {
            None
        } else {
            self.cache_dir.clone().or_else(crate::CompileCache::default_dir)
        };
        let pool_size = u32::try_from(instances).unwrap_or(u32::MAX).max(DEFAULT_POOL_SIZE);
        EngineConfig { cache_dir, pool_size, ..Default::default() }
    }
}

impl RunCmd {
    /// Starts the plugins and runs until a signal.
    pub async fn run(self) -> anyhow::Result<()> {
        let orch = Orchestrator::new();
        let obs_config = ObsConfig {
            addr: self.addr,
            dashboard: !self.no_dashboard,
            pprof: self.pprof,
            token: self.token.clone(),
        };
        let server = ObsServer::start(&orch, &obs_config)
            .with_context(|| format!("cannot listen on {}", self.addr))?;
        let addr = server.local_addr();
        let scanned = PluginDir::scan(&self.dir)
            .with_context(|| format!("cannot read plugin directory {}", self.dir.display()))?;
        let engine = WasmEngine::new(self.engine.config(scanned.instances()))?;
        let started = start_plugins(&orch, &engine, &self.dir, &scanned);
        server.set_ready(true);
        tracing::info!(
            "{started} routine(s) running from {}; press Ctrl-C to stop",
            self.dir.display()
        );
        if obs_config.dashboard {
            tracing::info!("dashboard: http://{addr}/gorchestra");
        }
        tracing::info!("metrics: http://{addr}/metrics");
        wait_for_signal().await?;
        tracing::info!(
            "shutting down (bound {}; signal again to kill at once)",
            humantime::format_duration(self.shutdown_timeout)
        );
        tokio::spawn(async {
            if wait_for_signal().await.is_ok() {
                eprintln!("second signal: killing at once");
                std::process::exit(130);
            }
        });
        server.set_ready(false);
        let report = orch.shutdown(self.shutdown_timeout).await;
        server.shutdown().await;
        if !report.killed.is_empty() {
            tracing::warn!("killed after the grace period: {}", report.killed.join(", "));
        }
        if !report.unstoppable.is_empty() {
            bail!("could not stop within the bound: {}", report.unstoppable.join(", "));
        }
        tracing::info!("stopped {} routine(s)", report.stopped);
        Ok(())
    }
}

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
    let groups: std::collections::BTreeMap<&str, crate::Group> = scanned
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
                reused += usize::from(c.cache_status() == crate::CacheStatus::Hit);
                c
            }
            Err(e) => {
                tracing::error!("skipping plugin: {e}");
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

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok(())
    }
}

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

/// `gorch-host ps`.
#[derive(Debug, clap::Args)]
pub struct PsCmd {
    /// Address of the running host's observability server.
    #[arg(long, default_value = crate::obs::DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// Bearer token, if the host was started with `--token`.
    #[arg(long, env = "GORCH_TOKEN")]
    pub token: Option<String>,
}

impl PsCmd {
    /// Fetches the routines and prints the table.
    pub async fn run(self) -> anyhow::Result<()> {
        let body = http_get(self.addr, "/gorchestra/api/routines", self.token.as_deref())
            .await
            .with_context(|| format!("cannot reach a gorch-host at {}", self.addr))?;
        let snaps: Vec<crate::Snapshot> = serde_json::from_slice(&body)
            .context("unexpected answer from /gorchestra/api/routines")?;
        crate::write_stats_table(&mut std::io::stdout().lock(), &snaps)?;
        Ok(())
    }
}

/// A minimal HTTP/1.1 GET over a fresh connection (the host's own API only).
async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
        .await
        .context("read timed out")??;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").context("malformed HTTP response")?;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{path}: HTTP {status}: {}", String::from_utf8_lossy(&buf[split + 4..]).trim());
    }
    let body = buf[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return Ok(dechunk(&body));
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
    out
}
