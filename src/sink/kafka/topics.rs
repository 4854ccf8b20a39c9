//! Topics the relay routes to: created through the admin API on first use, and not written
//! to until every partition's leader serves it.
//!
//! The lesson (issue 16): the first events to a topic the relay had just created vanished
//! although librdkafka reported them delivered. A broker announces itself as a new
//! partition's leader in its metadata a few milliseconds before it accepts writes for it, so
//! the producer's first request to the partition fails (NOT_LEADER, "not persisted") while
//! its next, pipelined behind it, arrives after the broker took over. Since KIP-360 a broker
//! accepts *any* first sequence number from a producer it has no state for on a partition,
//! so the second request is written as if it were the first; librdkafka then infers that the
//! failed one must have been written too ("implicitly acked by subsequent batch success")
//! and reports it delivered — without an offset, and without it ever being in the log. The
//! relay therefore waits, after creating a topic (or finding it just created), until a
//! ListOffsets request succeeds on every partition — answered only by a partition's serving
//! leader — before it sends the first record there. The backstop for the cases this cannot
//! see (a leader moving to the broker the producer already writes to): a delivery report
//! without an offset is never believed (`KafkaDelivery`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::RDKafkaErrorCode;

use super::{broker_default, security_properties, KafkaSink, LogContext};
use crate::config::KafkaConfig;

impl KafkaSink {
    /// Creates `topic` if the relay has not seen it yet and topic creation is enabled.
    /// Failures are logged, not fatal: the broker may auto-create, or the operator may have
    /// created the topic with rights we lack; if the topic really is missing, delivery fails
    /// and the relay retries from its last confirmed position.
    pub async fn ensure_topic(&mut self, topic: &str) {
        let partitions = self.cfg.topic_partitions;
        self.ensure_topic_with(topic, partitions, &[]).await
    }

    /// [`KafkaSink::ensure_topic`] with `partitions` (-1: broker default) and topic configs.
    pub async fn ensure_topic_with(
        &mut self,
        topic: &str,
        partitions: i32,
        configs: &[(&str, &str)],
    ) {
        if self.known_topics.contains(topic) {
            return;
        }
        let Some(admin) = &self.admin else {
            self.known_topics.insert(topic.to_string());
            return;
        };
        let mut new = NewTopic::new(
            topic,
            partitions,
            TopicReplication::Fixed(self.cfg.topic_replication_factor),
        );
        for (k, v) in configs {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        match admin.create_topics([&new], &opts).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(name) => {
                            tracing::info!(topic = %name, partitions = %broker_default(partitions), replicas = %broker_default(self.cfg.topic_replication_factor), "created topic")
                        }
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            tracing::warn!(topic = %name, error = %code, "could not create topic; relying on it existing or on broker auto-creation")
                        }
                    }
                }
                self.await_leaders(topic).await;
                self.known_topics.insert(topic.to_string());
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "create-topics request failed; will try again after the next reconnect");
                self.known_topics.insert(topic.to_string());
            }
        }
    }

    /// Waits until every partition of `topic` is served by its leader (see the module
    /// docs); logs, and returns, after half `kafka.delivery_timeout_ms` (the whole of it
    /// bounds taking the record, `window`): the record is then sent anyway, and either
    /// delivered with an offset or the session ends.
    async fn await_leaders(&mut self, topic: &str) {
        let probe = match &self.leader_probe {
            Some(p) => p.clone(),
            None => match leader_probe(&self.cfg, &self.context) {
                Ok(p) => {
                    let p = Arc::new(p);
                    self.leader_probe = Some(p.clone());
                    p
                }
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "cannot check the topic's partition leaders; sending anyway");
                    return;
                }
            },
        };
        let name = topic.to_string();
        let bound = self.cfg.delivery_timeout / 2;
        let waited =
            tokio::task::spawn_blocking(move || wait_for_leaders(&probe, &name, bound)).await;
        match waited {
            Ok(Ok((partitions, took))) => {
                tracing::debug!(%topic, partitions, took_ms = took.as_millis() as u64, "every partition's leader serves the topic")
            }
            Ok(Err(e)) => {
                tracing::warn!(%topic, error = %e, "partition leaders not confirmed; sending anyway")
            }
            Err(e) => tracing::warn!(%topic, error = %e, "partition leader check failed"),
        }
    }
}

/// The client that asks partition leaders for their offsets (no group, reads nothing).
fn leader_probe(
    cfg: &KafkaConfig,
    context: &LogContext,
) -> Result<BaseConsumer<LogContext>, rdkafka::error::KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", "outboxd-leaders")
        .set("group.id", "outboxd-leaders")
        .set("enable.auto.commit", "false");
    for (k, v) in security_properties(cfg) {
        c.set(k, v);
    }
    c.create_with_context(context.clone())
}

/// Blocks until a ListOffsets request succeeds on every partition of `topic` (the partition
/// count from the metadata); returns the count and how long it took.
fn wait_for_leaders(
    probe: &BaseConsumer<LogContext>,
    topic: &str,
    bound: Duration,
) -> Result<(usize, Duration), String> {
    use rdkafka::consumer::Consumer;
    let start = Instant::now();
    let mut last = String::from("no partitions in the metadata yet");
    while start.elapsed() < bound {
        match probe.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            Ok(md) => {
                let ids: Vec<i32> = md
                    .topics()
                    .first()
                    .map(|t| t.partitions().iter().map(|p| p.id()).collect())
                    .unwrap_or_default();
                if !ids.is_empty() {
                    let unserved = ids.iter().find_map(|&p| {
                        probe
                            .fetch_watermarks(topic, p, Duration::from_secs(2))
                            .err()
                            .map(|e| format!("partition {p}: {e}"))
                    });
                    match unserved {
                        None => return Ok((ids.len(), start.elapsed())),
                        Some(e) => last = e,
                    }
                }
            }
            Err(e) => last = format!("metadata: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("after {} ms: {last}", bound.as_millis()))
}
