//! `gorch-host new NAME [--lang rust|python|js] [--dir D]`: writes a ready-to-build guest
//! project: the worker (a Rust crate on `gorch-guest-sdk`, or `app.py` / `app.js` with the
//! helper layer and the WIT it builds against), `build.sh`, `plugins/NAME.toml` with every
//! manifest key commented, and a README of three commands (build, check, run).
//!
//! The Python and JavaScript helper layers, their pinned tool versions and the WIT are the
//! repository's own files (`examples/guests-py`, `examples/guests-js`, `guest-sdk/wit`),
//! compiled in: a generated project builds against exactly what this host was built with.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::names::validate_routine_name;
use crate::wasm::DEFAULT_MEMORY_LIMIT;

/// The directory of a Rust project that holds its copy of `gorch-guest-sdk`.
pub const SDK_DIR: &str = "gorch-guest-sdk";
/// The wit-bindgen version the SDK is built with (the workspace's).
const WIT_BINDGEN: &str = "0.60";

/// `gorch-host new NAME [--lang rust|python|js] [--dir D]`.
#[derive(Debug, clap::Args)]
pub struct NewCmd {
    /// Project, plugin and routine name: ASCII letters, digits, '-' and '_', starting with
    /// a letter (it names a directory, a package and a file).
    pub name: String,
    /// Language of the worker.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    pub lang: Lang,
    /// Directory to create the project in (as DIR/NAME; it must not exist yet).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Rust only: depend on the gorch-guest-sdk crate at this path (a clone's `guest-sdk`
    /// directory) instead of the copy written into the project.
    #[arg(long, env = "GORCH_SDK_PATH", value_name = "PATH")]
    pub sdk_path: Option<PathBuf>,
}

/// The languages `new` writes a worker in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// A cdylib crate on gorch-guest-sdk, built with cargo for wasm32-wasip2.
    Rust,
    /// app.py and the `gorch` package, built with componentize-py.
    Python,
    /// app.js and gorch.js, built with componentize-js.
    Js,
}

const WIT: &str = include_str!("../../../guest-sdk/wit/worker.wit");
const MANIFEST: &str = include_str!("templates/manifest.toml");
const README: &str = include_str!("templates/README.md");
const GITIGNORE: &str = include_str!("templates/gitignore");

const RUST_CARGO: &str = include_str!("templates/rust/Cargo.toml");
const RUST_LIB: &str = include_str!("templates/rust/lib.rs");
const RUST_BUILD: &str = include_str!("templates/rust/build.sh");
const SDK_CARGO: &str = include_str!("templates/rust/sdk-Cargo.toml");
const SDK_LIB: &str = include_str!("../../../guest-sdk/src/lib.rs");
const SDK_README: &str = include_str!("../../../guest-sdk/README.md");

const PY_APP: &str = include_str!("templates/python/app.py");
const PY_BUILD: &str = include_str!("templates/python/build.sh");
const PY_REQUIREMENTS: &str = include_str!("../../../examples/guests-py/requirements.txt");
const PY_GORCH: &[(&str, &str)] = &[
    ("gorch/__init__.py", include_str!("../../../examples/guests-py/gorch/__init__.py")),
    ("gorch/_errors.py", include_str!("../../../examples/guests-py/gorch/_errors.py")),
    ("gorch/bus.py", include_str!("../../../examples/guests-py/gorch/bus.py")),
    ("gorch/mailbox.py", include_str!("../../../examples/guests-py/gorch/mailbox.py")),
];

const JS_APP: &str = include_str!("templates/js/app.js");
const JS_BUILD: &str = include_str!("templates/js/build.sh");
const JS_GORCH: &str = include_str!("../../../examples/guests-js/gorch.js");
const JS_PACKAGE: &str = include_str!("../../../examples/guests-js/package.json");
const JS_LOCK: &str = include_str!("../../../examples/guests-js/package-lock.json");
/// The example's package name, replaced by the project's in package.json and its lock.
const JS_EXAMPLE_NAME: &str = "\"name\": \"gorch-guests-js\"";

/// The Python project's requirements: the example's pins, with the project's own comment
/// (the example's names the repository's build script).
fn py_requirements() -> String {
    let pins: String = PY_REQUIREMENTS
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("# The build tool (build.sh installs it into .venv here).\n{pins}")
}

/// The default `limits.memory` as the manifest writes it ("64MiB"): the Python and
/// JavaScript interpreters fit in it too.
fn default_memory() -> String {
    format!("{}MiB", DEFAULT_MEMORY_LIMIT >> 20)
}

impl NewCmd {
    /// Writes the project; prints where and what to do next.
    pub fn run(self) -> anyhow::Result<()> {
        let dir = self.dir.join(&self.name);
        let files = self.files()?;
        write_project(&dir, &files)?;
        println!("created {} ({} worker); next:", dir.display(), self.lang.label());
        println!("  cd {}", dir.display());
        println!("  ./build.sh");
        println!("  gorch-host check plugins/{}.wasm", self.name);
        println!("  gorch-host run plugins/");
        Ok(())
    }

    /// The project's files (path relative to the project directory, contents, executable).
    pub fn files(&self) -> anyhow::Result<Vec<(PathBuf, String, bool)>> {
        validate_project_name(&self.name)?;
        let name = self.name.as_str();
        let crate_name = name.replace('-', "_");
        let sdk = match &self.sdk_path {
            Some(p) => {
                let p = std::path::absolute(p)
                    .with_context(|| format!("--sdk-path {}", p.display()))?;
                format!("gorch-guest-sdk = {{ path = {} }}", toml_string(&p.to_string_lossy()))
            }
            None => format!("gorch-guest-sdk = {{ path = {} }}", toml_string(SDK_DIR)),
        };
        let fill = |t: &str| {
            t.replace("{{name}}", name)
                .replace("{{crate}}", &crate_name)
                .replace("{{sdk_dependency}}", &sdk)
                .replace("{{memory}}", &default_memory())
        };
        let mut files = vec![
            (format!("plugins/{name}.toml"), fill(MANIFEST), false),
            (".gitignore".to_string(), GITIGNORE.to_string(), false),
        ];
        let (source, build_what, notes) = match self.lang {
            Lang::Rust => {
                files.push(("Cargo.toml".into(), fill(RUST_CARGO), false));
                files.push(("src/lib.rs".into(), fill(RUST_LIB), false));
                files.push(("build.sh".into(), fill(RUST_BUILD), true));
                if self.sdk_path.is_none() {
                    let cargo = SDK_CARGO
                        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
                        .replace("{{wit_bindgen}}", WIT_BINDGEN);
                    files.push((format!("{SDK_DIR}/Cargo.toml"), cargo, false));
                    files.push((format!("{SDK_DIR}/src/lib.rs"), SDK_LIB.to_string(), false));
                    files.push((format!("{SDK_DIR}/wit/worker.wit"), WIT.to_string(), false));
                    files.push((format!("{SDK_DIR}/README.md"), SDK_README.to_string(), false));
                }
                (
                    "src/lib.rs",
                    "`cargo build --release --target wasm32-wasip2`, then a copy (cargo names \
                     the file after the crate, with `-` as `_`)",
                    "\n`build.sh` needs rustup's `wasm32-wasip2` target once: `rustup target add\n\
                     wasm32-wasip2` (it adds it when rustup is there). The SDK's API: `cargo doc\n\
                     --open` (`gorch_guest_sdk`). `gorch-guest-sdk/` is the SDK this gorch-host\n\
                     carries, WIT included, so the project builds wherever it is; to follow\n\
                     another copy, point the `gorch-guest-sdk` dependency in `Cargo.toml` at it\n\
                     (`path = \"...\"` or `git = \"...\"`) and delete the directory\n\
                     (`gorch-host new --sdk-path DIR` writes such a path).\n",
                )
            }
            Lang::Python => {
                files.push(("app.py".into(), fill(PY_APP), false));
                files.push(("build.sh".into(), fill(PY_BUILD), true));
                files.push(("requirements.txt".into(), py_requirements(), false));
                files.push(("wit/worker.wit".into(), WIT.to_string(), false));
                for (path, text) in PY_GORCH {
                    files.push(((*path).into(), (*text).to_string(), false));
                }
                (
                    "app.py",
                    "componentize-py, which the script installs into `.venv`",
                    "\n`build.sh` needs python3 with venv (Debian: `apt-get install python3-venv`).\n\
                     The `gorch` package mirrors the Rust SDK: `beat`, `name`, `info`,\n\
                     `mailbox.recv`/`recv_timeout`/`send`/`recv_json`, `bus.publish`/`recv`/\n\
                     `publish_json`, and the `gorch.Cancelled` exception.\n",
                )
            }
            Lang::Js => {
                files.push(("app.js".into(), fill(JS_APP), false));
                files.push(("build.sh".into(), fill(JS_BUILD), true));
                files.push(("gorch.js".into(), JS_GORCH.to_string(), false));
                files.push(("wit/worker.wit".into(), WIT.to_string(), false));
                let package_name = format!("\"name\": {}", json_string(name));
                let package = JS_PACKAGE
                    .replace(JS_EXAMPLE_NAME, &package_name)
                    .replace("../../scripts/build-guests-js.sh", "./build.sh");
                files.push(("package.json".into(), package, false));
                files.push((
                    "package-lock.json".into(),
                    JS_LOCK.replace(JS_EXAMPLE_NAME, &package_name),
                    false,
                ));
                (
                    "app.js",
                    "componentize-js, which the script installs with `npm ci`",
                    "\n`build.sh` needs node and npm (Debian: `apt-get install nodejs npm`).\n\
                     `gorch.js` mirrors the Rust SDK in camelCase: `beat`, `name`, `info`,\n\
                     `mailbox.recv`/`recvTimeout`/`send`/`recvJson`, `bus.publish`/`recv`/\n\
                     `publishJson`, and the `Cancelled` error.\n",
                )
            }
        };
        let readme = fill(README)
            .replace("{{language}}", self.lang.label())
            .replace("{{source}}", source)
            .replace("{{build_what}}", build_what)
            .replace("{{notes}}", notes);
        files.push(("README.md".into(), readme, false));
        Ok(files.into_iter().map(|(p, t, x)| (PathBuf::from(p), t, x)).collect())
    }
}

impl Lang {
    fn label(self) -> &'static str {
        match self {
            Lang::Rust => "Rust",
            Lang::Python => "Python",
            Lang::Js => "JavaScript",
        }
    }
}

/// A project name: a valid routine name (see [`crate::names`]) that also works as a
/// directory, a cargo package, an npm package and a file stem.
pub fn validate_project_name(name: &str) -> anyhow::Result<()> {
    validate_routine_name(name).map_err(|e| anyhow::anyhow!("invalid name {name:?}: {e}"))?;
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!(
            "invalid name {name:?}: use ASCII letters, digits, '-' and '_', starting with a \
             letter (it names a directory, a package and a file)"
        );
    }
    if name.len() > 64 {
        bail!("invalid name {name:?}: at most 64 characters (it names a package)");
    }
    Ok(())
}

/// Creates `dir` (refusing an existing one) and writes `files` into it.
fn write_project(dir: &Path, files: &[(PathBuf, String, bool)]) -> anyhow::Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    // create_dir (not _all) fails if anything is there already: never overwrite.
    std::fs::create_dir(dir).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => {
            anyhow::anyhow!("{} already exists; not overwriting it", dir.display())
        }
        _ => anyhow::Error::new(e).context(format!("cannot create {}", dir.display())),
    })?;
    for (rel, text, executable) in files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        #[cfg(unix)]
        if *executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("cannot make {} executable", path.display()))?;
        }
    }
    Ok(())
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_work_as_directories_packages_and_files() {
        for ok in ["hello", "job-producer", "a_b-9", "W"] {
            validate_project_name(ok).unwrap();
        }
        for bad in ["", "9lives", "-x", "has space", "a/b", "a.b", "é", "x\u{202e}y", "..", "."] {
            assert!(validate_project_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_project_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn the_js_example_name_is_replaced_in_package_json_and_its_lock() {
        assert_eq!(JS_PACKAGE.matches(JS_EXAMPLE_NAME).count(), 1);
        assert_eq!(JS_LOCK.matches(JS_EXAMPLE_NAME).count(), 2);
        assert_eq!(JS_PACKAGE.matches("../../scripts/build-guests-js.sh").count(), 1);
    }

    #[test]
    fn the_python_requirements_keep_the_pins_but_not_the_repository_s_comment() {
        let r = py_requirements();
        assert!(r.contains("componentize-py=="), "{r}");
        assert!(!r.contains("scripts/") && !r.contains("target/"), "{r}");
    }
}
