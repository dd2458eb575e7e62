//! `gorch-host new`: the real binary writes each language's project, the project's own
//! `build.sh` builds it (Rust: against the SDK copy written into the project, with no flag;
//! Python and JavaScript: with the tools the example build scripts installed), and the host
//! runs `plugins/NAME.wasm` with `plugins/NAME.toml` until the worker has beaten, logged and
//! published; then the project's README is followed with the real binary (`gorch-host
//! check`, `gorch-host run plugins/`, `gorch-host send NAME hello`), as a newcomer would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gorch_host::{Message, Orchestrator, PluginManifest, State};

use crate::common::fs::repo_root;
use crate::common::guests::{Lang, build_example, load, run_logged};
use crate::common::host::{BIN, port_of, read_until, spawn_logged, stop_cleanly, taken_by};
use crate::common::*;

/// Runs `gorch-host new` with `args` in `dir`.
fn new(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("new").args(args).current_dir(dir).output().expect("run gorch-host")
}

/// Generates project `name` in a fresh temporary directory; returns both.
fn generate(name: &str, lang: &str, extra: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut args = vec![name, "--lang", lang, "--dir", "projects"];
    args.extend_from_slice(extra);
    let out = new(tmp.path(), &args);
    assert!(
        out.status.success(),
        "gorch-host new failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tmp.path().join("projects").join(name);
    assert!(String::from_utf8_lossy(&out.stdout).contains("./build.sh"));
    (tmp, dir)
}

/// Runs the project's `build.sh` with `env`; panics with its output if it fails.
fn build(dir: &Path, env: &[(&str, &Path)], args: &[&str]) {
    let mut cmd = Command::new(dir.join("build.sh"));
    cmd.args(args).current_dir(dir);
    // What cargo set for this test binary is not for the project's own build.
    for k in ["RUSTC_WRAPPER", "RUSTC_WORKSPACE_WRAPPER", "RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run build.sh");
    assert!(
        out.status.success(),
        "{}/build.sh failed:\n{}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `plugins/NAME.wasm` as `gorch-host run` would (manifest from `plugins/NAME.toml`):
/// it must beat, log and publish JSON on `greetings` for a mailbox message.
fn run_project(dir: &Path, name: &str) {
    let manifest = PluginManifest::from_file(&dir.join(format!("plugins/{name}.toml"))).unwrap();
    let component = load(&dir.join(format!("plugins/{name}.wasm")));
    let ((), log) = run_logged(async {
        let orch = Orchestrator::new();
        let greetings = orch.bus().topic("greetings", 16).unwrap();
        let routine = manifest.routine_names(name).remove(0);
        let h = orch
            .spawn_wasm(
                manifest.spawn_options(routine.clone()),
                &component,
                manifest.wasm_options(),
            )
            .unwrap();
        h.mailbox().send(Message::new(b"hello".to_vec())).await.unwrap();
        let m = greetings.recv_timeout(Duration::from_secs(120)).await.expect("no greeting");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v, serde_json::json!({"from": routine, "text": "hello", "count": 1}));
        let beat = wait_until(Duration::from_secs(120), || {
            let s = h.snapshot();
            s.uptime_seconds - s.idle_seconds > 0.2
        })
        .await;
        assert!(beat, "no beat from the guest: {:?}", h.snapshot());
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(last_error(&orch, &routine), "");
        shutdown(&orch).await;
    });
    assert!(log.contains(&format!("{name} starting (restarts: 0)")), "{log}");
    assert!(log.contains("message 1: hello"), "{log}");
    follow_the_readme(dir, name);
}

/// The generated README's commands through the real binary: `check`, `run plugins/` and,
/// from "another terminal", `send NAME hello`, whose line the host's log shows.
fn follow_the_readme(dir: &Path, name: &str) {
    let wasm = dir.join(format!("plugins/{name}.wasm"));
    let out = Command::new(BIN).arg("check").arg(&wasm).output().unwrap();
    assert!(out.status.success(), "check: {}", String::from_utf8_lossy(&out.stderr));
    // A compile cache kept between runs (an 18 MB Python component compiles for a while).
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("new-project-cache");
    let args = ["run", "--addr", "127.0.0.1:0", "--cache-dir"].map(std::ffi::OsStr::new);
    let plugins = dir.join("plugins");
    let (mut host, rx) =
        spawn_logged(&[&args[..], &[cache.as_os_str(), plugins.as_os_str()]].concat());
    let port = port_of(&read_until(&mut host, &rx, "metrics: http://"));
    let addr = format!("127.0.0.1:{port}");
    let out = Command::new(BIN).args(["send", name, "hello", "--addr", &addr]).output().unwrap();
    assert!(out.status.success(), "send: {}", String::from_utf8_lossy(&out.stderr));
    read_until(&mut host, &rx, "message 1: hello");
    assert_eq!(taken_by(&port, name), 1);
    stop_cleanly(&mut host);
}

#[test]
fn a_new_rust_project_builds_with_no_flag_and_runs() {
    let _heavy = crate::common::heavy();
    let (_tmp, dir) = generate("job-producer", "rust", &[]);
    let cargo_toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(
        cargo_toml.contains("gorch-guest-sdk = { path = \"gorch-guest-sdk\" }"),
        "{cargo_toml}"
    );
    // The copy is the repository's SDK, WIT included.
    let copy = std::fs::read_to_string(dir.join("gorch-guest-sdk/src/lib.rs")).unwrap();
    let sdk = std::fs::read_to_string(repo_root().join("guest-sdk/src/lib.rs")).unwrap();
    assert_eq!(copy, sdk);
    assert!(dir.join("gorch-guest-sdk/wit/worker.wit").is_file());
    // A target directory kept between runs: the SDK and its dependencies build once.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("new-project-target");
    build(&dir, &[("CARGO_TARGET_DIR", &target)], &["--offline"]);
    // cargo's job_producer.wasm is copied to the plugin name the manifest expects.
    run_project(&dir, "job-producer");
}

#[test]
fn a_new_python_project_builds_and_runs() {
    let _heavy = crate::common::heavy();
    build_example(Lang::Python); // installs componentize-py under target/
    let (_tmp, dir) = generate("py-hello", "python", &[]);
    build(&dir, &[("COMPONENTIZE_PY", &Lang::Python.tool())], &[]);
    run_project(&dir, "py-hello");
}

#[test]
fn a_new_javascript_project_builds_and_runs() {
    let _heavy = crate::common::heavy();
    build_example(Lang::Js); // installs componentize-js under examples/guests-js
    let (_tmp, dir) = generate("js-hello", "js", &[]);
    build(&dir, &[("COMPONENTIZE_JS", &Lang::Js.tool())], &[]);
    run_project(&dir, "js-hello");
}

#[test]
fn sdk_path_points_the_dependency_elsewhere_and_the_readme_says_how() {
    let sdk = repo_root().join("guest-sdk");
    let (_tmp, other) = generate("other", "rust", &["--sdk-path", sdk.to_str().unwrap()]);
    let cargo_toml = std::fs::read_to_string(other.join("Cargo.toml")).unwrap();
    let expected = format!("gorch-guest-sdk = {{ path = {:?} }}", sdk.to_str().unwrap());
    assert!(cargo_toml.contains(&expected), "{cargo_toml}");
    assert!(!other.join("gorch-guest-sdk").exists(), "no copy with --sdk-path");
    let (_tmp, dir) = generate("hello", "rust", &[]);
    // Checked before it is built: the check says how to build it.
    let out = Command::new(BIN)
        .args(["check", "--no-cache", "plugins/hello.wasm"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(text.contains("not built yet: run ./build.sh first"), "{text}");
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for cmd in ["./build.sh", "gorch-host check plugins/hello.wasm", "gorch-host run plugins/"] {
        assert!(readme.contains(cmd), "README lacks {cmd:?}:\n{readme}");
    }
}

#[test]
fn the_manifest_lists_every_key_commented_with_its_default() {
    for lang in ["rust", "python", "js"] {
        let (_tmp, dir) = generate("keys", lang, &[]);
        let path = dir.join("plugins/keys.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        // As generated: every line a comment, so the manifest is the defaults.
        assert_eq!(PluginManifest::from_str(&path, &text).unwrap(), PluginManifest::default());
        // Uncommented, every key parses and shows the default.
        let uncommented: String = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with('[') || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let all = PluginManifest::from_str(&path, &uncommented)
            .unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        let expected = PluginManifest { name: Some("keys".into()), ..Default::default() };
        assert_eq!(all, expected, "{uncommented}");
        for key in [
            "name",
            "instances",
            "restart",
            "idle-timeout",
            "queue-capacity",
            "max-deliveries",
            "rollback-window",
            "[backoff]",
            "initial",
            "max",
            "multiplier",
            "jitter",
            "stable-after",
            "[intensity]",
            "max-restarts",
            "within",
            "[limits]",
            "memory",
            "fuel",
            "message-bytes",
            "[wasi]",
            "env",
            "args",
        ] {
            let line = if key.starts_with('[') { key.to_string() } else { format!("{key} = ") };
            assert!(uncommented.lines().any(|l| l.starts_with(&line)), "{key} missing");
        }
    }
}

#[test]
fn new_refuses_bad_names_and_existing_directories() {
    let tmp = tempfile::tempdir().unwrap();
    for bad in ["9lives", "has space", "a/b", "x\u{202e}y", ""] {
        let out = new(tmp.path(), &[bad]);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid name"), "{bad:?}");
    }
    std::fs::create_dir(tmp.path().join("taken")).unwrap();
    std::fs::write(tmp.path().join("taken/keep.txt"), "mine").unwrap();
    let out = new(tmp.path(), &["taken", "--lang", "python"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read_to_string(tmp.path().join("taken/keep.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_dir(tmp.path().join("taken")).unwrap().count(), 1);
}
