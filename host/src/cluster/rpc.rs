//! Node-to-node calls through NATS request/reply, on subjects `gorch.rpc.<node>.<call>`:
//! - `send`: a message for a routine's mailbox (header `Gorch-To`); the reply is `ok`,
//!   `no-such-routine`, `closed` or `full` (the sender tries again: backpressure across
//!   nodes);
//! - `snapshots`: the node's routine snapshots as JSON (for `ps --cluster`).
//!
//! A node that is gone answers nothing: the sender gets `closed` at once (no responders) or
//! after [`REMOTE_SEND_TIMEOUT`], never a hang.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{ClusterCore, REMOTE_SEND_TIMEOUT, token};
use crate::delivery::Message;
use crate::routine::Snapshot;
use crate::transport::CallError;

const TO: &str = "Gorch-To";
/// How long a node holds a send for a full mailbox before answering `full`.
const HOLD_FULL: Duration = Duration::from_secs(1);
/// Bound on fetching one node's snapshots.
pub(crate) const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);

fn subject(node: &str, call: &str) -> String {
    format!("gorch.rpc.{}.{call}", token(node))
}

/// Answers this node's calls until it leaves.
pub(crate) async fn serve(core: &Arc<ClusterCore>) -> Result<(), String> {
    for call in ["send", "snapshots"] {
        // A queue group: two processes of one node name (one paused past its lease) never
        // both take a request.
        let mut sub = core
            .client
            .queue_subscribe(subject(&core.node, call), "gorch-rpc".to_string())
            .await
            .map_err(|e| format!("cannot subscribe: {e}"))?;
        let c = core.clone();
        core.tasks.spawn(async move {
            loop {
                let msg = tokio::select! {
                    _ = c.stop.cancelled() => break,
                    // Another process has this node's name now: it answers.
                    _ = c.lease.lost() => break,
                    m = sub.next() => match m { Some(m) => m, None => break },
                };
                let c2 = c.clone();
                // A send may wait for room: each request in its own task.
                c.spawn(async move { answer(&c2, call, msg).await });
            }
        });
    }
    Ok(())
}

async fn answer(core: &ClusterCore, call: &str, msg: async_nats::Message) {
    let Some(reply) = msg.reply.clone() else { return };
    let Some(orch) = core.orch() else { return };
    let body: bytes::Bytes = match call {
        "send" => {
            let to = msg.headers.as_ref().and_then(|h| h.get(TO)).map(|v| v.as_str().to_string());
            // Not while this node's lease lapsed (a paused process coming back): if it is
            // lost, another process answers, and the sender's request times out.
            let never = tokio_util::sync::CancellationToken::new();
            let valid = tokio::time::timeout(HOLD_FULL, core.lease.wait_valid(&never)).await;
            if !matches!(valid, Ok(Ok(()))) {
                return;
            }
            let target = to.as_deref().and_then(|n| orch.get_by_name(n));
            match target {
                None => "no-such-routine".into(),
                Some(h) => {
                    let m = Message::from(msg.payload.to_vec());
                    match tokio::time::timeout(HOLD_FULL, h.mailbox().send(m)).await {
                        Ok(Ok(())) => "ok".into(),
                        Ok(Err(_)) => "closed".into(),
                        Err(_) => "full".into(),
                    }
                }
            }
        }
        _ => serde_json::to_vec(&orch.snapshots()).unwrap_or_default().into(),
    };
    let _ = core.client.publish(reply, body).await;
}

/// Sends `payload` to the routine `name` on `node`; waits while its mailbox is full.
pub(crate) async fn send(
    core: &ClusterCore,
    node: &str,
    name: &str,
    payload: Vec<u8>,
    cancel: &CancellationToken,
) -> Result<(), CallError> {
    let payload = bytes::Bytes::from(payload);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(TO, name);
        let request =
            core.client.request_with_headers(subject(node, "send"), headers, payload.clone());
        let reply = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
            r = tokio::time::timeout(REMOTE_SEND_TIMEOUT, request) => r,
        };
        match reply {
            Ok(Ok(m)) => match m.payload.as_ref() {
                b"ok" => return Ok(()),
                b"no-such-routine" => {
                    return Err(CallError::NoSuchRoutine(format!("{node}/{name}")));
                }
                b"full" => continue,
                _ => return Err(CallError::Closed),
            },
            // No responders (the node is gone), a transport error, or the bound.
            Ok(Err(e)) => return Err(super::closed(format!("send to node {node:?}: {e}"))),
            Err(_) => return Err(super::closed(format!("send to node {node:?}: timed out"))),
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
