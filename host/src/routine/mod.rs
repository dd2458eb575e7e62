//! A routine: one supervised unit of work (a wasm instance or a native async closure).
//!
//! - [`state`]: the lifecycle [`State`] and the derived [`Health`];
//! - `shared`: what outlives a single run (identity, counters, mailbox, stop signals), shared
//!   by the driver task, the handle, the context and the registry;
//! - [`snapshot`]: the point-in-time [`Snapshot`] (the JSON API's routine object) and the
//!   stats table;
//! - `handle`: [`RoutineHandle`], what a spawner keeps;
//! - `context`: [`RoutineContext`], what a running routine uses to talk to the host (its
//!   messages go through the run's transport link, `transport::Link`);
//! - `work`: the `Work` trait that native closures and wasm components implement;
//! - `upgrade`: the state of live upgrades (pending code, state hand-over, rollback).
//!
//! The restart loop that runs a routine is in `supervisor::driver`; the delivery rule for
//! the messages it receives is in `delivery`.

mod context;
mod handle;
mod shared;
mod snapshot;
mod state;
mod upgrade;
mod work;

pub use context::RoutineContext;
pub(crate) use context::log_line;
pub use handle::RoutineHandle;
pub(crate) use shared::{PluginSums, RoutineShared, RunControl, Settings};
pub use snapshot::{Snapshot, write_stats_table};
pub use state::{Health, State};
pub(crate) use work::{NativeWork, Outcome, Work};
