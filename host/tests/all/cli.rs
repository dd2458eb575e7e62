//! The `gorch-host` binary: `run` on a directory with a good and a bad plugin, `check`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::guests::slow_component;
use crate::common::host::{
    BIN, http_get, port_of, read_until, run_host, spawn_command, spawn_logged, stop_cleanly,
};
use crate::common::wait_until_blocking;

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
    let (mut child, rx) = spawn_logged(&[
        "run".as_ref(),
        "--shutdown-timeout".as_ref(),
        "2s".as_ref(),
        "--cache-dir".as_ref(),
        cache.path().as_os_str(),
        dir.path().as_os_str(),
    ]);
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
    log.extend(rx.iter().map(|l| l + "\n"));
    assert!(exit.success(), "exit {exit:?}; log:\n{log}");
    assert!(log.contains("broken.wasm: not a WebAssembly file"), "{log}");
    assert!(log.contains("echo.toml:2:1: unknown field `bogus`"), "{log}");
    assert!(log.contains("2 routine(s) of 2 plugin(s) running"), "{log}");
    assert!(log.contains("(2 failed: see /readyz)"), "{log}");
    let hello =
        log.lines().find(|l| l.contains("hello, world, from a plain WASI command")).unwrap();
    assert!(hello.contains("routine=\"hello-command\""), "{hello}");
    // ticker, and hello-command when the signal came between its line and its end.
    let stopped = log.contains("stopped 1 routine(s)") || log.contains("stopped 2 routine(s)");
    assert!(stopped, "{log}");
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

/// `check` parses the manifest beside a component as `run` would: a bad one fails the check
/// naming its file and key, a good one is compiled for its `metering`.
#[test]
fn check_validates_the_manifest_beside_a_component() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("calc.wasm");
    std::fs::copy(gorch_artifacts::path("testkit"), &wasm).unwrap();
    let toml = dir.path().join("calc.toml");
    let check = || Command::new(BIN).args(["check", "--no-cache"]).arg(&wasm).output().unwrap();

    std::fs::write(&toml, "[limits]\nmetering = \"time\"\nfuel = 1000\n").unwrap();
    let res = check();
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(!res.status.success(), "{out}");
    assert!(out.contains("calc.toml:"), "{out}");
    assert!(out.contains("limits.fuel = 1000 needs limits.metering = \"fuel\""), "{out}");

    std::fs::write(&toml, "[limits]\nmetering = \"cpu\"\n").unwrap();
    let res = check();
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(!res.status.success() && out.contains("unknown variant `cpu`"), "{out}");

    std::fs::write(&toml, "[limits]\nmetering = \"time\"\n").unwrap();
    let res = check();
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{out}");
    assert!(out.contains("calc.toml: ok") && out.contains("calc.wasm: ok"), "{out}");
}

#[test]
fn a_signal_during_start_up_stops_gracefully_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a-slow.wasm"), slow_component()).unwrap();
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
    let (mut child, rx) = run_host(dir.path(), &[]);
    // echo is loaded (and started) while the slow plugin still compiles.
    let mut log = read_until(&mut child, &rx, "echo.wasm (");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    log.extend(rx.iter().map(|l| l + "\n"));
    assert!(exit.success(), "exit {exit:?}; log:\n{log}");
    assert!(log.contains("signal during start-up"), "{log}");
    // ticker, and hello-command when the signal came between its line and its end.
    let stopped = log.contains("stopped 1 routine(s)") || log.contains("stopped 2 routine(s)");
    assert!(stopped, "{log}");
}

#[test]
fn strict_exits_non_zero_naming_the_plugins_that_failed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
    std::fs::write(dir.path().join("bad.wasm"), b"garbage").unwrap();
    let out = Command::new(BIN)
        .args(["run", "--strict", "--no-cache", "--addr", "127.0.0.1:0"])
        .arg(dir.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--strict: 1 plugin(s) failed to load"), "{err}");
    assert!(err.contains("bad.wasm: ") && err.contains("not a WebAssembly file"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["run", "--strict", "--no-cache", "--addr", "127.0.0.1:0"])
        .arg(empty.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--strict: no *.wasm components in"), "{err}");
}

/// Runs a client command of the binary; returns (success, stdout, stderr).
fn client(args: &[&str], stdin: Option<&[u8]>) -> (bool, String, String) {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .env_remove("GORCH_TOKEN")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn publish_send_restart_stop_and_ps_act_on_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
    // A manifest allowing huge messages does not raise the body limit past --max-body.
    std::fs::write(dir.path().join("echo.toml"), "[limits]\nmessage-bytes = \"4GiB\"\n").unwrap();
    let (mut child, rx) = run_host(dir.path(), &["--max-body", "1KiB"]);
    let log = read_until(&mut child, &rx, "metrics: http://");
    let port = log
        .rsplit("metrics: http://127.0.0.1:")
        .next()
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    // Host names work as well as addresses.
    let addr = format!("localhost:{port}");
    let a = ["--addr", addr.as_str()];

    let (ok, out, err) = client(&["send", "echo", "hello", a[0], a[1]], None);
    assert!(ok, "{err}");
    assert!(out.contains("sent 5 byte(s) to \"echo\""), "{out}");
    let (ok, out, err) = client(&["publish", "jobs", a[0], a[1]], Some(b"from stdin"));
    assert!(ok, "{err}");
    assert!(out.contains("published 10 byte(s) on \"jobs\" (queue length 1)"), "{out}");
    let (ok, out, err) = client(&["restart", "echo", a[0], a[1]], None);
    assert!(ok && out.contains("restart requested for \"echo\""), "{out}{err}");
    let (ok, out, err) = client(&["ps", a[0], a[1]], None);
    assert!(ok && out.contains("echo"), "{out}{err}");

    let (ok, _, err) = client(&["stop", "nobody", a[0], a[1]], None);
    assert!(!ok);
    assert!(err.contains("HTTP 404 Not Found: no routine named \"nobody\""), "{err}");
    let (ok, _, err) = client(&["publish", "jobs", a[0], a[1]], Some(&[b'x'; 2048]));
    assert!(!ok && err.contains("larger than the limit of 1024 bytes"), "{err}");
    let (ok, _, err) = client(&["publish", "bad topic", "x", a[0], a[1]], None);
    assert!(!ok && err.contains("invalid topic name \"bad topic\""), "{err}");
    let (ok, _, err) = client(&["ps", "--addr", "127.0.0.1"], None);
    assert!(!ok && err.contains("expected HOST:PORT"), "{err}");
    let (ok, _, err) = client(&["ps", "--addr", "127.0.0.1:1"], None);
    assert!(!ok && err.contains("cannot reach a gorch-host at 127.0.0.1:1"), "{err}");

    let (ok, out, err) = client(&["stop", "echo", a[0], a[1]], None);
    assert!(ok && out.contains("stop requested for \"echo\""), "{out}{err}");
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    assert!(child.wait().unwrap().success());
}

/// The version of routine `name` in the host's JSON API.
fn version_of(port: &str, name: &str) -> String {
    let snaps: Vec<gorch_host::Snapshot> =
        serde_json::from_str(&http_get(port, "/gorchestra/api/routines")).unwrap();
    snaps.into_iter().find(|s| s.name == name).map(|s| s.version).unwrap_or_default()
}

fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    assert!(wait_until_blocking(Duration::from_secs(60), cond), "timed out waiting for {what}");
}

#[test]
fn watch_sighup_and_reload_upgrade_a_running_host() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let testkit = std::fs::read(gorch_artifacts::path("testkit")).unwrap();
    let echo = std::fs::read(gorch_artifacts::path("echo")).unwrap();
    std::fs::write(d.join("svc.wasm"), &testkit).unwrap();
    std::fs::write(d.join("svc.toml"), "[wasi]\nenv = { MODE = \"echo\" }\n").unwrap();
    let (mut child, rx) = run_host(d, &["--watch"]);
    let port = port_of(&read_until(&mut child, &rx, "metrics: http://"));
    let addr = format!("127.0.0.1:{port}");
    let v1 = version_of(&port, "svc");
    assert_eq!(v1.len(), 12);

    // --watch: a new version written the way deploy tools do (temporary file + rename).
    let tmp = d.join(".svc.wasm.part");
    std::fs::write(&tmp, &echo).unwrap();
    std::fs::rename(&tmp, d.join("svc.wasm")).unwrap();
    wait_for("the upgrade by --watch", || version_of(&port, "svc") != v1);
    let v2 = version_of(&port, "svc");

    // `gorch-host reload`: nothing changed; then a broken plugin is named and refused.
    let (ok, out, err) = client(&["reload", "--addr", &addr], None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("unchanged") && out.contains("svc.wasm"), "{out}");
    std::fs::write(d.join("bad.wasm"), b"garbage").unwrap();
    let (ok, out, err) = client(&["reload", "--addr", &addr], None);
    assert!(!ok, "{out}");
    assert!(err.contains("1 plugin(s) failed to reload") && err.contains("bad.wasm"), "{err}");
    std::fs::remove_file(d.join("bad.wasm")).unwrap();

    // SIGHUP applies the directory too.
    std::fs::write(&tmp, &testkit).unwrap();
    std::fs::rename(&tmp, d.join("svc.wasm")).unwrap();
    let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    read_until(&mut child, &rx, "SIGHUP: applying the plugin directory");
    wait_for("the upgrade back to v1", || version_of(&port, "svc") == v1);
    assert_ne!(v1, v2);
    let snaps = http_get(&port, "/gorchestra/api/routines");
    assert!(snaps.contains("\"upgrades\":2"), "{snaps}");
    let metrics = http_get(&port, "/metrics");
    assert!(metrics.contains("gorch_routine_upgrades_total{name=\"svc\"} 2"), "{metrics}");
    // A SIGHUP that changes nothing still logs its result.
    let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    read_until(&mut child, &rx, "reload: 1 plugin(s): 1 unchanged");

    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    let rest = rx.iter().collect::<Vec<_>>().join("\n");
    assert!(exit.success(), "exit {exit:?}; the log after the last upgrade:\n{rest}");
}

/// The status and body of GET /readyz.
fn readyz(port: &str) -> (u16, String) {
    crate::common::host::http_request(port, "GET", "/readyz", &[], "")
}

#[test]
fn two_plugins_asking_for_one_routine_name_are_a_failed_plugin_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let idler = std::fs::read(gorch_artifacts::path("idler")).unwrap();
    let echo = std::fs::read(gorch_artifacts::path("echo")).unwrap();
    let ticker = std::fs::read(gorch_artifacts::path("ticker")).unwrap();
    std::fs::write(d.join("relay.wasm"), &idler).unwrap();
    let (mut child, rx) = run_host(d, &[]);
    let port = port_of(&read_until(&mut child, &rx, "metrics: http://"));
    let addr = format!("127.0.0.1:{port}");
    let v1 = version_of(&port, "relay");

    // A second plugin asking for the running name: refused, in the report and on /readyz,
    // naming both files; relay's routine is untouched.
    std::fs::write(d.join("dup.wasm"), &echo).unwrap();
    std::fs::write(d.join("dup.toml"), "name = \"relay\"\n").unwrap();
    let (ok, out, err) = client(&["reload", "--addr", &addr], None);
    assert!(!ok, "{out}");
    assert!(err.contains("dup.wasm") && err.contains("relay.wasm (running)"), "{err}");
    let (status, body) = readyz(&port);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("dup.wasm") && body.contains("already taken by"), "{body}");
    // A new version of the refused file does not upgrade relay.
    std::fs::write(d.join("dup.wasm"), &ticker).unwrap();
    let (ok, _, err) = client(&["reload", "--addr", &addr], None);
    assert!(!ok && err.contains("already taken by"), "{err}");
    assert_eq!(version_of(&port, "relay"), v1);

    // Removing the refused plugin leaves relay running and the host ready.
    std::fs::remove_file(d.join("dup.wasm")).unwrap();
    std::fs::remove_file(d.join("dup.toml")).unwrap();
    let (ok, out, err) = client(&["reload", "--addr", &addr], None);
    assert!(ok, "{out}{err}");
    assert_eq!(version_of(&port, "relay"), v1);
    assert_eq!(readyz(&port), (200, "ready\n".to_string()));

    // Once relay.wasm is gone, the other plugin may take the name.
    std::fs::remove_file(d.join("relay.wasm")).unwrap();
    std::fs::write(d.join("dup.wasm"), &echo).unwrap();
    std::fs::write(d.join("dup.toml"), "name = \"relay\"\n").unwrap();
    let (ok, out, err) = client(&["reload", "--addr", &addr], None);
    assert!(ok, "{out}{err}");
    let v2 = version_of(&port, "relay");
    assert!(!v2.is_empty() && v2 != v1, "{v2}");
    stop_cleanly(&mut child);

    // At start-up the first file in name order keeps the name, whichever compiles first.
    std::fs::write(d.join("relay.wasm"), &idler).unwrap();
    let (mut child, rx) = run_host(d, &[]);
    let port = port_of(&read_until(&mut child, &rx, "metrics: http://"));
    assert_eq!(version_of(&port, "relay"), v2);
    let (status, body) = readyz(&port);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("relay.wasm") && body.contains("first in file order"), "{body}");
    stop_cleanly(&mut child);
}

/// How many messages were published on `topic` of the host on `port`.
fn published(port: &str, topic: &str) -> u64 {
    let topics: serde_json::Value =
        serde_json::from_str(&http_get(port, "/gorchestra/api/topics")).unwrap();
    let found = topics.as_array().unwrap().iter().find(|t| t["name"] == topic);
    found.map_or(0, |t| t["published"].as_u64().unwrap())
}

#[test]
fn an_upgrade_that_crash_loops_is_rolled_back_with_its_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // relay republishes its mailbox on the `echo` topic; it gives up after 3 quick failures.
    let echo = std::fs::read(gorch_artifacts::path("echo")).unwrap();
    // testkit in mode `recv` takes a message and fails: a version that loads but crashes
    // on every message (the echo guest ignores the mode).
    let crashes = std::fs::read(gorch_artifacts::path("testkit")).unwrap();
    std::fs::write(d.join("relay.wasm"), &echo).unwrap();
    let manifest = "queue-capacity = 1000\n[backoff]\ninitial = \"10ms\"\nmax = \"20ms\"\n\
                    [intensity]\nmax-restarts = 2\nwithin = \"1m\"\n\
                    [wasi]\nenv = { MODE = \"recv\" }\n";
    std::fs::write(d.join("relay.toml"), manifest).unwrap();
    let (mut child, rx) = run_host(d, &[]);
    let port = port_of(&read_until(&mut child, &rx, "metrics: http://"));
    let addr = format!("127.0.0.1:{port}");
    let send = |i: usize| {
        let (ok, out, err) = client(&["send", "relay", &format!("m{i}"), "--addr", &addr], None);
        assert!(ok, "send m{i}: {out}{err}");
    };
    let v1 = version_of(&port, "relay");
    for i in 0..20 {
        send(i);
    }
    wait_for("the first 20 echoed", || published(&port, "echo") == 20);

    // The crashing version goes in; messages keep coming while it fails.
    std::fs::write(d.join("relay.wasm"), &crashes).unwrap();
    let (ok, out, err) = client(&["reload", "--addr", &addr], None);
    assert!(ok && out.contains("upgraded"), "{out}{err}");
    for i in 20..60 {
        send(i);
    }
    // It gives up, the previous version comes back with the mailbox: nothing is lost, and
    // the message it crashed on (three times, max-deliveries) was not used up.
    wait_for("the rollback", || version_of(&port, "relay") == v1);
    wait_for("all 60 echoed", || published(&port, "echo") == 60);
    assert_eq!(published(&port, "dead-letter"), 0);
    read_until(&mut child, &rx, "rolled back");
    let snaps: Vec<gorch_host::Snapshot> =
        serde_json::from_str(&http_get(&port, "/gorchestra/api/routines")).unwrap();
    let relay = snaps.iter().find(|s| s.name == "relay").unwrap();
    assert!(relay.last_error.as_deref().unwrap_or("").contains("rolled back"), "{relay:?}");
    let history = http_get(&port, "/gorchestra/api/history");
    assert!(history.contains("rolled back"), "{history}");
    // The bad version is not tried again until its file changes; the report says why.
    let (ok, out, err) = client(&["reload", "--addr", &addr], None);
    assert!(ok, "{out}{err}");
    assert!(out.contains("unchanged") && out.contains("gave up after its upgrade"), "{out}");
    assert_eq!(version_of(&port, "relay"), v1);
    stop_cleanly(&mut child);
}

/// The names of the live routines of the host on `port`.
fn routine_names(port: &str) -> Vec<String> {
    let snaps: Vec<gorch_host::Snapshot> =
        serde_json::from_str(&http_get(port, "/gorchestra/api/routines")).unwrap();
    snaps.into_iter().map(|s| s.name).collect()
}

#[test]
fn watch_applies_under_constant_writes_and_follows_a_replaced_directory() {
    let root = tempfile::tempdir().unwrap();
    let d = root.path().join("plugins");
    std::fs::create_dir(&d).unwrap();
    let idler = std::fs::read(gorch_artifacts::path("idler")).unwrap();
    let echo = std::fs::read(gorch_artifacts::path("echo")).unwrap();
    std::fs::write(d.join("svc.wasm"), &idler).unwrap();
    std::fs::write(d.join("svc.toml"), "queue-capacity = 16\n").unwrap();
    let (mut child, rx) = run_host(&d, &["--watch"]);
    let port = port_of(&read_until(&mut child, &rx, "metrics: http://"));
    let v1 = version_of(&port, "svc");

    // Noise every 20 ms: a log file (not watched) and the manifest rewritten unchanged
    // (watched): the directory is never quiet, and the change still lands.
    let noise_on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let noise = {
        let (d, on) = (d.clone(), noise_on.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let _ = std::fs::write(d.join("app.log"), format!("line {n}\n"));
                let _ = std::fs::write(d.join("svc.toml"), "queue-capacity = 16\n");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let tmp = d.join(".svc.wasm.part");
    std::fs::write(&tmp, &echo).unwrap();
    std::fs::rename(&tmp, d.join("svc.wasm")).unwrap();
    wait_for("the upgrade under constant writes", || version_of(&port, "svc") != v1);
    noise_on.store(false, std::sync::atomic::Ordering::Relaxed);
    noise.join().unwrap();

    // The directory replaced by another: the watcher follows it and applies it.
    std::fs::rename(&d, root.path().join("plugins.old")).unwrap();
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("other.wasm"), &idler).unwrap();
    read_until(&mut child, &rx, "was replaced: watching the new directory");
    wait_for("the new directory applied", || routine_names(&port) == ["other"]);
    // Removed and made again (the new directory may get the old one's inode number).
    std::fs::remove_dir_all(&d).unwrap();
    std::fs::create_dir(&d).unwrap();
    std::fs::write(d.join("third.wasm"), &idler).unwrap();
    read_until(&mut child, &rx, "was replaced: watching the new directory");
    wait_for("the remade directory applied", || routine_names(&port) == ["third"]);
    stop_cleanly(&mut child);
}

#[test]
fn plugins_load_smallest_first() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // testkit is about three times the size of the others: it is loaded last whatever its
    // name, so the small plugins never wait behind a large compile.
    let big = "a-big";
    std::fs::copy(gorch_artifacts::path("testkit"), d.join(format!("{big}.wasm"))).unwrap();
    std::fs::write(d.join(format!("{big}.toml")), "[wasi]\nenv = { MODE = \"idle\" }\n").unwrap();
    let small = ["idler", "ticker", "echo", "spinner", "producer"];
    for name in small {
        std::fs::copy(gorch_artifacts::path(name), d.join(format!("{name}.wasm"))).unwrap();
    }
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--no-cache", "--addr", "127.0.0.1:0"]).arg(d);
    let (mut child, rx) =
        spawn_command(cmd.env("RUST_LOG", "info,gorch_host::plugin::start=debug"));
    let log = read_until(&mut child, &rx, "metrics: http://");
    let order: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("loading ").nth(1))
        .filter_map(|rest| rest.split(".wasm").next())
        .filter_map(|p| p.rsplit('/').next())
        .collect();
    assert_eq!(order.len(), small.len() + 1, "{log}");
    assert_eq!(order.last(), Some(&big), "{log}");
    stop_cleanly(&mut child);
}

#[test]
fn slow_clients_cannot_starve_health_checks_or_reloads_under_a_low_descriptor_limit() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("idler"), dir.path().join("idle.wasm")).unwrap();
    // 128 descriptors: the server keeps at most 64 connections.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "ulimit -n 128 && exec \"$0\" \"$@\"", BIN, "run", "--no-cache"]);
    cmd.args(["--addr", "127.0.0.1:0", "--request-timeout", "2s"]).arg(dir.path());
    let (mut child, rx) = spawn_command(cmd.env("RUST_LOG", "info"));
    let port = port_of(&read_until(&mut child, &rx, "metrics: http://"));
    // 100 clients that send their headers and one byte of a 100-byte body, then nothing.
    let slow: Vec<std::net::TcpStream> = (0..100)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
            let head = format!(
                "POST /gorchestra/api/topics/slow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
                 X-Gorch-Request: 1\r\nContent-Length: 100\r\n\r\na"
            );
            s.write_all(head.as_bytes()).unwrap();
            s
        })
        .collect();
    // A health check and a reload are still served.
    assert_eq!(http_get(&port, "/healthz").trim(), "ok");
    let status = Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    read_until(&mut child, &rx, "reload: 1 plugin(s): 1 unchanged");
    // Every slow client is cut off: evicted for newer ones, or at the request timeout (408).
    let mut timed_out = 0;
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf); // EOF (or a reset) ends it; a hang fails the test
        timed_out += usize::from(buf.starts_with(b"HTTP/1.1 408"));
    }
    assert!(timed_out > 0, "no slow client got 408");
    stop_cleanly(&mut child);
}

#[test]
fn request_bodies_being_read_are_bounded_in_bytes() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("idler"), dir.path().join("idle.wasm")).unwrap();
    // Messages up to 16 MiB (then --max-body's default is the limit).
    std::fs::write(dir.path().join("idle.toml"), "[limits]\nmessage-bytes = \"16MiB\"\n").unwrap();
    let (mut child, rx) = run_host(dir.path(), &[]);
    let port = port_of(&read_until(&mut child, &rx, "metrics: http://"));
    // Five clients announce 15 MiB bodies and send one byte: four fit in the 64 MiB being
    // read at once, one is refused at once, before any of its body is read.
    let clients: Vec<std::net::TcpStream> = (0..5)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
            let head = format!(
                "POST /gorchestra/api/topics/big HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\
                 Content-Length: 15728640\r\n\r\na"
            );
            s.write_all(head.as_bytes()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        })
        .collect();
    let refused = clients
        .into_iter()
        .filter_map(|mut s| {
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).ok().map(|()| buf)
        })
        .filter(|b| b.starts_with(b"HTTP/1.0 503"))
        .count();
    assert_eq!(refused, 1);
    stop_cleanly(&mut child);
}
