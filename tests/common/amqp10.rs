//! Apache ActiveMQ Artemis of a test's own (`scripts/stack.sh artemis-start`), the AMQP 1.0
//! broker the Service Bus sink is tested against, and a reader that turns what a queue holds
//! into [`Received`] records, so the assertions written for Kafka ([`assert_exactly_written`])
//! apply to it too.

use super::*;

use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::Body;
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Receiver, Session};

/// The login `stack.sh artemis-start` creates.
pub const ARTEMIS_USER: &str = "outboxd";
pub const ARTEMIS_PASSWORD: &str = "secret";

/// A Service Bus connection string for the broker at `url` (`amqp://host:port`).
pub fn servicebus_connection_string(url: &str, password: &str) -> String {
    format!("Endpoint={url}/;SharedAccessKeyName={ARTEMIS_USER};SharedAccessKey={password}")
}

/// Receives (and accepts) every message of `queue` until each id in `expect` was seen or
/// `timeout` passed, then `linger` more. `offset` is the receive order, `id` the `id`
/// application property, `key` the `group-id` (the Service Bus session), the payload the
/// `data` body; `message-id` is kept as header `message-id`.
pub async fn amqp_read(
    url: &str,
    queue: &str,
    expect: &HashSet<String>,
    timeout: Duration,
    linger: Duration,
) -> Vec<Received> {
    let mut connection = Connection::builder()
        .container_id(unique("reader"))
        .sasl_profile(SaslProfile::Plain {
            username: ARTEMIS_USER.into(),
            password: ARTEMIS_PASSWORD.into(),
        })
        .open(url)
        .await
        .unwrap();
    let mut session = Session::begin(&mut connection).await.unwrap();
    let mut receiver = Receiver::attach(&mut session, unique("r"), queue)
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut until = ReadUntil::new(timeout, linger);
    while !until.done(expect, &seen) {
        let Ok(delivery) =
            tokio::time::timeout(Duration::from_millis(500), receiver.recv::<Body<Value>>()).await
        else {
            continue;
        };
        let delivery = delivery.unwrap();
        let m = delivery.message();
        let mut headers: HashMap<String, String> = m
            .application_properties
            .as_ref()
            .map(|a| {
                a.0.iter()
                    .filter_map(|(k, v)| match v {
                        SimpleValue::String(s) => Some((k.clone(), s.clone())),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let props = m.properties.as_ref();
        if let Some(id) = props.and_then(|p| p.message_id.as_ref()) {
            headers.insert("message-id".into(), format!("{id:?}"));
        }
        let key = props.and_then(|p| p.group_id.clone());
        let data: Vec<u8> = match &m.body {
            Body::Data(batch) => batch.iter().flat_map(|d| d.0.to_vec()).collect(),
            _ => Vec::new(),
        };
        let id = headers.get("id").cloned();
        if let Some(id) = &id {
            seen.insert(id.clone());
        }
        out.push(Received {
            topic: queue.to_string(),
            partition: 0,
            offset: out.len() as i64,
            key,
            id,
            payload: String::from_utf8(data.clone()).ok(),
            raw_payload: Some(data),
            headers,
            timestamp_ms: None,
        });
        receiver.accept(&delivery).await.unwrap();
    }
    let _ = receiver.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    out
}
