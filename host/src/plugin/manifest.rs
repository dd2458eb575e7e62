//! Plugin manifests (`NAME.toml` beside `NAME.wasm`): the keys, their defaults (each
//! written once: `PluginManifest::default`, built from the library's own defaults), and
//! parsing with errors that name the file, line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::names::validate_routine_name;
use crate::orchestrator::{DEFAULT_MESSAGE_BYTES, DEFAULT_QUEUE_CAPACITY, SpawnOptions};
use crate::supervisor::{Backoff, Intensity, RestartPolicy, Supervision};
use crate::wasm::{DEFAULT_MEMORY_LIMIT, WasmOptions};

/// A manifest that could not be read or is invalid: names the file, and the line and column
/// where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", path.display(), location.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
pub struct ManifestError {
    /// The manifest file.
    pub path: PathBuf,
    /// 1-based line and column, when known.
    pub location: Option<(usize, usize)>,
    /// What is wrong.
    pub message: String,
}

/// A size in bytes: an integer, or a string such as `"64MiB"`, `"512KiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number where one was expected.
    #[error("invalid size {0:?}: expected e.g. \"64MiB\"")]
    Invalid(String),
    /// An unknown unit.
    #[error("invalid size unit {unit:?} in {input:?}: use B, KiB, MiB, GiB, KB, MB or GB")]
    Unit {
        /// The unit as written.
        unit: String,
        /// The whole size as written.
        input: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("size {0:?} is too large")]
    TooLarge(String),
}

impl ByteSize {
    /// Parses `"64MiB"`, `"1 GiB"`, `"4096"`, `"10KB"`.
    pub fn parse(s: &str) -> Result<ByteSize, SizeError> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| SizeError::Invalid(s.to_string()))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(SizeError::Unit { unit: other.to_string(), input: s.to_string() });
            }
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| SizeError::TooLarge(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes, such as 1048576 or \"1MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The `[limits]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Limits {
    /// Linear memory per instance (default 64MiB).
    pub memory: ByteSize,
    /// Fuel (instructions) per run; 0 = unlimited (default).
    pub fuel: u64,
    /// Largest message the plugin may send or publish (default 1MiB).
    pub message_bytes: ByteSize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: ByteSize(DEFAULT_MEMORY_LIMIT),
            fuel: 0,
            message_bytes: ByteSize(DEFAULT_MESSAGE_BYTES),
        }
    }
}

/// The `[wasi]` table: what the sandbox grants (nothing by default).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct WasiGrants {
    /// Environment variables the guest sees.
    pub env: BTreeMap<String, String>,
    /// Arguments the guest sees.
    pub args: Vec<String>,
}

fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

fn positive_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

fn routine_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = String::deserialize(d)?;
    validate_routine_name(&v)
        .map_err(|r| serde::de::Error::custom(format!("invalid name {v:?}: {r}")))?;
    Ok(Some(v))
}

/// A plugin manifest, `NAME.toml` beside `NAME.wasm`. All keys are optional and kebab-case;
/// unknown keys are errors. A missing key takes its value from [`PluginManifest::default`].
///
/// ```toml
/// name = "echo"               # default: the file stem
/// instances = 1               # replicas: names echo-1 .. echo-N when N > 1
/// restart = "on-failure"      # never | on-failure | always
/// idle-timeout = "0s"         # 0 = watchdog off
/// queue-capacity = 128        # mailbox
/// max-deliveries = 3
/// [backoff]
/// initial = "200ms"
/// max = "5s"
/// multiplier = 2.0
/// jitter = 0.2
/// stable-after = "30s"
/// [intensity]
/// max-restarts = 5
/// within = "10s"
/// [limits]
/// memory = "64MiB"            # linear memory per instance
/// fuel = 0                    # instructions per run, 0 = unlimited
/// message-bytes = "1MiB"
/// [wasi]
/// env = { GREETING = "hi" }
/// args = []
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct PluginManifest {
    /// Routine name; default: the file stem.
    #[serde(deserialize_with = "routine_name")]
    pub name: Option<String>,
    /// Replicas (at least 1; default 1).
    #[serde(deserialize_with = "positive_u32")]
    pub instances: u32,
    /// Restart policy (default `on-failure`: see [`Supervision::for_plugin`]).
    pub restart: RestartPolicy,
    /// Idle watchdog; zero turns it off (the default).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Mailbox capacity (at least 1; default [`DEFAULT_QUEUE_CAPACITY`]).
    #[serde(deserialize_with = "positive_usize")]
    pub queue_capacity: usize,
    /// Delivery attempts of one message before it goes to `dead-letter` (at least 1;
    /// default [`DEFAULT_MAX_DELIVERIES`](crate::supervisor::policy::DEFAULT_MAX_DELIVERIES)).
    #[serde(deserialize_with = "positive_u32")]
    pub max_deliveries: u32,
    /// Backoff between restarts.
    pub backoff: Backoff,
    /// Restart intensity limit.
    pub intensity: Intensity,
    /// Resource limits.
    pub limits: Limits,
    /// WASI grants.
    pub wasi: WasiGrants,
}

impl Default for PluginManifest {
    /// The one home of the manifest's defaults: the library's, with the plugin supervision
    /// of [`Supervision::for_plugin`].
    fn default() -> Self {
        let sup = Supervision::for_plugin();
        PluginManifest {
            name: None,
            instances: 1,
            restart: sup.restart,
            idle_timeout: Duration::ZERO,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_deliveries: sup.max_deliveries,
            backoff: sup.backoff,
            intensity: sup.intensity,
            limits: Limits::default(),
            wasi: WasiGrants::default(),
        }
    }
}

impl PluginManifest {
    /// Parses manifest text; `path` names it in errors.
    pub fn from_str(path: &Path, text: &str) -> Result<Self, ManifestError> {
        parse_toml(path, text)
    }

    /// Reads and parses a manifest file.
    pub fn from_file(path: &Path) -> Result<Self, ManifestError> {
        read_toml(path)
    }

    /// The routine names this manifest spawns: `name`, or `name-1 .. name-N`.
    pub fn routine_names(&self, stem: &str) -> Vec<String> {
        let base = self.name.clone().unwrap_or_else(|| stem.to_string());
        if self.instances <= 1 {
            vec![base]
        } else {
            (1..=self.instances).map(|i| format!("{base}-{i}")).collect()
        }
    }

    /// Spawn options of one routine of this plugin.
    pub fn spawn_options(&self, name: String) -> SpawnOptions {
        let mut o = SpawnOptions::new(name)
            .queue_capacity(self.queue_capacity)
            .message_bytes(self.limits.message_bytes.0)
            .supervision(Supervision {
                restart: self.restart,
                backoff: self.backoff.clone(),
                intensity: self.intensity.clone(),
                max_deliveries: self.max_deliveries,
            });
        if !self.idle_timeout.is_zero() {
            o = o.idle_timeout(self.idle_timeout);
        }
        o
    }

    /// The wasm options (limits and WASI grants).
    pub fn wasm_options(&self) -> WasmOptions {
        WasmOptions {
            memory: self.limits.memory.0,
            fuel: self.limits.fuel,
            env: self.wasi.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            args: self.wasi.args.clone(),
        }
    }
}

/// Reads and parses a TOML file into `T`.
pub(super) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
        path: path.to_path_buf(),
        location: None,
        message: e.to_string(),
    })?;
    parse_toml(path, &text)
}

/// Parses TOML into `T`; errors name the file, line and column.
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ManifestError> {
    toml::from_str(text).map_err(|e| {
        let location = e.span().map(|s| line_col(text, s.start));
        ManifestError { path: path.to_path_buf(), location, message: e.message().to_string() }
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}
