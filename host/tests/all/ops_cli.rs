//! What operators and new users meet at the command line: `--log-format json` (one object
//! per line, guest lines with `routine` and `plugin`), `completions SHELL`, a bad
//! `gorch.toml` named as the directory's file with line and column, the progress line of
//! start-up on a terminal, and a guest panic that no longer suggests `RUST_BACKTRACE=1`.

use std::process::Command;
use std::time::Duration;

use gorch_host::{Orchestrator, SpawnOptions, State};

use crate::common::host::{BIN, Host, read_until, run_host};
use crate::common::*;

/// Sends SIGINT to the host and checks that it exits 0; returns the rest of its log.
fn interrupt(mut child: Host, rx: &std::sync::mpsc::Receiver<String>, log: &mut String) {
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    log.extend(rx.iter().map(|l| l + "\n"));
    assert!(exit.success(), "exit {exit:?}; log:\n{log}");
}

#[test]
fn json_logs_are_one_object_per_line_and_guest_lines_carry_routine_and_plugin() {
    let dir = tempfile::tempdir().unwrap();
    // ticker logs through the WIT `log` import; hello-command writes to stdout.
    std::fs::copy(gorch_artifacts::path("ticker"), dir.path().join("ticker.wasm")).unwrap();
    std::fs::copy(gorch_artifacts::path("hello-command"), dir.path().join("hello.wasm")).unwrap();
    std::fs::write(dir.path().join("hello.toml"), "name = \"greeter\"\nrestart = \"never\"\n")
        .unwrap();
    let (mut child, rx) = run_host(dir.path(), &["--log-format", "json"]);
    let mut log = read_until(&mut child, &rx, "tick 1");
    if !log.contains("from a plain WASI command") {
        log.push_str(&read_until(&mut child, &rx, "from a plain WASI command"));
    }
    interrupt(child, &rx, &mut log);

    let mut guest = Vec::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        assert!(v["timestamp"].is_string() && v["target"].is_string(), "{line}");
        if v["target"] == "guest" {
            guest.push(v);
        }
    }
    let tick = guest
        .iter()
        .find(|v| v["message"].as_str().unwrap().starts_with("tick 1 "))
        .expect("tick 1 is a guest line");
    assert_eq!((&tick["routine"], &tick["plugin"]), (&"ticker".into(), &"ticker".into()));
    // stdout of a plain WASI command; the routine is named by the manifest, the plugin by
    // the file.
    let hello = guest
        .iter()
        .find(|v| v["message"].as_str().unwrap().contains("from a plain WASI command"))
        .expect("stdout is a guest line");
    assert_eq!((&hello["routine"], &hello["plugin"]), (&"greeter".into(), &"hello".into()));
    // Host lines are JSON too.
    assert!(log.contains("\"message\":\"stopped 1 routine(s)\""), "{log}");

    // So is the error a failed run exits with.
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--strict", "--no-cache", "--addr", "127.0.0.1:0", "--log-format", "json"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last: serde_json::Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert_eq!(last["level"], "ERROR", "{err}");
    assert!(last["message"].as_str().unwrap().starts_with("--strict: no *.wasm"), "{err}");
    for line in err.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
}

#[test]
fn text_guest_lines_carry_routine_and_plugin_fields() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("ticker"), dir.path().join("ticker.wasm")).unwrap();
    std::fs::write(dir.path().join("ticker.toml"), "name = \"beat\"\n").unwrap();
    let (mut child, rx) = run_host(dir.path(), &[]);
    let mut log = read_until(&mut child, &rx, "tick 1");
    interrupt(child, &rx, &mut log);
    let tick = log.lines().find(|l| l.contains("tick 1")).unwrap();
    assert!(tick.contains("routine=\"beat\" plugin=\"ticker\""), "{tick}");
}

#[test]
fn completions_name_the_subcommands_for_every_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(BIN).args(["completions", shell]).output().unwrap();
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains("gorch-host"), "{shell}: {out:?}");
    }
    let out = Command::new(BIN).args(["completions", "bash"]).output().unwrap();
    let bash = String::from_utf8_lossy(&out.stdout);
    assert!(bash.contains("complete -F _gorch__host"), "{bash}");
    for sub in ["run", "check", "ps", "publish", "send", "restart", "stop", "reload"] {
        assert!(bash.contains(&format!("gorch__host__subcmd__{sub}")), "{sub}:\n{bash}");
    }
    assert!(bash.contains("--log-format"), "{bash}");
    let bad = Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert!(!bad.status.success());
}

#[test]
fn a_bad_gorch_toml_is_named_as_the_directorys_file_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("ticker"), dir.path().join("ticker.wasm")).unwrap();
    std::fs::write(dir.path().join("gorch.toml"), "[groups.g]\nmembers = [\"ticker\"]\nx = 1\n")
        .unwrap();
    let (mut child, rx) = run_host(dir.path(), &[]);
    // The plugin still runs, on its own.
    let mut log = read_until(&mut child, &rx, "tick 1");
    interrupt(child, &rx, &mut log);
    let config = dir.path().join("gorch.toml");
    let want = format!(
        "invalid gorch.toml in the plugin directory: {}:3:1: unknown field `x`",
        config.display()
    );
    let line = log.lines().find(|l| l.contains("gorch.toml")).unwrap_or_default();
    assert!(line.contains(&want), "{want}\nnot in:\n{log}");
    assert!(line.contains("(groups ignored; every plugin starts on its own)"), "{line}");
    assert!(!line.contains("plugin failed"), "{line}");
}

/// Runs `gorch-host run --strict` on `dir` (one good plugin and a bad one, so that it
/// exits after start-up) under `script`, which gives it a terminal; returns its output.
fn run_on_a_terminal(dir: &std::path::Path) -> String {
    let cmd = format!(
        "{BIN} run --strict --no-cache --addr 127.0.0.1:0 {}",
        dir.display().to_string().replace('\'', "")
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .output()
        .expect("script (util-linux) runs a command on a terminal");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn start_up_shows_each_compile_on_a_terminal_and_one_line_per_plugin_in_logs() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
    std::fs::write(dir.path().join("bad.wasm"), b"garbage").unwrap();
    let wasm = dir.path().join("echo.wasm");
    let size = std::fs::metadata(&wasm).unwrap().len() as f64 / 1024.0;

    let tty = run_on_a_terminal(dir.path());
    assert!(tty.contains(&format!("loading {} ({size:.1} KiB)...", wasm.display())), "{tty}");
    assert!(tty.contains(&format!("loaded {} ({size:.1} KiB, compiled in ", wasm.display())));
    assert!(tty.contains(" ms) [") && tty.contains("/2]"), "{tty}");

    // Not a terminal: one line per plugin.
    let out = Command::new(BIN)
        .args(["run", "--strict", "--no-cache", "--addr", "127.0.0.1:0"])
        .arg(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("loading "), "{log}");
    assert_eq!(log.matches(&format!("loaded {} (", wasm.display())).count(), 1, "{log}");
}

/// Runs `f` with the binary's log format filtered by `filter`; returns the log.
fn capture(filter: &str, f: impl FnOnce()) -> String {
    capture_log(filter, f).1
}

#[test]
fn a_guest_panic_says_where_its_backtrace_is_instead_of_rust_backtrace() {
    let log = capture("info,gorch_host=debug", || {
        run_paused(async {
            let orch = Orchestrator::new();
            let h = spawn_mode(&orch, SpawnOptions::new("panicker"), "panic");
            assert_eq!(wait_end(&h, Duration::from_secs(30)).await, State::Panicked);
            assert!(last_error(&orch, "panicker").contains("testkit panic: kaboom"));
            shutdown(&orch).await;
        })
    });
    assert!(!log.contains("RUST_BACKTRACE=1"), "{log}");
    assert!(log.contains("panicked at"), "{log}");
    let note = log.lines().find(|l| l.contains("note: ")).expect("a note");
    assert!(note.contains("the guest's wasm backtrace is logged at debug level"), "{note}");
    assert!(note.contains("routine=\"panicker\""), "{note}");
    // ... and there it is: the guest's frames, innermost first, down to its `run`.
    let bt = log.lines().find(|l| l.contains("wasm backtrace: ")).expect("a backtrace line");
    assert!(bt.contains("DEBUG") && bt.contains("routine=\"panicker\""), "{bt}");
    assert!(bt.contains(" <- ") && bt.contains("run"), "{bt}");
}
