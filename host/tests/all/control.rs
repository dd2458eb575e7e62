//! The write routes (publish, send, restart, stop) through `oneshot`, the 403 rule, and
//! the CLI commands that use them against the real binary.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use gorch_host::obs::{ObsState, router};
use gorch_host::{ObsConfig, Orchestrator, RestartPolicy, SpawnOptions, State};
use tower::ServiceExt;

use crate::common::*;

async fn call(
    app: &axum::Router,
    method: Method,
    path: &str,
    body: impl Into<Body>,
) -> (StatusCode, String, Option<String>) {
    let req = Request::builder().method(method).uri(path).body(body.into()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned(), retry)
}

async fn post(app: &axum::Router, path: &str, body: impl Into<Body>) -> (StatusCode, String) {
    let (s, b, _) = call(app, Method::POST, path, body).await;
    (s, b)
}

#[test]
fn publish_puts_the_body_on_the_topic_within_the_limits() {
    run(async {
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        state.set_message_limit(8);
        let app = router(state, &ObsConfig::default());
        let (status, body) = post(&app, "/gorchestra/api/topics/jobs", "hello").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body, r#"{"queueLen":1,"topic":"jobs"}"#);
        let jobs = orch.bus().get("jobs").unwrap();
        assert_eq!(jobs.try_recv().unwrap().payload, b"hello");
        // An empty message is a message.
        assert_eq!(post(&app, "/gorchestra/api/topics/jobs", "").await.0, StatusCode::ACCEPTED);
        assert_eq!(jobs.try_recv().unwrap().payload, b"");

        let (status, body) = post(&app, "/gorchestra/api/topics/jobs", "123456789").await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert!(body.contains("limit of 8 bytes"), "{body}");
        assert!(jobs.is_empty(), "a refused message changes nothing");
        // Whitespace is not allowed in a topic name; bad UTF-8 and long names neither.
        let (status, body) = post(&app, "/gorchestra/api/topics/a%20b", "x").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("invalid topic name"), "{body}");
        assert_eq!(
            post(&app, "/gorchestra/api/topics/%FF%FE", "x").await.0,
            StatusCode::BAD_REQUEST
        );
        let long = format!("/gorchestra/api/topics/{}", "t".repeat(300));
        assert_eq!(post(&app, &long, "x").await.0, StatusCode::BAD_REQUEST);
        // Issue 25, finding 7: dead letters cannot be forged (nor pushed out by forgeries).
        let (status, body) = post(&app, "/gorchestra/api/topics/dead-letter", "{}").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("reserved"), "{body}");
        assert_eq!(orch.topics().len(), 1, "no topic was created by bad input");
        // A wrong method.
        let (status, _, _) = call(&app, Method::GET, "/gorchestra/api/topics/jobs", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        shutdown(&orch).await;
    });
}

#[test]
fn a_full_topic_answers_503_with_retry_after() {
    run(async {
        let orch = Orchestrator::new();
        let app = router(ObsState::new(&orch, None), &ObsConfig::default());
        let t = orch.bus().topic("tiny", 1).unwrap();
        assert_eq!(post(&app, "/gorchestra/api/topics/tiny", "1").await.0, StatusCode::ACCEPTED);
        let (status, body, retry) =
            call(&app, Method::POST, "/gorchestra/api/topics/tiny", "2").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(t.len(), 1);
        shutdown(&orch).await;
    });
}

#[test]
fn send_reaches_a_routine_and_restart_and_stop_steer_it() {
    run(async {
        let orch = Orchestrator::new();
        let app = router(ObsState::new(&orch, None), &ObsConfig::default());
        let opts = SpawnOptions::new("worker 1").restart(RestartPolicy::OnFailure);
        let h = orch
            .spawn(opts, |ctx| async move {
                while let Some(m) = ctx.recv(None).await? {
                    ctx.publish("out", m).await?;
                }
                Ok::<(), gorch_host::CallError>(())
            })
            .unwrap();
        let (status, body) = post(&app, "/gorchestra/api/routines/worker%201/mailbox", "hi").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        let out = orch.bus().topic("out", 16).unwrap();
        assert!(wait_until(Duration::from_secs(5), || out.len() == 1).await);

        let (status, body) = post(&app, "/gorchestra/api/routines/nobody/mailbox", "hi").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let err: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(err["error"], "no routine named \"nobody\"");
        // Issue 26, finding 7: a typo gets the closest name.
        let (status, body) = post(&app, "/gorchestra/api/routines/wrker%201/stop", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body.contains("did you mean \\\"worker 1\\\"?"), "{body}");
        assert_eq!(
            post(&app, "/gorchestra/api/routines/nobody/restart", "").await.0,
            StatusCode::NOT_FOUND
        );

        // A requested restart: a new run at once, counted, with no backoff.
        let (status, body) = post(&app, "/gorchestra/api/routines/worker%201/restart", "").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert!(
            wait_until(Duration::from_secs(5), || h.restarts() == 1 && h.state() == State::Running)
                .await
        );
        assert_eq!(
            post(&app, "/gorchestra/api/routines/worker%201/mailbox", "again").await.0,
            StatusCode::ACCEPTED
        );
        assert!(wait_until(Duration::from_secs(5), || out.len() == 2).await);

        assert_eq!(
            post(&app, "/gorchestra/api/routines/worker%201/stop", "").await.0,
            StatusCode::ACCEPTED
        );
        assert_eq!(wait_end(&h, Duration::from_secs(5)).await, State::Stopped);
        assert_eq!(h.restarts(), 1);
        shutdown(&orch).await;
    });
}

#[test]
fn a_requested_restart_cuts_a_backoff_short_and_does_not_count_against_intensity() {
    run(async {
        let orch = Orchestrator::new();
        let sup = gorch_host::Supervision {
            intensity: gorch_host::Intensity { max_restarts: 1, ..Default::default() },
            ..hour_backoff()
        };
        let h = orch
            .spawn(SpawnOptions::new("flaky").supervision(sup), |ctx| async move {
                if ctx.restarts() == 0 {
                    return Err("first run fails".to_string());
                }
                ctx.cancelled().await;
                Ok(())
            })
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || h.state() == State::Backoff).await);
        h.restart();
        assert!(wait_until(Duration::from_secs(5), || h.state() == State::Running).await);
        // Requested restarts are not failures: more of them than the intensity allows.
        for n in 2..5 {
            h.restart();
            assert!(
                wait_until(Duration::from_secs(5), || h.restarts() == n
                    && h.state() == State::Running)
                .await
            );
        }
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(5)).await, State::Stopped);
        shutdown(&orch).await;
    });
}

#[test]
fn write_routes_are_refused_on_a_public_address_without_a_token() {
    run(async {
        let orch = Orchestrator::new();
        let config = ObsConfig { addr: "0.0.0.0:9090".parse().unwrap(), ..ObsConfig::default() };
        let app = router(ObsState::new(&orch, None), &config);
        let (status, body) = post(&app, "/gorchestra/api/topics/jobs", "x").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("without --token"), "{body}");
        assert!(orch.topics().is_empty());
        // Reading stays open; with a token, writes are allowed (with the header).
        assert_eq!(call(&app, Method::GET, "/gorchestra/api/topics", "").await.0, StatusCode::OK);
        let app = router(ObsState::new(&orch, Some("s3cret".into())), &config);
        let req = Request::post("/gorchestra/api/topics/jobs")
            .header(header::AUTHORIZATION, "Bearer s3cret")
            .body(Body::from("x"))
            .unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::ACCEPTED);
        assert_eq!(
            post(&app, "/gorchestra/api/topics/jobs", "x").await.0,
            StatusCode::UNAUTHORIZED
        );
        shutdown(&orch).await;
    });
}

/// While the host joins its cluster, messages are refused (503, `Retry-After`) rather than
/// left on the in-memory bus of a host whose topics are about to be the cluster's.
#[test]
fn messages_are_refused_while_ingress_is_held() {
    run(async {
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        let app = router(state.clone(), &ObsConfig::default());
        state.hold_ingress(Some("joining the cluster at nats://x".into()));
        let (status, body, retry) =
            call(&app, Method::POST, "/gorchestra/api/topics/jobs", "early").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(retry.as_deref(), Some("1"));
        assert!(body.contains("joining the cluster at nats://x"), "{body}");
        let (status, _, _) =
            call(&app, Method::POST, "/gorchestra/api/routines/x/mailbox", "early").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(orch.bus().get("jobs").is_none(), "nothing was queued");
        state.hold_ingress(None);
        assert_eq!(post(&app, "/gorchestra/api/topics/jobs", "now").await.0, StatusCode::ACCEPTED);
        shutdown(&orch).await;
    })
}

/// Issue 25, finding 1: a web page in a browser on this machine could steer the host: a
/// cross-origin `text/plain` POST reached a mailbox and stopped a routine, and a foreign
/// `Host` (DNS rebinding) was served. Through the real binary: refused now, while the CLI
/// and same-origin requests with a non-simple content type work.
#[test]
fn web_pages_cannot_steer_the_host() {
    use crate::common::host::{BIN, http_request, port_of, read_until, run_host, stop_cleanly};
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("testkit"), dir.path().join("inbox.wasm")).unwrap();
    std::fs::write(dir.path().join("inbox.toml"), "[wasi]\nenv = { MODE = \"echo\" }\n").unwrap();
    let (mut host, rx) = run_host(dir.path(), &["--allowed-host", "box.lan"]);
    let log = read_until(&mut host, &rx, "metrics: http://");
    let port = port_of(&log);
    let taken = || crate::common::host::taken_by(&port, "inbox");
    let evil = [("Origin", "http://evil.example"), ("Content-Type", "text/plain")];
    let (status, body) =
        http_request(&port, "POST", "/gorchestra/api/routines/inbox/mailbox", &evil, "x");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("evil.example"), "{body}");
    let (status, _) = http_request(&port, "POST", "/gorchestra/api/routines/inbox/stop", &evil, "");
    assert_eq!(status, 403);
    // DNS rebinding: a page of attacker.example whose name now points at 127.0.0.1.
    for path in ["/metrics", "/healthz", "/gorchestra/api/routines"] {
        let rebound = [("Host", "attacker.example:9090")];
        let (status, body) = http_request(&port, "GET", path, &rebound, "");
        assert_eq!(status, 421, "{path}: {body}");
    }
    // Same origin, but a content type any page can send without a preflight.
    let own = format!("http://127.0.0.1:{port}");
    let simple = [("Origin", own.as_str()), ("Content-Type", "text/plain")];
    let (status, body) =
        http_request(&port, "POST", "/gorchestra/api/routines/inbox/mailbox", &simple, "x");
    assert_eq!(status, 403, "{body}");
    assert_eq!(taken(), 0, "a refused request reached the routine");
    // What is allowed: the marker header, a configured name, and the CLI.
    let marked =
        [("Origin", own.as_str()), ("Content-Type", "text/plain"), ("X-Gorch-Request", "1")];
    let (status, body) =
        http_request(&port, "POST", "/gorchestra/api/routines/inbox/mailbox", &marked, "a");
    assert_eq!(status, 202, "{body}");
    let named = [("Host", "box.lan:9090")];
    assert_eq!(http_request(&port, "GET", "/healthz", &named, "").0, 200);
    let addr = format!("127.0.0.1:{port}");
    let out = std::process::Command::new(BIN)
        .args(["send", "inbox", "b", "--addr", &addr])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(wait_until_blocking(Duration::from_secs(30), || taken() == 2));
    stop_cleanly(&mut host);
}

/// Ingress cannot take the host's memory: bytes queued in a topic and a mailbox are
/// bounded (503 with `Retry-After`), and new topics only within their share of the cap,
/// after empty unused ones are removed.
#[test]
fn ingress_bounds_queued_bytes_and_new_topics() {
    use gorch_host::obs::{INGRESS_QUEUE_BYTES, INGRESS_TOPIC_SHARE};
    run(async {
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        state.set_message_limit(8 << 20);
        let app = router(state, &ObsConfig::default());
        let big = vec![b'x'; 8 << 20];
        let fits = (INGRESS_QUEUE_BYTES / (8 << 20)) as usize;
        for _ in 0..fits {
            let (status, body) = post(&app, "/gorchestra/api/topics/sink", big.clone()).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        }
        let (status, body, retry) =
            call(&app, Method::POST, "/gorchestra/api/topics/sink", big.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("ingress queues at most"), "{body}");
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(orch.bus().get("sink").unwrap().len(), fits);
        orch.bus().remove("sink");

        // New topics: up to the share; a full one is refused until a topic is left empty
        // and unused, which goes to make room.
        for i in 1..INGRESS_TOPIC_SHARE {
            let (status, body) = post(&app, &format!("/gorchestra/api/topics/t{i}"), "m").await;
            assert_eq!(status, StatusCode::ACCEPTED, "t{i}: {body}");
        }
        let (status, _) = post(&app, "/gorchestra/api/topics/t0", "m").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let (status, body) = post(&app, "/gorchestra/api/topics/one-too-many", "m").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("publish to an existing topic"), "{body}");
        // An existing topic still takes messages.
        assert_eq!(post(&app, "/gorchestra/api/topics/t1", "m").await.0, StatusCode::ACCEPTED);
        orch.bus().get("t0").unwrap().try_recv().unwrap();
        let (status, body) = post(&app, "/gorchestra/api/topics/one-too-many", "m").await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert!(orch.bus().get("t0").is_none(), "the empty unused topic was removed");
        shutdown(&orch).await;
    });
}

/// Without a token, what decides a write is the peer: a host on 0.0.0.0 takes writes from
/// this machine and refuses them from another address.
#[test]
fn without_a_token_writes_come_from_loopback_peers_only() {
    use crate::common::host::{free_port, http_request, read_until, spawn_logged, stop_cleanly};
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("idler"), dir.path().join("idle.wasm")).unwrap();
    let port = free_port().to_string();
    let addr = format!("0.0.0.0:{port}");
    let args = ["run", "--no-cache", "--addr", &addr].map(std::ffi::OsStr::new);
    let (mut host, rx) = spawn_logged(&[&args[..], &[dir.path().as_os_str()]].concat());
    read_until(&mut host, &rx, "metrics: http://");
    let (status, body) = http_request(&port, "POST", "/gorchestra/api/topics/jobs", &[], "x");
    assert_eq!(status, 202, "{body}");
    // A page whose name was rebound to this address (its own Origin): refused, since the
    // Host check of reads is off on 0.0.0.0 without --allowed-host.
    let name = format!("attacker.example:{port}");
    let origin = format!("http://{name}");
    let rebound = [("Host", name.as_str()), ("Origin", origin.as_str())];
    let (status, body) = http_request(&port, "POST", "/gorchestra/api/topics/jobs", &rebound, "x");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("rebound"), "{body}");
    // This machine's address on a non-loopback interface, if it has one (no packet is sent).
    let ours = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("10.255.255.255:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified());
    if let Some(ip) = ours {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((ip, port.parse::<u16>().unwrap())).unwrap();
        let req = format!(
            "POST /gorchestra/api/topics/jobs HTTP/1.0\r\nHost: {ip}:{port}\r\n\
             Content-Length: 1\r\n\r\nx"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 403"), "{out}");
        assert!(out.contains(&format!("refused from {ip}")), "{out}");
    }
    stop_cleanly(&mut host);
}
