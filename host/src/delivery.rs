//! The delivery rule, in one place: at-least-once across crashes.
//!
//! A routine receives a [`Message`] from its mailbox or a topic; the message then stays *in
//! flight* (a copy in the routine's [`InFlightSlot`]) until the routine asks for the next one
//! (which acknowledges it) or its run returns `ok`. If the run ends any other way (error,
//! trap, idle timeout, kill, restart by its group), [`settle`] puts the message back at the
//! head of the queue it came from, so the restarted instance (or, for a topic, any consumer)
//! receives it again first. A message delivered `max-deliveries` times goes to the
//! [`DEAD_LETTER_TOPIC`] instead, as JSON naming the routine, the error and the source.
//! A batch (`recv-batch`) that was in flight at a crash counts no delivery against its
//! messages, since the host cannot tell which one caused the crash: they go back in order,
//! marked to be handed out one at a time (a batch stops before such a message), so that a
//! message that crashes its receiver is found alone, counted, and dead-lettered alone, while
//! the others are processed.
//! On a cluster topic the same rule is carried out by JetStream (`cluster::topics`): the
//! next receive or a clean return acks, another end naks (redelivery to any node), and a
//! dead letter goes to the cluster-wide topic before the message is terminated.

use parking_lot::Mutex;

use crate::channel::{Channel, Sizer};
use crate::cluster::RemoteMsg;
use crate::orchestrator::OrchInner;
use crate::routine::RoutineShared;

/// The topic that receives messages delivered `max-deliveries` times without success.
pub const DEAD_LETTER_TOPIC: &str = "dead-letter";

/// A message in a mailbox or topic: the payload, and how many times it was delivered
/// already (it is delivered again when its receiver crashes while processing it).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Message {
    /// The bytes.
    pub payload: Vec<u8>,
    /// Deliveries so far (0 for a message never received).
    pub deliveries: u32,
    /// Was in a batch that was in flight at a crash: handed out alone from now on.
    pub(crate) alone: bool,
}

impl Message {
    /// A fresh message.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Message { payload: payload.into(), deliveries: 0, alone: false }
    }
}

impl From<Vec<u8>> for Message {
    fn from(payload: Vec<u8>) -> Self {
        Message::new(payload)
    }
}

impl From<&[u8]> for Message {
    fn from(payload: &[u8]) -> Self {
        Message::new(payload)
    }
}

impl From<&str> for Message {
    fn from(payload: &str) -> Self {
        Message::new(payload.as_bytes())
    }
}

impl Sizer for Message {
    fn approx_size(&self) -> usize {
        self.payload.len()
    }
}

impl Message {
    /// The batch cut of the delivery rule: a message of a batch that crashed is handed out
    /// alone (see [`settle`]).
    pub(crate) fn alone(&self) -> bool {
        self.alone
    }
}

/// Where an in-flight message came from, so that a crash can put it back.
pub(crate) enum Source {
    Mailbox,
    Topic(std::sync::Arc<str>, Channel<Message>),
    /// A cluster-wide topic: JetStream keeps the message until it is acked.
    Cluster(String, RemoteMsg),
}

impl Source {
    /// The same local source again (a mailbox or a local topic).
    fn local_clone(&self) -> Source {
        match self {
            Source::Mailbox => Source::Mailbox,
            Source::Topic(t, ch) => Source::Topic(t.clone(), ch.clone()),
            Source::Cluster(..) => unreachable!("a cluster message is settled by its handle"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Source::Mailbox => "mailbox".to_string(),
            Source::Topic(t, _) => format!("topic:{t}"),
            Source::Cluster(t, _) => format!("topic:{t}"),
        }
    }
}

/// The messages a routine received last (one from `recv`, several from `recv-batch`), all
/// from one source. The vector keeps its capacity across receives: a receive allocates
/// nothing here once warm.
#[derive(Default)]
struct InFlight {
    msgs: Vec<Message>,
    source: Option<Source>,
}

impl InFlight {
    fn take(&mut self) -> (Vec<Message>, Option<Source>) {
        (std::mem::take(&mut self.msgs), self.source.take())
    }
}

/// The message (or batch) a routine received last, until its next receive or a clean return.
#[derive(Default)]
pub(crate) struct InFlightSlot(Mutex<InFlight>);

impl InFlightSlot {
    /// The previous message (or batch) was processed: it is no longer in flight.
    pub fn ack(&self) {
        let previous = {
            let mut held = self.0.lock();
            held.msgs.clear();
            held.source.take()
        };
        if let Some(Source::Cluster(_, remote)) = previous {
            remote.ack();
        }
    }

    /// `msg` was just taken from `source`: counts the delivery, keeps a copy in flight and
    /// returns the payload for the routine.
    pub fn deliver(&self, mut msg: Message, source: Source) -> Vec<u8> {
        msg.deliveries += 1;
        let keep = Message { payload: msg.payload.clone(), ..msg };
        let mut held = self.0.lock();
        held.msgs.clear();
        held.msgs.push(keep);
        held.source = Some(source);
        msg.payload
    }

    /// `batch` was just taken from `source` (in queue order): counts a delivery of each,
    /// keeps them in flight as one batch (after a crash: back in order, uncounted, then one
    /// at a time; see [`settle`]) and returns copies of the payloads for the routine.
    pub fn deliver_batch(&self, batch: &mut Vec<Message>, source: Source) -> Vec<Vec<u8>> {
        let payloads = batch
            .iter_mut()
            .map(|m| {
                m.deliveries += 1;
                m.payload.clone()
            })
            .collect();
        let mut held = self.0.lock();
        held.msgs.clear();
        held.msgs.append(batch);
        held.source = Some(source);
        payloads
    }
}

/// After a run: a clean return acknowledges what is in flight; any other end puts it back
/// at the head of its queue, or sends a message to `dead-letter` once it has been delivered
/// `max-deliveries` times. A batch goes back in its order with no delivery counted, its
/// messages marked to be handed out one at a time.
pub(crate) fn settle(orch: &OrchInner, shared: &RoutineShared, clean: bool) {
    let (msgs, source) = shared.in_flight().0.lock().take();
    let Some(source) = source else { return };
    if clean {
        if let Source::Cluster(_, remote) = source {
            remote.ack();
        }
        return;
    }
    let max = shared.supervision().max_deliveries;
    if let Source::Cluster(..) = source {
        // A cluster receive holds one message, settled through its JetStream handle.
        match msgs.into_iter().next() {
            Some(msg) if msg.deliveries >= max => dead_letter(orch, shared, msg, source),
            _ => {
                if let Source::Cluster(_, remote) = source {
                    remote.nak();
                }
            }
        }
        return;
    }
    // A batch: which message crashed the routine is unknown, so none is counted; each is
    // handed out alone from now on, which finds the one that does (and counts it).
    let batch = msgs.len() > 1;
    // Back to the head in reverse, so that the batch keeps its order.
    for mut msg in msgs.into_iter().rev() {
        if batch {
            msg.deliveries = msg.deliveries.saturating_sub(1);
            msg.alone = true;
        } else if msg.deliveries >= max {
            dead_letter(orch, shared, msg, source.local_clone());
            continue;
        }
        let back = match &source {
            Source::Mailbox => shared.mailbox().push_front(msg),
            Source::Topic(_, ch) => ch.push_front(msg),
            Source::Cluster(..) => unreachable!("handled above"),
        };
        if back.is_err() {
            tracing::warn!(routine = %shared.name(), "in-flight message dropped: its queue is closed");
        }
    }
}

/// A dead letter, as JSON on the `dead-letter` topic.
#[derive(serde::Serialize)]
struct DeadLetter<'a> {
    routine: &'a str,
    error: Option<String>,
    source: String,
    deliveries: u32,
    payload: &'a [u8],
}

/// The JSON of a dead letter.
pub(crate) fn dead_letter_json(
    routine: &str,
    error: Option<String>,
    source: &str,
    deliveries: u32,
    payload: &[u8],
) -> Vec<u8> {
    let letter = DeadLetter { routine, error, source: source.to_string(), deliveries, payload };
    serde_json::to_vec(&letter).unwrap_or_default()
}

fn dead_letter(orch: &OrchInner, shared: &RoutineShared, msg: Message, source: Source) {
    let described = source.describe();
    let json = dead_letter_json(
        shared.name(),
        shared.last_error(),
        &described,
        msg.deliveries,
        &msg.payload,
    );
    shared.count_dead_letter();
    tracing::warn!(
        routine = %shared.name(),
        "message from {described} failed {} deliveries: sent to {DEAD_LETTER_TOPIC}",
        msg.deliveries
    );
    if let Source::Cluster(_, remote) = source {
        remote.dead_letter(json);
        return;
    }
    if let Some(cluster) = orch.cluster() {
        // A mailbox message of a clustered node: to the cluster-wide dead-letter topic.
        let c = cluster.clone();
        cluster.spawn(async move {
            crate::cluster::topics::publish_dead_letter(&c, json).await;
        });
        return;
    }
    match orch.topic(DEAD_LETTER_TOPIC) {
        Ok(ch) => {
            if ch.try_send(Message::from(json)).is_err() {
                tracing::error!("the {DEAD_LETTER_TOPIC} topic is full; a dead letter was dropped");
            }
        }
        Err(e) => tracing::error!("cannot reach the {DEAD_LETTER_TOPIC} topic: {e}"),
    }
}
