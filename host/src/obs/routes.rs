//! The routes of the observability server and what they share ([`ObsState`]): `/metrics`,
//! the dashboard, the JSON API, `/healthz` and `/readyz`, the CPU profile, and the bearer
//! token check in front of all but `/healthz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Query, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use prometheus::Registry;

use super::ObsConfig;
use crate::orchestrator::Orchestrator;

/// Largest request body accepted (every route is a GET).
pub const BODY_LIMIT: usize = 16 * 1024;
/// Longest CPU profile that can be asked for.
pub const MAX_PROFILE_SECONDS: u64 = 60;

const DASHBOARD: &str = include_str!("dashboard.html");

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
            registry: Arc::new(super::process::registry()),
            ready: Arc::new(AtomicBool::new(false)),
            token: token.map(Arc::from),
        }
    }

    /// Marks the host ready (`/readyz` answers 200 from now on).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Relaxed);
    }
}

/// The router: every route of the HTTP contract (README, "Observability") that `config`
/// turns on.
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
        tokio::task::spawn_blocking(move || super::metrics::render_with(&s.orch, &s.registry))
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

async fn process() -> impl IntoResponse {
    axum::Json(super::process::read())
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
    match super::profile::cpu_profile(Duration::from_secs(seconds)).await {
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
