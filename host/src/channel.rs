//! `Channel<T>`: a bounded async queue with exact statistics, cancellation-aware waits and
//! close semantics. Routine mailboxes and bus topics are channels.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Reports an approximate size in bytes of a queued value, for `queueBytes` and
/// `ChannelStats::approx_bytes`. Implement it for your own message types to opt in; the
/// default counts nothing.
pub trait Sizer {
    /// Approximate heap + inline size of the value in bytes.
    fn approx_size(&self) -> usize {
        0
    }
}

impl Sizer for Vec<u8> {
    fn approx_size(&self) -> usize {
        self.len()
    }
}
impl Sizer for String {
    fn approx_size(&self) -> usize {
        self.len()
    }
}
impl Sizer for &'static str {
    fn approx_size(&self) -> usize {
        self.len()
    }
}
impl Sizer for Box<[u8]> {
    fn approx_size(&self) -> usize {
        self.len()
    }
}
impl Sizer for bytes::Bytes {
    fn approx_size(&self) -> usize {
        self.len()
    }
}
impl Sizer for () {}
impl Sizer for u64 {
    fn approx_size(&self) -> usize {
        8
    }
}
impl Sizer for i64 {
    fn approx_size(&self) -> usize {
        8
    }
}
impl Sizer for u32 {
    fn approx_size(&self) -> usize {
        4
    }
}

/// A point-in-time view of a channel's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChannelStats {
    /// Values queued now.
    pub len: usize,
    /// Capacity.
    pub cap: usize,
    /// Values accepted since creation.
    pub sends: u64,
    /// Values taken since creation.
    pub recvs: u64,
    /// Nanoseconds senders spent waiting for room (only real waits count).
    pub blocked_send_ns: u64,
    /// Nanoseconds receivers spent waiting for a value (only real waits count).
    pub blocked_recv_ns: u64,
    /// Sum of [`Sizer::approx_size`] of the queued values.
    pub approx_bytes: usize,
}

/// Why a send did not happen; the value is handed back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError<T> {
    /// The channel is full (only from [`Channel::try_send`]).
    #[error("channel full")]
    Full(T),
    /// The channel is closed.
    #[error("channel closed")]
    Closed(T),
    /// The wait was cancelled.
    #[error("cancelled")]
    Cancelled(T),
}

impl<T> SendError<T> {
    /// The value that was not sent.
    pub fn into_inner(self) -> T {
        match self {
            SendError::Full(v) | SendError::Closed(v) | SendError::Cancelled(v) => v,
        }
    }
}

/// Why a receive returned no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// Nothing queued (only from [`Channel::try_recv`]).
    #[error("channel empty")]
    Empty,
    /// The channel is closed and drained.
    #[error("channel closed")]
    Closed,
    /// The wait was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The timeout passed first (only from [`Channel::recv_timeout`]).
    #[error("timed out")]
    Timeout,
}

struct State<T> {
    queue: VecDeque<T>,
    bytes: usize,
    closed: bool,
}

struct Inner<T> {
    state: Mutex<State<T>>,
    /// `state.closed`, readable without the lock.
    closed: AtomicBool,
    cap: usize,
    not_empty: Notify,
    not_full: Notify,
    sends: AtomicU64,
    recvs: AtomicU64,
    blocked_send_ns: AtomicU64,
    blocked_recv_ns: AtomicU64,
    /// Tasks waiting for room now.
    waiting_senders: AtomicUsize,
    /// Tasks waiting for a value now.
    waiting_receivers: AtomicUsize,
}

/// A bounded multi-producer multi-consumer async queue.
///
/// Cloning gives another handle to the same queue. Waiting operations can be cut short by a
/// [`CancellationToken`]; a send that does not happen hands its value back.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use gorch_host::Channel;
/// let ch: Channel<String> = Channel::new(8);
/// ch.send("hello".to_string()).await.unwrap();
/// assert_eq!(ch.stats().approx_bytes, 5);
/// assert_eq!(ch.recv().await.unwrap(), "hello");
/// ch.close();
/// assert!(ch.recv().await.is_err());
/// # });
/// ```
pub struct Channel<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Channel<T> {
    fn clone(&self) -> Self {
        Channel { inner: self.inner.clone() }
    }
}

impl<T> std::fmt::Debug for Channel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("cap", &self.inner.cap).finish_non_exhaustive()
    }
}

impl<T: Sizer + Send> Channel<T> {
    /// A channel holding at most `cap` values (`cap` of 0 is treated as 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Channel {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    // Grows on demand: an idle mailbox costs no queue memory.
                    queue: VecDeque::new(),
                    bytes: 0,
                    closed: false,
                }),
                closed: AtomicBool::new(false),
                cap,
                not_empty: Notify::new(),
                not_full: Notify::new(),
                sends: AtomicU64::new(0),
                recvs: AtomicU64::new(0),
                blocked_send_ns: AtomicU64::new(0),
                blocked_recv_ns: AtomicU64::new(0),
                waiting_senders: AtomicUsize::new(0),
                waiting_receivers: AtomicUsize::new(0),
            }),
        }
    }

    /// Queues `value` if there is room, without waiting.
    pub fn try_send(&self, value: T) -> Result<(), SendError<T>> {
        {
            let mut st = self.inner.state.lock();
            if st.closed {
                return Err(SendError::Closed(value));
            }
            if st.queue.len() >= self.inner.cap {
                return Err(SendError::Full(value));
            }
            st.bytes += value.approx_size();
            st.queue.push_back(value);
        }
        self.inner.sends.fetch_add(1, Relaxed);
        self.inner.not_empty.notify_one();
        Ok(())
    }

    /// Puts `value` back at the head of the queue, ignoring the capacity (used to return a
    /// message whose consumer crashed before finishing it). Fails only when closed.
    pub fn push_front(&self, value: T) -> Result<(), SendError<T>> {
        {
            let mut st = self.inner.state.lock();
            if st.closed {
                return Err(SendError::Closed(value));
            }
            st.bytes += value.approx_size();
            st.queue.push_front(value);
        }
        self.inner.not_empty.notify_one();
        Ok(())
    }

    /// Queues `value`, waiting while the channel is full.
    pub async fn send(&self, value: T) -> Result<(), SendError<T>> {
        self.send_until(value, None).await
    }

    /// Like [`send`](Self::send), but gives up with [`SendError::Cancelled`] (handing the
    /// value back) when `cancel` fires.
    pub async fn send_cancellable(
        &self,
        value: T,
        cancel: &CancellationToken,
    ) -> Result<(), SendError<T>> {
        self.send_until(value, Some(cancel)).await
    }

    /// Queues the values of `values` in order, waiting while the channel is full, with one
    /// lock for each run of values that fits. Stops at a close or at `cancel`, handing back
    /// the first value not queued (those before it were queued); `values` keeps the rest.
    pub async fn send_many_cancellable(
        &self,
        values: &mut std::collections::VecDeque<T>,
        cancel: &CancellationToken,
    ) -> Result<(), SendError<T>> {
        loop {
            let pushed = {
                let mut st = self.inner.state.lock();
                if st.closed {
                    drop(st);
                    return match values.pop_front() {
                        Some(v) => Err(SendError::Closed(v)),
                        None => Ok(()),
                    };
                }
                let n = values.len().min(self.inner.cap.saturating_sub(st.queue.len()));
                let State { queue, bytes, .. } = &mut *st;
                for v in values.drain(..n) {
                    *bytes += v.approx_size();
                    queue.push_back(v);
                }
                n
            };
            self.inner.sends.fetch_add(pushed as u64, Relaxed);
            for _ in 0..pushed {
                self.inner.not_empty.notify_one();
            }
            let Some(next) = values.pop_front() else { return Ok(()) };
            // Full: wait for room through the single-value path, then go on in bulk.
            self.send_until(next, Some(cancel)).await?;
        }
    }

    async fn send_until(
        &self,
        mut value: T,
        cancel: Option<&CancellationToken>,
    ) -> Result<(), SendError<T>> {
        // Fast path: no allocation, no timing.
        match self.try_send(value) {
            Err(SendError::Full(v)) => value = v,
            other => return other,
        }
        let start = Instant::now();
        let mut waiting = None;
        let result = loop {
            let notified = self.inner.not_full.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            waiting.get_or_insert_with(|| Waiting::new(&self.inner.waiting_senders));
            match self.try_send(value) {
                Err(SendError::Full(v)) => value = v,
                other => break other,
            }
            if cancel.is_some_and(|c| c.is_cancelled()) {
                break Err(SendError::Cancelled(value));
            }
            let cancelled = wait_or_cancel(notified, cancel).await;
            if cancelled {
                break Err(SendError::Cancelled(value));
            }
        };
        add_elapsed(&self.inner.blocked_send_ns, start);
        result
    }

    /// Takes the next value if one is queued, without waiting.
    pub fn try_recv(&self) -> Result<T, RecvError> {
        let value = {
            let mut st = self.inner.state.lock();
            match st.queue.pop_front() {
                Some(v) => {
                    st.bytes -= v.approx_size();
                    v
                }
                None if st.closed => return Err(RecvError::Closed),
                None => return Err(RecvError::Empty),
            }
        };
        self.inner.recvs.fetch_add(1, Relaxed);
        self.inner.not_full.notify_one();
        Ok(value)
    }

    /// Takes the next value, waiting while the channel is empty. After [`close`](Self::close)
    /// the queued values are still delivered, then [`RecvError::Closed`].
    pub async fn recv(&self) -> Result<T, RecvError> {
        self.recv_until(None, None).await
    }

    /// Like [`recv`](Self::recv), but gives up with [`RecvError::Cancelled`] when `cancel`
    /// fires.
    pub async fn recv_cancellable(&self, cancel: &CancellationToken) -> Result<T, RecvError> {
        self.recv_until(Some(cancel), None).await
    }

    /// Like [`recv`](Self::recv), but gives up with [`RecvError::Timeout`] after `timeout`.
    pub async fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvError> {
        self.recv_until(None, Some(timeout)).await
    }

    /// The general receive: optional cancellation and optional timeout.
    pub async fn recv_until(
        &self,
        cancel: Option<&CancellationToken>,
        timeout: Option<Duration>,
    ) -> Result<T, RecvError> {
        self.wait_for(cancel, timeout, || self.try_recv()).await
    }

    /// Takes up to `max` queued values (at least one) into `out`, in queue order, without
    /// waiting; returns how many. One lock for the whole batch.
    pub fn try_recv_many(&self, max: usize, out: &mut Vec<T>) -> Result<usize, RecvError> {
        self.try_recv_many_split(max, out, |_| false)
    }

    /// Like [`try_recv_many`](Self::try_recv_many), where a value for which `alone` is true
    /// is received alone: the batch stops before it, or is that value only. The channel
    /// does not know why (the caller's rule, read under the channel's lock).
    pub fn try_recv_many_split(
        &self,
        max: usize,
        out: &mut Vec<T>,
        alone: fn(&T) -> bool,
    ) -> Result<usize, RecvError> {
        let n = {
            let mut st = self.inner.state.lock();
            let avail = st.queue.len().min(max.max(1));
            if avail == 0 {
                return Err(if st.closed { RecvError::Closed } else { RecvError::Empty });
            }
            let mut n = 1;
            if !alone(&st.queue[0]) {
                while n < avail && !alone(&st.queue[n]) {
                    n += 1;
                }
            }
            let State { queue, bytes, .. } = &mut *st;
            out.reserve(n);
            for v in queue.drain(..n) {
                *bytes -= v.approx_size();
                out.push(v);
            }
            n
        };
        self.inner.recvs.fetch_add(n as u64, Relaxed);
        // One permit per freed slot, as `n` single receives would give.
        for _ in 0..n {
            self.inner.not_full.notify_one();
        }
        Ok(n)
    }

    /// Waits like [`recv_until`](Self::recv_until) for the first value, then takes up to
    /// `max` in all of what is queued (without waiting for more) into `out`; returns how
    /// many.
    pub async fn recv_many_until(
        &self,
        max: usize,
        out: &mut Vec<T>,
        cancel: Option<&CancellationToken>,
        timeout: Option<Duration>,
    ) -> Result<usize, RecvError> {
        self.recv_many_split(max, out, cancel, timeout, |_| false).await
    }

    /// [`recv_many_until`](Self::recv_many_until) with the batch cut of
    /// [`try_recv_many_split`](Self::try_recv_many_split).
    pub async fn recv_many_split(
        &self,
        max: usize,
        out: &mut Vec<T>,
        cancel: Option<&CancellationToken>,
        timeout: Option<Duration>,
        alone: fn(&T) -> bool,
    ) -> Result<usize, RecvError> {
        self.wait_for(cancel, timeout, || self.try_recv_many_split(max, out, alone)).await
    }

    /// Runs `attempt` until it finds something (or the channel is closed), waiting for
    /// `not_empty` in between. A value already queued is taken without any await: no
    /// timing, no waiter registration, the caller is not suspended.
    async fn wait_for<R>(
        &self,
        cancel: Option<&CancellationToken>,
        timeout: Option<Duration>,
        mut attempt: impl FnMut() -> Result<R, RecvError>,
    ) -> Result<R, RecvError> {
        match attempt() {
            Err(RecvError::Empty) => {}
            other => return other,
        }
        if timeout == Some(Duration::ZERO) {
            return Err(RecvError::Timeout);
        }
        let start = Instant::now();
        let deadline = timeout.map(|t| tokio::time::Instant::from_std(start) + t);
        let mut waiting = None;
        let result = loop {
            let notified = self.inner.not_empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            waiting.get_or_insert_with(|| Waiting::new(&self.inner.waiting_receivers));
            match attempt() {
                Err(RecvError::Empty) => {}
                other => break other,
            }
            if cancel.is_some_and(|c| c.is_cancelled()) {
                break Err(RecvError::Cancelled);
            }
            let woke = match deadline {
                None => wait_or_cancel(notified, cancel).await,
                Some(d) => {
                    match tokio::time::timeout_at(d, wait_or_cancel(notified, cancel)).await {
                        Ok(cancelled) => cancelled,
                        Err(_) => break Err(RecvError::Timeout),
                    }
                }
            };
            if woke {
                break Err(RecvError::Cancelled);
            }
        };
        add_elapsed(&self.inner.blocked_recv_ns, start);
        result
    }

    /// Closes the channel: sends fail from now on, receivers drain what is queued and then
    /// get [`RecvError::Closed`]. Every waiter is woken.
    pub fn close(&self) {
        self.inner.state.lock().closed = true;
        self.inner.closed.store(true, std::sync::atomic::Ordering::Release);
        self.inner.not_empty.notify_waiters();
        self.inner.not_full.notify_waiters();
    }

    /// How many handles of this channel exist (clones, this one included).
    pub(crate) fn handles(&self) -> usize {
        Arc::strong_count(&self.inner)
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Values queued now.
    pub fn len(&self) -> usize {
        self.inner.state.lock().queue.len()
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The capacity.
    pub fn cap(&self) -> usize {
        self.inner.cap
    }

    /// Tasks waiting now in a receive on this channel (registered for a wake-up: a value
    /// sent now wakes one of them). Lets a test or a probe see that a receiver is blocked
    /// rather than guess it with a sleep.
    pub fn waiting_receivers(&self) -> usize {
        self.inner.waiting_receivers.load(Relaxed)
    }

    /// Tasks waiting now in a send on this channel for room (see
    /// [`waiting_receivers`](Self::waiting_receivers)).
    pub fn waiting_senders(&self) -> usize {
        self.inner.waiting_senders.load(Relaxed)
    }

    /// The counters, read together.
    pub fn stats(&self) -> ChannelStats {
        let (len, approx_bytes) = {
            let st = self.inner.state.lock();
            (st.queue.len(), st.bytes)
        };
        ChannelStats {
            len,
            cap: self.inner.cap,
            sends: self.inner.sends.load(Relaxed),
            recvs: self.inner.recvs.load(Relaxed),
            blocked_send_ns: self.inner.blocked_send_ns.load(Relaxed),
            blocked_recv_ns: self.inner.blocked_recv_ns.load(Relaxed),
            approx_bytes,
        }
    }
}

/// Waits for `notified`, or for `cancel`; returns true if cancelled.
async fn wait_or_cancel(
    notified: impl Future<Output = ()>,
    cancel: Option<&CancellationToken>,
) -> bool {
    match cancel {
        None => {
            notified.await;
            false
        }
        Some(c) => {
            tokio::select! {
                biased;
                _ = c.cancelled() => true,
                _ = notified => false,
            }
        }
    }
}

/// Counts one waiting task for as long as it lives (also when the wait is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Relaxed);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn add_elapsed(counter: &AtomicU64, start: Instant) {
    let ns = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(ns, Relaxed);
}
