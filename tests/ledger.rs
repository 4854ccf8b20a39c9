//! The delivery ledger (`outboxd::ledger`): every relay under test checks each confirmation
//! against what each event's own delivery report said, so the whole suite checks "the source
//! is never confirmed past an undelivered event" for free. These tests prove the check is
//! wired into both sources: a relay made to forget an event (the debug-build failpoint
//! `drop_first_event`) stops with exit code 3 naming it, before its slot or cursor passes it,
//! and the next relay publishes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

async fn ledger_stops_a_relay_that_forgot_an_event(prefix: &str, extra: &str) {
    let brokers = kafka_brokers();
    let (db, config) = setup(prefix, &brokers, extra).await;
    let mut client = db.client().await;
    let mut written = Vec::new();
    for i in 0..3 {
        let events = [("order".to_string(), format!("agg-{i}"))];
        written.extend(write_txn(&mut client, &events, false).await.unwrap());
    }
    if extra.contains("polling") {
        fill_polling_order(&db, &mut written).await;
    }
    let mut relay = Relay::start_with_env(&config, &[("OUTBOXD_FAILPOINT", "drop_first_event")]);
    relay.expect_ledger_violation = true;
    let status = relay.wait_exit(Duration::from_secs(60));
    let log = relay.log_text();
    assert_eq!(status.code(), Some(3), "exit status; log:\n{log}");
    let first = &written[0].id;
    let line = log
        .lines()
        .find(|l| l.contains(LEDGER_VIOLATION))
        .unwrap_or_else(|| panic!("no ledger violation in the log:\n{log}"));
    assert!(
        line.contains(first.as_str()),
        "the violation names {first}: {line}"
    );
    drop(relay);

    // Nothing was confirmed past the forgotten event: a relay without the fault publishes it.
    let _relay = Relay::start(&config);
    let received = consume(
        &brokers,
        &[db.topic("order")],
        &ids(&written),
        Duration::from_secs(60),
        Duration::ZERO,
    );
    assert_written(&written, &received, true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_stops_the_relay_before_the_slot_passes_an_event_that_was_never_delivered() {
    ledger_stops_a_relay_that_forgot_an_event("ledgerslot", "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_stops_the_relay_before_the_cursor_passes_an_event_that_was_never_delivered() {
    ledger_stops_a_relay_that_forgot_an_event(
        "ledgercursor",
        "mode = \"polling\"\n[polling]\ninterval_ms = 200\n",
    )
    .await;
}
