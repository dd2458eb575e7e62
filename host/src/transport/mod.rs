//! The transport seam: where a routine's messages go and come from.
//!
//! A [`Transport`] is chosen once per host, when the orchestrator is built (the in-memory
//! [`LocalTransport`]) or when it joins a cluster (the cluster's, over NATS JetStream, which
//! wraps the local one for what stays on the node). Each run of a routine gets a [`Link`]
//! from it: the routine's context sends, publishes and receives through the link alone, and
//! never learns which transport is behind it. A receive hands back the messages together
//! with their [`Origin`](crate::delivery::Origin), the settle operations that
//! [`delivery`](crate::delivery) calls (acknowledge, hand back, dead-letter).
//!
//! The in-memory transport keeps topics on a [`Bus`](crate::Bus) and finds mailboxes by
//! name in a [`Directory`] (the orchestrator's registry of routines).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::bus::TopicStats;
use crate::channel::{Channel, SendError};
use crate::delivery::{Letter, Message, Origin};

mod local;

pub(crate) use local::{Local, LocalLink, LocalTransport};

/// Why a routine's host call did not complete; mirrors the WIT `error` variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The routine is being stopped: return promptly.
    #[error("cancelled")]
    Cancelled,
    /// The mailbox or topic is closed and empty.
    #[error("closed")]
    Closed,
    /// No live routine has this name.
    #[error("no such routine: {0}")]
    NoSuchRoutine(String),
    /// The payload is larger than the per-message limit (bytes).
    #[error("payload too large (limit {0} bytes)")]
    TooLarge(u64),
    /// A host limit was reached.
    #[error("limit reached: {0}")]
    Limit(Limit),
    /// The topic or routine name is not valid.
    #[error("invalid name: {0}")]
    InvalidName(String),
    /// The call left this host and no answer came in time (a node paused or cut off, NATS
    /// gone mid-call): the message may or may not be delivered.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

/// Which host limit a call reached ([`CallError::Limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Limit {
    /// The topic would be one more than the host allows.
    #[error("at most {max} topics")]
    Topics {
        /// The most topics a host keeps.
        max: usize,
    },
}

/// The queue a receive takes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Queue<'a> {
    /// The routine's own mailbox.
    Mailbox,
    /// A topic (created on first use).
    Topic(&'a str),
}

/// What one run of a routine talks through. Each call may wait (backpressure, an empty
/// queue) and gives up with [`CallError::Cancelled`] when `cancel` fires.
pub(crate) trait Link: Send + Sync {
    /// Delivers `payload` to the mailbox of the routine `to`, waiting while it is full.
    fn send<'a>(
        &'a self,
        to: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>>;

    /// Delivers `payloads` to the mailbox of the routine `to` in order, waiting while it is
    /// full; returns how many were delivered and the error that stopped the rest, if any.
    fn send_batch<'a>(
        &'a self,
        to: &'a str,
        payloads: Vec<Vec<u8>>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, (usize, Result<(), CallError>)>;

    /// Publishes `payload` on `topic`, waiting while it is full.
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>>;

    /// Publishes `payloads` on `topic` in order; returns how many were published and the
    /// error that stopped the rest, if any.
    fn publish_batch<'a>(
        &'a self,
        topic: &'a str,
        payloads: Vec<Vec<u8>>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, (usize, Result<(), CallError>)>;

    /// Makes sure `queue` can be received from (a topic is created on first use), before a
    /// receive acknowledges what is in flight: a refused receive leaves it in flight.
    fn open(&self, queue: Queue<'_>) -> Result<(), CallError>;

    /// Takes up to `max` messages (at least one) of `queue` into `out`, in queue order,
    /// waiting up to `timeout` (`None`: without limit) for the first; the messages' origin,
    /// or `None` when the wait timed out. A batch stops before a message that
    /// [`Message::alone`] marks.
    fn recv<'a>(
        &'a self,
        queue: Queue<'a>,
        max: usize,
        timeout: Option<Duration>,
        cancel: &'a CancellationToken,
        out: &'a mut Vec<Message>,
    ) -> BoxFuture<'a, Result<Option<Arc<dyn Origin>>, CallError>>;
}

/// Where a host's messages travel: chosen once, behind every routine's [`Link`] and the
/// HTTP ingress.
pub(crate) trait Transport: Send + Sync + 'static {
    /// The link of one run of the routine `name`, whose mailbox is `mailbox`.
    fn link(&self, name: &str, mailbox: &Channel<Message>) -> Arc<dyn Link>;

    /// The node that forbids this host to run a routine named `name` (`unique`: this one
    /// must be the only one), if any.
    fn clash(&self, name: &str, unique: bool) -> Option<String>;
    /// A routine named `name` runs here from now on.
    fn register(&self, name: &str, unique: bool);
    /// The routine named `name` has ended here.
    fn unregister(&self, name: &str);
    /// False when the transport knows now that a send to `to` reaches no routine; true
    /// when it may (a routine it knows of, which may still end before the send, or a name
    /// only the send itself can resolve).
    fn resolves(&self, to: &str) -> bool;

    /// [`Link::send`] from outside any routine (the HTTP ingress).
    fn send<'a>(
        &'a self,
        to: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>>;
    /// [`Link::publish`] from outside any routine (the HTTP ingress).
    fn publish<'a>(
        &'a self,
        topic: &'a str,
        payload: Vec<u8>,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), CallError>>;

    /// Messages queued on `topic` now (as last known).
    fn topic_len(&self, topic: &str) -> usize;
    /// The figures of every topic.
    fn topics(&self) -> Vec<TopicStats>;
    /// Why this host cannot move messages now (`/readyz` answers 503 with it), if it cannot.
    fn problem(&self) -> Option<String>;
    /// The live nodes this host moves messages between (`gorch_cluster_nodes`), when it
    /// knows of several.
    fn nodes(&self) -> Option<usize>;
    /// Acknowledgements the queue's server never confirmed (a cluster's), when it has one.
    fn unconfirmed_acks(&self) -> Option<u64>;
    /// Dead letters that could not be stored (the `dead-letter` topic full, or a letter
    /// larger than the transport carries).
    fn dead_letters_dropped(&self) -> u64;
    /// The host is shutting down: closes the in-memory topics.
    fn close(&self);
    /// For [`Cluster::of`](crate::Cluster::of).
    fn as_any(&self) -> &dyn Any;
}

/// Where the local transport finds a routine's mailbox by name: the orchestrator's registry.
pub(crate) trait Directory: Send + Sync {
    /// The mailbox of the live local routine `name`.
    fn mailbox(&self, name: &str) -> Option<Channel<Message>>;
}

/// Where dead letters go: the local `dead-letter` topic, or the cluster's.
pub(crate) trait DeadLetters: Send + Sync {
    /// Stores `letter` on the `dead-letter` topic (never waiting; what cannot be stored is
    /// logged and counted in `gorch_dead_letters_dropped_total`).
    fn put(&self, letter: Letter);
}

/// What a routine sees of a send to an in-memory mailbox or topic.
pub(crate) fn queued(r: Result<(), SendError<Message>>) -> Result<(), CallError> {
    match r {
        Ok(()) => Ok(()),
        Err(SendError::Cancelled(_)) => Err(CallError::Cancelled),
        Err(SendError::Closed(_) | SendError::Full(_)) => Err(CallError::Closed),
    }
}
