//! Manifest golden tests: `tests/manifests/valid/*.toml` parse; each
//! `tests/manifests/invalid/NAME.toml` fails with exactly the text in `NAME.err`.
//! Run with `GORCH_BLESS=1` to (re)write the `.err` files after a deliberate change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gorch_host::plugin::ByteSize;
use gorch_host::{PluginManifest, RestartPolicy};

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests").join(kind)
}

fn tomls(kind: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

/// The name a manifest is reported under: `invalid/NAME.toml`, stable across machines.
fn short(kind: &str, p: &Path) -> PathBuf {
    Path::new(kind).join(p.file_name().unwrap())
}

#[test]
fn valid_manifests_parse() {
    for p in tomls("valid") {
        let text = std::fs::read_to_string(&p).unwrap();
        if let Err(e) = PluginManifest::from_str(&short("valid", &p), &text) {
            panic!("{e}");
        }
    }
}

#[test]
fn invalid_manifests_fail_with_the_expected_error() {
    let bless = std::env::var_os("GORCH_BLESS").is_some();
    let mut failures = Vec::new();
    for p in tomls("invalid") {
        let text = std::fs::read_to_string(&p).unwrap();
        let got = match PluginManifest::from_str(&short("invalid", &p), &text) {
            Ok(m) => format!("unexpectedly valid: {m:?}"),
            Err(e) => e.to_string(),
        };
        let expected_path = p.with_extension("err");
        if bless {
            std::fs::write(&expected_path, format!("{got}\n")).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if want.trim_end() != got {
            failures.push(format!("{}:\n  want: {}\n  got:  {got}", p.display(), want.trim_end()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_full_manifest_has_every_value() {
    let p = dir("valid").join("full.toml");
    let m = PluginManifest::from_file(&p).unwrap();
    assert_eq!(m.routine_names("file"), vec!["echo-1", "echo-2", "echo-3"]);
    assert_eq!(m.restart, RestartPolicy::Always);
    assert_eq!(m.idle_timeout, Duration::from_secs(2));
    assert_eq!(m.queue_capacity, 64);
    assert_eq!(m.max_deliveries, 5);
    assert_eq!(m.backoff.initial, Duration::from_millis(100));
    assert_eq!(m.backoff.multiplier, 1.5);
    assert_eq!(m.backoff.stable_after, Duration::from_secs(60));
    assert_eq!(m.intensity.max_restarts, 7);
    assert_eq!(m.limits.memory, ByteSize(32 << 20));
    assert_eq!(m.limits.fuel, 1_000_000);
    assert_eq!(m.limits.message_bytes, ByteSize(4096));
    let w = m.wasm_options();
    assert_eq!(w.env, vec![("GREETING".to_string(), "hi".to_string())]);
    assert_eq!(w.args, vec!["--verbose"]);
    let o = m.spawn_options("echo-1".into());
    assert_eq!(o.idle_timeout, Some(Duration::from_secs(2)));
    assert_eq!(o.message_bytes, 4096);
}

#[test]
fn an_empty_manifest_gives_the_defaults() {
    let m = PluginManifest::from_str(Path::new("x.toml"), "").unwrap();
    assert_eq!(m, PluginManifest::default());
    assert_eq!(m.routine_names("ticker"), vec!["ticker"]);
    assert_eq!(m.limits.memory, ByteSize(64 << 20));
    assert_eq!(m.spawn_options("t".into()).idle_timeout, None);
}

#[test]
fn gorch_toml_groups_order_members_first_and_name_bad_members() {
    use gorch_host::{PluginDir, Strategy};
    let dir = tempfile::tempdir().unwrap();
    for f in ["a.wasm", "b.wasm", "c.wasm", "d.wasm"] {
        std::fs::write(dir.path().join(f), b"").unwrap();
    }
    std::fs::write(dir.path().join("b.toml"), "name = \"bee\"\n").unwrap();
    std::fs::write(
        dir.path().join("gorch.toml"),
        "[groups.g]\nstrategy = \"one-for-all\"\nmembers = [\"d\", \"bee\"]\n",
    )
    .unwrap();
    let scanned = PluginDir::scan(dir.path()).unwrap();
    assert!(scanned.errors.is_empty(), "{:?}", scanned.errors);
    let order: Vec<&str> = scanned.plugins.iter().map(|p| p.stem.as_str()).collect();
    assert_eq!(order, vec!["d", "b", "a", "c"]);
    assert_eq!(scanned.groups["g"].strategy, Strategy::OneForAll);
    assert_eq!(scanned.group_of(&scanned.plugins[1]), Some("g"));
    assert_eq!(scanned.group_of(&scanned.plugins[2]), None);

    std::fs::write(dir.path().join("gorch.toml"), "[groups.g]\nmembers = [\"zed\"]\n").unwrap();
    let scanned = PluginDir::scan(dir.path()).unwrap();
    assert!(
        scanned.errors[0]
            .to_string()
            .contains("gorch.toml: group g: no plugin named \"zed\" in this directory"),
        "{:?}",
        scanned.errors
    );
    assert!(scanned.groups.is_empty());

    std::fs::write(dir.path().join("gorch.toml"), "[groups.g]\nmembers = []\nbogus = 1\n").unwrap();
    let scanned = PluginDir::scan(dir.path()).unwrap();
    assert!(
        scanned.errors[0].to_string().contains("gorch.toml:3:1: unknown field `bogus`"),
        "{:?}",
        scanned.errors
    );
}
