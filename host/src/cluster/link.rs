//! The cluster as a transport: the layer over the in-memory one.
//!
//! - A routine's own mailbox stays in memory ([`LocalLink`]); its dead letters go to the
//!   cluster's `dead-letter` topic.
//! - A send to a name runs here when the routine does (and `node/name` names this node),
//!   else goes to the node the registry names, through [`rpc`](super::rpc).
//! - Topics are JetStream streams ([`topics`](super::topics)): every publish and receive goes
//!   through them (no same-node shortcut: a message handed over in memory would be lost with
//!   this host), except the node-local topics (`[cluster] local-topics`), which stay on the
//!   in-memory bus. A receive's origin maps the settle operations of
//!   [`delivery`](crate::delivery) onto JetStream: ack, nak (redelivered to any node), and a
//!   dead letter published before the message is terminated. Receives are served from the
//!   node's messages of the topic fetched ahead ([`prefetch`](super::prefetch)); a message
//!   delivered before goes out alone.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::topics::{self, RemoteMsg};
use super::{ClusterCore, split_address};
use crate::bus::TopicStats;
use crate::channel::Channel;
use crate::delivery::{Letter, Message, Origin};
use crate::names::validate_routine_name;
use crate::transport::{
    CallError, DeadLetters, Link, LocalLink, LocalTransport, Queue, Transport, queued,
};

/// The transport of a host in a cluster.
pub(crate) struct ClusterTransport {
    pub(crate) core: Arc<ClusterCore>,
    local: Arc<LocalTransport>,
    dead: Arc<dyn DeadLetters>,
}

impl ClusterTransport {
    pub(crate) fn new(core: Arc<ClusterCore>, local: Arc<LocalTransport>) -> Self {
        let dead = Arc::new(ClusterDeadLetters(core.clone()));
        ClusterTransport { core, local, dead }
    }
}

/// Delivers `payload` to the mailbox of `to` (`name`, or `node/name`), waiting while it is
/// full: on this node, or on the node the cluster registry names.
async fn send(
    core: &ClusterCore,
    local: &LocalTransport,
    to: &str,
    payload: Vec<u8>,
    cancel: &CancellationToken,
) -> Result<(), CallError> {
    let (node, name) = split_address(to);
    if node.is_none_or(|n| n == core.node) {
        if let Some(mailbox) = local.mailbox(name) {
            return queued(mailbox.send_cancellable(Message::from(payload), cancel).await);
        }
        if validate_routine_name(name).is_err() {
            return Err(CallError::InvalidName(to.to_string()));
        }
        // Not here: another node may run it.
        if node.is_none()
            && let Some(other) = pick(&core.registry.holders(name))
        {
            return super::rpc::send(core, &other, name, payload, cancel).await;
        }
        return Err(CallError::NoSuchRoutine(to.to_string()));
    }
    let node = node.unwrap_or_default();
    if validate_routine_name(name).is_err() || validate_routine_name(node).is_err() {
        return Err(CallError::InvalidName(to.to_string()));
    }
    super::rpc::send(core, node, name, payload, cancel).await
}

/// Delivers `payloads` to the mailbox of `to` in order, like [`send`]: on another node, in
/// requests that carry as many as a NATS message holds.
async fn send_batch(
    core: &ClusterCore,
    local: &LocalLink,
    to: &str,
    payloads: Vec<Vec<u8>>,
    cancel: &CancellationToken,
) -> (usize, Result<(), CallError>) {
    let (node, name) = split_address(to);
    let remote = match node {
        Some(n) if n != core.node => {
            if validate_routine_name(name).is_err() || validate_routine_name(n).is_err() {
                return (0, Err(CallError::InvalidName(to.to_string())));
            }
            Some(n.to_string())
        }
        // Here if it runs here, else on a node that runs it.
        _ if local.transport().mailbox(name).is_some() => None,
        None => pick(&core.registry.holders(name)),
        Some(_) => None,
    };
    match remote {
        Some(node) => super::rpc::send_batch(core, &node, name, payloads, cancel).await,
        None => local.send_batch(name, payloads, cancel).await,
    }
}

/// One of `nodes`, at random (spreads sends to a name several nodes run).
fn pick(nodes: &[String]) -> Option<String> {
    use rand::seq::IndexedRandom;
    nodes.choose(&mut rand::rng()).cloned()
}

impl Transport for ClusterTransport {
    fn link(&self, name: &str, mailbox: &Channel<Message>) -> Arc<dyn Link> {
        let local = self.local.link_to(mailbox, self.dead.clone());
        let unique = self.core.registry.is_unique_here(name).then(|| name.to_string());
        Arc::new(ClusterLink { core: self.core.clone(), local, unique })
    }
    fn clash(&self, name: &str, unique: bool) -> Option<String> {
        self.core.registry.conflict(name, unique)
    }
    fn register(&self, name: &str, unique: bool) {
        self.core.registry.register(name, unique);
    }
    fn unregister(&self, name: &str) {
        self.core.registry.unregister(name);
    }
    /// Always true: the send itself resolves the name (here, or on the node the registry
    /// names) and says why it reaches nothing.
    fn resolves(&self, _to: &str) -> bool {
        true
    }
    fn send<'a>(
        &'a self,
        to: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        send(&self.core, &self.local, to, payload, cancel).boxed()
    }
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        if self.core.is_local(topic) {
            return self.local.publish(topic, payload, cancel).boxed();
        }
        topics::publish(&self.core, topic, payload, cancel).boxed()
    }
    fn topic_len(&self, topic: &str) -> usize {
        if self.core.is_local(topic) {
            return self.local.bus().get(topic).map_or(0, |ch| ch.len());
        }
        self.core.topics.stats().iter().find(|t| t.name == topic).map_or(0, |t| t.len)
    }
    /// The cluster's topics, and this node's node-local ones.
    fn topics(&self) -> Vec<TopicStats> {
        let mut all = self.core.topics.stats();
        all.extend(self.local.bus().topics().into_iter().filter(|t| self.core.is_local(&t.name)));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
    fn problem(&self) -> Option<String> {
        if !self.core.connected() {
            return Some(format!("not connected to NATS at {} (reconnecting)", self.core.url));
        }
        let js = self.core.js_problem.lock().clone()?;
        Some(format!("NATS JetStream at {} does not answer: {js} (repairing)", self.core.url))
    }
    fn nodes(&self) -> Option<usize> {
        Some(self.core.view().nodes.len())
    }
    fn unconfirmed_acks(&self) -> Option<u64> {
        Some(self.core.acks_unconfirmed.load(std::sync::atomic::Ordering::Relaxed))
    }
    fn dead_letters_dropped(&self) -> u64 {
        let here = self.core.dead_letters_dropped.load(std::sync::atomic::Ordering::Relaxed);
        self.local.dead_letters_dropped() + here
    }
    fn close(&self) {
        self.local.close();
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A routine run's link on a clustered host.
struct ClusterLink {
    core: Arc<ClusterCore>,
    local: LocalLink,
    /// A cluster-unique routine's name: its receives are fenced by this node's lease and
    /// wait for its claim.
    unique: Option<String>,
}

impl ClusterLink {
    /// One receive: a message, or a batch of messages delivered for the first time (one
    /// delivered before goes alone, so that one that crashes its receiver is found and
    /// counted alone, as on a single host).
    async fn take(
        &self,
        queue: Queue<'_>,
        max: usize,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        out: &mut Vec<Message>,
    ) -> Result<Option<Arc<dyn Origin>>, CallError> {
        let topic = match queue {
            Queue::Mailbox => return self.local.recv_mailbox(max, timeout, cancel, out).await,
            Queue::Topic(t) if self.core.is_local(t) => {
                return self.local.recv(queue, max, timeout, cancel, out).await;
            }
            Queue::Topic(t) => t,
        };
        let taken = topics::take(&self.core, topic, max, timeout, cancel).await?;
        if taken.is_empty() {
            return Ok(None);
        }
        let mut handles = Vec::with_capacity(taken.len());
        for d in taken {
            out.push(Message::delivered_before(d.payload, d.delivered_before));
            handles.push(d.handle);
        }
        Ok(Some(Arc::new(RemoteOrigin { topic: topic.to_string(), handles: Mutex::new(handles) })))
    }
}

impl Link for ClusterLink {
    /// A topic's stream is opened by the receive itself (after the acknowledgement).
    fn open(&self, queue: Queue<'_>) -> Result<(), CallError> {
        match queue {
            Queue::Topic(t) if self.core.is_local(t) => self.local.open(queue),
            _ => Ok(()),
        }
    }

    fn send<'a>(
        &'a self,
        to: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        send(&self.core, self.local.transport(), to, payload, cancel).boxed()
    }

    fn send_batch<'a>(
        &'a self,
        to: &'a str,
        payloads: Vec<Vec<u8>>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, (usize, Result<(), CallError>)> {
        send_batch(&self.core, &self.local, to, payloads, cancel).boxed()
    }

    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        if self.core.is_local(topic) {
            return self.local.publish(topic, payload, cancel);
        }
        topics::publish(&self.core, topic, payload, cancel).boxed()
    }

    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        payloads: Vec<Vec<u8>>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, (usize, Result<(), CallError>)> {
        if self.core.is_local(topic) {
            return self.local.publish_batch(topic, payloads, cancel);
        }
        topics::publish_many(&self.core, topic, payloads, cancel).boxed()
    }

    /// A cluster topic hands out what its stream has now, up to `max` (see `take`).
    fn recv<'a>(
        &'a self,
        queue: Queue<'a>,
        max: usize,
        timeout: Option<Duration>,
        cancel: &'a CancellationToken,
        out: &'a mut Vec<Message>,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Origin>>, CallError>> {
        let local = match queue {
            Queue::Mailbox => true,
            Queue::Topic(t) => self.core.is_local(t),
        };
        if local && self.unique.is_none() {
            // In memory, as on a single host.
            return self.local.recv(queue, max, timeout, cancel, out);
        }
        async move {
            let Some(name) = &self.unique else {
                return self.take(queue, max, timeout, cancel, out).await;
            };
            // A cluster-unique routine takes a message only while this node's lease is
            // valid and it holds the routine's claim: one taken as the lease lapsed (the
            // process was paused) goes back, and the routine waits until the lease is
            // renewed and its claim checked.
            let (lease, registry) = (&self.core.lease, &self.core.registry);
            loop {
                lease.wait_valid(cancel).await?;
                registry.wait_claimed(name, cancel).await?;
                let origin = self.take(queue, max, timeout, cancel, out).await?;
                match origin {
                    Some(o) if !lease.is_valid() || !registry.holds_claim(name) => {
                        o.hand_back(std::mem::take(out));
                    }
                    other => return Ok(other),
                }
            }
        }
        .boxed()
    }
}

/// Messages of a cluster topic taken by one receive, settled through their JetStream
/// handles.
struct RemoteOrigin {
    topic: String,
    handles: Mutex<Vec<RemoteMsg>>,
}

impl Origin for RemoteOrigin {
    fn describe(&self) -> String {
        format!("topic:{}", self.topic)
    }
    fn ack(&self) {
        RemoteMsg::ack_all(std::mem::take(&mut *self.handles.lock()));
    }
    fn counts_deliveries(&self) -> bool {
        true
    }
    /// JetStream keeps the messages and counts their deliveries itself (a crashed batch
    /// counts one against each of its messages).
    fn hand_back(&self, _msgs: Vec<Message>) -> usize {
        for h in std::mem::take(&mut *self.handles.lock()) {
            h.nak();
        }
        0
    }
    /// Called for a message taken alone.
    fn dead_letter(&self, letter: Letter) {
        let mut handles = std::mem::take(&mut *self.handles.lock()).into_iter();
        if let Some(h) = handles.next() {
            h.dead_letter(letter);
        }
        for h in handles {
            h.nak();
        }
    }
}

/// Dead letters of a clustered host's mailboxes: to the cluster-wide `dead-letter` topic.
struct ClusterDeadLetters(Arc<ClusterCore>);

impl DeadLetters for ClusterDeadLetters {
    /// One task per letter: a letter follows `max-deliveries` failed runs, which the
    /// supervisor's backoff paces, so these stay few.
    fn put(&self, letter: Letter) {
        let c = self.0.clone();
        self.0.spawn(async move {
            topics::publish_dead_letter(&c, letter).await;
        });
    }
}
