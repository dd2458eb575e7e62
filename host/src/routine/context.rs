//! [`RoutineContext`]: what a running routine uses to talk to the host (heartbeat,
//! accounting, cancellation, its mailbox, other routines' mailboxes, the bus, logging).
//! Native routines receive one per run; wasm guests reach the same functions through the
//! WIT imports (`wasm::host`), so both kinds of routine behave the same.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::channel::{RecvError, SendError};
use crate::delivery::{Message, Source};
use crate::logguard::{Kind, escape};
use crate::orchestrator::{OrchInner, queued};
use crate::routine::shared::{RoutineShared, RunControl};

/// Why a routine's host call did not complete; mirrors the WIT `error` variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The routine is being stopped: return promptly.
    #[error("cancelled")]
    Cancelled,
    /// The mailbox or topic is closed and empty.
    #[error("closed")]
    Closed,
    /// No live routine has this name.
    #[error("no such routine: {0}")]
    NoSuchRoutine(String),
    /// The payload is larger than the per-message limit (bytes).
    #[error("payload too large (limit {0} bytes)")]
    TooLarge(u64),
    /// A host limit was reached.
    #[error("limit reached: {0}")]
    Limit(String),
    /// The topic or routine name is not valid.
    #[error("invalid name: {0}")]
    InvalidName(String),
}

/// What a running routine uses to talk to the host: heartbeat, accounting, cancellation,
/// its mailbox, other routines' mailboxes and the bus. Native routines receive one; wasm
/// guests reach the same functions through the WIT imports.
#[derive(Clone)]
pub struct RoutineContext {
    pub(crate) shared: Arc<RoutineShared>,
    pub(crate) orch: Arc<OrchInner>,
    pub(crate) run: Arc<RunControl>,
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
        self.shared.in_flight().ack();
        let r = self.shared.mailbox().recv_until(Some(&self.run.cancel), timeout).await;
        self.took(r, || Source::Mailbox)
    }

    /// Delivers `payload` to the mailbox of the routine named `to`, waiting while it is full.
    /// In a cluster, `to` may run on another node, and `node/name` names one node's routine.
    pub async fn send(&self, to: &str, mut payload: Vec<u8>) -> Result<(), CallError> {
        self.check_size(payload.len())?;
        if self.orch.cluster().is_none()
            && let Some(mailbox) = self.run.handles.mailbox(&self.orch, to)
        {
            match mailbox.send_cancellable(Message::from(payload), &self.run.cancel).await {
                // Closed under us (the routine ended): the name may have a new routine.
                Err(SendError::Closed(m)) => payload = m.payload,
                r => return self.sent(queued(r)),
            }
        }
        self.sent(self.orch.send(to, payload, &self.run.cancel).await)
    }

    /// Publishes `payload` on `topic` (created on first use), waiting while it is full.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), CallError> {
        self.check_size(payload.len())?;
        if self.orch.cluster().is_some() {
            return self.sent(self.orch.publish(topic, payload, &self.run.cancel).await);
        }
        let (_, ch) = self.run.handles.topic(&self.orch, topic)?;
        self.sent(queued(ch.send_cancellable(Message::from(payload), &self.run.cancel).await))
    }

    /// Next message on `topic` (created on first use); `Ok(None)` means the wait timed out.
    /// Like [`recv`](Self::recv), the message stays in flight until the next receive.
    pub async fn bus_recv(
        &self,
        topic: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<Vec<u8>>, CallError> {
        if let Some(cluster) = self.orch.cluster() {
            self.shared.in_flight().ack();
            let max = self.shared.supervision().max_deliveries;
            let r = crate::cluster::topics::recv(cluster, topic, timeout, &self.run.cancel, max);
            let Some(d) = r.await? else { return Ok(None) };
            self.shared.count_in();
            let msg = Message { deliveries: d.deliveries - 1, ..Message::new(d.payload) };
            let source = Source::Cluster(topic.to_string(), d.handle);
            return Ok(Some(self.shared.in_flight().deliver(msg, source)));
        }
        let (name, ch) = self.run.handles.topic(&self.orch, topic)?;
        self.shared.in_flight().ack();
        let r = ch.recv_until(Some(&self.run.cancel), timeout).await;
        self.took(r, || Source::Topic(name, ch.clone()))
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
        self.shared.in_flight().ack();
        let mut batch = Vec::new();
        let mailbox = self.shared.mailbox();
        let cancel = Some(&self.run.cancel);
        let r = mailbox.recv_many_split(max, &mut batch, cancel, timeout, Message::alone).await;
        self.took_batch(r, batch, || Source::Mailbox)
    }

    /// Up to `max` messages from `topic`, like [`recv_batch`](Self::recv_batch). A cluster
    /// topic hands out one message per call.
    pub async fn bus_recv_batch(
        &self,
        topic: &str,
        max: usize,
        timeout: Option<Duration>,
    ) -> Result<Vec<Vec<u8>>, CallError> {
        if self.orch.cluster().is_some() {
            return Ok(self.bus_recv(topic, timeout).await?.into_iter().collect());
        }
        let (name, ch) = self.run.handles.topic(&self.orch, topic)?;
        self.shared.in_flight().ack();
        let mut batch = Vec::new();
        let cancel = Some(&self.run.cancel);
        let r = ch.recv_many_split(max, &mut batch, cancel, timeout, Message::alone).await;
        self.took_batch(r, batch, || Source::Topic(name, ch.clone()))
    }

    /// Publishes each payload on `topic` in order, waiting while it is full. Nothing is
    /// published if one payload is over the size limit; after another error, the payloads
    /// before the failing one were published.
    pub async fn publish_batch(
        &self,
        topic: &str,
        payloads: Vec<Vec<u8>>,
    ) -> Result<(), CallError> {
        for p in &payloads {
            self.check_size(p.len())?;
        }
        if self.orch.cluster().is_some() {
            for p in payloads {
                self.publish(topic, p).await?;
            }
            return Ok(());
        }
        let (_, ch) = self.run.handles.topic(&self.orch, topic)?;
        let mut left: std::collections::VecDeque<Message> =
            payloads.into_iter().map(Message::from).collect();
        let total = left.len();
        let r = ch.send_many_cancellable(&mut left, &self.run.cancel).await;
        // Those handed back or left over were not published.
        let unsent = left.len() + usize::from(r.is_err());
        self.shared.count_out_n((total - unsent) as u64);
        queued(r)
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

    fn took(
        &self,
        r: Result<Message, RecvError>,
        source: impl FnOnce() -> Source,
    ) -> Result<Option<Vec<u8>>, CallError> {
        match r {
            Ok(m) => {
                self.shared.count_in();
                Ok(Some(self.shared.in_flight().deliver(m, source())))
            }
            Err(RecvError::Timeout) => Ok(None),
            Err(RecvError::Cancelled) => Err(CallError::Cancelled),
            Err(RecvError::Closed | RecvError::Empty) => Err(CallError::Closed),
        }
    }

    fn took_batch(
        &self,
        r: Result<usize, RecvError>,
        mut batch: Vec<Message>,
        source: impl FnOnce() -> Source,
    ) -> Result<Vec<Vec<u8>>, CallError> {
        match r {
            Ok(n) => {
                self.shared.count_in_n(n as u64);
                Ok(self.shared.in_flight().deliver_batch(&mut batch, source()))
            }
            Err(RecvError::Timeout) => Ok(Vec::new()),
            Err(RecvError::Cancelled) => Err(CallError::Cancelled),
            Err(RecvError::Closed | RecvError::Empty) => Err(CallError::Closed),
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
