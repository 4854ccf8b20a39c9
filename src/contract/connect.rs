//! Table change events in Avro, as Debezium's Avro converter writes them: the change event's
//! Kafka Connect schema (the one `cdc.schemas` puts beside the payload) turned into an Avro
//! schema — a record per struct, named as Connect names it, an optional field a union with
//! `null` first and default `null`, Connect's integer widths as Avro `int`/`long`, `bytes`
//! (base64 in the JSON) as bytes, Connect's `Decimal`/`Date`/`Timestamp` as Avro's logical
//! types — and the payload converted along the same schema.
//!
//! The Avro schema follows the table: a column added or dropped changes the Connect schema,
//! so the next event registers a new version under the topic's subject (`<topic>-value`,
//! Debezium's default), as the converter does.

use std::collections::HashSet;

use apache_avro::types::Value;
use base64::Engine as _;
use serde_json::{json, Map, Value as Json};

/// An Avro name from a Connect name: `[A-Za-z_][A-Za-z0-9_]*` per dot-separated part.
fn avro_name(name: &str) -> String {
    name.split('.')
        .map(field_name)
        .collect::<Vec<_>>()
        .join(".")
}

/// An Avro field name from a column name (Debezium's `field.name.adjustment.mode = avro`).
pub fn field_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn optional(schema: &Json) -> bool {
    schema
        .get("optional")
        .and_then(Json::as_bool)
        .unwrap_or(false)
}

/// A row struct (`….Value`): its fields are nullable in Avro whatever the column says — a
/// delete under `REPLICA IDENTITY DEFAULT` carries the old key only, every other column
/// `null`, and null is the only honest value for what the WAL did not keep.
fn row(schema: &Json) -> bool {
    connect_name(schema).is_some_and(|n| n.ends_with(".Value"))
}

/// `field` of `parent` with the optionality Avro gives it.
fn as_field(parent: &Json, field: &Json) -> Json {
    if row(parent) && !optional(field) {
        let mut f = field.clone();
        if let Some(o) = f.as_object_mut() {
            o.insert("optional".into(), Json::Bool(true));
        }
        f
    } else {
        field.clone()
    }
}

fn connect_type(schema: &Json) -> &str {
    schema.get("type").and_then(Json::as_str).unwrap_or("")
}

fn connect_name(schema: &Json) -> Option<&str> {
    schema.get("name").and_then(Json::as_str)
}

fn parameter<'a>(schema: &'a Json, key: &str) -> Option<&'a str> {
    schema.get("parameters")?.get(key)?.as_str()
}

/// The Avro schema (JSON) of a Connect schema; `defined` holds the record names already
/// written (a second use is a reference by name).
pub fn avro_schema(schema: &Json, defined: &mut HashSet<String>) -> Result<Json, String> {
    let plain = match connect_type(schema) {
        "struct" => {
            let name = avro_name(connect_name(schema).unwrap_or("ConnectDefault"));
            if !defined.insert(name.clone()) {
                Json::String(name)
            } else {
                let mut fields = Vec::new();
                for f in schema
                    .get("fields")
                    .and_then(Json::as_array)
                    .ok_or("a struct without fields")?
                {
                    let field = f
                        .get("field")
                        .and_then(Json::as_str)
                        .ok_or("a field without a name")?;
                    let f = &as_field(schema, f);
                    let mut out = Map::new();
                    out.insert("name".into(), Json::String(field_name(field)));
                    out.insert("type".into(), avro_schema(f, defined)?);
                    if optional(f) {
                        out.insert("default".into(), Json::Null);
                    }
                    fields.push(Json::Object(out));
                }
                json!({"type": "record", "name": name, "fields": fields})
            }
        }
        "int8" | "int16" | "int32" => match connect_name(schema) {
            Some("org.apache.kafka.connect.data.Date") => {
                json!({"type": "int", "logicalType": "date"})
            }
            _ => json!("int"),
        },
        "int64" => match connect_name(schema) {
            Some("org.apache.kafka.connect.data.Timestamp") => {
                json!({"type": "long", "logicalType": "timestamp-millis"})
            }
            _ => json!("long"),
        },
        "float32" => json!("float"),
        "float64" => json!("double"),
        "boolean" => json!("boolean"),
        "string" => json!("string"),
        "bytes" => match connect_name(schema) {
            Some("org.apache.kafka.connect.data.Decimal") => {
                let scale: u64 = parameter(schema, "scale")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                let precision: u64 = parameter(schema, "connect.decimal.precision")
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(38)
                    .max(scale.max(1));
                json!({"type": "bytes", "logicalType": "decimal", "precision": precision, "scale": scale})
            }
            _ => json!("bytes"),
        },
        "array" => {
            let items = schema.get("items").ok_or("an array without items")?;
            json!({"type": "array", "items": avro_schema(items, defined)?})
        }
        "map" => {
            let values = schema.get("values").ok_or("a map without values")?;
            json!({"type": "map", "values": avro_schema(values, defined)?})
        }
        other => return Err(format!("Connect type `{other}` has no Avro form here")),
    };
    let plain = match (connect_name(schema), plain) {
        // What Confluent's converter keeps of Connect's name for non-struct types.
        (Some(name), Json::Object(mut o)) if connect_type(schema) != "struct" => {
            o.insert("connect.name".into(), Json::String(name.to_string()));
            Json::Object(o)
        }
        (Some(name), Json::String(t)) if connect_type(schema) != "struct" => {
            json!({"type": t, "connect.name": name})
        }
        (_, plain) => plain,
    };
    Ok(if optional(schema) {
        json!(["null", plain])
    } else {
        plain
    })
}

/// `payload` (Connect's JSON, schemas disabled) as the Avro value of `schema`'s Avro form.
pub fn avro_value(schema: &Json, payload: &Json) -> Result<Value, String> {
    if optional(schema) {
        return Ok(match payload {
            Json::Null => Value::Union(0, Box::new(Value::Null)),
            v => Value::Union(1, Box::new(required(schema, v)?)),
        });
    }
    required(schema, payload)
}

fn required(schema: &Json, payload: &Json) -> Result<Value, String> {
    let field = || {
        schema
            .get("field")
            .and_then(Json::as_str)
            .unwrap_or("value")
    };
    let mismatch = || format!("`{}` is not a {}", field(), connect_type(schema));
    let int = || payload.as_i64().ok_or_else(mismatch);
    Ok(match connect_type(schema) {
        "struct" => {
            let mut out = Vec::new();
            for f in schema
                .get("fields")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let name = f.get("field").and_then(Json::as_str).unwrap_or("");
                let v = payload.get(name).unwrap_or(&Json::Null);
                out.push((field_name(name), avro_value(&as_field(schema, f), v)?));
            }
            Value::Record(out)
        }
        "int8" | "int16" | "int32" => Value::Int(i32::try_from(int()?).map_err(|_| mismatch())?),
        "int64" => Value::Long(int()?),
        "float32" => Value::Float(payload.as_f64().ok_or_else(mismatch)? as f32),
        "float64" => Value::Double(payload.as_f64().ok_or_else(mismatch)?),
        "boolean" => Value::Boolean(payload.as_bool().ok_or_else(mismatch)?),
        "string" => Value::String(payload.as_str().ok_or_else(mismatch)?.to_string()),
        "bytes" => {
            let text = payload.as_str().ok_or_else(mismatch)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(text))
                .map_err(|e| format!("`{}` is not base64: {e}", field()))?;
            if connect_name(schema) == Some("org.apache.kafka.connect.data.Decimal") {
                Value::Decimal(apache_avro::Decimal::from(bytes))
            } else {
                Value::Bytes(bytes)
            }
        }
        "array" => {
            let items = schema.get("items").ok_or("an array without items")?;
            let values = payload.as_array().ok_or_else(mismatch)?;
            Value::Array(
                values
                    .iter()
                    .map(|v| avro_value(items, v))
                    .collect::<Result<_, _>>()?,
            )
        }
        "map" => {
            let values = schema.get("values").ok_or("a map without values")?;
            let entries = payload.as_object().ok_or_else(mismatch)?;
            Value::Map(
                entries
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), avro_value(values, v)?)))
                    .collect::<Result<_, String>>()?,
            )
        }
        other => return Err(format!("Connect type `{other}` has no Avro form here")),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ROW: &str = r#"{"type":"struct","name":"shop.public.t.Value","optional":true,"fields":[
        {"type":"int32","optional":false,"field":"id"},
        {"type":"string","optional":true,"field":"first-name"},
        {"type":"bytes","optional":true,"name":"org.apache.kafka.connect.data.Decimal","parameters":{"scale":"2","connect.decimal.precision":"10"},"field":"price"}]}"#;

    #[test]
    fn a_connect_struct_becomes_a_named_record_and_the_second_use_a_reference() {
        let row: Json = serde_json::from_str(ROW).unwrap();
        let envelope = json!({"type": "struct", "name": "shop.public.t.Envelope", "fields": [
            {"field": "before", "type": "struct", "name": "shop.public.t.Value", "optional": true, "fields": row["fields"]},
            {"field": "after", "type": "struct", "name": "shop.public.t.Value", "optional": true, "fields": row["fields"]},
            {"field": "op", "type": "string", "optional": false}]});
        let avro = avro_schema(&envelope, &mut HashSet::new()).unwrap();
        assert_eq!(
            avro["fields"][1]["type"],
            json!(["null", "shop.public.t.Value"])
        );
        let value = &avro["fields"][0]["type"][1];
        assert_eq!(value["fields"][1]["name"], "first_name");
        assert_eq!(value["fields"][2]["type"][1]["logicalType"], "decimal");
        let parsed = crate::contract::wire::AvroSchema::parse(&avro.to_string()).unwrap();
        let payload = json!({"before": null, "after": {"id": 1, "first-name": "Ada", "price": "AQ=="}, "op": "c"});
        let bytes = parsed
            .encode_value(avro_value(&envelope, &payload).unwrap())
            .unwrap();
        // before: null (branch 0); after: branch 1, id branch 1 (a row's fields are all
        // nullable) 1 (zigzag 2), first_name branch 1 "Ada", price branch 1, 1 byte 0x01; op "c".
        assert_eq!(
            bytes,
            vec![0, 2, 2, 2, 2, 6, b'A', b'd', b'a', 2, 2, 1, 2, b'c']
        );
        assert_eq!(value["fields"][0]["type"], json!(["null", "int"]));
    }
}
