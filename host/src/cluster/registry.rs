//! Which node runs which routine, and which nodes are alive.
//!
//! Two JetStream key-value buckets:
//! - `gorch-nodes`: one entry per node (key: the node's token), renewed every
//!   [`HEARTBEAT`] with its HTTP address and routine count; the bucket's `max_age` is
//!   [`LEASE`], so a node that dies loses its entry (its *lease*) within [`LEASE`], and a
//!   node that stops deletes it. A node is live while its entry was renewed within [`LEASE`].
//! - `gorch-routines`: `r=<name>=<node>` for each routine a node runs (held only while that
//!   node's lease lives; removed when the routine ends or the node stops), and `u=<name>` the
//!   claim of a `cluster-unique` name (compare-and-set, taken over from a dead node).
//!
//! Every node watches both buckets and keeps a view in memory, so looking a name up costs
//! no round trip.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use parking_lot::{Mutex, RwLock};

use super::{ClusterCore, ClusterError, HEARTBEAT, LEASE, NodeInfo, token};

const NODES_BUCKET: &str = "gorch-nodes";
const ROUTINES_BUCKET: &str = "gorch-routines";

/// A node's lease entry.
#[derive(serde::Serialize, serde::Deserialize)]
struct NodeRecord {
    node: String,
    addr: String,
    routines: usize,
    /// Milliseconds since the Unix epoch when written (the age shown on a name clash).
    at: u64,
    /// The process that wrote it (random per process): tells this process's own lease
    /// from another's of the same node name.
    #[serde(default)]
    boot: u64,
}

/// A routine's registry entry.
#[derive(serde::Serialize, serde::Deserialize)]
struct RoutineRecord {
    name: String,
    node: String,
    unique: bool,
}

struct Seen {
    record: NodeRecord,
    at: Instant,
}

#[derive(Default)]
struct View {
    /// Node name -> its last lease renewal.
    nodes: HashMap<String, Seen>,
    /// Node key -> node name (to apply deletes).
    node_keys: HashMap<String, String>,
    /// Routine name -> node -> cluster-unique.
    names: HashMap<String, HashMap<String, bool>>,
    /// Routine key -> (name, node).
    routine_keys: HashMap<String, (String, String)>,
}

impl View {
    fn live(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|s| s.at.elapsed() < LEASE)
    }
}

/// What a lease renewal found.
pub(crate) enum Renewal {
    /// Renewed.
    Renewed,
    /// It had expired, and nobody took it: taken again.
    Retaken,
    /// An earlier renewal of this process was stored but its answer lost: its revision is
    /// taken (the next renewal counts).
    Adopted,
    /// Another process of this node's name holds it.
    Lost(String),
    /// The server did not answer (why).
    Failed(String),
}

#[derive(Clone)]
enum Event {
    Register { name: String, unique: bool },
    Unregister { name: String },
}

/// The registrations not applied yet: the latest event per name, names in order.
#[derive(Default)]
struct Pending {
    latest: HashMap<String, Event>,
    order: std::collections::VecDeque<String>,
}

impl Pending {
    /// Queues `event` for `name`, replacing one not applied yet.
    fn push(&mut self, name: &str, event: Event) {
        if self.latest.insert(name.to_string(), event).is_none() {
            self.order.push_back(name.to_string());
        }
    }

    /// Queues `event` for `name` unless a later change of the name waits already.
    fn push_unless_pending(&mut self, name: &str, event: Event) {
        if !self.latest.contains_key(name) {
            self.push(name, event);
        }
    }

    fn pop(&mut self) -> Option<Event> {
        let name = self.order.pop_front()?;
        self.latest.remove(&name)
    }
}

pub(crate) struct Registry {
    nodes: kv::Store,
    routines: kv::Store,
    node: String,
    view: RwLock<View>,
    /// Registrations not applied yet, the latest per name, oldest name first (bounded by
    /// the number of names: a name that comes and goes while NATS is away is one entry).
    pending: Mutex<Pending>,
    pending_added: tokio::sync::Notify,
    /// Routine keys this node wrote, with the name and whether it is cluster-unique
    /// (re-asserted after a repair, removed when it leaves).
    mine: Mutex<HashMap<String, (String, bool)>>,
    /// The cluster-unique routines of this node, known at once (registration is queued).
    unique_here: Mutex<HashSet<String>>,
    /// Those whose claim this node holds (their receives wait until then).
    claimed: Mutex<HashSet<String>>,
    claims_changed: tokio::sync::Notify,
    /// The revision of this node's lease entry: renewals are compare-and-set on it.
    lease_rev: AtomicU64,
    /// This process's part of its lease record.
    boot: u64,
    /// Bumped when the buckets were created again (a server that lost its store): the
    /// watches start over (theirs would wait for the old sequence numbers).
    rewatch: tokio::sync::watch::Sender<u64>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Gets or creates a key-value bucket. The stream is created here with the settings
/// `create_key_value` would use: async-nats 0.51's `create_key_value` first reads the
/// account info, whose reply from nats-server 2.9 (Debian's) it cannot parse.
async fn bucket(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(&config.bucket).await {
        return Ok(store);
    }
    let stream = jetstream::stream::Config {
        name: format!("KV_{}", config.bucket),
        description: Some(config.description.clone()),
        subjects: vec![format!("$KV.{}.>", config.bucket)],
        max_messages_per_subject: config.history.max(1),
        max_age: config.max_age,
        storage: config.storage,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: config.num_replicas,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    // Another node may create it meanwhile: then the get below finds it.
    let created = js.create_stream(stream).await;
    js.get_key_value(&config.bucket).await.map_err(|e| match created {
        Err(c) => format!("cannot create the key-value bucket {}: {c}", config.bucket),
        Ok(_) => format!("cannot open the key-value bucket {}: {e}", config.bucket),
    })
}

/// The settings of the two buckets, with `replicas` copies.
fn bucket_configs(replicas: usize) -> [kv::Config; 2] {
    [
        kv::Config {
            bucket: NODES_BUCKET.into(),
            description: "gorch-host node leases".into(),
            history: 1,
            max_age: LEASE,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
        kv::Config {
            bucket: ROUTINES_BUCKET.into(),
            description: "gorch-host routine registry".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        },
    ]
}

impl Registry {
    pub(crate) async fn open(
        js: &jetstream::Context,
        node: &str,
        replicas: usize,
    ) -> Result<Registry, String> {
        let [nodes, routines] = bucket_configs(replicas);
        let nodes = bucket(js, nodes).await?;
        let routines = bucket(js, routines).await?;
        Ok(Registry {
            nodes,
            routines,
            node: node.to_string(),
            view: RwLock::default(),
            pending: Mutex::default(),
            pending_added: tokio::sync::Notify::new(),
            mine: Mutex::default(),
            unique_here: Mutex::default(),
            claimed: Mutex::default(),
            claims_changed: tokio::sync::Notify::new(),
            lease_rev: AtomicU64::new(0),
            rewatch: tokio::sync::watch::Sender::new(0),
            boot: rand::random(),
        })
    }

    fn record(&self, addr: &str, routines: usize) -> bytes::Bytes {
        let r = NodeRecord {
            node: self.node.clone(),
            addr: addr.into(),
            routines,
            at: now_ms(),
            boot: self.boot,
        };
        serde_json::to_vec(&r).unwrap_or_default().into()
    }

    /// Takes the lease of `node`, refused while another live node holds it.
    pub(crate) async fn claim_node(
        &self,
        url: &str,
        node: &str,
        key: &str,
    ) -> Result<(), ClusterError> {
        match self.nodes.create(key, self.record("", 0)).await {
            Ok(rev) => {
                self.lease_rev.store(rev, Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let at = match self.nodes.get(key).await {
                    Ok(Some(v)) => serde_json::from_slice::<NodeRecord>(&v).map(|r| r.at).ok(),
                    _ => None,
                };
                let seconds = at.map(|at| now_ms().saturating_sub(at) as f64 / 1000.0);
                Err(ClusterError::NodeTaken {
                    node: node.to_string(),
                    seconds: seconds.unwrap_or(0.0),
                    lease: LEASE.as_secs(),
                })
            }
            Err(e) => Err(ClusterError::JetStream {
                url: url.to_string(),
                reason: format!("cannot take the lease of node {node:?}: {e}"),
            }),
        }
    }

    /// Gives the lease back (a clean stop), if it is still this process's.
    pub(crate) async fn release_node(&self, key: &str) {
        let rev = Some(self.lease_rev.load(Relaxed));
        if let Err(e) = self.nodes.delete_expect_revision(key, rev).await {
            tracing::warn!("cannot release this node's lease: {e}");
        }
    }

    /// Renews the lease (compare-and-set on its revision).
    pub(crate) async fn renew(&self, core: &ClusterCore) -> Renewal {
        let count = core.orch().map(|o| o.routine_count()).unwrap_or(0);
        let record = self.record(&core.http_addr, count);
        let rev = self.lease_rev.load(Relaxed);
        match self.nodes.update(&core.node_token, record.clone(), rev).await {
            Ok(rev) => {
                self.lease_rev.store(rev, Relaxed);
                Renewal::Renewed
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Our own earlier write whose answer was lost: adopt its revision.
                if let Ok(Some(entry)) = self.nodes.entry(core.node_token.clone()).await
                    && entry.operation == kv::Operation::Put
                    && serde_json::from_slice::<NodeRecord>(&entry.value)
                        .is_ok_and(|r| r.boot == self.boot)
                {
                    self.lease_rev.store(entry.revision, Relaxed);
                    return Renewal::Adopted;
                }
                // It expired (this process was away past its lease), or another process of
                // this name took it meanwhile.
                match self.nodes.create(&core.node_token, record).await {
                    Ok(rev) => {
                        self.lease_rev.store(rev, Relaxed);
                        Renewal::Retaken
                    }
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        Renewal::Lost(format!(
                            "the lease of node {:?} was taken by another process while this one \
                             was away past its lease ({}s): this one stops",
                            self.node,
                            LEASE.as_secs()
                        ))
                    }
                    Err(e) => Renewal::Failed(e.to_string()),
                }
            }
            Err(e) => Renewal::Failed(e.to_string()),
        }
    }

    /// Whether `name` is a cluster-unique routine of this node.
    pub(crate) fn is_unique_here(&self, name: &str) -> bool {
        self.unique_here.lock().contains(name)
    }

    /// Whether this node holds the claim of the cluster-unique name `name`.
    pub(crate) fn holds_claim(&self, name: &str) -> bool {
        self.claimed.lock().contains(name)
    }

    fn set_claimed(&self, name: &str, held: bool) {
        let changed = if held {
            self.claimed.lock().insert(name.to_string())
        } else {
            self.claimed.lock().remove(name)
        };
        if changed {
            self.claims_changed.notify_waiters();
        }
    }

    /// Waits until this node holds the claim of `name` (a routine that lost it is stopped:
    /// `cancel` fires).
    pub(crate) async fn wait_claimed(
        &self,
        name: &str,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<(), crate::transport::CallError> {
        loop {
            let changed = self.claims_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.holds_claim(name) {
                return Ok(());
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(crate::transport::CallError::Cancelled),
                _ = changed => {}
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    /// After a lapse: stops each cluster-unique routine of this node whose claim another
    /// node took meanwhile. A claim that cannot be read now counts as not held (its
    /// routine's receives wait) until [`claim_missing`](Self::claim_missing) settles it.
    pub(crate) async fn verify_claims(&self, core: &ClusterCore) {
        let unique: Vec<String> = self.unique_here.lock().iter().cloned().collect();
        for name in unique {
            let key = format!("u={}", token(&name));
            let Ok(Some(mut entry)) = self.routines.entry(key.clone()).await else {
                self.set_claimed(&name, false);
                continue;
            };
            if entry.operation == kv::Operation::Put && entry.value.as_ref() == self.node.as_bytes()
            {
                // Still ours: touched with compare-and-set, so that a node taking it over
                // with the revision it read fails (or this touch fails, if it came first).
                let me = bytes::Bytes::from(self.node.clone().into_bytes());
                match self.routines.update(&key, me, entry.revision).await {
                    Ok(_) => continue,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        match self.routines.entry(key.clone()).await {
                            Ok(Some(now)) => entry = now,
                            _ => {
                                self.set_claimed(&name, false);
                                continue;
                            }
                        }
                    }
                    Err(_) => {
                        // Checked again at the next heartbeat (`claim_missing`).
                        self.set_claimed(&name, false);
                        continue;
                    }
                }
            }
            let owner = String::from_utf8_lossy(&entry.value).into_owned();
            if entry.operation == kv::Operation::Put && owner != self.node {
                let reason = format!(
                    "routine {name:?} is cluster-unique and node {owner:?} took it over while \
                     this node was away past its lease: this copy stops"
                );
                tracing::error!("{reason}");
                self.unique_here.lock().remove(&name);
                self.set_claimed(&name, false);
                if let Some(h) = core.orch().and_then(|o| o.get_by_name(&name)) {
                    h.fail_and_stop(reason);
                }
            }
        }
    }

    /// A claim changed: if another node now holds one this node held, this node's copy
    /// stops (at once, from the watch: it takes no message without the claim).
    fn seen_claim(&self, core: &ClusterCore, tok: &str, entry: &kv::Entry) {
        if entry.operation != kv::Operation::Put {
            return;
        }
        let owner = String::from_utf8_lossy(&entry.value);
        let Some(name) = super::untoken(tok) else { return };
        if owner == self.node || !self.holds_claim(&name) {
            return;
        }
        let reason = format!(
            "routine {name:?} is cluster-unique and node {owner:?} took it over while this node \
             was away past its lease: this copy stops"
        );
        tracing::error!("{reason}");
        self.set_claimed(&name, false);
        self.unique_here.lock().remove(&name);
        if let Some(h) = core.orch().and_then(|o| o.get_by_name(&name)) {
            h.fail_and_stop(reason);
        }
    }

    /// Whether `node` holds a live lease, asked of the server (not the local view, which
    /// a paused process finds stale).
    async fn holds_lease(&self, node: &str) -> bool {
        !matches!(self.nodes.get(token(node)).await, Ok(None))
    }

    /// Claims the cluster-unique names of this node it does not hold yet (a claim that
    /// failed for want of an answer is tried again at each heartbeat).
    pub(crate) async fn claim_missing(&self, core: &ClusterCore) {
        // Only names whose registration was applied (the queue claims the others).
        let missing: Vec<String> = {
            let claimed = self.claimed.lock();
            self.mine
                .lock()
                .values()
                .filter(|(name, unique)| *unique && !claimed.contains(name))
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in missing {
            self.claim_unique(core, &name).await;
        }
    }

    /// The lease is lost to another process of this name: this node's cluster-unique
    /// routines stop at once (the other process runs them).
    pub(crate) fn fence(&self, core: &ClusterCore, reason: String) {
        tracing::error!(node = %self.node, "{reason}");
        core.lease.lose(reason.clone());
        self.claimed.lock().clear();
        self.claims_changed.notify_waiters();
        let unique: Vec<String> = self.unique_here.lock().drain().collect();
        for name in unique {
            if let Some(h) = core.orch().and_then(|o| o.get_by_name(&name)) {
                h.fail_and_stop(reason.clone());
            }
        }
    }

    /// The other live node running `name` that forbids this node to run it too (`unique`:
    /// this one is cluster-unique), if any.
    pub(crate) fn conflict(&self, name: &str, unique: bool) -> Option<String> {
        let view = self.view.read();
        let holders = view.names.get(name)?;
        holders
            .iter()
            .filter(|(node, _)| **node != self.node && view.live(node))
            .find(|(_, other_unique)| unique || **other_unique)
            .map(|(node, _)| node.clone())
    }

    /// Live nodes other than this one that run `name`.
    pub(crate) fn holders(&self, name: &str) -> Vec<String> {
        let view = self.view.read();
        let mut v: Vec<String> = view
            .names
            .get(name)
            .map(|h| {
                h.keys().filter(|n| **n != self.node && view.live(n)).cloned().collect::<Vec<_>>()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// True when `node` holds a live lease.
    pub(crate) fn is_live(&self, node: &str) -> bool {
        self.view.read().live(node)
    }

    pub(crate) fn live_nodes(&self) -> Vec<NodeInfo> {
        let view = self.view.read();
        view.nodes
            .values()
            .filter(|s| s.at.elapsed() < LEASE)
            .map(|s| NodeInfo {
                node: s.record.node.clone(),
                addr: s.record.addr.clone(),
                routines: s.record.routines,
                last_seen_seconds: s.at.elapsed().as_secs_f64(),
            })
            .collect()
    }

    pub(crate) fn register(&self, name: &str, unique: bool) {
        if unique {
            self.unique_here.lock().insert(name.to_string());
        }
        self.queue(name, Event::Register { name: name.to_string(), unique });
    }

    /// Queues `event` for `name`, replacing one not applied yet.
    fn queue(&self, name: &str, event: Event) {
        self.pending.lock().push(name, event);
        self.pending_added.notify_one();
    }

    pub(crate) fn unregister(&self, name: &str) {
        self.unique_here.lock().remove(name);
        self.set_claimed(name, false);
        self.queue(name, Event::Unregister { name: name.to_string() });
    }

    fn routine_key(&self, name: &str) -> String {
        format!("r={}={}", token(name), token(&self.node))
    }

    /// Writes `event` to the registry; false when the server did not take it (to be tried
    /// again).
    async fn apply(&self, core: &ClusterCore, event: Event) -> bool {
        if core.lease.lost_reason().is_some() {
            // The entries of this node's name are another process's now.
            return true;
        }
        match event {
            Event::Register { name, unique } => {
                if unique && !self.unique_here.lock().contains(&name) {
                    // Unregistered before this registration was applied.
                    return true;
                }
                let key = self.routine_key(&name);
                let rec = RoutineRecord { name: name.clone(), node: self.node.clone(), unique };
                let value: bytes::Bytes = serde_json::to_vec(&rec).unwrap_or_default().into();
                self.mine.lock().insert(key.clone(), (name.clone(), unique));
                if let Err(e) = self.routines.put(&key, value).await {
                    tracing::warn!(
                        routine = %name,
                        "cannot register in the cluster (tried again in a second): {e}"
                    );
                    return false;
                }
                if unique {
                    self.claim_unique(core, &name).await;
                }
                true
            }
            Event::Unregister { name } => {
                self.set_claimed(&name, false);
                let key = self.routine_key(&name);
                self.mine.lock().remove(&key);
                if self.routines.delete(&key).await.is_err() {
                    return false;
                }
                let claim = format!("u={}", token(&name));
                if let Ok(Some(owner)) = self.routines.get(&claim).await
                    && owner.as_ref() == self.node.as_bytes()
                {
                    return self.routines.delete(&claim).await.is_ok();
                }
                true
            }
        }
    }

    /// Claims a cluster-unique name (compare-and-set): taken over from this node's previous
    /// life or a dead node; lost to a live node (two nodes started it in the same instant),
    /// the routine here is stopped with the reason.
    async fn claim_unique(&self, core: &ClusterCore, name: &str) {
        let key = format!("u={}", token(name));
        let me = bytes::Bytes::from(self.node.clone().into_bytes());
        if self.routines.create(&key, me.clone()).await.is_ok() {
            self.set_claimed(name, true);
            return;
        }
        let Ok(Some(entry)) = self.routines.entry(key.clone()).await else { return };
        let owner = String::from_utf8_lossy(&entry.value).into_owned();
        let gone = !self.is_live(&owner);
        let takeable = entry.operation != kv::Operation::Put
            || owner == self.node
            || (gone && !self.holds_lease(&owner).await);
        if !takeable && gone {
            // The server still holds the owner's lease (its expiry lags this node's view):
            // the claim is tried again at the next heartbeat.
            return;
        }
        if takeable && self.routines.update(&key, me, entry.revision).await.is_ok() {
            self.set_claimed(name, true);
            return;
        }
        if let Ok(Some(now)) = self.routines.get(key.clone()).await
            && now.as_ref() == self.node.as_bytes()
        {
            // Claimed for this node meanwhile (another attempt of its own).
            self.set_claimed(name, true);
            return;
        }
        let reason = format!(
            "routine {name:?} also runs on node {owner:?}: it is cluster-unique (its plugin says \
             cluster-unique = true: one node only)"
        );
        tracing::error!("{reason}");
        if let Some(h) = core.orch().and_then(|o| o.get_by_name(name)) {
            h.fail_and_stop(reason);
        }
    }

    /// The buckets are gone from the server (it lost its store): creates them again, takes
    /// this node's lease again and re-asserts its routines and claims.
    async fn repair(&self, core: &ClusterCore) {
        tracing::warn!(
            node = %self.node,
            "the registry buckets do not answer (did nats-server lose its store?): creating \
             them again and re-registering this node's routines"
        );
        for config in bucket_configs(core.replicas) {
            if let Err(e) = bucket(&core.js, config).await {
                tracing::warn!("registry repair: {e}");
                return;
            }
        }
        let count = core.orch().map(|o| o.routine_count()).unwrap_or(0);
        match self.nodes.create(&core.node_token, self.record(&core.http_addr, count)).await {
            Ok(rev) => self.lease_rev.store(rev, Relaxed),
            Err(e) => {
                tracing::warn!("registry repair: cannot take this node's lease again: {e}");
                return;
            }
        }
        *core.js_problem.lock() = None;
        self.store_reset();
        tracing::info!(node = %self.node, "registry repaired");
    }

    /// This node's lease entry was gone (it expired while the process was away, or the
    /// buckets were created again: a server that lost its store, repaired by this node or
    /// another): the watches start over and this node's routines are registered again.
    fn store_reset(&self) {
        tracing::info!(
            node = %self.node,
            "reading the registry anew and registering this node's routines again"
        );
        self.rewatch.send_modify(|n| *n += 1);
        // Through the queue, behind any change of the same name not applied yet.
        let mine: Vec<(String, bool)> = self.mine.lock().values().cloned().collect();
        let mut pending = self.pending.lock();
        for (name, unique) in mine {
            pending.push_unless_pending(&name.clone(), Event::Register { name, unique });
        }
        drop(pending);
        self.pending_added.notify_one();
    }

    /// Removes every entry of this node and its lease (a clean stop); nothing when the lease
    /// was lost (the entries are the other process's now).
    pub(crate) async fn leave(&self, core: &ClusterCore) {
        if core.lease.lost_reason().is_some() {
            return;
        }
        let names: Vec<String> = {
            let view = self.view.read();
            view.routine_keys
                .values()
                .filter(|(_, node)| *node == self.node)
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in names {
            self.apply(core, Event::Unregister { name }).await;
        }
        let mine: Vec<String> = self.mine.lock().drain().map(|(k, _)| k).collect();
        for key in mine {
            let _ = self.routines.delete(&key).await;
        }
        self.release_node(&core.node_token).await;
    }

    /// Forgets the nodes whose keys are not in `keys` (a bucket read anew).
    fn keep_nodes(&self, keys: &HashSet<String>) {
        let mut view = self.view.write();
        let gone: Vec<String> =
            view.node_keys.keys().filter(|k| !keys.contains(*k)).cloned().collect();
        for key in gone {
            if let Some(node) = view.node_keys.remove(&key) {
                view.nodes.remove(&node);
            }
        }
    }

    /// Forgets the routine entries whose keys are not in `keys` (a bucket read anew).
    fn keep_routines(&self, keys: &HashSet<String>) {
        let mut view = self.view.write();
        let gone: Vec<String> =
            view.routine_keys.keys().filter(|k| !keys.contains(*k)).cloned().collect();
        for key in gone {
            if let Some((name, node)) = view.routine_keys.remove(&key)
                && let Some(h) = view.names.get_mut(&name)
            {
                h.remove(&node);
                if h.is_empty() {
                    view.names.remove(&name);
                }
            }
        }
    }

    fn seen_node(&self, entry: &kv::Entry) {
        let mut view = self.view.write();
        match entry.operation {
            kv::Operation::Put => {
                if let Ok(record) = serde_json::from_slice::<NodeRecord>(&entry.value) {
                    view.node_keys.insert(entry.key.clone(), record.node.clone());
                    let node = record.node.clone();
                    view.nodes.insert(node, Seen { record, at: Instant::now() });
                }
            }
            _ => {
                if let Some(node) = view.node_keys.remove(&entry.key) {
                    view.nodes.remove(&node);
                }
            }
        }
    }

    fn seen_routine(&self, core: &ClusterCore, entry: &kv::Entry) {
        if let Some(tok) = entry.key.strip_prefix("u=") {
            self.seen_claim(core, tok, entry);
            return;
        }
        if !entry.key.starts_with("r=") {
            return;
        }
        let mut view = self.view.write();
        match entry.operation {
            kv::Operation::Put => {
                if let Ok(r) = serde_json::from_slice::<RoutineRecord>(&entry.value) {
                    view.routine_keys.insert(entry.key.clone(), (r.name.clone(), r.node.clone()));
                    view.names.entry(r.name).or_default().insert(r.node, r.unique);
                }
            }
            _ => {
                if let Some((name, node)) = view.routine_keys.remove(&entry.key)
                    && let Some(h) = view.names.get_mut(&name)
                {
                    h.remove(&node);
                    if h.is_empty() {
                        view.names.remove(&name);
                    }
                }
            }
        }
    }
}

/// Starts the watchers (and waits until they have loaded the buckets), removes what a
/// previous life of this node left behind, then starts the heartbeat and the registration
/// queue.
pub(crate) async fn start(core: &Arc<ClusterCore>) -> Result<(), String> {
    let reg = &core.registry;
    let (nodes_synced, routines_synced) = tokio::join!(
        watch(core, &reg.nodes, |c, e| c.registry.seen_node(e), |c, k| c.registry.keep_nodes(k)),
        watch(
            core,
            &reg.routines,
            |c, e| c.registry.seen_routine(c, e),
            |c, k| c.registry.keep_routines(k)
        ),
    );
    let (nodes_synced, routines_synced) = (nodes_synced?, routines_synced?);
    let load = async {
        let _ = nodes_synced.await;
        let _ = routines_synced.await;
    };
    if tokio::time::timeout(Duration::from_secs(10), load).await.is_err() {
        return Err("timed out loading the registry".into());
    }
    let stale: Vec<String> = {
        let view = reg.view.read();
        view.routine_keys
            .iter()
            .filter(|(_, (_, node))| *node == reg.node)
            .map(|(k, _)| k.clone())
            .collect()
    };
    for key in stale {
        let _ = reg.routines.delete(&key).await;
    }
    let hb = core.clone();
    core.tasks.spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                _ = hb.stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let sent = tokio::time::Instant::now();
            let lapsed = hb.lease.lapsed();
            match hb.registry.renew(&hb).await {
                Renewal::Renewed => {
                    *hb.js_problem.lock() = None;
                    if lapsed {
                        hb.registry.verify_claims(&hb).await;
                    }
                    hb.lease.renewed(sent);
                    hb.registry.claim_missing(&hb).await;
                }
                Renewal::Retaken => {
                    *hb.js_problem.lock() = None;
                    tracing::warn!(
                        node = %hb.node,
                        "this node's lease had expired (was the process paused?): taken again; \
                         checking the claims of its cluster-unique routines"
                    );
                    hb.registry.verify_claims(&hb).await;
                    hb.lease.renewed(sent);
                    hb.registry.store_reset();
                    hb.registry.claim_missing(&hb).await;
                }
                Renewal::Adopted => *hb.js_problem.lock() = None,
                Renewal::Lost(reason) => {
                    hb.registry.fence(&hb, reason);
                    break;
                }
                Renewal::Failed(e) => {
                    tracing::debug!("lease renewal failed: {e}");
                    if hb.connected() {
                        // Connected but the bucket does not answer: the server lost its
                        // store (or the bucket was deleted).
                        *hb.js_problem.lock() = Some(e);
                        hb.registry.repair(&hb).await;
                    }
                }
            }
        }
    });
    let q = core.clone();
    core.tasks.spawn(async move {
        loop {
            let next = q.registry.pending.lock().pop();
            let Some(event) = next else {
                tokio::select! {
                    _ = q.stop.cancelled() => break,
                    _ = q.registry.pending_added.notified() => continue,
                }
            };
            let name = match &event {
                Event::Register { name, .. } | Event::Unregister { name } => name.clone(),
            };
            if !q.registry.apply(&q, event.clone()).await {
                // Not taken (NATS away, a bucket being created again): again, unless the
                // name changed meanwhile.
                q.registry.pending.lock().push_unless_pending(&name, event);
                tokio::select! {
                    _ = q.stop.cancelled() => break,
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                }
            }
        }
    });
    Ok(())
}

/// Watches every key of `store` with `seen`, starting from each key's current value (in
/// async-nats 0.51 `watch_all` sees only later changes); the receiver completes once the
/// entries that existed at the start have been seen.
///
/// When the bucket was created again (`rewatch`), it is read anew, and once the new reading
/// is current `keep` is given the keys it holds: what the view has beyond them went with the
/// lost store.
async fn watch(
    core: &Arc<ClusterCore>,
    store: &kv::Store,
    seen: fn(&ClusterCore, &kv::Entry),
    keep: fn(&ClusterCore, &HashSet<String>),
) -> Result<tokio::sync::oneshot::Receiver<()>, String> {
    let (synced_tx, synced) = tokio::sync::oneshot::channel();
    let mut rewatch = core.registry.rewatch.subscribe();
    let existing = store.status().await.map_err(|e| e.to_string())?.values();
    let mut entries = store.watch_with_history(">").await.map_err(|e| e.to_string())?;
    let mut synced_tx = Some(synced_tx);
    if existing == 0
        && let Some(tx) = synced_tx.take()
    {
        let _ = tx.send(());
    }
    let core = core.clone();
    let store = store.clone();
    // The keys of a new reading, until it is current.
    let mut rereading: Option<HashSet<String>> = None;
    core.tasks.clone().spawn(async move {
        loop {
            let entry = tokio::select! {
                _ = core.stop.cancelled() => break,
                // The bucket was created again: read it anew.
                _ = rewatch.changed() => {
                    rereading = Some(HashSet::new());
                    None
                }
                e = entries.next() => e,
            };
            match entry {
                Some(Ok(entry)) => {
                    seen(&core, &entry);
                    let current = entry.delta == 0 || entry.seen_current;
                    if let Some(keys) = &mut rereading {
                        keys.insert(entry.key.clone());
                        if current {
                            keep(&core, keys);
                            rereading = None;
                        }
                    }
                    if current && let Some(tx) = synced_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Some(Err(e)) => tracing::debug!("registry watch: {e}"),
                // The watch ended (connection trouble): watch again, from the current state.
                None => loop {
                    tokio::select! {
                        _ = core.stop.cancelled() => return,
                        _ = tokio::time::sleep(HEARTBEAT) => {}
                    }
                    let empty = store.status().await.is_ok_and(|s| s.values() == 0);
                    if let Ok(w) = store.watch_with_history(">").await {
                        entries = w;
                        if empty && let Some(keys) = rereading.take() {
                            keep(&core, &keys);
                        }
                        break;
                    }
                },
            }
        }
    });
    Ok(synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_registrations_keep_one_event_per_name() {
        let mut p = Pending::default();
        for _ in 0..1000 {
            p.push("a", Event::Register { name: "a".into(), unique: false });
            p.push("a", Event::Unregister { name: "a".into() });
        }
        p.push("b", Event::Register { name: "b".into(), unique: true });
        assert_eq!(p.order.len(), 2);
        assert!(matches!(p.pop(), Some(Event::Unregister { name }) if name == "a"));
        assert!(matches!(p.pop(), Some(Event::Register { name, unique: true }) if name == "b"));
        assert!(p.pop().is_none());
    }
}
