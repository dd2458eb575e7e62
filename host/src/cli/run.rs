//! `gorch-host run DIR`: start every plugin of a directory, serve observability, run until
//! a signal, shut down within the bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::local_nats::{LocalNats, default_data_dir};
use super::watch::{Requests, reload_loop, watch_dir};
use super::{EngineArgs, LogFormat};
use crate::cluster::{Cluster, ClusterConfig, DEFAULT_LEAVE_BOUND};
use crate::obs::{DEFAULT_ADDR, ObsConfig, ObsServer};
use crate::orchestrator::{DEFAULT_MESSAGE_BYTES, Orchestrator};
use crate::plugin::{ByteSize, ClusterSection};
use crate::plugin::{LoadState, PluginBoard, PluginDir, Reloader, StartReport, start_plugins};
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
    #[arg(long, default_value = DEFAULT_ADDR, value_parser = parse_addr)]
    pub addr: SocketAddr,
    /// Do not serve the dashboard at /gorchestra.
    #[arg(long)]
    pub no_dashboard: bool,
    /// Serve a CPU profile at /debug/pprof/profile?seconds=N (off by default).
    #[arg(long)]
    pub pprof: bool,
    /// Require `Authorization: Bearer TOKEN` on every route but /healthz.
    #[arg(long, env = "GORCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A host name the server answers to besides loopback names and its address (repeat
    /// for several; requests naming any other host get 421, against DNS rebinding).
    #[arg(long, value_name = "NAME")]
    pub allowed_host: Vec<String>,
    /// How long a client may take to send a whole request, headers and body: a slower body
    /// is cut off (the server also keeps at most half the descriptor limit of connections,
    /// closing the oldest for a new one).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,
    /// The largest message body the write routes accept, whatever the manifests'
    /// `limits.message-bytes` (the largest of which applies when smaller).
    #[arg(long, default_value = "16MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_body: ByteSize,
    /// Watch DIR and apply each change live (new, changed and removed plugins; see
    /// `gorch-host reload`). SIGHUP applies the directory on request, with or without it.
    #[arg(long)]
    pub watch: bool,
    /// Up to this many live routines /metrics has per-routine series; beyond, per-plugin
    /// series only (bounded label cardinality; gorch_metrics_routine_series says which).
    #[arg(long, default_value_t = crate::obs::DEFAULT_ROUTINE_LIMIT, value_name = "N")]
    pub metrics_routine_limit: usize,
    /// Exit non-zero at start if any plugin of the directory fails to load (or it has none):
    /// for deploy pipelines. Without it a bad plugin is reported (log, /readyz) and skipped.
    #[arg(long)]
    pub strict: bool,
    /// Log line format: `text`, or `json` (one object per line; guest lines carry `routine`
    /// and `plugin` fields).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// Engine flags (compile cache).
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Cluster flags.
    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// Joining a cluster (see the README, "Running several hosts").
#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Join a cluster through this NATS server (JetStream on; `nats://` or `tls://`, several
    /// comma-separated): topics span the nodes, sends reach routines on other nodes. Also
    /// `[cluster] nats` in gorch.toml; the flag wins. `local` starts a nats-server of this
    /// host's own (loopback only, its store under --data-dir): topics survive a restart.
    #[arg(long, env = "GORCH_NATS", value_name = "URL")]
    pub nats: Option<String>,
    /// This node's name, unique in the cluster [default: [cluster] node, else the host name].
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// A NATS credentials file (also `[cluster] creds`).
    #[arg(long, value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// With `--nats local`: where nats-server keeps its store [default:
    /// $XDG_DATA_HOME/gorch-host, else ~/.local/share/gorch-host].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bound on reaching NATS at start (then exit non-zero).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub nats_timeout: Duration,
}

impl ClusterArgs {
    /// The NATS URL from these flags and `[cluster]` of gorch.toml (the flag wins), if any
    /// (`local` for `--nats local`).
    pub fn url(&self, file: Option<&ClusterSection>) -> Option<String> {
        self.nats.clone().or_else(|| file.and_then(|f| f.nats.clone()))
    }

    /// The cluster to join, from these flags and `[cluster]` of gorch.toml (flags win);
    /// `None` without a NATS URL. `local` stands for the URL of `--nats local`'s server.
    pub fn config(
        &self,
        file: Option<&ClusterSection>,
        addr: SocketAddr,
        local: Option<String>,
    ) -> Option<ClusterConfig> {
        let url = local.or_else(|| self.url(file))?;
        let node = self
            .node
            .clone()
            .or_else(|| file.and_then(|f| f.node.clone()))
            .unwrap_or_else(host_name);
        let mut c = ClusterConfig::new(url, node);
        c.creds = self.nats_creds.clone().or_else(|| file.and_then(|f| f.creds.clone()));
        c.connect_timeout = self.nats_timeout;
        if let Some(w) = file.and_then(|f| f.ack_wait) {
            c.ack_wait = w;
        }
        if let Some(f) = file {
            c.local_topics = f.local_topics.clone();
            c.replicas = f.replicas.unwrap_or(c.replicas);
        }
        c.http_addr = Some(addr.to_string());
        Some(c)
    }
}

/// This machine's host name (the default node name).
fn host_name() -> String {
    #[cfg(unix)]
    {
        let uname = rustix::system::uname();
        let name = uname.nodename().to_string_lossy().into_owned();
        if !name.is_empty() {
            return name;
        }
    }
    "node".to_string()
}

impl RunCmd {
    /// Starts the plugins and runs until a signal. The signal handlers come first, so that a
    /// signal during start-up stops what has started (within the shutdown bound) and exits 0.
    pub async fn run(self) -> anyhow::Result<()> {
        let stop = CancellationToken::new();
        let (requests, changed) = Requests::new();
        let signals = Signals::install().context("cannot install signal handlers")?;
        let watcher = tokio::spawn(signals.watch(stop.clone(), requests.clone()));
        let result = self.serve(&stop, requests, changed).await;
        watcher.abort();
        result
    }

    async fn serve(
        &self,
        stop: &CancellationToken,
        requests: Requests,
        changed: mpsc::Receiver<()>,
    ) -> anyhow::Result<()> {
        let orch = Orchestrator::new();
        let server = self.start_server(&orch)?;
        if let Some(url) = &self.cluster.nats {
            // From the first request: a message taken before the join would stay on the
            // in-memory bus.
            server.state().hold_ingress(Some(format!("joining the cluster at {url}")));
        }
        let scanned = PluginDir::scan(&self.dir)
            .with_context(|| format!("cannot read plugin directory {}", self.dir.display()))?;
        let engine = self.engine_for(&scanned)?;
        let board = server.state().plugins().clone();
        // Ingress takes messages as large as the largest any plugin may send, up to
        // --max-body whatever a manifest says.
        let limit = scanned.plugins.iter().map(|p| p.manifest.limits.message_bytes.0).max();
        let body_limit = limit.unwrap_or(DEFAULT_MESSAGE_BYTES).min(self.max_body.0);
        server.state().set_message_limit(body_limit);
        // Live upgrade (SIGHUP, `reload`, the route, `--watch`): the reloader takes the files
        // as scanned, and the watcher runs from now on, so no change made during start-up is
        // missed (requests queue until start-up is done).
        // `--nats local`: this host's own nats-server, started before the join.
        let local_nats = match self.cluster.url(scanned.cluster.as_ref()).as_deref() {
            Some("local") => {
                let data = match &self.cluster.data_dir {
                    Some(d) => d.clone(),
                    None => default_data_dir()?,
                };
                Some(LocalNats::start(&data).await?)
            }
            _ => None,
        };
        let url = local_nats.as_ref().map(|n| n.url().to_string());
        let cluster = match self.cluster.config(scanned.cluster.as_ref(), server.local_addr(), url)
        {
            None => None,
            Some(mut config) => {
                config.message_bytes = limit;
                config.token = local_nats.as_ref().map(|n| n.token().to_string());
                // A message taken before the join would stay on the in-memory bus.
                let why = format!("joining the cluster at {}", config.url);
                server.state().hold_ingress(Some(why));
                let joined = tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    joined = join(&orch, config, local_nats.is_some()) => joined?,
                };
                server.state().hold_ingress(None);
                Some(joined)
            }
        };
        let reloader = Reloader::new(&orch, &engine, &self.dir, &scanned, &board);
        let _watch = if self.watch { Some(watch_dir(&self.dir, requests.clone())?) } else { None };
        let started = start_plugins(&orch, &engine, &self.dir, &scanned, &board, stop).await;
        reloader.adopt(&started).await;
        server.state().set_reloader(reloader.clone());
        if started.interrupted {
            tracing::info!("signal during start-up: stopping what has started");
        } else if self.strict && (started.failed > 0 || scanned.plugins.is_empty()) {
            stop.cancel();
            tracing::error!("--strict: stopping because the plugin directory did not load whole");
        } else {
            server.set_ready(true);
            self.announce(&started, server.local_addr());
        }
        let reloads = tokio::spawn(reload_loop(reloader, requests, changed, stop.clone()));
        // Until a signal, or until another process of this node's name takes the lease.
        let lost = async {
            match &cluster {
                Some(c) => c.lease_lost().await,
                None => std::future::pending().await,
            }
        };
        let lost = tokio::select! {
            _ = stop.cancelled() => None,
            reason = lost => Some(reason),
        };
        reloads.abort();
        tracing::info!(
            "shutting down (bound {}; signal again to kill at once)",
            humantime::format_duration(self.shutdown_timeout)
        );
        server.set_ready(false);
        // The bound covers leaving the cluster too: a part of it is kept for that.
        let leaving = match &cluster {
            Some(_) => (self.shutdown_timeout / 4).min(DEFAULT_LEAVE_BOUND),
            None => Duration::ZERO,
        };
        let report = orch.shutdown(self.shutdown_timeout - leaving).await;
        if let Some(c) = &cluster {
            c.leave_within(leaving).await;
        }
        if let Some(n) = local_nats {
            n.stop().await;
        }
        server.shutdown().await;
        if !report.killed.is_empty() {
            tracing::warn!("killed after the grace period: {}", report.killed.join(", "));
        }
        if !report.unstoppable.is_empty() {
            bail!("could not stop within the bound: {}", report.unstoppable.join(", "));
        }
        if let Some(reason) = lost {
            bail!("{reason}");
        }
        tracing::info!("stopped {} routine(s)", report.stopped);
        if self.strict && !started.interrupted {
            strict_verdict(&board, scanned.plugins.is_empty(), &self.dir)?;
        }
        Ok(())
    }

    /// Binds the observability server (warning when it is reachable without a token).
    fn start_server(&self, orch: &Orchestrator) -> anyhow::Result<ObsServer> {
        let config = ObsConfig {
            addr: self.addr,
            dashboard: !self.no_dashboard,
            pprof: self.pprof,
            token: self.token.clone(),
            metrics_routine_limit: self.metrics_routine_limit,
            allowed_hosts: self.allowed_host.clone(),
            request_timeout: self.request_timeout,
        };
        let server = ObsServer::start(orch, &config)
            .with_context(|| format!("cannot listen on {}", self.addr))?;
        let addr = server.local_addr();
        if !addr.ip().is_loopback() && self.token.is_none() {
            tracing::warn!(
                "listening on {addr} without --token: anyone who can reach this address can \
                 read the metrics and the routines, and steering routes are refused to other \
                 machines (set --token or GORCH_TOKEN)"
            );
        }
        Ok(server)
    }

    /// The engine, with room for the directory's instances (refused past the host's limit);
    /// logs each manifest's warnings against it.
    fn engine_for(&self, scanned: &PluginDir) -> anyhow::Result<WasmEngine> {
        let instances = scanned.check_instances(&self.dir)?;
        warn_capacity(instances);
        let config = self.engine.config(instances);
        for spec in &scanned.plugins {
            for w in spec.manifest.warnings(&config) {
                tracing::warn!("{}: {w}", spec.wasm.display());
            }
        }
        Ok(WasmEngine::new(config)?)
    }

    fn announce(&self, started: &StartReport, addr: SocketAddr) {
        let failed = if started.failed > 0 {
            format!(" ({} failed: see /readyz)", started.failed)
        } else {
            String::new()
        };
        tracing::info!(
            "{} routine(s) of {} plugin(s) running from {}{failed}; press Ctrl-C to stop",
            started.routines,
            started.started,
            self.dir.display(),
        );
        if !self.no_dashboard {
            tracing::info!("dashboard: http://{addr}/gorchestra");
        }
        tracing::info!("metrics: http://{addr}/metrics");
    }
}

/// Joins the cluster. With `--nats local` the data directory's lock proves that no other
/// host runs with this store, so a live lease of this node's name is the previous run's (a
/// host killed moments ago): the join waits for it to lapse instead of failing.
async fn join(orch: &Orchestrator, config: ClusterConfig, local: bool) -> anyhow::Result<Cluster> {
    use crate::cluster::ClusterError;
    let mut tries = 0;
    loop {
        match Cluster::join(orch, config.clone()).await {
            Err(ClusterError::NodeTaken { seconds, lease, .. }) if local && tries < 2 => {
                tries += 1;
                let wait = Duration::from_secs_f64((lease as f64 - seconds).max(0.0) + 0.5);
                tracing::info!(
                    "the lease of node {:?} from the previous run is still live: joining in \
                     {:.1}s",
                    config.node,
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
            }
            r => return Ok(r?),
        }
    }
}

/// `--strict`: an error naming every plugin that failed (or the empty directory).
fn strict_verdict(board: &PluginBoard, empty: bool, dir: &Path) -> anyhow::Result<()> {
    let failed = board.in_state(LoadState::Failed);
    if empty && failed.is_empty() {
        bail!("--strict: no *.wasm components in {}", dir.display());
    }
    if !failed.is_empty() {
        let lines: Vec<String> = failed
            .iter()
            .map(|p| format!("  {}: {}", p.file, p.error.as_deref().unwrap_or("failed")))
            .collect();
        bail!("--strict: {} plugin(s) failed to load:\n{}", failed.len(), lines.join("\n"));
    }
    Ok(())
}

/// SIGINT and SIGTERM, registered before anything else starts: the first one stops the host
/// gracefully (also during start-up), the second exits at once.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
                hup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next SIGINT or SIGTERM; each SIGHUP meanwhile asks for a reload.
    async fn next(&mut self, reload: &Requests) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                _ = self.int.recv() => return,
                _ = self.term.recv() => return,
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: applying the plugin directory");
                    reload.now();
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = reload;
            let _ = tokio::signal::ctrl_c().await;
        }
    }

    async fn watch(mut self, stop: CancellationToken, reload: Requests) {
        self.next(&reload).await;
        stop.cancel();
        self.next(&reload).await;
        eprintln!("second signal: killing at once");
        std::process::exit(130);
    }
}

/// A size such as `16MiB` (B, KiB, MiB, GiB, KB, MB, GB).
fn parse_size(s: &str) -> Result<ByteSize, String> {
    ByteSize::parse(s).map_err(|e| e.to_string())
}

/// `HOST:PORT` with a name (`localhost:9090`) or an address (`127.0.0.1:9090`, `[::1]:9090`).
fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let mut addrs = s.to_socket_addrs().map_err(|e| format!("{s}: {e} (expected HOST:PORT)"))?;
    addrs.next().ok_or_else(|| format!("{s}: the name has no address"))
}

/// Warns when the machine is set up for fewer workers than the directory asks for: each
/// live wasm worker takes about 4 kernel memory mappings (Linux's `vm.max_map_count`) and
/// about 80 KB of memory when idle.
fn warn_capacity(instances: usize) {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let maps = read("/proc/sys/vm/max_map_count").and_then(|s| s.trim().parse::<usize>().ok());
    let need = instances.saturating_mul(4).saturating_add(10_000);
    if let Some(max) = maps
        && need > max
    {
        tracing::warn!(
            "{instances} instances need about {need} memory mappings but vm.max_map_count is \
             {max}: raise it (sysctl -w vm.max_map_count={}) or spawns will fail",
            need.next_power_of_two()
        );
    }
    let available = read("/proc/meminfo").and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?.to_string();
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    let want_kb = (instances as u64).saturating_mul(80);
    if let Some(kb) = available
        && want_kb > kb
    {
        tracing::warn!(
            "{instances} idle instances take about {} MiB, more than the {} MiB available",
            want_kb >> 10,
            kb >> 10
        );
    }
}
