//! Node-to-node calls through NATS request/reply, on subjects `gorch.rpc.<node>.<call>`:
//! - `send`: a message for a routine's mailbox (header `Gorch-To`, and `Gorch-Send-Id`, one
//!   id per send kept across its retries); the reply is `ok`, `no-such-routine`, `closed` or
//!   `full` (the sender tries again: backpressure across nodes);
//! - `send-batch`: several messages for one mailbox in one request (a routine's
//!   `send-batch`; header `Gorch-Batch: N`, the body N messages, each a 4-byte little-endian
//!   length and its bytes), taken in order within about a second in all (after this node's
//!   lease is checked); the reply is `ok`, or
//!   `K full|closed|no-such-routine` when only the first K were taken (the sender goes on
//!   with the rest under a new id once K > 0). A node without this call has no responder on
//!   its subject: the sender gets `closed`, never a batch taken as one message;
//! - `snapshots`: the node's routine snapshots as JSON (for `ps --cluster`).
//!
//! A send whose request gets no answer is retried with its id while the registry says its
//! node is live, for at most half of [`REMEMBER_SENDS`] (the node remembers the ids it took
//! that long, at most 65,536 of them, and answers a retry with the answer it gave, without
//! taking anything twice; a retry that arrives while the first request is still being
//! taken is answered `full` (`0 full` for a batch) and asked again; the ids live in the process, so a new process of the node's name does not know
//! them). It ends `closed` when nothing can have taken it
//! (no node listens), and `outcome-unknown` when a request went out and no answer came
//! (the node paused or cut off past its lease): the message may still be delivered.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::{ClusterCore, REMOTE_SEND_TIMEOUT, answer_or_grace, token};
use crate::delivery::Message;
use crate::routine::Snapshot;
use crate::transport::CallError;

const TO: &str = "Gorch-To";
const SEND_ID: &str = "Gorch-Send-Id";
const BATCH: &str = "Gorch-Batch";
/// How long a node holds a send for a full mailbox before answering `full`.
const HOLD_FULL: Duration = Duration::from_secs(1);
/// How long a sender that is cancelled waits for the answer of a request under way.
const CANCEL_GRACE: Duration = Duration::from_millis(1500);
/// How long a node remembers the id of a send it took.
pub(crate) const REMEMBER_SENDS: Duration = Duration::from_secs(120);
/// The most send ids a node remembers (the oldest are forgotten first).
const REMEMBER_MAX: usize = 65_536;
/// The most requests a node answers at once; more wait in NATS's subscription buffer (and
/// a send whose request is dropped there is retried by its sender).
const ANSWERING: usize = 256;
/// Bound on fetching one node's snapshots.
pub(crate) const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

fn subject(node: &str, call: &str) -> String {
    format!("gorch.rpc.{}.{call}", token(node))
}

/// The ids of the sends this node took or is taking (a retried request is not taken twice).
#[derive(Default)]
pub(crate) struct Sends {
    inner: Mutex<SendsInner>,
}

#[derive(Default)]
struct SendsInner {
    /// The answer of a send that took something; `None`: being taken.
    ids: HashMap<String, Option<String>>,
    /// Taken ids, oldest first, with when.
    order: VecDeque<(Instant, String)>,
}

enum Seen {
    New,
    /// Taken before, with this answer.
    Taken(String),
    Taking,
}

impl Sends {
    fn begin(&self, id: &str) -> Seen {
        let mut s = self.inner.lock();
        let now = Instant::now();
        while let Some((at, _)) = s.order.front() {
            if now.duration_since(*at) < REMEMBER_SENDS && s.order.len() < REMEMBER_MAX {
                break;
            }
            let (_, old) = s.order.pop_front().expect("front");
            s.ids.remove(&old);
        }
        match s.ids.get(id) {
            Some(Some(answer)) => Seen::Taken(answer.clone()),
            Some(None) => Seen::Taking,
            None => {
                s.ids.insert(id.to_string(), None);
                Seen::New
            }
        }
    }

    /// Ends the send `id`: its answer is remembered when it took something (a retry gets
    /// the same answer), forgotten when it took nothing (a retry may take it).
    fn end(&self, id: &str, answer: Option<&str>) {
        let mut s = self.inner.lock();
        match answer {
            Some(a) if took_any(a) => {
                s.ids.insert(id.to_string(), Some(a.to_string()));
                s.order.push_back((Instant::now(), id.to_string()));
            }
            _ => {
                s.ids.remove(id);
            }
        }
    }
}

/// Answers this node's calls until it leaves.
pub(crate) async fn serve(core: &Arc<ClusterCore>) -> Result<(), String> {
    let answering = Arc::new(tokio::sync::Semaphore::new(ANSWERING));
    for call in ["send", "send-batch", "snapshots"] {
        // A queue group: two processes of one node name (one paused past its lease) never
        // both take a request.
        let mut sub = core
            .client
            .queue_subscribe(subject(&core.node, call), "gorch-rpc".to_string())
            .await
            .map_err(|e| format!("cannot subscribe: {e}"))?;
        let (c, answering) = (core.clone(), answering.clone());
        core.tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = c.stop.cancelled() => break,
                    // Another process has this node's name now: it answers.
                    _ = c.lease.lost() => break,
                    m = sub.next() => match m { Some(m) => m, None => break },
                };
                let Ok(permit) = answering.clone().acquire_owned().await else { break };
                let c2 = c.clone();
                // A send may wait for room: each request in its own task, a bounded number.
                c.spawn(async move {
                    answer(&c2, call, msg).await;
                    drop(permit);
                });
            }
        });
    }
    Ok(())
}

async fn answer(core: &ClusterCore, call: &str, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else { return };
    let Some(orch) = core.orch() else {
        // The host is going away: nothing here takes messages any more.
        let _ = core.client.publish(reply, "closed".into()).await;
        return;
    };
    let body: bytes::Bytes = match call {
        "send" | "send-batch" => {
            let header = |h: &str| {
                msg.headers.as_ref().and_then(|hs| hs.get(h)).map(|v| v.as_str().to_string())
            };
            if call == "send" && header(BATCH).is_some() {
                // A batch on the single-message subject (a sender of another version): never
                // taken as one message.
                let _ = core.client.publish(reply, "closed".into()).await;
                return;
            }
            let batch = (call == "send-batch")
                .then(|| header(BATCH).and_then(|n| n.parse::<usize>().ok()).unwrap_or(0));
            let id = header(SEND_ID);
            if let Some(id) = &id {
                match core.sends.begin(id) {
                    Seen::New => {}
                    // A retry of a send this node took: not taken twice.
                    Seen::Taken(answer) => {
                        let _ = core.client.publish(reply, answer.into()).await;
                        return;
                    }
                    // Its first request is still being answered: nothing more taken for this
                    // one (the sender asks again with the same id).
                    Seen::Taking => {
                        let full = if batch.is_some() { "0 full" } else { "full" };
                        let _ = core.client.publish(reply, full.into()).await;
                        return;
                    }
                }
            }
            // Ends the id's "being taken" mark whatever happens to this task (else its
            // retries would be told `full` for ever).
            let taking = id.as_deref().map(|id| Taking(&core.sends, id, None));
            let answer = take(core, &orch, header(TO), msg.payload, batch).await;
            if let Some(mut t) = taking {
                t.2 = answer.clone();
            }
            // No answer while this node's lease lapsed: the sender retries.
            let Some(answer) = answer else { return };
            answer.into()
        }
        _ => serde_json::to_vec(&orch.snapshots()).unwrap_or_default().into(),
    };
    let _ = core.client.publish(reply, body).await;
}

/// Puts a sent message (or a batch of `batch` framed messages, in order) in the mailbox of
/// `to`: the answer for the sender, or `None` while this node's lease lapsed (a paused
/// process coming back: if its lease is lost, another process answers the retry).
async fn take(
    core: &ClusterCore,
    orch: &crate::Orchestrator,
    to: Option<String>,
    payload: bytes::Bytes,
    batch: Option<usize>,
) -> Option<String> {
    let never = CancellationToken::new();
    let valid = tokio::time::timeout(HOLD_FULL, core.lease.wait_valid(&never)).await;
    if !matches!(valid, Ok(Ok(()))) {
        return None;
    }
    let msgs = match batch {
        None => vec![payload.to_vec()],
        Some(n) => match unframe(&payload, n) {
            Some(msgs) => msgs,
            None => return Some("closed".into()),
        },
    };
    let answer = |taken: usize, what: &str| match batch {
        None => what.to_string(),
        Some(_) => format!("{taken} {what}"),
    };
    let Some(h) = to.as_deref().and_then(|n| orch.get_by_name(n)) else {
        return Some(answer(0, "no-such-routine"));
    };
    // A batch waits for room at most HOLD_FULL in all (well within the sender's bound on
    // one request), then says how many it took.
    let until = tokio::time::Instant::now() + HOLD_FULL;
    for (i, m) in msgs.into_iter().enumerate() {
        match tokio::time::timeout_at(until, h.mailbox().send(Message::from(m))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Some(answer(i, "closed")),
            Err(_) => return Some(answer(i, "full")),
        }
    }
    Some("ok".into())
}

/// A send id being taken: [`Sends::end`] with the answer (if any) when dropped.
struct Taking<'a>(&'a Sends, &'a str, Option<String>);

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        self.0.end(self.1, self.2.as_deref());
    }
}

/// Whether an answer says the send took at least one message.
fn took_any(answer: &str) -> bool {
    answer == "ok" || answer.split_once(' ').is_some_and(|(k, _)| k != "0")
}

/// Messages framed for a batch send: each a 4-byte little-endian length and its bytes.
fn frame(msgs: &[Vec<u8>]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(msgs.iter().map(|m| m.len() + 4).sum());
    for m in msgs {
        out.extend_from_slice(&(m.len() as u32).to_le_bytes());
        out.extend_from_slice(m);
    }
    out.into()
}

/// The `n` messages of a framed batch (`None`: not that).
fn unframe(mut body: &[u8], n: usize) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let (len, rest) = body.split_first_chunk::<4>()?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return None;
        }
        out.push(rest[..len].to_vec());
        body = &rest[len..];
    }
    (out.len() == n).then_some(out)
}

/// Sends `payload` to the routine `name` on `node`; waits while its mailbox is full.
pub(crate) async fn send(
    core: &ClusterCore,
    node: &str,
    name: &str,
    payload: Vec<u8>,
    cancel: &CancellationToken,
) -> Result<(), CallError> {
    let max = core.max_message();
    if payload.len() > max {
        return Err(CallError::TooLarge(max as u64));
    }
    let mut call = Call::new(core, node, name);
    let body = bytes::Bytes::from(payload);
    loop {
        match call.ask(&body, None, cancel).await?.as_ref() {
            b"ok" => return Ok(()),
            b"no-such-routine" => return Err(CallError::NoSuchRoutine(format!("{node}/{name}"))),
            b"full" => call.pause(cancel).await,
            _ => return Err(CallError::Closed),
        }
    }
}

/// Sends `payloads` to the routine `name` on `node` in order, as many as a NATS message
/// carries in each request; waits while its mailbox is full. Returns how many were taken
/// before the error that stopped the rest, if any.
pub(crate) async fn send_batch(
    core: &ClusterCore,
    node: &str,
    name: &str,
    payloads: Vec<Vec<u8>>,
    cancel: &CancellationToken,
) -> (usize, Result<(), CallError>) {
    let max = core.max_message();
    if payloads.iter().any(|p| p.len() > max) {
        return (0, Err(CallError::TooLarge(max as u64)));
    }
    let mut done = 0;
    while done < payloads.len() {
        // The next request: as many as fit (at least one: its 4 bytes of framing fit in the
        // room kept for headers).
        let mut end = done;
        let mut bytes = 0;
        while end < payloads.len() && (end == done || bytes + payloads[end].len() + 4 <= max) {
            bytes += payloads[end].len() + 4;
            end += 1;
        }
        let mut call = Call::new(core, node, name);
        let mut from = done;
        while from < end {
            let body = frame(&payloads[from..end]);
            let answer = match call.ask(&body, Some(end - from), cancel).await {
                Ok(a) => a,
                Err(e) => return (from, Err(e)),
            };
            let answer = String::from_utf8_lossy(&answer).into_owned();
            if answer == "ok" {
                from = end;
                break;
            }
            // `K what`; a bare word took nothing.
            let (taken, what) = answer.split_once(' ').unwrap_or(("0", &answer));
            let taken = taken.parse::<usize>().unwrap_or(0).min(end - from);
            from += taken;
            match what {
                "full" => {
                    if taken > 0 {
                        // Those were taken under this id: the rest is a new send.
                        call = Call::new(core, node, name);
                    }
                    call.pause(cancel).await;
                }
                "no-such-routine" => {
                    return (from, Err(CallError::NoSuchRoutine(format!("{node}/{name}"))));
                }
                _ => return (from, Err(CallError::Closed)),
            }
        }
        done = from;
    }
    (done, Ok(()))
}

/// One send's requests to a node: one id kept across the retries of a request that got no
/// answer (the node takes it once), retried while the node is live, for at most a minute.
struct Call<'a> {
    core: &'a ClusterCore,
    node: &'a str,
    name: &'a str,
    id: String,
    /// A request went out and got no answer: the node may have taken it.
    unanswered: bool,
    started: tokio::time::Instant,
    pause: Duration,
}

impl<'a> Call<'a> {
    fn new(core: &'a ClusterCore, node: &'a str, name: &'a str) -> Self {
        Call {
            core,
            node,
            name,
            id: core.topics.next_id(&core.node_token),
            unanswered: false,
            started: tokio::time::Instant::now(),
            pause: Duration::from_millis(50),
        }
    }

    fn unknown(&self, why: &str) -> CallError {
        CallError::OutcomeUnknown(format!(
            "node {:?} did not answer a send to {:?}: {why}",
            self.node, self.name
        ))
    }

    /// Waits before asking again after `full`.
    async fn pause(&self, cancel: &CancellationToken) {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }

    /// The node's answer to `body` (one message, or `batch` framed ones).
    async fn ask(
        &mut self,
        body: &bytes::Bytes,
        batch: Option<usize>,
        cancel: &CancellationToken,
    ) -> Result<bytes::Bytes, CallError> {
        let core = self.core;
        loop {
            if cancel.is_cancelled() {
                return Err(if self.unanswered {
                    self.unknown("cancelled")
                } else {
                    CallError::Cancelled
                });
            }
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(TO, self.name);
            headers.insert(SEND_ID, self.id.as_str());
            if let Some(n) = batch {
                headers.insert(BATCH, n.to_string().as_str());
            }
            let call = if batch.is_some() { "send-batch" } else { "send" };
            let request =
                core.client.request_with_headers(subject(self.node, call), headers, body.clone());
            let request = tokio::time::timeout(REMOTE_SEND_TIMEOUT, request);
            let Some(reply) = answer_or_grace(request, cancel, CANCEL_GRACE).await else {
                return Err(self.unknown("cancelled while its request was under way"));
            };
            match reply {
                Ok(Ok(m)) => return Ok(m.payload),
                Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    // Nobody listens: no node took this request (an earlier one may have).
                    if self.unanswered {
                        return Err(self.unknown("its node is gone"));
                    }
                    return Err(super::closed(format!("send to node {:?}: {e}", self.node)));
                }
                // A transport error, or the bound.
                Ok(Err(e)) => {
                    tracing::debug!("send to node {:?}: {e} (retrying)", self.node);
                    self.unanswered = true;
                }
                Err(_) => self.unanswered = true,
            }
            if !core.registry.is_live(self.node) {
                return Err(self.unknown("its lease lapsed (paused, cut off or gone)"));
            }
            if self.started.elapsed() > REMEMBER_SENDS / 2 {
                return Err(self.unknown("no answer for a minute"));
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(self.pause) => {}
            }
        }
    }
}

/// The snapshots of `node`'s routines.
pub(crate) async fn snapshots(core: &ClusterCore, node: &str) -> Result<Vec<Snapshot>, String> {
    let request = core.client.request(subject(node, "snapshots"), bytes::Bytes::new());
    match tokio::time::timeout(SNAPSHOT_TIMEOUT, request).await {
        Ok(Ok(m)) => serde_json::from_slice(&m.payload).map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_id_is_taken_once() {
        let sends = Sends::default();
        assert!(matches!(sends.begin("n.1"), Seen::New));
        assert!(matches!(sends.begin("n.1"), Seen::Taking));
        sends.end("n.1", Some("ok"));
        assert!(matches!(sends.begin("n.1"), Seen::Taken(a) if a == "ok"));
        // One not taken (full, gone) may be tried again.
        assert!(matches!(sends.begin("n.2"), Seen::New));
        sends.end("n.2", Some("full"));
        assert!(matches!(sends.begin("n.2"), Seen::New));
        // Part of a batch taken: a retry gets the same answer.
        assert!(matches!(sends.begin("n.3"), Seen::New));
        sends.end("n.3", Some("3 full"));
        assert!(matches!(sends.begin("n.3"), Seen::Taken(a) if a == "3 full"));
        assert!(matches!(sends.begin("n.4"), Seen::New));
        sends.end("n.4", Some("0 full"));
        assert!(matches!(sends.begin("n.4"), Seen::New));
    }

    #[test]
    fn a_batch_is_framed_and_read_back() {
        let msgs = vec![b"a".to_vec(), Vec::new(), vec![7u8; 300]];
        assert_eq!(unframe(&frame(&msgs), 3), Some(msgs.clone()));
        assert_eq!(unframe(&frame(&msgs), 2), None);
        let body = frame(&msgs);
        assert_eq!(unframe(&body[..body.len() - 1], 3), None);
    }
}
