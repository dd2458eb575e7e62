//! [`Bus`]: named topics, each a bounded [`Channel`], created on first use, with their
//! [`TopicStats`]. Topic names are checked by [`crate::names`].

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::channel::{Channel, ChannelStats, Sizer};
use crate::names::{NameError, validate_topic_name};

/// Default capacity of a topic created on demand.
pub const DEFAULT_TOPIC_CAPACITY: usize = 1024;
/// Default host-wide limit on the number of topics.
pub const DEFAULT_MAX_TOPICS: usize = 1024;

/// Why a topic could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The name is not valid (see [`crate::names::validate_topic_name`]).
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: NameError,
    },
    /// The bus already has its maximum number of topics.
    #[error("topic limit reached ({max} topics)")]
    TooManyTopics {
        /// The limit.
        max: usize,
    },
}

/// Stats of one topic, as served by `/gorchestra/api/topics`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TopicStats {
    /// Topic name.
    pub name: String,
    /// Messages queued.
    pub len: usize,
    /// Capacity.
    pub cap: usize,
    /// Approximate bytes queued.
    pub bytes: usize,
    /// Messages published since creation.
    pub published: u64,
    /// Messages received since creation.
    pub received: u64,
    /// Seconds publishers spent waiting for room.
    pub blocked_publish_seconds: f64,
    /// Seconds receivers spent waiting for a message.
    pub blocked_recv_seconds: f64,
    /// A cluster topic's JetStream figures (only with `--nats`; not for node-local topics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterTopicStats>,
}

/// The JetStream figures of a cluster topic (`cluster` in `/gorchestra/api/topics`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTopicStats {
    /// Messages handed to a consumer (on any node) and not yet acknowledged.
    pub pending_ack: u64,
    /// Of those, messages delivered more than once.
    pub redelivered: u64,
    /// Messages of the topic this node sent to `dead-letter`.
    pub dead_lettered: u64,
    /// Messages this node fetched from the stream ahead of its receives and holds for them
    /// (not yet handed to a routine; handed back if nobody here takes them).
    pub prefetched: u64,
}

impl TopicStats {
    fn new(name: &str, s: ChannelStats) -> Self {
        TopicStats {
            name: name.to_string(),
            len: s.len,
            cap: s.cap,
            bytes: s.approx_bytes,
            published: s.sends,
            received: s.recvs,
            blocked_publish_seconds: s.blocked_send_ns as f64 / 1e9,
            blocked_recv_seconds: s.blocked_recv_ns as f64 / 1e9,
            cluster: None,
        }
    }
}

struct BusInner<T> {
    topics: RwLock<BTreeMap<String, Channel<T>>>,
    max_topics: usize,
}

/// A set of named topics. Each topic is a queue: a message goes to exactly one receiver.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use gorch_host::Bus;
/// let bus: Bus<String> = Bus::new();
/// let jobs = bus.topic("jobs", 16).unwrap();
/// jobs.send("one".to_string()).await.unwrap();
/// // The first capacity wins; later calls get the same topic.
/// assert_eq!(bus.topic("jobs", 99).unwrap().cap(), 16);
/// assert_eq!(bus.topics()[0].published, 1);
/// # });
/// ```
pub struct Bus<T> {
    inner: Arc<BusInner<T>>,
}

impl<T> Clone for Bus<T> {
    fn clone(&self) -> Self {
        Bus { inner: self.inner.clone() }
    }
}

impl<T: Sizer + Send> Default for Bus<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Sizer + Send> Bus<T> {
    /// A bus with at most [`DEFAULT_MAX_TOPICS`] topics.
    pub fn new() -> Self {
        Self::with_max_topics(DEFAULT_MAX_TOPICS)
    }

    /// A bus with at most `max_topics` topics.
    pub fn with_max_topics(max_topics: usize) -> Self {
        Bus { inner: Arc::new(BusInner { topics: RwLock::new(BTreeMap::new()), max_topics }) }
    }

    /// Gets the topic `name`, creating it with capacity `cap` if it does not exist yet (the
    /// first capacity wins).
    pub fn topic(&self, name: &str, cap: usize) -> Result<Channel<T>, BusError> {
        if let Some(ch) = self.inner.topics.read().get(name) {
            return Ok(ch.clone());
        }
        validate_topic_name(name)
            .map_err(|reason| BusError::InvalidName { name: name.to_string(), reason })?;
        let mut topics = self.inner.topics.write();
        if let Some(ch) = topics.get(name) {
            return Ok(ch.clone());
        }
        if topics.len() >= self.inner.max_topics {
            return Err(BusError::TooManyTopics { max: self.inner.max_topics });
        }
        let ch = Channel::new(cap);
        topics.insert(name.to_string(), ch.clone());
        Ok(ch)
    }

    /// The topic `name` if it exists.
    pub fn get(&self, name: &str) -> Option<Channel<T>> {
        self.inner.topics.read().get(name).cloned()
    }

    /// Removes the topic `name` and closes it (receivers drain it, then see `closed`).
    /// Returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let removed = self.inner.topics.write().remove(name);
        match removed {
            Some(ch) => {
                ch.close();
                true
            }
            None => false,
        }
    }

    /// Removes the topics that are empty and that nobody holds (no routine has used them
    /// since its run began, no receiver waits): they are created again on first use.
    /// Returns how many were removed.
    pub fn remove_unused(&self) -> usize {
        let mut topics = self.inner.topics.write();
        let before = topics.len();
        // Under the write lock nobody can take a new handle: one handle is the registry's.
        topics.retain(|_, ch| !(ch.is_empty() && ch.handles() == 1));
        before - topics.len()
    }

    /// Every topic with its stats, sorted by name.
    pub fn topics(&self) -> Vec<TopicStats> {
        let topics: Vec<(String, Channel<T>)> =
            self.inner.topics.read().iter().map(|(n, c)| (n.clone(), c.clone())).collect();
        topics.iter().map(|(n, c)| TopicStats::new(n, c.stats())).collect()
    }

    /// The number of topics.
    pub fn len(&self) -> usize {
        self.inner.topics.read().len()
    }

    /// True when there is no topic.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every topic (at shutdown).
    pub fn close_all(&self) {
        for ch in self.inner.topics.read().values() {
            ch.close();
        }
    }
}
