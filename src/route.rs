//! Event → Kafka record: topic from a template, key, headers, value.

use crate::event::Event;

/// A topic template such as `outbox.event.{aggregatetype}`.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(String),
    AggregateType,
    Type,
}

impl TopicTemplate {
    /// Parses a template; placeholders are `{aggregatetype}` and `{type}`.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("unclosed `{{` in `{template}`"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "aggregatetype" => Part::AggregateType,
                "type" => Part::Type,
                other => {
                    return Err(format!(
                        "unknown placeholder `{{{other}}}` (known: {{aggregatetype}}, {{type}})"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if rest.contains('}') {
            return Err(format!("unmatched `}}` in `{template}`"));
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        if parts.is_empty() {
            return Err("must not be empty".into());
        }
        Ok(TopicTemplate { parts })
    }

    pub fn render(&self, event: &Event) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::AggregateType => out.push_str(&event.aggregatetype),
                Part::Type => out.push_str(&event.event_type),
            }
        }
        out
    }
}

/// A record ready for the sink.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub topic: String,
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A routing problem worth a warning; the record is still produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteWarning(pub String);

/// Builds the record: headers `id` and `type` first, then every member of the `headers`
/// object (strings as they are, other JSON values as their JSON text; `null` members are left
/// out). A `headers` value that is not a JSON object is ignored with a warning.
pub fn to_record(template: &TopicTemplate, event: &Event) -> (Record, Vec<RouteWarning>) {
    let mut warnings = Vec::new();
    let mut headers = vec![
        ("id".to_string(), event.id.clone().into_bytes()),
        ("type".to_string(), event.event_type.clone().into_bytes()),
    ];
    if let Some(text) = &event.headers {
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => {
                for (name, value) in map {
                    if name == "id" || name == "type" {
                        warnings.push(RouteWarning(format!(
                            "headers member `{name}` ignored: the relay sets `{name}` itself"
                        )));
                        continue;
                    }
                    match value {
                        serde_json::Value::Null => {}
                        serde_json::Value::String(s) => headers.push((name, s.into_bytes())),
                        other => headers.push((name, other.to_string().into_bytes())),
                    }
                }
            }
            Ok(serde_json::Value::Null) => {}
            Ok(_) => warnings.push(RouteWarning(
                "`headers` is not a JSON object; no extra headers added".into(),
            )),
            Err(e) => warnings.push(RouteWarning(format!(
                "`headers` is not valid JSON ({e}); no extra headers added"
            ))),
        }
    }
    let record = Record {
        topic: template.render(event),
        key: event.aggregateid.clone(),
        value: event.payload.clone(),
        headers,
    };
    (record, warnings)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::SystemTime;

    fn event(headers: Option<&str>) -> Event {
        Event {
            id: "6f1c".into(),
            aggregatetype: "order".into(),
            aggregateid: Some("42".into()),
            event_type: "OrderPlaced".into(),
            payload: Some(br#"{"total": 10}"#.to_vec()),
            headers: headers.map(str::to_string),
            commit_time: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn template_renders_placeholders() {
        let t = TopicTemplate::parse("outbox.{aggregatetype}.{type}").unwrap();
        assert_eq!(t.render(&event(None)), "outbox.order.OrderPlaced");
    }

    #[test]
    fn template_rejects_unknown_placeholder() {
        let e = TopicTemplate::parse("x.{aggregate}").unwrap_err();
        assert!(e.contains("{aggregate}"), "{e}");
        assert!(TopicTemplate::parse("x.{type").is_err());
        assert!(TopicTemplate::parse("x}").is_err());
    }

    #[test]
    fn record_carries_id_type_and_string_headers() {
        let t = TopicTemplate::parse("outbox.event.{aggregatetype}").unwrap();
        let (r, w) = to_record(
            &t,
            &event(Some(r#"{"traceparent":"00-ab","n":3,"z":null}"#)),
        );
        assert!(w.is_empty());
        assert_eq!(r.topic, "outbox.event.order");
        assert_eq!(r.key.as_deref(), Some("42"));
        assert_eq!(r.value.as_deref(), Some(&br#"{"total": 10}"#[..]));
        assert_eq!(
            r.headers,
            vec![
                ("id".into(), b"6f1c".to_vec()),
                ("type".into(), b"OrderPlaced".to_vec()),
                ("n".into(), b"3".to_vec()),
                ("traceparent".into(), b"00-ab".to_vec()),
            ]
        );
    }

    #[test]
    fn non_object_headers_warn_but_keep_the_event() {
        let t = TopicTemplate::parse("t").unwrap();
        let (r, w) = to_record(&t, &event(Some("[1,2]")));
        assert_eq!(w.len(), 1);
        assert_eq!(r.headers.len(), 2);
    }
}
