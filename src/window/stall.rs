//! A delivery the broker never acknowledges: the window bounds every delivery itself.

use std::future::Future;
use std::time::Duration;

use super::{Failure, Window};
use crate::error::{Error, Result};
use crate::health::Health;
use crate::metrics as m;
use crate::sink::{Failed, Landed};

impl<D> Window<'_, D>
where
    D: Future<Output = std::result::Result<Landed, Failed>> + Unpin,
{
    /// The broker has not acknowledged the oldest delivery for `after`
    /// (`kafka.delivery_timeout_ms`): the session ends with an error naming it, and the next
    /// one resends from the confirmed position through a new client.
    ///
    /// A client that holds a record is not waited on: librdkafka never times a record out
    /// here (`message.timeout.ms = 0`, for order), so a record it keeps for any reason — a
    /// produce request whose answer never comes, a partition queue it stopped serving —
    /// would hold the slot forever while the records after it, on other partitions, flow.
    /// Dropping the client purges what it holds; the resend carries the same ids.
    ///
    /// Issue 16 (the first event to a topic the relay was creating never arrived, while the
    /// 36 after it did, with no error and no repeat) is this shape: nothing restarted the
    /// session, so the event was held, not confirmed past (the delivery ledger,
    /// `crate::ledger`, now checks the latter at every confirmation). A candidate inside
    /// librdkafka, read in its source and not reproduced: metadata that reports a fresh topic
    /// as unknown past `topic.metadata.propagation.max.ms` makes it drop the topic's partition
    /// objects (`rd_kafka_topic_partition_cnt_update`) and build new ones when the topic is
    /// back — records queued on a dropped one are not moved to the new one, while later
    /// records of the same key go to the new one and arrive. 12,000 first records to new
    /// topics under load and several full suites never showed a hold, so the relay bounds
    /// every delivery itself instead of trusting the client's.
    pub fn check_stall(&mut self, after: Duration, health: &Health) -> Result<()> {
        let Some(oldest) = self.inflight.front() else {
            return Ok(());
        };
        let waited = oldest.sent_at.elapsed();
        if waited < after {
            return Ok(());
        }
        health.failing();
        metrics::counter!(m::DELIVERY_STALLS).increment(1);
        let message = format!(
            "delivery stalled: the broker has not acknowledged event {} (topic {}) for {} s (kafka.delivery_timeout_ms); ending the session so that a new client resends it from the last confirmed position",
            oldest.id,
            oldest.topic,
            waited.as_secs()
        );
        tracing::error!(event_id = %oldest.id, topic = %oldest.topic, waited_s = waited.as_secs(), inflight = self.inflight.len(), "{message}");
        Err(Error::Publish(message))
    }

    /// [`Window::settle_oldest`], ending the session if it stalls ([`Window::check_stall`]).
    pub async fn settle_reporting(
        &mut self,
        after: Duration,
        health: &Health,
    ) -> Result<std::result::Result<(), Failure>> {
        loop {
            match tokio::time::timeout(Duration::from_secs(1), self.settle_oldest()).await {
                Ok(settled) => return Ok(settled),
                Err(_) => self.check_stall(after, health)?,
            }
        }
    }
}
