//! Requests to the observability router in-process, through `oneshot` (no socket).

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use tower::ServiceExt;

/// GET `path` from `app`, with `Authorization: Bearer TOKEN` when a token is given; returns
/// the status and the body.
pub async fn get(app: &axum::Router, path: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::get(path);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = app.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 24).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// POST `body` to `path` on `app`; returns the status and the body.
pub async fn post(app: &axum::Router, path: &str, body: &str) -> (StatusCode, String) {
    let req = Request::post(path).body(Body::from(body.to_string())).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 1 << 24).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}
