//! The compiled-component cache: a second load is a hit, and a corrupt, truncated or
//! foreign entry is detected, replaced and never loaded; an entry that is not a regular
//! file, or a directory or entry of another user, is never read; leftovers of killed
//! writers are cleaned up.

use std::time::Duration;

use gorch_host::{CacheStatus, CompileCache};
use gorch_host::{EngineConfig, Orchestrator, SpawnOptions, State, WasmEngine, WasmOptions};

use crate::common::*;

fn cached_engine(dir: &std::path::Path) -> WasmEngine {
    WasmEngine::new(EngineConfig {
        pooling: false,
        cache_dir: Some(dir.to_path_buf()),
        ..Default::default()
    })
    .expect("engine")
}

/// The only entry file in `dir`.
fn entry(dir: &std::path::Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one entry and no temporary files left: {files:?}");
    files[0].clone()
}

/// Runs `component` (the testkit) once in mode `ok` and checks it ends Stopped.
fn runs_ok(component: &gorch_host::WasmComponent) {
    run(async {
        let orch = Orchestrator::new();
        let h = orch
            .spawn_wasm(
                SpawnOptions::new("cached"),
                component,
                WasmOptions::default().env("MODE", "ok"),
            )
            .expect("spawn");
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        shutdown(&orch).await;
    })
}

#[test]
fn second_load_is_a_hit_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = cached_engine(dir.path());
    let path = gorch_artifacts::path("testkit");
    let first = engine.load_file(&path).unwrap();
    assert_eq!(first.cache_status(), CacheStatus::Miss);
    let file = entry(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(file, CompileCache::new(dir.path()).entry_path(engine.engine(), &bytes));

    // A fresh engine with the same settings (a second start) finds it.
    let again = cached_engine(dir.path());
    let second = again.load_file(&path).unwrap();
    assert_eq!(second.cache_status(), CacheStatus::Hit);
    assert_eq!(second.exports(), first.exports());
    runs_ok(&second);

    // Another component gets another entry; without a cache nothing is written.
    again.load_file(gorch_artifacts::path("echo")).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    let plain = WasmEngine::new(EngineConfig { pooling: false, ..Default::default() }).unwrap();
    assert_eq!(plain.load_file(&path).unwrap().cache_status(), CacheStatus::Off);
}

#[test]
fn corrupt_truncated_or_foreign_entries_are_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = gorch_artifacts::path("testkit");
    cached_engine(dir.path()).load_file(&path).unwrap();
    let file = entry(dir.path());
    let good = std::fs::read(&file).unwrap();

    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let truncated = good[..good.len() - 100].to_vec();
    // A well-formed entry (right magic and checksum) around bytes wasmtime did not produce.
    let mut foreign = good[..8].to_vec();
    let junk = b"not a compiled component".to_vec();
    foreign.extend_from_slice(&sha256(&junk));
    foreign.extend_from_slice(&junk);

    for (what, bad) in [("flipped", flipped), ("truncated", truncated), ("foreign", foreign)] {
        std::fs::write(&file, bad).unwrap();
        let engine = cached_engine(dir.path());
        let c = engine.load_file(&path).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(c.cache_status(), CacheStatus::Replaced, "{what}");
        assert_eq!(std::fs::read(entry(dir.path())).unwrap(), good, "{what}: entry rewritten");
        assert_eq!(
            cached_engine(dir.path()).load_file(&path).unwrap().cache_status(),
            CacheStatus::Hit
        );
        runs_ok(&c);
    }
}

#[test]
fn an_unwritable_cache_only_costs_a_compile() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the cache directory should be: nothing can be stored under it.
    let blocked = dir.path().join("cache");
    std::fs::write(&blocked, b"").unwrap();
    let engine = cached_engine(&blocked);
    let c = engine.load_file(gorch_artifacts::path("echo")).unwrap();
    assert_eq!(c.cache_status(), CacheStatus::Miss);
    assert_eq!(
        engine.load_file(gorch_artifacts::path("echo")).unwrap().cache_status(),
        CacheStatus::Miss
    );
}

#[cfg(unix)]
#[test]
fn the_cache_directory_is_private_and_a_shared_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("new");
    cached_engine(&cache).load_file(gorch_artifacts::path("echo")).unwrap();
    assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);

    // Anyone could plant compiled code here: not read, not written.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let c = cached_engine(&shared).load_file(gorch_artifacts::path("echo")).unwrap();
    assert_eq!(c.cache_status(), CacheStatus::Off);
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
}

#[cfg(unix)]
#[test]
fn a_special_entry_is_never_read() {
    use crate::common::fs::{mkfifo, within};
    let dir = tempfile::tempdir().unwrap();
    let path = gorch_artifacts::path("echo");
    cached_engine(dir.path()).load_file(&path).unwrap();
    let file = entry(dir.path());
    let good = std::fs::read(&file).unwrap();
    for what in ["symlink to /dev/zero", "FIFO"] {
        std::fs::remove_file(&file).unwrap();
        match what {
            "FIFO" => mkfifo(&file),
            _ => std::os::unix::fs::symlink("/dev/zero", &file).unwrap(),
        }
        let (d, p) = (dir.path().to_path_buf(), path.clone());
        let c = within(what, move || cached_engine(&d).load_file(&p).unwrap());
        assert_eq!(c.cache_status(), CacheStatus::Replaced, "{what}: compiled");
        let m = std::fs::symlink_metadata(entry(dir.path())).unwrap();
        assert!(m.is_file(), "{what}: replaced by a regular entry");
        assert_eq!(std::fs::read(&file).unwrap(), good, "{what}");
    }
}

/// Whether the tests run as root (and can hand files to another user).
#[cfg(unix)]
fn root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `nobody`: another user.
#[cfg(unix)]
const OTHER: u32 = 65534;

#[cfg(unix)]
#[test]
fn a_directory_of_another_user_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    if !root() {
        // `/` belongs to root and is not writable by others: not ours, so refused.
        let c = cached_engine(std::path::Path::new("/")).load_file(gorch_artifacts::path("echo"));
        assert_eq!(c.unwrap().cache_status(), CacheStatus::Off);
        eprintln!("not root: another user's cache directory with a planted entry not tested");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = gorch_artifacts::path("echo");
    // A valid entry, then the directory is handed to another user (private to them, or
    // readable by all): what is in it is theirs to choose, so it is neither read nor written.
    let cache = dir.path().join("cache");
    cached_engine(&cache).load_file(&path).unwrap();
    let planted = entry(&cache);
    for mode in [0o700, 0o755] {
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&cache, Some(OTHER), Some(OTHER)).unwrap();
        let c = cached_engine(&cache).load_file(&path).unwrap();
        assert_eq!(c.cache_status(), CacheStatus::Off, "mode {mode:o}: not a hit");
        assert_eq!(entry(&cache), planted, "nothing written");
    }
    // Given back, it is used again.
    std::os::unix::fs::chown(&cache, Some(0), Some(0)).unwrap();
    assert_eq!(cached_engine(&cache).load_file(&path).unwrap().cache_status(), CacheStatus::Hit);
}

/// Needs root to hand the entry to another user. CI runs as root, so it is a real test
/// there; elsewhere it says it was skipped rather than pass without checking anything.
#[cfg(unix)]
#[test]
fn an_entry_of_another_user_is_replaced() {
    use std::os::unix::fs::MetadataExt;
    if !root() {
        eprintln!(
            "skipped: an_entry_of_another_user_is_replaced (needs root to hand an entry to \
             another user)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = gorch_artifacts::path("echo");
    cached_engine(dir.path()).load_file(&path).unwrap();
    let file = entry(dir.path());
    std::os::unix::fs::chown(&file, Some(OTHER), Some(OTHER)).unwrap();
    let c = cached_engine(dir.path()).load_file(&path).unwrap();
    assert_eq!(c.cache_status(), CacheStatus::Replaced, "not deserialized");
    assert_eq!(std::fs::metadata(entry(dir.path())).unwrap().uid(), 0, "rewritten as ours");
    assert_eq!(
        cached_engine(dir.path()).load_file(&path).unwrap().cache_status(),
        CacheStatus::Hit
    );
}

#[test]
fn stale_temporary_files_are_removed_and_fresh_ones_kept() {
    use std::time::SystemTime;
    let dir = tempfile::tempdir().unwrap();
    let path = gorch_artifacts::path("echo");
    cached_engine(dir.path()).load_file(&path).unwrap();
    let file = entry(dir.path());
    // A writer killed two hours ago, and one writing right now.
    let (stale, fresh) = (dir.path().join(".tmpKILLED"), dir.path().join(".tmpWRITING"));
    std::fs::write(&stale, b"half an entry").unwrap();
    std::fs::write(&fresh, b"half an entry").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(two_hours_ago).unwrap();
    // An old file that is not a temporary file is not touched.
    let other = dir.path().join("README");
    std::fs::write(&other, b"mine").unwrap();
    std::fs::File::options().write(true).open(&other).unwrap().set_modified(two_hours_ago).unwrap();

    let c = cached_engine(dir.path()).load_file(&path).unwrap();
    assert_eq!(c.cache_status(), CacheStatus::Hit);
    assert!(!stale.exists(), "the killed writer's file is removed");
    assert!(fresh.exists(), "a write in progress is left alone");
    assert!(other.exists() && file.exists());
}

fn sha256(b: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(b).to_vec()
}

#[test]
fn time_metering_shares_the_cache_under_other_entry_names() {
    let dir = tempfile::tempdir().unwrap();
    let engine = cached_engine(dir.path());
    let path = gorch_artifacts::path("testkit");
    let bytes = std::fs::read(&path).unwrap();
    let fuel = engine.load_file(&path).unwrap();
    assert!(!engine.has_time_engine(), "created only when a component asks for it");
    let time = engine.load_file_metered(&path, gorch_host::Metering::Time).unwrap();
    assert!(engine.has_time_engine());
    assert_eq!((fuel.cache_status(), time.cache_status()), (CacheStatus::Miss, CacheStatus::Miss));
    // The engine without fuel has another compatibility hash: its own entry, no collision.
    let cache = CompileCache::new(dir.path());
    let time_engine = engine.engine_for(gorch_host::Metering::Time).unwrap();
    let (e_fuel, e_time) =
        (cache.entry_path(engine.engine(), &bytes), cache.entry_path(&time_engine, &bytes));
    assert_ne!(e_fuel, e_time);
    assert!(e_fuel.is_file() && e_time.is_file());
    // A second start finds both.
    let again = cached_engine(dir.path());
    let time = again.load_file_metered(&path, gorch_host::Metering::Time).unwrap();
    assert_eq!(time.cache_status(), CacheStatus::Hit);
    assert_eq!(again.load_file(&path).unwrap().cache_status(), CacheStatus::Hit);
    run(async {
        let orch = Orchestrator::new();
        let wasm = WasmOptions::default().metering(gorch_host::Metering::Time).env("MODE", "ok");
        let h = orch.spawn_wasm(SpawnOptions::new("cached-time"), &time, wasm).expect("spawn");
        assert_eq!(wait_end(&h, Duration::from_secs(10)).await, State::Stopped);
        assert_eq!(h.snapshot().fuel_consumed, None);
        shutdown(&orch).await;
    })
}
