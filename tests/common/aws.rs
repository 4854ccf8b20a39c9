//! AWS-compatible servers of a test's own (`scripts/stack.sh elasticmq-start` / `moto-start`)
//! and a reader that turns what an SQS queue holds into [`Received`] records, so the
//! assertions written for Kafka ([`assert_exactly_written`]) apply to SQS too. The reader
//! talks through outboxd's own signed client (`outboxd::sink::aws`), with test credentials.

use super::*;

use outboxd::config::AwsConfig;
use outboxd::sink::aws::credentials::{Credentials, Secret};
use outboxd::sink::aws::AwsClient;
use serde_json::{json, Value};

/// The access key every test relay is given (ElasticMQ and moto without auth take any).
pub const TEST_KEY_ID: &str = "AKIAOUTBOXDTEST00001";
pub const TEST_SECRET: &str = "outboxd-test-secret-do-not-log-9f2c";

/// The environment a test relay publishing to an AWS emulator runs with: the test keys, a
/// region, and no instance metadata (a test must never reach 169.254.169.254).
pub fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", TEST_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", TEST_SECRET),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

/// A client of `service` at `endpoint` with the given keys.
pub fn aws_client(endpoint: &str, service: &'static str, key: &str, secret: &str) -> AwsClient {
    let cfg = AwsConfig {
        region: "us-east-1".into(),
        profile: None,
        endpoint_url: Some(endpoint.to_string()),
        request_timeout: Duration::from_secs(30),
        max_concurrent_requests: 1,
    };
    let creds = Credentials {
        access_key_id: key.into(),
        secret_access_key: Secret::new(secret.into()),
        session_token: None,
        expires: None,
        source: "test".into(),
    };
    AwsClient::with_credentials(&cfg, service, "TEST", creds).unwrap()
}

/// An SQS client of a test (the test keys).
pub fn sqs_client(endpoint: &str) -> AwsClient {
    aws_client(endpoint, "sqs", TEST_KEY_ID, TEST_SECRET)
}

/// One SQS JSON action; panics on an error answer.
pub async fn sqs_call(client: &AwsClient, action: &str, body: Value) -> Value {
    let answer = client
        .json(
            &format!("AmazonSQS.{action}"),
            "1.0",
            body.to_string().into_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("sqs {action}: {e}"));
    serde_json::from_slice(&answer).unwrap_or(Value::Null)
}

/// Creates queue `name` (FIFO if it ends in `.fifo`) and returns its URL.
pub async fn sqs_create_queue(client: &AwsClient, name: &str) -> String {
    let mut body = json!({ "QueueName": name });
    if name.ends_with(".fifo") {
        body["Attributes"] = json!({ "FifoQueue": "true" });
    }
    let v = sqs_call(client, "CreateQueue", body).await;
    v["QueueUrl"].as_str().unwrap().to_string()
}

/// The ARN of the queue at `queue_url`.
pub async fn sqs_queue_arn(sqs: &AwsClient, queue_url: &str) -> String {
    let v = sqs_call(
        sqs,
        "GetQueueAttributes",
        json!({ "QueueUrl": queue_url, "AttributeNames": ["QueueArn"] }),
    )
    .await;
    v["Attributes"]["QueueArn"].as_str().unwrap().to_string()
}

/// Receives and deletes every message of `queue_url` until each id in `expect` was seen or
/// `timeout` passed, then `linger` more. `offset` is the receive order (a FIFO queue hands
/// one group's messages out in order), `key` the `key` attribute.
pub async fn sqs_read(
    client: &AwsClient,
    queue_url: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    sqs_read_as(client, queue_url, expect, (timeout, linger), |r| r).await
}

/// [`sqs_read`], each message turned into a [`Received`] by `read` first.
async fn sqs_read_as(
    client: &AwsClient,
    queue_url: &str,
    expect: &HashSet<String>,
    (timeout, linger): (Duration, Duration),
    read: impl Fn(Received) -> Received,
) -> Vec<Received> {
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut until = ReadUntil::new(timeout, linger);
    while !until.done(expect, &seen) {
        for r in sqs_receive(client, queue_url).await {
            let mut r = read(r);
            if let Some(id) = &r.id {
                seen.insert(id.clone());
            }
            r.offset = out.len() as i64;
            out.push(r);
        }
    }
    out
}

/// One `ReceiveMessage` (up to 10, waiting up to 1 s), the messages deleted.
pub async fn sqs_receive(client: &AwsClient, queue_url: &str) -> Vec<Received> {
    let v = sqs_call(
        client,
        "ReceiveMessage",
        json!({
            "QueueUrl": queue_url,
            "MaxNumberOfMessages": 10,
            "WaitTimeSeconds": 1,
            "VisibilityTimeout": 60,
            "MessageAttributeNames": ["All"],
        }),
    )
    .await;
    let messages = v["Messages"].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    let mut handles = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let mut headers = HashMap::new();
        if let Some(attrs) = m["MessageAttributes"].as_object() {
            for (k, a) in attrs {
                if let Some(s) = a["StringValue"].as_str() {
                    headers.insert(k.clone(), s.to_string());
                }
            }
        }
        let body = m["Body"].as_str().unwrap_or("").to_string();
        out.push(Received {
            topic: queue_url.to_string(),
            partition: 0,
            offset: 0,
            key: headers.get("key").cloned(),
            id: headers.get("id").cloned(),
            raw_payload: Some(body.clone().into_bytes()),
            payload: Some(body),
            headers,
            timestamp_ms: None,
        });
        handles.push(json!({ "Id": i.to_string(), "ReceiptHandle": m["ReceiptHandle"] }));
    }
    if !handles.is_empty() {
        sqs_call(
            client,
            "DeleteMessageBatch",
            json!({ "QueueUrl": queue_url, "Entries": handles }),
        )
        .await;
    }
    out
}

/// One SNS query action with the test keys; the answer's XML (panics on an error).
pub async fn sns_call(client: &AwsClient, pairs: &[(&str, &str)]) -> String {
    let mut form = vec![("Version", "2010-03-31")];
    form.extend_from_slice(pairs);
    client
        .query(&form)
        .await
        .unwrap_or_else(|e| panic!("sns {pairs:?}: {e}"))
}

/// Creates topic `name` (FIFO if it ends in `.fifo`) and a queue of the same kind subscribed
/// to it with raw message delivery (the body and attributes as published); returns the
/// topic's ARN and the queue's URL.
pub async fn sns_topic_with_queue(endpoint: &str, name: &str) -> (String, String) {
    let sns = aws_client(endpoint, "sns", TEST_KEY_ID, TEST_SECRET);
    let sqs = sqs_client(endpoint);
    let mut create = vec![("Action", "CreateTopic"), ("Name", name)];
    if name.ends_with(".fifo") {
        create.extend([
            ("Attributes.entry.1.key", "FifoTopic"),
            ("Attributes.entry.1.value", "true"),
        ]);
    }
    let answer = sns_call(&sns, &create).await;
    let arn = outboxd::sink::aws::xml::text(&answer, "TopicArn").unwrap();
    let queue_url = sqs_create_queue(&sqs, name).await;
    let queue_arn = sqs_queue_arn(&sqs, &queue_url).await;
    sns_call(
        &sns,
        &[
            ("Action", "Subscribe"),
            ("TopicArn", &arn),
            ("Protocol", "sqs"),
            ("Endpoint", &queue_arn),
            ("Attributes.entry.1.key", "RawMessageDelivery"),
            ("Attributes.entry.1.value", "true"),
        ],
    )
    .await;
    (arn, queue_url)
}

/// Creates event bus `name`, a queue of the same name, and a rule on the bus sending every
/// event to the queue; returns the queue's URL.
pub async fn eventbridge_bus_with_queue(endpoint: &str, name: &str) -> String {
    let events = aws_client(endpoint, "events", TEST_KEY_ID, TEST_SECRET);
    let sqs = sqs_client(endpoint);
    let call = |action: &str, body: Value| {
        let events = &events;
        let target = format!("AWSEvents.{action}");
        async move {
            events
                .json(&target, "1.1", body.to_string().into_bytes())
                .await
                .unwrap_or_else(|e| panic!("events {target}: {e}"))
        }
    };
    call("CreateEventBus", json!({ "Name": name })).await;
    let queue_url = sqs_create_queue(&sqs, name).await;
    let queue_arn = sqs_queue_arn(&sqs, &queue_url).await;
    let pattern = json!({ "source": [{ "prefix": "" }] }).to_string();
    call(
        "PutRule",
        json!({ "Name": name, "EventBusName": name, "EventPattern": pattern }),
    )
    .await;
    call(
        "PutTargets",
        json!({ "Rule": name, "EventBusName": name, "Targets": [{ "Id": "q", "Arn": queue_arn }] }),
    )
    .await;
    queue_url
}

/// What a rule's queue received from EventBridge, as [`Received`]: the id, key and headers
/// from `detail.outboxd`, the payload the rest of `detail` (compact JSON, members sorted —
/// compare with [`normalized`] payloads), `source` and `detail-type` as headers
/// `eventbridge.source` / `eventbridge.detail-type`.
pub async fn eventbridge_read(
    client: &AwsClient,
    queue_url: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    sqs_read_as(client, queue_url, expect, (timeout, linger), from_envelope).await
}

/// An EventBridge event as a rule's SQS target received it.
fn from_envelope(r: Received) -> Received {
    let envelope: Value = serde_json::from_str(r.payload.as_deref().unwrap_or("")).unwrap();
    let mut detail = envelope["detail"].clone();
    let meta = detail
        .as_object_mut()
        .and_then(|d| d.remove("outboxd"))
        .unwrap_or(Value::Null);
    let mut headers: HashMap<String, String> = meta
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    for k in ["source", "detail-type"] {
        if let Some(v) = envelope[k].as_str() {
            headers.insert(format!("eventbridge.{k}"), v.to_string());
        }
    }
    let payload = detail.to_string();
    Received {
        key: headers.get("key").cloned(),
        id: headers.get("id").cloned(),
        raw_payload: Some(payload.clone().into_bytes()),
        payload: Some(payload),
        headers,
        ..r
    }
}

/// `written` with each payload as compact JSON, members sorted (what [`eventbridge_read`]
/// gives back).
pub fn normalized(written: &[Written]) -> Vec<Written> {
    written
        .iter()
        .map(|w| Written {
            payload: serde_json::from_str::<Value>(&w.payload)
                .unwrap()
                .to_string(),
            ..w.clone()
        })
        .collect()
}

/// A test's relay config for `db` with the `sink` and `extra` lines, its database migrated
/// and holding the aggregates table; `patient` for moto ([`patient_delivery`]).
pub async fn emulator_config(db: &TestDb, sink: &str, extra: &str, patient: bool) -> PathBuf {
    let config = db.config(&kafka_brokers(), &format!("{sink}\n{extra}"));
    if patient {
        patient_delivery(&config);
    }
    migrate(&config);
    create_aggregates_table(&db.client().await).await;
    config
}

/// moto delivers through SNS subscriptions and EventBridge rules slowly (a FIFO topic's
/// `PublishBatch` of 10: ~0.1 s into an empty queue, ~1.3 s into one of 2,000; a `PutEvents`
/// of 10 through a rule: ~1 s of its CPU, re-parsing JSONPath for every event): the tests'
/// 5 s delivery bound would end sessions as stalls. This raises it to 30 s.
pub fn patient_delivery(config: &std::path::Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let text = text.replace("delivery_timeout_ms = 5000", "delivery_timeout_ms = 30000");
    std::fs::write(config, text).unwrap();
}
