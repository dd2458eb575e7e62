//! Manifest golden tests: `tests/manifests/valid/*.toml` parse; each
//! `tests/manifests/invalid/NAME.toml` fails with exactly the text in `NAME.err`.
//! Run with `GORCH_BLESS=1` to (re)write the `.err` files after a deliberate change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gorch_host::defaults::MAX_POLICY_DURATION;
use gorch_host::plugin::ByteSize;
use gorch_host::{Backoff, Metering, PluginManifest, RestartPolicy};

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
    assert_eq!(m.limits.metering, Metering::Fuel);
    let w = m.wasm_options();
    assert_eq!((w.fuel, w.metering), (1_000_000, Metering::Fuel));
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
    assert_eq!(m.limits.metering, Metering::Fuel, "fuel metering stays the default");
    assert_eq!(m.wasm_options().metering, Metering::Fuel);
    assert_eq!(m.spawn_options("t".into()).idle_timeout, None);
}

#[test]
fn time_metering_maps_to_the_wasm_options_and_refuses_a_fuel_limit() {
    let p = dir("valid").join("time-metering.toml");
    let m = PluginManifest::from_file(&p).unwrap();
    assert_eq!(m.limits.metering, Metering::Time);
    let w = m.wasm_options();
    assert_eq!((w.metering, w.fuel), (Metering::Time, 0));
    // The golden file holds the whole message; here: it names the file, the line and
    // column of the [limits] table, and both keys.
    let bad = dir("invalid").join("time-with-fuel.toml");
    let e = PluginManifest::from_file(&bad).unwrap_err();
    assert_eq!(e.path, bad);
    assert_eq!(e.location.map(|(l, _)| l), Some(3), "{e}");
    assert!(e.message.contains("limits.fuel") && e.message.contains("metering"), "{e}");
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

#[test]
fn huge_values_are_cut_in_errors() {
    // One 10 MB value (as in the issue), then 1 MB ones: parsing is slow in debug builds.
    let huge = "x".repeat(10 << 20);
    let big = &huge[..1 << 20];
    for text in [
        format!("name = \"{huge}\"\n"),
        format!("restart = \"{big}\"\n"),
        format!("queue-capacity = \"{big}\"\n"),
        format!("idle-timeout = \"{big}\"\n"),
        format!("[limits]\nmemory = \"1{big}\"\n"),
        format!("[wasi]\nenv = {{ \"{big}=\" = \"v\" }}\n"),
        format!("{big} = 1\n"),
    ] {
        let e = PluginManifest::from_str(Path::new("big.toml"), &text).unwrap_err();
        let shown = e.to_string();
        assert!(shown.len() < 600, "{} bytes: {}", shown.len(), &shown[..600]);
        assert!(shown.contains("… (") && shown.contains("more characters)"), "{shown}");
        assert!(e.location.is_some(), "{shown}");
    }
}

#[test]
fn backoff_delay_saturates_for_any_settings() {
    let extreme = [Duration::ZERO, Duration::from_nanos(1), Duration::from_secs(u64::MAX / 2)];
    let extreme = extreme.into_iter().chain([Duration::MAX]);
    for initial in extreme.clone() {
        for max in extreme.clone() {
            for multiplier in [0.0, 0.5, 1.0, 2.0, 1e300, f64::INFINITY, f64::NAN, -3.0] {
                for jitter in [0.0, 0.2, 1.0, 5.0, f64::INFINITY, f64::NAN, -1.0] {
                    let b = Backoff { initial, max, multiplier, jitter, stable_after: max };
                    for attempt in [0, 1, 2, 10, 63, 64, 1000, u32::MAX] {
                        for u in [0.0, 0.25, 0.5, 0.999_999, 1.0, -1.0, 2.0, f64::NAN] {
                            let _ = b.delay(attempt, u);
                        }
                    }
                }
            }
        }
    }
    let b =
        Backoff { initial: Duration::MAX, max: Duration::MAX, jitter: 1.0, ..Backoff::default() };
    assert_eq!(b.delay(0, 0.999), Duration::MAX);
    assert_eq!(b.delay(0, 0.0), Duration::ZERO);
    assert!(b.validate().is_err(), "longer than MAX_POLICY_DURATION");
    assert!(Backoff { max: MAX_POLICY_DURATION, ..Backoff::default() }.validate().is_ok());
}

#[test]
fn sizes_take_tebibytes_and_show_their_unit() {
    assert_eq!(ByteSize::parse("1TiB"), Ok(ByteSize(1 << 40)));
    assert_eq!(ByteSize::parse("2 TB"), Ok(ByteSize(2_000_000_000_000)));
    assert!(ByteSize::parse("20000000TiB").is_err(), "overflows u64");
    assert_eq!(ByteSize(4 << 30).to_string(), "4GiB");
    assert_eq!(ByteSize(3 << 40).to_string(), "3TiB");
    assert_eq!(ByteSize(1536).to_string(), "1536B");
    assert_eq!(ByteSize(1000).to_string(), "1000B");
    assert_eq!(ByteSize(0).to_string(), "0B");
    let m = PluginManifest::from_str(Path::new("x.toml"), "[limits]\nmessage-bytes = \"1KiB\"\n");
    assert_eq!(m.unwrap().limits.message_bytes, ByteSize(1024));
    let m = PluginManifest::from_str(Path::new("x.toml"), "[limits]\nmemory = \"4GiB\"\n");
    assert_eq!(m.unwrap().limits.memory, ByteSize(4 << 30), "the wasm32 maximum is allowed");
}

#[test]
fn names_reject_bidi_invisible_and_slash() {
    use gorch_host::{NameError, validate_routine_name, validate_topic_name};
    for (name, want) in [
        ("evil\u{202E}gnp.exe", NameError::Bidi('\u{202E}')),
        ("a\u{2066}b", NameError::Bidi('\u{2066}')),
        ("a\u{200F}", NameError::Bidi('\u{200F}')),
        ("a\u{061C}", NameError::Bidi('\u{061C}')),
        ("zero\u{200B}width", NameError::Invisible('\u{200B}')),
        ("join\u{200D}er", NameError::Invisible('\u{200D}')),
        ("\u{FEFF}bom", NameError::Invisible('\u{FEFF}')),
        ("word\u{2060}joiner", NameError::Invisible('\u{2060}')),
        ("soft\u{00AD}hyphen", NameError::Invisible('\u{00AD}')),
        ("tag\u{E0041}", NameError::Invisible('\u{E0041}')),
        ("node/echo", NameError::Slash),
    ] {
        assert_eq!(validate_routine_name(name), Err(want), "{name:?}");
        assert_eq!(validate_topic_name(name), Err(want), "{name:?}");
    }
    let e = NameError::Bidi('\u{202E}').to_string();
    assert!(e.contains("U+202E"), "{e}");
    for ok in ["echo-1", "café", "名前", "worker 🦀", "a.b:c_d"] {
        assert_eq!(validate_routine_name(ok), Ok(()), "{ok:?}");
    }
    assert_eq!(validate_routine_name("has space"), Ok(()));
    assert_eq!(validate_topic_name("has space"), Err(NameError::Whitespace));
}

#[test]
fn the_instances_of_a_directory_are_bounded_in_all() {
    use gorch_host::{PluginDir, PluginError};
    let dir = tempfile::tempdir().unwrap();
    for stem in ["a", "b"] {
        std::fs::write(dir.path().join(format!("{stem}.wasm")), b"").unwrap();
        std::fs::write(dir.path().join(format!("{stem}.toml")), "instances = 60000\n").unwrap();
    }
    let scanned = PluginDir::scan(dir.path()).unwrap();
    assert!(scanned.errors.is_empty(), "{:?}", scanned.errors);
    let e = scanned.check_instances(dir.path()).unwrap_err();
    assert!(matches!(e, PluginError::TooManyInstances { total: 120_000, max: 100_000, .. }));
    assert_eq!(e.path(), dir.path());
    let shown = e.to_string();
    assert!(shown.starts_with(&dir.path().display().to_string()), "{shown}");
    assert!(shown.contains("120000 instances in all, more than 100000"), "{shown}");

    std::fs::write(dir.path().join("b.toml"), "instances = 40000\n").unwrap();
    let scanned = PluginDir::scan(dir.path()).unwrap();
    assert_eq!(scanned.check_instances(dir.path()).unwrap(), 100_000);
}

#[test]
fn warnings_name_legal_but_useless_limits() {
    use gorch_host::EngineConfig;
    let m = PluginManifest::from_str(
        Path::new("x.toml"),
        "[limits]\nmemory = \"1GiB\"\nmessage-bytes = \"2GiB\"\n",
    )
    .unwrap();
    let small = EngineConfig { memory_reservation: 64 << 20, ..EngineConfig::default() };
    let w = m.warnings(&small);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(w[0].contains("limits.memory = 1GiB cannot be reached") && w[0].contains("64MiB"));
    assert!(w[1].contains("limits.message-bytes = 2GiB is more than limits.memory = 1GiB"));
    let on_demand = EngineConfig { pooling: false, ..small };
    assert_eq!(m.warnings(&on_demand).len(), 1, "on demand, a memory can grow past it");
    assert!(PluginManifest::default().warnings(&EngineConfig::default()).is_empty());
}
