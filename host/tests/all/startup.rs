//! Start-up of a plugin directory: plugins load concurrently and start as soon as they are
//! ready, each plugin's status is on the board (`/readyz`, `/gorchestra/api/plugins`), and
//! start-up can be cancelled.

use std::path::Path;
use std::time::Duration;

use axum::http::StatusCode;
use gorch_host::obs::{ObsState, router};
use gorch_host::plugin::{LoadState, PluginStatus, StartReport, start_plugins};
use gorch_host::{ObsConfig, Orchestrator, PluginDir};
use tokio_util::sync::CancellationToken;

use crate::common::guests::slow_component;
use crate::common::http::get;
use crate::common::*;

fn status_of<'a>(list: &'a [PluginStatus], plugin: &str) -> &'a PluginStatus {
    list.iter().find(|p| p.plugin == plugin).unwrap_or_else(|| panic!("{plugin}: {list:?}"))
}

async fn start(orch: &Orchestrator, dir: &Path, state: &ObsState) -> StartReport {
    let scanned = PluginDir::scan(dir).unwrap();
    start_plugins(orch, engine(), dir, &scanned, state.plugins(), &CancellationToken::new()).await
}

#[test]
fn a_slow_plugin_does_not_hold_back_the_others() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        // Sorted first: loaded one after another, it would delay echo by seconds.
        std::fs::write(dir.path().join("a-slow.wasm"), slow_component()).unwrap();
        std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        let starting = {
            let (orch, state, dir) = (orch.clone(), state.clone(), dir.path().to_path_buf());
            tokio::spawn(async move { start(&orch, &dir, &state).await })
        };
        assert!(
            wait_until(Duration::from_secs(60), || orch.get_by_name("echo").is_some()).await,
            "echo did not start"
        );
        let board = state.plugins().list();
        assert_eq!(status_of(&board, "a-slow").status, LoadState::Starting, "{board:?}");
        assert_eq!(status_of(&board, "echo").status, LoadState::Running);
        let report = starting.await.unwrap();
        assert_eq!((report.started, report.failed, report.routines), (1, 1, 1));
        let board = state.plugins().list();
        let slow = status_of(&board, "a-slow");
        assert_eq!(slow.status, LoadState::Failed);
        assert!(slow.error.as_deref().unwrap().contains("a-slow.wasm"), "{slow:?}");
        shutdown(&orch).await;
    });
}

#[test]
fn readyz_names_failed_plugins_and_the_api_lists_every_plugin() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
        std::fs::write(dir.path().join("bad.wasm"), b"garbage").unwrap();
        std::fs::write(dir.path().join("worse.toml"), "instances = 1\n").unwrap();
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        let app = router(state.clone(), &ObsConfig::default());
        assert_eq!(
            get(&app, "/readyz", None).await,
            (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into())
        );

        let report = start(&orch, dir.path(), &state).await;
        assert_eq!((report.started, report.failed, report.routines), (1, 2, 1));
        state.set_ready(true);
        let (status, body) = get(&app, "/readyz", None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(body.contains("bad.wasm: ") && body.contains("not a WebAssembly file"), "{body}");
        assert!(body.contains("worse.toml: ") && body.contains("no worse.wasm"), "{body}");
        assert!(!body.contains("echo"), "{body}");

        let (status, json) = get(&app, "/gorchestra/api/plugins", None).await;
        assert_eq!(status, StatusCode::OK);
        let list: Vec<PluginStatus> = serde_json::from_str(&json).unwrap();
        assert_eq!(list.len(), 3, "{list:?}");
        let echo = status_of(&list, "echo");
        assert_eq!((echo.status, echo.routines), (LoadState::Running, 1));
        assert!(echo.bytes.unwrap() > 0 && echo.load_seconds.is_some(), "{echo:?}");
        assert_eq!(status_of(&list, "bad").status, LoadState::Failed);
        assert!(json.contains("\"loadSeconds\""), "{json}");
        shutdown(&orch).await;
    });
}

#[test]
fn readyz_is_ready_when_every_plugin_started() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        let app = router(state.clone(), &ObsConfig::default());
        let report = start(&orch, dir.path(), &state).await;
        assert_eq!((report.started, report.failed), (1, 0));
        state.set_ready(true);
        assert_eq!(get(&app, "/readyz", None).await, (StatusCode::OK, "ready\n".into()));
        shutdown(&orch).await;
    });
}

#[test]
fn a_cancelled_start_up_starts_nothing_more() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
        std::fs::copy(gorch_artifacts::path("ticker"), dir.path().join("ticker.wasm")).unwrap();
        let orch = Orchestrator::new();
        let state = ObsState::new(&orch, None);
        let scanned = PluginDir::scan(dir.path()).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let report =
            start_plugins(&orch, engine(), dir.path(), &scanned, state.plugins(), &cancel).await;
        assert!(report.interrupted);
        assert_eq!(report.routines, 0);
        assert!(orch.list().is_empty());
        shutdown(&orch).await;
    });
}
