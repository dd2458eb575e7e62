//! The in-memory transport: topics on the host's [`Bus`], mailboxes found by name in the
//! orchestrator's [`Directory`]. A message lives in a [`Channel`] until received; handed
//! back, it goes to the head of its channel; a dead letter goes to the local
//! `dead-letter` topic.
//!
//! Each run's [`LocalLink`] keeps the topics and mailboxes it has used, by name: a send or
//! receive finds its channel there instead of in the bus and the directory, whose locks
//! every routine shares (a name lookup and a contended lock per message otherwise). A closed
//! channel (a removed topic, a routine that ended) is looked up again, so the cache never
//! changes what a call reaches.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{CallError, DeadLetters, Directory, Limit, Link, Queue, Transport, queued};
use crate::bus::{Bus, BusError, DEFAULT_TOPIC_CAPACITY, TopicStats};
use crate::channel::{Channel, RecvError, SendError};
use crate::delivery::{DEAD_LETTER_TOPIC, Letter, Message, Origin};
use crate::names::validate_routine_name;

/// Names kept per kind in a link; a routine talking to more evicts the oldest.
const MAX_NAMES: usize = 16;

/// See the module documentation.
pub(crate) struct LocalTransport {
    bus: Bus<Message>,
    names: Weak<dyn Directory>,
    dropped: AtomicU64,
}

impl LocalTransport {
    /// Topics on `bus`, mailboxes from `names`.
    pub fn new(bus: Bus<Message>, names: Weak<dyn Directory>) -> Self {
        LocalTransport { bus, names, dropped: AtomicU64::new(0) }
    }

    pub fn bus(&self) -> &Bus<Message> {
        &self.bus
    }

    /// The mailbox of the local routine `name`.
    pub fn mailbox(&self, name: &str) -> Option<Channel<Message>> {
        self.names.upgrade()?.mailbox(name)
    }

    /// The topic `name`, created on first use.
    pub fn topic(&self, name: &str) -> Result<Channel<Message>, CallError> {
        self.bus.topic(name, DEFAULT_TOPIC_CAPACITY).map_err(|e| match e {
            BusError::InvalidName { name, .. } => CallError::InvalidName(name),
            BusError::TooManyTopics { max } => CallError::Limit(Limit::Topics { max }),
        })
    }

    /// Delivers `payload` to the mailbox of the local routine `to`, waiting while it is full.
    pub async fn send(
        &self,
        to: &str,
        payload: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<(), CallError> {
        let Some(mailbox) = self.mailbox(to) else {
            return Err(match validate_routine_name(to) {
                Err(_) => CallError::InvalidName(to.to_string()),
                Ok(()) => CallError::NoSuchRoutine(to.to_string()),
            });
        };
        queued(mailbox.send_cancellable(Message::from(payload), cancel).await)
    }

    /// Publishes `payload` on the local topic `topic`, waiting while it is full.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<(), CallError> {
        let ch = self.topic(topic)?;
        queued(ch.send_cancellable(Message::from(payload), cancel).await)
    }

    /// The in-memory topics close (shutdown).
    pub fn close(&self) {
        self.bus.close_all();
    }

    /// A link for a run of the routine with `mailbox`, whose dead letters go to `dead`.
    pub fn link_to(
        self: &Arc<Self>,
        mailbox: &Channel<Message>,
        dead: Arc<dyn DeadLetters>,
    ) -> LocalLink {
        let origin = Arc::new(QueueOrigin { topic: None, ch: mailbox.clone(), dead: dead.clone() });
        LocalLink {
            transport: self.clone(),
            mailbox: (mailbox.clone(), origin),
            dead,
            topics: Mutex::default(),
            mailboxes: Mutex::default(),
        }
    }
}

impl LocalTransport {
    /// Counts a dead letter that could not be stored (see [`Transport::dead_letters_dropped`]).
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Relaxed);
    }

    /// Dead letters the in-memory `dead-letter` topic could not take.
    pub fn dead_letters_dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

impl DeadLetters for LocalTransport {
    fn put(&self, letter: Letter) {
        let stored = match self.topic(DEAD_LETTER_TOPIC) {
            Ok(ch) => ch.try_send(Message::from(letter.json())).map_err(|_| {
                format!("the {DEAD_LETTER_TOPIC} topic is full; a dead letter was dropped")
            }),
            Err(e) => Err(format!("cannot reach the {DEAD_LETTER_TOPIC} topic: {e}")),
        };
        if let Err(e) = stored {
            tracing::error!("{e}");
            self.count_dropped();
        }
    }
}

/// Runs the in-memory transport for the host that owns it: `Arc<Self>` is what the
/// orchestrator holds.
pub(crate) struct Local(pub Arc<LocalTransport>);

impl Transport for Local {
    fn link(&self, _name: &str, mailbox: &Channel<Message>) -> Arc<dyn Link> {
        let dead: Arc<dyn DeadLetters> = self.0.clone();
        Arc::new(self.0.link_to(mailbox, dead))
    }
    fn clash(&self, _name: &str, _unique: bool) -> Option<String> {
        None
    }
    fn register(&self, _name: &str, _unique: bool) {}
    fn unregister(&self, _name: &str) {}
    fn resolves(&self, to: &str) -> bool {
        self.0.mailbox(to).is_some()
    }
    fn send<'a>(
        &'a self,
        to: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        self.0.send(to, payload, cancel).boxed()
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        self.0.publish(topic, payload, cancel).boxed()
    }
    fn topic_len(&self, topic: &str) -> usize {
        self.0.bus.get(topic).map_or(0, |ch| ch.len())
    }
    fn topics(&self) -> Vec<TopicStats> {
        self.0.bus.topics()
    }
    fn problem(&self) -> Option<String> {
        None
    }
    fn nodes(&self) -> Option<usize> {
        None
    }
    fn dead_letters_dropped(&self) -> u64 {
        self.0.dead_letters_dropped()
    }
    fn unconfirmed_acks(&self) -> Option<u64> {
        None
    }
    fn close(&self) {
        self.0.close();
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// An in-memory queue as a message's origin: handed back to the head of its channel.
struct QueueOrigin {
    /// `None` for a mailbox.
    topic: Option<Arc<str>>,
    ch: Channel<Message>,
    dead: Arc<dyn DeadLetters>,
}

impl Origin for QueueOrigin {
    fn describe(&self) -> String {
        match &self.topic {
            None => "mailbox".to_string(),
            Some(t) => format!("topic:{t}"),
        }
    }
    fn hand_back(&self, msgs: Vec<Message>) -> usize {
        // Back to the head in reverse, so that the batch keeps its order.
        let mut dropped = 0;
        for msg in msgs.into_iter().rev() {
            dropped += usize::from(self.ch.push_front(msg).is_err());
        }
        dropped
    }
    fn dead_letter(&self, letter: Letter) {
        self.dead.put(letter);
    }
}

type Cached = (Arc<str>, Channel<Message>, Arc<QueueOrigin>);

/// One run's way to the in-memory queues (see the module documentation).
pub(crate) struct LocalLink {
    transport: Arc<LocalTransport>,
    mailbox: (Channel<Message>, Arc<QueueOrigin>),
    dead: Arc<dyn DeadLetters>,
    topics: Mutex<Vec<Cached>>,
    mailboxes: Mutex<Vec<(Arc<str>, Channel<Message>)>>,
}

impl LocalLink {
    /// The transport behind it.
    pub fn transport(&self) -> &LocalTransport {
        &self.transport
    }

    /// The local topic `name` (created on first use) and its origin.
    fn topic(&self, name: &str) -> Result<(Channel<Message>, Arc<QueueOrigin>), CallError> {
        if let Some((_, ch, origin)) = find(&self.topics, name, |e| &e.1) {
            return Ok((ch, origin));
        }
        let ch = self.transport.topic(name)?;
        let topic: Arc<str> = name.into();
        let origin = Arc::new(QueueOrigin {
            topic: Some(topic.clone()),
            ch: ch.clone(),
            dead: self.dead.clone(),
        });
        remember(&self.topics, (topic, ch.clone(), origin.clone()));
        Ok((ch, origin))
    }

    /// The mailbox of the local routine `name`, if there is one.
    fn mailbox_of(&self, name: &str) -> Option<Channel<Message>> {
        if let Some((_, ch)) = find(&self.mailboxes, name, |e| &e.1) {
            return Some(ch);
        }
        let ch = self.transport.mailbox(name)?;
        remember(&self.mailboxes, (name.into(), ch.clone()));
        Some(ch)
    }

    /// Sends to a local routine; `Err(payload)` when `to` has no live mailbox here.
    async fn send_here(
        &self,
        to: &str,
        payload: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<Result<(), CallError>, Vec<u8>> {
        let Some(mailbox) = self.mailbox_of(to) else { return Err(payload) };
        match mailbox.send_cancellable(Message::from(payload), cancel).await {
            // Closed under us (the routine ended): the name may have a new routine.
            Err(SendError::Closed(m)) => Err(m.payload),
            r => Ok(queued(r)),
        }
    }

    /// Takes from the routine's own mailbox (see [`Link::recv`]).
    pub async fn recv_mailbox(
        &self,
        max: usize,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        out: &mut Vec<Message>,
    ) -> Result<Option<Arc<dyn Origin>>, CallError> {
        let (ch, origin) = &self.mailbox;
        take(ch, origin, max, timeout, cancel, out).await
    }
}

impl Link for LocalLink {
    fn open(&self, queue: Queue<'_>) -> Result<(), CallError> {
        match queue {
            Queue::Mailbox => Ok(()),
            Queue::Topic(name) => self.topic(name).map(drop),
        }
    }

    fn send<'a>(
        &'a self,
        to: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        async move {
            match self.send_here(to, payload, cancel).await {
                Ok(r) => r,
                Err(payload) => self.transport.send(to, payload, cancel).await,
            }
        }
        .boxed()
    }

    /// One by one: each is an in-memory hand-over.
    fn send_batch<'a>(
        &'a self,
        to: &'a str,
        payloads: Vec<Vec<u8>>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, (usize, Result<(), CallError>)> {
        async move {
            let total = payloads.len();
            for (i, p) in payloads.into_iter().enumerate() {
                if let Err(e) = self.send(to, p, cancel).await {
                    return (i, Err(e));
                }
            }
            (total, Ok(()))
        }
        .boxed()
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        async move {
            let (ch, _) = self.topic(topic)?;
            queued(ch.send_cancellable(Message::from(payload), cancel).await)
        }
        .boxed()
    }

    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        payloads: Vec<Vec<u8>>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, (usize, Result<(), CallError>)> {
        async move {
            let ch = match self.topic(topic) {
                Ok((ch, _)) => ch,
                Err(e) => return (0, Err(e)),
            };
            let mut left: std::collections::VecDeque<Message> =
                payloads.into_iter().map(Message::from).collect();
            let total = left.len();
            let r = ch.send_many_cancellable(&mut left, cancel).await;
            // Those handed back or left over were not published.
            let unsent = left.len() + usize::from(r.is_err());
            (total - unsent, queued(r))
        }
        .boxed()
    }

    fn recv<'a>(
        &'a self,
        queue: Queue<'a>,
        max: usize,
        timeout: Option<Duration>,
        cancel: &'a CancellationToken,
        out: &'a mut Vec<Message>,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Origin>>, CallError>> {
        async move {
            match queue {
                Queue::Mailbox => self.recv_mailbox(max, timeout, cancel, out).await,
                Queue::Topic(name) => {
                    let (ch, origin) = self.topic(name)?;
                    take(&ch, &origin, max, timeout, cancel, out).await
                }
            }
        }
        .boxed()
    }
}

/// Takes one message (`max` 1) or a batch from `ch` into `out`.
async fn take(
    ch: &Channel<Message>,
    origin: &Arc<QueueOrigin>,
    max: usize,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
    out: &mut Vec<Message>,
) -> Result<Option<Arc<dyn Origin>>, CallError> {
    let r = if max <= 1 {
        ch.recv_until(Some(cancel), timeout).await.map(|m| out.push(m))
    } else {
        ch.recv_many_split(max, out, Some(cancel), timeout, Message::alone).await.map(|_| ())
    };
    match r {
        Ok(()) => Ok(Some(origin.clone())),
        Err(RecvError::Timeout) => Ok(None),
        Err(RecvError::Cancelled) => Err(CallError::Cancelled),
        Err(RecvError::Closed | RecvError::Empty) => Err(CallError::Closed),
    }
}

/// The cached entry for `name`, unless its channel was closed meanwhile.
fn find<E: Clone + Named>(
    cache: &Mutex<Vec<E>>,
    name: &str,
    ch: impl Fn(&E) -> &Channel<Message>,
) -> Option<E> {
    let mut cache = cache.lock();
    let i = cache.iter().position(|e| e.name() == name)?;
    if ch(&cache[i]).is_closed() {
        cache.swap_remove(i);
        return None;
    }
    Some(cache[i].clone())
}

fn remember<E>(cache: &Mutex<Vec<E>>, entry: E) {
    let mut cache = cache.lock();
    if cache.len() >= MAX_NAMES {
        cache.remove(0);
    }
    cache.push(entry);
}

/// A cache entry, found by its name.
trait Named {
    fn name(&self) -> &str;
}

impl Named for Cached {
    fn name(&self) -> &str {
        &self.0
    }
}

impl Named for (Arc<str>, Channel<Message>) {
    fn name(&self) -> &str {
        &self.0
    }
}
