//! A plugin directory: every `NAME.wasm` with its optional `NAME.toml`, and `gorch.toml`
//! (groups, cluster). Scanning reads manifests only; loading and starting is `plugin::start`. Only
//! regular files (or symlinks to them) are used: a FIFO, a device or a directory named like
//! a plugin or a manifest is reported by name and skipped, never opened for reading, and a
//! manifest is read only up to [`MAX_MANIFEST_BYTES`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::manifest::{ManifestError, PluginManifest, parse_toml, read_toml};
use crate::fsread;
use crate::supervisor::{Intensity, Strategy};
use crate::wasm::LoadError;

/// The directory-wide configuration file: groups.
pub const DIR_CONFIG: &str = "gorch.toml";

/// Largest manifest (or `gorch.toml`) read: a manifest is a few lines of TOML.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// A problem that keeps a plugin (or the groups) from being used. Each names the file, and
/// the plugin or group it is about.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// A plugin's manifest could not be read or is invalid: the plugin is skipped.
    #[error("{0}")]
    Manifest(ManifestError),
    /// `NAME.toml` without `NAME.wasm`.
    #[error("{}: manifest without a component: no {stem}.wasm beside it", path.display())]
    Orphan {
        /// The manifest.
        path: PathBuf,
        /// Its stem.
        stem: String,
    },
    /// `gorch.toml` could not be read or is invalid: groups are ignored.
    #[error("{0} (groups ignored; every plugin starts on its own)")]
    DirConfig(ManifestError),
    /// A group names a plugin that is not in the directory: groups are ignored.
    #[error("{}: group {group}: no plugin named {member:?} in this directory (groups ignored)", config.display())]
    UnknownMember {
        /// `gorch.toml`.
        config: PathBuf,
        /// The group.
        group: String,
        /// The missing plugin.
        member: String,
    },
    /// A plugin is a member of two groups: groups are ignored.
    #[error("{}: plugin {member:?} is in two groups ({first} and {second}) (groups ignored)", config.display())]
    TwoGroups {
        /// `gorch.toml`.
        config: PathBuf,
        /// The plugin.
        member: String,
        /// The first group naming it.
        first: String,
        /// The second.
        second: String,
    },
    /// Two plugins ask for one routine name: the later one (or the one not running) is
    /// refused, and nothing of it starts.
    #[error(
        "{}: routine name {name:?} is already taken by {} ({}): give one of them another \
         `name` in its manifest",
        path.display(), other.display(), if *running { "running" } else { "first in file order" }
    )]
    NameClash {
        /// The refused plugin's component.
        path: PathBuf,
        /// The routine name both ask for.
        name: String,
        /// The component of the plugin that keeps the name.
        other: PathBuf,
        /// Whether the other one already runs (a reload), or only comes first.
        running: bool,
    },
    /// The component could not be loaded (read, compiled, or fitted to the world).
    #[error("{0}")]
    Load(#[from] crate::wasm::LoadError),
    /// The manifests of a directory ask for more routines in all than one host holds: none
    /// is started (see [`PluginDir::check_instances`]).
    #[error(
        "{}: the manifests ask for {total} instances in all, more than {max} (MAX_INSTANCES: \
         what one host's instance pool and memory are tested to hold); lower their \
         `instances` or split the plugins across hosts",
        dir.display()
    )]
    TooManyInstances {
        /// The plugin directory.
        dir: PathBuf,
        /// The sum of the manifests' `instances`.
        total: usize,
        /// [`MAX_INSTANCES`](super::manifest::MAX_INSTANCES).
        max: usize,
    },
}

impl PluginError {
    /// The file the problem is in.
    pub fn path(&self) -> &Path {
        match self {
            PluginError::Manifest(e) | PluginError::DirConfig(e) => &e.path,
            PluginError::Orphan { path, .. } | PluginError::NameClash { path, .. } => path,
            PluginError::UnknownMember { config, .. } | PluginError::TwoGroups { config, .. } => {
                config
            }
            PluginError::Load(e) => e.path(),
            PluginError::TooManyInstances { dir, .. } => dir,
        }
    }

    /// Whether the problem is in the directory's `gorch.toml` (the groups), not in a plugin.
    pub fn is_dir_config(&self) -> bool {
        matches!(
            self,
            PluginError::DirConfig(_)
                | PluginError::UnknownMember { .. }
                | PluginError::TwoGroups { .. }
        )
    }
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
    /// The `[cluster]` table of `gorch.toml`, if any.
    pub cluster: Option<ClusterSection>,
    /// Problems that keep a plugin from being tried, each naming its file.
    pub errors: Vec<PluginError>,
}

/// `gorch.toml` of a plugin directory:
///
/// ```toml
/// [groups.pipeline]
/// strategy = "rest-for-one"          # one-for-one (default) | one-for-all | rest-for-one
/// members = ["producer", "consumer"] # plugin names, in start order
/// [groups.pipeline.intensity]        # the group's restart limit (default 5 within 10s)
/// max-restarts = 5
/// within = "10s"
///
/// [cluster]                          # join a cluster (the --nats / --node flags win)
/// nats = "nats://127.0.0.1:4222"
/// node = "a"                         # default: the host name
/// ack-wait = "10s"                   # redelivery after a consumer's host died
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DirConfig {
    /// Groups by name.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupConfig>,
    /// The `[cluster]` table.
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
}

/// The `[cluster]` table of `gorch.toml`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClusterSection {
    /// NATS URL.
    pub nats: Option<String>,
    /// This node's name.
    pub node: Option<String>,
    /// A NATS credentials file.
    pub creds: Option<PathBuf>,
    /// JetStream ack wait of the topic consumers.
    #[serde(default, with = "humantime_serde")]
    pub ack_wait: Option<Duration>,
    /// Node-local topics: names, or patterns where `*` matches any run of characters. They
    /// stay in this node's memory (local speed; lost with the host).
    #[serde(default)]
    pub local_topics: Vec<String>,
    /// Replicas of the streams and key-value buckets this node creates (1 for one
    /// nats-server; 3 for a NATS cluster of three or more).
    pub replicas: Option<usize>,
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

    /// The sum of the plugins' `instances` ([`PluginDir::instances`]), or
    /// [`PluginError::TooManyInstances`] (naming `dir`, the directory scanned) when it is
    /// above [`MAX_INSTANCES`](super::manifest::MAX_INSTANCES): call it before starting any.
    pub fn check_instances(&self, dir: &Path) -> Result<usize, PluginError> {
        let total = self.instances();
        let max = super::manifest::MAX_INSTANCES as usize;
        if total > max {
            return Err(PluginError::TooManyInstances { dir: dir.to_path_buf(), total, max });
        }
        Ok(total)
    }

    /// Finds every `*.wasm` in `dir` with its optional `NAME.toml`. A `NAME.wasm` that is
    /// not a regular file is reported ([`LoadError::NotRegularFile`]) and skipped, and so is a
    /// plugin whose manifest is not one; neither is opened.
    ///
    /// Two plugins asking for one routine name are a [`PluginError::NameClash`]: the first
    /// file in name order keeps it (see [`scan_owned`](Self::scan_owned) for a running host).
    pub fn scan(dir: &Path) -> std::io::Result<PluginDir> {
        PluginDir::scan_owned(dir, &BTreeMap::new())
    }

    /// Like [`scan`](Self::scan) on a directory some of whose plugins run: `owned` maps each
    /// running routine name to its plugin (file stem) and component file. A name keeps its
    /// owner; a plugin asking for a name another plugin owns, or one an earlier file asks
    /// for, is refused as a [`PluginError::NameClash`] naming both files.
    pub fn scan_owned(
        dir: &Path,
        owned: &BTreeMap<String, (String, PathBuf)>,
    ) -> std::io::Result<PluginDir> {
        let mut out = PluginDir::scan_files(dir)?;
        out.refuse_name_clashes(owned);
        Ok(out)
    }

    /// Moves every plugin that asks for a routine name taken before it to `errors`: the
    /// plugins that own names in `owned` claim theirs first, the others follow in file order.
    fn refuse_name_clashes(&mut self, owned: &BTreeMap<String, (String, PathBuf)>) {
        let mut claims: BTreeMap<String, (&str, &Path, bool)> = owned
            .iter()
            .map(|(n, (stem, path))| (n.clone(), (stem.as_str(), path.as_path(), true)))
            .collect();
        let owns = |p: &PluginSpec| owned.values().any(|(stem, _)| stem == &p.stem);
        let order =
            self.plugins.iter().filter(|p| owns(p)).chain(self.plugins.iter().filter(|p| !owns(p)));
        let mut refused = Vec::new();
        for spec in order {
            let names = spec.manifest.routine_names(&spec.stem);
            let clash = names.iter().find_map(|n| match claims.get(n) {
                Some(&(stem, other, running)) if stem != spec.stem => Some((n, other, running)),
                _ => None,
            });
            match clash {
                Some((name, other, running)) => refused.push(PluginError::NameClash {
                    path: spec.wasm.clone(),
                    name: name.clone(),
                    other: other.to_path_buf(),
                    running,
                }),
                None => {
                    for n in names {
                        claims.entry(n).or_insert((spec.stem.as_str(), spec.wasm.as_path(), false));
                    }
                }
            }
        }
        let gone: Vec<PathBuf> = refused.iter().map(|e| e.path().to_path_buf()).collect();
        self.plugins.retain(|p| !gone.contains(&p.wasm));
        self.errors.extend(refused);
    }

    /// The plugins and manifests of `dir`, read (see [`scan`](Self::scan)).
    fn scan_files(dir: &Path) -> std::io::Result<PluginDir> {
        let mut out = PluginDir::default();
        let config_path = dir.join(DIR_CONFIG);
        if config_path.exists() {
            match read_toml::<DirConfig>(&config_path) {
                Ok(c) => {
                    out.groups = c.groups;
                    out.cluster = c.cluster;
                }
                Err(e) => out.errors.push(PluginError::DirConfig(e)),
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
                    match std::fs::metadata(path) {
                        Ok(m) if !m.is_file() => {
                            let kind = fsread::kind(&m);
                            out.errors.push(
                                LoadError::NotRegularFile { path: path.clone(), kind }.into(),
                            );
                            continue;
                        }
                        _ => {} // a regular file, or an error that loading will report
                    }
                    let toml = path.with_extension("toml");
                    let manifest = if toml.exists() {
                        match PluginManifest::from_file(&toml) {
                            Ok(m) => m,
                            Err(e) => {
                                out.errors.push(PluginError::Manifest(e));
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
                    out.errors.push(PluginError::Orphan { path: path.clone(), stem });
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
                    bad.push(PluginError::UnknownMember {
                        config: config_path.to_path_buf(),
                        group: gname.clone(),
                        member: m.clone(),
                    });
                }
                if let Some(other) = seen.insert(m, gname) {
                    bad.push(PluginError::TwoGroups {
                        config: config_path.to_path_buf(),
                        member: m.clone(),
                        first: other.to_string(),
                        second: gname.clone(),
                    });
                }
            }
        }
        if !bad.is_empty() {
            self.errors.extend(bad);
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
