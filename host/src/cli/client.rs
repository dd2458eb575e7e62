//! The HTTP client of the commands that talk to a running host (`ps`, `publish`, `send`,
//! `restart`, `stop`): hyper over one connection per command, the bearer token, and
//! refusals turned into errors that say why.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;

use crate::obs::DEFAULT_ADDR;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the host is and how to authenticate: flattened into each command.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Address of the running host's server: `HOST:PORT` (a name such as `localhost:9090`
    /// or an IP address).
    #[arg(long, default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Bearer token, if the host was started with `--token`.
    #[arg(long, env = "GORCH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl Target {
    /// Sends one request; returns the status and body. Only a transport failure is an error
    /// here: callers decide what a status means.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request_within(method, path, body, REQUEST_TIMEOUT).await
    }

    /// [`request`](Self::request) with another time limit.
    pub async fn request_within(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        limit: Duration,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let fut = self.request_inner(method, path, body);
        tokio::time::timeout(limit, fut)
            .await
            .with_context(|| format!("no answer from {} within {limit:?}", self.addr))?
    }

    async fn request_inner(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        if !self.addr.contains(':') || self.addr.contains("://") {
            bail!("--addr {:?}: expected HOST:PORT, such as 127.0.0.1:9090", self.addr);
        }
        let stream =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
                .await
                .with_context(|| format!("cannot reach a gorch-host at {}: timed out", self.addr))?
                .with_context(|| format!("cannot reach a gorch-host at {}", self.addr))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {} failed", self.addr))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr)
            .header(header::CONTENT_TYPE, "application/octet-stream");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body))).context("invalid request")?;
        let resp = sender.send_request(req).await.context("request failed")?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.context("reading the answer")?.to_bytes();
        driver.abort();
        Ok((status, bytes))
    }

    /// GET `path`; an error unless the answer is 200.
    pub async fn get(&self, path: &str) -> anyhow::Result<Bytes> {
        let (status, body) = self.request(Method::GET, path, Vec::new()).await?;
        if status != StatusCode::OK {
            bail!("{path}: {}", refusal(status, &body));
        }
        Ok(body)
    }

    /// POST `body` to `path`; the JSON answer when it is 2xx, else an error with the reason.
    pub async fn post(&self, path: &str, body: Vec<u8>) -> anyhow::Result<serde_json::Value> {
        let (status, answer) = self.request(Method::POST, path, body).await?;
        if !status.is_success() {
            bail!("{}", refusal(status, &answer));
        }
        Ok(serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null))
    }
}

/// `HTTP 404 Not Found: no routine named "x"`: the status and the host's reason (its JSON
/// `error` field, or the text it sent).
pub(super) fn refusal(status: StatusCode, body: &[u8]) -> String {
    let reason = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let code = status.canonical_reason().unwrap_or("");
    format!("HTTP {} {code}: {reason}", status.as_u16())
}

/// `s` as one percent-encoded path segment (names may hold spaces and any printable text).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
