//! The repository's files, and files that are not what they are named (a FIFO), with a
//! guard for code that might block on them.

use std::path::{Path, PathBuf};
#[cfg(unix)]
use std::sync::mpsc;
#[cfg(unix)]
use std::time::Duration;

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Creates a FIFO at `path`.
#[cfg(unix)]
pub fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo").arg(path).status().expect("mkfifo").success();
    assert!(ok, "mkfifo {}", path.display());
}

/// Runs `f` on its own thread and fails if it has not returned within a minute (a blocked
/// open of a FIFO never returns: the thread is left behind, the test fails).
#[cfg(unix)]
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        // The thread panicked: re-raise its panic (an assertion failure) here.
        Err(mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("the thread ended without a result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still blocked after a minute"),
    }
}
