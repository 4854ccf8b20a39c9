//! Kafka over TLS with SASL/SCRAM, as managed Kafka services require: a broker of the test's
//! own with a `SASL_SSL` listener on localhost, a throwaway CA and a SCRAM-SHA-256 user
//! created at format time (`scripts/stack.sh kafka-start-sasl`). The relay connects with
//! `[kafka.properties]` only; topics are created over the same connection (auto-creation is
//! off). Credentials or trust that can never work stop the relay with exit code 2 and one
//! line that names the problem, and no secret reaches any log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

const USER: &str = "relay";
const PASSWORD: &str = "Sc7am-pa55word-9f3";

/// `ca` names the CA file in the broker's `certs`; empty: no CA, certificate verification off
/// (a development cluster with a self-signed certificate).
fn sasl_properties(kafka: &PrivateKafka, password: &str, ca: &str) -> String {
    let trust = if ca.is_empty() {
        "\"enable.ssl.certificate.verification\" = \"false\"\n".to_string()
    } else {
        format!(
            "\"ssl.ca.location\" = \"{}\"\n",
            kafka.dir.join("certs").join(ca).display()
        )
    };
    format!(
        "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\
         \"sasl.mechanisms\" = \"SCRAM-SHA-256\"\n\"sasl.username\" = \"{USER}\"\n\
         \"sasl.password\" = \"{password}\"\n{trust}"
    )
}

/// Publishes 60 events over SASL_SSL with `extra` config; verified through the broker's
/// plaintext listener.
async fn publishes_over_sasl_ssl(prefix: &str, extra: &str, ca: &str) {
    let (kafka, sasl) = PrivateKafka::start_sasl(USER, PASSWORD);
    let config_extra = format!("{extra}{}", sasl_properties(&kafka, PASSWORD, ca));
    let (db, config) = setup(prefix, &sasl, &config_extra).await;
    let mut relay = Relay::start(&config);
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..20 {
        let events = vec![("order".to_string(), format!("agg-{}", i % 4)); 3];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    let received = consume(
        &kafka.brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::from_millis(300),
    );
    let dups = assert_exactly_written(&written, &received);
    relay.assert_running();
    assert!(!relay.log_text().contains(PASSWORD), "password in the log");
    if extra.contains("exactly-once") {
        assert_eq!(dups, 0);
        // Restarted, it reads its position back over the same SASL_SSL connection settings.
        relay.kill();
        let relay = Relay::start(&config);
        let more = write_txn(
            &mut client,
            &[("order".to_string(), "agg-9".to_string())],
            false,
        )
        .await
        .unwrap();
        written.extend(more);
        let received = consume(
            &kafka.brokers,
            &[db.topic("order")],
            &ids(&written),
            Duration::from_secs(60),
            Duration::from_millis(500),
        );
        assert_eq!(assert_exactly_written(&written, &received), 0);
        assert!(
            relay
                .log_text()
                .contains("resuming after the last committed Kafka transaction"),
            "{}",
            relay.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_over_sasl_ssl_with_scram_and_creates_its_topics_there() {
    publishes_over_sasl_ssl("sasl_ok", "", "ca.pem").await;
}

/// Exactly-once over SASL_SSL: the transactional producer, the position topic and the
/// position reader all authenticate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_works_over_sasl_ssl_including_the_position_read_back() {
    publishes_over_sasl_ssl(
        "sasl_eos",
        "[kafka]\ndelivery = \"exactly-once\"\n",
        "ca.pem",
    )
    .await;
}

/// Review E5: the connection settings the producer is given (here: certificate verification
/// off, no CA) reach the admin client that creates the topics and the reader of the
/// position topic too — else the producer connects while topic creation and the restart's
/// position read fail on a certificate they were told not to check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_verification_off_reaches_topic_creation_and_the_position_reader() {
    publishes_over_sasl_ssl(
        "sasl_noverify",
        "[kafka]\ndelivery = \"exactly-once\"\n",
        "",
    )
    .await;
}

/// Runs the relay against the SASL_SSL listener with `password` and `ca`, and returns its
/// exit status and log.
async fn refused(prefix: &str, password: &str, ca: &str) -> (std::process::ExitStatus, String) {
    let (kafka, sasl) = PrivateKafka::start_sasl(USER, PASSWORD);
    let (_db, config) = setup(prefix, &sasl, &sasl_properties(&kafka, password, ca)).await;
    let mut relay = Relay::start(&config);
    let status = relay.wait_exit(Duration::from_secs(60));
    (status, relay.log_text())
}

/// The last line of the log is the one the operator reads: one line, naming the problem.
fn last_line(log: &str) -> &str {
    log.lines().last().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_kafka_password_exits_2_with_one_line_and_no_secret_in_the_log() {
    let wrong = "Wr0ng-pa55word-77x";
    let (status, log) = refused("sasl_badpw", wrong, "ca.pem").await;
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    let line = last_line(&log);
    assert!(
        line.contains("authentication") && line.contains("sasl.password"),
        "the last line names the problem and the key: {line}"
    );
    assert!(!log.contains(wrong), "the wrong password reached the log");
    assert!(!log.contains(PASSWORD), "the password reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_certificate_from_an_unknown_ca_exits_2_with_one_line() {
    let (status, log) = refused("sasl_badca", PASSWORD, "other-ca.pem").await;
    assert_eq!(status.code(), Some(2), "log:\n{log}");
    let line = last_line(&log);
    assert!(
        line.contains("certificate") && line.contains("ssl.ca.location"),
        "the last line names the problem and the key: {line}"
    );
    assert!(!log.contains(PASSWORD), "the password reached the log");
}
