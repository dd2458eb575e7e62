//! The routes of the observability server: `/metrics`, the dashboard, the JSON API,
//! `/healthz` and `/readyz`, the CPU profile, and the bearer token check in front of all but
//! `/healthz`. What they share is [`ObsState`] (`state`).

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use super::ObsConfig;
use super::profile::ProfileError;
use super::state::ObsState;
use crate::cluster::Cluster;
use crate::plugin::LoadState;
use crate::plugin::about_file;

/// Largest request body of the read routes (the write routes of `control` take messages
/// up to the message limit instead).
pub const BODY_LIMIT: usize = 16 * 1024;
/// Longest CPU profile that can be asked for.
pub const MAX_PROFILE_SECONDS: u64 = 60;

const DASHBOARD: &str = include_str!("dashboard.html");

/// The router: every route of the HTTP contract (README, "Observability") that `config`
/// turns on.
pub fn router(state: ObsState, config: &ObsConfig) -> Router {
    let mut r = Router::new()
        .route("/metrics", get(metrics))
        .route("/gorchestra/api/routines", get(routines))
        .route("/gorchestra/api/routines/{name}", get(routine))
        .route("/gorchestra/api/topics", get(topics))
        .route("/gorchestra/api/history", get(history))
        .route("/gorchestra/api/process", get(process))
        .route("/gorchestra/api/plugins", get(plugins))
        .route("/gorchestra/api/cluster", get(cluster))
        .route("/readyz", get(readyz));
    if config.dashboard {
        r = r.route("/gorchestra", get(dashboard));
    }
    if config.pprof {
        r = r.route("/debug/pprof/profile", get(profile));
    }
    // Steering is refused on a non-loopback address without a token (see `control`).
    let writes = super::control::Writes {
        token: state.token.is_some(),
        bound_loopback: config.addr.ip().is_loopback(),
    };
    r = r.merge(super::control::routes(state.clone(), writes));
    // Routes added after the auth layer are not behind it.
    let token = state.token.is_some();
    let guard = super::guard::Guard::new(config.addr, &config.allowed_hosts, token);
    r.layer(middleware::from_fn_with_state(state.clone(), auth))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
        // Outermost: every route, before the token (a page must not learn which it needs).
        .layer(middleware::from_fn_with_state(guard, super::guard::check))
}

async fn auth(AxState(s): AxState<ObsState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.token {
        let header_token = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            // The scheme is case-insensitive (RFC 9110).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
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

/// Compares the SHA-256 digests of `a` and `b` in constant time: neither the length nor
/// the first differing byte of the token shows in the time taken.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    // Thousands of routines take milliseconds to render: off the workers that run guests.
    let limit = s.routine_limit.load(Relaxed);
    let live = s.orch.routine_count();
    let over = live > limit;
    if s.over_limit.swap(over, Relaxed) != over {
        if over {
            tracing::warn!(
                "{live} routines are more than --metrics-routine-limit {limit}: /metrics has \
                 per-plugin series only (gorch_metrics_routine_series 0)"
            );
        } else {
            tracing::info!("at most {limit} routines again: /metrics has per-routine series");
        }
    }
    let body = tokio::task::spawn_blocking(move || {
        super::metrics::render_with(&s.orch, &s.registry, limit)
    })
    .await
    .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

/// `?state=` (a state's name, in any case) and `?limit=` (the first N, by id).
#[derive(serde::Deserialize)]
struct RoutinesQuery {
    state: Option<String>,
    limit: Option<String>,
}

/// Snapshots of the live routines, by id: those in `?state=` if given, at most `?limit=`
/// (only those are read: a large host answers a narrow question cheaply). 400 names what
/// is wrong with a parameter.
async fn routines(
    AxState(s): AxState<ObsState>,
    Query(q): Query<RoutinesQuery>,
) -> Result<Response, Response> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, axum::Json(serde_json::json!({"error": m})));
    let state = match q.state.as_deref() {
        None => None,
        Some(v) => {
            let all = crate::State::ALL;
            let found = all.iter().find(|st| st.as_str().eq_ignore_ascii_case(v.trim()));
            let names: Vec<&str> = all.iter().map(|st| st.as_str()).collect();
            let why = || format!("unknown state {v:?}: one of {}", names.join(", "));
            Some(*found.ok_or_else(|| bad(why()).into_response())?)
        }
    };
    let limit = match q.limit.as_deref() {
        None => usize::MAX,
        Some(v) => v.trim().parse::<usize>().map_err(|_| {
            bad(format!("limit {v:?} is not a whole number of routines")).into_response()
        })?,
    };
    let list: Vec<crate::Snapshot> = s
        .orch
        .list()
        .iter()
        .filter(|h| state.is_none_or(|st| h.state() == st))
        .take(limit)
        .map(|h| h.snapshot())
        .collect();
    Ok(axum::Json(list).into_response())
}

/// One routine's snapshot; 404 (suggesting the closest name) if none has that name.
async fn routine(AxState(s): AxState<ObsState>, Path(name): Path<String>) -> Response {
    match s.orch.get_by_name(&name) {
        Some(h) => axum::Json(h.snapshot()).into_response(),
        None => super::control::no_routine(&s, &name).into_response(),
    }
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

/// The board, with each running plugin's `routines` counted live (a routine stopped on
/// request or ended by its policy is no longer counted).
async fn plugins(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    let routines = s.orch.shared_list();
    let mut live: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for r in &routines {
        *live.entry(r.plugin()).or_default() += 1;
    }
    let mut list = s.plugins.list();
    for p in &mut list {
        if p.status == LoadState::Running {
            p.routines = live.get(p.plugin.as_str()).copied().unwrap_or(0);
        }
    }
    axum::Json(list)
}

/// 200 `ready` once start-up is done and no plugin of the directory failed; otherwise 503
/// with the plugins still starting and the failed ones with their reasons (a deploy
/// pipeline or a load balancer sees a broken host as not ready).
async fn readyz(AxState(s): AxState<ObsState>) -> impl IntoResponse {
    let starting = s.plugins.in_state(LoadState::Starting);
    let failed = s.plugins.in_state(LoadState::Failed);
    let up = s.ready.load(Relaxed);
    let problem = s.orch.transport().problem().or_else(|| dead_letters_full(&s));
    if up && failed.is_empty() && problem.is_none() {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let mut body = String::new();
    if !up {
        body.push_str("starting\n");
    }
    if let Some(p) = problem {
        body.push_str(&p);
        body.push('\n');
    }
    for p in &starting {
        body.push_str(&format!("starting: {}\n", p.file));
    }
    for p in &failed {
        let why = p.error.as_deref().unwrap_or("failed").replace('\n', " ");
        body.push_str(&format!("failed: {}\n", about_file(&p.file, &why)));
    }
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

/// A full in-memory `dead-letter` topic: the next dead letter would be dropped (counted in
/// `gorch_dead_letters_dropped_total`), so readiness says so until it is drained.
fn dead_letters_full(s: &ObsState) -> Option<String> {
    let topic = crate::delivery::DEAD_LETTER_TOPIC;
    let t = s.orch.transport().topics().into_iter().find(|t| t.name == topic)?;
    (t.cluster.is_none() && t.cap > 0 && t.len >= t.cap).then(|| {
        format!(
            "the {topic} topic is full ({} of {}): further dead letters are dropped; drain it",
            t.len, t.cap
        )
    })
}

#[derive(serde::Deserialize)]
struct ClusterQuery {
    #[serde(default)]
    routines: bool,
}

/// `GET /gorchestra/api/cluster`: the live nodes; with `?routines=true` each node's routine
/// snapshots too (fetched from each node through NATS). 404 without a cluster.
async fn cluster(AxState(s): AxState<ObsState>, Query(q): Query<ClusterQuery>) -> Response {
    let Some(c) = Cluster::of(&s.orch) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({
                "error": "this host is not in a cluster (start it with --nats URL)"
            })),
        )
            .into_response();
    };
    if q.routines {
        axum::Json(c.view_with_routines().await).into_response()
    } else {
        axum::Json(c.view()).into_response()
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
        Err(ProfileError::Busy) => (
            StatusCode::CONFLICT,
            "a CPU profile is already being taken; try again when it finishes\n",
        )
            .into_response(),
        Err(ProfileError::Failed(e)) => {
            (StatusCode::INTERNAL_SERVER_ERROR, format!("profile failed: {e}\n")).into_response()
        }
    }
}
