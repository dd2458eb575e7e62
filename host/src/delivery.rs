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
    /// Whether the queue counts deliveries itself (JetStream), so that a message can arrive
    /// with its deliveries already used up (its receiver's host died with it). An in-memory
    /// queue's counts are this host's own, settled before the message goes back.
    fn counts_deliveries(&self) -> bool {
        false
    }
    /// Processed: nothing more to do for an in-memory queue; the queue's acknowledgement
    /// otherwise.
    fn ack(&self) {}
    /// Not processed: `msgs` (in their order, counted as [`settle`] left them) go back to
    /// the head of the queue. Returns how many could not (the queue was closed).
    fn hand_back(&self, msgs: Vec<Message>) -> usize;
    /// The message failed for good: `letter` goes to the `dead-letter` topic and the
    /// message leaves its queue.
    fn dead_letter(&self, letter: Letter);
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

    /// A receive that took nothing gives the vector back (kept for the next one unless
    /// another receive holds messages meanwhile).
    pub fn unused(&self, buf: Vec<Message>) {
        let mut held = self.0.lock();
        if held.msgs.is_empty() && held.msgs.capacity() < buf.capacity() {
            held.msgs = buf;
        }
    }

    /// `taken` (in queue order) were just received from `origin`: counts a delivery of
    /// each, keeps them in flight (after a crash: see [`settle`]) and returns copies of the
    /// payloads. `None` when the receive took a single message of a queue that counts its
    /// own deliveries and they had already reached `max` (its receiver's host died with
    /// it): it went to `dead-letter`, and the caller receives again.
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

    /// A single message of a queue that counts deliveries itself, whose deliveries were
    /// used up before this receive, goes to `dead-letter` (true), and `taken` is given back
    /// empty.
    fn dead_on_arrival(&self, taken: &mut Vec<Message>, origin: &dyn Origin, max: u32) -> bool {
        let [msg] = taken.as_slice() else { return false };
        if !origin.counts_deliveries() || !exhausted(msg.deliveries, max) {
            return false;
        }
        let msg = taken.pop().unwrap_or_default();
        let why = Some(
            "its deliveries were used up before this receive (its receiver's host died while \
             processing it, or a version that was rolled back crashed on it)"
                .to_string(),
        );
        send_dead_letter(origin, Letter::new("", why, origin.describe(), msg));
        self.unused(std::mem::take(taken));
        true
    }
}

/// After a run of `routine`: a clean return acknowledges what is in flight; any other end
/// hands it back to the head of its queue, or sends a message to `dead-letter` once it has
/// failed `max` deliveries (`counted` is called first: the routine counts it). A batch goes
/// back in its order with no delivery counted, its messages marked to be handed out one at
/// a time. With `max` `None` (the crash is the code's: a new version that may be rolled
/// back) a message goes back with no delivery counted (a queue that counts deliveries
/// itself, JetStream, still counts it).
pub(crate) fn settle(
    slot: &InFlightSlot,
    routine: &str,
    error: impl FnOnce() -> Option<String>,
    max: Option<u32>,
    clean: bool,
    counted: impl FnOnce(),
) {
    let (mut msgs, origin) = {
        let mut held = slot.0.lock();
        (std::mem::take(&mut held.msgs), held.origin.take())
    };
    let Some(origin) = origin else { return };
    if clean {
        origin.ack();
        return;
    }
    let back = |msgs: Vec<Message>| {
        let dropped = origin.hand_back(msgs);
        if dropped > 0 {
            tracing::warn!(
                routine = %crate::logguard::escape(routine),
                "{dropped} in-flight message(s) dropped: the queue is closed"
            );
        }
    };
    if msgs.len() > 1 {
        // A batch: which message crashed the routine is unknown, so none is counted; each is
        // handed out alone from now on, which finds the one that does (and counts it).
        for msg in &mut msgs {
            msg.deliveries = msg.deliveries.saturating_sub(1);
            msg.alone = true;
        }
        back(msgs);
        return;
    }
    match msgs.pop() {
        Some(mut msg) if max.is_none() => {
            msg.deliveries = msg.deliveries.saturating_sub(1);
            back(vec![msg])
        }
        Some(msg) if max.is_some_and(|max| exhausted(msg.deliveries, max)) => {
            counted();
            send_dead_letter(&*origin, Letter::new(routine, error(), origin.describe(), msg));
        }
        Some(msg) => back(vec![msg]),
        None => back(Vec::new()),
    }
}

/// A routine that gave up for good leaves `msgs` queued in its mailbox (`origin`): each goes
/// to `dead-letter` with `why` (`counted` is called for each), with one log line for all.
pub(crate) fn dead_letter_queued(
    origin: &dyn Origin,
    routine: &str,
    why: Option<String>,
    msgs: Vec<Message>,
    counted: impl Fn(),
) {
    if msgs.is_empty() {
        return;
    }
    tracing::warn!(
        routine = %crate::logguard::escape(routine),
        "{} queued message(s) of {} sent to {DEAD_LETTER_TOPIC}: the routine gave up",
        msgs.len(),
        origin.describe()
    );
    for msg in msgs {
        counted();
        origin.dead_letter(Letter::new(routine, why.clone(), origin.describe(), msg));
    }
}

/// Logs `letter` and hands it to its origin (to `dead-letter`; the message leaves its queue).
fn send_dead_letter(origin: &dyn Origin, letter: Letter) {
    tracing::warn!(
        routine = %crate::logguard::escape(&letter.routine),
        "message from {} failed {} deliveries: sent to {DEAD_LETTER_TOPIC}",
        letter.source,
        letter.deliveries
    );
    origin.dead_letter(letter);
}

/// A dead letter: the message that failed for good and what is known of why. On the
/// `dead-letter` topic it is JSON `{"routine", "error", "source", "deliveries", "payload"}`
/// with the payload as an array of bytes; where that does not fit a transport's message
/// size (a large payload in a cluster), `"payloadBase64"` carries it instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Letter {
    pub routine: String,
    pub error: Option<String>,
    pub source: String,
    pub deliveries: u32,
    pub payload: Vec<u8>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Json<'a> {
    routine: &'a str,
    error: &'a Option<String>,
    source: &'a str,
    deliveries: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a [u8]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

impl Letter {
    fn new(routine: &str, error: Option<String>, source: String, msg: Message) -> Self {
        Letter {
            routine: routine.to_string(),
            error,
            source,
            deliveries: msg.deliveries,
            payload: msg.payload,
        }
    }

    /// The JSON, with the payload as an array of bytes.
    pub fn json(&self) -> Vec<u8> {
        self.encode(false)
    }

    /// The JSON in at most `max` bytes: the array form, else `payloadBase64` (a third
    /// larger than the payload, where the array form is three to four times larger);
    /// `None` when neither fits.
    pub fn json_within(&self, max: usize) -> Option<Vec<u8>> {
        [false, true].into_iter().map(|b64| self.encode(b64)).find(|j| j.len() <= max)
    }

    fn encode(&self, b64: bool) -> Vec<u8> {
        use base64::Engine;
        let json = Json {
            routine: &self.routine,
            error: &self.error,
            source: &self.source,
            deliveries: self.deliveries,
            payload: (!b64).then_some(&self.payload[..]),
            payload_base64: b64
                .then(|| base64::engine::general_purpose::STANDARD.encode(&self.payload)),
        };
        serde_json::to_vec(&json).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(payload: Vec<u8>) -> Letter {
        Letter::new("r", Some("boom".into()), "topic:t".into(), Message::new(payload))
    }

    #[test]
    fn a_letter_is_json_with_the_payload_as_bytes() {
        let v: serde_json::Value = serde_json::from_slice(&letter(b"ab".to_vec()).json()).unwrap();
        assert_eq!(v["payload"], serde_json::json!([97, 98]));
        assert_eq!((v["routine"].as_str(), v["source"].as_str()), (Some("r"), Some("topic:t")));
        assert!(v.get("payloadBase64").is_none());
    }

    #[test]
    fn a_letter_too_large_as_an_array_is_base64_and_none_when_nothing_fits() {
        let l = letter(vec![200; 1000]);
        let array = l.json();
        assert!(array.len() > 3000);
        let fitted = l.json_within(2000).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fitted).unwrap();
        assert!(v.get("payload").is_none());
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD;
        assert_eq!(b.decode(v["payloadBase64"].as_str().unwrap()).unwrap(), vec![200; 1000]);
        assert_eq!(l.json_within(array.len()), Some(array));
        assert_eq!(l.json_within(1000), None);
    }

    #[test]
    fn exhausted_is_one_comparison_with_at_least_one_delivery() {
        assert!(!exhausted(0, 1) && exhausted(1, 1) && exhausted(3, 3) && !exhausted(2, 3));
        assert!(exhausted(1, 0), "max-deliveries 0 counts as 1");
    }
}
