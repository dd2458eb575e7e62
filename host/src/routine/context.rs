//! [`RoutineContext`]: what a running routine uses to talk to the host (heartbeat,
//! accounting, cancellation, its mailbox, other routines' mailboxes, the bus, logging).
//! Native routines receive one per run; wasm guests reach the same functions through the
//! WIT imports (`wasm::host`), so both kinds of routine behave the same.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::delivery::{InFlightSlot, Message, Origin};
use crate::logguard::{Kind, escape};
use crate::routine::shared::{RoutineShared, RunControl};
use crate::transport::{CallError, Link, Queue};

/// What a running routine uses to talk to the host: heartbeat, accounting, cancellation,
/// its mailbox, other routines' mailboxes and the bus. Native routines receive one; wasm
/// guests reach the same functions through the WIT imports.
#[derive(Clone)]
pub struct RoutineContext {
    pub(crate) shared: Arc<RoutineShared>,
    pub(crate) run: Arc<RunControl>,
    /// Where this run's messages travel.
    pub(crate) link: Arc<dyn Link>,
}

impl fmt::Debug for RoutineContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutineContext").field("name", &self.shared.name()).finish()
    }
}

impl RoutineContext {
    /// Stable id.
    pub fn id(&self) -> u64 {
        self.shared.id()
    }
    /// Unique name.
    pub fn name(&self) -> &str {
        self.shared.name()
    }
    /// Restarts so far.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts()
    }
    /// Heartbeat: resets the idle watchdog.
    pub fn beat(&self) {
        self.shared.beat()
    }
    /// Adds busy time the host cannot observe.
    pub fn add_busy(&self, d: Duration) {
        self.shared.add_busy(d);
    }
    /// True once the host has asked this routine to stop.
    pub fn is_cancelled(&self) -> bool {
        self.run.cancel.is_cancelled()
    }
    /// Completes when the host asks this routine to stop.
    pub async fn cancelled(&self) {
        self.run.cancel.cancelled().await
    }
    /// The cancellation token of the current stop request.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.run.cancel
    }
    /// Sleeps; returns false if cut short by cancellation.
    pub async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.run.cancel.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// Next message from this routine's mailbox; `None` timeout waits without limit;
    /// `Ok(None)` means the wait timed out.
    ///
    /// Receiving acknowledges the previous message; the one returned stays in flight until
    /// the next receive or a clean return (at-least-once: see the README's delivery rule).
    pub async fn recv(&self, timeout: Option<Duration>) -> Result<Option<Vec<u8>>, CallError> {
        self.take_one(Queue::Mailbox, timeout).await
    }

    /// Delivers `payload` to the mailbox of the routine named `to`, waiting while it is full.
    /// With `--nats`, `to` may run on another node, and `node/name` names one node's routine.
    pub async fn send(&self, to: &str, payload: Vec<u8>) -> Result<(), CallError> {
        self.check_size(payload.len())?;
        self.sent(self.link.send(to, payload, &self.run.cancel).await)
    }

    /// Sends each payload to the mailbox of `to` in order, waiting while it is full.
    /// Nothing is sent if one payload is over the size limit; after another error, the
    /// payloads before the failing one were delivered. To a routine on another node the
    /// batch goes in as few requests as NATS messages carry (one round trip each), each
    /// taken in order and acknowledged.
    pub async fn send_batch(&self, to: &str, payloads: Vec<Vec<u8>>) -> Result<(), CallError> {
        for p in &payloads {
            self.check_size(p.len())?;
        }
        let (sent, r) = self.link.send_batch(to, payloads, &self.run.cancel).await;
        self.shared.count_out_n(sent as u64);
        r
    }

    /// Publishes `payload` on `topic` (created on first use), waiting while it is full.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), CallError> {
        self.check_size(payload.len())?;
        self.sent(self.link.publish(topic, payload, &self.run.cancel).await)
    }

    /// Next message on `topic` (created on first use); `Ok(None)` means the wait timed out.
    /// Like [`recv`](Self::recv), the message stays in flight until the next receive.
    pub async fn bus_recv(
        &self,
        topic: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<Vec<u8>>, CallError> {
        self.take_one(Queue::Topic(topic), timeout).await
    }

    /// Up to `max` messages from this routine's mailbox (at least one is asked for): waits
    /// like [`recv`](Self::recv) for the first, then takes what else is queued without
    /// waiting. An empty batch means the wait timed out.
    ///
    /// Receiving acknowledges the previous message or batch; the batch returned stays in
    /// flight as a whole until the next receive or a clean return: after a crash all of it
    /// is delivered again, in order.
    pub async fn recv_batch(
        &self,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<Vec<Vec<u8>>, CallError> {
        let batch = self.take(Queue::Mailbox, max.max(1), timeout, InFlightSlot::deliver).await;
        batch.map(Option::unwrap_or_default)
    }

    /// Up to `max` messages from `topic`, like [`recv_batch`](Self::recv_batch). A topic
    /// shared by several nodes (`--nats`) hands out what its stream holds; a message
    /// delivered before comes alone.
    pub async fn bus_recv_batch(
        &self,
        topic: &str,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<Vec<Vec<u8>>, CallError> {
        let batch = self.take(Queue::Topic(topic), max.max(1), timeout, InFlightSlot::deliver);
        batch.await.map(Option::unwrap_or_default)
    }

    /// Publishes each payload on `topic` in order, waiting while it is full. Nothing is
    /// published if one payload is over the size limit; after another error, the payloads
    /// before the failing one were published. On a cluster topic a window of payloads goes
    /// out before their acknowledgements: one the full topic refused is stored after those
    /// behind it, and after an error some of those behind the failing one may be stored.
    pub async fn publish_batch(
        &self,
        topic: &str,
        payloads: Vec<Vec<u8>>,
    ) -> Result<(), CallError> {
        for p in &payloads {
            self.check_size(p.len())?;
        }
        let (published, r) = self.link.publish_batch(topic, payloads, &self.run.cancel).await;
        self.shared.count_out_n(published as u64);
        r
    }

    /// Writes a log line attributed to this routine. Control characters in `message` are
    /// escaped (it stays one line); during a restart storm the lines are summarized.
    pub fn log(&self, level: tracing::Level, message: &str) {
        log_line(&self.shared, level, message);
    }

    fn check_size(&self, len: usize) -> Result<(), CallError> {
        let limit = self.shared.message_bytes();
        if len as u64 > limit {
            return Err(CallError::TooLarge(limit));
        }
        Ok(())
    }

    /// One message of `queue` (see [`take`](Self::take)).
    async fn take_one(
        &self,
        queue: Queue<'_>,
        timeout: Option<Duration>,
    ) -> Result<Option<Vec<u8>>, CallError> {
        self.take(queue, 1, timeout, InFlightSlot::deliver_one).await
    }

    /// Acknowledges what is in flight, then receives up to `max` messages of `queue`
    /// through the link and hands them to the delivery rule (`deliver`); `None` when the
    /// wait timed out.
    async fn take<R>(
        &self,
        queue: Queue<'_>,
        max: usize,
        timeout: Option<Duration>,
        deliver: impl Fn(&InFlightSlot, Vec<Message>, Arc<dyn Origin>, u32) -> Option<R>,
    ) -> Result<Option<R>, CallError> {
        let in_flight = self.shared.in_flight();
        let max_deliveries = self.shared.max_deliveries();
        self.link.open(queue)?;
        let mut left = timeout;
        // For a second receive after a message went to `dead-letter` on arrival.
        let start = timeout.map(|_| tokio::time::Instant::now());
        loop {
            let mut buf = in_flight.ack();
            if self.run.cancel.is_cancelled() {
                // Asked to stop (or being upgraded): nothing more leaves the queue in this
                // run, whatever is queued.
                in_flight.unused(buf);
                return Err(CallError::Cancelled);
            }
            let r = self.link.recv(queue, max, left, &self.run.cancel, &mut buf).await;
            let origin = match r {
                Ok(Some(origin)) => origin,
                Ok(None) => {
                    in_flight.unused(buf);
                    return Ok(None);
                }
                Err(e) => {
                    in_flight.unused(buf);
                    return Err(e);
                }
            };
            let n = buf.len() as u64;
            // `None`: a message whose deliveries were used up went to `dead-letter`.
            if let Some(r) = deliver(in_flight, buf, origin, max_deliveries) {
                self.shared.count_in_n(n);
                return Ok(Some(r));
            }
            if let (Some(start), Some(t)) = (start, timeout) {
                left = Some(t.saturating_sub(start.elapsed()));
                if left == Some(Duration::ZERO) {
                    return Ok(None);
                }
            }
        }
    }

    fn sent(&self, r: Result<(), CallError>) -> Result<(), CallError> {
        if r.is_ok() {
            self.shared.count_out();
        }
        r
    }
}

/// Emits one log line as a tracing event attributed to the routine (target `guest`): what
/// [`RoutineContext::log`], the WIT `log` import and a guest's stdout and stderr write.
/// The text is escaped (a guest cannot forge a host line) and, while the routine is in a
/// restart storm, summarized (see `logguard`).
pub(crate) fn log_line(shared: &RoutineShared, level: tracing::Level, message: &str) {
    // A level nobody records costs neither the rate limiter nor the escaping.
    if tracing::level_filters::LevelFilter::current() < level {
        return;
    }
    if !shared.log_limiter().admit(Kind::Guest, shared.name()) {
        return;
    }
    // Structured fields in every format: `routine=".." plugin=".."` in text, top-level
    // `"routine"` and `"plugin"` keys with `--log-format json`.
    let routine = &*escape(shared.name());
    let plugin = &*escape(shared.plugin());
    let message = escape(message);
    match level {
        tracing::Level::TRACE => tracing::trace!(target: "guest", routine, plugin, "{message}"),
        tracing::Level::DEBUG => tracing::debug!(target: "guest", routine, plugin, "{message}"),
        tracing::Level::INFO => tracing::info!(target: "guest", routine, plugin, "{message}"),
        tracing::Level::WARN => tracing::warn!(target: "guest", routine, plugin, "{message}"),
        _ => tracing::error!(target: "guest", routine, plugin, "{message}"),
    }
}
