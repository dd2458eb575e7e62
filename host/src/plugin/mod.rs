//! Plugins: a directory of `NAME.wasm` components, each with an optional `NAME.toml`
//! manifest, and an optional `gorch.toml` for groups.
//!
//! - [`manifest`]: [`PluginManifest`] and its tables, parsed with located errors;
//! - [`dir`]: [`PluginDir::scan`], group order, and [`PluginError`];
//! - [`start`]: loading and spawning what a scan found.

pub mod dir;
pub mod manifest;
pub mod start;

pub use dir::{DIR_CONFIG, DirConfig, GroupConfig, PluginDir, PluginError, PluginSpec};
pub use manifest::{ByteSize, Limits, ManifestError, PluginManifest, SizeError, WasiGrants};
pub use start::start_plugins;
