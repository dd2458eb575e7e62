//! The WIT host side: the `gorch:worker` bindings (wasmtime's `bindgen!`) and the imports a
//! guest calls (`runtime`, `mailbox`, `bus`), each delegating to the routine's
//! [`RoutineContext`](crate::RoutineContext), so wasm and native routines behave the same.
//! Also the linker: these imports plus a deny-by-default WASI 0.2.

use std::time::Duration;

use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};

use super::store::HostState;
use crate::transport::CallError;

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "worker",
        imports: {
            "gorch:worker/runtime.sleep": async | trappable,
            "gorch:worker/mailbox": async | trappable,
            "gorch:worker/bus": async | trappable,
            default: trappable,
        },
        exports: { default: async },
    });
}

pub(super) use bindings::{Worker, WorkerPre};

/// The optional export of the `stateful-worker` world.
pub(super) const UPGRADE_EXPORT: &str = "gorch:worker/upgrade@0.1.0";
use bindings::gorch::worker::{bus as wit_bus, mailbox as wit_mailbox, runtime, types};

/// The linker every component is checked against: WASI 0.2 (the context of each store
/// grants nothing by default) and the `gorch:worker` imports.
pub(super) fn linker(engine: &Engine) -> wasmtime::Result<Linker<HostState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    bindings::Worker::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
    Ok(linker)
}

impl HostState {
    /// A killed instance gets a trap from any host call, so that it dies even if it keeps
    /// calling the host instead of reaching an epoch check.
    fn alive(&self) -> wasmtime::Result<()> {
        if self.ctx.run.killed.load(std::sync::atomic::Ordering::Relaxed) {
            wasmtime::bail!("killed");
        }
        Ok(())
    }
}

fn wit_error(e: CallError) -> types::Error {
    match e {
        CallError::Cancelled => types::Error::Cancelled,
        CallError::Closed => types::Error::Closed,
        CallError::NoSuchRoutine(n) => types::Error::NoSuchRoutine(n),
        CallError::TooLarge(n) => types::Error::TooLarge(n),
        CallError::Limit(l) => types::Error::Limit(l.to_string()),
        CallError::InvalidName(n) => types::Error::InvalidName(n),
        CallError::OutcomeUnknown(n) => types::Error::OutcomeUnknown(n),
    }
}

fn timeout(millis: Option<u64>) -> Option<Duration> {
    millis.map(Duration::from_millis)
}

impl types::Host for HostState {}

impl runtime::Host for HostState {
    fn beat(&mut self) -> wasmtime::Result<()> {
        self.alive()?;
        self.ctx.beat();
        Ok(())
    }
    fn add_busy(&mut self, nanos: u64) -> wasmtime::Result<()> {
        self.ctx.add_busy(Duration::from_nanos(nanos));
        Ok(())
    }
    fn id(&mut self) -> wasmtime::Result<u64> {
        Ok(self.ctx.id())
    }
    fn name(&mut self) -> wasmtime::Result<String> {
        Ok(self.ctx.name().to_string())
    }
    fn restarts(&mut self) -> wasmtime::Result<u64> {
        Ok(self.ctx.restarts())
    }
    fn cancelled(&mut self) -> wasmtime::Result<bool> {
        self.alive()?;
        Ok(self.ctx.is_cancelled())
    }
    async fn sleep(&mut self, millis: u64) -> wasmtime::Result<bool> {
        self.alive()?;
        Ok(self.ctx.sleep(Duration::from_millis(millis)).await)
    }
    fn log(&mut self, level: runtime::Level, message: String) -> wasmtime::Result<()> {
        let level = match level {
            runtime::Level::Trace => tracing::Level::TRACE,
            runtime::Level::Debug => tracing::Level::DEBUG,
            runtime::Level::Info => tracing::Level::INFO,
            runtime::Level::Warn => tracing::Level::WARN,
            runtime::Level::Error => tracing::Level::ERROR,
        };
        self.ctx.log(level, &message);
        Ok(())
    }
}

impl wit_mailbox::Host for HostState {
    async fn recv(
        &mut self,
        timeout_millis: Option<u64>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, types::Error>> {
        self.alive()?;
        Ok(self.ctx.recv(timeout(timeout_millis)).await.map_err(wit_error))
    }
    async fn send(
        &mut self,
        to: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        self.alive()?;
        Ok(self.ctx.send(&to, payload).await.map_err(wit_error))
    }
    async fn send_batch(
        &mut self,
        to: String,
        payloads: Vec<Vec<u8>>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        self.alive()?;
        Ok(self.ctx.send_batch(&to, payloads).await.map_err(wit_error))
    }
    async fn recv_batch(
        &mut self,
        max: u32,
        timeout_millis: Option<u64>,
    ) -> wasmtime::Result<Result<Vec<Vec<u8>>, types::Error>> {
        self.alive()?;
        let r = self.ctx.recv_batch(max as usize, timeout(timeout_millis)).await;
        Ok(r.map_err(wit_error))
    }
}

impl wit_bus::Host for HostState {
    async fn publish(
        &mut self,
        topic: String,
        payload: Vec<u8>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        self.alive()?;
        Ok(self.ctx.publish(&topic, payload).await.map_err(wit_error))
    }
    async fn recv(
        &mut self,
        topic: String,
        timeout_millis: Option<u64>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, types::Error>> {
        self.alive()?;
        Ok(self.ctx.bus_recv(&topic, timeout(timeout_millis)).await.map_err(wit_error))
    }
    async fn recv_batch(
        &mut self,
        topic: String,
        max: u32,
        timeout_millis: Option<u64>,
    ) -> wasmtime::Result<Result<Vec<Vec<u8>>, types::Error>> {
        self.alive()?;
        let r = self.ctx.bus_recv_batch(&topic, max as usize, timeout(timeout_millis)).await;
        Ok(r.map_err(wit_error))
    }
    async fn publish_batch(
        &mut self,
        topic: String,
        payloads: Vec<Vec<u8>>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        self.alive()?;
        Ok(self.ctx.publish_batch(&topic, payloads).await.map_err(wit_error))
    }
}
