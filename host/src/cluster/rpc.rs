//! Node-to-node calls through NATS request/reply, on subjects `gorch.rpc.<node>.<call>`:
//! - `send`: a message for a routine's mailbox (header `Gorch-To`, and `Gorch-Send-Id`, one
//!   id per send kept across its retries); the reply is `ok`, `no-such-routine`, `closed` or
//!   `full` (the sender tries again: backpressure across nodes);
//! - `snapshots`: the node's routine snapshots as JSON (for `ps --cluster`).
//!
//! A send whose request gets no answer is retried with its id while the registry says its
//! node is live, for at most half of [`REMEMBER_SENDS`] (the node remembers the ids it took
//! that long, at most 65,536 of them, and answers `ok` again without taking the message
//! twice; the ids live in the process, so a new process of the node's name does not know
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
    /// true: taken; false: being taken.
    ids: HashMap<String, bool>,
    /// Taken ids, oldest first, with when.
    order: VecDeque<(Instant, String)>,
}

enum Seen {
    New,
    Taken,
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
            Some(true) => Seen::Taken,
            Some(false) => Seen::Taking,
            None => {
                s.ids.insert(id.to_string(), false);
                Seen::New
            }
        }
    }

    fn end(&self, id: &str, taken: bool) {
        let mut s = self.inner.lock();
        if taken {
            s.ids.insert(id.to_string(), true);
            s.order.push_back((Instant::now(), id.to_string()));
        } else {
            s.ids.remove(id);
        }
    }
}

/// Answers this node's calls until it leaves.
pub(crate) async fn serve(core: &Arc<ClusterCore>) -> Result<(), String> {
    let answering = Arc::new(tokio::sync::Semaphore::new(ANSWERING));
    for call in ["send", "snapshots"] {
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
        "send" => {
            let header = |h: &str| {
                msg.headers.as_ref().and_then(|hs| hs.get(h)).map(|v| v.as_str().to_string())
            };
            let id = header(SEND_ID);
            if let Some(id) = &id {
                match core.sends.begin(id) {
                    Seen::New => {}
                    // A retry of a send this node took: not taken twice.
                    Seen::Taken => {
                        let _ = core.client.publish(reply, "ok".into()).await;
                        return;
                    }
                    // Its first request is still being answered.
                    Seen::Taking => {
                        let _ = core.client.publish(reply, "full".into()).await;
                        return;
                    }
                }
            }
            let answer = take(core, &orch, header(TO), msg.payload).await;
            if let Some(id) = &id {
                core.sends.end(id, answer == Some("ok"));
            }
            // No answer while this node's lease lapsed: the sender retries.
            let Some(answer) = answer else { return };
            answer.into()
        }
        _ => serde_json::to_vec(&orch.snapshots()).unwrap_or_default().into(),
    };
    let _ = core.client.publish(reply, body).await;
}

/// Puts a sent message in the mailbox of `to`: the answer for the sender, or `None` while
/// this node's lease lapsed (a paused process coming back: if its lease is lost, another
/// process answers the retry).
async fn take(
    core: &ClusterCore,
    orch: &crate::Orchestrator,
    to: Option<String>,
    payload: bytes::Bytes,
) -> Option<&'static str> {
    let never = CancellationToken::new();
    let valid = tokio::time::timeout(HOLD_FULL, core.lease.wait_valid(&never)).await;
    if !matches!(valid, Ok(Ok(()))) {
        return None;
    }
    let Some(h) = to.as_deref().and_then(|n| orch.get_by_name(n)) else {
        return Some("no-such-routine");
    };
    let m = Message::from(payload.to_vec());
    Some(match tokio::time::timeout(HOLD_FULL, h.mailbox().send(m)).await {
        Ok(Ok(())) => "ok",
        Ok(Err(_)) => "closed",
        Err(_) => "full",
    })
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
    let id = core.topics.next_id(&core.node_token);
    let payload = bytes::Bytes::from(payload);
    // A request went out and got no answer: the node may have taken it.
    let mut unanswered = false;
    // Retries stop well within the time the node remembers the id.
    let started = tokio::time::Instant::now();
    let unknown = |why: &str| {
        CallError::OutcomeUnknown(format!("node {node:?} did not answer a send to {name:?}: {why}"))
    };
    loop {
        if cancel.is_cancelled() {
            return Err(if unanswered { unknown("cancelled") } else { CallError::Cancelled });
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(TO, name);
        headers.insert(SEND_ID, id.as_str());
        let request =
            core.client.request_with_headers(subject(node, "send"), headers, payload.clone());
        let request = tokio::time::timeout(REMOTE_SEND_TIMEOUT, request);
        let Some(reply) = answer_or_grace(request, cancel, CANCEL_GRACE).await else {
            return Err(unknown("cancelled while its request was under way"));
        };
        let mut pause = Duration::from_millis(50);
        match reply {
            Ok(Ok(m)) => match m.payload.as_ref() {
                b"ok" => return Ok(()),
                b"no-such-routine" => {
                    return Err(CallError::NoSuchRoutine(format!("{node}/{name}")));
                }
                b"full" => pause = Duration::from_millis(20),
                _ => return Err(CallError::Closed),
            },
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                // Nobody listens: no node took this request (an earlier one may have).
                if unanswered {
                    return Err(unknown("its node is gone"));
                }
                return Err(super::closed(format!("send to node {node:?}: {e}")));
            }
            // A transport error, or the bound.
            Ok(Err(e)) => {
                tracing::debug!("send to node {node:?}: {e} (retrying)");
                unanswered = true;
            }
            Err(_) => unanswered = true,
        }
        if unanswered && !core.registry.is_live(node) {
            return Err(unknown("its lease lapsed (paused, cut off or gone)"));
        }
        if unanswered && started.elapsed() > REMEMBER_SENDS / 2 {
            return Err(unknown("no answer for a minute"));
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
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
        sends.end("n.1", true);
        assert!(matches!(sends.begin("n.1"), Seen::Taken));
        // One not taken (full, gone) may be tried again.
        assert!(matches!(sends.begin("n.2"), Seen::New));
        sends.end("n.2", false);
        assert!(matches!(sends.begin("n.2"), Seen::New));
    }
}
