//! Guests in Python (`examples/guests-py`, componentize-py) and JavaScript
//! (`examples/guests-js`, componentize-js) through the real host: each beats, says hello on
//! a topic (JSON), echoes a message sent to its mailbox on its topic, and logs. The
//! components are built by `scripts/build-guests-{py,js}.sh` (run here when missing or
//! stale; a missing tool fails the test with the command that installs it) and compiled
//! once into a compile cache under the target directory, so only the first run pays for the
//! tens of seconds Cranelift takes on an 18 MB Python component.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use gorch_host::{
    EngineConfig, Message, Orchestrator, PluginManifest, State, WasmComponent, WasmEngine,
};

use crate::common::*;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A guest language other than Rust, and how its example is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Python,
    Js,
}

impl Lang {
    fn script(self) -> &'static str {
        match self {
            Lang::Python => "scripts/build-guests-py.sh",
            Lang::Js => "scripts/build-guests-js.sh",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Lang::Python => "apt-get install python3 python3-venv",
            Lang::Js => "apt-get install nodejs npm",
        }
    }

    /// The example's component (what the build script writes).
    pub fn example(self) -> PathBuf {
        match self {
            Lang::Python => repo_root().join("target/guests-py/echo-py.wasm"),
            Lang::Js => repo_root().join("target/guests-js/echo-js.wasm"),
        }
    }

    /// The build tool the example's script installed (for projects made by `new`).
    pub fn tool(self) -> PathBuf {
        match self {
            Lang::Python => repo_root().join("target/guests-py/venv/bin/componentize-py"),
            Lang::Js => repo_root().join("examples/guests-js/node_modules/.bin/componentize-js"),
        }
    }
}

/// Runs the example's build script once per test binary (it returns at once when the
/// component is up to date) and returns the component's path; panics with the script's
/// output and the install command if it fails.
pub fn build_example(lang: Lang) -> PathBuf {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static JS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cell = if lang == Lang::Python { &PY } else { &JS };
    let built = cell.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join(lang.script()))
            .current_dir(repo_root())
            .output()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}{}\ninstall the tools it needs ({}) and run it: {}",
                lang.script(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                lang.install_hint(),
                lang.script(),
            ));
        }
        Ok(lang.example())
    });
    match built {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// An engine with a compile cache under the target directory: the large Python and
/// JavaScript components are compiled once, later runs load them in milliseconds.
pub fn cached_engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gorch-compile-cache");
        WasmEngine::new(EngineConfig {
            pool_size: 20,
            cache_dir: Some(cache),
            ..Default::default()
        })
        .expect("engine")
    })
}

/// Runs `f` on a current-thread runtime (so the guests log on this thread) with a fmt
/// subscriber like the binary's as the thread's default; checks for leaked tasks; returns
/// `f`'s result and the log.
pub fn run_logged<F: std::future::Future>(f: F) -> (F::Output, String) {
    capture_log("info", || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let out = f.await;
            assert_no_leaked_tasks().await;
            out
        })
    })
}

/// Loads a component through the cached engine (compiling it the first time).
pub fn load(path: &Path) -> WasmComponent {
    cached_engine().load_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// How long a first (uncached) start may take on a loaded 2-core machine: a deadline, not
/// an expectation.
const PATIENCE: Duration = Duration::from_secs(120);

/// Spawns `component` as plugin `name` with the manifest defaults (as `gorch-host run`
/// would), then checks the worker's behaviour; returns the log.
fn exercise(component: &WasmComponent, name: &str, topic: &str, lang: &str) -> String {
    let manifest = PluginManifest::default();
    let ((), log) = run_logged(async {
        let orch = Orchestrator::new();
        let hello = orch.bus().topic("hello", 16).unwrap();
        let out = orch.bus().topic(topic, 16).unwrap();
        let h = orch
            .spawn_wasm(manifest.spawn_options(name.into()), component, manifest.wasm_options())
            .unwrap();

        // It says hello as JSON ...
        let m = hello.recv_timeout(PATIENCE).await.expect("no hello");
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v, serde_json::json!({"worker": name, "lang": lang}));

        // ... echoes its mailbox on its topic ...
        h.mailbox().send(Message::new(b"ping from the test".to_vec())).await.unwrap();
        let m = out.recv_timeout(PATIENCE).await.expect("no echo");
        assert_eq!(m.payload, b"ping from the test");

        // ... and beats while it waits (the host's own beat at the start of the run is not
        // enough: the last beat must be well after it).
        let beat = wait_until(PATIENCE, || {
            let s = h.snapshot();
            s.uptime_seconds - s.idle_seconds > 0.2
        })
        .await;
        assert!(beat, "no beat from the guest: {:?}", h.snapshot());
        assert_eq!(h.state(), State::Running, "{:?}", h.snapshot());

        // A stop request reaches it as Cancelled, which the helper layer turns into a clean
        // return.
        h.stop();
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(last_error(&orch, name), "");
        shutdown(&orch).await;
    });
    log
}

#[test]
fn python_guest_beats_echoes_its_mailbox_publishes_and_logs() {
    let component = load(&build_example(Lang::Python));
    let log = exercise(&component, "echo-py", "echo-py", "python");
    assert!(log.contains("echo-py starting (python, restarts: 0)"), "{log}");
    assert!(log.contains("first message echoed: 18 bytes"), "{log}");
}

#[test]
fn javascript_guest_beats_echoes_its_mailbox_publishes_and_logs() {
    let component = load(&build_example(Lang::Js));
    let log = exercise(&component, "echo-js", "echo-js", "javascript");
    assert!(log.contains("echo-js starting (javascript, restarts: 0)"), "{log}");
    assert!(log.contains("first message echoed: 18 bytes"), "{log}");
}
