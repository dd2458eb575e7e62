//! The delivery rule, in one place: at-least-once across crashes, for every queue.
//!
//! A routine receives a [`Message`] from its mailbox or a topic; the message then stays *in
//! flight* (a copy in the routine's [`InFlightSlot`]) until the routine asks for the next one
//! (which acknowledges it) or its run returns `ok`. If the run ends any other way (error,
//! trap, idle timeout, kill, restart by its group), [`settle`] hands the message back to its
//! queue, at the head, so the restarted instance (or, for a topic, any consumer) receives it
//! again first. A message that has failed [`Supervision::max_deliveries`] deliveries goes to
//! the [`DEAD_LETTER_TOPIC`] instead, as JSON naming the routine, the error and the source
//! ([`exhausted`] is that decision, the only one).
//! A batch (`recv-batch`) that was in flight at a crash counts no delivery against its
//! messages, since the host cannot tell which one caused the crash: they go back in order,
//! marked to be handed out one at a time ([`Message::alone`]: a batch stops before such a
//! message), so that a message that crashes its receiver is found alone, counted, and
//! dead-lettered alone, while the others are processed.
//!
//! Where a message came from is an [`Origin`]: the settle operations of its queue
//! (acknowledge, hand back at the head, dead-letter). Each transport implements them for
//! its queues (`transport::local` for in-memory mailboxes and topics; the JetStream
//! transport for its streams); this module decides which one is called, and counts.
//!
//! [`Supervision::max_deliveries`]: crate::Supervision::max_deliveries

use std::sync::Arc;

use parking_lot::Mutex;

use crate::channel::Sizer;

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
    alone: bool,
}

impl Message {
    /// A fresh message.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Message { payload: payload.into(), deliveries: 0, alone: false }
    }

    /// A message of a queue that counts its own deliveries (JetStream): `deliveries` is how
    /// many times it was handed out before this receive.
    pub(crate) fn delivered_before(payload: Vec<u8>, deliveries: u32) -> Self {
        Message { payload, deliveries, alone: false }
    }

    /// The batch cut of the delivery rule, for
    /// [`Channel::recv_many_split`](crate::Channel::recv_many_split): a message of a batch
    /// that crashed is handed out alone.
    pub(crate) fn alone(&self) -> bool {
        self.alone
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

/// The one max-deliveries decision: a message that has failed `failed` deliveries is done
/// with when that reaches `max` (at least 1).
pub(crate) fn exhausted(failed: u32, max: u32) -> bool {
    failed >= max.max(1)
}

/// The settle operations of the queue a received message (or batch) came from. What is
/// settled is always what that receive took and is still held: after a dead letter, the
/// rest.
pub(crate) trait Origin: Send + Sync {
    /// Where it came from, as dead letters name it: `mailbox` or `topic:NAME`.
    fn describe(&self) -> String;
    /// Processed: nothing more to do for an in-memory queue; the queue's acknowledgement
    /// otherwise.
    fn ack(&self) {}
    /// Not processed: `msgs` (in their order, counted as [`settle`] left them) go back to
    /// the head of the queue.
    fn hand_back(&self, msgs: Vec<Message>);
    /// `msg` failed for good: `letter` goes to the `dead-letter` topic and the message
    /// leaves its queue.
    fn dead_letter(&self, msg: Message, letter: Vec<u8>);
}

/// The messages a routine received last (one from `recv`, several from `recv-batch`), all
/// from one origin. The vector keeps its capacity across receives: a receive allocates
/// nothing here once warm.
#[derive(Default)]
struct InFlight {
    msgs: Vec<Message>,
    origin: Option<Arc<dyn Origin>>,
}

/// The message (or batch) a routine received last, until its next receive or a clean return.
#[derive(Default)]
pub(crate) struct InFlightSlot(Mutex<InFlight>);

impl InFlightSlot {
    /// The previous message (or batch) was processed: acknowledges it. Returns the emptied
    /// vector, for the next receive to fill (then [`deliver`](Self::deliver) or
    /// [`unused`](Self::unused)).
    pub fn ack(&self) -> Vec<Message> {
        let (mut msgs, origin) = {
            let mut held = self.0.lock();
            (std::mem::take(&mut held.msgs), held.origin.take())
        };
        if let Some(origin) = origin {
            origin.ack();
        }
        msgs.clear();
        msgs
    }

    /// A receive that took nothing gives the vector back.
    pub fn unused(&self, buf: Vec<Message>) {
        let mut held = self.0.lock();
        if held.msgs.capacity() < buf.capacity() {
            held.msgs = buf;
        }
    }

    /// `taken` (in queue order) were just received from `origin`: counts a delivery of
    /// each, keeps them in flight (after a crash: see [`settle`]) and returns copies of the
    /// payloads. `None` when the receive took a single message whose earlier deliveries had
    /// already reached `max` (its receiver's host died with it): it went to `dead-letter`,
    /// and the caller receives again.
    pub fn deliver(
        &self,
        mut taken: Vec<Message>,
        origin: Arc<dyn Origin>,
        max: u32,
    ) -> Option<Vec<Vec<u8>>> {
        if self.dead_on_arrival(&mut taken, &*origin, max) {
            return None;
        }
        let payloads = taken
            .iter_mut()
            .map(|m| {
                m.deliveries += 1;
                m.payload.clone()
            })
            .collect();
        self.hold(taken, origin);
        Some(payloads)
    }

    /// Like [`deliver`](Self::deliver) for a receive of one message.
    pub fn deliver_one(
        &self,
        mut taken: Vec<Message>,
        origin: Arc<dyn Origin>,
        max: u32,
    ) -> Option<Vec<u8>> {
        if self.dead_on_arrival(&mut taken, &*origin, max) {
            return None;
        }
        let msg = taken.first_mut()?;
        msg.deliveries += 1;
        let payload = msg.payload.clone();
        self.hold(taken, origin);
        Some(payload)
    }

    fn hold(&self, taken: Vec<Message>, origin: Arc<dyn Origin>) {
        let mut held = self.0.lock();
        held.msgs = taken;
        held.origin = Some(origin);
    }

    /// A single message whose deliveries were used up before this receive goes to
    /// `dead-letter` (true), and `taken` is given back empty.
    fn dead_on_arrival(&self, taken: &mut Vec<Message>, origin: &dyn Origin, max: u32) -> bool {
        let [msg] = taken.as_slice() else { return false };
        if !exhausted(msg.deliveries, max) {
            return false;
        }
        let msg = taken.pop().unwrap_or_default();
        let described = origin.describe();
        let why = Some("its host died while processing it".to_string());
        let letter = letter("", why, &described, msg.deliveries, &msg.payload);
        tracing::warn!(
            "message from {described} failed {} deliveries: sent to {DEAD_LETTER_TOPIC}",
            msg.deliveries
        );
        origin.dead_letter(msg, letter);
        self.unused(std::mem::take(taken));
        true
    }
}

/// After a run of `routine`: a clean return acknowledges what is in flight; any other end
/// hands it back to the head of its queue, or sends a message to `dead-letter` once it has
/// failed `max` deliveries. A batch goes back in its order with no delivery counted, its
/// messages marked to be handed out one at a time.
pub(crate) fn settle(
    slot: &InFlightSlot,
    routine: &str,
    error: Option<String>,
    max: u32,
    clean: bool,
) -> Settled {
    let (mut msgs, origin) = {
        let mut held = slot.0.lock();
        (std::mem::take(&mut held.msgs), held.origin.take())
    };
    let Some(origin) = origin else { return Settled::Nothing };
    if clean {
        origin.ack();
        return Settled::Nothing;
    }
    if msgs.len() > 1 {
        // A batch: which message crashed the routine is unknown, so none is counted; each is
        // handed out alone from now on, which finds the one that does (and counts it).
        for msg in &mut msgs {
            msg.deliveries = msg.deliveries.saturating_sub(1);
            msg.alone = true;
        }
        origin.hand_back(msgs);
        return Settled::HandedBack;
    }
    match msgs.pop() {
        Some(msg) if exhausted(msg.deliveries, max) => {
            let described = origin.describe();
            tracing::warn!(
                routine = %crate::logguard::escape(routine),
                "message from {described} failed {} deliveries: sent to {DEAD_LETTER_TOPIC}",
                msg.deliveries
            );
            let letter = letter(routine, error, &described, msg.deliveries, &msg.payload);
            origin.dead_letter(msg, letter);
            Settled::DeadLettered
        }
        Some(msg) => {
            origin.hand_back(vec![msg]);
            Settled::HandedBack
        }
        None => {
            origin.hand_back(Vec::new());
            Settled::HandedBack
        }
    }
}

/// What [`settle`] did with a crashed run's in-flight message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// Nothing was in flight, or it was acknowledged.
    Nothing,
    /// It went back to its queue.
    HandedBack,
    /// It went to `dead-letter` (the routine counts it).
    DeadLettered,
}

/// A dead letter, as JSON on the `dead-letter` topic.
#[derive(serde::Serialize)]
struct DeadLetter<'a> {
    routine: &'a str,
    error: Option<String>,
    source: &'a str,
    deliveries: u32,
    payload: &'a [u8],
}

/// The JSON of a dead letter.
fn letter(
    routine: &str,
    error: Option<String>,
    source: &str,
    deliveries: u32,
    payload: &[u8],
) -> Vec<u8> {
    let letter = DeadLetter { routine, error, source, deliveries, payload };
    serde_json::to_vec(&letter).unwrap_or_default()
}
