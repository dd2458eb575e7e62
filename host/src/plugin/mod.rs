//! Plugins: a directory of `NAME.wasm` components, each with an optional `NAME.toml`
//! manifest, and an optional `gorch.toml` for groups.
//!
//! - [`manifest`]: [`PluginManifest`] and its tables, parsed with located errors;
//! - [`dir`]: [`PluginDir::scan`], group order, and [`PluginError`];
//! - [`start`]: loading and spawning what a scan found, concurrently;
//! - [`reload`]: applying what changed in the directory to a running host (live upgrade);
//! - [`status`]: each plugin's load status ([`PluginBoard`]), for `/readyz`, the JSON API and
//!   the dashboard.

pub mod dir;
pub mod manifest;
mod parse;
pub mod reload;
pub mod start;
pub mod status;

pub use dir::{
    ClusterSection, DIR_CONFIG, DirConfig, GroupConfig, PluginDir, PluginError, PluginSpec,
};
pub use manifest::{ByteSize, Limits, ManifestError, PluginManifest, SizeError, WasiGrants};
pub use reload::{PluginChange, ReloadAction, ReloadReport, Reloader};
pub use start::{StartReport, start_plugins};
pub use status::{LoadState, PluginBoard, PluginStatus};
