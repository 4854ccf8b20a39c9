//! A column value in PostgreSQL's text form → its JSON text in a change event, byte for byte
//! as Debezium's JSON converter writes it (Jackson's number and string formatting included),
//! so a consumer moved from Debezium sees the same bytes.
//!
//! The replication connection fixes the settings the text depends on (`TimeZone=UTC`,
//! `DateStyle=ISO`, `IntervalStyle=postgres`, `extra_float_digits=1`, `bytea_output=hex`,
//! `lc_monetary=C`: see `source::replication_conn`). A value that does not parse as its type
//! is an error naming the value's problem: the caller dead-letters the event with it — never
//! a silent null.

use std::fmt::Write as _;

mod time;

use self::time::{
    date_days, interval_iso, interval_micros, iso_utc, time_micros, time_tz, timestamp_micros,
};
use super::types::ColType;

/// Appends the JSON for `text` (a non-NULL value of type `ty`) to `out`.
pub fn write(out: &mut String, ty: &ColType, text: &str) -> Result<(), String> {
    match ty {
        ColType::Bool => match text {
            "t" => out.push_str("true"),
            "f" => out.push_str("false"),
            _ => return Err(format!("`{text}` is not a boolean")),
        },
        ColType::Int | ColType::Long => {
            let ok = text.strip_prefix('-').unwrap_or(text);
            if ok.is_empty() || !ok.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!("`{text}` is not an integer"));
            }
            out.push_str(text);
        }
        ColType::Float32 => {
            let v: f32 = text
                .parse()
                .map_err(|_| format!("`{text}` is not a float4"))?;
            java_float(out, f64::from(v), Some(v));
        }
        ColType::Float64 => {
            let v: f64 = text
                .parse()
                .map_err(|_| format!("`{text}` is not a float8"))?;
            java_float(out, v, None);
        }
        ColType::Decimal { scale } => match decimal(text, Some(*scale))? {
            None => out.push_str("null"),
            Some((bytes, _)) => string(out, &base64(&bytes)),
        },
        ColType::VariableDecimal => match decimal(text, None)? {
            None => out.push_str("null"),
            Some((bytes, scale)) => {
                out.push_str("{\"scale\":");
                let _ = write!(out, "{scale}");
                out.push_str(",\"value\":");
                string(out, &base64(&bytes));
                out.push('}');
            }
        },
        ColType::Money => {
            let plain: String = text.chars().filter(|c| !matches!(c, '$' | ',')).collect();
            match decimal(&plain, Some(2))? {
                None => out.push_str("null"),
                Some((bytes, _)) => string(out, &base64(&bytes)),
            }
        }
        ColType::Text => string(out, text),
        ColType::Bytes(mode) => {
            let bytes = crate::source::pgoutput::decode_bytea_hex(text.as_bytes())
                .ok_or_else(|| "bytea value is not in hex format".to_string())?;
            string(out, &encode_binary(*mode, &bytes));
        }
        ColType::DecimalDouble => {
            let plain = plain_number(text);
            let v: f64 = plain
                .parse()
                .map_err(|_| format!("`{text}` is not a number"))?;
            java_float(out, v, None);
        }
        // Debezium names the special values after its SpecialValueDecimal constants.
        ColType::DecimalString => match text {
            "NaN" => string(out, "NAN"),
            "Infinity" => string(out, "POSITIVE_INFINITY"),
            "-Infinity" => string(out, "NEGATIVE_INFINITY"),
            _ => string(out, &plain_number(text)),
        },
        ColType::IntervalIso => string(out, &interval_iso(text)?),
        ColType::HstoreMap => out.push_str(&hstore_json(text)?),
        ColType::Date => match text {
            // PostgreSQL's infinite dates (±(2^31 - 1) days from 2000-01-01), moved to 1970 in
            // 32 bits as Debezium moves them: `infinity` wraps around to a date in 5,877,641 BC
            // (documented in docs/cdc.md; kept for byte-for-byte compatibility).
            "-infinity" => {
                let _ = write!(out, "{}", i32::MIN.wrapping_add(10_957));
            }
            "infinity" => {
                let _ = write!(out, "{}", i32::MAX.wrapping_add(10_957));
            }
            _ => {
                let _ = write!(out, "{}", date_days(text)?);
            }
        },
        ColType::Time { micros } => {
            let us = time_micros(text)?;
            let _ = write!(out, "{}", if *micros { us } else { us / 1000 });
        }
        ColType::TimeTz => string(out, &time_tz(text)?),
        ColType::Timestamp { micros } => {
            let us = match text {
                // pgjdbc's constants for PostgreSQL's infinite timestamps.
                "infinity" => 9_223_372_036_825_200_000,
                "-infinity" => -9_223_372_036_832_400_000,
                _ => timestamp_micros(text)?.0,
            };
            let v = if *micros { us } else { us.div_euclid(1000) };
            let _ = write!(out, "{v}");
        }
        ColType::TimestampTz { digits } => match text {
            "infinity" | "-infinity" => string(out, text),
            _ => {
                let (us, _) = timestamp_micros(text)?;
                // Digits, `-`, `:`, `T`, `.`, `Z`: nothing to escape.
                out.push('"');
                iso_utc(out, us, *digits);
                out.push('"');
            }
        },
        ColType::Interval => {
            let _ = write!(out, "{}", interval_micros(text)?);
        }
        ColType::Bit => match text {
            "1" => out.push_str("true"),
            "0" => out.push_str("false"),
            _ => return Err(format!("`{text}` is not a bit(1)")),
        },
        ColType::Bits => string(out, &base64(&bits(text)?)),
        ColType::Point => {
            let (x, y) = point(text)?;
            let mut wkb = vec![1u8, 1, 0, 0, 0];
            wkb.extend_from_slice(&x.to_le_bytes());
            wkb.extend_from_slice(&y.to_le_bytes());
            out.push_str("{\"x\":");
            java_float(out, x, None);
            out.push_str(",\"y\":");
            java_float(out, y, None);
            out.push_str(",\"wkb\":");
            string(out, &base64(&wkb));
            out.push_str(",\"srid\":null}");
        }
        ColType::Hstore => string(out, &hstore_json(text)?),
        ColType::Array(element) => {
            let items = parse_array(text)?;
            write_array(out, element, &items)?;
        }
    }
    Ok(())
}

/// A JSON string, escaped as Jackson escapes it (`\"`, `\\`, `\n`…, other control characters
/// as `\u00XX` with upper-case hex; everything else as is).
pub fn string(out: &mut String, s: &str) {
    out.push('"');
    if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Java's `Double.toString` / `Float.toString` as Jackson writes them: plain between 10^-3
/// and 10^7 with at least one fraction digit, otherwise `d.dddE±n`; non-finite values as the
/// strings `"NaN"`, `"Infinity"`, `"-Infinity"`.
pub fn java_float(out: &mut String, v: f64, as_f32: Option<f32>) {
    if v.is_nan() {
        return out.push_str("\"NaN\"");
    }
    if v.is_infinite() {
        return out.push_str(if v > 0.0 {
            "\"Infinity\""
        } else {
            "\"-Infinity\""
        });
    }
    if v == 0.0 {
        return out.push_str(if v.is_sign_negative() { "-0.0" } else { "0.0" });
    }
    // Shortest round-trip digits: `d.ddde±x`.
    let sci = match as_f32 {
        Some(f) => format!("{f:e}"),
        None => format!("{v:e}"),
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (negative, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    if negative {
        out.push('-');
    }
    if (-3..7).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            for _ in 0..(-exp - 1) {
                out.push('0');
            }
            out.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                for _ in digits.len()..int_len {
                    out.push('0');
                }
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        out.push('.');
        if digits.len() > 1 {
            out.push_str(&digits[1..]);
        } else {
            out.push('0');
        }
        out.push('E');
        out.push_str(&exp.to_string());
    }
}

/// A money's text without its currency symbol and group separators (`$1,234.56` →
/// `1234.56`); other numbers unchanged.
fn plain_number(text: &str) -> String {
    text.chars().filter(|c| !matches!(c, '$' | ',')).collect()
}

/// Bytes as `binary.handling.mode` writes them.
pub fn encode_binary(mode: crate::config::BinaryMode, bytes: &[u8]) -> String {
    use crate::config::BinaryMode;
    match mode {
        BinaryMode::Bytes | BinaryMode::Base64 => base64(bytes),
        BinaryMode::Base64UrlSafe => base64(bytes).replace('+', "-").replace('/', "_"),
        BinaryMode::Hex => bytes.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A numeric's text → (unscaled value as Java's `BigInteger.toByteArray`, scale). `scale`
/// given: the declared scale; `None`: the value's own, trailing fraction zeros dropped (as
/// Debezium's `VariableScaleDecimal`). `None` for NaN and ±Infinity, which a decimal cannot
/// hold (Debezium writes null).
fn decimal(text: &str, scale: Option<u32>) -> Result<Option<(Vec<u8>, u32)>, String> {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return Ok(None);
    }
    let bad = || format!("`{text}` is not a number");
    let (negative, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // The fraction's digits, and how many zeros after them make up the scale.
    let (frac, pad, scale) = match scale {
        Some(s) => {
            let s = s as usize;
            if frac.len() > s {
                return Err(format!(
                    "`{text}` has more fraction digits than its scale {s}"
                ));
            }
            (frac, s - frac.len(), s)
        }
        None => {
            let f = frac.trim_end_matches('0');
            (f, 0, f.len())
        }
    };
    let digits = int
        .bytes()
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', pad));
    // Decimal digits → big-endian magnitude bytes (a byte holds 2.4 digits).
    let mut mag: Vec<u8> = Vec::with_capacity((int.len() + scale) * 5 / 12 + 2);
    for d in digits {
        let mut carry = u32::from(d - b'0');
        for byte in mag.iter_mut().rev() {
            let v = u32::from(*byte) * 10 + carry;
            *byte = (v & 0xff) as u8;
            carry = v >> 8;
        }
        while carry > 0 {
            mag.insert(0, (carry & 0xff) as u8);
            carry >>= 8;
        }
    }
    while mag.first() == Some(&0) {
        mag.remove(0);
    }
    let zero = mag.is_empty();
    mag.insert(0, 0);
    if negative && !zero {
        // Two's complement, then the shortest form.
        for b in mag.iter_mut() {
            *b = !*b;
        }
        for b in mag.iter_mut().rev() {
            let (v, overflow) = b.overflowing_add(1);
            *b = v;
            if !overflow {
                break;
            }
        }
        while mag.len() > 1 && mag[0] == 0xff && mag[1] & 0x80 != 0 {
            mag.remove(0);
        }
    } else {
        while mag.len() > 1 && mag[0] == 0 && mag[1] & 0x80 == 0 {
            mag.remove(0);
        }
    }
    Ok(Some((mag, scale as u32)))
}

/// A bit string (`0101…`) → its value as little-endian bytes, one byte per 8 bits.
fn bits(text: &str) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; text.len().div_ceil(8).max(1)];
    for (k, c) in text.bytes().rev().enumerate() {
        match c {
            b'1' => out[k / 8] |= 1 << (k % 8),
            b'0' => {}
            _ => return Err(format!("`{text}` is not a bit string")),
        }
    }
    Ok(out)
}

fn point(text: &str) -> Result<(f64, f64), String> {
    let bad = || format!("`{text}` is not a point");
    let inner = text
        .strip_prefix('(')
        .and_then(|t| t.strip_suffix(')'))
        .ok_or_else(bad)?;
    let (x, y) = inner.split_once(',').ok_or_else(bad)?;
    Ok((x.parse().map_err(|_| bad())?, y.parse().map_err(|_| bad())?))
}

/// Reads a double-quoted token (`"…"` with `\` escapes) or an unquoted one ending at any of
/// `ends`; → (token, quoted, rest).
fn token<'a>(s: &'a str, ends: &[char]) -> Result<(String, bool, &'a str), String> {
    if let Some(rest) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, e)) => out.push(e),
                    None => break,
                },
                '"' => return Ok((out, true, &rest[i + 1..])),
                c => out.push(c),
            }
        }
        Err("unterminated quoted value".into())
    } else {
        let end = s.find(ends).unwrap_or(s.len());
        Ok((s[..end].trim().to_string(), false, &s[end..]))
    }
}

fn hstore_json(text: &str) -> Result<String, String> {
    let mut out = String::from("{");
    let mut rest = text.trim_start();
    let mut first = true;
    while !rest.is_empty() {
        let (key, _, r) = token(rest, &['='])?;
        let r = r
            .trim_start()
            .strip_prefix("=>")
            .ok_or("hstore: `=>` expected")?
            .trim_start();
        let (value, quoted, r) = token(r, &[','])?;
        if !first {
            out.push(',');
        }
        first = false;
        string(&mut out, &key);
        out.push(':');
        if !quoted && value == "NULL" {
            out.push_str("null");
        } else {
            string(&mut out, &value);
        }
        rest = r.trim_start().strip_prefix(',').unwrap_or(r).trim_start();
    }
    out.push('}');
    Ok(out)
}

/// One element of a PostgreSQL array literal.
#[derive(Debug, PartialEq)]
enum Item {
    Null,
    Value(String),
    Nested(Vec<Item>),
}

/// `{1,NULL,"a b",{…}}` → items (dimension decorations like `[0:1]=` are skipped).
fn parse_array(text: &str) -> Result<Vec<Item>, String> {
    let body = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let (items, rest) = array_items(body)?;
    if !rest.trim().is_empty() {
        return Err(format!("`{text}` is not an array"));
    }
    Ok(items)
}

fn array_items(s: &str) -> Result<(Vec<Item>, &str), String> {
    let mut rest = s.strip_prefix('{').ok_or("array: `{` expected")?;
    let mut items = Vec::new();
    if let Some(r) = rest.strip_prefix('}') {
        return Ok((items, r));
    }
    loop {
        if rest.starts_with('{') {
            let (nested, r) = array_items(rest)?;
            items.push(Item::Nested(nested));
            rest = r;
        } else {
            let (v, quoted, r) = token(rest, &[',', '}'])?;
            items.push(if !quoted && v == "NULL" {
                Item::Null
            } else {
                Item::Value(v)
            });
            rest = r;
        }
        match rest.chars().next() {
            Some(',') => rest = &rest[1..],
            Some('}') => return Ok((items, &rest[1..])),
            _ => return Err("array: `,` or `}` expected".into()),
        }
    }
}

fn write_array(out: &mut String, element: &ColType, items: &[Item]) -> Result<(), String> {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Item::Null => out.push_str("null"),
            Item::Value(v) => write(out, element, v)?,
            Item::Nested(inner) => write_array(out, element, inner)?,
        }
    }
    out.push(']');
    Ok(())
}

#[cfg(test)]
mod tests;
