//! OpenTelemetry traces through the relay, against a real Jaeger (v1.75.0, built from the Go
//! module proxy by `scripts/stack.sh jaeger-start`) and real PostgreSQL and Kafka: every
//! traced event's span is found through Jaeger's query API as a child of the writer's span,
//! with the event's id, destination, partition and offset; the outgoing `traceparent` names
//! that span, and a consumer's span continued from it lands in the same trace; a dead letter's
//! span says so and why; and a collector that never answers costs spans, never an event.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A Jaeger of the test's own: (OTLP gRPC URL, OTLP HTTP URL, query URL).
fn jaeger() -> (PrivateBroker, String, String, String) {
    let j = PrivateBroker::start_with("jaeger", &[]);
    let urls: Vec<String> = j.url.split_whitespace().map(str::to_string).collect();
    let (grpc, http, query) = (urls[0].clone(), urls[1].clone(), urls[2].clone());
    (j, grpc, http, query)
}

/// 32 / 16 hex digits from a counter and a seed.
fn hex_id(seed: u64, n: u64, bytes: usize) -> String {
    let mut rng = Rng::new(seed ^ (n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    (0..bytes)
        .map(|_| format!("{:02x}", rng.range(0, 255)))
        .collect()
}

/// Inserts an event with `headers`; its id.
async fn insert(
    client: &tokio_postgres::Client,
    agg: &str,
    key: &str,
    headers: Option<Value>,
) -> String {
    client
        .query_one(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             VALUES ($1, $2, 'Happened', '{\"n\": 1}', $3::text::jsonb) RETURNING id::text",
            &[&agg, &key, &headers.map(|h| h.to_string())],
        )
        .await
        .unwrap()
        .get(0)
}

/// The trace `trace_id` as Jaeger's query API returns it, once it holds `spans` spans.
async fn trace(query: &str, trace_id: &str, spans: usize) -> Value {
    let client = reqwest::Client::new();
    let url = format!("{query}/api/traces/{trace_id}");
    let mut last = Value::Null;
    for _ in 0..150 {
        if let Ok(r) = client.get(&url).send().await {
            if let Ok(v) = serde_json::from_slice::<Value>(&r.bytes().await.unwrap_or_default()) {
                let n = v["data"][0]["spans"].as_array().map_or(0, Vec::len);
                if n >= spans {
                    return v["data"][0].clone();
                }
                last = v;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("trace {trace_id} never held {spans} spans in Jaeger: {last}");
}

/// The span `span_id` of a trace, and its tags as a map.
fn span<'a>(trace: &'a Value, span_id: &str) -> (&'a Value, HashMap<String, Value>) {
    let span = trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["spanID"] == span_id)
        .unwrap_or_else(|| panic!("no span {span_id} in {trace}"));
    let tags = span["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["key"].as_str().unwrap().to_string(), t["value"].clone()))
        .collect();
    (span, tags)
}

/// The span id a span names as its parent (`CHILD_OF`), if any.
fn parent_of(span: &Value) -> Option<String> {
    span["references"].as_array().and_then(|refs| {
        refs.iter()
            .find(|r| r["refType"] == "CHILD_OF")
            .map(|r| r["spanID"].as_str().unwrap().to_string())
    })
}

/// A trace as an indented tree: service, operation, duration, tags.
fn tree(trace: &Value) -> String {
    fn walk(spans: &[Value], trace: &Value, parent: Option<&str>, depth: usize, out: &mut String) {
        for s in spans.iter().filter(|s| parent_of(s).as_deref() == parent) {
            let service = &trace["processes"][s["processID"].as_str().unwrap()]["serviceName"];
            let tags: Vec<String> = s["tags"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|t| !t["key"].as_str().unwrap().starts_with("otel.scope"))
                .map(|t| format!("{}={}", t["key"].as_str().unwrap(), t["value"]))
                .collect();
            out.push_str(&format!(
                "{}└─ {} {} {:.1} ms [{}]\n",
                "   ".repeat(depth),
                service.as_str().unwrap(),
                s["operationName"].as_str().unwrap(),
                s["duration"].as_f64().unwrap() / 1000.0,
                tags.join(", ")
            ));
            walk(spans, trace, s["spanID"].as_str(), depth + 1, out);
        }
    }
    let spans = trace["spans"].as_array().unwrap();
    let mut out = format!("trace {}\n", trace["traceID"].as_str().unwrap());
    // The writer's span is the service's, not in this backend: its children are the roots.
    let known: HashSet<&str> = spans
        .iter()
        .map(|s| s["spanID"].as_str().unwrap())
        .collect();
    let mut writers: Vec<String> = spans
        .iter()
        .filter_map(parent_of)
        .filter(|p| !known.contains(p.as_str()))
        .collect();
    writers.dedup();
    for w in writers {
        out.push_str(&format!(
            "(writer's span {w}, in the service that committed the row)\n"
        ));
        walk(spans, trace, Some(&w), 0, &mut out);
    }
    out
}

/// The `traceparent` a record carries: (trace id, span id, flags).
fn traceparent(r: &Received) -> Option<(String, String, String)> {
    let v = r.headers.get("traceparent")?;
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "{v}");
    Some((parts[1].into(), parts[2].into(), parts[3].into()))
}

/// Reads `topic` until every id of `expect` arrived: the records by event id.
fn arrived(brokers: &str, topic: String, expect: &HashSet<String>) -> HashMap<String, Received> {
    let got = consume(
        brokers,
        &[topic],
        expect,
        Duration::from_secs(60),
        Duration::from_millis(500),
    );
    let by_id: HashMap<String, Received> = got
        .into_iter()
        .map(|r| (r.id.clone().unwrap(), r))
        .collect();
    for id in expect {
        assert!(by_id.contains_key(id), "event {id} never arrived");
    }
    by_id
}

/// A consumer's span, sent to Jaeger over OTLP/HTTP (JSON) with the record's `traceparent`
/// as its parent — what an instrumented consumer does.
async fn consumer_span(http: &str, trace_id: &str, parent: &str, span_id: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let body = json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "billing"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": trace_id, "spanId": span_id, "parentSpanId": parent,
            "name": "process", "kind": 5,
            "startTimeUnixNano": (now - 1_000_000).to_string(), "endTimeUnixNano": now.to_string()
        }]}]
    }]});
    let r = reqwest::Client::new()
        .post(format!("{http}/v1/traces"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);
}

/// 30 events written inside traced requests (four aggregates), one traced event whose topic
/// Kafka cannot name, one traced but not sampled (`-00`), and five untraced. Every traced,
/// sampled event has one span in Jaeger: a child of the writer's span, named for its topic,
/// from the commit time (just after the row's `created_at`) to the acknowledgement, with the event's id,
/// partition and offset as the consumer read them and one attempt; the outgoing `traceparent`
/// names it (same trace, the relay's span, same flags), and a consumer's span continued from
/// that header is in the same trace under the relay's span. The dead letter's span says
/// `dead_lettered`, `invalid_topic`, with an error status. The unsampled event's header
/// continues the trace with its flags and exports nothing; the untraced events carry no
/// `traceparent` at all (sample_untraced = 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_traced_event_has_a_span_under_its_writers_span_and_a_consumer_continues_it() {
    let (_jaeger, _grpc, http, query) = jaeger();
    let brokers = kafka_brokers();
    let db = TestDb::new("traces").await;
    let config = db.config(
        &brokers,
        &format!("[tracing]\nenabled = true\nendpoint = \"{http}\"\nflush_ms = 200\n"),
    );
    migrate(&config);
    let client = db.client().await;
    create_aggregates_table(&client).await;
    let seed = 0x7ace;
    // event id → (trace id, writer's span id)
    let mut traced: HashMap<String, (String, String)> = HashMap::new();
    let mut untraced = HashSet::new();
    let mut relay = Relay::start(&config);
    db.streaming().await;
    for n in 0..30u64 {
        let (tid, sid) = (hex_id(seed, n, 16), hex_id(seed + 1, n, 8));
        let headers = json!({"traceparent": format!("00-{tid}-{sid}-01"), "tenant": "acme"});
        let id = insert(&client, "order", &format!("o-{}", n % 4), Some(headers)).await;
        traced.insert(id, (tid, sid));
        if n % 6 == 0 {
            untraced.insert(insert(&client, "order", "o-plain", None).await);
        }
    }
    let (poison_tid, poison_sid) = (hex_id(seed, 99, 16), hex_id(seed + 1, 99, 8));
    let poison = insert(
        &client,
        "bad type",
        "p-1",
        Some(json!({"traceparent": format!("00-{poison_tid}-{poison_sid}-01")})),
    )
    .await;
    let (quiet_tid, quiet_sid) = (hex_id(seed, 98, 16), hex_id(seed + 1, 98, 8));
    let quiet = insert(
        &client,
        "order",
        "o-quiet",
        Some(json!({"traceparent": format!("00-{quiet_tid}-{quiet_sid}-00")})),
    )
    .await;

    let mut expect: HashSet<String> = traced.keys().cloned().collect();
    expect.extend(untraced.iter().cloned());
    expect.insert(quiet.clone());
    let by_id = arrived(&brokers, db.topic("order"), &expect);
    for id in &untraced {
        assert_eq!(
            traceparent(&by_id[id]),
            None,
            "untraced event {id} got a traceparent"
        );
    }
    let (t, s, f) = traceparent(&by_id[&quiet]).unwrap();
    assert_eq!((t.as_str(), f.as_str()), (quiet_tid.as_str(), "00"));
    assert_ne!(
        s, quiet_sid,
        "the unsampled event's header still names the relay's span"
    );

    let mut consumers = Vec::new();
    for (i, (id, (tid, writer_sid))) in traced.iter().enumerate() {
        let r = &by_id[id];
        let (t, relay_sid, flags) = traceparent(r).unwrap();
        assert_eq!((&t, flags.as_str()), (tid, "01"), "event {id}");
        assert_ne!(
            &relay_sid, writer_sid,
            "event {id}: the header still names the writer's span"
        );
        assert_eq!(r.headers.get("tenant").map(String::as_str), Some("acme"));
        let trace = trace(&query, tid, 1).await;
        let (span, tags) = span(&trace, &relay_sid);
        assert_eq!(
            parent_of(span).as_deref(),
            Some(writer_sid.as_str()),
            "event {id}"
        );
        assert_eq!(span["operationName"], format!("send {}", db.topic("order")));
        assert_eq!(tags["messaging.message.id"], json!(id), "{span}");
        assert_eq!(tags["messaging.system"], "kafka");
        assert_eq!(tags["messaging.destination.name"], json!(db.topic("order")));
        assert_eq!(
            tags["messaging.destination.partition.id"],
            json!(r.partition.to_string())
        );
        assert_eq!(tags["messaging.kafka.offset"], json!(r.offset), "{span}");
        assert_eq!(tags["messaging.message.key"], json!(r.key.clone().unwrap()));
        assert_eq!(tags["outboxd.outcome"], "delivered");
        assert_eq!(tags["outboxd.attempts"], 1);
        assert_eq!(tags["outboxd.event.type"], "Happened");
        assert_eq!(tags["span.kind"], "producer");
        // From the commit (the record's timestamp), not from when the relay read the row.
        // From the commit, not from when the relay read the row: the record's timestamp is
        // the row's `created_at` (the transaction's start, rounded to the millisecond), and
        // each row here is its own short transaction.
        let after_created = span["startTime"].as_i64().unwrap() - r.timestamp_ms.unwrap() * 1000;
        assert!(
            (-500..100_000).contains(&after_created),
            "event {id}: the span starts {after_created} µs after the row's created_at: {span}"
        );
        assert!(span["duration"].as_i64().unwrap() > 0);
        let process = &trace["processes"][span["processID"].as_str().unwrap()];
        assert_eq!(process["serviceName"], "outboxd");
        if i < 3 {
            let consumer_sid = hex_id(seed + 2, i as u64, 8);
            consumer_span(&http, tid, &relay_sid, &consumer_sid).await;
            consumers.push((tid.clone(), relay_sid, consumer_sid));
        }
    }
    for (i, (tid, relay_sid, consumer_sid)) in consumers.into_iter().enumerate() {
        let trace = trace(&query, &tid, 2).await;
        let (consumer, _) = span(&trace, &consumer_sid);
        assert_eq!(
            parent_of(consumer),
            Some(relay_sid),
            "the consumer's span hangs under the relay's"
        );
        if i == 0 {
            // The tree docs/tracing.md shows (run with --no-capture).
            eprintln!("{}", tree(&trace));
        }
    }

    let trace = trace(&query, &poison_tid, 1).await;
    let spans = trace["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 1, "{trace}");
    let (span, tags) = span(&trace, spans[0]["spanID"].as_str().unwrap());
    assert_eq!(parent_of(span).as_deref(), Some(poison_sid.as_str()));
    assert_eq!(tags["messaging.message.id"], json!(poison));
    assert_eq!(tags["outboxd.outcome"], "dead_lettered");
    assert_eq!(tags["outboxd.dead_letter.reason"], "invalid_topic");
    assert_eq!(tags["otel.status_code"], "ERROR", "{span}");

    // Nothing was exported for the unsampled trace (every other span is in by now).
    let r = reqwest::get(format!("{query}/api/traces/{quiet_tid}"))
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(
        body["data"].as_array().is_none_or(|d| d.is_empty()),
        "an unsampled trace was exported: {body}"
    );
    relay.terminate(Duration::from_secs(30));
}

/// Over OTLP/gRPC, with `propagate = "writer"` and every untraced event sampled: each of 10
/// traced events keeps the writer's `traceparent` byte for byte and has its span under the
/// writer's span; each of 10 untraced events gets a trace of its own — a root span in Jaeger
/// whose trace and span ids are the ones its record's new `traceparent` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_writer_propagation_keeps_the_header_and_untraced_events_get_root_spans() {
    let (_jaeger, grpc, _http, query) = jaeger();
    let brokers = kafka_brokers();
    let db = TestDb::new("traces_grpc").await;
    let config = db.config(
        &brokers,
        &format!(
            "[tracing]\nenabled = true\nprotocol = \"grpc\"\nendpoint = \"{grpc}\"\npropagate = \"writer\"\nsample_untraced = 1.0\nflush_ms = 200\n"
        ),
    );
    migrate(&config);
    let client = db.client().await;
    create_aggregates_table(&client).await;
    let mut relay = Relay::start(&config);
    db.streaming().await;
    let seed = 0x9c9c;
    let mut traced = HashMap::new();
    let mut untraced = HashSet::new();
    for n in 0..10u64 {
        let header = format!("00-{}-{}-01", hex_id(seed, n, 16), hex_id(seed + 1, n, 8));
        let id = insert(
            &client,
            "order",
            "o-1",
            Some(json!({"traceparent": header})),
        )
        .await;
        traced.insert(id, header);
        untraced.insert(insert(&client, "order", "o-2", None).await);
    }
    let mut expect: HashSet<String> = traced.keys().cloned().collect();
    expect.extend(untraced.iter().cloned());
    let by_id = arrived(&brokers, db.topic("order"), &expect);
    for (id, header) in &traced {
        let r = &by_id[id];
        assert_eq!(r.headers.get("traceparent"), Some(header), "event {id}");
        let parts: Vec<&str> = header.split('-').collect();
        let trace = trace(&query, parts[1], 1).await;
        let spans = trace["spans"].as_array().unwrap();
        assert_eq!(spans.len(), 1, "{trace}");
        let (span, tags) = span(&trace, spans[0]["spanID"].as_str().unwrap());
        assert_eq!(parent_of(span).as_deref(), Some(parts[2]));
        assert_eq!(tags["messaging.message.id"], json!(id));
    }
    for id in &untraced {
        let r = &by_id[id];
        let (tid, sid, flags) = traceparent(r).unwrap_or_else(|| panic!("{id}: no traceparent"));
        assert_eq!(flags, "01");
        let trace = trace(&query, &tid, 1).await;
        let (span, tags) = span(&trace, &sid);
        assert_eq!(parent_of(span), None, "an untraced event's span is a root");
        assert_eq!(tags["messaging.message.id"], json!(id));
    }
    relay.terminate(Duration::from_secs(30));
}

/// A collector that accepts connections and never answers (black-holed), with a queue of 64
/// spans and a 500 ms export bound: all 3,000 traced events arrive, each id; spans are
/// dropped and counted (`outboxd_trace_spans_dropped_total`), none exported, and the relay
/// says so once, not per batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_collector_costs_spans_and_never_an_event() {
    let brokers = kafka_brokers();
    let db = TestDb::new("traces_silent").await;
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accepts (the kernel's backlog) and never reads or answers.
    let _hold = std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in silent.incoming().flatten() {
            held.push(s);
        }
    });
    let config = db.config(
        &brokers,
        &format!(
            "[tracing]\nenabled = true\nendpoint = \"http://127.0.0.1:{port}\"\ntimeout_ms = 500\nmax_queue = 64\nmax_batch = 32\nflush_ms = 100\n"
        ),
    );
    migrate(&config);
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO outbox (aggregatetype, aggregateid, type, payload, headers) \
             SELECT 'order', 'o-' || (i % 8), 'Happened', '{}', \
               jsonb_build_object('traceparent', '00-' || md5(i::text) || '-' || left(md5('s' || i), 16) || '-01') \
             FROM generate_series(1, 3000) AS i",
        )
        .await
        .unwrap();
    let ids: HashSet<String> = client
        .query("SELECT id::text FROM outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), 3000);
    let mut relay = Relay::start(&config);
    let got = consume(
        &brokers,
        &[db.topic("order")],
        &ids,
        Duration::from_secs(120),
        Duration::from_millis(500),
    );
    let arrived: HashSet<String> = got.iter().filter_map(|r| r.id.clone()).collect();
    for id in &ids {
        assert!(arrived.contains(id), "event {id} never arrived");
    }
    let addr = http_addr(&config);
    let metric = |body: &str, name: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    eventually(
        Duration::from_secs(30),
        "spans counted as dropped",
        || async {
            let (_, body) = http_get(&addr, "/metrics").unwrap();
            metric(&body, "outboxd_trace_spans_dropped_total") >= 2900.0
        },
    )
    .await;
    let (_, body) = http_get(&addr, "/metrics").unwrap();
    assert_eq!(
        metric(&body, "outboxd_trace_spans_exported_total"),
        0.0,
        "{body}"
    );
    relay.terminate(Duration::from_secs(30));
    let log = relay.log_text();
    let warnings = log
        .matches("the collector did not take a batch of spans")
        .count();
    assert!((1..=3).contains(&warnings), "{warnings} warnings:\n{log}");
}
