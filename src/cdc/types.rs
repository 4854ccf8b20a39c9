//! A column's PostgreSQL type → how its value is written in a change event, as Debezium's
//! PostgreSQL connector writes it by default (`decimal.handling.mode=precise`,
//! `time.precision.mode=adaptive`, `binary.handling.mode=bytes`,
//! `interval.handling.mode=numeric`, `hstore.handling.mode=json`).
//!
//! Types are resolved by name from the catalog (`pg_type`), not by OID tables: a domain is
//! its base type, an enum a string, an array its element type's mapping, an extension type
//! (PostGIS, pgvector, citext) its text form.

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
}

/// How a column's values are written.
#[derive(Debug, Clone, PartialEq)]
pub enum ColType {
    Bool,
    /// int2, int4: a JSON integer.
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
    /// bytea: base64.
    Bytes,
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
        Self::resolve_depth(oid, typmod, lookup, 0)
    }

    fn resolve_depth(
        oid: u32,
        typmod: i32,
        lookup: &dyn Fn(u32) -> Option<TypeInfo>,
        depth: u32,
    ) -> ColType {
        let Some(info) = lookup(oid) else {
            return ColType::Text;
        };
        if depth > 8 {
            return ColType::Text;
        }
        if info.kind == b'd' {
            return Self::resolve_depth(info.base, info.base_typmod, lookup, depth + 1);
        }
        if info.element != 0 {
            // An array's modifier is its element's.
            let element = Self::resolve_depth(info.element, typmod, lookup, depth + 1);
            return ColType::Array(Box::new(element));
        }
        if info.kind != b'b' {
            // Enums, ranges, multiranges, composites: their text.
            return ColType::Text;
        }
        let precision = if typmod < 0 {
            DEFAULT_PRECISION
        } else {
            typmod
        };
        match info.name.as_str() {
            "bool" => ColType::Bool,
            "int2" | "int4" => ColType::Int,
            "int8" | "oid" => ColType::Long,
            "float4" => ColType::Float32,
            "float8" => ColType::Float64,
            "numeric" if typmod >= 4 => ColType::Decimal {
                scale: ((typmod - 4) & 0xffff) as u32,
            },
            "numeric" => ColType::VariableDecimal,
            "money" => ColType::Money,
            "bytea" => ColType::Bytes,
            "date" => ColType::Date,
            "time" => ColType::Time {
                micros: precision > 3,
            },
            "timetz" => ColType::TimeTz,
            "timestamp" => ColType::Timestamp {
                micros: precision > 3,
            },
            "timestamptz" => ColType::TimestampTz {
                digits: precision as u32,
            },
            "interval" => ColType::Interval,
            "bit" if typmod == 1 => ColType::Bit,
            "bit" | "varbit" => ColType::Bits,
            "point" => ColType::Point,
            "hstore" => ColType::Hstore,
            _ => ColType::Text,
        }
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
