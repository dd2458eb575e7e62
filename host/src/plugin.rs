//! Plugin manifests (`NAME.toml` beside `NAME.wasm`) and plugin directories.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::orchestrator::{DEFAULT_MESSAGE_BYTES, DEFAULT_QUEUE_CAPACITY, SpawnOptions};
use crate::supervisor::{Backoff, Intensity, RestartPolicy, Strategy, Supervision};
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

impl ByteSize {
    /// Parses `"64MiB"`, `"1 GiB"`, `"4096"`, `"10KB"`.
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 =
            num.parse().map_err(|_| format!("invalid size {s:?}: expected e.g. \"64MiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}: use B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size {s:?} is too large"))
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

fn one() -> u32 {
    1
}
fn default_queue() -> usize {
    DEFAULT_QUEUE_CAPACITY
}
fn default_deliveries() -> u32 {
    3
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
    crate::bus::validate_routine_name(&v)
        .map_err(|r| serde::de::Error::custom(format!("invalid name {v:?}: {r}")))?;
    Ok(Some(v))
}

/// A plugin manifest, `NAME.toml` beside `NAME.wasm`. All keys are optional and kebab-case;
/// unknown keys are errors.
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
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PluginManifest {
    /// Routine name; default: the file stem.
    #[serde(default, deserialize_with = "routine_name")]
    pub name: Option<String>,
    /// Replicas (at least 1).
    #[serde(default = "one", deserialize_with = "positive_u32")]
    pub instances: u32,
    /// Restart policy.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Idle watchdog; zero turns it off (the default).
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Mailbox capacity (at least 1).
    #[serde(default = "default_queue", deserialize_with = "positive_usize")]
    pub queue_capacity: usize,
    /// Delivery attempts of one message before it goes to `dead-letter` (at least 1).
    #[serde(default = "default_deliveries", deserialize_with = "positive_u32")]
    pub max_deliveries: u32,
    /// Backoff between restarts.
    #[serde(default)]
    pub backoff: Backoff,
    /// Restart intensity limit.
    #[serde(default)]
    pub intensity: Intensity,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// WASI grants.
    #[serde(default)]
    pub wasi: WasiGrants,
}

impl Default for PluginManifest {
    fn default() -> Self {
        PluginManifest {
            name: None,
            instances: 1,
            restart: RestartPolicy::default(),
            idle_timeout: Duration::ZERO,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_deliveries: 3,
            backoff: Backoff::default(),
            intensity: Intensity::default(),
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
fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ManifestError> {
    let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
        path: path.to_path_buf(),
        location: None,
        message: e.to_string(),
    })?;
    parse_toml(path, &text)
}

/// Parses TOML into `T`; errors name the file, line and column.
fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ManifestError> {
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

/// One plugin found in a directory: its component file and its manifest.
#[derive(Debug, Clone)]
pub struct PluginSpec {
    /// The file stem (`echo` for `echo.wasm`).
    pub stem: String,
    /// The component file.
    pub wasm: PathBuf,
    /// The manifest (defaults when there is no `NAME.toml`).
    pub manifest: PluginManifest,
}

/// A plugin directory, scanned: the plugins that can be tried, and the problems found.
#[derive(Debug, Default)]
pub struct PluginDir {
    /// Plugins with a valid (or no) manifest: group members first, in group and start
    /// order, then the others by file name.
    pub plugins: Vec<PluginSpec>,
    /// The groups of `gorch.toml` (empty without one, or when it is invalid).
    pub groups: BTreeMap<String, GroupConfig>,
    /// Problems that keep a plugin from being tried, each naming its file.
    pub errors: Vec<String>,
}

/// The directory-wide configuration file: groups.
pub const DIR_CONFIG: &str = "gorch.toml";

/// `gorch.toml` of a plugin directory:
///
/// ```toml
/// [groups.pipeline]
/// strategy = "rest-for-one"          # one-for-one (default) | one-for-all | rest-for-one
/// members = ["producer", "consumer"] # plugin names, in start order
/// [groups.pipeline.intensity]        # the group's restart limit (default 5 within 10s)
/// max-restarts = 5
/// within = "10s"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirConfig {
    /// Groups by name.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupConfig>,
}

/// One `[groups.NAME]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GroupConfig {
    /// Restart strategy.
    #[serde(default)]
    pub strategy: Strategy,
    /// Plugin names (a manifest's `name`, or the file stem), in start order.
    pub members: Vec<String>,
    /// The group's restart intensity limit.
    #[serde(default)]
    pub intensity: Intensity,
}

impl DirConfig {
    /// Parses `gorch.toml` text; `path` names it in errors.
    pub fn from_str(path: &Path, text: &str) -> Result<Self, ManifestError> {
        parse_toml(path, text)
    }
}

impl PluginDir {
    /// How many routines the plugins ask for in all (their `instances`).
    pub fn instances(&self) -> usize {
        self.plugins.iter().map(|p| p.manifest.instances.max(1) as usize).sum()
    }

    /// Finds every `*.wasm` in `dir` with its optional `NAME.toml`.
    pub fn scan(dir: &Path) -> std::io::Result<PluginDir> {
        let mut out = PluginDir::default();
        let config_path = dir.join(DIR_CONFIG);
        if config_path.exists() {
            match read_toml::<DirConfig>(&config_path) {
                Ok(c) => out.groups = c.groups,
                Err(e) => out.errors.push(format!("{e} (groups ignored)")),
            }
        }
        let mut entries: Vec<PathBuf> =
            std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
        entries.sort();
        for path in &entries {
            let ext = path.extension().and_then(|e| e.to_str());
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            match ext {
                Some("wasm") => {
                    let toml = path.with_extension("toml");
                    let manifest = if toml.exists() {
                        match PluginManifest::from_file(&toml) {
                            Ok(m) => m,
                            Err(e) => {
                                out.errors.push(e.to_string());
                                continue;
                            }
                        }
                    } else {
                        PluginManifest::default()
                    };
                    out.plugins.push(PluginSpec { stem, wasm: path.clone(), manifest });
                }
                Some("toml")
                    if path.file_name().and_then(|n| n.to_str()) != Some(DIR_CONFIG)
                        && !path.with_extension("wasm").exists() =>
                {
                    out.errors.push(format!(
                        "{}: manifest without a component: no {stem}.wasm beside it",
                        path.display()
                    ));
                }
                _ => {}
            }
        }
        out.order_groups(&config_path);
        Ok(out)
    }

    /// The plugin name a group refers to: the manifest's `name`, or the file stem.
    pub fn plugin_name(spec: &PluginSpec) -> &str {
        spec.manifest.name.as_deref().unwrap_or(&spec.stem)
    }

    /// The group a plugin belongs to.
    pub fn group_of(&self, spec: &PluginSpec) -> Option<&str> {
        let name = Self::plugin_name(spec);
        self.groups
            .iter()
            .find(|(_, g)| g.members.iter().any(|m| m == name))
            .map(|(n, _)| n.as_str())
    }

    /// Checks group members and puts them first, in start order.
    fn order_groups(&mut self, config_path: &Path) {
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        let mut bad = Vec::new();
        for (gname, g) in &self.groups {
            for m in &g.members {
                if !self.plugins.iter().any(|p| Self::plugin_name(p) == m) {
                    bad.push(format!(
                        "{}: group {gname}: no plugin named {m:?} in this directory",
                        config_path.display()
                    ));
                }
                if let Some(other) = seen.insert(m, gname) {
                    bad.push(format!(
                        "{}: plugin {m:?} is in two groups ({other} and {gname})",
                        config_path.display()
                    ));
                }
            }
        }
        if !bad.is_empty() {
            self.errors.extend(bad);
            self.errors.push(format!("{}: groups ignored", config_path.display()));
            self.groups.clear();
            return;
        }
        let key = |p: &PluginSpec| -> (usize, usize) {
            let name = Self::plugin_name(p);
            self.groups
                .values()
                .enumerate()
                .find_map(|(gi, g)| g.members.iter().position(|m| m == name).map(|mi| (gi, mi)))
                .unwrap_or((usize::MAX, 0))
        };
        let mut plugins = std::mem::take(&mut self.plugins);
        plugins.sort_by_key(|p| key(p)); // stable: the others keep file-name order
        self.plugins = plugins;
    }
}
