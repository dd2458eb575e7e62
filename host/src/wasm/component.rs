//! Loading components: read a file, compile it (or take it from the compile cache), check
//! it against the `gorch:worker/worker` world or the WASI command world, and keep its
//! `InstancePre` in a [`WasmComponent`], ready to instantiate any number of times.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{Component, types::ComponentItem};

use super::cache::CacheStatus;
use super::engine::{EngineInner, Flavor, WasmEngine};
use super::host;
use super::store::{HostState, Metering};
use crate::fsread::{self, ReadError};

/// Why a component could not be loaded. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The path is not a regular file (a FIFO, a device, a directory...): not opened.
    #[error("{path}: not a regular file ({kind})")]
    NotRegularFile {
        /// The file.
        path: PathBuf,
        /// What it is instead: "a FIFO", "a character device", ...
        kind: &'static str,
    },
    /// The file is larger than [`max_component_bytes`].
    ///
    /// [`max_component_bytes`]: super::EngineConfig::max_component_bytes
    #[error(
        "{path}: larger than the {} limit of a component file (raise it with `EngineConfig::max_component_bytes`)",
        fsread::size(*limit)
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit, in bytes.
        limit: u64,
    },
    /// The engine for this metering could not be created (the one without fuel
    /// instrumentation is created when a component first asks for it).
    #[error("{path}: cannot create the engine for {metering} metering: {message}")]
    Engine {
        /// The file.
        path: PathBuf,
        /// The metering asked for.
        metering: Metering,
        /// Why.
        message: String,
    },
    /// The file is not WebAssembly at all.
    #[error("{path}: not a WebAssembly file (bad magic number)")]
    NotWasm {
        /// The file.
        path: PathBuf,
    },
    /// The file is a core wasm module, not a component.
    #[error(
        "{path}: is a core wasm module, not a component (build it with `--target wasm32-wasip2`)"
    )]
    CoreModule {
        /// The file.
        path: PathBuf,
    },
    /// wasmtime could not compile it.
    #[error("{path}: cannot compile: {message}")]
    Compile {
        /// The file.
        path: PathBuf,
        /// wasmtime's explanation.
        message: String,
    },
    /// It does not fit the `gorch:worker/worker` world nor is a WASI command.
    #[error("{path}: {message}")]
    WrongWorld {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
}

impl LoadError {
    /// The file that could not be loaded.
    pub fn path(&self) -> &Path {
        match self {
            LoadError::Io { path, .. }
            | LoadError::NotRegularFile { path, .. }
            | LoadError::TooLarge { path, .. }
            | LoadError::Engine { path, .. }
            | LoadError::NotWasm { path }
            | LoadError::CoreModule { path }
            | LoadError::Compile { path, .. }
            | LoadError::WrongWorld { path, .. } => path,
        }
    }
}

impl WasmEngine {
    /// Loads and compiles a component file and checks it against the `gorch:worker/worker`
    /// world (or the WASI command world). Only a regular file (or a symlink to one) is
    /// read, and only up to [`max_component_bytes`]: a FIFO or a device is refused without
    /// blocking or reading it.
    ///
    /// [`max_component_bytes`]: super::EngineConfig::max_component_bytes
    pub fn load_file(&self, path: impl AsRef<Path>) -> Result<WasmComponent, LoadError> {
        self.load_file_metered(path, Metering::Fuel)
    }

    /// Like [`load_file`](Self::load_file), compiled for `metering`: [`Metering::Time`]
    /// compiles it (or takes it from the compile cache) for the engine without fuel
    /// instrumentation, which is created on the first such load.
    pub fn load_file_metered(
        &self,
        path: impl AsRef<Path>,
        metering: Metering,
    ) -> Result<WasmComponent, LoadError> {
        let path = path.as_ref();
        let bytes = fsread::read_regular(path, self.inner.max_component_bytes).map_err(|e| {
            let path = path.to_path_buf();
            match e {
                ReadError::NotRegular(kind) => LoadError::NotRegularFile { path, kind },
                ReadError::TooLarge(limit) => LoadError::TooLarge { path, limit },
                ReadError::Io(source) => LoadError::Io { path, source },
            }
        })?;
        self.load_bytes_metered(path, &bytes, metering)
    }

    /// Like [`load_file`](Self::load_file), from bytes; `path` names them in errors.
    pub fn load_bytes(
        &self,
        path: impl AsRef<Path>,
        bytes: &[u8],
    ) -> Result<WasmComponent, LoadError> {
        self.load_bytes_metered(path, bytes, Metering::Fuel)
    }

    /// Like [`load_file_metered`](Self::load_file_metered), from bytes.
    pub fn load_bytes_metered(
        &self,
        path: impl AsRef<Path>,
        bytes: &[u8],
        metering: Metering,
    ) -> Result<WasmComponent, LoadError> {
        let path = path.as_ref().to_path_buf();
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
            return Err(LoadError::NotWasm { path });
        }
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule { path });
        }
        let flavor = self.flavor(metering).map_err(|e| LoadError::Engine {
            path: path.clone(),
            metering,
            message: e.to_string(),
        })?;
        let engine = &flavor.engine;
        let (component, cache) = match &self.inner.cache {
            Some(cache) => cache.load(engine, bytes, &path),
            None => Component::new(engine, bytes).map(|c| (c, CacheStatus::Off)),
        }
        .map_err(|e| LoadError::Compile { path: path.clone(), message: format!("{e:#}") })?;
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(engine).map(|(n, e)| describe(n, &e.ty)).collect();
        let exports: Vec<String> = ty.exports(engine).map(|(n, e)| describe(n, &e.ty)).collect();
        let has_run = ty.get_export(engine, "run").is_some();
        let stateful = has_run && ty.get_export(engine, host::UPGRADE_EXPORT).is_some();
        let has_cli_run = ty.exports(engine).any(|(n, _)| n.starts_with("wasi:cli/run@0.2"));
        let wrong = |message: String| LoadError::WrongWorld { path: path.clone(), message };
        let pre = flavor
            .linker
            .instantiate_pre(&component)
            .map_err(|e| wrong(format!("imports do not fit the host: {e:#}")))?;
        let kind =
            if has_run {
                Kind::Worker(host::WorkerPre::new(pre).map_err(|e| {
                    wrong(format!("does not fit the gorch:worker/worker world: {e:#}"))
                })?)
            } else if has_cli_run {
                Kind::Command(wasmtime_wasi::p2::bindings::CommandPre::new(pre).map_err(|e| {
                    wrong(format!("does not fit the wasi:cli/command world: {e:#}"))
                })?)
            } else {
                return Err(wrong(
                    "exports neither `run` (world gorch:worker/worker) nor `wasi:cli/run`".into(),
                ));
            };
        Ok(WasmComponent {
            inner: Arc::new(ComponentInner {
                engine: self.inner.clone(),
                flavor,
                path,
                kind,
                imports,
                exports,
                cache,
                version: version_of(bytes),
                stateful,
            }),
        })
    }
}

/// The first 12 hex digits of the SHA-256 of a component's bytes: its version.
fn version_of(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(bytes);
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

fn describe(name: &str, item: &ComponentItem) -> String {
    let kind = match item {
        ComponentItem::ComponentFunc(_) => "func",
        ComponentItem::CoreFunc(_) => "core func",
        ComponentItem::Module(_) => "module",
        ComponentItem::Component(_) => "component",
        ComponentItem::ComponentInstance(_) => "instance",
        ComponentItem::Type(_) => "type",
        ComponentItem::Resource(_) => "resource",
    };
    format!("{kind} {name}")
}

/// Which world a component fits, with its pre-instantiated form.
pub(super) enum Kind {
    Worker(host::WorkerPre<HostState>),
    Command(wasmtime_wasi::p2::bindings::CommandPre<HostState>),
}

pub(super) struct ComponentInner {
    // Keeps the engine (and its epoch ticker) alive while the component is.
    pub(super) engine: Arc<EngineInner>,
    /// The wasmtime engine it was compiled for (and so its metering).
    pub(super) flavor: Arc<Flavor>,
    path: PathBuf,
    pub(super) kind: Kind,
    imports: Vec<String>,
    exports: Vec<String>,
    cache: CacheStatus,
    version: String,
    /// Exports `gorch:worker/upgrade` (world `stateful-worker`).
    pub(super) stateful: bool,
}

/// A compiled, linked component, ready to instantiate any number of times.
#[derive(Clone)]
pub struct WasmComponent {
    pub(super) inner: Arc<ComponentInner>,
}

impl std::fmt::Debug for WasmComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmComponent").field("path", &self.inner.path).finish()
    }
}

impl WasmComponent {
    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
    /// True for a plain WASI command (exports `wasi:cli/run`).
    pub fn is_command(&self) -> bool {
        matches!(self.inner.kind, Kind::Command(_))
    }
    /// Its imports, as `kind name` lines.
    pub fn imports(&self) -> &[String] {
        &self.inner.imports
    }
    /// Its exports, as `kind name` lines.
    pub fn exports(&self) -> &[String] {
        &self.inner.exports
    }
    /// The metering it was compiled for ([`WasmEngine::load_file_metered`]); spawning it
    /// needs [`WasmOptions`](super::WasmOptions) with the same.
    pub fn metering(&self) -> Metering {
        self.inner.flavor.metering
    }
    /// Whether it was compiled or came from the compile cache.
    pub fn cache_status(&self) -> CacheStatus {
        self.inner.cache
    }
    /// True when it exports `gorch:worker/upgrade` (world `stateful-worker`): its state is
    /// handed over across live upgrades.
    pub fn is_stateful(&self) -> bool {
        self.inner.stateful
    }
    /// Its version: the first 12 hex digits of the SHA-256 of its bytes (what snapshots
    /// and the dashboard show, and what a live upgrade compares).
    pub fn version(&self) -> &str {
        &self.inner.version
    }
}
