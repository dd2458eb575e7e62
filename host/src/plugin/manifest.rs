//! Plugin manifests (`NAME.toml` beside `NAME.wasm`): the keys, their defaults (each
//! written once: `PluginManifest::default`, built from the library's own defaults), and
//! parsing with errors that name the file, line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub(super) use super::parse::{parse_toml, read_toml};

use crate::names::validate_routine_name;
use crate::orchestrator::{DEFAULT_MESSAGE_BYTES, DEFAULT_QUEUE_CAPACITY, SpawnOptions};
use crate::supervisor::{Backoff, Intensity, RestartPolicy, Supervision};
use crate::wasm::{DEFAULT_MEMORY_LIMIT, EngineConfig, Metering, WasmOptions};

/// The most `instances` one manifest, and all the manifests of a directory together, may ask
/// for: the scale gorch-host is built and tested for (see `BENCHMARKS.md`). Beyond it the
/// instance pool and the memory of one machine do not hold them: run more hosts.
pub const MAX_INSTANCES: u32 = 100_000;
/// The largest `queue-capacity`.
pub const MAX_QUEUE_CAPACITY: usize = 1_000_000;
/// The largest `limits.memory` and `limits.message-bytes`: 4 GiB, all a wasm32 guest can
/// address.
pub const MAX_WASM32_BYTES: u64 = 4 << 30;
/// The shortest nonzero `idle-timeout`: two epoch ticks. A shorter watchdog times a routine
/// out before it can beat (a `TIMED_OUT` loop).
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_millis(10);
/// The longest `idle-timeout`: one year.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(31_557_600);
/// The most characters of a value an error message quotes; longer values are cut with `…`.
pub const MAX_ECHO_CHARS: usize = 80;

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

/// A size in bytes: an integer, or a string such as `"64MiB"`, `"512KiB"`, `"1GB"`. Shown
/// in the largest binary unit that divides it (`64MiB`, `1000B`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number where one was expected.
    #[error("invalid size {}: expected e.g. \"64MiB\"", echo(.0))]
    Invalid(String),
    /// An unknown unit.
    #[error(
        "invalid size unit {} in {}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB",
        echo(.unit),
        echo(.input)
    )]
    Unit {
        /// The unit as written.
        unit: String,
        /// The whole size as written.
        input: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("size {} is too large", echo(.0))]
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
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(SizeError::Unit { unit: other.to_string(), input: s.to_string() });
            }
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| SizeError::TooLarge(s.to_string()))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
            if n != 0 && n.trailing_zeros() >= shift {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}B")
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
#[serde(try_from = "RawLimits")]
pub struct Limits {
    /// Linear memory per instance (default 64MiB; at most [`MAX_WASM32_BYTES`]).
    pub memory: ByteSize,
    /// Fuel (instructions) per run; 0 = unlimited (default). Only with `metering = "fuel"`.
    pub fuel: u64,
    /// Largest message the plugin may send or publish (default 1MiB; at least 1 byte, at
    /// most [`MAX_WASM32_BYTES`]).
    pub message_bytes: ByteSize,
    /// How the plugin is accounted for: `fuel` (the default: exact fuel counts, a fuel
    /// limit possible) or `time` (no fuel instrumentation, faster compute; busy time only).
    pub metering: Metering,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: ByteSize(DEFAULT_MEMORY_LIMIT),
            fuel: 0,
            message_bytes: ByteSize(DEFAULT_MESSAGE_BYTES),
            metering: Metering::Fuel,
        }
    }
}

/// `[limits]` as written, before the check across its keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
struct RawLimits {
    #[serde(deserialize_with = "memory_size")]
    memory: ByteSize,
    fuel: u64,
    #[serde(deserialize_with = "message_size")]
    message_bytes: ByteSize,
    metering: Metering,
}

impl Default for RawLimits {
    fn default() -> Self {
        let d = Limits::default();
        RawLimits {
            memory: d.memory,
            fuel: d.fuel,
            message_bytes: d.message_bytes,
            metering: d.metering,
        }
    }
}

impl TryFrom<RawLimits> for Limits {
    type Error = String;
    fn try_from(r: RawLimits) -> Result<Self, String> {
        if r.metering == Metering::Time && r.fuel > 0 {
            return Err(format!(
                "limits.fuel = {} needs limits.metering = \"fuel\", but it is \"time\" (no \
                 fuel is counted): remove limits.fuel or set metering = \"fuel\"",
                r.fuel
            ));
        }
        Ok(Limits {
            memory: r.memory,
            fuel: r.fuel,
            message_bytes: r.message_bytes,
            metering: r.metering,
        })
    }
}

/// The `[wasi]` table: what the sandbox grants (nothing by default).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct WasiGrants {
    /// Environment variables the guest sees (names non-empty, without `=` or NUL; values
    /// without NUL).
    #[serde(deserialize_with = "env_vars")]
    pub env: BTreeMap<String, String>,
    /// Arguments the guest sees (without NUL).
    #[serde(deserialize_with = "arg_list")]
    pub args: Vec<String>,
}

/// `s` quoted (as `{:?}` quotes), cut after [`MAX_ECHO_CHARS`] characters with `…` and how
/// many more there were: a 10 MB value gives a short message.
pub(crate) fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => {
            let more = s[cut..].chars().count();
            format!("{:?}… ({more} more characters)", &s[..cut])
        }
    }
}

fn custom<E: serde::de::Error>(msg: impl fmt::Display) -> E {
    E::custom(msg)
}

fn instances<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u64::deserialize(d)?;
    if v == 0 {
        return Err(custom("must be at least 1"));
    }
    if v > u64::from(MAX_INSTANCES) {
        return Err(custom(format!(
            "instances must be at most {MAX_INSTANCES} (MAX_INSTANCES: what one host's \
             instance pool and memory are tested to hold), got {v}; run the rest on another host"
        )));
    }
    Ok(v as u32)
}

fn queue_capacity<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let v = usize::deserialize(d)?;
    if v == 0 {
        return Err(custom("must be at least 1"));
    }
    if v > MAX_QUEUE_CAPACITY {
        return Err(custom(format!(
            "queue-capacity must be at most {MAX_QUEUE_CAPACITY} (MAX_QUEUE_CAPACITY), got {v}"
        )));
    }
    Ok(v)
}

fn idle_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v: Duration = humantime_serde::deserialize(d)?;
    let show = humantime::format_duration;
    if !v.is_zero() && v < MIN_IDLE_TIMEOUT {
        return Err(custom(format!(
            "idle-timeout must be 0 (off) or at least {} (MIN_IDLE_TIMEOUT), got {}: a shorter \
             watchdog times a routine out before it can beat",
            show(MIN_IDLE_TIMEOUT),
            show(v)
        )));
    }
    if v > MAX_IDLE_TIMEOUT {
        return Err(custom(format!(
            "idle-timeout must be at most {} (MAX_IDLE_TIMEOUT), got {}",
            show(MAX_IDLE_TIMEOUT),
            show(v)
        )));
    }
    Ok(v)
}

fn at_most_wasm32<E: serde::de::Error>(key: &str, v: ByteSize) -> Result<ByteSize, E> {
    if v.0 > MAX_WASM32_BYTES {
        return Err(custom(format!(
            "{key} must be at most {} (the wasm32 maximum), got {v}",
            ByteSize(MAX_WASM32_BYTES)
        )));
    }
    Ok(v)
}

fn memory_size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    at_most_wasm32("limits.memory", ByteSize::deserialize(d)?)
}

fn message_size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
    let v = ByteSize::deserialize(d)?;
    if v.0 == 0 {
        return Err(custom("limits.message-bytes must be at least 1"));
    }
    at_most_wasm32("limits.message-bytes", v)
}

/// An environment variable name: non-empty, no `=`, no NUL (the error points at it).
struct EnvKey(String);

impl<'de> Deserialize<'de> for EnvKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let k = String::deserialize(d)?;
        if k.is_empty() {
            return Err(custom("wasi.env: empty variable name"));
        }
        if k.contains('=') {
            return Err(custom(format!("wasi.env: variable name {} contains '='", echo(&k))));
        }
        if k.contains('\0') {
            return Err(custom(format!("wasi.env: variable name {} contains NUL", echo(&k))));
        }
        Ok(EnvKey(k))
    }
}

/// The value of environment variable `.0`: no NUL (the error points at it).
struct EnvValue<'a>(&'a str);

impl<'de> serde::de::DeserializeSeed<'de> for EnvValue<'_> {
    type Value = String;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        let v = String::deserialize(d)?;
        if v.contains('\0') {
            return Err(custom(format!("wasi.env: the value of {} contains NUL", echo(self.0))));
        }
        Ok(v)
    }
}

fn env_vars<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of environment variables")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(EnvKey(k)) = m.next_key()? {
                let v = m.next_value_seed(EnvValue(&k))?;
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

/// One `wasi.args` entry: no NUL (the error points at it).
struct Arg(String);

impl<'de> Deserialize<'de> for Arg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let a = String::deserialize(d)?;
        if a.contains('\0') {
            return Err(custom(format!("wasi.args: argument {} contains NUL", echo(&a))));
        }
        Ok(Arg(a))
    }
}

fn arg_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<Arg>::deserialize(d)?.into_iter().map(|a| a.0).collect())
}

fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let v = u32::deserialize(d)?;
    if v == 0 {
        return Err(serde::de::Error::custom("must be at least 1"));
    }
    Ok(v)
}

fn rollback_window<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v: Duration = humantime_serde::deserialize(d)?;
    crate::supervisor::check_bound("rollback-window", v).map_err(custom)?;
    Ok(v)
}

fn routine_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = String::deserialize(d)?;
    validate_routine_name(&v)
        .map_err(|r| serde::de::Error::custom(format!("invalid name {}: {r}", echo(&v))))?;
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
/// rollback-window = "60s"     # 0 = off
/// cluster-unique = false      # with --nats: true runs these names on one node only
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
/// metering = "fuel"           # fuel | time (time: no fuel instrumentation, no fuel limit)
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
    /// Replicas (at least 1, at most [`MAX_INSTANCES`]; default 1).
    #[serde(deserialize_with = "instances")]
    pub instances: u32,
    /// Restart policy (default `on-failure`: see [`Supervision::for_plugin`]).
    pub restart: RestartPolicy,
    /// Idle watchdog; zero turns it off (the default); else between [`MIN_IDLE_TIMEOUT`]
    /// and [`MAX_IDLE_TIMEOUT`].
    #[serde(deserialize_with = "idle_timeout")]
    pub idle_timeout: Duration,
    /// Mailbox capacity (at least 1, at most [`MAX_QUEUE_CAPACITY`]; default
    /// [`DEFAULT_QUEUE_CAPACITY`]).
    #[serde(deserialize_with = "queue_capacity")]
    pub queue_capacity: usize,
    /// Delivery attempts of one message before it goes to `dead-letter` (at least 1;
    /// default [`DEFAULT_MAX_DELIVERIES`](crate::defaults::DEFAULT_MAX_DELIVERIES)).
    #[serde(deserialize_with = "positive_u32")]
    pub max_deliveries: u32,
    /// See [`Supervision::rollback_window`]; zero turns the automatic rollback off.
    #[serde(deserialize_with = "rollback_window")]
    pub rollback_window: Duration,
    /// Backoff between restarts.
    pub backoff: Backoff,
    /// Restart intensity limit.
    pub intensity: Intensity,
    /// Resource limits.
    pub limits: Limits,
    /// WASI grants.
    pub wasi: WasiGrants,
    /// In a cluster (`--nats`): whether the routine names run on one node only (default
    /// false: the same plugin runs on every node that has it, and a plain-name send
    /// reaches one of them, this node's first).
    pub cluster_unique: bool,
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
            rollback_window: sup.rollback_window,
            backoff: sup.backoff,
            intensity: sup.intensity,
            limits: Limits::default(),
            wasi: WasiGrants::default(),
            cluster_unique: false,
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
            .cluster_unique(self.cluster_unique)
            .queue_capacity(self.queue_capacity)
            .message_bytes(self.limits.message_bytes.0)
            .supervision(Supervision {
                restart: self.restart,
                backoff: self.backoff.clone(),
                intensity: self.intensity.clone(),
                max_deliveries: self.max_deliveries,
                rollback_window: self.rollback_window,
            });
        if !self.idle_timeout.is_zero() {
            o = o.idle_timeout(self.idle_timeout);
        }
        o
    }

    /// Settings that are legal but useless with this engine, one sentence each (empty when
    /// there are none); the caller logs them. Today: a `limits.memory` above the pooling
    /// allocator's `memory_reservation` (a pooled memory cannot grow past it), and a
    /// `limits.message-bytes` above `limits.memory` (no such message fits in the guest).
    pub fn warnings(&self, engine: &EngineConfig) -> Vec<String> {
        let mut w = Vec::new();
        let memory = self.limits.memory;
        if engine.pooling && memory.0 > engine.memory_reservation {
            w.push(format!(
                "limits.memory = {memory} cannot be reached: the engine's memory reservation \
                 is {} (a pooled memory cannot grow past it); raise the reservation or lower \
                 limits.memory",
                ByteSize(engine.memory_reservation)
            ));
        }
        if self.limits.message_bytes.0 > memory.0 {
            w.push(format!(
                "limits.message-bytes = {} is more than limits.memory = {memory}: no message \
                 that large fits in the guest",
                self.limits.message_bytes
            ));
        }
        w
    }

    /// The wasm options (limits and WASI grants).
    pub fn wasm_options(&self) -> WasmOptions {
        WasmOptions {
            memory: self.limits.memory.0,
            fuel: self.limits.fuel,
            metering: self.limits.metering,
            env: self.wasi.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            args: self.wasi.args.clone(),
        }
    }
}
