//! Observability: what an operator sees of a running host. Safe by default: bound to
//! 127.0.0.1, profiling off, an optional bearer token, a header-read timeout and a body
//! limit.
//!
//! - this module: [`ObsConfig`] and [`ObsServer`] (bind, accept, graceful close);
//! - `state`: [`ObsState`], what the routes share;
//! - `routes`: the axum [`router`] (`/metrics`, the dashboard, the JSON API, health,
//!   readiness, the profile) and the token check;
//! - `control`: the write routes (publish, send, restart, stop, reload);
//! - `metrics`: the `gorch_*` series, as Prometheus text ([`write_text`]) or a `Collector`
//!   ([`GorchCollector`], [`registry`]);
//! - `process`: the process's own figures (CPU, RSS, threads; `process_*` metrics);
//! - `profile`: CPU profiles in pprof's format;
//! - `dashboard.html`: the live dashboard, one self-contained page.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::orchestrator::Orchestrator;

mod control;
mod guard;
mod metrics;
mod process;
mod profile;
mod routes;
mod state;
mod timed;

pub use control::{INGRESS_QUEUE_BYTES, INGRESS_TOPIC_SHARE, INGRESS_TOTAL_BYTES, INGRESS_WAIT};
pub use metrics::{
    DEFAULT_ROUTINE_LIMIT, GorchCollector, register, registry, render, render_with, write_text,
    write_text_with,
};
pub use routes::{BODY_LIMIT, MAX_PROFILE_SECONDS, router};
pub use state::INGRESS_READING_BYTES;
pub use state::ObsState;

/// Default address of the observability server.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9090";
/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default [`ObsConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The most connections the server keeps open, whatever the descriptor limit allows.
pub const MAX_CONNECTIONS: usize = 1024;

/// Settings of the observability server. `Default` is the safe default: 127.0.0.1:9090,
/// dashboard on, profiling off, no token.
#[derive(Debug, Clone)]
pub struct ObsConfig {
    /// Where to listen.
    pub addr: SocketAddr,
    /// Serve the dashboard at `/gorchestra`.
    pub dashboard: bool,
    /// Serve `/debug/pprof/profile`.
    pub pprof: bool,
    /// Require `Authorization: Bearer <token>` on every route but `/healthz`.
    pub token: Option<String>,
    /// Up to this many live routines `/metrics` has per-routine series; beyond, per-plugin
    /// series only (default [`metrics::DEFAULT_ROUTINE_LIMIT`]).
    pub metrics_routine_limit: usize,
    /// Host names the server answers to besides loopback ones and its address
    /// (`--allowed-host`; see the README, "Observability": what a web page may do).
    pub allowed_hosts: Vec<String>,
    /// How long a client may take to send a whole request, headers and body (a request
    /// body trickled slower is cut off). Default [`DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Duration,
}

impl Default for ObsConfig {
    fn default() -> Self {
        ObsConfig {
            addr: DEFAULT_ADDR.parse().expect("valid default address"),
            dashboard: true,
            pprof: false,
            token: None,
            metrics_routine_limit: metrics::DEFAULT_ROUTINE_LIMIT,
            allowed_hosts: Vec::new(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// A running observability server.
pub struct ObsServer {
    addr: SocketAddr,
    state: ObsState,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl std::fmt::Debug for ObsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObsServer").field("addr", &self.addr).finish()
    }
}

impl ObsServer {
    /// Binds `config.addr` (synchronously: a bind error is returned, never swallowed) and
    /// serves the routes on the current tokio runtime.
    pub fn start(orch: &Orchestrator, config: &ObsConfig) -> std::io::Result<ObsServer> {
        let std_listener = std::net::TcpListener::bind(config.addr)?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let state = ObsState::new(orch, config.token.clone());
        state.set_metrics_routine_limit(config.metrics_routine_limit);
        let app = router(state.clone(), config);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limits = ConnLimits { max: connection_cap(), request_timeout: config.request_timeout };
        tracker.spawn(accept_loop(listener, app, limits, cancel.clone(), tracker.clone()));
        Ok(ObsServer { addr, state, cancel, tracker })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Marks start-up done for `/readyz` (see [`ObsState::set_ready`]).
    pub fn set_ready(&self, ready: bool) {
        self.state.set_ready(ready);
    }

    /// What the routes share (the message limit, the plugin board, ...).
    pub fn state(&self) -> &ObsState {
        &self.state
    }

    /// Stops accepting, closes the connections and waits for their tasks.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Bounds on the server's connections.
#[derive(Clone, Copy)]
struct ConnLimits {
    /// Open connections at most: past it, the oldest is closed for the new one.
    max: usize,
    request_timeout: Duration,
}

/// Half the process's descriptor limit (the other half stays for plugin files, the compile
/// cache, NATS and the reloads), between 16 and [`MAX_CONNECTIONS`].
fn connection_cap() -> usize {
    #[cfg(unix)]
    {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        let half = limit.map_or(MAX_CONNECTIONS, |n| usize::try_from(n / 2).unwrap_or(usize::MAX));
        half.clamp(16, MAX_CONNECTIONS)
    }
    #[cfg(not(unix))]
    MAX_CONNECTIONS
}

/// The open connections, oldest first: at the cap, the oldest is closed so that a new
/// client (a health check) is served even while slow clients hold every slot.
#[derive(Default)]
struct Open {
    next: u64,
    conns: std::collections::VecDeque<(u64, CancellationToken)>,
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnLimits,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let open = std::sync::Arc::new(parking_lot::Mutex::new(Open::default()));
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (id, mine) = {
            let mut o = open.lock();
            if o.conns.len() >= limits.max
                && let Some((_, oldest)) = o.conns.pop_front()
            {
                oldest.cancel();
            }
            o.next += 1;
            let (id, evict) = (o.next, CancellationToken::new());
            o.conns.push_back((id, evict.clone()));
            (id, evict)
        };
        let (app, open, cancel) = (app.clone(), open.clone(), cancel.clone());
        tracker.spawn(async move {
            serve(stream, app, limits.request_timeout, &cancel, &mine).await;
            open.lock().conns.retain(|(i, _)| *i != id);
        });
    }
}

/// Serves one connection until it ends, until `cancel` (the server closing: a graceful
/// end, in-flight requests get a second), or until `evict` (the cap reached: closed at once,
/// so that its descriptor is free for the new connection).
async fn serve(
    stream: tokio::net::TcpStream,
    app: Router,
    request_timeout: Duration,
    cancel: &CancellationToken,
    evict: &CancellationToken,
) {
    use tower::ServiceExt;
    // The peer, for the rule on writes (see `control`); unknown only if the socket is gone.
    let peer = stream.peer_addr().ok().map(axum::extract::ConnectInfo);
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(|body| timed::TimedBody::new(body, request_timeout));
        if let Some(p) = peer {
            req.extensions_mut().insert(p);
        }
        app.clone().oneshot(req)
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = b.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = evict.cancelled() => {}
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}
