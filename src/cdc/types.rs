//! A column's PostgreSQL type → how its value is written in a change event, as Debezium's
//! PostgreSQL connector writes it by default (`decimal.handling.mode=precise`,
//! `time.precision.mode=adaptive`, `binary.handling.mode=bytes`,
//! `interval.handling.mode=numeric`, `hstore.handling.mode=json`).
//!
//! The other handling modes are options ([`crate::config::Modes`]).
//!
//! Types are resolved by name from the catalog (`pg_type`), not by OID tables: a domain is
//! its base type, an enum a string, an array its element type's mapping, an extension type
//! (PostGIS, pgvector, citext) its text form.

use crate::config::{BinaryMode, DecimalMode, HstoreMode, IntervalMode, Modes, TimeMode};

/// What the catalog says of one type OID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub oid: u32,
    /// `pg_type.typname`.
    pub name: String,
    /// `pg_type.typtype`: `b` base, `c` composite, `d` domain, `e` enum, `r` range, `m`
    /// multirange, `p` pseudo.
    pub kind: u8,
    /// Domains: the base type and its modifier.
    pub base: u32,
    pub base_typmod: i32,
    /// Arrays (`typcategory = 'A'`): the element type; 0 otherwise.
    pub element: u32,
    /// Enums: the labels in sort order (the schema's `allowed`).
    pub labels: Vec<String>,
}

/// A column's Kafka Connect schema as Debezium's JSON converter writes it with
/// `schemas.enable=true`, split around `"optional"`: `{head,"optional":…tail,"field":…}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// `"type":"…"` and, for structs and arrays, `"fields"` / `"items"`.
    pub head: String,
    /// `,"name":…,"version":…,"parameters":…,"doc":…` (may be empty).
    pub tail: String,
}

impl Fragment {
    fn plain(connect_type: &str) -> Fragment {
        Fragment {
            head: format!("\"type\":\"{connect_type}\""),
            tail: String::new(),
        }
    }

    fn named(connect_type: &str, name: &str) -> Fragment {
        Fragment {
            head: format!("\"type\":\"{connect_type}\""),
            tail: format!(",\"name\":\"{name}\",\"version\":1"),
        }
    }

    fn with_parameters(mut self, parameters: &[(&str, String)]) -> Fragment {
        let list: Vec<String> = parameters
            .iter()
            .map(|(k, v)| {
                let mut s = String::new();
                super::value::string(&mut s, k);
                s.push(':');
                super::value::string(&mut s, v);
                s
            })
            .collect();
        self.tail
            .push_str(&format!(",\"parameters\":{{{}}}", list.join(",")));
        self
    }

    /// The schema of a column (or, without `field`, of an array's items).
    pub fn write(&self, out: &mut String, optional: bool, field: Option<&str>) {
        out.push('{');
        out.push_str(&self.head);
        out.push_str(if optional {
            ",\"optional\":true"
        } else {
            ",\"optional\":false"
        });
        out.push_str(&self.tail);
        if let Some(f) = field {
            out.push_str(",\"field\":");
            super::value::string(out, f);
        }
        out.push('}');
    }
}

/// How a column's values are written, and its schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub ty: ColType,
    pub schema: Fragment,
}

/// How a column's values are written.
#[derive(Debug, Clone, PartialEq)]
pub enum ColType {
    Bool,
    /// int2, int4: a JSON integer (`int16` / `int32` in the schema).
    Int,
    /// int8, oid: a JSON integer.
    Long,
    Float32,
    Float64,
    /// numeric with a declared scale: Connect `Decimal`, base64 of the unscaled value.
    Decimal {
        scale: u32,
    },
    /// numeric without a scale: Debezium's `VariableScaleDecimal` `{"scale":…,"value":…}`.
    VariableDecimal,
    /// money: a `Decimal` of scale 2.
    Money,
    /// Text as PostgreSQL prints it (text, varchar, char, uuid, json, xml, inet, enums,
    /// ranges, tsvector, extension types, …).
    Text,
    /// bytea: base64 (`binary.handling.mode` bytes or base64), URL-safe base64, or hex.
    Bytes(crate::config::BinaryMode),
    /// numeric or money with `decimal.handling.mode=double`: a JSON number.
    DecimalDouble,
    /// numeric or money with `decimal.handling.mode=string`: its text (money without the
    /// currency symbol and separators).
    DecimalString,
    /// interval with `interval.handling.mode=string`: ISO 8601 (`P1Y2M3DT4H5M6.789S`).
    IntervalIso,
    /// hstore with `hstore.handling.mode=map`: a JSON object.
    HstoreMap,
    /// Days since 1970-01-01.
    Date,
    /// Milliseconds (precision ≤ 3) or microseconds since midnight.
    Time {
        micros: bool,
    },
    /// `HH:MM:SS[.fff]Z` in UTC.
    TimeTz,
    /// Milliseconds (precision ≤ 3) or microseconds since the epoch, no zone.
    Timestamp {
        micros: bool,
    },
    /// ISO-8601 in UTC with `digits` fraction digits.
    TimestampTz {
        digits: u32,
    },
    /// Microseconds, a month counted as 365.25/12 days.
    Interval,
    /// bit(1): a boolean.
    Bit,
    /// bit(n > 1), varbit: the bits as a little-endian number, base64.
    Bits,
    /// point: `{"x","y","wkb","srid"}`.
    Point,
    /// hstore: a JSON object as a string.
    Hstore,
    Array(Box<ColType>),
}

/// Default fractional digits of time and timestamp types without a declared precision.
const DEFAULT_PRECISION: i32 = 6;

impl ColType {
    /// The mapping of a column of type `oid` with modifier `typmod`; `lookup` gives the
    /// catalog's entry for an OID (`None`: unknown, written as text).
    pub fn resolve(oid: u32, typmod: i32, lookup: &dyn Fn(u32) -> Option<TypeInfo>) -> ColType {
        resolve(oid, typmod, lookup, &Modes::default()).ty
    }
}

/// [`ColType::resolve`] with the column's schema, under the configured handling modes.
pub fn resolve(
    oid: u32,
    typmod: i32,
    lookup: &dyn Fn(u32) -> Option<TypeInfo>,
    modes: &Modes,
) -> Resolved {
    resolve_depth(oid, typmod, lookup, modes, 0)
}

fn text(schema: Fragment) -> Resolved {
    Resolved {
        ty: ColType::Text,
        schema,
    }
}

fn resolve_depth(
    oid: u32,
    typmod: i32,
    lookup: &dyn Fn(u32) -> Option<TypeInfo>,
    modes: &Modes,
    depth: u32,
) -> Resolved {
    let Some(info) = lookup(oid).filter(|_| depth <= 8) else {
        return text(Fragment::plain("string"));
    };
    if info.kind == b'd' {
        return resolve_depth(info.base, info.base_typmod, lookup, modes, depth + 1);
    }
    if info.element != 0 {
        // An array's modifier is its element's.
        let element = resolve_depth(info.element, typmod, lookup, modes, depth + 1);
        let mut items = String::new();
        element.schema.write(&mut items, true, None);
        return Resolved {
            ty: ColType::Array(Box::new(element.ty)),
            schema: Fragment {
                head: format!("\"type\":\"array\",\"items\":{items}"),
                tail: String::new(),
            },
        };
    }
    if info.kind == b'e' {
        let schema = Fragment::named("string", "io.debezium.data.Enum")
            .with_parameters(&[("allowed", info.labels.join(","))]);
        return text(schema);
    }
    if info.kind != b'b' {
        // Ranges, multiranges, composites: their text.
        return text(Fragment::plain("string"));
    }
    let precision = if typmod < 0 {
        DEFAULT_PRECISION
    } else {
        typmod
    };
    let r = |ty: ColType, schema: Fragment| Resolved { ty, schema };
    let connect = modes.time == TimeMode::Connect;
    match info.name.as_str() {
        "numeric" | "money" if modes.decimal == DecimalMode::Double => {
            r(ColType::DecimalDouble, Fragment::plain("double"))
        }
        "numeric" | "money" if modes.decimal == DecimalMode::String => {
            r(ColType::DecimalString, Fragment::plain("string"))
        }
        "bytea" => match modes.binary {
            BinaryMode::Bytes => r(ColType::Bytes(modes.binary), Fragment::plain("bytes")),
            other => r(ColType::Bytes(other), Fragment::plain("string")),
        },
        "date" if connect => r(
            ColType::Date,
            Fragment::named("int32", "org.apache.kafka.connect.data.Date"),
        ),
        "time" if connect => r(
            ColType::Time { micros: false },
            Fragment::named("int32", "org.apache.kafka.connect.data.Time"),
        ),
        "time" if modes.time == TimeMode::AdaptiveTimeMicroseconds => r(
            ColType::Time { micros: true },
            Fragment::named("int64", "io.debezium.time.MicroTime"),
        ),
        "timestamp" if connect => r(
            ColType::Timestamp { micros: false },
            Fragment::named("int64", "org.apache.kafka.connect.data.Timestamp"),
        ),
        "interval" if modes.interval == IntervalMode::String => r(
            ColType::IntervalIso,
            Fragment::named("string", "io.debezium.time.Interval"),
        ),
        "hstore" if modes.hstore == HstoreMode::Map => r(
            ColType::HstoreMap,
            Fragment {
                head: "\"type\":\"map\",\"keys\":{\"type\":\"string\",\"optional\":false},\"values\":{\"type\":\"string\",\"optional\":true}".into(),
                tail: String::new(),
            },
        ),
        "bool" => r(ColType::Bool, Fragment::plain("boolean")),
        "int2" => r(ColType::Int, Fragment::plain("int16")),
        "int4" => r(ColType::Int, Fragment::plain("int32")),
        "int8" | "oid" => r(ColType::Long, Fragment::plain("int64")),
        "float4" => r(ColType::Float32, Fragment::plain("float")),
        "float8" => r(ColType::Float64, Fragment::plain("double")),
        "numeric" if typmod >= 4 => {
            let scale = ((typmod - 4) & 0xffff) as u32;
            let digits = ((typmod - 4) >> 16) & 0xffff;
            let schema = Fragment::named("bytes", "org.apache.kafka.connect.data.Decimal")
                .with_parameters(&[
                    ("scale", scale.to_string()),
                    ("connect.decimal.precision", digits.to_string()),
                ]);
            r(ColType::Decimal { scale }, schema)
        }
        "numeric" => r(
            ColType::VariableDecimal,
            Fragment {
                head: "\"type\":\"struct\",\"fields\":[{\"type\":\"int32\",\"optional\":false,\"field\":\"scale\"},{\"type\":\"bytes\",\"optional\":false,\"field\":\"value\"}]".into(),
                tail: ",\"name\":\"io.debezium.data.VariableScaleDecimal\",\"version\":1,\"doc\":\"Variable scaled decimal\"".into(),
            },
        ),
        "money" => r(
            ColType::Money,
            Fragment::named("bytes", "org.apache.kafka.connect.data.Decimal")
                .with_parameters(&[("scale", "2".into())]),
        ),
        "date" => r(ColType::Date, Fragment::named("int32", "io.debezium.time.Date")),
        "time" if precision > 3 => r(
            ColType::Time { micros: true },
            Fragment::named("int64", "io.debezium.time.MicroTime"),
        ),
        "time" => r(
            ColType::Time { micros: false },
            Fragment::named("int32", "io.debezium.time.Time"),
        ),
        "timetz" => r(ColType::TimeTz, Fragment::named("string", "io.debezium.time.ZonedTime")),
        "timestamp" if precision > 3 => r(
            ColType::Timestamp { micros: true },
            Fragment::named("int64", "io.debezium.time.MicroTimestamp"),
        ),
        "timestamp" => r(
            ColType::Timestamp { micros: false },
            Fragment::named("int64", "io.debezium.time.Timestamp"),
        ),
        "timestamptz" => r(
            ColType::TimestampTz {
                digits: precision as u32,
            },
            Fragment::named("string", "io.debezium.time.ZonedTimestamp"),
        ),
        "interval" => r(ColType::Interval, Fragment::named("int64", "io.debezium.time.MicroDuration")),
        "bit" if typmod == 1 => r(ColType::Bit, Fragment::plain("boolean")),
        "bit" | "varbit" => {
            let length = if typmod < 0 { i32::MAX } else { typmod };
            let schema = Fragment::named("bytes", "io.debezium.data.Bits")
                .with_parameters(&[("length", length.to_string())]);
            r(ColType::Bits, schema)
        }
        "point" => r(
            ColType::Point,
            Fragment {
                head: "\"type\":\"struct\",\"fields\":[{\"type\":\"double\",\"optional\":false,\"field\":\"x\"},{\"type\":\"double\",\"optional\":false,\"field\":\"y\"},{\"type\":\"bytes\",\"optional\":true,\"field\":\"wkb\"},{\"type\":\"int32\",\"optional\":true,\"field\":\"srid\"}]".into(),
                tail: ",\"name\":\"io.debezium.data.geometry.Point\",\"version\":1,\"doc\":\"Geometry (POINT)\"".into(),
            },
        ),
        "hstore" => r(ColType::Hstore, Fragment::named("string", "io.debezium.data.Json")),
        "uuid" => text(Fragment::named("string", "io.debezium.data.Uuid")),
        "json" | "jsonb" => text(Fragment::named("string", "io.debezium.data.Json")),
        "xml" => text(Fragment::named("string", "io.debezium.data.Xml")),
        "tsvector" => text(Fragment::named("string", "io.debezium.data.Tsvector")),
        "ltree" => text(Fragment::named("string", "io.debezium.data.Ltree")),
        _ => text(Fragment::plain("string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog(oid: u32) -> Option<TypeInfo> {
        let t = |name: &str, kind: u8, base: u32, element: u32| TypeInfo {
            oid,
            name: name.into(),
            kind,
            base,
            base_typmod: if base == 1700 { (10 << 16 | 2) + 4 } else { -1 },
            element,
            labels: Vec::new(),
        };
        Some(match oid {
            23 => t("int4", b'b', 0, 0),
            1700 => t("numeric", b'b', 0, 0),
            1007 => t("_int4", b'b', 0, 23),
            1083 => t("time", b'b', 0, 0),
            1560 => t("bit", b'b', 0, 0),
            50000 => t("price", b'd', 1700, 0),
            50001 => t("mood", b'e', 0, 0),
            50002 => t("_mood", b'b', 0, 50001),
            _ => return None,
        })
    }

    #[test]
    fn domains_arrays_enums_and_modifiers_resolve() {
        assert_eq!(ColType::resolve(23, -1, &catalog), ColType::Int);
        assert_eq!(
            ColType::resolve(1700, (10 << 16 | 2) + 4, &catalog),
            ColType::Decimal { scale: 2 }
        );
        assert_eq!(
            ColType::resolve(1700, -1, &catalog),
            ColType::VariableDecimal
        );
        assert_eq!(
            ColType::resolve(50000, -1, &catalog),
            ColType::Decimal { scale: 2 }
        );
        assert_eq!(
            ColType::resolve(1007, -1, &catalog),
            ColType::Array(Box::new(ColType::Int))
        );
        assert_eq!(
            ColType::resolve(50002, -1, &catalog),
            ColType::Array(Box::new(ColType::Text))
        );
        assert_eq!(
            ColType::resolve(1083, 3, &catalog),
            ColType::Time { micros: false }
        );
        assert_eq!(
            ColType::resolve(1083, -1, &catalog),
            ColType::Time { micros: true }
        );
        assert_eq!(ColType::resolve(1560, 1, &catalog), ColType::Bit);
        assert_eq!(ColType::resolve(1560, 8, &catalog), ColType::Bits);
        assert_eq!(ColType::resolve(99999, -1, &catalog), ColType::Text);
    }
}
