//! Admission of publishes: a node-wide bound on the bytes of publishes in progress (received
//! and not yet answered), so that overload is refused at the door with a clear, retryable
//! error instead of queueing until the node's memory runs out. Without it a publish waits
//! for its shard's queue until its deadline, holding its envelopes, bounded only by the
//! queue (4,096 requests per shard, each up to `max_request_bytes`) and by how many calls
//! the clients open.
//!
//! A node has two budgets of `max_pending_publish_bytes` each: one for the publishes it
//! received and has not answered (taken in the `Publish` handler, given back when the
//! handler ends), and one for the envelopes queued for or in its shards' proposers as a
//! leader, whether received here or forwarded (taken before the queue, given back when the
//! entry is answered, even if the caller gave up meanwhile). When a budget cannot cover a
//! request, it fails at once with `RESOURCE_EXHAUSTED` naming the setting, with a
//! `retry-after-ms` hint.

use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::Semaphore;

use crate::error::BrokerError;

/// The node's budget of publish bytes in progress.
pub struct Admission {
    budget: Arc<Semaphore>,
    limit: usize,
    /// What the budget holds, for the refusal ("publishes in progress").
    what: &'static str,
}

/// A publish's share of the budget, given back when dropped.
pub struct Admitted(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    pub fn new(limit: usize, what: &'static str) -> Self {
        Admission { budget: Arc::new(Semaphore::new(limit)), limit, what }
    }

    /// Bytes of publishes in progress now.
    pub fn in_progress(&self) -> usize {
        self.limit - self.budget.available_permits()
    }

    /// Takes `bytes` from the budget, or refuses with `Overloaded` when it cannot cover them
    /// now. A request larger than the whole budget (configuration keeps the budget at least
    /// `max_request_bytes`) is admitted when nothing else is in progress.
    pub fn admit(&self, bytes: usize) -> Result<Admitted, BrokerError> {
        let want = bytes.min(self.limit);
        let Ok(want32) = u32::try_from(want) else {
            return Err(self.refusal(bytes));
        };
        match self.budget.clone().try_acquire_many_owned(want32) {
            Ok(p) => Ok(Admitted(p)),
            Err(_) => {
                metrics::counter!("habar_publish_refused_total", "reason" => "overloaded").increment(1);
                Err(self.refusal(bytes))
            }
        }
    }

    fn refusal(&self, bytes: usize) -> BrokerError {
        BrokerError::Overloaded(format!(
            "this node has {} bytes of {}; {bytes} more would pass its limit of {} \
             (max_pending_publish_bytes): retry later or on another node",
            self.in_progress(),
            self.what,
            self.limit
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Property: the budget admits up to its limit, refuses beyond it with an error naming
    /// the setting and the limit, and takes a request back when its share is dropped.
    #[test]
    fn admits_up_to_the_limit_and_refuses_beyond_it() {
        let a = Admission::new(1000, "publishes in progress");
        let first = a.admit(600).expect("fits");
        assert_eq!(a.in_progress(), 600);
        let e = a.admit(500).err().expect("over the limit");
        let text = e.to_string();
        assert!(text.contains("max_pending_publish_bytes") && text.contains("1000") && text.contains("600"), "{text}");
        assert!(matches!(e, BrokerError::Overloaded(_)));
        let second = a.admit(400).expect("what is left fits");
        drop(first);
        assert_eq!(a.in_progress(), 400);
        drop(second);
        assert_eq!(a.in_progress(), 0);
        // Larger than the whole budget: admitted alone, not twice.
        let big = a.admit(5000).expect("alone");
        assert!(a.admit(1).is_err());
        drop(big);
        assert!(a.admit(0).is_ok());
    }
}
