//! OTLP's `ExportTraceServiceRequest` in protobuf, written by hand: the relay's spans use a
//! handful of fields, and a protobuf toolchain (prost, tonic, protoc) would cost more build
//! time than the whole encoder. Field numbers from opentelemetry-proto's
//! `collector/trace/v1/trace_service.proto`, `trace/v1/trace.proto`,
//! `common/v1/common.proto` and `resource/v1/resource.proto`.

use super::{SpanData, Value};

/// `SpanKind.SPAN_KIND_PRODUCER`.
const KIND_PRODUCER: u64 = 4;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn tag(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes(buf: &mut Vec<u8>, field: u32, data: &[u8]) {
    tag(buf, field, 2);
    varint(buf, data.len() as u64);
    buf.extend_from_slice(data);
}

fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, 0);
    varint(buf, v);
}

/// A nested message: written into a scratch buffer, then length-prefixed.
fn message(buf: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    bytes(buf, field, &inner);
}

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes of a length-delimited field of `n` bytes (field numbers here are all below 16).
fn delimited_len(n: usize) -> usize {
    1 + varint_len(n as u64) + n
}

fn any_len(value: &Value) -> usize {
    match value {
        Value::Str(s) => delimited_len(s.len()),
        Value::Static(s) => delimited_len(s.len()),
        Value::Int(i) => 1 + varint_len(*i as u64),
    }
}

fn key_value_len(key: &str, value: &Value) -> usize {
    delimited_len(key.len()) + delimited_len(any_len(value))
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue { string_value = 1; int_value = 3 }`,
/// written with lengths computed beforehand: no scratch buffer per attribute (a span has a
/// dozen, and the relay may export tens of thousands a second).
fn key_value(buf: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    tag(buf, field, 2);
    varint(buf, key_value_len(key, value) as u64);
    bytes(buf, 1, key.as_bytes());
    tag(buf, 2, 2);
    varint(buf, any_len(value) as u64);
    match value {
        Value::Str(s) => bytes(buf, 1, s.as_bytes()),
        Value::Static(s) => bytes(buf, 1, s.as_bytes()),
        Value::Int(i) => uint(buf, 3, *i as u64),
    }
}

fn status_len(message_text: &str) -> usize {
    delimited_len(message_text.len()) + 1 + varint_len(STATUS_ERROR)
}

fn span_len(s: &SpanData) -> usize {
    let mut n = delimited_len(16) + delimited_len(8);
    if s.parent.is_some() {
        n += delimited_len(8);
    }
    n += delimited_len(s.name.len()) + 1 + varint_len(KIND_PRODUCER) + 2 * 9;
    n += s
        .attributes
        .iter()
        .map(|(k, v)| delimited_len(key_value_len(k, v)))
        .sum::<usize>();
    if let Some(m) = &s.error {
        n += delimited_len(status_len(m));
    }
    n
}

fn span(buf: &mut Vec<u8>, s: &SpanData) {
    bytes(buf, 1, &s.trace_id);
    bytes(buf, 2, &s.span_id);
    if let Some(parent) = &s.parent {
        bytes(buf, 4, parent);
    }
    bytes(buf, 5, s.name.as_bytes());
    uint(buf, 6, KIND_PRODUCER);
    fixed64(buf, 7, s.start_ns);
    fixed64(buf, 8, s.end_ns.max(s.start_ns));
    for (k, v) in &s.attributes {
        key_value(buf, 9, k, v);
    }
    if let Some(message_text) = &s.error {
        tag(buf, 15, 2);
        varint(buf, status_len(message_text) as u64);
        bytes(buf, 2, message_text.as_bytes());
        uint(buf, 3, STATUS_ERROR);
    }
}

/// One request for `spans`, under a resource with `resource` attributes.
pub fn export_request(resource: &[(String, Value)], spans: &[SpanData]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 * spans.len() + 128);
    message(&mut out, 1, |rs| {
        message(rs, 1, |res| {
            for (k, v) in resource {
                key_value(res, 1, k, v);
            }
        });
        message(rs, 2, |ss| {
            message(ss, 1, |scope| {
                bytes(scope, 1, b"outboxd");
                bytes(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for s in spans {
                tag(ss, 2, 2);
                varint(ss, span_len(s) as u64);
                span(ss, s);
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_computed_beforehand_match_what_is_written() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::MAX] {
            let mut buf = Vec::new();
            varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
        }
        let s = SpanData {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: Some([3; 8]),
            name: "send orders".into(),
            start_ns: 1,
            end_ns: 2,
            attributes: vec![
                ("a", Value::Static("x")),
                ("b", Value::Int(-1)),
                ("c", Value::Str("y".repeat(200))),
            ],
            error: Some("dead-lettered".repeat(20)),
        };
        let mut buf = Vec::new();
        span(&mut buf, &s);
        assert_eq!(buf.len(), span_len(&s));
        let mut kv = Vec::new();
        key_value(&mut kv, 9, "c", &Value::Str("y".repeat(200)));
        assert_eq!(
            kv.len(),
            delimited_len(key_value_len("c", &Value::Str("y".repeat(200))))
        );
    }

    #[test]
    fn fields_are_written_with_protobufs_tags_and_lengths() {
        let mut buf = Vec::new();
        key_value(&mut buf, 9, "a", &Value::Int(300));
        // field 9 length-delimited (0x4a), 8 bytes: key "a" (0a 01 61), value (12 03: 18 ac 02).
        assert_eq!(buf, [0x4a, 8, 0x0a, 1, b'a', 0x12, 3, 0x18, 0xac, 0x02]);
        let mut buf = Vec::new();
        fixed64(&mut buf, 7, 1);
        assert_eq!(buf, [0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
