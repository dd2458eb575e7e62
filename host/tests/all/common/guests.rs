//! Guests the tests build: a generated component that is slow to compile, and the Python
//! and JavaScript examples (built by their scripts, compiled once into a compile cache under
//! the target directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use gorch_host::{EngineConfig, WasmComponent, WasmEngine};

use crate::common::fs::repo_root;
use crate::common::{assert_no_leaked_tasks, capture_log};

/// A component holding a large core module: seconds of Cranelift work, then refused (it
/// exports no `run`). It stands for an 18 MB Python guest.
pub fn slow_component() -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, Component, ExportKind, ExportSection, Function, FunctionSection, Module,
        ModuleSection, TypeSection, ValType,
    };
    let mut types = TypeSection::new();
    types.ty().function([ValType::I32], [ValType::I32]);
    let mut funcs = FunctionSection::new();
    let mut code = CodeSection::new();
    let mut exports = ExportSection::new();
    for i in 0..3000u32 {
        funcs.function(0);
        let mut f = Function::new([]);
        let mut ins = f.instructions();
        for k in 0..200 {
            ins.local_get(0).i32_const(k).i32_mul().i32_const(i as i32).i32_xor().local_set(0);
        }
        ins.local_get(0).end();
        code.function(&f);
        exports.export(&format!("f{i}"), ExportKind::Func, i);
    }
    let mut module = Module::new();
    module.section(&types).section(&funcs).section(&exports).section(&code);
    let mut component = Component::new();
    component.section(&ModuleSection(&module));
    component.finish()
}

/// A guest language other than Rust, and how its example is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Python,
    Js,
}

impl Lang {
    fn script(self) -> &'static str {
        match self {
            Lang::Python => "scripts/build-guests-py.sh",
            Lang::Js => "scripts/build-guests-js.sh",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Lang::Python => "apt-get install python3 python3-venv",
            Lang::Js => "apt-get install nodejs npm",
        }
    }

    /// The example's component (what the build script writes).
    pub fn example(self) -> PathBuf {
        match self {
            Lang::Python => repo_root().join("target/guests-py/echo-py.wasm"),
            Lang::Js => repo_root().join("target/guests-js/echo-js.wasm"),
        }
    }

    /// The build tool the example's script installed (for projects made by `new`).
    pub fn tool(self) -> PathBuf {
        match self {
            Lang::Python => repo_root().join("target/guests-py/venv/bin/componentize-py"),
            Lang::Js => repo_root().join("examples/guests-js/node_modules/.bin/componentize-js"),
        }
    }
}

/// Runs the example's build script once per test binary (it returns at once when the
/// component is up to date) and returns the component's path; panics with the script's
/// output and the install command if it fails.
pub fn build_example(lang: Lang) -> PathBuf {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    static JS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let cell = if lang == Lang::Python { &PY } else { &JS };
    let built = cell.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join(lang.script()))
            .current_dir(repo_root())
            .output()
            .map_err(|e| format!("cannot run bash: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}{}\ninstall the tools it needs ({}) and run it: {}",
                lang.script(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                lang.install_hint(),
                lang.script(),
            ));
        }
        Ok(lang.example())
    });
    match built {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// An engine with a compile cache under the target directory: the large Python and
/// JavaScript components are compiled once, later runs load them in milliseconds.
pub fn cached_engine() -> &'static WasmEngine {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gorch-compile-cache");
        WasmEngine::new(EngineConfig {
            pool_size: 20,
            cache_dir: Some(cache),
            ..Default::default()
        })
        .expect("engine")
    })
}

/// Runs `f` on a current-thread runtime (so the guests log on this thread) with a fmt
/// subscriber like the binary's as the thread's default; checks for leaked tasks; returns
/// `f`'s result and the log.
pub fn run_logged<F: std::future::Future>(f: F) -> (F::Output, String) {
    capture_log("info", || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let out = f.await;
            assert_no_leaked_tasks().await;
            out
        })
    })
}

/// Loads a component through the cached engine (compiling it the first time).
pub fn load(path: &Path) -> WasmComponent {
    cached_engine().load_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
