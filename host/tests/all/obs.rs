//! The observability server: routes through `oneshot`, one real server on port 0, metric
//! names and values, removal of finished series, escaping, pprof gating, the token.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gorch_host::obs::{ObsState, router};
use gorch_host::{ObsConfig, ObsServer, Orchestrator, SpawnOptions};
use tower::ServiceExt;

use crate::common::host::BIN;
use crate::common::http::get;
use crate::common::*;

/// The CPU sampler is process-wide (one profile at a time): the tests that take one take
/// turns.
static PROFILES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn metrics_keep_per_plugin_sums_and_drop_per_routine_series_past_the_limit() {
    run(async {
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        let app = router(state.clone(), &ObsConfig::default());
        let mut handles = Vec::new();
        for i in 0..5 {
            let h = orch
                .spawn(SpawnOptions::new(format!("w{i}")), |ctx| async move {
                    ctx.add_busy(Duration::from_secs(1));
                    ctx.publish("out", b"x".to_vec()).await?;
                    ctx.cancelled().await;
                    Ok::<(), gorch_host::CallError>(())
                })
                .unwrap();
            handles.push(h);
        }
        let sent = || handles.iter().all(|h| h.snapshot().messages_out == 1);
        assert!(wait_until(Duration::from_secs(5), sent).await);
        let (_, m) = get(&app, "/metrics", None).await;
        assert_eq!(value(&m, "gorch_metrics_routine_series"), Some(1.0));
        assert_eq!(value(&m, r#"gorch_routine_up{name="w3"}"#), Some(1.0));
        assert_eq!(value(&m, r#"gorch_plugin_routines{plugin=""}"#), Some(5.0));

        state.set_metrics_routine_limit(4);
        let (_, m) = get(&app, "/metrics", None).await;
        assert_eq!(value(&m, "gorch_metrics_routine_series"), Some(0.0));
        assert!(!m.contains("gorch_routine_up{"), "{m}");
        assert!(!m.contains("gorch_routine_info{"), "{m}");
        // The totals per plugin stay.
        assert_eq!(value(&m, r#"gorch_plugin_routines{plugin=""}"#), Some(5.0));
        // add_busy's 5 s plus the polls' own (timed) time.
        let busy = value(&m, r#"gorch_plugin_busy_seconds_total{plugin=""}"#).unwrap();
        assert!((5.0..6.0).contains(&busy), "{busy}");
        assert_eq!(value(&m, r#"gorch_plugin_messages_sent_total{plugin=""}"#), Some(5.0));
        assert_eq!(value(&m, r#"gorch_routines{state="RUNNING"}"#), Some(5.0));
        shutdown(&orch).await;
    });
}

#[test]
fn plugin_counters_keep_what_ended_routines_counted() {
    run(async {
        let orch = Orchestrator::new();
        let app = router(ObsState::new(&orch, None), &ObsConfig::default());
        let never = gorch_host::RestartPolicy::Never;
        let failing = orch
            .spawn(SpawnOptions::new("fails").restart(never), |ctx| async move {
                ctx.publish("out", b"x".to_vec()).await?;
                Err::<(), _>(gorch_host::CallError::Closed)
            })
            .unwrap();
        let stopping = orch
            .spawn(SpawnOptions::new("stops"), |ctx| async move {
                ctx.publish("out", b"y".to_vec()).await?;
                Ok::<(), gorch_host::CallError>(())
            })
            .unwrap();
        assert_eq!(failing.wait().await, gorch_host::State::Failed);
        assert_eq!(stopping.wait().await, gorch_host::State::Stopped);
        let (_, m) = get(&app, "/metrics", None).await;
        // Both have left the host: no live routine, but the plugin's counters stay.
        assert_eq!(value(&m, r#"gorch_plugin_routines{plugin=""}"#), Some(0.0));
        assert_eq!(value(&m, r#"gorch_plugin_messages_sent_total{plugin=""}"#), Some(2.0));
        let ended = |s: &str| {
            value(&m, &format!(r#"gorch_plugin_routines_ended_total{{plugin="",state="{s}"}}"#))
        };
        assert_eq!(ended("FAILED"), Some(1.0));
        assert_eq!(ended("STOPPED"), Some(1.0));
        assert_eq!(ended("PANICKED"), Some(0.0));
        assert!(!m.contains(r#"gorch_routine_up{name="fails"}"#), "{m}");
        shutdown(&orch).await;
    });
}

#[test]
fn metrics_have_the_design_names_and_the_counters_values() {
    run(async {
        let orch = Orchestrator::new();
        let app = router(ObsState::new(&orch, None), &ObsConfig::default());
        let worker = orch
            .spawn(SpawnOptions::new("worker"), |ctx| async move {
                ctx.add_busy(Duration::from_secs(2));
                ctx.publish("jobs", b"abc".to_vec()).await?;
                ctx.publish("jobs", b"de".to_vec()).await?;
                ctx.cancelled().await;
                Ok::<(), gorch_host::CallError>(())
            })
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || worker.snapshot().messages_out == 2).await);
        let (status, m) = get(&app, "/metrics", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(value(&m, r#"gorch_routines{state="RUNNING"}"#), Some(1.0));
        assert_eq!(value(&m, r#"gorch_routines{state="FAILED"}"#), Some(0.0));
        let id = worker.id();
        assert_eq!(
            value(&m, &format!(r#"gorch_routine_info{{id="{id}",name="worker",plugin=""}}"#)),
            Some(1.0)
        );
        assert_eq!(value(&m, r#"gorch_routine_up{name="worker"}"#), Some(1.0));
        assert!(value(&m, r#"gorch_routine_busy_seconds_total{name="worker"}"#).unwrap() >= 2.0);
        assert_eq!(value(&m, r#"gorch_routine_messages_sent_total{name="worker"}"#), Some(2.0));
        assert_eq!(value(&m, r#"gorch_routine_queue_capacity{name="worker"}"#), Some(128.0));
        assert_eq!(value(&m, r#"gorch_topic_length{topic="jobs"}"#), Some(2.0));
        assert_eq!(value(&m, r#"gorch_topic_bytes{topic="jobs"}"#), Some(5.0));
        assert_eq!(value(&m, r#"gorch_topic_published_total{topic="jobs"}"#), Some(2.0));
        for name in [
            "gorch_routine_restarts_total",
            "gorch_routine_fuel_consumed_total",
            "gorch_routine_memory_bytes",
            "gorch_routine_queue_length",
            "gorch_routine_queue_bytes",
            "gorch_routine_messages_received_total",
            "gorch_routine_terminations_total",
            "gorch_topic_capacity",
            "gorch_topic_received_total",
            "gorch_topic_blocked_publish_seconds_total",
            "gorch_topic_blocked_recv_seconds_total",
            "gorch_dead_letters_total",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
        ] {
            assert!(m.contains(&format!("# TYPE {name} ")), "{name} missing:\n{m}");
        }
        // A finished routine's series disappear.
        worker.stop();
        worker.wait().await;
        let (_, m) = get(&app, "/metrics", None).await;
        assert!(!m.contains(r#"name="worker""#), "{m}");
        shutdown(&orch).await;
    })
}

#[test]
fn the_text_writer_and_the_collector_report_the_same_series() {
    run(async {
        let orch = Orchestrator::new();
        let odd = r#"a "quoted" \ name"#;
        let h = orch
            .spawn(SpawnOptions::new(odd), |ctx| async move {
                ctx.publish("t", b"x".to_vec()).await?;
                ctx.cancelled().await;
                Ok::<(), gorch_host::CallError>(())
            })
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || h.snapshot().messages_out == 1).await);
        let series = |text: &str| {
            let mut v: Vec<String> = text
                .lines()
                .filter(|l| !l.starts_with('#') && l.starts_with("gorch_"))
                .filter(|l| !l.contains("busy_seconds")) // still moving
                .map(str::to_string)
                .collect();
            v.sort();
            v
        };
        let mut text = String::new();
        gorch_host::obs::write_text(&orch, &mut text);
        let collected = gorch_host::obs::render(&gorch_host::obs::registry(&orch));
        assert_eq!(series(&text), series(&collected));
        assert!(text.contains(r#"gorch_routine_up{name="a \"quoted\" \\ name"} 1"#), "{text}");
        h.stop();
        h.wait().await;
        shutdown(&orch).await;
    })
}

#[test]
fn json_api_health_readiness_and_a_hostile_name() {
    run(async {
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        let app = router(state.clone(), &ObsConfig::default());
        let evil = "<img src=x onerror=alert(1)>";
        let h = orch
            .spawn(SpawnOptions::new(evil), |ctx| async move {
                ctx.cancelled().await;
                Ok::<(), String>(())
            })
            .unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || h.state() == gorch_host::State::Running).await
        );
        let (status, body) = get(&app, "/gorchestra/api/routines", None).await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v[0]["name"], evil);
        assert_eq!(v[0]["state"], "RUNNING");
        // The page renders names with textContent only: no innerHTML anywhere.
        let (status, page) = get(&app, "/gorchestra", None).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page.contains("<table id=\"routines\">"));
        assert!(!page.contains("innerHTML"));
        assert!(!page.contains("<script src") && !page.contains("<link "), "no external assets");
        assert_eq!(get(&app, "/healthz", None).await.0, StatusCode::OK);
        assert_eq!(get(&app, "/readyz", None).await.0, StatusCode::SERVICE_UNAVAILABLE);
        state.set_ready(true);
        assert_eq!(get(&app, "/readyz", None).await.0, StatusCode::OK);
        assert_eq!(get(&app, "/gorchestra/api/topics", None).await.1, "[]");
        // A full dead-letter topic is not a silent drop: /readyz says so until it drains.
        let dead = orch.bus().topic(gorch_host::DEAD_LETTER_TOPIC, 2).unwrap();
        for _ in 0..2 {
            dead.send("letter".into()).await.unwrap();
        }
        let (status, body) = get(&app, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("dead-letter topic is full (2 of 2)"), "{body}");
        dead.recv().await.unwrap();
        assert_eq!(get(&app, "/readyz", None).await.0, StatusCode::OK);
        dead.recv().await.unwrap();
        h.stop();
        h.wait().await;
        let (_, hist) = get(&app, "/gorchestra/api/history", None).await;
        let v: serde_json::Value = serde_json::from_str(&hist).unwrap();
        assert_eq!(v[0]["name"], evil);
        // pprof is off unless asked for.
        assert_eq!(
            get(&app, "/debug/pprof/profile?seconds=1", None).await.0,
            StatusCode::NOT_FOUND
        );
        let no_dash = router(state, &ObsConfig { dashboard: false, ..Default::default() });
        assert_eq!(get(&no_dash, "/gorchestra", None).await.0, StatusCode::NOT_FOUND);
        shutdown(&orch).await;
    })
}

/// Issue 24: at scale the API answers narrow questions: one routine by name (404 with the
/// closest name), the routines in one state, the first N; a bad parameter is a 400 that
/// says what is wrong.
#[test]
fn one_routine_and_filtered_lists() {
    run(async {
        let orch = Orchestrator::new();
        let app = router(ObsState::new(&orch, None), &ObsConfig::default());
        let handles: Vec<_> = ["worker-1", "worker-2", "worker-3"]
            .into_iter()
            .map(|n| {
                orch.spawn(SpawnOptions::new(n), |ctx| async move {
                    ctx.cancelled().await;
                    Ok::<(), String>(())
                })
                .unwrap()
            })
            .collect();
        let running = || handles.iter().all(|h| h.state() == gorch_host::State::Running);
        assert!(wait_until(Duration::from_secs(5), running).await);
        let names = |body: &str| -> Vec<String> {
            let v: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
            v.iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
        };
        let (status, body) = get(&app, "/gorchestra/api/routines/worker-2", None).await;
        assert_eq!(status, StatusCode::OK);
        let one: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (one["name"].as_str(), one["state"].as_str()),
            (Some("worker-2"), Some("RUNNING"))
        );
        let (status, body) = get(&app, "/gorchestra/api/routines/worker-9", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body.contains("did you mean"), "{body}");
        let (_, body) = get(&app, "/gorchestra/api/routines?state=running", None).await;
        assert_eq!(names(&body), ["worker-1", "worker-2", "worker-3"]);
        let (_, body) = get(&app, "/gorchestra/api/routines?state=BACKOFF", None).await;
        assert!(names(&body).is_empty());
        let (_, body) = get(&app, "/gorchestra/api/routines?state=RUNNING&limit=2", None).await;
        assert_eq!(names(&body), ["worker-1", "worker-2"]);
        let (status, body) = get(&app, "/gorchestra/api/routines?state=asleep", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("RUNNING") && body.contains("asleep"), "{body}");
        let (status, body) = get(&app, "/gorchestra/api/routines?limit=-1", None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("limit"), "{body}");
        for h in &handles {
            h.stop();
            h.wait().await;
        }
        shutdown(&orch).await;
    })
}

#[test]
fn the_token_guards_every_route_but_healthz() {
    run(async {
        let orch = Orchestrator::new();
        let cfg = ObsConfig { token: Some("s3cret".into()), ..Default::default() };
        let app = router(ObsState::new(&orch, Some("s3cret".into())), &cfg);
        for path in [
            "/metrics",
            "/gorchestra",
            "/gorchestra/api/routines",
            "/gorchestra/api/routines/nobody",
            "/gorchestra/api/topics",
            "/gorchestra/api/history",
            "/readyz",
        ] {
            assert_eq!(get(&app, path, None).await.0, StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(get(&app, path, Some("wrong")).await.0, StatusCode::UNAUTHORIZED, "{path}");
            assert_ne!(get(&app, path, Some("s3cret")).await.0, StatusCode::UNAUTHORIZED, "{path}");
        }
        assert_eq!(get(&app, "/healthz", None).await.0, StatusCode::OK);
        // Issue 25, finding 8: the scheme is case-insensitive; a prefix of the token is not it.
        for (header, status) in [
            ("bearer s3cret", StatusCode::OK),
            ("BEARER  s3cret", StatusCode::OK),
            ("Bearer s3cre", StatusCode::UNAUTHORIZED),
            ("Bearer s3crett", StatusCode::UNAUTHORIZED),
            ("Basic s3cret", StatusCode::UNAUTHORIZED),
        ] {
            let req = axum::http::Request::get("/metrics")
                .header(axum::http::header::AUTHORIZATION, header)
                .body(axum::body::Body::empty())
                .unwrap();
            let resp = tower::ServiceExt::oneshot(app.clone(), req).await.unwrap();
            assert_eq!(resp.status(), status, "{header}");
        }
        assert_eq!(get(&app, "/gorchestra?token=s3cret", None).await.0, StatusCode::OK);
        assert_eq!(
            get(&app, "/gorchestra/api/routines?token=s3cret", None).await.0,
            StatusCode::UNAUTHORIZED
        );
        shutdown(&orch).await;
    })
}

#[test]
fn a_real_server_on_port_0_serves_ps_and_a_cpu_profile() {
    run(async {
        let _turn = PROFILES.lock().await;
        let orch = Orchestrator::new();
        let cfg =
            ObsConfig { addr: "127.0.0.1:0".parse().unwrap(), pprof: true, ..Default::default() };
        let server = ObsServer::start(&orch, &cfg).unwrap();
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        // Binding is synchronous: a second server on the same port fails at once.
        let clash = ObsServer::start(&orch, &ObsConfig { addr, ..Default::default() });
        assert!(clash.is_err());
        spawn_mode(&orch, SpawnOptions::new("spinning"), "spin");

        let out = tokio::process::Command::new(BIN)
            .args(["ps", "--addr", &addr.to_string()])
            .output()
            .await
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{table} {}", String::from_utf8_lossy(&out.stderr));
        assert!(table.lines().nth(1).unwrap().contains("spinning"), "{table}");

        let resp = raw_get(addr, "/debug/pprof/profile?seconds=1").await;
        assert!(
            resp.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&resp[..200.min(resp.len())])
        );
        let body = &resp[resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        // profile.proto starts with its sample types (field 1, length-delimited).
        assert_eq!(body[0], 0x0a);
        assert!(body.windows(7).any(|w| w == b"samples"));
        server.shutdown().await;
        shutdown(&orch).await;
    })
}

#[test]
fn one_cpu_profile_at_a_time_the_others_get_409() {
    run(async {
        let _turn = PROFILES.lock().await;
        let orch = Orchestrator::new();
        let app =
            router(ObsState::new(&orch, None), &ObsConfig { pprof: true, ..Default::default() });
        let profile = "/debug/pprof/profile?seconds=1";
        // A long profile, polled once: from its first poll it holds the sampler.
        let req = Request::get("/debug/pprof/profile?seconds=60").body(Body::empty()).unwrap();
        let mut first = Box::pin(app.clone().oneshot(req));
        assert!(futures::poll!(first.as_mut()).is_pending());

        let (status, body) = get(&app, profile, None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body, "a CPU profile is already being taken; try again when it finishes\n");

        // The client goes away: the sampling stops and frees the slot (on the sampling
        // thread, hence the polling; the deadline only matters if it never happens).
        drop(first);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = get(&app, profile, None).await;
            if status == StatusCode::OK {
                break;
            }
            assert_eq!(status, StatusCode::CONFLICT, "{body}");
            assert!(std::time::Instant::now() < deadline, "the slot was never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A finished profile has freed the slot before its answer came back.
        let (status, body) = get(&app, profile, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        shutdown(&orch).await;
    })
}

async fn raw_get(addr: std::net::SocketAddr, path: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    buf
}
