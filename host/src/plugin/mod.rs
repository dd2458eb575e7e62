//! Plugins: a directory of `NAME.wasm` components, each with an optional `NAME.toml`
//! manifest, and an optional `gorch.toml` for groups.
//!
//! - `manifest`: [`PluginManifest`] and its tables, parsed with located errors;
//! - `dir`: [`PluginDir::scan`], group order, and [`PluginError`];
//! - `start`: loading and spawning what a scan found, concurrently ([`start_plugins`]);
//! - `reload`: applying what changed in the directory to a running host (live upgrade,
//!   [`Reloader`]);
//! - `status`: each plugin's load status ([`PluginBoard`]), for `/readyz`, the JSON API and
//!   the dashboard.

mod dir;
mod manifest;
mod parse;
mod reload;
mod start;
mod status;

pub use dir::{
    ClusterSection, DIR_CONFIG, DirConfig, GroupConfig, MAX_MANIFEST_BYTES, PluginDir, PluginError,
    PluginSpec,
};
pub use manifest::{
    ByteSize, Limits, MAX_ECHO_CHARS, MAX_IDLE_TIMEOUT, MAX_INSTANCES, MAX_QUEUE_CAPACITY,
    MAX_WASM32_BYTES, MIN_IDLE_TIMEOUT, ManifestError, PluginManifest, SizeError, WasiGrants,
};
pub use reload::{PluginChange, ReloadAction, ReloadReport, Reloader};
pub use start::{StartReport, start_plugins};
pub(crate) use status::about_file;
pub use status::{LoadState, PluginBoard, PluginStatus};
