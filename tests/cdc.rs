//! Table CDC (`[cdc]`) on real PostgreSQL and Kafka: every change of a captured table
//! arrives as a Debezium-shaped change event — inserts, updates with and without REPLICA
//! IDENTITY FULL, key changes, deletes with their tombstones, truncates, unchanged TOASTed
//! values, excluded columns, a column added mid-stream — each asserted by id, key and value;
//! and the checks that stop the relay instead of letting changes vanish.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Reads `topics` until `n` records arrived (or 60 s); every record, in offset order per
/// partition.
fn read_n(brokers: &str, topics: &[String], n: usize) -> Vec<Received> {
    consume_count(
        brokers,
        topics,
        n,
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
}

fn value(r: &Received) -> Value {
    serde_json::from_str(
        r.payload
            .as_deref()
            .expect("a change event, not a tombstone"),
    )
    .unwrap()
}

/// `[cdc]` for `tables` with topic prefix `<db>`; `extra` lines are added to the section.
fn cdc_config(db: &TestDb, tables: &[&str], extra: &str) -> std::path::PathBuf {
    let list = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    db.config(
        &kafka_brokers(),
        &format!(
            "[cdc]\ntables = [{list}]\ntopic_prefix = \"{}\"\n{extra}\n[cdc.snapshot]\nmode = \"never\"\n",
            db.name
        ),
    )
}

/// Inserts, an update, a key change, a delete and a truncate: each event's id, op, key,
/// before and after — and the tombstones after the deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_change_arrives_as_a_change_event_with_its_key_and_before_image() {
    let brokers = kafka_brokers();
    let db = TestDb::new("cdcops").await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, password_hash text, tier int);
             CREATE TABLE ledger (id int PRIMARY KEY, amount numeric(10,2));
             ALTER TABLE ledger REPLICA IDENTITY FULL;",
        )
        .await
        .unwrap();
    let config = cdc_config(
        &db,
        &["public.customers", "public.ledger"],
        "skipped_operations = [\"none\"]\ncolumn_exclude = [\"public.customers.password_hash\"]",
    );
    migrate(&config);
    let _relay = Relay::start(&config);
    // The relay is streaming once its slot is active.
    db.streaming().await;
    for sql in [
        "INSERT INTO customers VALUES (1, 'ada', 'secret-1', 1)",
        "INSERT INTO customers VALUES (2, 'bob', 'secret-2', 1)",
        "UPDATE customers SET tier = 2 WHERE id = 1",
        "UPDATE customers SET id = 3 WHERE id = 2",
        "DELETE FROM customers WHERE id = 1",
        "INSERT INTO ledger VALUES (7, 10.50)",
        "UPDATE ledger SET amount = 11.00",
        "DELETE FROM ledger",
        "TRUNCATE customers",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    let customers = format!("{}.public.customers", db.name);
    let ledger = format!("{}.public.ledger", db.name);
    let got = read_n(&brokers, &[customers.clone(), ledger.clone()], 13);
    let by_topic = |t: &str| {
        let mut v: Vec<&Received> = got.iter().filter(|r| r.topic == t).collect();
        // By the change's LSN (the id's middle part); one change's events as written: a key
        // change's delete, tombstone, create.
        v.sort_by_key(|r| {
            let id = &r.headers["id"];
            let lsn: u64 = id.split('/').nth(1).unwrap().parse().unwrap();
            (lsn, ["d", "x", "c"].iter().position(|op| id.ends_with(op)))
        });
        v
    };
    let c = by_topic(&customers);
    let summary: Vec<(String, Option<String>)> = c
        .iter()
        .map(|r| (r.headers["type"].clone(), r.key.clone()))
        .collect();
    let k = |i: i32| Some(format!("{{\"id\":{i}}}"));
    assert_eq!(
        summary,
        vec![
            ("create".into(), k(1)),
            ("create".into(), k(2)),
            ("update".into(), k(1)),
            // The key change: the old key's delete and tombstone, then the new key's create.
            ("delete".into(), k(2)),
            ("tombstone".into(), k(2)),
            ("create".into(), k(3)),
            ("delete".into(), k(1)),
            ("tombstone".into(), k(1)),
            ("truncate".into(), None),
        ],
        "every change of customers, in commit order"
    );
    // Every id is unique, and names the table, the change's LSN and the op.
    let ids: HashSet<&String> = c.iter().map(|r| &r.headers["id"]).collect();
    assert_eq!(ids.len(), c.len());
    assert!(c
        .iter()
        .all(|r| r.headers["id"].starts_with("public.customers/")));
    let v0 = value(c[0]);
    assert_eq!(v0["op"], "c");
    assert_eq!(v0["before"], Value::Null);
    // The excluded column is not in the event at all.
    assert_eq!(
        v0["after"],
        serde_json::json!({"id": 1, "name": "ada", "tier": 1})
    );
    assert_eq!(v0["source"]["table"], "customers");
    assert_eq!(v0["source"]["schema"], "public");
    assert_eq!(v0["source"]["db"], db.name.as_str());
    assert_eq!(v0["source"]["connector"], "postgresql");
    assert_eq!(v0["source"]["name"], db.name.as_str());
    assert!(v0["source"]["txId"].as_u64().unwrap() > 0);
    let lsn = v0["source"]["lsn"].as_u64().unwrap();
    assert_eq!(c[0].headers["id"], format!("public.customers/{lsn}/c"));
    // DEFAULT identity: no before image on an update that keeps the key…
    let up = value(c[2]);
    assert_eq!(
        (up["op"].as_str(), &up["before"]),
        (Some("u"), &Value::Null)
    );
    assert_eq!(up["after"]["tier"], 2);
    // …and the old key only (other columns null) on a delete.
    let del = value(c[6]);
    assert_eq!(
        del["before"],
        serde_json::json!({"id": 1, "name": null, "tier": null})
    );
    assert_eq!(del["after"], Value::Null);
    assert!(
        c[4].payload.is_none() && c[7].payload.is_none(),
        "tombstones"
    );
    let t = value(c[8]);
    assert_eq!(
        (t["op"].as_str(), &t["before"], &t["after"]),
        (Some("t"), &Value::Null, &Value::Null)
    );

    // FULL identity: the whole old row on update and delete.
    let l = by_topic(&ledger);
    let ops: Vec<&str> = l.iter().map(|r| r.headers["type"].as_str()).collect();
    assert_eq!(ops, ["create", "update", "delete", "tombstone"]);
    let up = value(l[1]);
    // numeric(10,2) is a Connect Decimal: base64 of the unscaled value (1050 → "BBo=").
    assert_eq!(up["before"], serde_json::json!({"id": 7, "amount": "BBo="}));
    assert_eq!(up["after"], serde_json::json!({"id": 7, "amount": "BEw="}));
    assert_eq!(
        value(l[2])["before"],
        serde_json::json!({"id": 7, "amount": "BEw="})
    );
}

/// An update that leaves a TOASTed column unchanged: PostgreSQL does not write its value. By
/// default Debezium's placeholder takes its place; with `toast = "omit"` the column is left
/// out and header `outboxd.unavailable` names it; with REPLICA IDENTITY FULL the old row's
/// value is used. Never a `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_toasted_value_is_never_a_silent_null() {
    let brokers = kafka_brokers();
    for (mode, full) in [
        ("placeholder", false),
        ("omit", false),
        ("placeholder", true),
    ] {
        let db = TestDb::new("cdctoast").await;
        let client = db.client().await;
        client
            .batch_execute("CREATE TABLE docs (id int PRIMARY KEY, v int, body text)")
            .await
            .unwrap();
        if full {
            client
                .batch_execute("ALTER TABLE docs REPLICA IDENTITY FULL")
                .await
                .unwrap();
        }
        let config = cdc_config(&db, &["public.docs"], &format!("toast = \"{mode}\""));
        migrate(&config);
        let _relay = Relay::start(&config);
        db.streaming().await;
        // ~64 kB of incompressible text: stored out of line.
        client
            .batch_execute(
                "INSERT INTO docs SELECT 1, 1, string_agg(md5(g::text), '') FROM generate_series(1, 2000) g;
                 UPDATE docs SET v = 2;",
            )
            .await
            .unwrap();
        let topic = format!("{}.public.docs", db.name);
        let mut got = read_n(&brokers, std::slice::from_ref(&topic), 2);
        got.sort_by_key(|r| r.offset);
        assert_eq!(got.len(), 2, "{mode} full={full}");
        let body = value(&got[0])["after"]["body"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(body.len(), 64_000);
        let after = value(&got[1])["after"].clone();
        assert_eq!(after["v"], 2);
        match (mode, full) {
            ("placeholder", false) => {
                assert_eq!(after["body"], "__debezium_unavailable_value");
                assert!(!got[1].headers.contains_key("outboxd.unavailable"));
            }
            ("omit", _) => {
                assert!(after.get("body").is_none(), "{after}");
                assert_eq!(got[1].headers["outboxd.unavailable"], "body");
            }
            _ => assert_eq!(
                after["body"].as_str(),
                Some(body.as_str()),
                "taken from the old row"
            ),
        }
    }
}

/// A column added and one dropped while the relay streams: every event carries the columns
/// the table had when the change was written — never a stale or shifted column list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_or_dropped_mid_stream_changes_the_events_from_that_change_on() {
    let brokers = kafka_brokers();
    let db = TestDb::new("cdcddl").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE items (id int PRIMARY KEY, a text, b text)")
        .await
        .unwrap();
    let config = cdc_config(&db, &["public.items"], "");
    migrate(&config);
    let _relay = Relay::start(&config);
    db.streaming().await;
    client
        .batch_execute(
            "INSERT INTO items VALUES (1, 'a1', 'b1');
             ALTER TABLE items ADD COLUMN c int;
             INSERT INTO items VALUES (2, 'a2', 'b2', 2);
             ALTER TABLE items DROP COLUMN a;
             INSERT INTO items VALUES (3, 'b3', 3);
             ALTER TABLE items ALTER COLUMN c TYPE text;
             INSERT INTO items VALUES (4, 'b4', 'four');",
        )
        .await
        .unwrap();
    let topic = format!("{}.public.items", db.name);
    let mut got = read_n(&brokers, std::slice::from_ref(&topic), 4);
    got.sort_by_key(|r| r.key.clone());
    let afters: Vec<Value> = got.iter().map(|r| value(r)["after"].clone()).collect();
    assert_eq!(
        afters,
        vec![
            serde_json::json!({"id": 1, "a": "a1", "b": "b1"}),
            serde_json::json!({"id": 2, "a": "a2", "b": "b2", "c": 2}),
            serde_json::json!({"id": 3, "b": "b3", "c": 3}),
            serde_json::json!({"id": 4, "b": "b4", "c": "four"}),
        ]
    );
}

/// The checks that keep changes from vanishing: a captured table without a key for its
/// updates and deletes is refused at start (exit 2, naming the ALTER TABLE); a captured table
/// taken out of the publication mid-stream stops the relay (exit 2) with the slot short of
/// the changes written after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_table_without_a_key_or_out_of_the_publication_stops_the_relay() {
    let db = TestDb::new("cdcguard").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE keyed (id int PRIMARY KEY)")
        .await
        .unwrap();
    let config = cdc_config(&db, &["public.*"], "");
    migrate(&config);
    // A keyless table put into the publication by hand (migrate refuses to).
    client
        .batch_execute(
            "CREATE TABLE nokey (a int, b text); ALTER PUBLICATION outboxd ADD TABLE nokey",
        )
        .await
        .unwrap();
    let out = outboxd(&["run", "--config", config.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r#"ALTER TABLE "public"."nokey" REPLICA IDENTITY FULL"#),
        "{stderr}"
    );
    // `status` names it too, and lists what is captured — never outboxd's own tables
    // (`public.*` matches the outbox and the dead-letter table).
    let status = outboxd(&["status", "--config", config.to_str().unwrap()], &[]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{text}");
    assert!(
        text.contains("captured:      2 tables (public.keyed, public.nokey)"),
        "{text}"
    );
    assert!(
        text.contains(r#"captured table "public"."nokey" has no key"#),
        "{text}"
    );

    client
        .batch_execute("ALTER TABLE nokey REPLICA IDENTITY FULL")
        .await
        .unwrap();
    let mut relay = Relay::start(&config);
    db.streaming().await;
    relay.assert_running();
    client
        .batch_execute("ALTER PUBLICATION outboxd DROP TABLE keyed; INSERT INTO keyed VALUES (1)")
        .await
        .unwrap();
    let status = relay.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", relay.log_text());
    assert!(
        relay.log_text().contains("is not in publication"),
        "{}",
        relay.log_text()
    );
}

/// Types Debezium leaves out of its events (box, composites) or writes as `null` (`name`):
/// outboxd writes their text, so no column silently disappears; extension-like types
/// (here `int4range[]`, a domain over `text[]`) map through their base and element types.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_without_a_debezium_mapping_arrive_as_their_text() {
    let brokers = kafka_brokers();
    let db = TestDb::new("cdctypes").await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TYPE pair AS (a int, b text);
             CREATE DOMAIN tags AS text[];
             CREATE TABLE odd (id int PRIMARY KEY, bx box, c pair, nm name, rs int4range[], tg tags, ln line)",
        )
        .await
        .unwrap();
    let config = cdc_config(&db, &["public.odd"], "");
    migrate(&config);
    let _relay = Relay::start(&config);
    db.streaming().await;
    client
        .batch_execute(
            "INSERT INTO odd VALUES (1, '((0,0),(1,1))', ROW(1, 'x y'), 'nm', '{\"[1,2)\",NULL}', '{a,b}', '{1,-1,0}')",
        )
        .await
        .unwrap();
    let got = read_n(&brokers, &[format!("{}.public.odd", db.name)], 1);
    assert_eq!(
        value(&got[0])["after"],
        serde_json::json!({
            "id": 1, "bx": "(1,1),(0,0)", "c": "(1,\"x y\")", "nm": "nm",
            "rs": ["[1,2)", null], "tg": ["a", "b"], "ln": "{1,-1,0}"
        })
    );
}

/// A committed change as the writer recorded it: the row's id, Debezium's op, and the row's
/// `version` (unique across the whole run, so a change from a rolled-back transaction, or
/// one applied to the wrong row, cannot pass for a committed one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Committed {
    id: i32,
    op: char,
    version: i64,
}

/// Writers insert, update and delete rows of 40 ids for `run_for`, several changes per
/// transaction, one transaction in ten rolled back; returns the committed changes in commit
/// order and the versions of the rolled-back ones.
async fn cdc_writer(db: &TestDb, run_for: Duration, seed: u64) -> (Vec<Committed>, HashSet<i64>) {
    cdc_writer_from(db, run_for, seed, 1).await
}

/// [`cdc_writer`] continuing a table: the rows it finds are live, versions start at
/// `first_version`.
async fn cdc_writer_from(
    db: &TestDb,
    run_for: Duration,
    seed: u64,
    first_version: i64,
) -> (Vec<Committed>, HashSet<i64>) {
    let client = db.client().await;
    let mut rng = Rng::new(seed);
    let mut live: std::collections::HashMap<i32, i64> = client
        .query("SELECT id, version FROM accounts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut committed = Vec::new();
    let mut rolled_back = HashSet::new();
    let mut next_version = first_version;
    let end = std::time::Instant::now() + run_for;
    while std::time::Instant::now() < end {
        let rollback = rng.range(0, 9) == 0;
        let mut txn_live = live.clone();
        let mut changes = Vec::new();
        let mut sql = String::from("BEGIN;");
        for _ in 0..rng.range(1, 4) {
            let id = rng.range(1, 40) as i32;
            let version = next_version;
            next_version += 1;
            let (op, stmt) = match txn_live.get(&id) {
                None => ('c', format!("INSERT INTO accounts VALUES ({id}, {version}, {});", version * 10)),
                Some(_) if rng.range(0, 4) == 0 => ('d', format!("DELETE FROM accounts WHERE id = {id};")),
                Some(_) => ('u', format!("UPDATE accounts SET version = {version}, balance = balance + 1 WHERE id = {id};")),
            };
            let recorded = match op {
                'd' => txn_live.remove(&id).unwrap(),
                _ => {
                    txn_live.insert(id, version);
                    version
                }
            };
            sql.push_str(&stmt);
            changes.push(Committed {
                id,
                op,
                version: recorded,
            });
        }
        if rollback {
            sql.push_str("ROLLBACK;");
            client.batch_execute(&sql).await.unwrap();
            rolled_back.extend(changes.iter().filter(|c| c.op != 'd').map(|c| c.version));
        } else {
            sql.push_str("COMMIT;");
            client.batch_execute(&sql).await.unwrap();
            live = txn_live;
            committed.extend(changes);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (committed, rolled_back)
}

/// What a change event says it is: (row id, op, version), from `after` (create, update) or
/// the FULL `before` (delete); `None` for a tombstone.
fn change_of(r: &Received) -> Option<Committed> {
    let p = r.payload.as_deref()?;
    let v: serde_json::Value = serde_json::from_str(p).unwrap();
    let op = v["op"].as_str().unwrap().chars().next().unwrap();
    let row = if op == 'd' { &v["before"] } else { &v["after"] };
    Some(Committed {
        id: row["id"].as_i64().unwrap() as i32,
        op,
        version: row["version"].as_i64().unwrap(),
    })
}

/// SIGKILLs at random points while writers insert, update and delete: every committed change
/// arrives, in commit order per key (a repeat after a restart only re-runs a key's suffix),
/// nothing from a rolled-back transaction does, and the latest record per key is the table's
/// row — or a tombstone for a row that no longer exists. With `exactly_once`, each change
/// arrives once (read_committed).
async fn changes_survive_sigkills(prefix: &str, exactly_once: bool) {
    let brokers = kafka_brokers();
    let db = TestDb::new(prefix).await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, version bigint NOT NULL, balance bigint); ALTER TABLE accounts REPLICA IDENTITY FULL;")
        .await
        .unwrap();
    let eos = if exactly_once {
        "[kafka]\ndelivery = \"exactly-once\"\ntransaction_ms = 20\n"
    } else {
        ""
    };
    let config = cdc_config(&db, &["public.accounts"], eos);
    migrate(&config);
    let writer = {
        let db = TestDb {
            name: db.name.clone(),
            url: db.url.clone(),
            dir: db.dir.clone(),
        };
        tokio::spawn(async move { cdc_writer(&db, Duration::from_secs(20), 0xcdc1).await })
    };
    let mut rng = Rng::new(0xc0de);
    let mut kills = 0;
    while !writer.is_finished() {
        let mut relay = Relay::start(&config);
        tokio::time::sleep(Duration::from_millis(rng.range(300, 2_500))).await;
        relay.kill();
        kills += 1;
    }
    let (committed, rolled_back) = writer.await.unwrap();
    assert!(kills >= 6, "only {kills} kills");
    let mut relay = Relay::start(&config);
    let repeats =
        assert_changes_arrived(&db, &brokers, &committed, &rolled_back, exactly_once).await;
    eprintln!(
        "{kills} kills, {} changes, {repeats} repeats, {} rolled back",
        committed.len(),
        rolled_back.len()
    );
    relay.assert_running();
}

/// Reads `<db>.public.accounts` until every committed change arrived (or 120 s) and checks
/// what [`changes_survive_sigkills`] promises; returns the number of repeats.
async fn assert_changes_arrived(
    db: &TestDb,
    brokers: &str,
    committed: &[Committed],
    rolled_back: &HashSet<i64>,
    exactly_once: bool,
) -> usize {
    let client = db.client().await;
    let topic = format!("{}.public.accounts", db.name);
    let want: HashSet<Committed> = committed.iter().copied().collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let received = loop {
        let got = consume(
            brokers,
            std::slice::from_ref(&topic),
            &HashSet::new(),
            Duration::from_secs(30),
            Duration::from_secs(2),
        );
        let seen: HashSet<Committed> = got.iter().filter_map(change_of).collect();
        if want.is_subset(&seen) || std::time::Instant::now() > deadline {
            break got;
        }
    };
    let mut ordered: Vec<&Received> = received.iter().collect();
    ordered.sort_by_key(|r| (r.partition, r.offset));
    // Position of each committed change in commit order, per key.
    let mut order: std::collections::HashMap<Committed, usize> = std::collections::HashMap::new();
    for (i, c) in committed.iter().enumerate() {
        order.insert(*c, i);
    }
    let mut first_seen = HashSet::new();
    let mut last_of_key: std::collections::HashMap<String, usize> =
        std::collections::HashMap::new();
    let mut latest: std::collections::HashMap<String, &Received> = std::collections::HashMap::new();
    let mut repeats = 0;
    for r in &ordered {
        let key = r.key.clone().expect("every change of accounts has a key");
        latest.insert(key.clone(), r);
        let Some(change) = change_of(r) else { continue };
        assert!(
            !rolled_back.contains(&change.version),
            "a change of a rolled-back transaction arrived: {change:?}"
        );
        let at = *order
            .get(&change)
            .unwrap_or_else(|| panic!("{change:?} was never committed"));
        assert_eq!(
            key,
            format!("{{\"id\":{}}}", change.id),
            "key of {change:?}"
        );
        if !first_seen.insert(change) {
            repeats += 1;
            continue;
        }
        let last = last_of_key.entry(key.clone()).or_insert(0);
        assert!(
            at >= *last,
            "{change:?} arrived after a later change of its key"
        );
        *last = at;
    }
    let missing: Vec<&Committed> = committed
        .iter()
        .filter(|c| !first_seen.contains(c))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} changes never arrived, e.g. {:?}",
        missing.len(),
        committed.len(),
        &missing[..missing.len().min(5)]
    );
    if exactly_once {
        assert_eq!(repeats, 0, "exactly-once: a change arrived twice");
    }
    // The topic's latest record per key is the table's row.
    let rows = client
        .query("SELECT id, version FROM accounts", &[])
        .await
        .unwrap();
    let table: std::collections::HashMap<String, i64> = rows
        .iter()
        .map(|r| (format!("{{\"id\":{}}}", r.get::<_, i32>(0)), r.get(1)))
        .collect();
    for (key, r) in &latest {
        match (table.get(key), change_of(r)) {
            (Some(v), Some(c)) => {
                assert_eq!((c.version, c.op != 'd'), (*v, true), "latest of {key}")
            }
            (None, None) => {}
            (row, last) => panic!("latest record of {key} is {last:?}, the table has {row:?}"),
        }
    }
    repeats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_change_survives_sigkills_in_per_key_order() {
    changes_survive_sigkills("cdckills", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_every_committed_change_arrives_once_across_sigkills() {
    changes_survive_sigkills("cdceoskills", true).await;
}

/// A captured table dropped and recreated mid-stream — even when it is added back to the
/// publication at once — stops the relay: rows written in between are not in the stream.
/// A publication row filter on a captured table stops it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captured_table_recreated_or_row_filtered_stops_the_relay() {
    let db = TestDb::new("cdcrecreate").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE t1 (id int PRIMARY KEY); CREATE TABLE t2 (id int PRIMARY KEY)")
        .await
        .unwrap();
    let config = cdc_config(&db, &["public.t1", "public.t2"], "");
    migrate(&config);
    let mut relay = Relay::start(&config);
    db.streaming().await;
    relay.assert_running();
    client
        .batch_execute(
            "DROP TABLE t1; CREATE TABLE t1 (id int PRIMARY KEY); INSERT INTO t1 VALUES (1);
             ALTER PUBLICATION outboxd ADD TABLE t1; INSERT INTO t1 VALUES (2);",
        )
        .await
        .unwrap();
    let status = relay.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", relay.log_text());
    assert!(
        relay.log_text().contains("was dropped and recreated"),
        "{}",
        relay.log_text()
    );

    // A fresh start accepts the new table; then a row filter on t2 stops the relay.
    let mut relay = Relay::start(&config);
    db.streaming().await;
    client
        .batch_execute("ALTER PUBLICATION outboxd SET TABLE outbox, t1, t2 WHERE (id > 10)")
        .await
        .unwrap();
    let status = relay.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2), "{}", relay.log_text());
    assert!(
        relay.log_text().contains("row filter"),
        "{}",
        relay.log_text()
    );
}

/// REPLICA IDENTITY USING INDEX on a table without a primary key: the key and the before
/// image of a delete are the index's columns. A table with no key at all, captured for
/// inserts only, has events without a key (PostgreSQL itself refuses UPDATE and DELETE on
/// such a table once a publication publishes them: `outboxd migrate` refuses to add it to
/// one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_index_is_the_key_and_a_keyless_table_is_captured_for_inserts_only() {
    let brokers = kafka_brokers();
    let db = TestDb::new("cdcident").await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE users (email text NOT NULL, name text);
             CREATE UNIQUE INDEX users_email ON users (email);
             ALTER TABLE users REPLICA IDENTITY USING INDEX users_email;
             CREATE TABLE log (line text);",
        )
        .await
        .unwrap();
    // Updates and deletes captured: migrate refuses to put the keyless table in the
    // publication, naming the fix.
    let both = cdc_config(&db, &["public.users", "public.log"], "");
    let out = outboxd(&["migrate", "--config", both.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("would refuse every UPDATE and DELETE"),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"ALTER TABLE "public"."log" REPLICA IDENTITY FULL"#),
        "{stderr}"
    );
    let config = cdc_config(&db, &["public.users"], "tombstones_on_delete = false");
    migrate(&config);
    let _relay = Relay::start(&config);
    db.streaming().await;
    client
        .batch_execute("INSERT INTO users VALUES ('a@x', 'ada'); DELETE FROM users;")
        .await
        .unwrap();
    let users = format!("{}.public.users", db.name);
    let got = read_n(&brokers, std::slice::from_ref(&users), 2);
    let mut u: Vec<&Received> = got.iter().filter(|r| r.topic == users).collect();
    u.sort_by_key(|r| r.offset);
    assert_eq!(u.len(), 2);
    assert!(u
        .iter()
        .all(|r| r.key.as_deref() == Some(r#"{"email":"a@x"}"#)));
    assert_eq!(
        value(u[1])["before"],
        serde_json::json!({"email": "a@x", "name": null})
    );

    // Inserts only: the keyless table is captured, its events have no key.
    let db = TestDb::new("cdckeyless").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE log (line text)")
        .await
        .unwrap();
    let config = cdc_config(
        &db,
        &["public.log"],
        "skipped_operations = [\"u\", \"d\", \"t\"]",
    );
    migrate(&config);
    let _relay = Relay::start(&config);
    db.streaming().await;
    client
        .batch_execute("INSERT INTO log VALUES ('hello'); INSERT INTO log VALUES ('bye');")
        .await
        .unwrap();
    let l = read_n(&brokers, &[format!("{}.public.log", db.name)], 2);
    assert!(l.iter().all(|r| r.key.is_none()));
    // Without a key, each lands on a partition of the producer's choice.
    let mut lines: Vec<String> = l
        .iter()
        .map(|r| value(r)["after"]["line"].as_str().unwrap().to_string())
        .collect();
    lines.sort();
    assert_eq!(lines, ["bye", "hello"]);
    // The publication publishes inserts only, so PostgreSQL lets the service update it.
    client
        .batch_execute("UPDATE log SET line = 'x'")
        .await
        .unwrap();
}

/// Columns added and dropped while three writers insert: in commit (LSN) order the events'
/// column sets go {id, a} → {id, a, b} → {id, b} and never back, every value is the one
/// written (`a` = `a<id>`, `b` = its default 7), and every row arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn columns_added_and_dropped_under_concurrent_writers_never_shift_an_events_columns() {
    let brokers = kafka_brokers();
    let db = TestDb::new("cdcddlload").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE evolve (id bigint PRIMARY KEY, a text)")
        .await
        .unwrap();
    let config = cdc_config(&db, &["public.evolve"], "");
    migrate(&config);
    let _relay = Relay::start(&config);
    db.streaming().await;
    let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3i64 {
        let (url, written, stop) = (db.url.clone(), written.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let c = connect(&url).await;
            let mut i = 0i64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = w * 1_000_000 + i;
                // Before the drop, `a` is written; after it, the insert names `id` only.
                let sql = format!("INSERT INTO evolve (id, a) VALUES ({id}, 'a{id}')");
                match c.batch_execute(&sql).await {
                    Ok(()) => written.lock().unwrap().push(id),
                    Err(e)
                        if e.as_db_error()
                            .is_some_and(|d| d.message().contains("column \"a\"")) =>
                    {
                        c.batch_execute(&format!("INSERT INTO evolve (id) VALUES ({id})"))
                            .await
                            .unwrap();
                        written.lock().unwrap().push(id);
                    }
                    Err(e) => panic!("{e}"),
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    client
        .batch_execute("ALTER TABLE evolve ADD COLUMN b int DEFAULT 7")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    client
        .batch_execute("ALTER TABLE evolve DROP COLUMN a")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }
    let written = written.lock().unwrap().clone();
    let topic = format!("{}.public.evolve", db.name);
    let got = read_n(&brokers, std::slice::from_ref(&topic), written.len());
    let mut events: Vec<(u64, Value)> = got
        .iter()
        .map(|r| {
            let v = value(r);
            (v["source"]["lsn"].as_u64().unwrap(), v["after"].clone())
        })
        .collect();
    events.sort_by_key(|(lsn, _)| *lsn);
    let mut phase = 0;
    let mut seen = HashSet::new();
    for (lsn, after) in &events {
        let id = after["id"].as_i64().unwrap();
        // serde_json's map sorts the names.
        let columns: Vec<&str> = after
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let now = match columns.as_slice() {
            ["a", "id"] => 0,
            ["a", "b", "id"] => 1,
            ["b", "id"] => 2,
            other => panic!("event at {lsn} has columns {other:?}"),
        };
        assert!(
            now >= phase,
            "event at {lsn} (id {id}) has the columns of an earlier schema: {after}"
        );
        phase = now;
        if now < 2 {
            assert_eq!(after["a"], format!("a{id}").as_str(), "{after}");
        }
        if now > 0 {
            assert_eq!(after["b"], 7, "{after}");
        }
        seen.insert(id);
    }
    assert_eq!(phase, 2, "the events went through all three schemas");
    let missing: Vec<&i64> = written.iter().filter(|id| !seen.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} rows never arrived",
        missing.len(),
        written.len()
    );
}

/// PostgreSQL crash-restarted (immediate stop: every backend killed, crash recovery) while the
/// relay publishes changes it has not confirmed yet: the relay reconnects, PostgreSQL
/// describes the captured tables again, and every committed change arrives, in per-key
/// order, the latest per key equal to the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_change_survives_a_postgresql_crash_restart() {
    let brokers = kafka_brokers();
    let cluster = PrivateCluster::start("");
    let db = cluster.db("cdccrash");
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, version bigint NOT NULL, balance bigint); ALTER TABLE accounts REPLICA IDENTITY FULL;")
        .await
        .unwrap();
    drop(client);
    let config = cdc_config(&db, &["public.accounts"], "");
    migrate(&config);
    let mut relay = Relay::start(&config);
    db.streaming().await;
    let (mut committed, mut rolled_back) = cdc_writer(&db, Duration::from_secs(5), 0xc1a5).await;
    cluster.crash_restart();
    // The second writer's versions must not repeat the first's.
    let (more, more_rolled) =
        cdc_writer_from(&db, Duration::from_secs(5), 0xc1a6, 10_000_000).await;
    committed.extend(more);
    rolled_back.extend(more_rolled);
    let repeats = assert_changes_arrived(&db, &brokers, &committed, &rolled_back, false).await;
    eprintln!(
        "{} changes across a crash-restart, {repeats} repeats",
        committed.len()
    );
    relay.assert_running();
    assert!(
        relay.log_text().contains("reconnect") || relay.log_text().contains("retry"),
        "{}",
        relay.log_text()
    );
}

/// Two pipelines on one database, each its own slot, publication and table group — one of
/// them table-CDC-only (`postgres.outbox = false`: no outbox table created, relayed or
/// required): each table's changes arrive once, from its own pipeline; the outbox's events
/// only from the pipeline that relays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_pipelines_split_the_tables_and_a_cdc_only_one_needs_no_outbox() {
    let brokers = kafka_brokers();
    let db = TestDb::new("cdcsplit").await;
    let client = db.client().await;
    client
        .batch_execute(
            "CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE users (id int PRIMARY KEY)",
        )
        .await
        .unwrap();
    // Pipeline 1: the outbox and `orders`.
    let one = cdc_config(&db, &["public.orders"], "");
    migrate(&one);
    // Pipeline 2: `users` only, its own slot and publication, no outbox.
    let slot2 = format!("{}_users", db.name);
    let two = db.config(
        &brokers,
        &format!(
            "[postgres]\nslot = \"{slot2}\"\npublication = \"{slot2}\"\ntable = \"unused_outbox\"\noutbox = false\n\
             [cdc]\ntables = [\"public.users\"]\ntopic_prefix = \"{}\"\n[cdc.snapshot]\nmode = \"never\"\n",
            db.name
        ),
    );
    migrate(&two);
    let row = client
        .query_one(
            "SELECT to_regclass('public.unused_outbox') IS NULL, \
                    (SELECT array_agg(tablename::text ORDER BY tablename) FROM pg_publication_tables WHERE pubname = $1)",
            &[&slot2],
        )
        .await
        .unwrap();
    assert!(
        row.get::<_, bool>(0),
        "a CDC-only pipeline creates no outbox table"
    );
    assert_eq!(
        row.get::<_, Vec<String>>(1),
        ["users"],
        "its publication holds its tables only"
    );
    let _a = Relay::start(&one);
    let _b = Relay::start(&two);
    db.streaming().await;
    client
        .batch_execute(
            "INSERT INTO orders VALUES (1), (2); INSERT INTO users VALUES (10);
             INSERT INTO outbox (aggregatetype, aggregateid, type, payload) VALUES ('order', '1', 'Placed', '{}')",
        )
        .await
        .unwrap();
    let orders = format!("{}.public.orders", db.name);
    let users = format!("{}.public.users", db.name);
    let got = read_n(
        &brokers,
        &[orders.clone(), users.clone(), db.topic("order")],
        4,
    );
    let mut seen: Vec<(String, Option<String>)> = got
        .iter()
        .map(|r| (r.topic.clone(), r.key.clone()))
        .collect();
    seen.sort();
    let mut want = vec![
        (orders.clone(), Some(r#"{"id":1}"#.to_string())),
        (orders, Some(r#"{"id":2}"#.to_string())),
        (users, Some(r#"{"id":10}"#.to_string())),
        (db.topic("order"), Some("1".to_string())),
    ];
    want.sort();
    assert_eq!(seen, want, "each change once, from its own pipeline");
}

/// The broker down for several delivery timeouts while writers insert, update and delete
/// (librdkafka's MockCluster, the one fault it injects): the slot holds, and once the broker
/// is back every committed change arrives in per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_change_survives_a_broker_outage() {
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = mock.bootstrap_servers();
    let db = TestDb::new("cdcbrokerdown").await;
    let client = db.client().await;
    client
        .batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, version bigint NOT NULL, balance bigint); ALTER TABLE accounts REPLICA IDENTITY FULL;")
        .await
        .unwrap();
    let config = db.config(
        &brokers,
        &format!(
            "[kafka]\ncreate_topics = false\ndelivery_timeout_ms = 2000\n\
             [cdc]\ntables = [\"public.accounts\"]\ntopic_prefix = \"{}\"\n[cdc.snapshot]\nmode = \"never\"\n",
            db.name
        ),
    );
    mock.create_topic(&format!("{}.public.accounts", db.name), 3, 1)
        .unwrap();
    migrate(&config);
    let mut relay = Relay::start(&config);
    db.streaming().await;
    let writer = {
        let db = TestDb {
            name: db.name.clone(),
            url: db.url.clone(),
            dir: db.dir.clone(),
        };
        tokio::spawn(async move { cdc_writer(&db, Duration::from_secs(10), 0xb0d).await })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    mock.broker_down(1).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    mock.broker_up(1).unwrap();
    let (committed, rolled_back) = writer.await.unwrap();
    let repeats = assert_changes_arrived(&db, &brokers, &committed, &rolled_back, false).await;
    eprintln!(
        "{} changes across a 5 s broker outage, {repeats} repeats",
        committed.len()
    );
    relay.assert_running();
    let log = relay.log_text();
    assert!(log.contains("AllBrokersDown"), "the broker was down: {log}");
}
