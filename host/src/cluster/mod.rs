//! Several hosts as one, over NATS JetStream (`gorch-host run --nats URL --node NAME`).
//!
//! - [`topics`]: every bus topic is a JetStream stream (work-queue retention, file storage)
//!   with one durable pull consumer that the consumers of all nodes share (competing
//!   consumers); the at-least-once rule of [`crate::delivery`] maps onto ack / nak / term.
//! - [`registry`]: which node runs which routine, in the key-value bucket `gorch-routines`;
//!   each node's lease is its entry in `gorch-nodes` (renewed every [`HEARTBEAT`], expired
//!   [`LEASE`] after its last renewal); routine entries count only while their node's lease
//!   lives.
//! - [`rpc`]: a mailbox send to a routine of another node, and a node's snapshots (for
//!   `ps --cluster`), through NATS request/reply on `gorch.rpc.<node>.*`.
//!
//! - `link`: the cluster as the host's transport (the layer over the in-memory one that
//!   every routine's context talks through).
//!
//! Without a cluster nothing here runs: the orchestrator keeps its in-memory bus and
//! mailboxes. With one, a send or publish is never silently dropped: it succeeds, waits
//! (backpressure), or fails with a [`CallError`] the caller sees.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Orchestrator;
use crate::names::{NameError, validate_routine_name};
use crate::orchestrator::OrchInner;
use crate::transport::CallError;

mod lease;
mod link;
mod prefetch;
mod registry;
mod rpc;
mod topics;

use link::ClusterTransport;
pub use topics::DUPLICATE_WINDOW;

/// How often a node renews its lease.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose lease was not renewed for this long is gone: its routines no longer count
/// and its name may be taken again.
pub const LEASE: Duration = Duration::from_secs(5);
/// Default bound on connecting to NATS at start.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default JetStream ack wait: a message taken by a consumer whose host dies is redelivered
/// (to any node) this long after its last sign of life. While its consumer works on it, the
/// host extends it (progress acks every third of it), so slow work is not redelivered.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(10);
/// The shortest ack wait accepted: progress acks go every third of it, and JetStream takes
/// 0 for its own default of 30 s.
pub const MIN_ACK_WAIT: Duration = Duration::from_secs(1);
/// Default bound on [`Cluster::leave`].
pub const DEFAULT_LEAVE_BOUND: Duration = Duration::from_secs(3);
/// Bound on one request of a mailbox send to another node (then retried while the node is
/// live; `outcome-unknown` once its lease lapsed).
pub const REMOTE_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// NATS server URL(s), comma-separated (`nats://`, `tls://`).
    pub url: String,
    /// This node's name, unique in the cluster.
    pub node: String,
    /// A NATS credentials file (`--nats-creds`).
    pub creds: Option<PathBuf>,
    /// Bound on the first connection.
    pub connect_timeout: Duration,
    /// JetStream ack wait of the topic consumers (see [`DEFAULT_ACK_WAIT`]; at least
    /// [`MIN_ACK_WAIT`]). The topics this node opens take it: a consumer created by a node
    /// with another setting is updated.
    pub ack_wait: Duration,
    /// This node's HTTP address, shown to the other nodes.
    pub http_addr: Option<String>,
    /// The largest message this node's routines may publish (their largest
    /// `limits.message-bytes`; default [`DEFAULT_MESSAGE_BYTES`](crate::DEFAULT_MESSAGE_BYTES)).
    /// A topic stream this node creates holds at most its capacity of such messages in
    /// bytes (`max_bytes`, capped by what NATS carries), so no guest fills the server's disk.
    pub message_bytes: Option<u64>,
    /// Node-local topics (`[cluster] local-topics`): names, or patterns where `*` matches
    /// any run of characters. Such a topic stays in this node's memory, at local speed, and
    /// dies with the host; every other topic is cluster-wide.
    pub local_topics: Vec<String>,
    /// Replicas of the streams and key-value buckets this node creates (`[cluster]
    /// replicas`, 1 to 5; default 1). With 3 on a NATS cluster of three servers, losing one
    /// server loses nothing.
    pub replicas: usize,
    /// A token the NATS server requires (`--nats local` makes one per run), if any.
    pub token: Option<String>,
}

impl ClusterConfig {
    /// A configuration with the defaults above.
    pub fn new(url: impl Into<String>, node: impl Into<String>) -> Self {
        ClusterConfig {
            url: url.into(),
            node: node.into(),
            creds: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ack_wait: DEFAULT_ACK_WAIT,
            http_addr: None,
            message_bytes: None,
            local_topics: Vec::new(),
            replicas: 1,
            token: None,
        }
    }
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The node name is not valid (the rules of routine names).
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNode {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: NameError,
    },
    /// NATS could not be reached within the connect timeout.
    #[error("cannot reach NATS at {url} within {timeout:?}: {reason}")]
    Unreachable {
        /// The URL as given.
        url: String,
        /// The bound.
        timeout: Duration,
        /// What went wrong.
        reason: String,
    },
    /// Another live node has this name.
    #[error(
        "node name {node:?} is taken: a node of that name is live in the cluster (its lease \
         was renewed {seconds:.1}s ago; a node that died releases it within {lease}s). Choose \
         another --node"
    )]
    NodeTaken {
        /// The name.
        node: String,
        /// Seconds since the other node renewed its lease.
        seconds: f64,
        /// [`LEASE`] in seconds.
        lease: u64,
    },
    /// The orchestrator is already in a cluster.
    #[error("this orchestrator already joined a cluster")]
    AlreadyJoined,
    /// The ack wait is shorter than [`MIN_ACK_WAIT`].
    #[error(
        "ack-wait {} is too short: at least {} (it bounds how long a dead host holds its \
         messages; progress acks go every third of it)",
        humantime::format_duration(*.0),
        humantime::format_duration(MIN_ACK_WAIT)
    )]
    AckWait(Duration),
    /// A `[cluster]` setting is out of range.
    #[error("[cluster] {key}: {reason}")]
    Setting {
        /// The setting's key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A JetStream call failed while joining.
    #[error("NATS JetStream at {url}: {reason} (is the server started with -js?)")]
    JetStream {
        /// The URL.
        url: String,
        /// What failed.
        reason: String,
    },
}

/// One node as this node sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Its name.
    pub node: String,
    /// Its HTTP address (empty when it serves none).
    pub addr: String,
    /// Its live routines.
    pub routines: usize,
    /// Seconds since its lease was last renewed (0 for this node).
    pub last_seen_seconds: f64,
}

/// `GET /gorchestra/api/cluster`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterView {
    /// This node.
    pub node: String,
    /// Every live node, this one included, sorted by name.
    pub nodes: Vec<NodeInfo>,
}

/// `GET /gorchestra/api/cluster?routines=true`: [`ClusterView`] with each node's routines.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ClusterRoutines {
    /// This node.
    pub node: String,
    /// Every live node with its routines, sorted by name.
    pub nodes: Vec<NodeRoutines>,
}

/// One node and its routine snapshots.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NodeRoutines {
    /// The node.
    #[serde(flatten)]
    pub info: NodeInfo,
    /// Its routines' snapshots.
    #[serde(rename = "snapshots")]
    pub routines: Vec<crate::routine::Snapshot>,
    /// Why they could not be fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ClusterCore {
    /// How many times the client connected: counted before the connection state says
    /// connected (the event callback runs later), so a verdict never sees a new connection
    /// with an old count.
    pub(crate) fn epoch(&self) -> u64 {
        self.client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What a node shares with the others; each node keeps its own handle.
pub(crate) struct ClusterCore {
    pub(crate) node: String,
    pub(crate) node_token: String,
    pub(crate) url: String,
    pub(crate) ack_wait: Duration,
    pub(crate) message_bytes: u64,
    /// `[cluster] local-topics`, each split at its `*`s.
    pub(crate) local_topics: Vec<Vec<String>>,
    pub(crate) replicas: usize,
    pub(crate) http_addr: String,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
    pub(crate) orch: Weak<OrchInner>,
    pub(crate) registry: registry::Registry,
    pub(crate) topics: topics::Topics,
    /// Background work (watchers, heartbeat, services, acks of settled messages).
    pub(crate) tasks: TaskTracker,
    /// This node's lease as this node knows it (fences cluster-unique routines).
    pub(crate) lease: lease::Lease,
    /// Woken when the connection comes back (receives pull again at once).
    pub(crate) reconnected: Arc<tokio::sync::Notify>,
    /// Acks, naks and terms the server did not confirm after the retries (the message may
    /// be delivered again).
    pub(crate) acks_unconfirmed: std::sync::atomic::AtomicU64,
    /// Why JetStream does not answer while connected (a lost store being repaired).
    pub(crate) js_problem: parking_lot::Mutex<Option<String>>,
    /// Dead letters larger than NATS carries (dropped, never stored).
    pub(crate) dead_letters_dropped: std::sync::atomic::AtomicU64,
    /// One permit per topic message taken and not yet settled with a confirmed verdict
    /// (bounds the progress and verdict tasks: receives wait when none is left).
    pub(crate) in_flight: Arc<tokio::sync::Semaphore>,
    /// One permit per publish awaiting its acknowledgement ([`topics::PUBLISHING`]).
    pub(crate) publishing: tokio::sync::Semaphore,
    /// The ids of the sends from other nodes this node took.
    pub(crate) sends: rpc::Sends,
    pub(crate) stop: CancellationToken,
}

impl ClusterCore {
    /// True while the NATS connection is up.
    pub(crate) fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Whether `topic` is node-local (`[cluster] local-topics`).
    pub(crate) fn is_local(&self, topic: &str) -> bool {
        !self.local_topics.is_empty() && self.local_topics.iter().any(|p| glob(p, topic))
    }

    /// The largest message a publish or a send to another node carries: what NATS carries
    /// (the server's `max_payload`), less room for the headers.
    pub(crate) fn max_message(&self) -> usize {
        self.client.server_info().max_payload.saturating_sub(MESSAGE_OVERHEAD)
    }

    pub(crate) fn orch(&self) -> Option<Orchestrator> {
        self.orch.upgrade().map(Orchestrator::from_inner)
    }

    /// Runs `f` in the background until the node leaves (acks and naks of settled messages,
    /// dead letters: work that must not hold up the routine).
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(f);
    }

    pub(crate) fn view(&self) -> ClusterView {
        let local = self.orch().map(|o| o.routine_count()).unwrap_or(0);
        let mut nodes = self.registry.live_nodes();
        nodes.retain(|n| n.node != self.node);
        nodes.push(NodeInfo {
            node: self.node.clone(),
            addr: self.http_addr.clone(),
            routines: local,
            last_seen_seconds: 0.0,
        });
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        ClusterView { node: self.node.clone(), nodes }
    }
}

/// A node's membership in a cluster: made by [`Cluster::join`], ended by
/// [`Cluster::leave`] (after the orchestrator's shutdown, so settled messages are acked).
#[derive(Clone)]
pub struct Cluster {
    core: Arc<ClusterCore>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.core.node).finish()
    }
}

impl Cluster {
    /// The cluster `orch` joined, if any.
    pub fn of(orch: &Orchestrator) -> Option<Cluster> {
        let transport = orch.transport();
        let joined = transport.as_any().downcast_ref::<ClusterTransport>()?;
        Some(Cluster { core: joined.core.clone() })
    }

    /// Connects to NATS, claims the node name, loads the registry and attaches the cluster
    /// to `orch`: from then on its topics are cluster-wide and its sends reach routines on
    /// other nodes. Call it before spawning routines: a run that started before keeps the
    /// in-memory transport until it ends (its next run takes the cluster's).
    pub async fn join(orch: &Orchestrator, config: ClusterConfig) -> Result<Cluster, ClusterError> {
        validate_routine_name(&config.node)
            .map_err(|reason| ClusterError::InvalidNode { name: config.node.clone(), reason })?;
        if config.ack_wait < MIN_ACK_WAIT {
            return Err(ClusterError::AckWait(config.ack_wait));
        }
        if !(1..=5).contains(&config.replicas) {
            let reason =
                format!("{} is not 1 to 5 (JetStream keeps 1 to 5 copies)", config.replicas);
            return Err(ClusterError::Setting { key: "replicas", reason });
        }
        if let Some(p) = config.local_topics.iter().find(|p| p.is_empty()) {
            let reason = format!("{p:?} is empty (a topic name, or a pattern with *)");
            return Err(ClusterError::Setting { key: "local-topics", reason });
        }
        let reconnected = Arc::new(tokio::sync::Notify::new());
        let client = connect(&config, reconnected.clone()).await?;
        let js = jetstream::new(client.clone());
        let js_err = |reason: String| ClusterError::JetStream { url: config.url.clone(), reason };
        let node_token = token(&config.node);
        let registry =
            registry::Registry::open(&js, &config.node, config.replicas).await.map_err(js_err)?;
        let claimed = tokio::time::Instant::now();
        registry.claim_node(&config.url, &config.node, &node_token).await?;
        let core = Arc::new(ClusterCore {
            node: config.node.clone(),
            node_token,
            url: config.url.clone(),
            ack_wait: config.ack_wait,
            message_bytes: config
                .message_bytes
                .unwrap_or(crate::orchestrator::DEFAULT_MESSAGE_BYTES),
            local_topics: config
                .local_topics
                .iter()
                .map(|p| p.split('*').map(str::to_string).collect())
                .collect(),
            replicas: config.replicas,
            http_addr: config.http_addr.clone().unwrap_or_default(),
            client,
            js,
            orch: orch.downgrade(),
            registry,
            topics: topics::Topics::default(),
            tasks: TaskTracker::new(),
            dead_letters_dropped: Default::default(),
            js_problem: Default::default(),
            lease: lease::Lease::taken(claimed),
            reconnected,
            acks_unconfirmed: Default::default(),
            sends: Default::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            publishing: tokio::sync::Semaphore::new(topics::PUBLISHING),
            stop: CancellationToken::new(),
        });
        let transport = ClusterTransport::new(core.clone(), orch.local_transport());
        if !orch.set_transport(Arc::new(transport)) {
            core.registry.release_node(&core.node_token).await;
            return Err(ClusterError::AlreadyJoined);
        }
        let started = async {
            registry::start(&core).await?;
            rpc::serve(&core).await
        };
        if let Err(e) = started.await {
            core.stop.cancel();
            core.registry.release_node(&core.node_token).await;
            return Err(js_err(e));
        }
        topics::start_stats(&core);
        topics::start_sweeper(&core);
        tracing::info!(node = %core.node, "joined the cluster at {}", core.url);
        Ok(Cluster { core })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.core.node
    }

    /// Completes, with the reason, when this node lost its lease to another process of the
    /// same node name (this one was away, paused or cut off, past its lease): its
    /// cluster-unique routines are stopped and it answers no more requests from other
    /// nodes. The CLI then stops the host and exits non-zero.
    pub async fn lease_lost(&self) -> String {
        self.core.lease.lost().await;
        self.core.lease.lost_reason().unwrap_or_default()
    }

    /// True while the NATS connection is up (`/readyz` is 503 otherwise).
    pub fn is_connected(&self) -> bool {
        self.core.connected()
    }

    /// The live nodes as this node sees them.
    pub fn view(&self) -> ClusterView {
        self.core.view()
    }

    /// The other live nodes that run a routine named `name` (from the registry).
    pub fn nodes_running(&self, name: &str) -> Vec<String> {
        self.core.registry.holders(name)
    }

    /// The NATS URL.
    pub fn url(&self) -> &str {
        &self.core.url
    }

    /// [`view`](Self::view) with each node's routine snapshots, fetched through NATS
    /// request/reply (a node that does not answer within 2 s gets an `error` instead).
    pub async fn view_with_routines(&self) -> ClusterRoutines {
        let view = self.view();
        let fetches = view.nodes.into_iter().map(|info| async move {
            let r = rpc::snapshots(&self.core, &info.node).await;
            let (routines, error) = match r {
                Ok(s) => (s, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            NodeRoutines { info, routines, error }
        });
        ClusterRoutines { node: view.node, nodes: futures::future::join_all(fetches).await }
    }

    /// Leaves the cluster within [`DEFAULT_LEAVE_BOUND`] (see
    /// [`leave_within`](Self::leave_within)). Call it after the orchestrator's shutdown.
    pub async fn leave(&self) {
        self.leave_within(DEFAULT_LEAVE_BOUND).await
    }

    /// Leaves the cluster, returning within `bound` whatever NATS does: sends the acks of
    /// the last settled messages, removes this node's registry entries and lease, and closes
    /// the connection. While NATS is unreachable the clean-up is skipped (the lease and the
    /// entries then expire by themselves within [`LEASE`]); what the bound cuts short is
    /// logged. Call it after the orchestrator's shutdown.
    pub async fn leave_within(&self, bound: Duration) {
        let core = &self.core;
        let deadline = tokio::time::Instant::now() + bound;
        // Messages fetched ahead for receives that are gone: to another node at once.
        topics::hand_back_all(core);
        core.tasks.close();
        // Background loops end with `stop`; the one-shot ack tasks end by themselves.
        core.stop.cancel();
        let acks = (deadline - bound / 2).max(tokio::time::Instant::now());
        if tokio::time::timeout_at(acks, core.tasks.wait()).await.is_err() {
            tracing::warn!("leaving the cluster before every ack was sent (they are redelivered)");
        }
        if !core.connected() {
            tracing::warn!(
                node = %core.node,
                "NATS is unreachable: leaving without removing this node's entries (its lease \
                 expires within {}s)",
                LEASE.as_secs()
            );
        } else if tokio::time::timeout_at(deadline, core.registry.leave(core)).await.is_err() {
            tracing::warn!(
                node = %core.node,
                "the registry clean-up did not finish within the bound (this node's lease \
                 expires within {}s)",
                LEASE.as_secs()
            );
        }
        let _ = tokio::time::timeout_at(deadline, core.client.flush()).await;
        let _ = tokio::time::timeout_at(deadline, core.client.drain()).await;
        tracing::info!(node = %core.node, "left the cluster");
    }
}

async fn connect(
    config: &ClusterConfig,
    reconnected: Arc<tokio::sync::Notify>,
) -> Result<async_nats::Client, ClusterError> {
    let unreachable = |reason: String| ClusterError::Unreachable {
        url: config.url.clone(),
        timeout: config.connect_timeout,
        reason,
    };
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("gorch-host {}", config.node))
        .connection_timeout(config.connect_timeout)
        // Publishes made while disconnected wait in this bounded buffer, then block.
        .client_capacity(4096)
        .event_callback(move |event| {
            let reconnected = reconnected.clone();
            async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!(
                        "lost the NATS connection; reconnecting (local work goes on)"
                    ),
                    async_nats::Event::Connected => {
                        tracing::info!("NATS connection back");
                        // Pulls sent before were lost with the connection: ask again now.
                        reconnected.notify_waiters();
                    }
                    other => tracing::debug!("NATS: {other}"),
                }
            }
        });
    if let Some(token) = &config.token {
        opts = opts.token(token.clone());
    }
    if let Some(creds) = &config.creds {
        opts = opts
            .credentials_file(creds)
            .await
            .map_err(|e| unreachable(format!("credentials file {}: {e}", creds.display())))?;
    }
    let servers = config
        .url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreachable(format!("invalid URL: {e}")))?;
    match tokio::time::timeout(config.connect_timeout, opts.connect(servers)).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Err(_) => Err(unreachable("timed out".into())),
    }
}

/// `name` as one NATS subject token, stream-name part and key-value key part: ASCII letters,
/// digits and `-` stay, every other byte is `_` and two hex digits. Long names are hashed.
pub(crate) fn token(name: &str) -> String {
    let mut t = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' {
            t.push(b as char);
        } else {
            t.push_str(&format!("_{b:02x}"));
        }
    }
    if t.len() > 160 {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(name.as_bytes());
        t = format!("_h{}", digest.iter().take(20).map(|b| format!("{b:02x}")).collect::<String>());
    }
    t
}

/// The reverse of [`token`] (hashed tokens have no reverse).
pub(crate) fn untoken(t: &str) -> Option<String> {
    let bytes = t.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'_' {
            let hex = t.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A send target: `node/name` or a plain name.
pub(crate) fn split_address(to: &str) -> (Option<&str>, &str) {
    match to.split_once('/') {
        Some((node, name)) => (Some(node), name),
        None => (None, to),
    }
}

/// The most topic messages a node has taken and not yet settled (with the server's
/// confirmation): more receives wait.
const IN_FLIGHT: usize = 4096;

/// Whether `name` matches a pattern given as its parts between `*`s (`*` matches any run
/// of characters).
pub(crate) fn glob(parts: &[String], name: &str) -> bool {
    let Some((first, parts)) = parts.split_first() else { return name.is_empty() };
    if !same_bytes(name.bytes().take(first.len()), first.bytes()) || name.len() < first.len() {
        return false;
    }
    let mut rest = &name[first.len()..];
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part.as_str()) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && same_bytes(rest.bytes().rev().take(last.len()), last.bytes().rev())
}

/// Whether two byte sequences are equal, compared one by one: a pattern's parts and topic
/// names are short, and this runs on every call of a node-local topic (a call to `memcmp`
/// each time cost about a fifth of such a topic's message rate here).
fn same_bytes(a: impl Iterator<Item = u8>, mut b: impl Iterator<Item = u8>) -> bool {
    for x in a {
        if b.next() != Some(x) {
            return false;
        }
    }
    b.next().is_none()
}

/// Room kept in a NATS message for its headers (a message id, a routine name).
const MESSAGE_OVERHEAD: usize = 512;

/// Awaits `call`; when `cancel` fires first, gives it `grace` more to answer (a request
/// under way may have been taken: its answer says whether). `None`: no answer by then.
pub(crate) async fn answer_or_grace<T>(
    call: impl Future<Output = T>,
    cancel: &CancellationToken,
    grace: Duration,
) -> Option<T> {
    tokio::pin!(call);
    tokio::select! {
        biased;
        r = &mut call => Some(r),
        _ = cancel.cancelled() => tokio::time::timeout(grace, call).await.ok(),
    }
}

/// Maps a transport failure to what a routine sees.
pub(crate) fn closed(what: impl std::fmt::Display) -> CallError {
    tracing::debug!("cluster call failed: {what}");
    CallError::Closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_subject_safe_and_reversible() {
        for name in ["jobs", "a.b", "x y", "é/ü", "a_b", "*>", "dead-letter"] {
            let t = token(name);
            assert!(t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{t}");
            assert_eq!(untoken(&t).as_deref(), Some(name));
        }
        assert_ne!(token("a.b"), token("a_b"));
        let long = "x".repeat(200);
        assert!(token(&long).len() < 50);
    }

    fn glob(pattern: &str, name: &str) -> bool {
        let parts: Vec<String> = pattern.split('*').map(str::to_string).collect();
        super::glob(&parts, name)
    }

    #[test]
    fn local_topic_patterns_match_names_and_stars() {
        assert!(glob("progress", "progress"));
        assert!(!glob("progress", "progress2"));
        assert!(glob("metrics.*", "metrics.cpu"));
        assert!(glob("metrics.*", "metrics."));
        assert!(!glob("metrics.*", "metric"));
        assert!(glob("*.tmp", "a.b.tmp"));
        assert!(glob("a*b*c", "aXbYc"));
        assert!(!glob("a*b*c", "aXcYb"));
        assert!(!glob("ab*ba", "aba"));
        assert!(glob("*", "anything"));
    }

    #[test]
    fn addresses_split_on_the_first_slash() {
        assert_eq!(split_address("b/echo"), (Some("b"), "echo"));
        assert_eq!(split_address("echo"), (None, "echo"));
    }
}
