//! The topics and mailboxes a run has used, by name: a send or receive finds its channel here
//! instead of in the bus and routine registries, whose locks every routine shares (a name
//! lookup and a contended lock per message otherwise). A closed channel (a removed topic, a
//! routine that ended) is looked up again, so the cache never changes what a call reaches.

use std::sync::Arc;

use parking_lot::Mutex;

use crate::channel::Channel;
use crate::delivery::Message;
use crate::orchestrator::OrchInner;
use crate::routine::CallError;

/// Names kept per kind; a routine talking to more evicts the oldest.
const MAX_NAMES: usize = 16;

#[derive(Default)]
pub(crate) struct Handles {
    topics: Mutex<Vec<(Arc<str>, Channel<Message>)>>,
    mailboxes: Mutex<Vec<(Arc<str>, Channel<Message>)>>,
}

impl Handles {
    /// The local topic `name` (created on first use), and its name as shared text.
    pub fn topic(
        &self,
        orch: &OrchInner,
        name: &str,
    ) -> Result<(Arc<str>, Channel<Message>), CallError> {
        if let Some(hit) = find(&self.topics, name) {
            return Ok(hit);
        }
        let ch = orch.topic(name)?;
        Ok(remember(&self.topics, name, ch))
    }

    /// The mailbox of the local routine `name`, if there is one.
    pub fn mailbox(&self, orch: &OrchInner, name: &str) -> Option<Channel<Message>> {
        if let Some((_, ch)) = find(&self.mailboxes, name) {
            return Some(ch);
        }
        let ch = orch.mailbox_of(name)?;
        Some(remember(&self.mailboxes, name, ch).1)
    }
}

fn find(
    cache: &Mutex<Vec<(Arc<str>, Channel<Message>)>>,
    name: &str,
) -> Option<(Arc<str>, Channel<Message>)> {
    let mut cache = cache.lock();
    let i = cache.iter().position(|(n, _)| &**n == name)?;
    if cache[i].1.is_closed() {
        cache.swap_remove(i);
        return None;
    }
    Some(cache[i].clone())
}

fn remember(
    cache: &Mutex<Vec<(Arc<str>, Channel<Message>)>>,
    name: &str,
    ch: Channel<Message>,
) -> (Arc<str>, Channel<Message>) {
    let entry: (Arc<str>, Channel<Message>) = (name.into(), ch);
    let mut cache = cache.lock();
    if cache.len() >= MAX_NAMES {
        cache.remove(0);
    }
    cache.push(entry.clone());
    entry
}
