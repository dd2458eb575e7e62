//! Live reload of a plugin directory through the library: what changed is applied, what did
//! not is left alone, a broken version is refused while the old one keeps serving.

use std::path::Path;

use gorch_host::plugin::{
    LoadState, PluginBoard, ReloadAction, ReloadReport, Reloader, start_plugins,
};
use gorch_host::{Orchestrator, PluginDir};
use tokio_util::sync::CancellationToken;

use crate::common::*;

fn action(report: &ReloadReport, plugin: &str) -> ReloadAction {
    report
        .plugins
        .iter()
        .find(|c| c.plugin == plugin)
        .unwrap_or_else(|| panic!("{plugin} not in {report:?}"))
        .action
}

/// Replaces `path` the way deploy tools do: a temporary file renamed into place.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-new");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn started(orch: &Orchestrator, dir: &Path) -> Reloader {
    started_with(orch, dir, &PluginBoard::new()).await
}

async fn started_with(orch: &Orchestrator, dir: &Path, board: &PluginBoard) -> Reloader {
    let scanned = PluginDir::scan(dir).unwrap();
    let report =
        start_plugins(orch, engine(), dir, &scanned, board, &CancellationToken::new()).await;
    assert_eq!(report.failed, 0, "{report:?}");
    let reloader = Reloader::new(orch, engine(), dir, &scanned, board);
    reloader.adopt(&report).await;
    reloader
}

#[test]
fn reload_applies_what_changed_and_leaves_the_rest_alone() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let testkit = std::fs::read(gorch_artifacts::path("testkit")).unwrap();
        let echo = std::fs::read(gorch_artifacts::path("echo")).unwrap();
        std::fs::write(d.join("svc.wasm"), &testkit).unwrap();
        std::fs::write(d.join("svc.toml"), "instances = 2\n[wasi]\nenv = { MODE = \"echo\" }\n")
            .unwrap();
        std::fs::write(d.join("quiet.wasm"), &echo).unwrap();
        std::fs::write(d.join("quiet.toml"), "instances = 2\n").unwrap();
        let orch = Orchestrator::new();
        let reloader = started(&orch, d).await;
        let ids: Vec<u64> =
            ["svc-1", "svc-2"].iter().map(|n| orch.get_by_name(n).unwrap().id()).collect();

        let report = reloader.apply().await;
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(action(&report, "svc"), ReloadAction::Unchanged);
        assert_eq!(action(&report, "quiet"), ReloadAction::Unchanged);

        // New code for svc (rolled out instance by instance), a new plugin, a scaled one.
        replace(&d.join("svc.wasm"), &echo);
        std::fs::write(d.join("new.wasm"), &echo).unwrap();
        std::fs::write(d.join("quiet.toml"), "instances = 3\n").unwrap();
        let report = reloader.apply().await;
        assert_eq!(report.failed, 0, "{report:?}");
        assert_eq!(action(&report, "svc"), ReloadAction::Upgraded);
        assert_eq!(action(&report, "new"), ReloadAction::Started);
        assert_eq!(action(&report, "quiet"), ReloadAction::Scaled);
        let echo_version = engine().load_bytes("echo.wasm", &echo).unwrap().version().to_string();
        for (name, id) in ["svc-1", "svc-2"].iter().zip(&ids) {
            let h = orch.get_by_name(name).unwrap();
            assert_eq!(
                (h.id(), h.upgrades(), h.restarts()),
                (*id, 1, 0),
                "{name} kept its identity"
            );
            assert_eq!(h.version(), echo_version);
        }
        assert!(orch.get_by_name("new").is_some());
        assert!(orch.get_by_name("quiet-3").is_some());

        // A broken version is refused; the running one keeps serving.
        replace(&d.join("svc.wasm"), b"not wasm at all");
        let report = reloader.apply().await;
        assert_eq!(report.failed, 1);
        assert_eq!(action(&report, "svc"), ReloadAction::Failed);
        let err = report.plugins.iter().find(|c| c.plugin == "svc").unwrap().error.clone().unwrap();
        assert!(err.contains("svc.wasm") && err.contains("not a WebAssembly file"), "{err}");
        let svc = orch.get_by_name("svc-1").unwrap();
        assert_eq!(
            (svc.version(), svc.state()),
            (echo_version.clone(), gorch_host::State::Running)
        );

        // A removed file stops its routines; a changed gorch.toml needs a restart.
        std::fs::remove_file(d.join("new.wasm")).unwrap();
        std::fs::write(d.join("gorch.toml"), "").unwrap();
        let report = reloader.apply().await;
        assert_eq!(action(&report, "new"), ReloadAction::Stopped);
        assert_eq!(action(&report, "gorch.toml"), ReloadAction::NeedsRestart);
        assert!(orch.get_by_name("new").is_none());
        shutdown(&orch).await;
    });
}

#[test]
fn concurrent_reloads_run_one_after_the_other_and_the_newest_version_wins() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let echo = std::fs::read(gorch_artifacts::path("echo")).unwrap();
        let testkit = std::fs::read(gorch_artifacts::path("testkit")).unwrap();
        std::fs::write(d.join("svc.wasm"), &testkit).unwrap();
        std::fs::write(d.join("svc.toml"), "[wasi]\nenv = { MODE = \"echo\" }\n").unwrap();
        let orch = Orchestrator::new();
        let reloader = started(&orch, d).await;
        replace(&d.join("svc.wasm"), &echo);
        let (a, b) = tokio::join!(reloader.apply(), reloader.apply());
        let upgraded =
            [&a, &b].iter().filter(|r| action(r, "svc") == ReloadAction::Upgraded).count();
        assert_eq!(upgraded, 1, "one applies the change, the other finds nothing to do");
        // Replaced twice quickly: the last version runs.
        replace(&d.join("svc.wasm"), &testkit);
        replace(&d.join("svc.wasm"), &echo);
        replace(&d.join("svc.wasm"), &testkit);
        reloader.apply().await;
        let v = engine().load_bytes("t.wasm", &testkit).unwrap().version().to_string();
        assert_eq!(orch.get_by_name("svc").unwrap().version(), v);
        shutdown(&orch).await;
        let report = reloader.apply().await;
        assert_eq!(report.failed, 1);
        assert!(report.plugins[0].error.as_deref().unwrap().contains("shutting down"));
    });
}

#[test]
fn a_broken_manifest_or_a_renaming_change_leaves_the_running_plugin_alone() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::copy(gorch_artifacts::path("echo"), d.join("svc.wasm")).unwrap();
        std::fs::write(d.join("svc.toml"), "queue-capacity = 64\n").unwrap();
        let orch = Orchestrator::new();
        let board = PluginBoard::new();
        let reloader = started_with(&orch, d, &board).await;
        let svc = orch.get_by_name("svc").unwrap();
        svc.mailbox().try_send("queued".into()).unwrap_or(());

        // A typo: reported, and svc keeps running (with its mailbox).
        std::fs::write(d.join("svc.toml"), "queue-capacity = 64\nbogus = 1\n").unwrap();
        let report = reloader.apply().await;
        assert_eq!(action(&report, "svc"), ReloadAction::Failed);
        let err = report.plugins[0].error.clone().unwrap();
        assert!(err.contains("unknown field") && err.contains("keeps running"), "{err}");
        assert_eq!(orch.get_by_name("svc").unwrap().id(), svc.id());
        let on_board = board.list();
        assert_eq!(on_board.len(), 1, "{on_board:?}");
        assert_eq!(on_board[0].status, LoadState::Running, "not a failure for /readyz");

        // instances 1 -> 2 would rename svc to svc-1, svc-2 (and lose its mailbox).
        std::fs::write(d.join("svc.toml"), "queue-capacity = 64\ninstances = 2\n").unwrap();
        let report = reloader.apply().await;
        assert_eq!(action(&report, "svc"), ReloadAction::NeedsRestart);
        assert_eq!(orch.get_by_name("svc").unwrap().id(), svc.id());
        assert!(orch.get_by_name("svc-1").is_none());

        // Back to what runs: nothing to do, and the board forgets the error.
        std::fs::write(d.join("svc.toml"), "queue-capacity = 64\n").unwrap();
        assert_eq!(action(&reloader.apply().await, "svc"), ReloadAction::Unchanged);

        // A broken file that comes and goes leaves the board with it.
        std::fs::write(d.join("bad.wasm"), b"garbage").unwrap();
        assert_eq!(action(&reloader.apply().await, "bad"), ReloadAction::Failed);
        assert!(board.in_state(LoadState::Failed).len() == 1);
        std::fs::remove_file(d.join("bad.wasm")).unwrap();
        reloader.apply().await;
        assert!(board.in_state(LoadState::Failed).is_empty(), "{:?}", board.list());
        shutdown(&orch).await;
    });
}

#[test]
fn a_reload_past_the_hosts_room_is_refused() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::copy(gorch_artifacts::path("echo"), d.join("svc.wasm")).unwrap();
        std::fs::write(d.join("svc.toml"), "instances = 2\n").unwrap();
        let orch = Orchestrator::new();
        let reloader = started(&orch, d).await;
        // The test engine's pool has room for 200 instances.
        std::fs::write(d.join("svc.toml"), "instances = 500\n").unwrap();
        let report = reloader.apply().await;
        assert_eq!(report.failed, 1, "{report:?}");
        assert!(
            report.plugins[0].error.as_deref().unwrap().contains("the 200 this host has room for"),
            "{report:?}"
        );
        assert!(orch.get_by_name("svc-3").is_none());
        shutdown(&orch).await;
    });
}

#[test]
fn a_plugin_starts_with_time_metering_and_a_reload_switches_it_live() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::copy(gorch_artifacts::path("testkit"), d.join("calc.wasm")).unwrap();
        let manifest = |metering: &str| {
            format!("[limits]\nmetering = \"{metering}\"\n[wasi]\nenv = {{ MODE = \"echo\" }}\n")
        };
        std::fs::write(d.join("calc.toml"), manifest("time")).unwrap();
        let orch = Orchestrator::new();
        let reloader = started(&orch, d).await;
        let h = orch.get_by_name("calc").unwrap();
        assert!(engine().has_time_engine());
        assert!(
            wait_until(std::time::Duration::from_secs(10), || h.state()
                == gorch_host::State::Running)
            .await
        );
        assert_eq!(h.snapshot().fuel_consumed, None, "time: no fuel counted");

        // Metering is a limit like the others: the same code, compiled for the other
        // engine, replaces the instance (same routine, same mailbox).
        std::fs::write(d.join("calc.toml"), manifest("fuel")).unwrap();
        let report = reloader.apply().await;
        assert_eq!(action(&report, "calc"), ReloadAction::Upgraded, "{report:?}");
        assert_eq!((h.upgrades(), h.restarts()), (1, 0));
        assert!(h.snapshot().fuel_consumed.is_some(), "{:?}", h.snapshot());
        // The fuel-metered run counts fuel (recorded at its first host call, `recv`).
        assert!(
            wait_until(std::time::Duration::from_secs(10), || h
                .snapshot()
                .fuel_consumed
                .is_some_and(|f| f > 0))
            .await
        );

        // Back to time: the fuel counted so far stays, and no longer grows (a counter that
        // vanished would read as a reset).
        std::fs::write(d.join("calc.toml"), manifest("time")).unwrap();
        let counted = h.snapshot().fuel_consumed;
        let report = reloader.apply().await;
        assert_eq!(action(&report, "calc"), ReloadAction::Upgraded, "{report:?}");
        let kept = h.snapshot().fuel_consumed;
        assert!(kept.is_some() && kept >= counted, "{kept:?} after {counted:?}");
        h.mailbox().send("x".into()).await.unwrap();
        assert!(
            wait_until(std::time::Duration::from_secs(10), || h.snapshot().messages_in >= 1).await
        );
        assert_eq!(h.snapshot().fuel_consumed, kept, "time counts no fuel");
        assert_eq!(h.upgrades(), 2);
        shutdown(&orch).await;
    });
}

#[test]
fn a_reload_starts_again_what_was_stopped_and_reports_an_unreadable_file_on_the_board() {
    run(async {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let echo = std::fs::read(gorch_artifacts::path("echo")).unwrap();
        std::fs::write(d.join("relay.wasm"), &echo).unwrap();
        std::fs::write(d.join("other.wasm"), &echo).unwrap();
        let orch = Orchestrator::new();
        let board = PluginBoard::new();
        let reloader = started_with(&orch, d, &board).await;
        let relay = orch.get_by_name("relay").unwrap();
        relay.stop();
        relay.wait().await;

        // The directory says relay runs: the reload starts it again and says why.
        let report = reloader.apply().await;
        assert_eq!(action(&report, "relay"), ReloadAction::Started, "{report:?}");
        let c = report.plugins.iter().find(|c| c.plugin == "relay").unwrap();
        assert_eq!(c.error.as_deref(), Some("1 of its routines had ended: started again"));
        assert_eq!(action(&report, "other"), ReloadAction::Unchanged);
        assert!(orch.get_by_name("relay").is_some());

        // A component the host cannot read is reported on the board too, not only in the
        // report (the running version keeps running).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let path = d.join("other.wasm");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
            if std::fs::read(&path).is_err() {
                let report = reloader.apply().await;
                assert_eq!(action(&report, "other"), ReloadAction::Failed, "{report:?}");
                let status = board.list().into_iter().find(|p| p.plugin == "other").unwrap();
                let note = status.error.unwrap_or_default();
                assert!(note.contains("the running version keeps running"), "{note}");
                assert!(orch.get_by_name("other").is_some());
            } // else: running as root, permissions do not stop a read
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        shutdown(&orch).await;
    });
}
