//! Broker failover on a real multi-node cluster: three combined broker+controller Apache
//! Kafka nodes (`scripts/stack.sh kafka-cluster-start`), topics with replication 3 and
//! `min.insync.replicas=2`. The node leading the relay's partition is SIGKILLed mid-stream and
//! started again later, while writers commit: every committed event arrives, nothing that was
//! not committed, and each aggregate's events in commit order.
//!
//! Slow (three JVMs on two cores): it runs in the `cluster` test group, one at a time.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use common::*;

/// The node id leading partition 0 of `topic`, once the topic exists.
fn leader_of_partition_0(brokers: &str, topic: &str) -> i32 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(md) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            if let Some(p) = md
                .topics()
                .first()
                .and_then(|t| t.partitions().iter().find(|p| p.id() == 0))
            {
                if p.leader() > 0 {
                    assert_eq!(p.replicas().len(), 3, "topic {topic} has replication 3");
                    return p.leader();
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} never got a leader"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_broker_killed_mid_stream_and_restarted_loses_nothing_and_keeps_order() {
    let cluster = PrivateKafka::start_cluster(3, &[]);
    let (db, config) = setup(
        "failover",
        &cluster.brokers,
        "[kafka]\ntopic_replication_factor = 3\ntopic_partitions = 3\n",
    )
    .await;
    let mut relay = Relay::start(&config);

    // Writers commit small transactions over 20 aggregates for the whole run.
    let writer = SteadyWriter {
        run_for: Duration::from_secs(24),
        aggregates: 20,
        max_per_txn: 5,
        rollback_one_in: 0,
        pause: Duration::from_millis(10),
        seed: 0xfa11,
    }
    .spawn(&db);

    let topic = db.topic("order");
    let leader = {
        let (brokers, topic) = (cluster.brokers.clone(), topic.clone());
        tokio::task::spawn_blocking(move || leader_of_partition_0(&brokers, &topic))
            .await
            .unwrap()
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.kill_node(leader as u32);
    tokio::time::sleep(Duration::from_secs(8)).await;
    relay.assert_running();
    let restart = {
        let dir = cluster.dir.clone();
        tokio::task::spawn_blocking(move || {
            stack(&[
                "kafka-node-start",
                dir.to_str().unwrap(),
                &leader.to_string(),
            ])
        })
    };
    let (written, _) = writer.await.unwrap();
    restart.await.unwrap();
    assert!(written.len() > 500, "the writers kept committing");

    let received = consume(
        &cluster.brokers,
        &[topic],
        &ids(&written),
        Duration::from_secs(120),
        Duration::from_millis(500),
    );
    assert_exactly_written(&written, &received);
    relay.assert_running();
    // The relay really was connected to the node that died.
    let log = relay.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("librdkafka") && l.contains(&format!("/{leader}: "))),
        "the relay never saw node {leader} go away"
    );
}
