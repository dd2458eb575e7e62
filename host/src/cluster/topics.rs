//! Cluster-wide topics: each topic is the JetStream stream `GORCH_T_<topic>` (subject
//! `gorch.topic.<topic>`, work-queue retention, file storage, at most
//! [`DEFAULT_TOPIC_CAPACITY`] messages, new ones refused when full) with one durable pull
//! consumer, `gorch`, shared by the consumers of every node: each message goes to one
//! consumer.
//!
//! The delivery rule of [`crate::delivery`] maps onto JetStream (the origin in `link`): a
//! message taken stays unacknowledged (in flight) until its consumer asks for the next one
//! or returns (ack); a crash naks it (redelivered at once, to any node); after
//! `max-deliveries` it goes to the cluster-wide `dead-letter` topic and is terminated.
//! While a consumer works on a message the host sends progress acks; if the host dies they
//! stop and JetStream redelivers the message after the consumer's ack wait. Publishing waits for the stream's acknowledgement
//! (the message is stored before `publish` returns), retries with the same message id across
//! a lost connection (JetStream drops the duplicate within [`DUPLICATE_WINDOW`]), and waits
//! while the topic is full. A message id is the node, a random number drawn when the process
//! joined, and a sequence: a node restarted within the window never reuses an id.
//!
//! There is no same-node shortcut: a message handed to a local consumer without going
//! through the stream would be lost with this host (a topic that may be lost with it is
//! declared node-local instead, and never reaches this module).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, AckPolicy, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::prefetch::{HOLD, Held, Next, Prefetch};
use super::{ClusterCore, MIN_ACK_WAIT, answer_or_grace, closed, token, untoken};
use crate::bus::{ClusterTopicStats, DEFAULT_MAX_TOPICS, DEFAULT_TOPIC_CAPACITY, TopicStats};
use crate::clock::now_nanos;
use crate::delivery::Letter;
use crate::names::validate_topic_name;
use crate::transport::{CallError, Limit};

const STREAM_PREFIX: &str = "GORCH_T_";
const CONSUMER: &str = "gorch";
/// Longest wait of one pull request (a receive without timeout pulls again after it).
const PULL_MAX: Duration = Duration::from_secs(5);
/// How long JetStream remembers a message id to drop a retried publish (set on every topic
/// stream: a publish whose acknowledgement was lost is retried within seconds).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The most pulls waiting on a topic's consumer at once, cluster-wide.
const MAX_WAITING: i64 = 4096;

/// A topic stream's largest message: the largest this node's routines may publish (capped
/// by what NATS carries). With the stream's message count it bounds the stream's bytes, and
/// unlike a `max_bytes` it reserves none of the server's storage.
fn max_message_size(core: &ClusterCore) -> i32 {
    let message = core.message_bytes.min(core.max_message() as u64);
    i32::try_from(message).unwrap_or(i32::MAX)
}

/// How long a cancelled publish waits for the answer of the attempt under way.
const CANCEL_GRACE: Duration = Duration::from_secs(1);
/// How often the topic figures of `/gorchestra/api/topics` and `/metrics` are refreshed.
const STATS_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Topic {
    subject: String,
    /// When this handle was made (a stream listing older than that says nothing of it).
    opened: Instant,
    /// The stream's name and when the server created it (this incarnation).
    stream: String,
    created: i128,
    consumer: consumer::Consumer<pull::Config>,
    /// The consumer's ack wait, as the server has it (what progress acks must beat).
    ack_wait: Duration,
    /// The stream's largest message (`max_msg_size`; -1 or 0: no limit of its own).
    max_message_size: i32,
    /// Publishers' blocked time: nanoseconds of the waits that ended, the publishes blocked
    /// now and the sum of their start times (`clock::now_nanos`), read together so that what
    /// they have waited so far counts before they end.
    blocked_publish: Mutex<(u64, u64, u64)>,
    blocked_recv_ns: AtomicU64,
    /// Messages of this topic this node sent to `dead-letter`.
    dead_lettered: AtomicU64,
    /// This node's messages of the topic fetched ahead of its receives.
    prefetch: Prefetch<RemoteDelivery>,
    /// Acks of settled messages waiting to be sent (see [`RemoteMsg::ack_all`]), and
    /// whether a task is sending them.
    acks: Mutex<(Vec<RemoteMsg>, bool)>,
}

impl Topic {
    /// Nanoseconds publishers spent blocked on this topic, those still blocked included.
    fn blocked_publish_ns(&self) -> u64 {
        let (ended, n, since_sum) = *self.blocked_publish.lock();
        ended + (n * now_nanos()).saturating_sub(since_sum)
    }
}

pub(crate) struct Topics {
    handles: Mutex<HashMap<String, Arc<Topic>>>,
    stats: RwLock<Vec<TopicStats>>,
    /// This process's part of every message id: random, so that ids are unique across
    /// processes and restarts of a node (JetStream drops an id it saw within
    /// [`DUPLICATE_WINDOW`], whoever sent it).
    boot: u64,
    seq: AtomicU64,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            handles: Mutex::default(),
            stats: RwLock::default(),
            boot: rand::random(),
            seq: AtomicU64::new(0),
        }
    }
}

impl Topics {
    /// A message id for one publish or send (kept across its retries): node, boot,
    /// sequence.
    pub(crate) fn next_id(&self, node_token: &str) -> String {
        format!("{node_token}.{:016x}.{}", self.boot, self.seq.fetch_add(1, Relaxed))
    }

    /// The figures of every cluster topic (refreshed from the streams, see `start_stats`), with
    /// this node's blocked times.
    pub(crate) fn stats(&self) -> Vec<TopicStats> {
        self.stats.read().clone()
    }
}

/// A message taken from a cluster topic, in flight until acked, naked or terminated.
pub(crate) struct RemoteDelivery {
    pub(crate) payload: Vec<u8>,
    /// How many times JetStream handed it out before this time.
    pub(crate) delivered_before: u32,
    pub(crate) handle: RemoteMsg,
}

impl Held for RemoteDelivery {
    fn delivered_before(&self) -> bool {
        self.delivered_before > 0
    }
}

/// The acknowledgement handle of an in-flight cluster message. Dropping it without a
/// verdict leaves the message to JetStream's ack wait.
pub(crate) struct RemoteMsg {
    acker: Arc<Acker>,
    core: Arc<ClusterCore>,
    /// Held until the verdict is confirmed (bounds this node's taken messages).
    permit: OwnedSemaphorePermit,
    /// Where and when it was taken: a verdict never reaches another stream of the same
    /// name (a verdict names its message by stream sequence).
    taken: Taken,
    /// Stops the progress acks of the messages taken with it once all are settled.
    _progress: Arc<DropGuard>,
}

/// The stream a message came from and the connection epoch it was taken in.
#[derive(Clone)]
struct Taken {
    topic: Arc<Topic>,
    epoch: u64,
}

impl Taken {
    /// Whether a verdict may be sent now: the connection is up and, if it came back since
    /// the message was taken, the stream is still the one it came from (a nats-server that
    /// lost its store has a new stream of the same name, whose sequence numbers name other
    /// messages).
    async fn still_there(&self, core: &ClusterCore) -> Result<bool, String> {
        if !core.connected() {
            return Err("not connected".into());
        }
        if core.epoch() == self.epoch {
            return Ok(true);
        }
        match core.js.get_stream(&self.topic.stream).await {
            Ok(s) => Ok(s.cached_info().created.unix_timestamp_nanos() == self.topic.created),
            Err(e) => match e.kind() {
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(false)
                }
                _ => Err(e.to_string()),
            },
        }
    }
}

impl RemoteMsg {
    fn verdict(self, kind: AckKind) {
        let RemoteMsg { acker, core, permit, taken, _progress } = self;
        drop(_progress);
        let c = core.clone();
        core.spawn(async move {
            confirm(&c, &acker, kind, &taken).await;
            drop(permit);
        });
    }
    /// Processed, all of them (messages of one topic): queued for the topic's ack sender.
    /// While it awaits the server's answer to one group, the acks settled meanwhile (by
    /// this and other receives of the topic on this node) queue up and go as the next
    /// group: one round trip per group, not per message. A group not confirmed within
    /// [`ACK_INLINE`] (a lost connection) goes on alone, without holding up the next.
    pub(crate) fn ack_all(msgs: Vec<RemoteMsg>) {
        let Some(first) = msgs.first() else { return };
        let (core, topic) = (first.core.clone(), first.taken.topic.clone());
        let start = {
            let mut acks = topic.acks.lock();
            acks.0.extend(msgs);
            !std::mem::replace(&mut acks.1, true)
        };
        if !start {
            return;
        }
        let c = core.clone();
        core.spawn(async move {
            loop {
                let group = {
                    let mut acks = topic.acks.lock();
                    if acks.0.is_empty() {
                        acks.1 = false;
                        break;
                    }
                    std::mem::take(&mut acks.0)
                };
                let confirming = c.tasks.spawn(ack_group(c.clone(), group));
                let _ = tokio::time::timeout(ACK_INLINE, confirming).await;
            }
        });
    }
    /// Not processed: redelivered now, to any node.
    pub(crate) fn nak(self) {
        self.verdict(AckKind::Nak(None));
    }
    /// Publishes `letter` on the cluster's `dead-letter` topic, then terminates the message
    /// (never redelivered). A letter NATS cannot carry is dropped (logged and counted) and
    /// the message terminated all the same: handing it back would bring it straight back.
    pub(crate) fn dead_letter(self, letter: Letter) {
        let RemoteMsg { acker, core, permit, taken, _progress } = self;
        drop(_progress);
        let c = core.clone();
        core.spawn(async move {
            let _permit = permit;
            // Terminate what reached dead-letter or never can; otherwise redeliver it.
            let kind = match publish_dead_letter(&c, letter).await {
                DeadLettered::Stored | DeadLettered::Dropped => {
                    taken.topic.dead_lettered.fetch_add(1, Relaxed);
                    AckKind::Term
                }
                DeadLettered::NotNow => AckKind::Nak(None),
            };
            confirm(&c, &acker, kind, &taken).await;
        });
    }
}

/// Acks a group of messages of one topic: every ack but the last is sent without waiting
/// for the server's answer, and the last one's confirmation confirms them all (the server
/// handles a connection's acks of one consumer in order). If it does not come, each is
/// confirmed on its own. Messages taken on an earlier connection are confirmed on their own
/// (a verdict names its message by stream sequence: after a reconnect the stream may be
/// another one).
async fn ack_group(c: Arc<ClusterCore>, group: Vec<RemoteMsg>) {
    let c = &*c;
    let epoch = c.epoch();
    let (mut msgs, older): (Vec<RemoteMsg>, Vec<RemoteMsg>) =
        group.into_iter().partition(|m| m.taken.epoch == epoch);
    let each = |msgs: Vec<RemoteMsg>| {
        futures::future::join_all(msgs.into_iter().map(|m| async move {
            let RemoteMsg { acker, permit, taken, _progress, .. } = m;
            confirm(c, &acker, AckKind::Ack, &taken).await;
            drop((permit, _progress));
        }))
    };
    each(older).await;
    let Some(last) = msgs.pop() else { return };
    let mut sent = c.connected() && c.epoch() == epoch;
    if sent {
        for m in &msgs {
            sent &= m.acker.ack_with(AckKind::Ack).await.is_ok();
        }
    }
    let RemoteMsg { acker, permit, taken, _progress, .. } = last;
    let confirmed = sent
        && c.epoch() == epoch
        && acker.double_ack_with(AckKind::Ack).await.is_ok()
        // Not reconnected meanwhile (acks in the old connection's buffer are lost).
        && c.epoch() == epoch;
    drop((permit, _progress));
    if confirmed {
        return;
    }
    confirm(c, &acker, AckKind::Ack, &taken).await;
    each(msgs).await;
}

/// How long the ack sender of a topic waits for a group's confirmation before it goes on
/// with the next group.
const ACK_INLINE: Duration = Duration::from_millis(50);

/// Sends `kind` for a message and waits for the server to confirm it, trying three times
/// (a verdict lost in a disconnect would make the message come back); one never confirmed
/// is logged and counted (`gorch_cluster_acks_unconfirmed_total`).
async fn confirm(core: &ClusterCore, acker: &Acker, kind: AckKind, taken: &Taken) {
    let mut pause = Duration::from_millis(200);
    let mut last = String::new();
    for _ in 0..3 {
        match taken.still_there(core).await {
            Ok(true) => match acker.double_ack_with(kind).await {
                Ok(()) => return,
                Err(e) => last = e.to_string(),
            },
            Ok(false) => {
                tracing::debug!(
                    "a {kind:?} is not sent: the topic's stream was created again since (the \
                     message went with the lost store)"
                );
                return;
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    core.acks_unconfirmed.fetch_add(1, Relaxed);
    tracing::warn!("the server did not confirm a {kind:?} (the message may come again): {last}");
}

/// What became of a dead letter.
pub(crate) enum DeadLettered {
    /// On the cluster's `dead-letter` topic.
    Stored,
    /// Larger than NATS carries, in either form: logged and counted, never stored.
    Dropped,
    /// Not stored within 30 s (NATS unreachable that long).
    NotNow,
}

/// Publishes `letter` on the cluster's `dead-letter` topic, giving up after 30 s (NATS
/// unreachable that long).
pub(crate) async fn publish_dead_letter(core: &ClusterCore, letter: Letter) -> DeadLettered {
    let topic = crate::delivery::DEAD_LETTER_TOPIC;
    let max = core.max_message();
    let Some(json) = letter.json_within(max) else {
        tracing::error!(
            "a dead letter of a {}-byte message from {} ({} deliveries) is larger than NATS \
             carries ({max} bytes): dropped",
            letter.payload.len(),
            letter.source,
            letter.deliveries
        );
        core.dead_letters_dropped.fetch_add(1, Relaxed);
        return DeadLettered::Dropped;
    };
    let give_up = CancellationToken::new();
    let _timer = give_up.clone().drop_guard();
    let publishing = publish(core, topic, json, &give_up);
    tokio::pin!(publishing);
    let published = tokio::select! {
        r = &mut publishing => r,
        _ = tokio::time::sleep(Duration::from_secs(30)) => {
            give_up.cancel();
            publishing.await
        }
    };
    match published {
        Ok(()) => DeadLettered::Stored,
        Err(CallError::OutcomeUnknown(why)) => {
            tracing::error!(
                "a dead letter may or may not be on the cluster's {topic} topic ({why}): the \
                 message is handed back (it may be dead-lettered twice)"
            );
            DeadLettered::NotNow
        }
        Err(e) => {
            tracing::error!(
                "a dead letter could not be published on the cluster's {topic} topic within \
                 30 s ({e}): the message is handed back"
            );
            DeadLettered::NotNow
        }
    }
}

fn stream_name(topic: &str) -> String {
    format!("{STREAM_PREFIX}{}", token(topic))
}

/// The stream and consumer of `topic`, created on first use (by whichever node comes first:
/// its capacity and ack wait hold for the cluster).
async fn topic(core: &ClusterCore, name: &str) -> Result<Arc<Topic>, CallError> {
    if let Some(t) = core.topics.handles.lock().get(name) {
        return Ok(t.clone());
    }
    validate_topic_name(name).map_err(|_| CallError::InvalidName(name.to_string()))?;
    if core.topics.handles.lock().len() >= DEFAULT_MAX_TOPICS {
        return Err(CallError::Limit(Limit::Topics { max: DEFAULT_MAX_TOPICS }));
    }
    let subject = format!("gorch.topic.{}", token(name));
    let config = stream::Config {
        name: stream_name(name),
        description: Some(name.to_string()),
        subjects: vec![subject.clone()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_messages: DEFAULT_TOPIC_CAPACITY as i64,
        max_message_size: max_message_size(core),
        num_replicas: core.replicas,
        discard: DiscardPolicy::New,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    let stream = core.js.get_or_create_stream(config).await.map_err(closed)?;
    let replicas = stream.cached_info().config.num_replicas;
    if replicas < core.replicas {
        tracing::warn!(
            topic = name,
            "the topic's stream keeps {replicas} replica(s), fewer than [cluster] replicas = {} \
             (it was created before; `nats stream edit` can raise it)",
            core.replicas
        );
    }
    let consumer_config = pull::Config {
        durable_name: Some(CONSUMER.into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: core.ack_wait,
        max_ack_pending: 65_536,
        // Pulls waiting at once, cluster-wide (the server's default is 512; a pull beyond
        // the bound is refused, and the receive tries again after a pause).
        max_waiting: MAX_WAITING,
        ..Default::default()
    };
    let mut consumer =
        stream.get_or_create_consumer(CONSUMER, consumer_config.clone()).await.map_err(closed)?;
    let found = consumer.cached_info().config.ack_wait;
    if found != core.ack_wait {
        // Created by a node with another setting: this node's setting applies from now on
        // (the rest of the consumer's settings as they are: some cannot change).
        let was = &consumer.cached_info().config;
        let update = pull::Config { max_waiting: was.max_waiting, ..consumer_config };
        match stream.create_consumer(update).await {
            Ok(updated) => {
                tracing::info!(
                    topic = name,
                    "ack wait of the topic's consumer changed from {} to {}",
                    humantime::format_duration(found),
                    humantime::format_duration(core.ack_wait)
                );
                consumer = updated;
            }
            Err(e) => tracing::warn!(
                topic = name,
                "the topic's consumer keeps its ack wait of {} (this node asks for {}): {e}",
                humantime::format_duration(found),
                humantime::format_duration(core.ack_wait)
            ),
        }
    }
    let ack_wait = consumer.cached_info().config.ack_wait;
    clean_below_ack_floor(name, &stream, consumer.cached_info()).await;
    let t = Arc::new(Topic {
        subject,
        opened: Instant::now(),
        stream: stream.cached_info().config.name.clone(),
        created: stream.cached_info().created.unix_timestamp_nanos(),
        consumer,
        ack_wait,
        max_message_size: stream.cached_info().config.max_message_size,
        blocked_publish: Mutex::default(),
        blocked_recv_ns: AtomicU64::new(0),
        dead_lettered: AtomicU64::new(0),
        prefetch: Prefetch::default(),
        acks: Mutex::default(),
    });
    Ok(core.topics.handles.lock().entry(name.to_string()).or_insert(t).clone())
}

/// Removes messages the consumer has acknowledged but the stream still holds: a work-queue
/// stream deletes a message when it is acked, but a nats-server killed before it wrote
/// those deletes keeps them after a restart (with the consumer's ack floor past them), and
/// they count against the topic's capacity for good.
async fn clean_below_ack_floor(name: &str, stream: &stream::Stream, consumer: &consumer::Info) {
    let floor = consumer.ack_floor.stream_sequence;
    let first = stream.cached_info().state.first_sequence;
    if floor == 0 || first > floor {
        return;
    }
    match stream.purge().sequence(floor + 1).await {
        Ok(r) if r.purged > 0 => tracing::warn!(
            topic = name,
            "removed {} processed message(s) left in the topic's stream (nats-server stopped \
             before it stored their acknowledgements)",
            r.purged
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(topic = name, "cannot remove processed messages: {e}"),
    }
}

/// Drops the handle of `name` if it is still `t` (its stream or consumer is gone): the next
/// publish or receive creates them again.
fn forget(core: &ClusterCore, name: &str, t: &Arc<Topic>) {
    let mut handles = core.topics.handles.lock();
    if handles.get(name).is_some_and(|h| Arc::ptr_eq(h, t)) {
        handles.remove(name);
        drop(handles);
        close_prefetch(t);
        warn_gone(name);
    }
}

fn warn_gone(topic: &str) {
    tracing::warn!(
        topic,
        "the topic's stream or consumer is gone from NATS (did nats-server lose its store?): \
         creating them again"
    );
}

/// The limit a payload of `len` bytes is over, if the topic's stream takes smaller messages
/// (it was created by a node whose plugins send smaller ones).
fn too_large_for(t: &Topic, len: usize) -> Option<u64> {
    let max = t.max_message_size;
    (max > 0 && len > max as usize).then_some(max as u64)
}

fn is_full(e: &impl std::fmt::Display) -> bool {
    let s = e.to_string();
    s.contains("maximum messages") || s.contains("maximum bytes")
}

/// Publishes on the cluster topic `name`: returns once JetStream has stored the message;
/// waits (with growing pauses) while the topic is full or NATS is unreachable. Cancelled,
/// it answers `cancelled` when no attempt can have stored the message, `outcome-unknown`
/// when one went out and its answer did not come.
pub(crate) async fn publish(
    core: &ClusterCore,
    name: &str,
    payload: Vec<u8>,
    cancel: &CancellationToken,
) -> Result<(), CallError> {
    let max = core.max_message();
    if payload.len() > max {
        return Err(CallError::TooLarge(max as u64));
    }
    let t = topic(core, name).await?;
    let id = core.topics.next_id(&core.node_token);
    publish_with_id(core, name, t, payload.into(), &id, cancel).await
}

/// Most publishes of one batch whose acknowledgements are awaited together.
const PUBLISH_WINDOW: usize = 256;
/// Most publishes of a node awaiting their acknowledgement at once (single publishes of
/// many routines and batch windows together): more wait for room.
pub(crate) const PUBLISHING: usize = 4096;

/// Publishes `payloads` on the cluster topic `name`: each window of them is sent before
/// their acknowledgements are awaited together, and one that was not stored is retried on
/// its own (with its message id, in order, waiting while the topic is full). Returns how
/// many were stored before the first that could not be; nothing is published if one is
/// over the size limit.
pub(crate) async fn publish_many(
    core: &ClusterCore,
    name: &str,
    payloads: Vec<Vec<u8>>,
    cancel: &CancellationToken,
) -> (usize, Result<(), CallError>) {
    let max = core.max_message();
    if payloads.iter().any(|p| p.len() > max) {
        return (0, Err(CallError::TooLarge(max as u64)));
    }
    let t = match topic(core, name).await {
        Ok(t) => t,
        Err(e) => return (0, Err(e)),
    };
    if let Some(limit) = payloads.iter().find_map(|p| too_large_for(&t, p.len())) {
        return (0, Err(CallError::TooLarge(limit)));
    }
    let payloads: Vec<bytes::Bytes> = payloads.into_iter().map(Into::into).collect();
    let mut done = 0;
    for window in payloads.chunks(PUBLISH_WINDOW) {
        let room = tokio::select! {
            biased;
            _ = cancel.cancelled() => return (done, Err(CallError::Cancelled)),
            room = core.publishing.acquire_many(window.len() as u32) => match room {
                Ok(room) => room,
                Err(_) => return (done, Err(CallError::Closed)),
            },
        };
        let ids: Vec<String> =
            window.iter().map(|_| core.topics.next_id(&core.node_token)).collect();
        let mut acks = Vec::with_capacity(window.len());
        for (payload, id) in window.iter().zip(&ids) {
            let message = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            acks.push(core.js.send_publish(t.subject.clone(), message).await.ok());
        }
        let mut stored = 0;
        for ack in acks {
            let ok = match ack {
                Some(ack) => ack.await.is_ok(),
                None => false,
            };
            if !ok {
                break;
            }
            stored += 1;
        }
        done += stored;
        drop(room);
        // The first not stored, and those after it, one by one (the stored ones among them
        // are dropped by JetStream as duplicates).
        for (payload, id) in window.iter().zip(&ids).skip(stored) {
            // `publish_with_id` takes a re-created stream's handle when it must wait.
            if let Err(e) =
                publish_with_id(core, name, t.clone(), payload.clone(), id, cancel).await
            {
                return (done, Err(e));
            }
            done += 1;
        }
    }
    (done, Ok(()))
}

/// Publishes `payload` with the message id `id` (kept across retries) on the topic `name`
/// whose handle is `t`.
async fn publish_with_id(
    core: &ClusterCore,
    name: &str,
    mut t: Arc<Topic>,
    payload: bytes::Bytes,
    id: &str,
    cancel: &CancellationToken,
) -> Result<(), CallError> {
    let mut pause = Duration::from_millis(2);
    let mut blocked: Option<Blocked> = None;
    // An attempt went out and got no verdict (stored or refused): it may be stored.
    let mut unsure = false;
    let unknown = |why: &str| {
        CallError::OutcomeUnknown(format!(
            "a publish on {name:?} went to NATS and {why}: it may be stored"
        ))
    };
    loop {
        if blocked.is_some() {
            // A lost stream is created again (see `forget_lost`).
            match topic(core, name).await {
                Ok(fresh) => t = fresh,
                Err(CallError::Closed) => {}
                Err(e) => break Err(e),
            }
        }
        if cancel.is_cancelled() {
            break Err(if unsure { unknown("its answer was lost") } else { CallError::Cancelled });
        }
        if let Some(limit) = too_large_for(&t, payload.len()) {
            break Err(CallError::TooLarge(limit));
        }
        // A place in this node's window of publishes awaiting their acknowledgement.
        let room = tokio::select! {
            biased;
            _ = cancel.cancelled() => continue,
            room = core.publishing.acquire() => room.map_err(|_| CallError::Closed)?,
        };
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload.clone())
            .message_id(id);
        let attempt = async {
            let r = match core.js.send_publish(t.subject.clone(), message).await {
                Ok(ack) => ack.await.map(|_| ()),
                Err(e) => Err(e),
            };
            // Refused (full, or no stream listens) means not stored; anything else (a lost
            // connection, a timeout) may have been.
            r.map_err(|e| (e.kind() == PublishErrorKind::StreamNotFound || is_full(&e), e))
        };
        let Some(r) = answer_or_grace(attempt, cancel, CANCEL_GRACE).await else {
            break Err(unknown("no answer came before it was cancelled"));
        };
        // Not held through a pause: a blocked topic does not slow the others.
        drop(room);
        match r {
            Ok(()) => break Ok(()),
            Err((refused, e)) => {
                // A refusal comes after JetStream's duplicate check: an earlier attempt that
                // was stored would have been answered as a duplicate.
                unsure = !refused;
                if e.kind() == PublishErrorKind::StreamNotFound {
                    forget(core, name, &t);
                }
                if !is_full(&e) {
                    tracing::debug!(topic = name, "publish to NATS failed, retrying: {e}");
                }
                blocked.get_or_insert_with(|| Blocked::new(&t));
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_millis(250));
            }
        }
    }
}

/// A publish blocked on a topic (full, or NATS unreachable), counted in its blocked time
/// while it waits and when it ends.
struct Blocked {
    topic: Arc<Topic>,
    since: u64,
}

impl Blocked {
    fn new(topic: &Arc<Topic>) -> Self {
        let since = now_nanos();
        let mut b = topic.blocked_publish.lock();
        b.1 += 1;
        b.2 += since;
        Blocked { topic: topic.clone(), since }
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let now = now_nanos();
        let mut b = self.topic.blocked_publish.lock();
        b.0 += now.saturating_sub(self.since);
        b.1 -= 1;
        b.2 -= self.since;
    }
}

/// Takes up to `max` messages of the cluster topic `name` (none: `timeout` passed): from
/// this node's prefetched ones, else fetched for this and the topic's other receives here
/// (see [`prefetch`](super::prefetch)). A message delivered before comes alone.
pub(crate) async fn take(
    core: &Arc<ClusterCore>,
    name: &str,
    max: usize,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Result<Vec<RemoteDelivery>, CallError> {
    let mut t = topic(core, name).await?;
    let start = Instant::now();
    let deadline = timeout.map(|d| tokio::time::Instant::now() + d);
    let max = max.max(1);
    let result = loop {
        let prefetch = &t.prefetch;
        let demand = prefetch.want(max);
        let ended = prefetch.fetch_ended();
        let mut turn = match prefetch.pop_or_turn(max) {
            Next::Held(got) => break Ok(got),
            Next::Fetch(turn) => Some(turn),
            Next::Wait => None,
        };
        if let Some(turn) = turn.as_mut() {
            let window = turn.window();
            let (first, from) = match pull_first(core, name, &t, deadline, cancel).await {
                Ok(Some(first)) => first,
                Ok(None) => break Ok(Vec::new()),
                Err(e) => break Err(e),
            };
            // What else the stream holds now: first deliveries for this receive (as many as
            // it asks), the rest for the next receives. One delivered before goes alone.
            // A first message delivered before (a crash loop's sign) comes alone: nothing is
            // fetched with it that a hand-back could cost a delivery.
            let more = if window > 1 && first.delivered_before == 0 {
                fetch_now(core, &from, window - 1).await
            } else {
                Vec::new()
            };
            turn.brought(1 + more.len());
            let batch = max > 1 && first.delivered_before == 0;
            let mut mine = vec![first];
            let mut rest = Vec::new();
            for d in more {
                if batch && mine.len() < max && d.delivered_before == 0 {
                    mine.push(d);
                } else {
                    rest.push(d);
                }
            }
            for d in from.prefetch.keep(rest) {
                // Its handle was dropped meanwhile (the stream is gone, or the node leaves).
                d.handle.nak();
            }
            break Ok(mine);
        }
        // Another receive fetches: wait for what it brings.
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Err(CallError::Cancelled),
            _ = ended => {}
            _ = sleep_until(deadline) => break Ok(Vec::new()),
        }
        drop((demand, turn));
        // A lost stream or consumer is created again (see `forget_lost`).
        t = match topic(core, name).await {
            Ok(fresh) => fresh,
            Err(CallError::Closed) => t,
            Err(e) => break Err(e),
        };
    };
    t.blocked_recv_ns.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
    result
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Waits for the next message of the topic `name` whose handle is `t` (`Ok(None)`: the
/// deadline passed; a deadline already past still asks once, a try-receive), with the
/// handle it came through (a lost stream's is replaced meanwhile).
async fn pull_first(
    core: &Arc<ClusterCore>,
    name: &str,
    t: &Arc<Topic>,
    deadline: Option<tokio::time::Instant>,
    cancel: &CancellationToken,
) -> Result<Option<(RemoteDelivery, Arc<Topic>)>, CallError> {
    let mut t = t.clone();
    // Room for one more taken message: wait until there is (a receive that only waits holds
    // none; the permit is taken with the message).
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return Err(CallError::Cancelled),
        p = core.in_flight.acquire() => drop(p.map_err(|_| CallError::Closed)?),
    }
    let mut first = true;
    loop {
        if !first {
            // A lost stream or consumer is created again (see `forget_lost`).
            t = match topic(core, name).await {
                Ok(fresh) => fresh,
                Err(CallError::Closed) => t,
                Err(e) => return Err(e),
            };
        }
        let left = deadline.map(|d| d.saturating_duration_since(tokio::time::Instant::now()));
        if !first && left == Some(Duration::ZERO) {
            return Ok(None);
        }
        first = false;
        let expires = left.unwrap_or(PULL_MAX).clamp(Duration::from_millis(1), PULL_MAX);
        let pulled = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
            // A pull sent before a reconnect is lost with the old connection.
            _ = core.reconnected.notified() => continue,
            m = pull_one(&t, expires) => m,
        };
        let msg = match pulled {
            Ok(Some(msg)) => msg,
            // The pull expired: ask again.
            Ok(None) => continue,
            Err(()) => {
                // Pull requests fail at once while disconnected or while the consumer is
                // missing: pace the retries, and forget a consumer the server no longer has.
                if core.connected() && t.consumer.clone().info().await.is_err() {
                    forget(core, name, &t);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Err(CallError::Cancelled),
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                continue;
            }
        };
        // Usually free at once (checked before the pull).
        let permit = match core.in_flight.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                core.in_flight.clone().acquire_owned().await.map_err(|_| CallError::Closed)?
            }
        };
        let first = deliveries(core, vec![(msg, permit)], &t).pop().expect("one delivery");
        return Ok(Some((first, t)));
    }
}

/// The deliveries of messages just taken together, each with its handle.
fn deliveries(
    core: &Arc<ClusterCore>,
    got: Vec<(async_nats::jetstream::Message, OwnedSemaphorePermit)>,
    t: &Arc<Topic>,
) -> Vec<RemoteDelivery> {
    let mut taken = Vec::with_capacity(got.len());
    let mut payloads = Vec::with_capacity(got.len());
    for (m, permit) in got {
        // JetStream numbers this delivery (1 for the first).
        let delivered = m.info().map(|i| i.delivered).unwrap_or(1).max(1) as u32;
        let (m, acker) = m.split();
        payloads.push((m.payload.to_vec(), delivered - 1));
        taken.push((acker, permit));
    }
    let handles = remote_msgs(core, taken, t);
    payloads
        .into_iter()
        .zip(handles)
        .map(|((payload, delivered_before), handle)| RemoteDelivery {
            payload,
            delivered_before,
            handle,
        })
        .collect()
}

/// One message, `Ok(None)` when the pull expired without one, `Err` when it failed.
async fn pull_one(
    t: &Topic,
    expires: Duration,
) -> Result<Option<async_nats::jetstream::Message>, ()> {
    let batch = t.consumer.batch().max_messages(1).expires(expires).messages().await;
    let mut batch = batch.map_err(|e| tracing::trace!("pull: {e}"))?;
    match batch.next().await {
        Some(Ok(m)) => Ok(Some(m)),
        Some(Err(e)) => {
            tracing::trace!("pull: {e}");
            Err(())
        }
        None => Ok(None),
    }
}

/// The handles of messages just taken together; one progress loop keeps them ours while
/// any of them is in flight.
fn remote_msgs(
    core: &Arc<ClusterCore>,
    taken: Vec<(Acker, OwnedSemaphorePermit)>,
    topic: &Arc<Topic>,
) -> Vec<RemoteMsg> {
    let done = CancellationToken::new();
    let every = (topic.ack_wait / 3).max(MIN_ACK_WAIT / 3);
    let from = Taken { topic: topic.clone(), epoch: core.epoch() };
    let (ackers, permits): (Vec<Arc<Acker>>, Vec<OwnedSemaphorePermit>) =
        taken.into_iter().map(|(a, p)| (Arc::new(a), p)).unzip();
    let (all, d, c, t) = (ackers.clone(), done.clone(), core.clone(), from.clone());
    core.spawn(async move {
        loop {
            tokio::select! {
                _ = d.cancelled() => break,
                _ = c.stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            match t.still_there(&c).await {
                Ok(true) => {
                    // Those still held by a handle (the others are settled).
                    for a in all.iter().filter(|a| Arc::strong_count(a) > 1) {
                        let _ = a.ack_with(AckKind::Progress).await;
                    }
                }
                // Its stream is gone: nothing to keep.
                Ok(false) => break,
                Err(_) => {}
            }
        }
    });
    let guard = Arc::new(done.drop_guard());
    ackers
        .into_iter()
        .zip(permits)
        .map(|(acker, permit)| RemoteMsg {
            acker,
            core: core.clone(),
            permit,
            taken: from.clone(),
            _progress: guard.clone(),
        })
        .collect()
}

/// Up to `max` more messages of the topic whose handle is `t` that are there now (one
/// request, no wait), as many as there are permits for.
async fn fetch_now(core: &Arc<ClusterCore>, t: &Arc<Topic>, max: usize) -> Vec<RemoteDelivery> {
    let permits: Vec<OwnedSemaphorePermit> =
        std::iter::from_fn(|| core.in_flight.clone().try_acquire_owned().ok()).take(max).collect();
    if permits.is_empty() {
        return Vec::new();
    }
    let mut got = Vec::new();
    let fetching = async {
        if let Ok(mut batch) = t.consumer.fetch().max_messages(permits.len()).messages().await {
            while let Some(Ok(m)) = batch.next().await {
                got.push(m);
            }
        }
    };
    // The server answers at once (no wait on its side); only a disconnect loses the answer:
    // what came by then is kept (the rest, if any, comes back after the ack wait).
    tokio::select! {
        _ = fetching => {}
        _ = core.reconnected.notified() => {}
        _ = tokio::time::sleep(FETCH_BOUND) => {}
    }
    deliveries(core, got.into_iter().zip(permits).collect(), t)
}

/// Last-resort bound on a fetch of what the stream holds now (the server answers at once;
/// a lost connection ends the wait sooner).
const FETCH_BOUND: Duration = Duration::from_secs(30);
/// How often the sweeper runs.
const TICK: Duration = Duration::from_secs(1);

/// Lets go of what this node holds for receives of `t` when none came for `hold`: without a
/// verdict, so that JetStream's ack wait hands it to another node (a nak would be sooner,
/// but under load nats-server 2.9.10 was seen to leave messages naked this way in the
/// stream, pending nothing, unseen by the other node's pulls for 90 s).
fn hand_back_prefetched(t: &Topic, hold: Duration) {
    drop(t.prefetch.abandoned(hold, Instant::now()));
}

/// Hands back every message held for later receives of `t`, now and from a fetch under way
/// (its handle is dropped).
fn close_prefetch(t: &Topic) {
    for d in t.prefetch.close() {
        d.handle.nak();
    }
}

/// Hands back every prefetched message of every topic (the node leaves).
pub(crate) fn hand_back_all(core: &ClusterCore) {
    let handles: Vec<Arc<Topic>> = core.topics.handles.lock().values().cloned().collect();
    for t in handles {
        close_prefetch(&t);
    }
}

/// Every [`TICK`] while the node is in the cluster: hands back the prefetched messages of
/// topics no receive came for in [`HOLD`].
pub(crate) fn start_sweeper(core: &Arc<ClusterCore>) {
    let c = core.clone();
    core.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = c.stop.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
            }
            let handles: Vec<Arc<Topic>> = c.topics.handles.lock().values().cloned().collect();
            for t in handles {
                hand_back_prefetched(&t, HOLD);
            }
        }
    });
}

/// Refreshes the topic figures while the node is in the cluster: every [`STATS_EVERY`]
/// times the number of live nodes, so that the cluster as a whole lists the streams about
/// once per [`STATS_EVERY`], however many nodes it has.
pub(crate) fn start_stats(core: &Arc<ClusterCore>) {
    let c = core.clone();
    core.tasks.spawn(async move {
        loop {
            refresh_stats(&c).await;
            let nodes = c.registry.live_nodes().len().clamp(1, 60) as u32;
            tokio::select! {
                _ = c.stop.cancelled() => break,
                _ = tokio::time::sleep(STATS_EVERY * nodes) => {}
            }
        }
    });
}

async fn refresh_stats(core: &ClusterCore) {
    let listed = Instant::now();
    let mut streams = core.js.streams();
    let mut out = Vec::new();
    // Topics whose stream and consumer the server has.
    let mut whole = std::collections::HashSet::new();
    while let Some(info) = streams.next().await {
        let Ok(info) = info else { return };
        let Some(tok) = info.config.name.strip_prefix(STREAM_PREFIX) else { continue };
        let name = info.config.description.clone().or_else(|| untoken(tok)).unwrap_or_default();
        if info.state.consumer_count > 0 {
            whole.insert(name.clone());
        }
        let local = core.topics.handles.lock().get(&name).cloned();
        let ns = |f: fn(&Topic) -> &AtomicU64| {
            local.as_ref().map(|t| f(t).load(Relaxed) as f64 / 1e9).unwrap_or(0.0)
        };
        let s = &info.state;
        // The consumer's figures: one more request per topic.
        let consumer = if info.state.consumer_count > 0 {
            core.js
                .get_consumer_from_stream::<pull::Config, _, _>(CONSUMER, &info.config.name)
                .await
                .ok()
        } else {
            None
        };
        let counted =
            |f: fn(&Topic) -> &AtomicU64| local.as_ref().map(|t| f(t).load(Relaxed)).unwrap_or(0);
        let cluster = ClusterTopicStats {
            pending_ack: consumer.as_ref().map_or(0, |c| c.cached_info().num_ack_pending as u64),
            redelivered: consumer.as_ref().map_or(0, |c| c.cached_info().num_redelivered as u64),
            dead_lettered: counted(|t| &t.dead_lettered),
            prefetched: local.as_ref().map_or(0, |t| t.prefetch.held()),
        };
        out.push(TopicStats {
            len: s.messages as usize,
            cap: info.config.max_messages.max(0) as usize,
            bytes: s.bytes as usize,
            published: s.last_sequence,
            received: s.last_sequence.saturating_sub(s.messages),
            blocked_publish_seconds: local
                .as_ref()
                .map(|t| t.blocked_publish_ns() as f64 / 1e9)
                .unwrap_or(0.0),
            blocked_recv_seconds: ns(|t| &t.blocked_recv_ns),
            cluster: Some(cluster),
            name,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    *core.topics.stats.write() = out;
    forget_lost(core, &whole, listed);
}

/// Drops the handles of topics whose stream or consumer the server no longer has (it lost
/// its store, or someone deleted them): the next publish or receive creates them again.
fn forget_lost(core: &ClusterCore, whole: &std::collections::HashSet<String>, listed: Instant) {
    let mut gone = Vec::new();
    core.topics.handles.lock().retain(|name, t| {
        let kept = whole.contains(name) || t.opened >= listed;
        if !kept {
            warn_gone(name);
            gone.push(t.clone());
        }
        kept
    });
    for t in gone {
        close_prefetch(&t);
    }
}
