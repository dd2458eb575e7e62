//! This node's messages of a cluster topic fetched ahead of its receives, shared by every
//! receive of the topic on this node (single and batch alike).
//!
//! - One receive at a time fetches; the others wait for what it brings. The fetcher waits
//!   for the stream's next message (a pull of one), then takes what else the stream holds
//!   now, up to the window, in one request (`topics::take`).
//! - The window follows demand: the receives waiting now (each counted for as many as it
//!   asks), doubled when the last fetch was used up within [`QUICK`], halved when it was not,
//!   from 1 to [`MAX_WINDOW`]. So a busy consumer pays one request per window, an idle one
//!   holds nothing back from the other nodes.
//! - A message that waits here longer than [`HOLD`] (its receivers went away or are slow)
//!   is handed back (nak) so that another node takes it; so are all of them when the node
//!   leaves or the topic's stream is lost.
//! - Everything here is in flight in JetStream's view and never acknowledged before a
//!   routine handled it: if the host dies, the consumer's ack wait brings it back to another
//!   node. The messages are counted in the topic's `prefetched` figure.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::topics::RemoteDelivery;

/// The most messages one fetch asks for.
pub(crate) const MAX_WINDOW: usize = 256;
/// A fetch used up within this grows the window (the receives outpace it).
const QUICK: Duration = Duration::from_millis(20);
/// The longest a message waits here before it is handed back to the stream.
pub(crate) const HOLD: Duration = Duration::from_secs(1);

pub(crate) struct Prefetch {
    state: Mutex<State>,
    /// Woken when a fetch ends (with messages or without).
    fetched: Notify,
    /// Messages held here now (the topic's `prefetched` figure).
    held: AtomicU64,
}

struct State {
    msgs: VecDeque<(Instant, RemoteDelivery)>,
    /// A receive is fetching for all.
    fetching: bool,
    /// The size of the next fetch.
    window: usize,
    /// When the last fetch ended.
    refilled: Instant,
    /// What the receives inside `take` now ask for, together.
    demand: usize,
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch {
            state: Mutex::new(State {
                msgs: VecDeque::new(),
                fetching: false,
                window: 1,
                refilled: Instant::now(),
                demand: 0,
            }),
            fetched: Notify::new(),
            held: AtomicU64::new(0),
        }
    }
}

/// A receive's demand, counted while it lasts.
pub(crate) struct Demand<'a>(&'a Prefetch, usize);

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.0.state.lock().demand -= self.1;
    }
}

/// The fetcher's turn: given up (and the waiting receives woken) when dropped, whatever
/// became of the fetch.
pub(crate) struct Turn<'a>(&'a Prefetch);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.fetching = false;
        s.refilled = Instant::now();
        drop(s);
        self.0.fetched.notify_waiters();
    }
}

impl Prefetch {
    /// Counts a receive of up to `max` messages in the demand until the guard drops.
    pub(crate) fn want(&self, max: usize) -> Demand<'_> {
        self.state.lock().demand += max;
        Demand(self, max)
    }

    /// What a receive of up to `max` takes from here: one message delivered before alone
    /// (so that one that crashes its receiver is found and counted alone), else the first
    /// deliveries at the front, up to `max`.
    pub(crate) fn pop(&self, max: usize) -> Vec<RemoteDelivery> {
        let mut s = self.state.lock();
        let mut out = Vec::new();
        while out.len() < max.max(1) {
            let alone = match s.msgs.front() {
                None => break,
                Some((_, d)) => d.delivered_before > 0,
            };
            if alone && !out.is_empty() {
                break;
            }
            out.push(s.msgs.pop_front().expect("front").1);
            if alone {
                break;
            }
        }
        self.held.fetch_sub(out.len() as u64, Relaxed);
        out
    }

    /// The fetcher's turn, if no receive has it: with it, the size of the fetch.
    pub(crate) fn turn(&self) -> Option<(Turn<'_>, usize)> {
        let mut s = self.state.lock();
        if s.fetching {
            return None;
        }
        s.fetching = true;
        let grown = if s.refilled.elapsed() < QUICK { s.window * 2 } else { s.window / 2 };
        s.window = grown.max(s.demand).clamp(1, MAX_WINDOW);
        Some((Turn(self), s.window))
    }

    /// A future that completes when the current fetch ends: made before looking, so that
    /// an end between the look and the wait is not missed.
    pub(crate) fn fetch_ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.fetched.notified()
    }

    /// Keeps fetched messages for the next receives.
    pub(crate) fn keep(&self, msgs: impl IntoIterator<Item = RemoteDelivery>) {
        let now = Instant::now();
        let mut s = self.state.lock();
        let before = s.msgs.len();
        s.msgs.extend(msgs.into_iter().map(|d| (now, d)));
        self.held.fetch_add((s.msgs.len() - before) as u64, Relaxed);
    }

    /// The messages held longer than `hold` (all of them with `Duration::ZERO`), to hand
    /// back.
    pub(crate) fn expired(&self, hold: Duration) -> Vec<RemoteDelivery> {
        let mut s = self.state.lock();
        let mut out = Vec::new();
        while s.msgs.front().is_some_and(|(at, _)| at.elapsed() >= hold) {
            out.push(s.msgs.pop_front().expect("front").1);
        }
        self.held.fetch_sub(out.len() as u64, Relaxed);
        out
    }

    /// Messages held here now.
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Relaxed)
    }
}
