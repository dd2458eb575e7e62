//! The demo: `gorch-host run` on the demo plugin directory that `gorch-artifacts` assembles
//! under `target/` (the manifests of `examples/plugins` next to the example guests, built
//! for `wasm32-wasip2` by its build script).
//!
//! ```sh
//! cargo run --release -p gorch-demo [-- --addr 127.0.0.1:9191 ...]
//! ```
//!
//! Extra arguments are passed on to `gorch-host run` after the directory; the dashboard is
//! at <http://127.0.0.1:9090/gorchestra> by default.

use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = gorch_artifacts::DEMO_PLUGINS_DIR;
    println!("gorch-host demo: running the plugins in {dir}");
    let args = ["gorch-host", "run", dir].into_iter().map(OsString::from);
    gorch_host::cli::main(args.chain(std::env::args_os().skip(1)))
}
