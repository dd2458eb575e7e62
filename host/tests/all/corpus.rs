//! The hostile corpus, all at once: one plugin directory holding two good plugins beside a
//! memory bomb, a stack overflow, a `loop {}` without host calls, a topic flood, an
//! oversized message, a sandbox escape attempt, log forgery, garbage, a core module, special
//! files, a plugin claiming another's routine name and a copy of every invalid manifest of `tests/manifests/invalid`, started the way
//! `gorch-host run` starts a directory (`PluginDir::scan`, then `start_plugins`).
//!
//! The host must stay up, the good plugins must keep answering while the hostile ones crash
//! and restart, every bad file must be on the board with an error naming it, every hostile
//! routine must end (or block) the way its kind of attack should, and the shutdown must stop
//! everything. The separate tests of each attack are in `wasm.rs`, `messaging.rs`,
//! `hostile_files.rs`, `hostile_logs.rs` and `manifest.rs`; this one checks that they do not
//! interfere.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gorch_host::defaults::DEFAULT_TOPIC_CAPACITY;
use gorch_host::plugin::{LoadState, PluginBoard, PluginStatus, start_plugins};
use gorch_host::{Message, Orchestrator, PluginDir, Snapshot, State};
use tokio_util::sync::CancellationToken;

use crate::common::*;

/// Supervision of every hostile plugin: restart on failure twice, 200 ms apart, then give
/// up. Each lives long enough (two backoffs at least) to be seen restarting, and ends.
const SUPERVISION: &str = "[backoff]\ninitial = \"200ms\"\nmax = \"200ms\"\njitter = 0.0\n\
                           [intensity]\nmax-restarts = 2\nwithin = \"10m\"\n";

/// How a hostile routine must end.
enum End {
    /// `FAILED` after giving up, the last run's error containing the text.
    GaveUp(&'static str),
    /// `STOPPED`: the attack did nothing (the sandbox held, the forged lines were logged as
    /// the guest's).
    Stopped,
    /// Still `RUNNING`, blocked by the host (the flood, at the topic's capacity).
    Blocked,
}

/// A testkit copy in a hostile mode.
struct Hostile {
    /// File stem and routine name.
    name: &'static str,
    /// Manifest lines before the tables (`idle-timeout`).
    top: &'static str,
    /// `[limits]` lines.
    limits: &'static str,
    /// The `[wasi] env` table's entries (after `MODE`).
    env: &'static str,
    end: End,
}

const HOSTILE: &[Hostile] = &[
    Hostile {
        name: "memhog",
        top: "",
        limits: "memory = \"16MiB\"",
        env: "MODE = \"memhog\"",
        end: End::GaveUp("memory allocation of"),
    },
    Hostile {
        name: "stack",
        top: "",
        limits: "",
        env: "MODE = \"stack-overflow\"",
        end: End::GaveUp("call stack exhausted"),
    },
    Hostile {
        name: "spin",
        top: "idle-timeout = \"100ms\"",
        limits: "",
        env: "MODE = \"spin\"",
        end: End::GaveUp("idle timeout: no beat for"),
    },
    Hostile {
        name: "huge",
        top: "",
        limits: "memory = \"256MiB\"",
        env: "MODE = \"huge\"",
        end: End::GaveUp("payload too large (limit 1048576 bytes)"),
    },
    Hostile {
        name: "flood",
        top: "",
        limits: "",
        env: "MODE = \"flood\", TOPIC = \"flood\", COUNT = \"100000\", SIZE = \"1024\"",
        end: End::Blocked,
    },
    Hostile { name: "sandbox", top: "", limits: "", env: "MODE = \"sandbox\"", end: End::Stopped },
    Hostile { name: "forge", top: "", limits: "", env: "MODE = \"forge\"", end: End::Stopped },
];

/// The manifest of a hostile plugin.
fn manifest(h: &Hostile) -> String {
    format!("{}\n{SUPERVISION}[limits]\n{}\n[wasi]\nenv = {{ {} }}\n", h.top, h.limits, h.env)
}

/// A file that must be reported as failed: the board entry's file, and a part of the error
/// after the file's name.
struct Bad {
    file: PathBuf,
    error: String,
}

/// Writes the corpus into `dir`; returns the bad files it holds.
fn write_corpus(dir: &Path) -> Vec<Bad> {
    let testkit = gorch_artifacts::path("testkit");
    // The good: the echo example, and a testkit copy echoing to `testkit-out`.
    std::fs::copy(gorch_artifacts::path("echo"), dir.join("echo.wasm")).unwrap();
    std::fs::copy(&testkit, dir.join("good.wasm")).unwrap();
    std::fs::write(dir.join("good.toml"), "[wasi]\nenv = { MODE = \"echo\" }\n").unwrap();
    for h in HOSTILE {
        std::fs::copy(&testkit, dir.join(format!("{}.wasm", h.name))).unwrap();
        std::fs::write(dir.join(format!("{}.toml", h.name)), manifest(h)).unwrap();
    }
    let mut bad = Vec::new();
    let mut file = |name: &str, bytes: &[u8], error: &str| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        bad.push(Bad { file: path, error: error.to_string() });
    };
    file("junk.wasm", b"MZ\x90\0 this is not wasm", "not a WebAssembly file (bad magic number)");
    file("core.wasm", b"\0asm\x01\0\0\0", "is a core wasm module, not a component");
    // A component that stops in the middle of a section.
    file("cut.wasm", b"\0asm\x0d\0\x01\0\x01\x7f", "");
    // An orphan manifest.
    file("orphan.toml", b"instances = 1\n", "manifest without a component");
    // A plugin asking for the routine name of another (echo.wasm, first in file order).
    std::fs::write(dir.join("zz-clash.toml"), "name = \"echo\"\n").unwrap();
    file(
        "zz-clash.wasm",
        &std::fs::read(&testkit).unwrap(),
        "routine name \"echo\" is already taken by",
    );
    // Every invalid manifest value, each beside a component that would run.
    let invalid = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/invalid");
    let mut tomls: Vec<PathBuf> = std::fs::read_dir(&invalid)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    tomls.sort();
    assert!(tomls.len() > 10, "{tomls:?}");
    for toml in tomls {
        let stem = toml.file_stem().unwrap().to_str().unwrap();
        let path = dir.join(format!("bad-{stem}.toml"));
        std::fs::copy(&testkit, dir.join(format!("bad-{stem}.wasm"))).unwrap();
        std::fs::copy(&toml, &path).unwrap();
        // The golden error names `invalid/NAME.toml`: here it names the copy.
        let golden = std::fs::read_to_string(toml.with_extension("err")).unwrap_or_default();
        let error = golden
            .trim_end()
            .strip_prefix(&format!("invalid/{stem}.toml"))
            .map(str::to_string)
            .unwrap_or_default();
        bad.push(Bad { file: path, error });
    }
    special_files(dir, &mut bad);
    bad
}

/// A FIFO, a symlink to `/dev/zero` and a directory, each named like a plugin.
#[cfg(unix)]
fn special_files(dir: &Path, bad: &mut Vec<Bad>) {
    let fifo = dir.join("fifo.wasm");
    let ok = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success();
    assert!(ok, "mkfifo");
    bad.push(Bad { file: fifo, error: ": not a regular file (a FIFO)".into() });
    let zero = dir.join("zero.wasm");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    bad.push(Bad { file: zero, error: ": not a regular file (a character device)".into() });
    let sub = dir.join("sub.wasm");
    std::fs::create_dir(&sub).unwrap();
    bad.push(Bad { file: sub, error: ": not a regular file (a directory)".into() });
}

#[cfg(not(unix))]
fn special_files(_dir: &Path, _bad: &mut Vec<Bad>) {}

/// Sends `payload` to the mailbox of `routine` and waits (bounded) for it on `topic`.
async fn ask(orch: &Orchestrator, routine: &str, topic: &str, payload: String) {
    let out = orch.bus().topic(topic, 64).unwrap();
    let h = orch.get_by_name(routine).unwrap_or_else(|| panic!("{routine} is gone"));
    // Spawned is not yet running on a loaded machine: wait (bounded) for its first run.
    let running =
        crate::common::wait_until(Duration::from_secs(10), || h.state() == State::Running);
    assert!(running.await, "{routine}: {:?}", h.snapshot());
    tokio::time::timeout(Duration::from_secs(10), h.mailbox().send(Message::new(payload.clone())))
        .await
        .unwrap_or_else(|_| panic!("{routine}: mailbox full"))
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), out.recv())
        .await
        .unwrap_or_else(|_| panic!("{routine} did not answer {payload:?}"))
        .unwrap();
    assert_eq!(got.payload, payload.as_bytes(), "{routine}");
}

/// The final snapshot of a routine that ended.
fn ended(orch: &Orchestrator, name: &str) -> Option<Snapshot> {
    orch.history().into_iter().rev().find(|s| s.name == name)
}

/// The board entry of `file`.
fn entry(board: &[PluginStatus], file: &Path) -> PluginStatus {
    let file = file.display().to_string();
    board.iter().find(|s| s.file == file).cloned().unwrap_or_else(|| {
        panic!(
            "{file} is not on the board: {:#?}",
            board.iter().map(|s| &s.file).collect::<Vec<_>>()
        )
    })
}

#[test]
fn the_hostile_corpus_leaves_the_host_and_the_good_plugins_running() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let bad = write_corpus(&dir);
    run(async move {
        let scanned = PluginDir::scan(&dir).unwrap();
        let orch = Orchestrator::new();
        let board = PluginBoard::new();
        let report =
            start_plugins(&orch, engine(), &dir, &scanned, &board, &CancellationToken::new()).await;
        let plugins = 2 + HOSTILE.len();
        assert_eq!((report.started, report.routines), (plugins, plugins), "{report:?}");
        assert_eq!(report.failed, bad.len(), "{report:?}");

        // Every bad file is on the board as failed, its error naming it.
        let list = board.list();
        for b in &bad {
            let s = entry(&list, &b.file);
            let file = b.file.display().to_string();
            let err = s.error.clone().unwrap_or_default();
            assert_eq!(s.status, LoadState::Failed, "{file}: {s:?}");
            assert!(err.starts_with(&file), "{file}: the error does not name it: {err}");
            assert!(err[file.len()..].starts_with(&b.error) || err.contains(&b.error), "{err}");
        }
        for name in ["echo", "good"].into_iter().chain(HOSTILE.iter().map(|h| h.name)) {
            let s = entry(&list, &dir.join(format!("{name}.wasm")));
            assert_eq!((s.status, s.routines), (LoadState::Running, 1), "{s:?}");
        }

        // The good plugins keep answering while the hostile ones crash and restart, until
        // every hostile routine that ends has ended.
        let ending: Vec<&Hostile> =
            HOSTILE.iter().filter(|h| !matches!(h.end, End::Blocked)).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut rounds, mut during_restarts) = (0, 0);
        loop {
            let restarting = orch.list().iter().any(|h| h.restarts() > 0);
            ask(&orch, "echo", "echo", format!("ping {rounds}")).await;
            ask(&orch, "good", "testkit-out", format!("kit {rounds}")).await;
            rounds += 1;
            during_restarts += usize::from(restarting);
            if ending.iter().all(|h| ended(&orch, h.name).is_some()) {
                break;
            }
            let left: Vec<_> =
                ending.iter().filter(|h| ended(&orch, h.name).is_none()).map(|h| h.name).collect();
            assert!(Instant::now() < deadline, "still running after a minute: {left:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(during_restarts > 0, "no round while a hostile routine was restarting");
        // And once more after them.
        ask(&orch, "echo", "echo", "after".into()).await;
        ask(&orch, "good", "testkit-out", "after".into()).await;

        for h in HOSTILE {
            match h.end {
                End::GaveUp(reason) => {
                    let s = ended(&orch, h.name).unwrap();
                    let err = s.last_error.clone().unwrap_or_default();
                    assert_eq!((s.state, s.restarts), (State::Failed, 2), "{}: {err}", h.name);
                    assert!(err.starts_with("gave up: more than 2 restarts"), "{}: {err}", h.name);
                    assert!(err.contains(reason), "{}: {err:?} lacks {reason:?}", h.name);
                }
                End::Stopped => {
                    let s = ended(&orch, h.name).unwrap();
                    assert_eq!(s.state, State::Stopped, "{}: {:?}", h.name, s.last_error);
                    assert_eq!(s.restarts, 0, "{}", h.name);
                }
                End::Blocked => {
                    let r = orch.get_by_name(h.name).unwrap();
                    assert_eq!(r.state(), State::Running, "{}: {:?}", h.name, r.snapshot());
                }
            }
        }
        // The flood is held at the topic's capacity: the publisher waits.
        let flood = orch.bus().get("flood").expect("the flood topic");
        let full = || flood.len() == DEFAULT_TOPIC_CAPACITY;
        assert!(wait_until(Duration::from_secs(10), full).await, "{}", flood.len());
        assert_eq!(orch.get_by_name("flood").unwrap().restarts(), 0);
        // The board still shows the hostile plugins as running: they loaded and started.
        for h in HOSTILE {
            let s = entry(&board.list(), &dir.join(format!("{}.wasm", h.name)));
            assert_eq!(s.status, LoadState::Running, "{s:?}");
        }
        shutdown(&orch).await;
        let alive: Vec<_> = orch.list().iter().map(|h| h.name().to_string()).collect();
        assert!(alive.is_empty(), "{alive:?}");
    })
}
