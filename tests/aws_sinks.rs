//! The AWS sinks against real server processes of a test's own: SQS against ElasticMQ (an
//! SQS-compatible server; its FIFO queues group and deduplicate as SQS documents), SNS against
//! moto's server (an AWS emulator; a queue subscribed to each topic shows what it received),
//! and request signing against moto with IAM authentication on (it recomputes every
//! signature). Every committed id arrives, per-aggregate order holds on FIFO queues, a FIFO
//! queue stores no repeat after relay crashes, a crash of the server loses nothing, a refused
//! event is dead-lettered with its reason while the rest flows, and credentials or config an
//! operator must fix exit 2 without the secret in the log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use outboxd::sink::aws::AwsClient;

/// ElasticMQ, a database, the queues `<db>-order[.fifo]` and `<db>-dlq`, and a relay
/// config publishing `order` events to the first.
struct Rig {
    broker: PrivateBroker,
    db: TestDb,
    config: PathBuf,
    client: AwsClient,
    queue_url: String,
    dlq_url: String,
}

impl Rig {
    /// ElasticMQ keeps its messages in memory unless `durable` (the restart test).
    async fn new(prefix: &str, fifo: bool, extra: &str) -> Rig {
        Self::with_server(prefix, fifo, extra, false).await
    }

    async fn with_server(prefix: &str, fifo: bool, extra: &str, durable: bool) -> Rig {
        let broker =
            PrivateBroker::start_with("elasticmq", if durable { &[] } else { &["memory"] });
        let db = TestDb::new(prefix).await;
        let client = sqs_client(&broker.url);
        let suffix = if fifo { ".fifo" } else { "" };
        let queue_url = sqs_create_queue(&client, &format!("{}-order{suffix}", db.name)).await;
        let dlq_url = sqs_create_queue(&client, &format!("{}-dlq", db.name)).await;
        let sink = format!(
            "[sink]\nkind = \"sqs\"\n\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\nrequest_timeout_ms = 3000\n\n\
             [sqs]\nqueue = \"{db}-{{aggregatetype}}{suffix}\"\ndead_letter_queue = \"{db}-dlq\"\n",
            url = broker.url,
            db = db.name,
        );
        let config = emulator_config(&db, &sink, extra, false).await;
        Rig {
            broker,
            db,
            config,
            client,
            queue_url,
            dlq_url,
        }
    }

    /// moto's server, a database, the FIFO topic `<db>-order.fifo` and the standard topic
    /// `<db>-dlq`, each with a queue subscribed (raw delivery) to read what it received, and
    /// a relay config publishing `order` events to the first.
    async fn sns(prefix: &str, extra: &str) -> Rig {
        let moto = PrivateBroker::start_with("moto", &[]);
        let db = TestDb::new(prefix).await;
        let (topic, queue_url) =
            sns_topic_with_queue(&moto.url, &format!("{}-order.fifo", db.name)).await;
        let (dlq, dlq_url) = sns_topic_with_queue(&moto.url, &format!("{}-dlq", db.name)).await;
        let template = topic.replace(
            &format!("{}-order", db.name),
            &format!("{}-{{aggregatetype}}", db.name),
        );
        let sink = format!(
            "[sink]\nkind = \"sns\"\n\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n\n\
             [sns]\ntopic_arn = \"{template}\"\ndead_letter_topic_arn = \"{dlq}\"\n",
            url = moto.url,
        );
        let config = emulator_config(&db, &sink, extra, true).await;
        Rig {
            client: sqs_client(&moto.url),
            broker: moto,
            db,
            config,
            queue_url,
            dlq_url,
        }
    }

    fn relay(&self) -> Relay {
        Relay::start_with_env(&self.config, &aws_env())
    }

    async fn read(&self, expect: &HashSet<String>) -> Vec<Received> {
        let (timeout, linger) = (Duration::from_secs(120), Duration::from_secs(2));
        sqs_read(&self.client, &self.queue_url, expect, timeout, linger).await
    }

    /// The dead letters: event id → `outboxd.dlq.reason`.
    async fn dead_letters(&self, expect: &HashSet<String>) -> Vec<(String, String)> {
        let (timeout, linger) = (Duration::from_secs(60), Duration::from_millis(500));
        dead_letter_reasons(sqs_read(&self.client, &self.dlq_url, expect, timeout, linger).await)
    }

    fn steady_writer(
        &self,
        secs: u64,
        rollback_one_in: u64,
        seed: u64,
    ) -> tokio::task::JoinHandle<(Vec<Written>, Vec<Written>)> {
        SteadyWriter::sink_test(secs, rollback_one_in, seed).spawn(&self.db)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_fifo_10000_concurrent_events_arrive_each_once_in_per_aggregate_order() {
    let rig = Rig::new("sqs_order", true, "").await;
    let mut relay = rig.relay();
    let written = concurrent_workload(&rig.db, 10_000, 8, 200, &["order"]).await;
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    assert_eq!(duplicates, 0, "the FIFO queue stored an event id twice");
    assert_eq!(written.len(), 10_000);
    // Every message names its group by the aggregate id (the `key` attribute says which).
    assert!(received.iter().all(|r| r.key.is_some()));
    relay.assert_running();
    assert_ready_with_the_broker_reachable(&rig.config).await;
    assert!(
        relay
            .log_text()
            .contains("per-key order: yes, broker-side dedup: yes"),
        "a FIFO queue's promises"
    );
}

/// A steady writer for 12 s; the relay is SIGKILLed at ~3 s and ~7 s and started again. The
/// FIFO queue drops every resend of a stored id (its deduplication id is the event id).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_fifo_relay_sigkilled_twice_mid_stream_loses_nothing_and_stores_no_repeat() {
    let rig = Rig::new("sqs_kill", true, "").await;
    let writer = rig.steady_writer(12, 10, 0x51c);
    let mut relay = rig.relay();
    for at in [3, 4] {
        tokio::time::sleep(Duration::from_secs(at)).await;
        relay.kill();
        relay = rig.relay();
    }
    let (written, rolled_back) = writer.await.unwrap();
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    assert_eq!(duplicates, 0, "the FIFO queue stored an event id twice");
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    eprintln!(
        "{} events, {} rolled back, 0 stored twice after 2 SIGKILLs",
        written.len(),
        rolled_back.len()
    );
    relay.assert_running();
}

/// ElasticMQ SIGKILLed at ~4 s under a steady writer and started again on its data 4 s later:
/// nothing is lost and each aggregate's first arrivals keep commit order. (ElasticMQ forgets
/// the deduplication ids of messages already deleted when restarted — SQS keeps them five
/// minutes — so events the relay had sent but not confirmed may be stored twice here, with
/// the same id. `stack.sh` writes its H2 store at every commit: with H2's default write delay
/// a killed ElasticMQ lost what it had acknowledged — measured, 5,540 messages and their queue.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_server_killed_and_restarted_mid_stream_loses_nothing_and_keeps_order() {
    let rig = Rig::with_server("sqs_restart", true, "", true).await;
    let writer = rig.steady_writer(15, 0, 0xb0b);
    let mut relay = rig.relay();
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.broker.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    rig.broker.restart();
    let (written, _) = writer.await.unwrap();
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    let log = relay.log_text();
    assert!(
        log.contains("retrying"),
        "the relay never noticed the server was gone: {log}"
    );
    eprintln!("{} events, {duplicates} stored twice", written.len());
    relay.assert_running();
}

/// 20 `order` events, one `stray` event whose queue does not exist, 20 more: the stray one is
/// retried `max_record_retries` times, then dead-lettered to the dead-letter queue with its
/// reason, and every other event arrives in per-aggregate order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_event_for_a_missing_queue_is_dead_lettered_and_the_rest_flows() {
    let rig = Rig::new("sqs_dlq", true, "[sink]\nmax_record_retries = 3\n").await;
    missing_destination_is_dead_lettered_and_the_rest_flows(rig).await;
}

/// The stray event (`orders_around_a_stray`) names a destination that does not exist.
async fn missing_destination_is_dead_lettered_and_the_rest_flows(rig: Rig) {
    let (written, stray) = orders_around_a_stray(&rig.db).await;
    let mut relay = rig.relay();
    let received = rig.read(&ids(&written)).await;
    assert_exactly_written(&written, &received);
    let dead = rig.dead_letters(&ids(&stray)).await;
    assert_eq!(
        dead,
        vec![(stray[0].id.clone(), "retries_exhausted".to_string())],
        "dead letters; log:\n{}",
        relay.log_text()
    );
    relay.assert_running();
}

/// An event over `sqs.max_message_bytes` between two others: SQS cannot take it (nor the
/// dead-letter queue), so it lands in the dead-letter table with reason `too_large`, and the
/// events around it arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_event_over_the_size_limit_is_dead_lettered_with_its_reason_and_the_rest_flows() {
    let rig = Rig::new("sqs_big", true, "[sqs]\nmax_message_bytes = 4096\n").await;
    let mut client = rig.db.client().await;
    let before = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let big_payload = format!("{{\"blob\": \"{}\"}}", "x".repeat(6_000));
    client
        .execute(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', 'a', 'Big', $1::text::jsonb)",
            &[&big_payload],
        )
        .await
        .unwrap();
    let after = write_txn(&mut client, &[("order".into(), "a".into())], false)
        .await
        .unwrap();
    let mut relay = rig.relay();
    let written: Vec<Written> = before.into_iter().chain(after).collect();
    let received = rig.read(&ids(&written)).await;
    assert_exactly_written(&written, &received);
    let mut reason = None;
    for _ in 0..100 {
        let row = client
            .query_opt(
                "SELECT reason, error FROM outboxd_dead_letter WHERE position('xxxx' in convert_from(payload, 'UTF8')) > 0 ORDER BY seq LIMIT 1",
                &[],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            reason = Some((row.get::<_, String>(0), row.get::<_, String>(1)));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (reason, error) = reason.expect("the oversized event was not dead-lettered");
    assert_eq!(reason, "too_large");
    assert!(error.contains("sqs.max_message_bytes"), "{error}");
    relay.assert_running();
}

/// The path to SQS goes silent for 8 s (a TCP proxy stops moving bytes: no RST, no FIN): the
/// requests time out (`aws.request_timeout_ms`), the relay says so and retries, and once the
/// path is back every id arrives in per-aggregate order, none stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_path_gone_silent_mid_stream_is_noticed_and_nothing_is_lost() {
    let rig = Rig::new("sqs_silent", true, "").await;
    let proxy = route_through_proxy(&rig.config, "endpoint_url", &rig.broker.url);
    let writer = rig.steady_writer(16, 0, 0xb1ac);
    let mut relay = rig.relay();
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.black_hole(true);
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.black_hole(false);
    let (written, _) = writer.await.unwrap();
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    assert_eq!(duplicates, 0, "the FIFO queue stored an event id twice");
    let log = relay.log_text();
    assert!(
        log.contains("retrying"),
        "the relay never noticed the silent path: {log}"
    );
    eprintln!("{} events", written.len());
    relay.assert_running();
}

/// moto with IAM authentication on recomputes every request's Signature Version 4: a relay
/// with a real user's keys publishes (every id arrives); the same relay with a wrong secret
/// exits 2 naming the refusal and where the credentials came from, and the secret is nowhere
/// in its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_signatures_pass_a_server_that_checks_them_and_a_wrong_secret_exits_2_unlogged() {
    let moto = PrivateBroker::start_with("moto", &["1"]);
    // The three unauthenticated calls moto allows: a user, a policy, a key.
    let iam = aws_client(&moto.url, "iam", "setup", "setup");
    let user = "outboxd-relay";
    iam.query(&[
        ("Action", "CreateUser"),
        ("Version", "2010-05-08"),
        ("UserName", user),
    ])
    .await
    .unwrap();
    let policy =
        r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
    iam.query(&[
        ("Action", "PutUserPolicy"),
        ("Version", "2010-05-08"),
        ("UserName", user),
        ("PolicyName", "all"),
        ("PolicyDocument", policy),
    ])
    .await
    .unwrap();
    let key = iam
        .query(&[
            ("Action", "CreateAccessKey"),
            ("Version", "2010-05-08"),
            ("UserName", user),
        ])
        .await
        .unwrap();
    let text = |tag: &str| outboxd::sink::aws::xml::text(&key, tag).unwrap();
    let (key_id, secret) = (text("AccessKeyId"), text("SecretAccessKey"));
    let client = aws_client(&moto.url, "sqs", &key_id, &secret);
    let db = TestDb::new("sqs_sigv4").await;
    let queue_url = sqs_create_queue(&client, &format!("{}-order", db.name)).await;
    sqs_create_queue(&client, &format!("{}-dlq", db.name)).await;
    let sink = format!(
        "[sink]\nkind = \"sqs\"\n\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n\n\
         [sqs]\nqueue = \"{db}-{{aggregatetype}}\"\ndead_letter_queue = \"{db}-dlq\"\n",
        url = moto.url,
        db = db.name,
    );
    let config = db.config(&kafka_brokers(), &sink);
    migrate(&config);
    create_aggregates_table(&db.client().await).await;
    let env = |secret: &str| {
        vec![
            ("AWS_ACCESS_KEY_ID", key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", secret.to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
    };
    let good = env(&secret);
    let good: Vec<(&str, &str)> = good.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut relay = Relay::start_with_env(&config, &good);
    let written = concurrent_workload(&db, 200, 4, 20, &["order"]).await;
    let expect = ids(&written);
    let received = sqs_read(
        &client,
        &queue_url,
        &expect,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_written(&written, &received, true);
    relay.assert_running();
    relay.terminate(Duration::from_secs(10));

    let wrong_secret = "wrong-secret-must-never-be-logged-7d1e";
    let bad = env(wrong_secret);
    let bad: Vec<(&str, &str)> = bad.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut relay = Relay::start_with_env(&config, &bad);
    let status = relay.wait_exit(Duration::from_secs(30));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("SignatureDoesNotMatch"), "{log}");
    assert!(
        log.contains("AWS_ACCESS_KEY_ID"),
        "the source is named: {log}"
    );
    assert!(
        !log.contains(wrong_secret) && !log.contains(&secret),
        "{log}"
    );
}

fn run_with(config: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = std::env::temp_dir().join(unique("sqscfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("c.toml");
    std::fs::write(&path, config).unwrap();
    outboxd(&["run", "--config", path.to_str().unwrap()], env)
}

#[test]
fn bad_aws_sink_config_exits_2_with_one_line_naming_the_key() {
    let pg = "[postgres]\nurl = \"postgres://u@localhost/db\"\n[sink]\nkind = \"sqs\"\n";
    let env = aws_env();
    for (config, key) in [
        ("[sqs]\nqueue = \"q-{nope}\"\n", "sqs.queue"),
        (
            "[sqs]\ndead_letter_queue = \"no.dots\"\n",
            "sqs.dead_letter_queue",
        ),
        (
            "[sqs]\nmax_message_bytes = 2000000\n",
            "sqs.max_message_bytes",
        ),
        ("[aws]\nregion = \"EU West\"\n", "aws.region"),
        ("[aws]\nendpoint_url = \"sqs.local\"\n", "aws.endpoint_url"),
        (
            "[aws]\nmax_concurrent_requests = 0\n",
            "aws.max_concurrent_requests",
        ),
        ("[aws]\nsecret_access_key = \"x\"\n", "secret_access_key"),
        ("[kafka]\ndelivery = \"exactly-once\"\n", "kafka.delivery"),
        ("[sns]\n", "sns.topic_arn"),
        (
            "[sns]\ntopic_arn = \"arn:aws:sns:us-east-1:1:t\"\ndead_letter_topic_arn = \"dlq\"\n",
            "sns.dead_letter_topic_arn",
        ),
        (
            "[sns]\ntopic_arn = \"t-{aggregatetype}\"\ndead_letter_topic_arn = \"arn:aws:sns:us-east-1:1:d\"\nmax_message_bytes = 300000\n",
            "sns.max_message_bytes",
        ),
        ("[eventbridge]\n", "eventbridge.dead_letter_event_bus"),
        (
            "[eventbridge]\ndead_letter_event_bus = \"arn:aws:sqs:us-east-1:1:q\"\n",
            "eventbridge.dead_letter_event_bus",
        ),
        (
            "[eventbridge]\ndead_letter_event_bus = \"d\"\nsource = \"aws.orders\"\n",
            "eventbridge.source",
        ),
        (
            "[eventbridge]\ndead_letter_event_bus = \"d\"\ndetail_type = \"{kind}\"\n",
            "eventbridge.detail_type",
        ),
        (
            "[eventbridge]\ndead_letter_event_bus = \"d\"\nmax_entry_bytes = 300000\n",
            "eventbridge.max_entry_bytes",
        ),
    ] {
        // The [sns] and [eventbridge] cases are for that sink.
        let pg = match config.split(']').next() {
            Some("[sns") => pg.replace("\"sqs\"", "\"sns\""),
            Some("[eventbridge") => pg.replace("\"sqs\"", "\"eventbridge\""),
            _ => pg.to_string(),
        };
        let out = run_with(&format!("{pg}{config}"), &env);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(2), "{config}: {err}");
        assert!(err.contains(key), "{config}: expected `{key}` in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    }
    // No region anywhere: exit 2 naming aws.region (not a retry loop).
    let out = run_with(
        &format!("{pg}[aws]\nendpoint_url = \"http://127.0.0.1:9\"\n"),
        &[
            ("AWS_ACCESS_KEY_ID", "x"),
            ("AWS_SECRET_ACCESS_KEY", "y"),
            ("AWS_REGION", ""),
            ("AWS_DEFAULT_REGION", ""),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("aws.region"), "{err}");
}

/// 300 events from 8 writers through an SNS FIFO topic into a FIFO queue subscribed to it
/// (moto): every id once, per-aggregate order, and the start line promises both. (Few: moto
/// delivers into a FIFO queue in time that grows with the queue — the relay is not what
/// bounds this test; BENCHMARKS.md has what moto sustains.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sns_fifo_events_reach_a_fifo_subscription_each_once_in_per_aggregate_order() {
    let rig = Rig::sns("sns_order", "").await;
    let mut relay = rig.relay();
    let written = concurrent_workload(&rig.db, 300, 8, 30, &["order"]).await;
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    assert_eq!(
        duplicates, 0,
        "the FIFO subscription stored an event id twice"
    );
    relay.assert_running();
    assert_ready_with_the_broker_reachable(&rig.config).await;
    assert!(
        relay
            .log_text()
            .contains("per-key order: yes, broker-side dedup: yes"),
        "a FIFO topic's promises"
    );
}

/// A writer for 6 s (a transaction every 20 ms), the relay SIGKILLed twice: every committed
/// id reaches the FIFO subscription once (SNS's deduplication id is the event id), none
/// rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sns_fifo_relay_sigkilled_twice_mid_stream_loses_nothing_and_delivers_no_repeat() {
    let rig = Rig::sns("sns_kill", "").await;
    let writer = SteadyWriter {
        pause: Duration::from_millis(20),
        ..SteadyWriter::sink_test(6, 10, 0x5a5)
    }
    .spawn(&rig.db);
    let mut relay = relay_sigkilled_twice(|| rig.relay()).await;
    let (written, rolled_back) = writer.await.unwrap();
    let received = rig.read(&ids(&written)).await;
    let duplicates = assert_exactly_written(&written, &received);
    assert_eq!(
        duplicates, 0,
        "the FIFO subscription received an event id twice"
    );
    let seen: HashSet<_> = received.iter().filter_map(|r| r.id.clone()).collect();
    assert!(rolled_back.iter().all(|w| !seen.contains(&w.id)));
    eprintln!("{} events after 2 SIGKILLs", written.len());
    relay.assert_running();
}

/// An event whose topic does not exist between 40 others: retried, then dead-lettered to the
/// dead-letter topic (`retries_exhausted`, read from its subscribed queue); the rest arrive
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sns_event_for_a_missing_topic_is_dead_lettered_and_the_rest_flows() {
    let rig = Rig::sns("sns_dlq", "[sink]\nmax_record_retries = 3\n").await;
    missing_destination_is_dead_lettered_and_the_rest_flows(rig).await;
}

/// The credentials chain beyond the environment, against moto's SQS and STS: a relay whose
/// keys are in a shared credentials file under profile `relay` (`aws.profile`), and one with
/// only a web identity token and a role (EKS IRSA's variables), exchanged at STS
/// (`AssumeRoleWithWebIdentity`) — each says where its credentials came from and publishes
/// every event; neither sees `AWS_ACCESS_KEY_ID`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqs_credentials_come_from_a_profile_file_or_a_web_identity_token_exchanged_at_sts() {
    let moto = PrivateBroker::start_with("moto", &[]);
    let client = sqs_client(&moto.url);
    let dir = std::env::temp_dir().join(unique("aws-files"));
    std::fs::create_dir_all(&dir).unwrap();
    let credentials = dir.join("credentials");
    std::fs::write(
        &credentials,
        "[default]\naws_access_key_id = AKIAWRONGPROFILE0000\n\n[relay]\n\
         aws_access_key_id = AKIARELAYPROFILE0001\naws_secret_access_key = profile-secret\n",
    )
    .unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "eyJhbGciOiJSUzI1NiJ9.e30.c2ln").unwrap();
    let cases = [
        (
            "sqs_profile",
            "[aws]\nprofile = \"relay\"\n",
            vec![(
                "AWS_SHARED_CREDENTIALS_FILE",
                credentials.to_str().unwrap().to_string(),
            )],
            "credentials from profile relay",
        ),
        (
            "sqs_irsa",
            "",
            vec![
                (
                    "AWS_WEB_IDENTITY_TOKEN_FILE",
                    token.to_str().unwrap().to_string(),
                ),
                (
                    "AWS_ROLE_ARN",
                    "arn:aws:iam::123456789012:role/outboxd".to_string(),
                ),
                ("AWS_ENDPOINT_URL_STS", moto.url.clone()),
                ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_string()),
            ],
            "credentials from web identity token",
        ),
    ];
    for (prefix, extra, env, source) in cases {
        let db = TestDb::new(prefix).await;
        let queue_url = sqs_create_queue(&client, &format!("{}-order", db.name)).await;
        sqs_create_queue(&client, &format!("{}-dlq", db.name)).await;
        let sink = format!(
            "[sink]\nkind = \"sqs\"\n\n[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n\n\
             [sqs]\nqueue = \"{db}-{{aggregatetype}}\"\ndead_letter_queue = \"{db}-dlq\"\n{extra}",
            url = moto.url,
            db = db.name,
        );
        let config = db.config(&kafka_brokers(), &sink);
        migrate(&config);
        create_aggregates_table(&db.client().await).await;
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend([
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
            ("AWS_CONFIG_FILE", "/nonexistent"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ]);
        let mut relay = Relay::start_with_env(&config, &env);
        let written = concurrent_workload(&db, 100, 2, 10, &["order"]).await;
        let received = sqs_read(
            &client,
            &queue_url,
            &ids(&written),
            Duration::from_secs(60),
            Duration::from_millis(500),
        )
        .await;
        assert_written(&written, &received, true);
        let log = relay.log_text();
        assert!(
            log.contains(source),
            "expected `{source}` in the start line: {log}"
        );
        assert!(!log.contains("profile-secret"), "{log}");
        relay.assert_running();
    }
}
