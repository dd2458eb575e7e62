//! The write routes: the outside world puts work in and steers routines.
//!
//! | route | does | answers |
//! |---|---|---|
//! | `POST /gorchestra/api/topics/{topic}` | publishes the body on `topic` | 202 `{"topic","queueLen"}`; 400 bad name; 413 too large; 503 + `Retry-After` when still full after a short wait |
//! | `POST /gorchestra/api/routines/{name}/mailbox` | sends the body to the routine's mailbox | 202 `{"routine","queueLen"}`; 404; 413; 503 |
//! | `POST /gorchestra/api/routines/{name}/restart` | restarts it now (a requested restart: no backoff, not counted against intensity) | 202; 404 |
//! | `POST /gorchestra/api/routines/{name}/stop` | stops it on request (no restart follows) | 202; 404 |
//! | `POST /gorchestra/api/reload` | applies the plugin directory's state (live upgrade) | 200 with the per-plugin report; 422 with the same report when a plugin failed; 404 without a plugin directory |
//!
//! Publish and send answer 503 with `Retry-After` while messages are held
//! ([`ObsState::hold_ingress`]: the CLI holds them while the host joins its cluster).
//! They sit behind the token like every route; on a non-loopback address without a token
//! they answer 403 (reading is one thing, steering another). A message may be as large as
//! the largest `limits.message-bytes` of the plugins ([`ObsState::set_message_limit`]);
//! the body limit follows it. Errors are JSON `{"error": "..."}` naming what was wrong.

use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State as AxState};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use super::state::{INGRESS_READING_BYTES, ObsState};
use crate::names::{validate_routine_name, validate_topic_name};
use crate::transport::CallError;

/// How long a publish or send waits for room before answering 503.
pub const INGRESS_WAIT: Duration = Duration::from_millis(500);

/// The most bytes ingress queues in one in-memory topic or mailbox: past it, 503 with
/// `Retry-After` (a topic nobody drains cannot take the host's memory).
pub const INGRESS_QUEUE_BYTES: u64 = 64 << 20;

/// The most bytes all in-memory topics may hold for ingress to publish more.
pub const INGRESS_TOTAL_BYTES: u64 = 256 << 20;

/// Ingress creates a new topic only while there are fewer than this many (half the bus's
/// cap: the other half stays for the routines), after removing empty unused ones.
pub const INGRESS_TOPIC_SHARE: usize = crate::bus::DEFAULT_MAX_TOPICS / 2;

/// Runs a publish or send given `INGRESS_WAIT`: then it is cancelled, and its own answer
/// says whether anything was delivered (`cancelled`: no; `outcome-unknown`: maybe).
async fn within_wait<'a>(
    call: impl FnOnce(
        &'a tokio_util::sync::CancellationToken,
    ) -> futures::future::BoxFuture<'a, Result<(), CallError>>,
    cancel: &'a tokio_util::sync::CancellationToken,
) -> Result<(), CallError> {
    let call = call(cancel);
    tokio::pin!(call);
    tokio::select! {
        biased;
        r = &mut call => r,
        _ = tokio::time::sleep(INGRESS_WAIT) => {
            cancel.cancel();
            call.await
        }
    }
}

/// Who may write: with a token, whoever has it; without one, peers on loopback only (the
/// peer is what counts, not the bound address: a server on 0.0.0.0 takes writes from this
/// machine, and refuses other machines). A request with no known peer (in-process) counts
/// as coming from the bound address.
#[derive(Debug, Clone, Copy)]
pub(super) struct Writes {
    pub token: bool,
    pub bound_loopback: bool,
}

/// The write routes, guarded by [`Writes`] (a refused write answers 403).
pub(super) fn routes(state: ObsState, writes: Writes) -> Router<ObsState> {
    Router::new()
        .route("/gorchestra/api/topics/{topic}", post(publish))
        .route("/gorchestra/api/routines/{name}/mailbox", post(send))
        .route("/gorchestra/api/routines/{name}/restart", post(restart))
        .route("/gorchestra/api/routines/{name}/stop", post(stop))
        .route("/gorchestra/api/reload", post(reload))
        // The limit is the plugins' largest message, known after start-up: checked below.
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(writes, guard))
        .with_state(state)
}

async fn guard(AxState(writes): AxState<Writes>, req: Request, next: Next) -> Response {
    use axum::extract::ConnectInfo;
    let peer = req.extensions().get::<ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    let local = peer.map_or(writes.bound_loopback, |ip| ip.to_canonical().is_loopback());
    if !writes.token && !local {
        let from = peer.map(|ip| format!(" from {ip}")).unwrap_or_default();
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "write routes are refused{from}: without --token this server takes writes \
                 from this machine (loopback) only (start it with --token to allow them)"
            ),
        )
        .into_response();
    }
    next.run(req).await
}

/// A refusal: the status and the reason, answered as JSON `{"error": ...}`.
pub(super) struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: bool,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(json!({ "error": self.message }))).into_response();
        if self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError { status, message: message.into(), retry_after: false }
}

/// The request body, with its bytes reserved until the permit is dropped (after the
/// message is queued); 413 over the message limit, 408 when it did not arrive in time, 503
/// when too many bytes of bodies are being read at once.
async fn body(
    s: &ObsState,
    req: Request,
) -> Result<(Vec<u8>, tokio::sync::OwnedSemaphorePermit), ApiError> {
    let limit = s.message_limit();
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the message is larger than the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let reserve = declared.unwrap_or(limit).min(INGRESS_READING_BYTES).div_ceil(1024).max(1);
    let permit = s.reading.clone().try_acquire_many_owned(reserve as u32).map_err(|_| {
        no_room(format!(
            "{INGRESS_READING_BYTES} bytes of request bodies are being read already; retry later"
        ))
    })?;
    let bytes = axum::body::to_bytes(req.into_body(), usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|e| body_error(e, too_large))?;
    // Without a copy when the buffer is this body's alone (it is, once read whole).
    Ok((Vec::from(bytes), permit))
}

/// Why a body could not be read: over the limit (413), too slow (408), or cut (400).
fn body_error(e: axum::Error, too_large: impl FnOnce() -> ApiError) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return too_large();
        }
        if c.is::<super::timed::TooSlow>() {
            return error(StatusCode::REQUEST_TIMEOUT, c.to_string());
        }
        cause = c.source();
    }
    error(StatusCode::BAD_REQUEST, format!("the request body could not be read: {e}"))
}

/// 503 with `Retry-After`: the message would take ingress's queues past a bound.
fn no_room(message: String) -> ApiError {
    ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message, retry_after: true }
}

/// The bounds of ingress on the in-memory topics (a cluster topic is bounded by its stream):
/// bytes queued in `topic` and in all, and new topics only within their share.
fn room_in_topics(s: &ObsState, topic: &str, size: usize) -> Result<(), ApiError> {
    let transport = s.orch().transport();
    let mut topics = transport.topics();
    let size = size as u64;
    if !topics.iter().any(|t| t.name == topic) && topics.len() >= INGRESS_TOPIC_SHARE {
        // Room first: topics left empty and unused are created again on first use.
        if s.orch().bus().remove_unused() > 0 {
            topics = transport.topics();
        }
        if topics.len() >= INGRESS_TOPIC_SHARE {
            return Err(no_room(format!(
                "there are {} topics: ingress creates new ones only while there are fewer \
                 than {INGRESS_TOPIC_SHARE}; publish to an existing topic",
                topics.len()
            )));
        }
    }
    let local = topics.iter().filter(|t| t.cluster.is_none());
    let (mut here, mut total) = (0u64, 0u64);
    for t in local {
        total += t.bytes as u64;
        if t.name == topic {
            here = t.bytes as u64;
        }
    }
    if here + size > INGRESS_QUEUE_BYTES {
        return Err(no_room(format!(
            "topic {topic:?} holds {here} bytes: ingress queues at most {INGRESS_QUEUE_BYTES} \
             bytes in one topic; retry when it drains"
        )));
    }
    if total + size > INGRESS_TOTAL_BYTES {
        return Err(no_room(format!(
            "the topics hold {total} bytes: ingress queues at most {INGRESS_TOTAL_BYTES} bytes \
             in all; retry when they drain"
        )));
    }
    Ok(())
}

/// 503 with `Retry-After` while messages are held (see [`ObsState::hold_ingress`]).
fn held(s: &ObsState) -> Result<(), ApiError> {
    match s.ingress_held() {
        None => Ok(()),
        Some(why) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("{why}: messages are not taken yet; retry when /readyz answers"),
            retry_after: true,
        }),
    }
}

/// 503 with `Retry-After`: the queue stayed full (or, in a cluster, NATS or the node did
/// not take the message within the wait); nothing was delivered.
fn full(what: &str) -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "{what} is full (or did not take the message within {} ms); it was not delivered: \
             retry later",
            INGRESS_WAIT.as_millis()
        ),
        retry_after: true,
    }
}

async fn publish(
    AxState(s): AxState<ObsState>,
    Path(topic): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    held(&s)?;
    if topic == crate::delivery::DEAD_LETTER_TOPIC {
        // Only the host writes there: a forged letter could push real ones out.
        return Err(error(
            StatusCode::FORBIDDEN,
            format!("{topic:?} is reserved for the host's dead letters"),
        ));
    }
    if let Err(reason) = validate_topic_name(&topic) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("invalid topic name {topic:?}: {reason}"),
        ));
    }
    // The body before the topic: a refused message must not leave a new topic behind.
    let (payload, _reserved) = body(&s, req).await?;
    // Again: the host may have begun to join its cluster while the body came in.
    held(&s)?;
    room_in_topics(&s, &topic, payload.len())?;
    let transport = s.orch().transport();
    let cancel = tokio_util::sync::CancellationToken::new();
    match within_wait(|c| transport.publish(&topic, payload, c), &cancel).await {
        Ok(()) => Ok(accepted(json!({ "topic": topic, "queueLen": transport.topic_len(&topic) }))),
        Err(e) => Err(refused(&format!("topic {topic:?}"), e)),
    }
}

/// A refused publish or send, as the HTTP status that says why.
fn refused(what: &str, e: CallError) -> ApiError {
    match e {
        CallError::InvalidName(_) => error(StatusCode::BAD_REQUEST, e.to_string()),
        CallError::NoSuchRoutine(_) => error(StatusCode::NOT_FOUND, e.to_string()),
        CallError::TooLarge(_) => error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        CallError::Limit(_) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        // Cut short by the wait: nothing was delivered.
        CallError::Cancelled => full(what),
        CallError::Closed => error(StatusCode::SERVICE_UNAVAILABLE, format!("{what} is closed")),
        CallError::OutcomeUnknown(why) => error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "the outcome is unknown for {what}: {why}; the message may still be delivered \
                 (sending it again may deliver it twice)"
            ),
        ),
    }
}

fn routine(s: &ObsState, name: &str) -> Result<crate::RoutineHandle, ApiError> {
    valid_routine_name(name)?;
    s.orch().get_by_name(name).ok_or_else(|| no_routine(s, name))
}

fn valid_routine_name(name: &str) -> Result<(), ApiError> {
    validate_routine_name(name)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid routine name {name:?}: {e}")))
}

/// 404, suggesting the live routine whose name is closest to `name` (a typo), as cargo
/// does for commands.
pub(super) fn no_routine(s: &ObsState, name: &str) -> ApiError {
    let closest = s
        .orch()
        .snapshots()
        .into_iter()
        .map(|snap| (edit_distance(name, &snap.name), snap.name))
        .filter(|(d, other)| *d <= (other.chars().count() / 3).max(1))
        .min();
    let hint = closest.map(|(_, n)| format!("; did you mean {n:?}?")).unwrap_or_default();
    error(StatusCode::NOT_FOUND, format!("no routine named {name:?}{hint}"))
}

/// Levenshtein distance between `a` and `b`, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = (up + 1).min(row[j] + 1).min(diag + usize::from(ca != *cb));
            diag = up;
        }
    }
    row[b.len()]
}

async fn send(
    AxState(s): AxState<ObsState>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    held(&s)?;
    // The transport says whether the name reaches a routine (in a cluster it may run on
    // another node, or be addressed as `node/name`).
    let transport = s.orch().transport();
    if !transport.resolves(&name) {
        valid_routine_name(&name)?;
        return Err(no_routine(&s, &name));
    }
    let (payload, _reserved) = body(&s, req).await?;
    held(&s)?;
    if let Some(h) = s.orch().get_by_name(&name) {
        let queued = h.mailbox().stats().approx_bytes as u64;
        if queued + payload.len() as u64 > INGRESS_QUEUE_BYTES {
            return Err(no_room(format!(
                "the mailbox of {name:?} holds {queued} bytes: ingress queues at most \
                 {INGRESS_QUEUE_BYTES} bytes in one mailbox; retry when it drains"
            )));
        }
    }
    let transport = s.orch().transport();
    let cancel = tokio_util::sync::CancellationToken::new();
    match within_wait(|c| transport.send(&name, payload, c), &cancel).await {
        Ok(()) => {
            let len = s.orch().get_by_name(&name).map(|h| h.mailbox().len());
            Ok(accepted(json!({ "routine": name, "queueLen": len })))
        }
        Err(CallError::Closed) => {
            Err(error(StatusCode::NOT_FOUND, format!("routine {name:?} has ended")))
        }
        Err(CallError::Cancelled) => Err(full(&format!("the mailbox of {name:?}"))),
        Err(e) => Err(refused(&format!("routine {name:?}"), e)),
    }
}

async fn restart(
    AxState(s): AxState<ObsState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    routine(&s, &name)?.restart();
    Ok(accepted(json!({ "routine": name, "action": "restart" })))
}

async fn stop(
    AxState(s): AxState<ObsState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    routine(&s, &name)?.stop();
    Ok(accepted(json!({ "routine": name, "action": "stop" })))
}

async fn reload(AxState(s): AxState<ObsState>) -> Result<Response, ApiError> {
    let Some(reloader) = s.reloader().cloned() else {
        return Err(if s.is_ready() {
            error(StatusCode::NOT_FOUND, "this host runs no plugin directory: nothing to reload")
        } else {
            ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the host is still starting; retry when /readyz answers".into(),
                retry_after: true,
            }
        });
    };
    // In its own task: a client that goes away does not cut a roll-out short.
    let report = tokio::spawn(async move { reloader.apply().await })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, format!("reload failed: {e}")))?;
    let status = if report.failed > 0 { StatusCode::UNPROCESSABLE_ENTITY } else { StatusCode::OK };
    Ok((status, axum::Json(report)).into_response())
}

fn accepted(body: serde_json::Value) -> Response {
    (StatusCode::ACCEPTED, axum::Json(body)).into_response()
}
