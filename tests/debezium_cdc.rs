//! Table CDC side by side with Debezium's PostgreSQL connector (no EventRouter; Kafka
//! Connect's JSON converter without schemas): the same tables and row changes, captured by
//! both from their own slots and publications, compared record by record — topic, partition,
//! key bytes and value bytes — except the fields that legitimately differ (docs/cdc.md,
//! "Coming from Debezium"): `source.version` and the top-level `ts_ms`/`ts_us`/`ts_ns` (when
//! each processed the change). Both use one topic prefix; Connect's RegexRouter renames
//! Debezium's topics to `dbz_<topic>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

const TABLES: &str = "
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE t (
 id int PRIMARY KEY,
 i2 smallint, i4 integer, i8 bigint, f4 real, f8 double precision,
 n numeric, n102 numeric(10,2), m money, b bool,
 tx text, vc varchar(10), ch char(5), by bytea, u uuid, j json, jb jsonb, x xml,
 ai int[], at text[], e mood, d posint,
 dt date, tm time, tm3 time(3), ttz timetz, ts timestamp, ts3 timestamp(3), tstz timestamptz,
 tstz3 timestamptz(3), iv interval, ine inet, ci cidr, mac macaddr, bt bit(1), bt8 bit(8),
 bt16 bit(16), vb varbit, r int4range, tsv tsvector, pt point, hs hstore, o oid, ch1 \"char\"
);
CREATE TABLE k2 (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE full_t (id int PRIMARY KEY, v text, big text);
ALTER TABLE full_t REPLICA IDENTITY FULL;
CREATE TABLE toast_t (id int PRIMARY KEY, v int, big text);
";

/// One statement per transaction: every type with ordinary and edge values, updates with and
/// without FULL, a key change, deletes, an unchanged TOASTed value, a truncate.
const CHANGES: &[&str] = &[
    "INSERT INTO t VALUES (1, -32768, 2147483647, -9223372036854775808, 1.5, 3.141592653589793,
     12345.678901234567890, 12345678.91, '$1,234.56', true,
     E'h\\u00e9llo \"q\"\\n\\t\\u0001', 'abc', 'ab', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
     '{\"a\": 1}', '{\"b\": [1, 2]}', '<a>x</a>',
     '{1,NULL,3}', '{\"a b\",\"c\\\"d\",NULL}', 'happy', 7,
     '2024-02-29', '12:34:56.789012', '12:34:56.789', '12:34:56.789+02', '2024-02-29 12:34:56.789012',
     '2024-02-29 12:34:56.789', '2024-02-29 12:34:56.789012+02', '2024-02-29 12:34:56.7+00',
     '1 year 2 mons 3 days 04:05:06.789', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
     B'1', B'10100101', B'1000000000000010', B'101',
     '[1,10)', 'a fat cat', '(1.5,2.5)', 'a=>1, b=>NULL', 42, 'c')",
    "INSERT INTO t (id, n, f8, f4, dt, ts, tstz, ts3) VALUES (2, 'NaN', 'Infinity', '-Infinity', '-infinity', 'infinity', 'infinity', '-infinity')",
    "INSERT INTO t (id, n, dt, ts, tstz, tstz3, iv, f4, f8, ttz) VALUES (3, '-0.5', '0044-03-15 BC', '0044-03-15 12:00:00 BC',
     '1969-12-31 23:59:59.5+00', '2024-01-01 00:00:00+00', '-1 days +02:03:04.5', 1e20, 1.5e-5, '23:00:00-03')",
    "INSERT INTO t (id, n, dt, f8, iv) VALUES (4, 100, 'infinity', 1e7, '3 mons')",
    "INSERT INTO t (id, n, f8, iv) VALUES (5, 0, 0.001, '-00:00:01.5')",
    "INSERT INTO t (id, n, f8) VALUES (6, 1.50, 123456.789)",
    "UPDATE t SET tx = 'changed' WHERE id = 1",
    "UPDATE t SET id = 10 WHERE id = 3",
    "DELETE FROM t WHERE id = 2",
    "INSERT INTO k2 VALUES (1, 'x', 'v1')",
    "UPDATE k2 SET v = 'v2' WHERE a = 1",
    "DELETE FROM k2",
    "INSERT INTO full_t VALUES (1, 'a', repeat('x', 10))",
    "UPDATE full_t SET v = 'b'",
    "DELETE FROM full_t",
    "INSERT INTO toast_t SELECT 1, 1, string_agg(md5(g::text), '') FROM generate_series(1, 2000) g",
    "UPDATE toast_t SET v = 2",
    "TRUNCATE toast_t",
];

/// The records of 18 changes: 6 + 3 (update, key change as delete + tombstone + create) + 2
/// (delete + tombstone) on t; 4 on k2, 4 on full_t, 3 on toast_t.
const RECORDS: usize = 6 + 1 + 3 + 2 + 4 + 4 + 3;

/// The record with the fields that legitimately differ blanked: `source.version` and the
/// top-level processing time.
fn comparable(value: &str) -> String {
    let mut v = value.to_string();
    if let Some(i) = v.find("\"version\":\"") {
        let start = i + "\"version\":\"".len();
        let end = start + v[start..].find('"').unwrap();
        v.replace_range(start..end, "…");
    }
    if let Some(i) = v.rfind(",\"ts_ms\":") {
        v.replace_range(i.., ",\"ts\":…}");
    }
    v
}

/// A side's records in the order both must have written them: by the change's LSN, a
/// tombstone right after the delete before it in its partition.
fn in_change_order(mut records: Vec<Received>, prefix: &str) -> Vec<(String, Received)> {
    records.sort_by_key(|r| (r.topic.clone(), r.partition, r.offset));
    let mut keyed = Vec::new();
    let mut last = (String::new(), -1, 0u64);
    for r in records {
        let lsn = match &r.payload {
            Some(p) => {
                let v: serde_json::Value = serde_json::from_str(p).unwrap();
                let envelope = if v.get("schema").is_some() {
                    &v["payload"]
                } else {
                    &v
                };
                envelope["source"]["lsn"].as_u64().unwrap()
            }
            None if last.0 == r.topic && last.1 == r.partition => last.2,
            None => panic!("a tombstone that follows no delete: {r:?}"),
        };
        last = (r.topic.clone(), r.partition, lsn);
        let rank = match r.payload.as_deref() {
            None => 1,
            Some(p) if p.contains("\"op\":\"d\"") => 0,
            _ => 2,
        };
        let table = r.topic.strip_prefix(prefix).unwrap().to_string();
        keyed.push(((table.clone(), lsn, rank), (table, r)));
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.into_iter().map(|(_, r)| r).collect()
}

fn read_all(brokers: &str, topics: &[String]) -> Vec<Received> {
    read_all_n(brokers, topics, RECORDS)
}

fn read_all_n(brokers: &str, topics: &[String], n: usize) -> Vec<Received> {
    consume_count(
        brokers,
        topics,
        n,
        Duration::from_secs(120),
        Duration::from_secs(3),
    )
}

/// Both sides capture the same changes; each record is compared with the other's. `schemas`:
/// Kafka Connect's JSON converter with `schemas.enable=true` (outboxd: `cdc.schemas`).
/// `metadata`: transaction metadata on both (Debezium's `provide.transaction.metadata`);
/// the `<prefix>.transaction` records are compared too.
/// `modes`: Debezium's handling-mode properties, set on both (outboxd's `cdc.` keys are the
/// same names with `_` for `.`).
async fn same_change_events_as_debezium(
    prefix: &str,
    schemas: bool,
    metadata: bool,
    modes: &[(&str, &str)],
) {
    let brokers = kafka_brokers();
    let db = TestDb::new(prefix).await;
    let client = db.client().await;
    client.batch_execute(TABLES).await.unwrap();
    let tables = ["public.t", "public.k2", "public.full_t", "public.toast_t"];
    // One topic prefix (`source.name`, and the schema names) for both; Debezium's topics are
    // renamed to `dbz_<topic>` by Connect's RegexRouter so the two do not mix.
    let ours = db.name.clone();
    let theirs = format!("dbz_{}", db.name);
    let list = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let ours_modes: String = modes
        .iter()
        .map(|(k, v)| format!("{} = \"{v}\"\n", k.replace('.', "_")))
        .collect();
    let config = db.config(
        &brokers,
        &format!("[cdc]\ntables = [{list}]\ntopic_prefix = \"{ours}\"\nskipped_operations = [\"none\"]\nschemas = {schemas}\ntransaction_metadata = {metadata}\n{ours_modes}\n[cdc.snapshot]\nmode = \"never\"\n"),
    );
    migrate(&config);
    let slot = format!("{}_dbz", db.name);
    let include = format!("table.include.list={}", tables.join(","));
    let topic_prefix = format!("topic.prefix={ours}");
    let key_schemas = format!("key.converter.schemas.enable={schemas}");
    let value_schemas = format!("value.converter.schemas.enable={schemas}");
    let provide_metadata = format!("provide.transaction.metadata={metadata}");
    let theirs_modes: Vec<String> = modes.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let debezium = Debezium::start(
        &db,
        &slot,
        &slot,
        &theirs,
        &[
            "transforms=route",
            "transforms.route.type=org.apache.kafka.connect.transforms.RegexRouter",
            "transforms.route.regex=(.*)",
            "transforms.route.replacement=dbz_$1",
            &include,
            &topic_prefix,
            "key.converter=org.apache.kafka.connect.json.JsonConverter",
            &key_schemas,
            "value.converter=org.apache.kafka.connect.json.JsonConverter",
            &value_schemas,
            "tombstones.on.delete=true",
            "skipped.operations=none",
            &provide_metadata,
        ]
        .into_iter()
        .map(str::to_string)
        .chain(theirs_modes)
        .collect::<Vec<_>>()
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    let _relay = Relay::start(&config);
    db.streaming().await;
    for sql in CHANGES {
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    let topics = |p: &str| {
        tables
            .iter()
            .map(|t| format!("{p}.{t}"))
            .collect::<Vec<_>>()
    };
    let a = in_change_order(read_all(&brokers, &topics(&ours)), &format!("{ours}."));
    let b = in_change_order(read_all(&brokers, &topics(&theirs)), &format!("{theirs}."));
    if metadata {
        // One BEGIN and one END per transaction, each keyed by its own id.
        let txn = |p: &str| {
            let topic = format!("{p}.transaction");
            let mut got = read_all_n(&brokers, std::slice::from_ref(&topic), 2 * CHANGES.len());
            got.sort_by_key(|r| r.key.clone());
            got
        };
        let (ta, tb) = (txn(&ours), txn(&theirs));
        assert_eq!(ta.len(), 2 * CHANGES.len(), "outboxd's transaction records");
        assert_eq!(tb.len(), ta.len(), "Debezium's transaction records");
        for (o, d) in ta.iter().zip(&tb) {
            assert_eq!(o.key, d.key, "transaction record key");
            assert_eq!(o.partition, d.partition, "partition of {:?}", d.key);
            assert_eq!(o.payload, d.payload, "transaction record {:?}", d.key);
        }
    }
    drop(debezium);
    assert_eq!(a.len(), RECORDS, "outboxd's records");
    assert_eq!(b.len(), RECORDS, "Debezium's records");
    for (i, ((ta, o), (tb, d))) in a.iter().zip(&b).enumerate() {
        let what = format!("record {i} of {ta} (Debezium: {tb}, key {:?})", d.key);
        assert_eq!(ta, tb, "topic of {what}");
        assert_eq!(o.key, d.key, "key bytes of {what}");
        // A record without a key (a truncate) lands on a partition of the producer's choice.
        if d.key.is_some() {
            assert_eq!(o.partition, d.partition, "partition of {what}");
        }
        assert_eq!(
            o.payload.as_deref().map(comparable),
            d.payload.as_deref().map(comparable),
            "value bytes of {what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_and_outboxd_write_the_same_change_events_for_the_same_row_changes() {
    same_change_events_as_debezium("dbzcdc", false, false, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_schemas_enabled_debezium_and_outboxd_write_the_same_schema_and_payload() {
    same_change_events_as_debezium("dbzcdcschema", true, false, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_transaction_metadata_debezium_and_outboxd_write_the_same_begin_end_and_blocks() {
    same_change_events_as_debezium("dbzcdctxn", true, true, &[]).await;
}

/// The handling modes people set most, the other way from Debezium's defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_string_decimals_connect_times_hex_binary_iso_intervals_and_hstore_maps_both_write_the_same(
) {
    let modes = [
        ("decimal.handling.mode", "string"),
        ("time.precision.mode", "connect"),
        ("binary.handling.mode", "hex"),
        ("interval.handling.mode", "string"),
        ("hstore.handling.mode", "map"),
    ];
    same_change_events_as_debezium("dbzcdcmodes", true, false, &modes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_double_decimals_microsecond_times_and_url_safe_base64_both_write_the_same() {
    let modes = [
        ("decimal.handling.mode", "double"),
        ("time.precision.mode", "adaptive_time_microseconds"),
        ("binary.handling.mode", "base64-url-safe"),
    ];
    same_change_events_as_debezium("dbzcdcmodes2", true, false, &modes).await;
}
