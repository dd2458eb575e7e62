//! The example and test guest components of this repository, built for `wasm32-wasip2` by
//! this crate's build script (into its `OUT_DIR`, never into the source tree), and the demo
//! plugin directory it assembles. Tests, benches and examples depend on this crate; the
//! `gorch-host` library does not, so it builds without a nested wasm build. The pattern is
//! wasmtime's `crates/test-programs/artifacts`.

use std::path::{Path, PathBuf};

/// Directory holding every built guest `.wasm` (`testkit.wasm`, `ticker.wasm`, ...).
pub const GUEST_DIR: &str = env!("GORCH_GUEST_DIR");

/// The demo plugin directory: the manifests of `examples/plugins` (including `gorch.toml`)
/// next to the example guests they configure (`ticker`, `echo`, `producer`, `consumer`,
/// `crasher`, `spinner`). Run it with `gorch-host run DEMO_PLUGINS_DIR`.
pub const DEMO_PLUGINS_DIR: &str = env!("GORCH_DEMO_PLUGINS_DIR");

/// The path of the built guest named `name` (`testkit`, `ticker`, `echo`, `hello-command`,
/// ...): `GUEST_DIR/name.wasm`.
pub fn path(name: &str) -> PathBuf {
    Path::new(GUEST_DIR).join(format!("{name}.wasm"))
}
