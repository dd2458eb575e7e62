//! Manifest property tests: no text, however hostile, makes parsing panic; an invalid value
//! of a known key is reported with the file, line and column; and whatever parses gives
//! spawn options and backoff delays without panicking.

use std::path::Path;

use gorch_host::{EngineConfig, PluginManifest};
use proptest::prelude::*;

const PATH: &str = "prop.toml";

/// A TOML basic string holding `s`, escaped.
fn quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Strings that look like durations or sizes, including huge, zero and bogus ones.
fn unit_string() -> impl Strategy<Value = String> {
    let units = prop::sample::select(vec![
        "", "ns", "ms", "s", "m", "h", "d", "days", "w", "y", "years", "B", "KiB", "MiB", "GiB",
        "TiB", "KB", "MB", "GB", "TB", "parsecs",
    ]);
    let n = prop_oneof![0u64..100, 0u64..100_000, any::<u64>()];
    (n, units).prop_map(|(n, u)| quote(&format!("{n}{u}")))
}

/// One TOML value, text: anything a hostile manifest could hold.
fn value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<String>().prop_map(|s| quote(&s)),
        unit_string(),
        prop::sample::select(vec!["never", "on-failure", "always", "", "node/x", "a\u{202E}b"])
            .prop_map(quote),
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..10).prop_map(|n| n.to_string()),
        Just("18446744073709551615".to_string()),
        Just("99999999999999999999999".to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        (0.0f64..3.0).prop_map(|f| format!("{f:?}")),
        prop::sample::select(vec!["nan", "inf", "-inf", "+nan", "1e309", "-0.0", "true"])
            .prop_map(str::to_string),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec(("[A-Za-z=_ ]{0,4}", inner), 0..3).prop_map(|kv| {
                let kv: Vec<String> =
                    kv.into_iter().map(|(k, v)| format!("{} = {v}", quote(&k))).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

const TOP: &[&str] =
    &["name", "instances", "restart", "idle-timeout", "queue-capacity", "max-deliveries", "bogus"];
const TABLES: &[(&str, &[&str])] = &[
    ("backoff", &["initial", "max", "multiplier", "jitter", "stable-after"]),
    ("intensity", &["max-restarts", "within"]),
    ("limits", &["memory", "fuel", "message-bytes"]),
    ("wasi", &["env", "args"]),
    ("backoff.nested", &["x"]),
];

/// A manifest of known keys (and a few unknown ones) with random values.
fn manifest_text() -> impl Strategy<Value = String> {
    let top = prop::collection::vec((prop::sample::select(TOP), value()), 0..4);
    let table = (0..TABLES.len()).prop_flat_map(|t| {
        let (name, keys) = TABLES[t];
        prop::collection::vec((prop::sample::select(keys), value()), 0..3)
            .prop_map(move |kv| (name, kv))
    });
    let tables = prop::collection::vec(table, 0..3);
    (top, tables).prop_map(|(top, tables)| {
        let mut text = String::new();
        for (k, v) in top {
            text.push_str(&format!("{k} = {v}\n"));
        }
        for (name, kv) in tables {
            text.push_str(&format!("[{name}]\n"));
            for (k, v) in kv {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
        text
    })
}

/// Whatever parsed can be used: spawn options, wasm options, warnings, and every backoff
/// delay, none of which may panic.
fn use_manifest(m: &PluginManifest) {
    for name in m.routine_names("stem").into_iter().take(3) {
        let o = m.spawn_options(name);
        let b = &o.supervision.backoff;
        for attempt in 0..64 {
            for u in [0.0, 0.25, 0.5, 0.75, 1.0 - f64::EPSILON] {
                let d = b.delay(attempt, u);
                assert!(d <= b.max.saturating_mul(2), "{d:?} for {b:?}");
            }
        }
    }
    let _ = m.wasm_options();
    let _ = m.warnings(&EngineConfig::default());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_text_parses_or_fails_without_panicking(text in any::<String>()) {
        if let Ok(m) = PluginManifest::from_str(Path::new(PATH), &text) {
            use_manifest(&m);
        }
    }

    #[test]
    fn known_keys_with_hostile_values_fail_with_a_location(text in manifest_text()) {
        match PluginManifest::from_str(Path::new(PATH), &text) {
            Ok(m) => use_manifest(&m),
            Err(e) => {
                let shown = e.to_string();
                prop_assert!(shown.starts_with(PATH), "{shown}");
                prop_assert!(e.location.is_some(), "no location: {shown}\n{text}");
                prop_assert!(shown.len() < 2000, "{} bytes: {shown}", shown.len());
            }
        }
    }

    #[test]
    fn plausible_manifests_give_delays_that_never_panic(
        initial in 0u64..100_000_000,
        extra in 0u64..100_000_000,
        multiplier in 1.0f64..1e6,
        jitter in 0.0f64..=1.0,
        attempt in 0u32..64,
        u in 0.0f64..1.0,
    ) {
        let text = format!(
            "[backoff]\ninitial = \"{initial}ms\"\nmax = \"{}ms\"\nmultiplier = {multiplier:?}\n\
             jitter = {jitter:?}\n",
            initial + extra
        );
        match PluginManifest::from_str(Path::new(PATH), &text) {
            Ok(m) => {
                let d = m.backoff.delay(attempt, u);
                prop_assert!(d <= m.backoff.max.mul_f64(1.0 + jitter) + std::time::Duration::from_millis(1));
                use_manifest(&m);
            }
            Err(e) => prop_assert!(e.to_string().contains("MAX_POLICY_DURATION"), "{e}"),
        }
    }
}
