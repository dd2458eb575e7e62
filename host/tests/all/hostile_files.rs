//! Files that are not what they are named: a `NAME.wasm` or manifest that is a symlink to
//! `/dev/zero`, a FIFO, a directory, or a file over the size limit. Each is reported by name
//! and skipped, never read without limit and never waited on; the other plugins start.
//!
//! A regression would read `/dev/zero` until the process runs out of memory, or block on a
//! FIFO forever: every test runs inside [`within`], which fails it after a generous deadline
//! instead of hanging the suite.

#![cfg(unix)]

use std::path::PathBuf;

use gorch_host::plugin::{LoadState, PluginBoard, start_plugins};
use gorch_host::{EngineConfig, LoadError, Orchestrator, PluginDir, PluginError, WasmEngine};
use tokio_util::sync::CancellationToken;

use crate::common::fs::{mkfifo, within};
use crate::common::*;

/// A plugin directory holding a good `echo.wasm`.
fn dir_with_echo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("echo.wasm")).unwrap();
    dir
}

/// Scans and starts `dir`; checks that `echo` runs and returns the scan's error messages
/// and the board's failed plugins (`plugin: error`).
fn start_dir(dir: PathBuf) -> (Vec<String>, Vec<String>) {
    within("start-up", move || {
        run(async move {
            let scanned = PluginDir::scan(&dir).unwrap();
            let scan_errors: Vec<String> = scanned.errors.iter().map(|e| e.to_string()).collect();
            assert_eq!(
                scanned.plugins.iter().map(|p| p.stem.as_str()).collect::<Vec<_>>(),
                ["echo"],
                "only echo is left to load; errors: {scan_errors:?}"
            );
            let orch = Orchestrator::new();
            let board = PluginBoard::new();
            let report =
                start_plugins(&orch, engine(), &dir, &scanned, &board, &CancellationToken::new())
                    .await;
            assert_eq!((report.started, report.routines), (1, 1), "{report:?}");
            assert!(orch.get_by_name("echo").is_some(), "echo runs");
            shutdown(&orch).await;
            let failed = board
                .in_state(LoadState::Failed)
                .into_iter()
                .map(|s| format!("{}: {}", s.plugin, s.error.unwrap_or_default()))
                .collect();
            (scan_errors, failed)
        })
    })
}

#[test]
fn a_plugin_symlinked_to_dev_zero_is_skipped_and_the_others_start() {
    let dir = dir_with_echo();
    let x = dir.path().join("x.wasm");
    std::os::unix::fs::symlink("/dev/zero", &x).unwrap();
    let (errors, failed) = start_dir(dir.path().to_path_buf());
    assert_eq!(
        errors,
        [format!("{}: not a regular file (a character device)", x.display())],
        "reported by name"
    );
    assert_eq!(failed, [format!("x: {}", errors[0])], "on the board");
}

#[test]
fn a_fifo_plugin_does_not_hang_start_up() {
    let dir = dir_with_echo();
    let y = dir.path().join("y.wasm");
    mkfifo(&y);
    // And a directory named like a plugin.
    std::fs::create_dir(dir.path().join("w.wasm")).unwrap();
    let (errors, failed) = start_dir(dir.path().to_path_buf());
    assert_eq!(
        errors,
        [
            format!("{}: not a regular file (a directory)", dir.path().join("w.wasm").display()),
            format!("{}: not a regular file (a FIFO)", y.display()),
        ]
    );
    assert_eq!(failed.len(), 2, "{failed:?}");
}

#[test]
fn special_manifests_are_reported_not_read() {
    let dir = dir_with_echo();
    // z.wasm is fine, its manifest is endless: z is skipped.
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("z.wasm")).unwrap();
    let z = dir.path().join("z.toml");
    std::os::unix::fs::symlink("/dev/zero", &z).unwrap();
    // v.wasm is fine, its manifest is a FIFO: v is skipped.
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("v.wasm")).unwrap();
    let v = dir.path().join("v.toml");
    mkfifo(&v);
    // gorch.toml is a FIFO: groups are ignored, the plugins start.
    let config = dir.path().join("gorch.toml");
    mkfifo(&config);
    let (errors, _) = start_dir(dir.path().to_path_buf());
    assert_eq!(
        errors,
        [
            format!(
                "{}: not a regular file (a FIFO) (groups ignored; every plugin starts on its own)",
                config.display()
            ),
            format!("{}: not a regular file (a FIFO)", v.display()),
            format!("{}: not a regular file (a character device)", z.display()),
        ]
    );
}

#[test]
fn an_oversized_manifest_is_refused() {
    let dir = dir_with_echo();
    std::fs::copy(gorch_artifacts::path("echo"), dir.path().join("big.wasm")).unwrap();
    let big = dir.path().join("big.toml");
    // Valid TOML (a comment), but over the limit.
    let mut text = vec![b'#'; (gorch_host::plugin::MAX_MANIFEST_BYTES + 1) as usize];
    text.push(b'\n');
    std::fs::write(&big, text).unwrap();
    let (errors, _) = start_dir(dir.path().to_path_buf());
    assert_eq!(errors, [format!("{}: larger than the 1 MiB limit", big.display())]);
}

#[test]
fn load_file_opens_only_regular_files() {
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.wasm");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let fifo = dir.path().join("fifo.wasm");
    mkfifo(&fifo);
    for (path, kind) in
        [(zero, "a character device"), (fifo, "a FIFO"), (dir.path().into(), "a directory")]
    {
        let p = path.clone();
        let e = within("load_file", move || engine().load_file(&p).unwrap_err());
        let LoadError::NotRegularFile { path: p, kind: k } = &e else { panic!("{e:?}") };
        assert_eq!((p, *k), (&path, kind));
        assert_eq!(e.path(), path);
        assert_eq!(e.to_string(), format!("{}: not a regular file ({kind})", path.display()));
        // As a start-up error it names the file too.
        assert_eq!(PluginError::from(e).path(), path);
    }

    // A symlink to a regular file is fine.
    let link = dir.path().join("echo.wasm");
    std::os::unix::fs::symlink(gorch_artifacts::path("echo"), &link).unwrap();
    engine().load_file(&link).expect("a symlink to a component loads");
}

#[test]
fn load_file_refuses_a_file_over_the_limit() {
    let echo = gorch_artifacts::path("echo");
    let size = std::fs::metadata(&echo).unwrap().len();
    let engine_with = |max_component_bytes| {
        WasmEngine::new(EngineConfig { pooling: false, max_component_bytes, ..Default::default() })
            .unwrap()
    };
    let e = engine_with(size - 1).load_file(&echo).unwrap_err();
    assert!(
        matches!(&e, LoadError::TooLarge { path, limit } if *path == echo && *limit == size - 1),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(message.starts_with(&format!("{}: larger than the ", echo.display())), "{message}");
    assert!(message.contains("max_component_bytes"), "says how to raise it: {message}");
    engine_with(size).load_file(&echo).expect("exactly at the limit loads");
    assert_eq!(EngineConfig::default().max_component_bytes, 256 << 20);
    assert_eq!(gorch_host::defaults::DEFAULT_MAX_COMPONENT_BYTES, 256 << 20);
}
