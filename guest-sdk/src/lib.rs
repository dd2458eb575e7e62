//! Write [gorch-host](https://example.invalid/gorch-host) workers in Rust.
//!
//! The crate carries the WIT contract it implements (`wit/worker.wit`, package
//! `gorch:worker@0.1.0`), so it builds from a git or registry checkout alone.
//!
//! A worker is a `cdylib` crate built for `wasm32-wasip2`. It has one entry point, a `run`
//! function, exported with [`worker!`]. Inside, it talks to the host through this crate:
//! heartbeats and accounting ([`beat`], [`add_busy`]), identity ([`id`], [`name`],
//! [`restarts`]), cooperative stopping ([`cancelled`], [`sleep`]), logging ([`info!`] and
//! friends), its own [`mailbox`] and the shared [`bus`] of named topics.
//!
//! ```no_run
//! use gorch_guest_sdk::{self as gorch, mailbox, bus};
//!
//! fn run() -> Result<(), gorch::Error> {
//!     loop {
//!         gorch::beat();
//!         match mailbox::recv() {
//!             Ok(msg) => bus::publish("echo", &msg)?,
//!             // The host is stopping us: return promptly.
//!             Err(gorch::Error::Cancelled) => return Ok(()),
//!             Err(e) => return Err(e),
//!         }
//!     }
//! }
//!
//! gorch::worker!(run);
//! ```
//!
//! `Cargo.toml` of such a worker:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! # from a clone of the repository (the crates.io name once published: "0.1")
//! gorch-guest-sdk = { git = "https://example.invalid/gorch-host" }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2`; the `.wasm` file in
//! `target/wasm32-wasip2/release/` is already a component that `gorch-host` can run.
//!
//! Every blocking call ([`mailbox::recv`], [`mailbox::send`], [`bus::publish`],
//! [`bus::recv`], the batch calls [`mailbox::recv_batch`], [`bus::recv_batch`] and
//! [`bus::publish_batch`], [`sleep`]) returns early with [`Error::Cancelled`] (or `false` for
//! [`sleep`]) when the host stops the routine: return from `run` then. A worker that does
//! not is killed when its grace period ends.

// Lets the generated bindings name this crate by its absolute path, from inside it too.
extern crate self as gorch_guest_sdk;

use std::fmt;
use std::time::Duration;

/// The `serde` this crate's JSON helpers use, re-exported so that a worker needs no
/// dependency of its own. Derive through it with `#[serde(crate = ...)]`:
///
/// ```no_run
/// use gorch_guest_sdk::serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// #[serde(crate = "gorch_guest_sdk::serde")]
/// struct Job {
///     id: u64,
///     text: String,
/// }
///
/// fn run() -> Result<(), gorch_guest_sdk::Error> {
///     let job: Job = gorch_guest_sdk::mailbox::recv_json()?;
///     gorch_guest_sdk::bus::publish_json("done", &job)
/// }
/// gorch_guest_sdk::worker!(run);
/// ```
#[cfg(feature = "json")]
pub use serde;
/// The `serde_json` this crate's JSON helpers use (for `serde_json::Value`, `json!`, ...).
#[cfg(feature = "json")]
pub use serde_json;

#[doc(hidden)]
pub mod __private {
    pub use wit_bindgen;

    /// Raw bindings generated from `wit/worker.wit` (inside this crate, so that it builds
    /// from a git or registry checkout; the repository's root `wit/` is a copy, checked by a
    /// test).
    #[allow(missing_docs, unsafe_code, clippy::all)]
    pub mod bindings {
        wit_bindgen::generate!({
            path: "wit",
            world: "worker",
            pub_export_macro: true,
            export_macro_name: "__export_worker",
            default_bindings_module: "::gorch_guest_sdk::__private::bindings",
            runtime_path: "::gorch_guest_sdk::__private::wit_bindgen::rt",
        });
    }

    /// Raw bindings of the `stateful-worker` world (exports `upgrade` too); the imports are
    /// the ones above.
    #[allow(missing_docs, unsafe_code, clippy::all)]
    pub mod stateful {
        wit_bindgen::generate!({
            path: "wit",
            world: "stateful-worker",
            pub_export_macro: true,
            export_macro_name: "__export_stateful_worker",
            default_bindings_module: "::gorch_guest_sdk::__private::stateful",
            runtime_path: "::gorch_guest_sdk::__private::wit_bindgen::rt",
            with: {
                "gorch:worker/types@0.1.0": ::gorch_guest_sdk::__private::bindings::gorch::worker::types,
                "gorch:worker/runtime@0.1.0": ::gorch_guest_sdk::__private::bindings::gorch::worker::runtime,
                "gorch:worker/mailbox@0.1.0": ::gorch_guest_sdk::__private::bindings::gorch::worker::mailbox,
                "gorch:worker/bus@0.1.0": ::gorch_guest_sdk::__private::bindings::gorch::worker::bus,
            },
        });
    }

    pub use bindings::Guest;
    pub use stateful::exports::gorch::worker::upgrade::Guest as UpgradeGuest;

    /// Turns what a user's `run` returns into the WIT result.
    pub fn into_result<R: super::RunResult>(r: R) -> Result<(), String> {
        r.into_run_result()
    }
}

use __private::bindings::gorch::worker::{bus as wit_bus, mailbox as wit_mailbox, runtime, types};

/// Exports a function as the worker's `run` entry point.
///
/// The function takes no arguments and returns `()` or `Result<(), E>` where `E` implements
/// `Display`: an `Err` ends the routine as `FAILED` with that text as its last error.
///
/// ```no_run
/// fn run() -> Result<(), String> {
///     gorch_guest_sdk::info!("hello from {}", gorch_guest_sdk::name());
///     Ok(())
/// }
/// gorch_guest_sdk::worker!(run);
/// ```
///
/// A worker that keeps in-memory state across live upgrades also names a `save` function
/// (`fn() -> Vec<u8>`, called on the old version after `run` returned for the upgrade) and a
/// `restore` function (`fn(Vec<u8>) -> Result<(), E>`, called on the new version before
/// `run`; an `Err` fails the upgrade and the old version comes back with its state). The
/// component then exports `gorch:worker/upgrade` (world `stateful-worker`).
///
/// ```no_run
/// use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
/// static COUNT: AtomicU64 = AtomicU64::new(0);
/// fn run() {}
/// fn save() -> Vec<u8> {
///     COUNT.load(SeqCst).to_le_bytes().to_vec()
/// }
/// fn restore(state: Vec<u8>) -> Result<(), String> {
///     let bytes: [u8; 8] = state.try_into().map_err(|_| "expected 8 bytes".to_string())?;
///     COUNT.store(u64::from_le_bytes(bytes), SeqCst);
///     Ok(())
/// }
/// gorch_guest_sdk::worker!(run, save = save, restore = restore);
/// ```
#[macro_export]
macro_rules! worker {
    ($run:path) => {
        #[doc(hidden)]
        struct __GorchWorker;
        impl $crate::__private::Guest for __GorchWorker {
            fn run() -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::into_result($run())
            }
        }
        $crate::__private::bindings::__export_worker!(__GorchWorker);
    };
    ($run:path, save = $save:path, restore = $restore:path $(,)?) => {
        #[doc(hidden)]
        struct __GorchWorker;
        impl $crate::__private::stateful::Guest for __GorchWorker {
            fn run() -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::into_result($run())
            }
        }
        impl $crate::__private::UpgradeGuest for __GorchWorker {
            fn save() -> ::std::vec::Vec<u8> {
                $save()
            }
            fn restore(
                state: ::std::vec::Vec<u8>,
            ) -> ::core::result::Result<(), ::std::string::String> {
                $crate::__private::into_result($restore(state))
            }
        }
        $crate::__private::stateful::__export_stateful_worker!(__GorchWorker);
    };
}

/// What a worker's `run` function may return: `()` or `Result<(), E: Display>`.
pub trait RunResult {
    /// The WIT result: `Err` carries the text that becomes the routine's last error.
    fn into_run_result(self) -> Result<(), String>;
}

impl RunResult for () {
    fn into_run_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: fmt::Display> RunResult for Result<(), E> {
    fn into_run_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}

/// Why a host call did not complete (the WIT `error` variant), plus decoding errors of the
/// typed helpers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The routine is being stopped: return from `run` promptly.
    Cancelled,
    /// The mailbox or topic is closed and empty.
    Closed,
    /// No live routine has this name.
    NoSuchRoutine(String),
    /// The payload is larger than the per-message limit (bytes).
    TooLarge(u64),
    /// A host limit was reached (for example the number of topics).
    Limit(String),
    /// The topic or routine name is not valid.
    InvalidName(String),
    /// The call left the host and no answer came (a node paused or cut off, NATS gone
    /// mid-call): the message may or may not be delivered; sending it again may deliver it
    /// twice.
    OutcomeUnknown(String),
    /// A typed helper could not encode or decode a message.
    Codec(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Cancelled => f.write_str("cancelled"),
            Error::Closed => f.write_str("closed"),
            Error::NoSuchRoutine(n) => write!(f, "no such routine: {n}"),
            Error::TooLarge(limit) => write!(f, "payload too large (limit {limit} bytes)"),
            Error::Limit(what) => write!(f, "limit reached: {what}"),
            Error::InvalidName(n) => write!(f, "invalid name: {n}"),
            Error::OutcomeUnknown(what) => write!(f, "outcome unknown: {what}"),
            Error::Codec(e) => write!(f, "codec: {e}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<types::Error> for Error {
    fn from(e: types::Error) -> Self {
        match e {
            types::Error::Cancelled => Error::Cancelled,
            types::Error::Closed => Error::Closed,
            types::Error::NoSuchRoutine(n) => Error::NoSuchRoutine(n),
            types::Error::TooLarge(l) => Error::TooLarge(l),
            types::Error::Limit(l) => Error::Limit(l),
            types::Error::InvalidName(n) => Error::InvalidName(n),
            types::Error::OutcomeUnknown(n) => Error::OutcomeUnknown(n),
        }
    }
}

/// Result of the host calls of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Heartbeat: resets the host's idle-timeout watchdog for this routine.
pub fn beat() {
    runtime::beat()
}

/// Adds busy time that the host cannot observe itself (for example time spent waiting on
/// something the host does not know about but that you want counted as work).
pub fn add_busy(d: Duration) {
    runtime::add_busy(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The routine's id: unchanged across restarts.
pub fn id() -> u64 {
    runtime::id()
}

/// The routine's name (for replicas: `plugin-1`, `plugin-2`, ...).
pub fn name() -> String {
    runtime::name()
}

/// How many times the supervisor has restarted this routine.
pub fn restarts() -> u64 {
    runtime::restarts()
}

/// True once the host has asked this routine to stop.
pub fn cancelled() -> bool {
    runtime::cancelled()
}

/// Sleeps without using fuel (or CPU); returns `false` if cut short by cancellation.
pub fn sleep(d: Duration) -> bool {
    runtime::sleep(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Log levels for [`log`].
pub use runtime::Level;

/// Writes a log line attributed to this routine. The macros [`info!`], [`warn!`] and friends
/// format and call this.
pub fn log(level: Level, message: &str) {
    runtime::log(level, message)
}

/// Logs at `trace` level, with `format!` syntax.
#[macro_export]
macro_rules! trace { ($($t:tt)*) => { $crate::log($crate::Level::Trace, &::std::format!($($t)*)) } }
/// Logs at `debug` level, with `format!` syntax.
#[macro_export]
macro_rules! debug { ($($t:tt)*) => { $crate::log($crate::Level::Debug, &::std::format!($($t)*)) } }
/// Logs at `info` level, with `format!` syntax.
#[macro_export]
macro_rules! info { ($($t:tt)*) => { $crate::log($crate::Level::Info, &::std::format!($($t)*)) } }
/// Logs at `warn` level, with `format!` syntax.
#[macro_export]
macro_rules! warn { ($($t:tt)*) => { $crate::log($crate::Level::Warn, &::std::format!($($t)*)) } }
/// Logs at `error` level, with `format!` syntax.
#[macro_export]
macro_rules! error { ($($t:tt)*) => { $crate::log($crate::Level::Error, &::std::format!($($t)*)) } }

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// This routine's own mailbox, and other routines' mailboxes by name.
///
/// The mailbox is bounded (`queue-capacity` in the manifest) and outlives restarts.
pub mod mailbox {
    use super::*;

    /// Waits for the next message without a time limit.
    ///
    /// Returns [`Error::Cancelled`] when the routine is being stopped.
    pub fn recv() -> Result<Vec<u8>> {
        match wit_mailbox::recv(None) {
            Ok(Some(m)) => Ok(m),
            // The host answers `none` only to a finite timeout; treat it as closed.
            Ok(None) => Err(Error::Closed),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `timeout` for the next message; `Ok(None)` if none came in time.
    pub fn recv_timeout(timeout: Duration) -> Result<Option<Vec<u8>>> {
        wit_mailbox::recv(Some(millis(timeout))).map_err(Into::into)
    }

    /// Delivers `payload` to the mailbox of the routine named `to`, waiting while it is full.
    pub fn send(to: &str, payload: &[u8]) -> Result<()> {
        wit_mailbox::send(to, payload).map_err(Into::into)
    }

    /// Delivers each payload to the mailbox of `to` in order, waiting while it is full: one
    /// host call for all of them, and to a routine on another node as few round trips as
    /// NATS messages carry. Nothing is sent if one is too large; after another error, the
    /// payloads before the failing one were delivered.
    pub fn send_batch(to: &str, payloads: &[Vec<u8>]) -> Result<()> {
        wit_mailbox::send_batch(to, payloads).map_err(Into::into)
    }

    /// Waits for the next message, then takes up to `max` in all of what is queued (at
    /// least one message; never empty). One host call for the whole batch.
    ///
    /// The batch stays in flight until the next receive (of any kind) or a clean return
    /// from `run`: if the routine crashes meanwhile, all of it is delivered again, in order,
    /// one message per batch (a message that crashes the routine is then found alone, and only
    /// it counts toward `max-deliveries`).
    pub fn recv_batch(max: u32) -> Result<Vec<Vec<u8>>> {
        match wit_mailbox::recv_batch(max, None) {
            Ok(b) if b.is_empty() => Err(Error::Closed),
            r => r.map_err(Into::into),
        }
    }

    /// Like [`recv_batch`], waiting up to `timeout` for the first message; an empty batch
    /// if none came in time.
    pub fn recv_batch_timeout(max: u32, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        wit_mailbox::recv_batch(max, Some(millis(timeout))).map_err(Into::into)
    }

    /// The mailbox's messages one by one, received `max` at a time ([`recv_batch`]). Ends
    /// when the routine is asked to stop; yields an error (then ends) for any other failure.
    ///
    /// ```no_run
    /// use gorch_guest_sdk::{bus, mailbox};
    /// fn run() -> Result<(), gorch_guest_sdk::Error> {
    ///     for msg in mailbox::batched(64) {
    ///         bus::publish("out", &msg?)?;
    ///     }
    ///     Ok(())
    /// }
    /// gorch_guest_sdk::worker!(run);
    /// ```
    pub fn batched(max: u32) -> Batched {
        Batched::new(None, max)
    }

    /// Sends a value encoded as JSON.
    #[cfg(feature = "json")]
    pub fn send_json<T: serde::Serialize>(to: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))?;
        send(to, &bytes)
    }

    /// Receives a message and decodes it from JSON.
    #[cfg(feature = "json")]
    pub fn recv_json<T: serde::de::DeserializeOwned>() -> Result<T> {
        decode(&recv()?)
    }

    /// Waits up to `timeout` for the next message and decodes it from JSON; `Ok(None)` if
    /// none came in time.
    #[cfg(feature = "json")]
    pub fn recv_timeout_json<T: serde::de::DeserializeOwned>(
        timeout: Duration,
    ) -> Result<Option<T>> {
        recv_timeout(timeout)?.map(|bytes| decode(&bytes)).transpose()
    }
}

#[cfg(feature = "json")]
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Codec(e.to_string()))
}

/// Named topics shared by all routines, created on first use. A topic is a queue: each
/// message goes to exactly one receiver.
pub mod bus {
    use super::*;

    /// Publishes `payload` on `topic`, waiting while the topic is full.
    pub fn publish(topic: &str, payload: &[u8]) -> Result<()> {
        wit_bus::publish(topic, payload).map_err(Into::into)
    }

    /// Waits for the next message on `topic` without a time limit.
    pub fn recv(topic: &str) -> Result<Vec<u8>> {
        match wit_bus::recv(topic, None) {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(Error::Closed),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `timeout` for the next message on `topic`; `Ok(None)` if none came.
    pub fn recv_timeout(topic: &str, timeout: Duration) -> Result<Option<Vec<u8>>> {
        wit_bus::recv(topic, Some(millis(timeout))).map_err(Into::into)
    }

    /// Waits for the next message on `topic`, then takes up to `max` in all of what is
    /// queued there (never empty; on a cluster topic a message delivered before comes
    /// alone). Acknowledged like
    /// [`mailbox::recv_batch`](crate::mailbox::recv_batch): redelivered whole after a crash,
    /// one message at a time.
    pub fn recv_batch(topic: &str, max: u32) -> Result<Vec<Vec<u8>>> {
        match wit_bus::recv_batch(topic, max, None) {
            Ok(b) if b.is_empty() => Err(Error::Closed),
            r => r.map_err(Into::into),
        }
    }

    /// Like [`recv_batch`], waiting up to `timeout` for the first message; an empty batch
    /// if none came in time.
    pub fn recv_batch_timeout(topic: &str, max: u32, timeout: Duration) -> Result<Vec<Vec<u8>>> {
        wit_bus::recv_batch(topic, max, Some(millis(timeout))).map_err(Into::into)
    }

    /// The messages of `topic` one by one, received `max` at a time ([`recv_batch`]); ends
    /// when the routine is asked to stop (see [`mailbox::batched`](crate::mailbox::batched)).
    pub fn batched(topic: &str, max: u32) -> Batched {
        Batched::new(Some(topic.to_string()), max)
    }

    /// Publishes the payloads in order with one host call, waiting while the topic is full.
    /// Nothing is published if one is over the size limit ([`Error::TooLarge`]); after
    /// another error, those before it were published.
    pub fn publish_batch(topic: &str, payloads: &[Vec<u8>]) -> Result<()> {
        wit_bus::publish_batch(topic, payloads).map_err(Into::into)
    }

    /// Publishes a value encoded as JSON.
    #[cfg(feature = "json")]
    pub fn publish_json<T: serde::Serialize>(topic: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| Error::Codec(e.to_string()))?;
        publish(topic, &bytes)
    }

    /// Receives a message from `topic` and decodes it from JSON.
    #[cfg(feature = "json")]
    pub fn recv_json<T: serde::de::DeserializeOwned>(topic: &str) -> Result<T> {
        decode(&recv(topic)?)
    }

    /// Waits up to `timeout` for the next message on `topic` and decodes it from JSON;
    /// `Ok(None)` if none came in time.
    #[cfg(feature = "json")]
    pub fn recv_timeout_json<T: serde::de::DeserializeOwned>(
        topic: &str,
        timeout: Duration,
    ) -> Result<Option<T>> {
        recv_timeout(topic, timeout)?.map(|bytes| decode(&bytes)).transpose()
    }
}

/// Messages one by one from batches: [`mailbox::batched`] and [`bus::batched`]. Asking for
/// the next batch acknowledges the previous one (see [`mailbox::recv_batch`]).
#[derive(Debug)]
pub struct Batched {
    topic: Option<String>,
    max: u32,
    batch: std::vec::IntoIter<Vec<u8>>,
    done: bool,
}

impl Batched {
    fn new(topic: Option<String>, max: u32) -> Self {
        Batched { topic, max, batch: Vec::new().into_iter(), done: false }
    }
}

impl Iterator for Batched {
    type Item = Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(msg) = self.batch.next() {
            return Some(Ok(msg));
        }
        if self.done {
            return None;
        }
        let got = match &self.topic {
            None => mailbox::recv_batch(self.max),
            Some(t) => bus::recv_batch(t, self.max),
        };
        match got {
            Ok(batch) => {
                self.batch = batch.into_iter();
                self.batch.next().map(Ok)
            }
            Err(Error::Cancelled) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
