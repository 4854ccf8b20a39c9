//! Table-less events: `pg_logical_emit_message(true, 'outbox', <json>)` with the fields of an
//! outbox row. A message that cannot become an event is poison (dead-lettered with the
//! reason), never skipped.

use std::time::SystemTime;

use crate::event::{Event, EventExtra};

/// Prefix of table-less events: `pg_logical_emit_message(true, 'outbox', <json>)`.
pub const OUTBOX_MESSAGE_PREFIX: &str = "outbox";

/// The JSON of a table-less event; the same fields as an outbox row.
#[derive(serde::Deserialize)]
struct MessageEvent<'a> {
    #[serde(borrow)]
    id: Option<&'a serde_json::value::RawValue>,
    aggregatetype: Option<String>,
    aggregateid: Option<serde_json::Value>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a serde_json::value::RawValue>,
    headers: Option<serde_json::Value>,
}

/// Parses a table-less event. The payload's JSON text is kept exactly as written.
/// `Err((id if known, reason))` for a message that cannot be published.
pub fn message_event(
    content: &[u8],
    commit_time: SystemTime,
) -> std::result::Result<Event, (Option<String>, String)> {
    let m: MessageEvent<'_> = serde_json::from_slice(content).map_err(|e| {
        (
            None,
            format!("outbox message is not a JSON object with the outbox fields: {e}"),
        )
    })?;
    let id = match m
        .id
        .map(|r| serde_json::from_str::<serde_json::Value>(r.get()))
    {
        Some(Ok(serde_json::Value::String(s))) => s,
        Some(Ok(serde_json::Value::Number(n))) => n.to_string(),
        _ => return Err((None, "outbox message has no string `id`".into())),
    };
    let fail = |what: &str| {
        Err((
            Some(id.clone()),
            format!("outbox message has no string `{what}`"),
        ))
    };
    let Some(aggregatetype) = m.aggregatetype else {
        return fail("aggregatetype");
    };
    let Some(event_type) = m.event_type else {
        return fail("type");
    };
    let aggregateid = match m.aggregateid {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Null) | None => None,
        Some(other) => Some(other.to_string()),
    };
    let payload = m
        .payload
        .map(|r| r.get())
        .filter(|t| *t != "null")
        .map(|t| t.as_bytes().to_vec());
    let headers = match m.headers {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(v.to_string()),
    };
    Ok(Event {
        id,
        aggregatetype,
        aggregateid,
        event_type,
        payload,
        headers,
        commit_time,
        extra: EventExtra::default(),
    })
}
