//! A routine: one supervised unit of work (a wasm instance or a native async closure).
//!
//! - [`state`]: the lifecycle [`State`] and the derived [`Health`];
//! - `shared`: what outlives a single run (identity, counters, mailbox, stop signals), shared
//!   by the driver task, the handle, the context and the registry;
//! - [`snapshot`]: the point-in-time [`Snapshot`] (the JSON API's routine object) and the
//!   stats table;
//! - `handle`: [`RoutineHandle`], what a spawner keeps;
//! - `context`: [`RoutineContext`], what a running routine uses to talk to the host;
//! - `handles`: the topics and mailboxes a run uses, cached by name;
//! - `work`: the `Work` trait that native closures and wasm components implement;
//! - `upgrade`: the state of live upgrades (pending code, state hand-over, rollback).
//!
//! The restart loop that runs a routine is in `supervisor::driver`; the delivery rule for
//! the messages it receives is in `delivery`.

mod context;
mod handle;
pub(crate) mod handles;
pub(crate) mod shared;
pub mod snapshot;
pub mod state;
pub(crate) mod upgrade;
pub(crate) mod work;

pub(crate) use context::log_line;
pub use context::{CallError, RoutineContext};
pub use handle::RoutineHandle;
pub(crate) use shared::{PluginSums, RoutineShared, RunControl};
pub use snapshot::{Snapshot, write_stats_table};
pub use state::{Health, State};
pub(crate) use work::{Outcome, Work};
