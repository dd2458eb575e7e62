//! The `Work` trait: what a routine runs, one run at a time. Native closures implement it
//! here; wasm components in `wasm::instance`. The driver (`supervisor::driver`) only sees
//! this trait.

use std::fmt::Display;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::routine::context::RoutineContext;

/// How one run of a routine ended, before supervision maps it to a [`State`](crate::State).
#[derive(Debug)]
pub(crate) enum Outcome {
    Ok,
    Err(String),
    Panicked(String),
    /// Killed by the host (the epoch callback, or the future dropped).
    Killed,
}

/// Something a routine runs: a native closure or a wasm component instance.
pub(crate) trait Work: Send + Sync + 'static {
    /// Starts one run.
    fn start(&self, ctx: RoutineContext) -> BoxFuture<'static, Outcome>;
    /// Whether the run can be interrupted in place (wasm: the epoch callback) so the driver
    /// should wait a little after the kill signal instead of dropping the future at once.
    fn interruptible(&self) -> bool;
    /// The version of the code (a wasm component: the first 12 hex digits of its SHA-256);
    /// empty for native closures.
    fn version(&self) -> String {
        String::new()
    }
    /// Whether it hands its state over across upgrades (`save` / `restore`).
    fn stateful(&self) -> bool {
        false
    }
    /// Whether the routine's fuel count is known: true for native closures (they use no
    /// wasm fuel: 0) and fuel-metered components; false for `metering = "time"`, whose
    /// `fuelConsumed` is then absent rather than 0.
    fn counts_fuel(&self) -> bool {
        true
    }
}

/// A native async closure, called once per run.
pub(crate) struct NativeWork<F>(pub F);

impl<F, Fut, E> Work for NativeWork<F>
where
    F: Fn(RoutineContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    fn start(&self, ctx: RoutineContext) -> BoxFuture<'static, Outcome> {
        let fut = (self.0)(ctx);
        async move {
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(Ok(())) => Outcome::Ok,
                Ok(Err(e)) => Outcome::Err(e.to_string()),
                Err(payload) => Outcome::Panicked(panic_message(&*payload)),
            }
        }
        .boxed()
    }
    fn interruptible(&self) -> bool {
        false
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked".to_string()
    }
}
