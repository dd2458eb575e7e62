//! The observability server (axum): `/metrics`, the dashboard, the JSON API, health and
//! readiness, and the CPU profile. Safe by default: bound to 127.0.0.1, profiling off, an
//! optional bearer token, a header-read timeout and a body limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Query, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::orchestrator::Orchestrator;

/// Default address of the observability server.
pub const DEFAULT_ADDR: &str = "127.0.0.1:9090";
/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body accepted (every route is a GET).
pub const BODY_LIMIT: usize = 16 * 1024;
/// Longest CPU profile that can be asked for.
pub const MAX_PROFILE_SECONDS: u64 = 60;

const DASHBOARD: &str = include_str!("dashboard.html");

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
}

impl Default for ObsConfig {
    fn default() -> Self {
        ObsConfig {
            addr: DEFAULT_ADDR.parse().expect("valid default address"),
            dashboard: true,
            pprof: false,
            token: None,
        }
    }
}

/// What the routes share.
#[derive(Clone)]
pub struct ObsState {
    orch: Orchestrator,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
    token: Option<Arc<str>>,
}

impl ObsState {
    /// State for `orch`; `/metrics` serves its `gorch_*` metrics and the `process_*` ones.
    pub fn new(orch: &Orchestrator, token: Option<String>) -> Self {
        ObsState {
            orch: orch.clone(),
            registry: Arc::new(crate::metrics::process_registry()),
            ready: Arc::new(AtomicBool::new(false)),
            token: token.map(Arc::from),
        }
    }

    /// Marks the host ready (`/readyz` answers 200 from now on).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Relaxed);
    }
}

/// The router: every route of DESIGN.md that `config` turns on.
pub fn router(state: ObsState, config: &ObsConfig) -> Router {
    let mut r = Router::new()
        .route("/metrics", get(metrics))
        .route("/gorchestra/api/routines", get(routines))
        .route("/gorchestra/api/topics", get(topics))
        .route("/gorchestra/api/history", get(history))
        .route("/gorchestra/api/process", get(process))
        .route("/readyz", get(readyz));
    if config.dashboard {
        r = r.route("/gorchestra", get(dashboard));
    }
    if config.pprof {
        r = r.route("/debug/pprof/profile", get(profile));
    }
    // Routes added after the auth layer are not behind it.
    r.layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn auth(AxState(s): AxState<ObsState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let header_token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // A browser cannot send a header when it opens a page: the dashboard page itself
        // also accepts `?token=T` (its script then sends the header on every API call).
        let query_token = (req.uri().path() == "/gorchestra")
            .then(|| req.uri().query())
            .flatten()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")));
        let given = header_token.or(query_token);
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let mut resp =
                (StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n").into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    // Thousands of routines take milliseconds to render: off the workers that run guests.
    let body =
        tokio::task::spawn_blocking(move || crate::metrics::render_with(&s.orch, &s.registry))
            .await
            .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

async fn routines(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    axum::Json(s.orch.snapshots())
}

async fn topics(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    axum::Json(s.orch.topics())
}

async fn history(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    axum::Json(s.orch.history())
}

/// Process figures for the dashboard's live CPU%.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ProcessStats {
    cpu_seconds: f64,
    resident_bytes: u64,
    threads: u64,
}

async fn process() -> impl IntoResponse {
    axum::Json(read_process_stats())
}

/// Reads `/proc/self/stat` (utime, stime, threads) and `/proc/self/statm` (resident pages).
fn read_process_stats() -> ProcessStats {
    let mut p = ProcessStats { cpu_seconds: 0.0, resident_bytes: 0, threads: 0 };
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
        && let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r)
    {
        let f: Vec<&str> = rest.split_whitespace().collect();
        // Fields after the command: state is 0, utime 11, stime 12, num_threads 17.
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        p.cpu_seconds = (ticks(11) + ticks(12)) as f64 / 100.0;
        p.threads = ticks(17);
    }
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        p.resident_bytes = pages * 4096;
    }
    p
}

async fn readyz(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    if s.ready.load(Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn dashboard() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(DASHBOARD),
    )
}

#[derive(serde::Deserialize)]
struct ProfileQuery {
    seconds: Option<u64>,
}

async fn profile(Query(q): Query<ProfileQuery>) -> Response {
    let seconds = q.seconds.unwrap_or(10).clamp(1, MAX_PROFILE_SECONDS);
    match crate::profile::cpu_profile(Duration::from_secs(seconds)).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"profile.pb\""),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("profile failed: {e}\n")).into_response()
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
        let app = router(state.clone(), config);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(accept_loop(listener, app, cancel.clone(), tracker.clone()));
        Ok(ObsServer { addr, state, cancel, tracker })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Marks the host ready for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.state.set_ready(ready);
    }

    /// Stops accepting, closes the connections and waits for their tasks.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
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
        let svc = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = b.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = cancel.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        });
    }
}
