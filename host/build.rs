//! Builds the example and test guests (`examples/guests`, a separate cargo workspace) for
//! `wasm32-wasip2`, so that `cargo build` and `cargo test` need no manual step, and copies
//! the example plugins next to their manifests in `examples/plugins`. The pattern is
//! wasmtime's `crates/test-programs/artifacts/build.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
/// Guests that `examples/plugins` runs (the others are for tests).
const PLUGINS: &[&str] = &["ticker", "echo", "producer", "consumer", "crasher", "spinner"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let guests = root.join("examples/guests");
    for p in ["examples/guests", "guest-sdk/src", "guest-sdk/Cargo.toml", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=GORCH_SKIP_GUESTS");
    // Outside this repository (e.g. a published crate) there is nothing to build.
    if !guests.exists() || std::env::var_os("GORCH_SKIP_GUESTS").is_some() {
        println!("cargo:rustc-env=GORCH_GUEST_DIR=");
        return;
    }
    check_target();

    let target_dir = root.join("target/guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    // Do not pass on what cargo set for this build (clippy's wrapper, rustflags for the
    // host target, ...): the guests are a separate build for another target.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let keep = k == "CARGO_HOME" || k == "CARGO_MAKEFLAGS" || k == "CARGO_NET_OFFLINE";
        if (k.starts_with("CARGO_") && !keep)
            || matches!(
                k.as_str(),
                "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER" | "RUSTFLAGS" | "CLIPPY_ARGS"
            )
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd.status().expect("cannot run cargo to build the guests");
    if !status.success() {
        panic!("building the guests in {} failed", guests.display());
    }
    let out = target_dir.join(TARGET).join("release");
    println!("cargo:rustc-env=GORCH_GUEST_DIR={}", out.display());

    let plugins = root.join("examples/plugins");
    for name in PLUGINS {
        let from = out.join(format!("{name}.wasm"));
        let to = plugins.join(format!("{name}.wasm"));
        copy_if_changed(&from, &to);
    }
}

fn copy_if_changed(from: &Path, to: &Path) {
    let new = std::fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    if std::fs::read(to).ok().as_deref() != Some(&new[..]) {
        std::fs::write(to, &new).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    }
}

fn check_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(sysroot) = sysroot
        && !Path::new(&sysroot).join("lib/rustlib").join(TARGET).exists()
    {
        panic!(
            "the {TARGET} target is not installed; run `rustup target add {TARGET}` \
             (the README's commands do this)"
        );
    }
}
