//! What a web page in a browser on this machine may do to the server: nothing it was not
//! meant to. Loopback is reachable from any page the browser opens, so:
//!
//! - **Host** (every route): on a loopback address, a request whose `Host` is not a
//!   loopback name or address (or a name given with `--allowed-host`) is refused with 421:
//!   a page of `attacker.example` whose name was rebound to 127.0.0.1 (DNS rebinding)
//!   reaches the socket but names the wrong host. On other addresses the check applies
//!   once `--allowed-host` names are given (the bound address and any IP literal pass).
//! - **Origin** (writes): a request that carries an `Origin` other than the server's own
//!   (`http://` + its `Host`) is refused with 403.
//! - **Content type** (writes from browsers, those with an `Origin` or `Sec-Fetch-*`
//!   header): one a page can send without a CORS preflight (none, `text/plain`,
//!   `application/x-www-form-urlencoded`, `multipart/form-data`) is refused with 403 unless
//!   the request carries `X-Gorch-Request`. The CLI sends `application/octet-stream`.
//!
//! A request without `Host` (HTTP/1.0, not a browser) passes the Host check.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// The header a browser page must add to a write with a simple content type.
pub const REQUEST_HEADER: &str = "x-gorch-request";

/// What the checks accept.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    bound: SocketAddr,
    /// `--allowed-host` names, lower case, without port.
    allowed: Vec<String>,
    /// Whether writes need a token (then a rebound page cannot write: it has no token).
    token: bool,
}

impl Guard {
    pub(crate) fn new(bound: SocketAddr, allowed: &[String], token: bool) -> Arc<Guard> {
        let allowed = allowed.iter().map(|h| normalize(h)).collect();
        Arc::new(Guard { bound, allowed, token })
    }

    /// For a write without a token, whatever the bound address: `host` must be an IP
    /// literal, a loopback name or an allowed name. A page can rebind a name of its own to
    /// any address this server listens on, never an IP literal.
    fn write_host_ok(&self, host: &str) -> bool {
        let name = normalize(strip_port(host));
        let literal = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok();
        literal
            || name == "localhost"
            || name.ends_with(".localhost")
            || self.allowed.contains(&name)
    }

    /// Whether a request naming `host` (the `Host` header) is for this server.
    fn host_ok(&self, host: &str) -> bool {
        let name = normalize(strip_port(host));
        if name == "localhost" || name.ends_with(".localhost") {
            return true;
        }
        if self.allowed.contains(&name) {
            return true;
        }
        let ip = name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        if ip.is_some_and(|ip| ip.is_loopback()) {
            return true;
        }
        if self.bound.ip().is_loopback() {
            return false;
        }
        // Another address: checked only once names are configured.
        if self.allowed.is_empty() {
            return true;
        }
        ip.is_some_and(|ip| self.bound.ip().is_unspecified() || ip == self.bound.ip())
    }
}

/// The host part of `host[:port]` (an IPv6 literal keeps its brackets).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn simple_content_type(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    matches!(
        essence.as_str(),
        "text/plain" | "application/x-www-form-urlencoded" | "multipart/form-data"
    )
}

fn refuse(status: StatusCode, message: String) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// The middleware: the three checks above, in that order.
pub(crate) async fn check(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(h) = host
        && !g.host_ok(h)
    {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {h:?} is not this server's name (a page of another site may have \
                 rebound its name to this address); to serve that name, start the host with \
                 --allowed-host {}",
                normalize(strip_port(h))
            ),
        );
    }
    let write = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if write
        && !g.token
        && let Some(h) = host
        && !g.write_host_ok(h)
    {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "a write naming Host {h:?} is refused without --token (a page of another site \
                 may have rebound its name to this address); use an IP address, a loopback \
                 name, --allowed-host {}, or --token",
                normalize(strip_port(h))
            ),
        );
    }
    if write {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if let Some(o) = origin {
            let own = host.is_some_and(|h| {
                o.strip_prefix("http://")
                    .or_else(|| o.strip_prefix("https://"))
                    .is_some_and(|rest| rest.eq_ignore_ascii_case(h))
            });
            if !own {
                return refuse(
                    StatusCode::FORBIDDEN,
                    format!("a write from the web page origin {o:?} is refused (not this server)"),
                );
            }
        }
        let browser = origin.is_some()
            || headers.contains_key("sec-fetch-site")
            || headers.contains_key("sec-fetch-mode");
        if browser && simple_content_type(headers) && !headers.contains_key(REQUEST_HEADER) {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "a write from a browser needs a Content-Type other than text/plain, form \
                     or multipart (for example application/octet-stream), or the header \
                     {REQUEST_HEADER}"
                ),
            );
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_servers_take_loopback_names_only() {
        let g = Guard::new("127.0.0.1:9090".parse().unwrap(), &[], false);
        for ok in [
            "127.0.0.1:9090",
            "localhost:9090",
            "LOCALHOST",
            "[::1]:9090",
            "127.0.0.2",
            "a.localhost:1",
            "localhost.",
        ] {
            assert!(g.host_ok(ok), "{ok}");
        }
        for bad in
            ["attacker.example:9090", "attacker.example", "10.0.0.1:9090", "x", "127.0.0.1.nip.io"]
        {
            assert!(!g.host_ok(bad), "{bad}");
        }
        let named = Guard::new("127.0.0.1:9090".parse().unwrap(), &["Box.Lan".into()], false);
        assert!(named.host_ok("box.lan:9090"));
    }

    #[test]
    fn other_addresses_check_names_once_configured() {
        let open = Guard::new("0.0.0.0:9090".parse().unwrap(), &[], false);
        assert!(open.host_ok("anything.example:9090"));
        let named =
            Guard::new("0.0.0.0:9090".parse().unwrap(), &["metrics.internal".into()], false);
        assert!(named.host_ok("metrics.internal:9090"));
        assert!(named.host_ok("10.1.2.3:9090"));
        assert!(!named.host_ok("attacker.example"));
    }

    #[test]
    fn writes_without_a_token_need_an_address_or_a_known_name() {
        let open = Guard::new("0.0.0.0:9090".parse().unwrap(), &["box.lan".into()], false);
        for ok in ["192.0.2.2:9090", "[::1]:9090", "localhost:9090", "box.lan:9090"] {
            assert!(open.write_host_ok(ok), "{ok}");
        }
        for bad in ["attacker.example:9090", "127.0.0.1.nip.io"] {
            assert!(!open.write_host_ok(bad), "{bad}");
        }
    }
}
