//! The Pub/Sub sink against Google's Pub/Sub emulator (a server process of a test's own; an
//! emulator, not Google Cloud): each topic has a subscription with message ordering, and what
//! it received is what the topic took. Every committed id arrives in per-aggregate order
//! (ordering keys) through relay crashes and a path gone silent — repeats only with the same
//! id —, an event Pub/Sub cannot take is dead-lettered with its reason while the rest flows,
//! and config an operator must fix exits 2 with one line.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// The emulator, a database, the topics `<db>-order` and `<db>-dlq` with an ordered
/// subscription each, and a relay config publishing `order` events to the first.
struct Rig {
    emulator: PrivateBroker,
    db: TestDb,
    config: PathBuf,
}

impl Rig {
    async fn new(prefix: &str, extra: &str) -> Rig {
        let emulator = PrivateBroker::start_with("pubsub", &[]);
        let db = TestDb::new(prefix).await;
        for t in ["order", "dlq"] {
            pubsub_topic_with_subscription(&emulator.url, &format!("{}-{t}", db.name)).await;
        }
        let sink = format!(
            "[sink]\nkind = \"pubsub\"\n\n[pubsub]\nproject = \"{TEST_PROJECT}\"\nendpoint = \"{url}\"\n\
             topic = \"{db}-{{aggregatetype}}\"\ndead_letter_topic = \"{db}-dlq\"\nrequest_timeout_ms = 3000\n",
            url = emulator.url,
            db = db.name,
        );
        let config = emulator_config(&db, &sink, extra, false).await;
        Rig {
            emulator,
            db,
            config,
        }
    }

    fn relay(&self) -> Relay {
        Relay::start(&self.config)
    }

    /// Points the relay's config at a TCP proxy in front of the emulator.
    fn via_proxy(&self) -> common::proxy::Proxy {
        let port: u16 = self
            .emulator
            .url
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let proxy = common::proxy::Proxy::start(([127, 0, 0, 1], port).into());
        let text = std::fs::read_to_string(&self.config).unwrap();
        let via = text.replace(
            &format!("endpoint = \"{}\"", self.emulator.url),
            &format!("endpoint = \"http://127.0.0.1:{}\"", proxy.port),
        );
        assert_ne!(text, via);
        std::fs::write(&self.config, via).unwrap();
        proxy
    }

    async fn read(&self, topic: &str, expect: &HashSet<String>) -> Vec<Received> {
        let name = format!("{}-{topic}", self.db.name);
        let (timeout, linger) = (Duration::from_secs(120), Duration::from_secs(1));
        pubsub_read(&self.emulator.url, &name, expect, timeout, linger).await
    }
}

/// 10,000 events from 8 concurrent writers over 30 aggregates: every id arrives once, each
/// aggregate's events in commit order (ordering key = aggregate id, an ordered
/// subscription); the start line promises order and no broker dedup; `/readyz` checks the
/// emulator.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_10000_concurrent_events_arrive_each_once_in_per_aggregate_order() {
    let rig = Rig::new("ps_order", "").await;
    let mut relay = rig.relay();
    let written = concurrent_workload(&rig.db, 10_000, 8, 30, &["order"]).await;
    let received = rig.read("order", &ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    assert_eq!(duplicates, 0, "an event arrived twice without a failure");
    relay.assert_running();
    assert_ready_with_the_broker_reachable(&rig.config).await;
    assert!(
        relay
            .log_text()
            .contains("per-key order: yes, broker-side dedup: no"),
        "Pub/Sub's promises with ordering keys"
    );
}

/// A writer for 14 s; the relay SIGKILLed twice, then the path to Pub/Sub silent for 6 s (a
/// TCP proxy stops moving bytes): every committed id arrives, each aggregate's events in
/// commit order (repeats only of the same id, after the crashes), none rolled back, and the
/// relay says it noticed the silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_relay_sigkilled_twice_and_the_path_gone_silent_loses_nothing_and_keeps_order() {
    let rig = Rig::new("ps_kill", "").await;
    let proxy = rig.via_proxy();
    let writer = SteadyWriter::sink_test(14, 10, 0x95b).spawn(&rig.db);
    let mut relay = relay_sigkilled_twice(|| rig.relay()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.black_hole(true);
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.black_hole(false);
    let (written, rolled_back) = writer.await.unwrap();
    let received = rig.read("order", &ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    let log = relay.log_text();
    assert!(
        log.contains("retrying"),
        "the relay never noticed the silent path: {log}"
    );
    eprintln!("{} events, {duplicates} repeats", written.len());
    relay.assert_running();
}

/// A writer for 20 s; from its second second, the path to Pub/Sub 2 s slow each way for 6 s
/// (a TCP proxy delays every byte), so no request is answered within
/// `pubsub.request_timeout_ms` (3 s). The session whose requests got no answer halves the
/// requests the next sends at once; once the path is fast again, answered requests grow them
/// back to `max_concurrent_requests`; every committed id arrives, none rolled back. Before,
/// every session sent 8 requests at once again (seen with moto under load: progress nearly
/// stopped).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_endpoint_slower_than_the_request_timeout_gets_fewer_requests_at_once_then_all_again_losing_nothing(
) {
    let rig = Rig::new("ps_slow", "").await;
    let proxy = rig.via_proxy();
    let writer = SteadyWriter::sink_test(20, 10, 0x510).spawn(&rig.db);
    let mut relay = rig.relay();
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.set_latency(Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.set_latency(Duration::ZERO);
    let (written, rolled_back) = writer.await.unwrap();
    let received = rig.read("order", &ids(&written)).await;
    assert_exactly_written(&written, &received);
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    let log = relay.log_text();
    for said in [
        "the next session sends fewer requests at once",
        "sending fewer requests at once: the endpoint failed one in an earlier session",
        "back to the configured requests at once",
    ] {
        assert!(log.contains(said), "the relay never said \"{said}\": {log}");
    }
    relay.assert_running();
}

/// Between 40 `order` events: one for a topic that does not exist (retried, then
/// dead-lettered `retries_exhausted` to the dead-letter topic with its reason), and one whose
/// header Pub/Sub refuses as an attribute (`goog…`: `invalid_headers`; the dead-letter topic
/// refuses it too, so it lands in the dead-letter table). Every other event arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_event_it_cannot_take_is_dead_lettered_with_its_reason_and_the_rest_flows() {
    let rig = Rig::new("ps_dlq", "[sink]\nmax_record_retries = 3\n").await;
    let (written, stray) = orders_around_a_stray(&rig.db).await;
    let client = rig.db.client().await;
    let bad: String = client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             VALUES ('order', 'agg-1', 'Odd', '{}', '{\"goog-trace\": \"x\"}') RETURNING id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let mut relay = rig.relay();
    let received = rig.read("order", &ids(&written)).await;
    assert_exactly_written(&written, &received);
    let dead = dead_letter_reasons(rig.read("dlq", &ids(&stray)).await);
    assert_eq!(
        dead,
        vec![(stray[0].id.clone(), "retries_exhausted".to_string())],
        "dead letters; log:\n{}",
        relay.log_text()
    );
    let (reason, error) = dead_letter_row(&client, &bad).await;
    assert_eq!(reason, "invalid_headers");
    assert!(error.contains("goog-trace"), "{error}");
    relay.assert_running();
}

/// Config an operator must fix is exit 2 with one line naming the key.
#[test]
fn bad_pubsub_config_exits_2_with_one_line_naming_the_key() {
    let dir = std::env::temp_dir().join(unique("pscfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |config: &str, env: &[(&str, &str)]| {
        let path = dir.join("c.toml");
        let text = format!(
            "[postgres]\nurl = \"postgres://u@localhost/db\"\n[sink]\nkind = \"pubsub\"\n{config}"
        );
        std::fs::write(&path, text).unwrap();
        outboxd(&["run", "--config", path.to_str().unwrap()], env)
    };
    let no_project = [("GOOGLE_CLOUD_PROJECT", ""), ("PUBSUB_EMULATOR_HOST", "")];
    for (config, key) in [
        ("[pubsub]\n", "pubsub.project"),
        ("[pubsub]\nproject = \"X\"\n", "pubsub.project"),
        (
            "[pubsub]\nproject = \"outboxd-test\"\ntopic = \"t-{nope}\"\n",
            "pubsub.topic",
        ),
        (
            "[pubsub]\nproject = \"outboxd-test\"\ndead_letter_topic = \"goog-dlq\"\n",
            "pubsub.dead_letter_topic",
        ),
        (
            "[pubsub]\nproject = \"outboxd-test\"\nmax_message_bytes = 20000000\n",
            "pubsub.max_message_bytes",
        ),
        (
            "[pubsub]\nproject = \"outboxd-test\"\nendpoint = \"pubsub.local\"\n",
            "pubsub.endpoint",
        ),
    ] {
        let out = run(config, &no_project);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{config}: {err}");
        assert!(err.contains(key), "{config}: expected `{key}` in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    }
}

/// A service-account file whose private key does not load: exit 2 naming the file and the
/// field, never the key's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_credentials_file_exits_2_naming_it_without_its_private_key() {
    let db = TestDb::new("ps_creds").await;
    let config = emulator_config(
        &db,
        "[sink]\nkind = \"pubsub\"\n\n[pubsub]\nproject = \"outboxd-test\"\nendpoint = \"https://127.0.0.1:9\"\n",
        "",
        false,
    )
    .await;
    let secret = "c2VjcmV0LWtleS1tYXRlcmlhbA";
    let creds = config.with_file_name("sa.json");
    std::fs::write(
        &creds,
        format!(
            r#"{{"type": "service_account", "client_email": "relay@p.iam.gserviceaccount.com", "private_key": "-----BEGIN PRIVATE KEY-----\n{secret}==\n-----END PRIVATE KEY-----\n"}}"#
        ),
    )
    .unwrap();
    let out = outboxd(
        &["run", "--config", config.to_str().unwrap()],
        &[
            ("GOOGLE_APPLICATION_CREDENTIALS", creds.to_str().unwrap()),
            ("PUBSUB_EMULATOR_HOST", ""),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("sa.json") && err.contains("private_key"),
        "{err}"
    );
    assert!(
        !err.contains(secret),
        "the private key reached the log: {err}"
    );
}
