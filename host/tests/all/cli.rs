//! The `gorch-host` binary: `run` on a directory with a good and a bad plugin, `check`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_gorch-host");

#[test]
fn run_starts_good_plugins_reports_bad_ones_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("ticker"), dir.path().join("ticker.wasm")).unwrap();
    std::fs::write(dir.path().join("ticker.toml"), "idle-timeout = \"10s\"\n").unwrap();
    // A plain WASI command: its stdout goes to the log, attributed to the routine.
    std::fs::copy(gorch_artifacts::path("hello-command"), dir.path().join("hello-command.wasm"))
        .unwrap();
    std::fs::write(dir.path().join("hello-command.toml"), "restart = \"never\"\n").unwrap();
    // Not wasm at all.
    std::fs::write(dir.path().join("broken.wasm"), b"garbage").unwrap();
    // A good component with a bad manifest.
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
    std::fs::write(dir.path().join("echo.toml"), "queue-capacity = 8\nbogus = true\n").unwrap();

    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--shutdown-timeout", "2s", "--cache-dir"])
        .arg(cache.path())
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(log.contains("tick 1") && log.contains("from a plain WASI command")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                log.push_str(&l);
                log.push('\n');
            }
            Err(_) => {
                let _ = child.kill();
                panic!("no tick and hello within 60 s; log so far:\n{log}");
            }
        }
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    reader.join().unwrap();
    log.extend(rx.try_iter().map(|l| l + "\n"));
    assert!(exit.success(), "exit {exit:?}; log:\n{log}");
    assert!(log.contains("broken.wasm: not a WebAssembly file"), "{log}");
    assert!(log.contains("echo.toml:2:1: unknown field `bogus`"), "{log}");
    assert!(log.contains("2 routine(s) running"), "{log}");
    let hello =
        log.lines().find(|l| l.contains("hello, world, from a plain WASI command")).unwrap();
    assert!(hello.contains("routine=\"hello-command\""), "{hello}");
    assert!(log.contains("stopped 1 routine(s)"), "{log}");
    // ticker and hello-command were compiled and stored for the next start.
    assert!(log.contains("0 of 2 component(s) from the compile cache"), "{log}");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 2);
}

#[test]
fn check_validates_components_and_prints_imports_and_exports() {
    let ok = Command::new(BIN)
        .args(["check", "--no-cache"])
        .arg(gorch_artifacts::path("ticker"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(out.contains("ok (gorch:worker/worker)"), "{out}");
    assert!(out.contains("import instance gorch:worker/runtime@0.1.0"), "{out}");
    assert!(out.contains("export func run"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0").unwrap();
    let res = Command::new(BIN).args(["check", "--no-cache"]).arg(&bad).output().unwrap();
    assert!(!res.status.success());
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(out.contains("bad.wasm: is a core wasm module"), "{out}");
}
