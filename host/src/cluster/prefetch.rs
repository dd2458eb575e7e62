//! This node's messages of a cluster topic fetched ahead of its receives, shared by every
//! receive of the topic on this node (single and batch alike).
//!
//! - One receive at a time fetches; the others wait for what it brings. The fetcher waits
//!   for the stream's next message (a pull of one), then takes what else the stream holds
//!   now, up to the window, in one request (`topics::take`).
//! - The window follows demand: at least what the receives waiting now ask for together;
//!   doubled when the last fetch got all it asked for and was used up within [`QUICK`],
//!   halved when it got all but was not used up that fast, and otherwise (the stream held
//!   less, or the wait ended empty) what the stream held, from 1 to [`MAX_WINDOW`]. So a busy
//!   consumer pays one request per window, and what waits here is about [`QUICK`] of this
//!   node's consumption; an idle node holds nothing back from the others.
//! - When no receive of the topic has come for [`HOLD`] (its receivers went away, or are
//!   stuck), what waits here is let go without a verdict, so that JetStream's ack wait
//!   hands it to another node, and the window starts again from 1. When the node leaves or
//!   the topic's stream is lost, all of it is handed back (nak) at once. Either way
//!   JetStream counts one more delivery (it has no uncounted hand-back). A fetch whose
//!   first message was delivered before (a crash loop's sign) brings nothing more.
//! - Progress acks keep what waits here this node's. If the process was paused past the
//!   ack wait (SIGSTOP, a long stall), JetStream gave it to another node meanwhile, and
//!   this node hands it out too when it resumes: a copy, which at-least-once allows (a
//!   pause cannot be told from a loaded machine's late timers, and dropping or handing back
//!   on a guess would cost deliveries).
//! - Everything here is in flight in JetStream's view and never acknowledged before a
//!   routine handled it: if the host dies, the consumer's ack wait brings it back to another
//!   node. The messages are counted in the topic's `prefetched` figure.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// A message held here: whether it was delivered before (it goes out alone).
pub(crate) trait Held {
    fn delivered_before(&self) -> bool;
}

/// The most messages one fetch asks for.
pub(crate) const MAX_WINDOW: usize = 256;
/// A fetch used up within this grows the window (the receives outpace it).
const QUICK: Duration = Duration::from_millis(20);
/// How long messages wait here for a receive before they are handed back to the stream.
pub(crate) const HOLD: Duration = Duration::from_secs(5);

pub(crate) struct Prefetch<T> {
    state: Mutex<State<T>>,
    /// Woken when a fetch ends (with messages or without).
    fetched: Notify,
}

struct State<T> {
    msgs: VecDeque<T>,
    /// A receive is fetching for all.
    fetching: bool,
    /// The size of the last fetch.
    window: usize,
    /// How many the last fetch brought, and when it ended.
    brought: usize,
    refilled: Instant,
    /// What the receives inside `take` now ask for, together.
    demand: usize,
    /// Handed back for good (the topic's handle is dropped, or the node leaves): what a
    /// fetch under way brings goes back at once.
    closed: bool,
    /// When a receive last looked here.
    last_receive: Instant,
}

impl<T> Default for Prefetch<T> {
    fn default() -> Self {
        Prefetch {
            state: Mutex::new(State {
                msgs: VecDeque::new(),
                fetching: false,
                window: 1,
                brought: 0,
                refilled: Instant::now(),
                demand: 0,
                closed: false,
                last_receive: Instant::now(),
            }),
            fetched: Notify::new(),
        }
    }
}

/// A receive's demand, counted while it lasts.
pub(crate) struct Demand<'a, T>(&'a Prefetch<T>, usize);

impl<T> Drop for Demand<'_, T> {
    /// A receive that just ended counts as a recent one (see [`Prefetch::abandoned`]).
    fn drop(&mut self) {
        let mut s = self.0.state.lock();
        s.demand -= self.1;
        s.last_receive = Instant::now();
    }
}

/// The fetcher's turn: given up (and the waiting receives woken) when dropped, whatever
/// became of the fetch (see [`Turn::brought`]).
pub(crate) struct Turn<'a, T> {
    prefetch: &'a Prefetch<T>,
    /// The window asked for, and how many came (the first included); 0 if none.
    window: usize,
    brought: usize,
}

impl<T> Turn<'_, T> {
    /// The size of the fetch.
    pub(crate) fn window(&self) -> usize {
        self.window
    }

    /// Records what the fetch brought, the first message included.
    pub(crate) fn brought(&mut self, n: usize) {
        self.brought = n;
    }
}

impl<T> Drop for Turn<'_, T> {
    fn drop(&mut self) {
        let mut s = self.prefetch.state.lock();
        s.fetching = false;
        s.brought = self.brought;
        s.refilled = Instant::now();
        drop(s);
        self.prefetch.fetched.notify_waiters();
    }
}

/// What a receive gets from [`Prefetch::pop_or_turn`].
pub(crate) enum Next<'a, T> {
    /// Messages held here.
    Held(Vec<T>),
    /// None here and no fetch under way: this receive fetches.
    Fetch(Turn<'a, T>),
    /// None here, another receive fetches: wait for it.
    Wait,
}

impl<T: Held> Prefetch<T> {
    /// Counts a receive of up to `max` messages in the demand until the guard drops.
    pub(crate) fn want(&self, max: usize) -> Demand<'_, T> {
        self.state.lock().demand += max;
        Demand(self, max)
    }

    /// What a receive of up to `max` takes from here: one message delivered before alone
    /// (so that one that crashes its receiver is found and counted alone), else the first
    /// deliveries at the front, up to `max`. With none here, the fetcher's turn if no
    /// receive has it (one look under one lock: never a fetch while messages wait here).
    pub(crate) fn pop_or_turn(&self, max: usize) -> Next<'_, T> {
        let mut s = self.state.lock();
        s.last_receive = Instant::now();
        let mut out = Vec::new();
        while out.len() < max.max(1) {
            let alone = match s.msgs.front() {
                None => break,
                Some(d) => d.delivered_before(),
            };
            if alone && !out.is_empty() {
                break;
            }
            out.push(s.msgs.pop_front().expect("front"));
            if alone {
                break;
            }
        }
        if !out.is_empty() {
            return Next::Held(out);
        }
        if s.fetching {
            return Next::Wait;
        }
        s.fetching = true;
        let full = s.brought > 0 && s.brought >= s.window;
        let next = match (full, s.refilled.elapsed() < QUICK) {
            (true, true) => s.window * 2,
            (true, false) => s.window / 2,
            (false, _) => s.brought,
        };
        s.window = next.max(s.demand).clamp(1, MAX_WINDOW);
        Next::Fetch(Turn { prefetch: self, window: s.window, brought: 0 })
    }

    /// A future that completes when the current fetch ends: made before looking, so that
    /// an end between the look and the wait is not missed.
    pub(crate) fn fetch_ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.fetched.notified()
    }

    /// Keeps fetched messages for the next receives and wakes those waiting; once closed,
    /// gives them back (to hand back).
    pub(crate) fn keep(&self, msgs: Vec<T>) -> Vec<T> {
        let mut s = self.state.lock();
        if s.closed {
            return msgs;
        }
        s.msgs.extend(msgs);
        // The hold counts from their arrival (the fetcher may have waited long for them).
        s.last_receive = Instant::now();
        drop(s);
        self.fetched.notify_waiters();
        Vec::new()
    }

    /// Everything held, when at `now` no receive has looked here, ended, or brought
    /// messages for `hold` and none waits (to let go); the window starts again from 1.
    pub(crate) fn abandoned(&self, hold: Duration, now: Instant) -> Vec<T> {
        let mut s = self.state.lock();
        let quiet = now.saturating_duration_since(s.last_receive);
        if s.msgs.is_empty() || s.demand > 0 || quiet < hold {
            return Vec::new();
        }
        self.take_all(&mut s)
    }

    fn take_all(&self, s: &mut State<T>) -> Vec<T> {
        let out: Vec<T> = s.msgs.drain(..).collect();
        (s.window, s.brought) = (1, 0);
        out
    }

    /// Every message held, to hand back; what a fetch under way brings later is given back
    /// by [`keep`](Self::keep).
    pub(crate) fn close(&self) -> Vec<T> {
        let mut s = self.state.lock();
        s.closed = true;
        self.take_all(&mut s)
    }

    /// Messages held here now.
    pub(crate) fn held(&self) -> u64 {
        self.state.lock().msgs.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held message: its number, and whether it was delivered before.
    #[derive(Debug, PartialEq)]
    struct M(u32, bool);

    impl Held for M {
        fn delivered_before(&self) -> bool {
            self.1
        }
    }

    fn take(p: &Prefetch<M>, max: usize) -> Vec<u32> {
        match p.pop_or_turn(max) {
            Next::Held(got) => got.into_iter().map(|m| m.0).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn a_message_delivered_before_goes_alone_and_batches_stop_before_it() {
        let p = Prefetch::default();
        p.keep(vec![M(1, false), M(2, false), M(3, true), M(4, false), M(5, false)]);
        assert_eq!(p.held(), 5);
        assert_eq!(take(&p, 10), [1, 2]);
        assert_eq!(take(&p, 10), [3]);
        assert_eq!(take(&p, 1), [4]);
        assert_eq!(take(&p, 10), [5]);
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn one_receive_fetches_at_a_time_and_never_while_messages_wait() {
        let p: Prefetch<M> = Prefetch::default();
        let Next::Fetch(turn) = p.pop_or_turn(1) else { panic!() };
        assert!(matches!(p.pop_or_turn(1), Next::Wait));
        p.keep(vec![M(1, false)]);
        drop(turn);
        // Held messages first: no new turn while one waits.
        assert_eq!(take(&p, 1), [1]);
        assert!(matches!(p.pop_or_turn(1), Next::Fetch(_)));
    }

    #[test]
    fn the_window_follows_what_the_stream_held_and_the_demand() {
        let p: Prefetch<M> = Prefetch::default();
        let turn_of = |p: &Prefetch<M>, brought: Option<usize>| {
            let Next::Fetch(mut turn) = p.pop_or_turn(1) else { panic!("no turn") };
            let window = turn.window();
            turn.brought(brought.unwrap_or(window));
            window
        };
        // (Full fetches used up within QUICK double it: timing, not asserted here.)
        assert_eq!(turn_of(&p, Some(0)), 1);
        // Eight asked for (the demand), the stream held 3: the next asks for 3; after an
        // empty wait, for 1.
        let eight = p.want(8);
        assert_eq!(turn_of(&p, Some(3)), 8);
        drop(eight);
        assert_eq!(turn_of(&p, Some(0)), 3);
        assert_eq!(turn_of(&p, None), 1);
        // What the receives waiting now ask for is the floor.
        let _demand = p.want(50);
        assert_eq!(turn_of(&p, Some(0)), 50);
        let _more = p.want(500);
        assert_eq!(turn_of(&p, Some(0)), MAX_WINDOW);
    }

    #[test]
    fn a_closed_prefetch_gives_back_what_it_holds_and_what_comes_later() {
        let p = Prefetch::default();
        p.keep(vec![M(1, false), M(2, false)]);
        assert_eq!(p.close(), [M(1, false), M(2, false)]);
        assert_eq!(p.keep(vec![M(3, false)]), [M(3, false)]);
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn held_messages_go_back_only_when_no_receive_came_for_the_hold() {
        let p = Prefetch::default();
        p.keep(vec![M(1, false), M(2, false)]);
        // A receive looked just now (or one waits): kept.
        assert_eq!(take(&p, 1), [1]);
        let hour = Duration::from_secs(3600);
        assert!(p.abandoned(hour, Instant::now()).is_empty());
        let waiting = p.want(1);
        assert!(p.abandoned(Duration::ZERO, Instant::now() + hour).is_empty());
        drop(waiting);
        // Nobody looked for the hold and nobody waits: back, and the window restarts.
        assert_eq!(p.abandoned(hour, Instant::now() + 2 * hour), [M(2, false)]);
        assert_eq!(p.held(), 0);
        // Messages a fetch brings count from their arrival, however long its receive
        // waited for them.
        let before = Instant::now();
        p.keep(vec![M(3, false)]);
        assert!(p.abandoned(hour, before + hour).is_empty());
        assert_eq!(p.abandoned(hour, Instant::now() + hour), [M(3, false)]);
    }
}
