//! Values written as Debezium writes them.

#![allow(clippy::unwrap_used)]
use super::*;

fn json(ty: ColType, text: &str) -> String {
    let mut s = String::new();
    write(&mut s, &ty, text).unwrap();
    s
}

/// Values as Debezium 3.6's PostgreSQL connector wrote them (JSON converter, no schemas)
/// for the same rows, read off its topic on this machine.
#[test]
fn values_are_written_as_debezium_writes_them() {
    assert_eq!(
        json(ColType::VariableDecimal, "12345.678901234567890"),
        r#"{"scale":14,"value":"ESIQ9H3pgRU="}"#
    );
    assert_eq!(
        json(ColType::VariableDecimal, "-0.5"),
        r#"{"scale":1,"value":"+w=="}"#
    );
    assert_eq!(json(ColType::VariableDecimal, "NaN"), "null");
    assert_eq!(
        json(ColType::Decimal { scale: 2 }, "12345678.91"),
        r#""SZYC0w==""#
    );
    assert_eq!(json(ColType::Money, "$1,234.56"), r#""AeJA""#);
    assert_eq!(json(ColType::Float32, "-Infinity"), r#""-Infinity""#);
    assert_eq!(
        json(ColType::Float64, "3.141592653589793"),
        "3.141592653589793"
    );
    assert_eq!(json(ColType::Float32, "1.5"), "1.5");
    assert_eq!(
        json(
            ColType::Bytes(crate::config::BinaryMode::Bytes),
            "\\x00ff10"
        ),
        r#""AP8Q""#
    );
    assert_eq!(json(ColType::Text, "héllo \"q\"\\n"), r#""héllo \"q\"\\n""#);
    assert_eq!(json(ColType::Date, "2024-02-29"), "19782");
    assert_eq!(json(ColType::Date, "0044-03-15 BC"), "-735160");
    assert_eq!(json(ColType::Date, "-infinity"), "-2147472691");
    assert_eq!(
        json(ColType::Time { micros: true }, "12:34:56.789012"),
        "45296789012"
    );
    assert_eq!(
        json(ColType::Time { micros: false }, "12:34:56.789"),
        "45296789"
    );
    assert_eq!(
        json(ColType::TimeTz, "12:34:56.789+02"),
        r#""10:34:56.789Z""#
    );
    assert_eq!(
        json(
            ColType::Timestamp { micros: true },
            "2024-02-29 12:34:56.789012"
        ),
        "1709210096789012"
    );
    assert_eq!(
        json(
            ColType::Timestamp { micros: false },
            "2024-02-29 12:34:56.789"
        ),
        "1709210096789"
    );
    assert_eq!(
        json(
            ColType::Timestamp { micros: true },
            "0044-03-15 12:00:00 BC"
        ),
        "-63517780800000000"
    );
    assert_eq!(
        json(ColType::Timestamp { micros: true }, "infinity"),
        "9223372036825200000"
    );
    assert_eq!(
        json(
            ColType::TimestampTz { digits: 6 },
            "2024-02-29 10:34:56.789012+00"
        ),
        r#""2024-02-29T10:34:56.789012Z""#
    );
    assert_eq!(
        json(
            ColType::TimestampTz { digits: 6 },
            "1969-12-31 23:59:59.5+00"
        ),
        r#""1969-12-31T23:59:59.500000Z""#
    );
    assert_eq!(
        json(ColType::TimestampTz { digits: 6 }, "infinity"),
        r#""infinity""#
    );
    assert_eq!(
        json(ColType::Interval, "1 year 2 mons 3 days 04:05:06.789"),
        "37091106789000"
    );
    assert_eq!(json(ColType::Bit, "1"), "true");
    assert_eq!(json(ColType::Bits, "10100101"), r#""pQ==""#);
    assert_eq!(json(ColType::Bits, "101"), r#""BQ==""#);
    assert_eq!(
        json(ColType::Point, "(1.5,2.5)"),
        r#"{"x":1.5,"y":2.5,"wkb":"AQEAAAAAAAAAAAD4PwAAAAAAAARA","srid":null}"#
    );
    assert_eq!(
        json(ColType::Hstore, r#""a"=>"1", "b"=>NULL"#),
        r#""{\"a\":\"1\",\"b\":null}""#
    );
    assert_eq!(
        json(ColType::Array(Box::new(ColType::Int)), "{1,NULL,3}"),
        "[1,null,3]"
    );
    assert_eq!(
        json(
            ColType::Array(Box::new(ColType::Text)),
            r#"{"a b","c\"d",NULL}"#
        ),
        r#"["a b","c\"d",null]"#
    );
    // Fewer fraction digits than the scale: the unscaled value is 150 either way.
    assert_eq!(json(ColType::Decimal { scale: 2 }, "1.5"), r#""AJY=""#);
    assert_eq!(json(ColType::Decimal { scale: 2 }, "1.50"), r#""AJY=""#);
}

/// A `timestamptz` keeps as many fraction digits as its column's precision, zeros
/// included, and years outside 0000–9999 carry their sign.
#[test]
fn timestamptz_fraction_digits_and_years_beyond_four_digits() {
    let tz = |digits, text| json(ColType::TimestampTz { digits }, text);
    let t = "2024-02-29 10:34:56.000012+00";
    assert_eq!(tz(6, t), r#""2024-02-29T10:34:56.000012Z""#);
    assert_eq!(tz(3, t), r#""2024-02-29T10:34:56.000Z""#);
    assert_eq!(
        tz(1, "2024-02-29 10:34:56.789+00"),
        r#""2024-02-29T10:34:56.7Z""#
    );
    assert_eq!(tz(0, t), r#""2024-02-29T10:34:56Z""#);
    assert_eq!(
        tz(0, "12345-01-02 03:04:05+00"),
        r#""+12345-01-02T03:04:05Z""#
    );
    assert_eq!(
        tz(0, "0044-03-15 12:00:00+00 BC"),
        r#""-0043-03-15T12:00:00Z""#
    );
}

#[test]
fn java_number_formatting() {
    let f = |v: f64| {
        let mut s = String::new();
        java_float(&mut s, v, None);
        s
    };
    assert_eq!(f(2.0), "2.0");
    assert_eq!(f(1e7), "1.0E7");
    assert_eq!(f(1234567.5), "1234567.5");
    assert_eq!(f(0.001), "0.001");
    assert_eq!(f(0.0001), "1.0E-4");
    assert_eq!(f(-1.25e-10), "-1.25E-10");
    assert_eq!(f(100.0), "100.0");
    assert_eq!(f(-0.0), "-0.0");
    assert_eq!(f(f64::NAN), "\"NaN\"");
}

#[test]
fn nested_arrays_and_unparsable_values() {
    assert_eq!(
        json(ColType::Array(Box::new(ColType::Int)), "{{1,2},{3,4}}"),
        "[[1,2],[3,4]]"
    );
    assert_eq!(json(ColType::Array(Box::new(ColType::Int)), "{}"), "[]");
    assert_eq!(
        json(ColType::Array(Box::new(ColType::Text)), "[0:1]={a,b}"),
        r#"["a","b"]"#
    );
    let mut s = String::new();
    assert!(write(&mut s, &ColType::Int, "12a").is_err());
    assert!(write(&mut s, &ColType::Date, "yesterday").is_err());
    assert!(write(&mut s, &ColType::Array(Box::new(ColType::Int)), "{1,2").is_err());
    assert_eq!(json(ColType::Decimal { scale: 0 }, "-128"), r#""gA==""#);
    assert_eq!(json(ColType::Decimal { scale: 0 }, "128"), r#""AIA=""#);
    assert_eq!(json(ColType::Decimal { scale: 0 }, "0"), r#""AA==""#);
}
