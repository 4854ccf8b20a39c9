//! The Confluent wire format, and Avro encoding of a JSON payload.
//!
//! A record serialised for a schema registry's consumers is `0x00` (the magic byte), the
//! schema's registry id as 4 bytes big-endian, then the body: the JSON text for JSON Schema,
//! the Avro binary datum for Avro. Any Confluent-compatible deserializer (Confluent's, Apicurio's
//! `ccompat` serdes, confluent-kafka's Python ones) reads the id, fetches that schema from the
//! registry and decodes the body with it — so the id must be the registry's id of exactly the
//! schema the body was written with.
//!
//! A service writes its payload as JSON; Avro needs it resolved against the type's Avro schema:
//! a record from an object (fields by name, a missing one takes its default), a union branch
//! chosen by the value, ints widened to longs. A payload that does not resolve is the
//! event's contract broken — the caller dead-letters it `schema_invalid` with the reason.

use apache_avro::schema::ResolvedSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;

/// The magic byte that opens every record in the Confluent wire format.
pub const MAGIC: u8 = 0;

/// `body` framed for schema `id`.
pub fn frame(id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(MAGIC);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An Avro schema ready to encode payloads. Parsed once per schema the relay meets (a file
/// at start, a registry version when first used) and kept for the life of the process.
pub struct AvroSchema {
    schema: &'static Schema,
    names: ResolvedSchema<'static>,
    writer: GenericDatumWriter<'static>,
}

impl std::fmt::Debug for AvroSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroSchema")
            .field("canonical", &self.schema.canonical_form())
            .finish()
    }
}

/// An Avro library message, short enough for a log line and `outboxd.dlq.error`.
fn short(e: impl std::fmt::Display) -> String {
    let text = e.to_string();
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

impl AvroSchema {
    /// Parses an Avro schema (`.avsc` text).
    pub fn parse(text: &str) -> Result<AvroSchema, String> {
        let schema = Schema::parse_str(text).map_err(short)?;
        // Kept for the life of the process (the writer borrows it): one per schema file and
        // per registry version the relay uses, a bounded set.
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let names = ResolvedSchema::try_from(schema).map_err(short)?;
        let writer = GenericDatumWriter::builder(schema)
            .resolved_schemata(ResolvedSchema::try_from(schema).map_err(short)?)
            // Resolution below already made the value match the schema.
            .validate(false)
            .build()
            .map_err(short)?;
        Ok(AvroSchema {
            schema,
            names,
            writer,
        })
    }

    /// The Avro binary datum of `value`, built for this schema (`super::connect`), or why it
    /// does not fit.
    pub fn encode_value(&self, value: Value) -> Result<Vec<u8>, String> {
        self.writer
            .write_value_to_vec(value)
            .map_err(|e| format!("does not fit the Avro schema: {}", short(e)))
    }

    /// The Avro binary datum of `payload` (JSON text; `None` is JSON `null`), or why it does
    /// not fit the schema.
    pub fn encode(&self, payload: Option<&[u8]>) -> Result<Vec<u8>, String> {
        let json: serde_json::Value = match payload {
            None => serde_json::Value::Null,
            Some(bytes) => serde_json::from_slice(bytes)
                .map_err(|e| format!("the payload is not JSON: {e}"))?,
        };
        let value = Value::try_from(json)
            .and_then(|v| v.resolve_with_names(self.schema, self.names.get_names()))
            .map_err(|e| format!("does not fit the Avro schema: {}", short(e)))?;
        self.writer
            .write_value_to_vec(value)
            .map_err(|e| format!("does not fit the Avro schema: {}", short(e)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PLACED: &str = r#"{"type": "record", "name": "OrderPlaced", "namespace": "shop",
        "fields": [{"name": "orderId", "type": "string"}, {"name": "total", "type": "long"},
                   {"name": "note", "type": ["null", "string"], "default": null}]}"#;

    #[test]
    fn a_frame_is_the_magic_byte_the_id_big_endian_and_the_body() {
        assert_eq!(frame(258, b"{}"), vec![0, 0, 0, 1, 2, b'{', b'}']);
    }

    #[test]
    fn a_json_payload_is_resolved_into_the_avro_record() {
        let s = AvroSchema::parse(PLACED).unwrap();
        // "o-1": length 3 zigzag = 6; 10 zigzag = 20; union branch 0 (null).
        let bytes = s
            .encode(Some(br#"{"orderId": "o-1", "total": 10}"#))
            .unwrap();
        assert_eq!(bytes, vec![6, b'o', b'-', b'1', 20, 0]);
        // The second union branch, chosen by the value.
        let bytes = s
            .encode(Some(br#"{"orderId": "o", "total": 1, "note": "x"}"#))
            .unwrap();
        assert_eq!(bytes, vec![2, b'o', 2, 2, 2, b'x']);
    }

    #[test]
    fn a_payload_that_breaks_the_record_says_why() {
        let s = AvroSchema::parse(PLACED).unwrap();
        for bad in [
            r#"{"id": "o-1", "total": 10}"#,
            r#"{"orderId": 5, "total": 10}"#,
            "[1]",
            "not json",
        ] {
            let e = s.encode(Some(bad.as_bytes())).unwrap_err();
            assert!(
                e.contains("Avro schema") || e.contains("not JSON"),
                "{bad}: {e}"
            );
        }
        assert!(AvroSchema::parse(r#"{"type": "record"}"#).is_err());
    }
}
