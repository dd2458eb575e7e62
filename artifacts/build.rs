//! Builds the example and test guests (`examples/guests`, a separate cargo workspace) for
//! `wasm32-wasip2` into `$OUT_DIR/guests-target`, and assembles the demo plugin directory
//! `$OUT_DIR/demo-plugins`: every file of `examples/plugins` (the manifests) plus the
//! example guests it runs. Nothing is written into the source tree. The pattern is
//! wasmtime's `crates/test-programs/artifacts/build.rs`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
/// Guests that the demo runs (the others are for tests).
const PLUGINS: &[&str] = &["ticker", "echo", "producer", "consumer", "crasher", "spinner"];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let guests = root.join("examples/guests");
    for p in [
        "examples/guests",
        "examples/plugins",
        "guest-sdk/src",
        "guest-sdk/wit",
        "guest-sdk/Cargo.toml",
        "wit",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    assert!(guests.exists(), "{} is missing", guests.display());
    check_target();

    let target_dir = out_dir.join("guests-target");
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
    let built = target_dir.join(TARGET).join("release");
    println!("cargo:rustc-env=GORCH_GUEST_DIR={}", built.display());

    // The demo directory: the manifests of `examples/plugins` and the example guests.
    let demo = out_dir.join("demo-plugins");
    std::fs::create_dir_all(&demo).unwrap_or_else(|e| panic!("{}: {e}", demo.display()));
    let mut wanted = BTreeSet::new();
    let plugins = root.join("examples/plugins");
    let entries =
        std::fs::read_dir(&plugins).unwrap_or_else(|e| panic!("{}: {e}", plugins.display()));
    for entry in entries {
        let entry = entry.unwrap_or_else(|e| panic!("{}: {e}", plugins.display()));
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            copy_if_changed(&entry.path(), &demo.join(entry.file_name()));
            wanted.insert(entry.file_name());
        }
    }
    for name in PLUGINS {
        let file = OsString::from(format!("{name}.wasm"));
        copy_if_changed(&built.join(&file), &demo.join(&file));
        wanted.insert(file);
    }
    // Files dropped from `examples/plugins` since the last build.
    for entry in std::fs::read_dir(&demo).unwrap_or_else(|e| panic!("{}: {e}", demo.display())) {
        let entry = entry.unwrap_or_else(|e| panic!("{}: {e}", demo.display()));
        if !wanted.contains(&entry.file_name()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    println!("cargo:rustc-env=GORCH_DEMO_PLUGINS_DIR={}", demo.display());
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
