//! `gorch-host run DIR`: start every plugin of a directory, serve observability, run until
//! a signal, shut down within the bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use super::EngineArgs;
use crate::obs::{DEFAULT_ADDR, ObsConfig, ObsServer};
use crate::orchestrator::Orchestrator;
use crate::plugin::{PluginDir, start_plugins};
use crate::wasm::WasmEngine;

/// `gorch-host run DIR`.
#[derive(Debug, clap::Args)]
pub struct RunCmd {
    /// Directory with `NAME.wasm` components and optional `NAME.toml` manifests.
    pub dir: PathBuf,
    /// Bound on the graceful shutdown after the first signal (a second signal kills at once).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Address of the observability server (metrics, dashboard, JSON API).
    #[arg(long, default_value = DEFAULT_ADDR)]
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
