//! Dates, times, timestamps and intervals in PostgreSQL's text form (`DateStyle=ISO`,
//! `IntervalStyle=postgres`, UTC) → the numbers and ISO strings Debezium writes for them.
//! Written without allocating where the hot path meets them (a `timestamptz` column in every
//! change), and into the caller's buffer.

use std::fmt::Write as _;

use super::java_float;
use crate::calendar::{civil_from_days, days_from_civil};

/// `YYYY-MM-DD[ BC]` → days since 1970-01-01 (1 BC is year 0).
pub(super) fn date_days(text: &str) -> Result<i64, String> {
    match text.strip_suffix(" BC") {
        Some(d) => civil_days(d, true),
        None => civil_days(text, false),
    }
    .ok_or_else(|| format!("`{text}` is not a date"))
}

/// `YYYY-MM-DD` of the era `bc` says → days since 1970-01-01.
fn civil_days(date: &str, bc: bool) -> Option<i64> {
    let mut p = date.splitn(3, '-');
    let mut num = || -> Option<i64> { p.next()?.parse().ok() };
    let (y, m, d) = (num()?, num()?, num()?);
    let y = if bc { 1 - y } else { y };
    Some(days_from_civil(y, m, d))
}

/// `HH:MM:SS[.ffffff]` → microseconds since midnight.
pub(super) fn time_micros(text: &str) -> Result<i64, String> {
    let bad = || format!("`{text}` is not a time");
    let mut p = text.splitn(3, ':');
    let h: i64 = p.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let m: i64 = p.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
    let s = p.next().ok_or_else(bad)?;
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let whole: i64 = whole.parse().map_err(|_| bad())?;
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    // `.5` is 500,000 µs: the digits given, then zeros to six.
    let micros = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(6)
        .fold(0i64, |v, d| v * 10 + i64::from(d - b'0'));
    Ok(((h * 60 + m) * 60 + whole) * 1_000_000 + micros)
}

/// Splits a `+HH[:MM[:SS]]` / `-…` offset off the end of a time; → (time, offset seconds).
fn split_offset(text: &str) -> Option<(&str, i64)> {
    let at = text.rfind(['+', '-'])?;
    let (time, offset) = text.split_at(at);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut secs = 0;
    for (i, part) in offset[1..].split(':').enumerate() {
        let v: i64 = part.parse().ok()?;
        secs += v * [3600, 60, 1].get(i)?;
    }
    Some((time, sign * secs))
}

/// `HH:MM:SS[.ffffff]±HH[:MM]` → `HH:MM:SS[.fff]Z` in UTC (Java's `ISO_OFFSET_TIME`: the
/// fraction without trailing zeros).
pub(super) fn time_tz(text: &str) -> Result<String, String> {
    let (time, offset) = split_offset(text).ok_or_else(|| format!("`{text}` is not a timetz"))?;
    let day = 86_400_000_000;
    let us = (time_micros(time)? - offset * 1_000_000).rem_euclid(day);
    let secs = us / 1_000_000;
    let mut s = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    let frac = us % 1_000_000;
    if frac != 0 {
        let f = format!("{frac:06}");
        s.push('.');
        s.push_str(f.trim_end_matches('0'));
    }
    s.push('Z');
    Ok(s)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM]][ BC]` → (microseconds since the epoch in UTC,
/// whether an offset was given).
pub(super) fn timestamp_micros(text: &str) -> Result<(i64, bool), String> {
    let bad = || format!("`{text}` is not a timestamp");
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let (date, time) = body.split_once(' ').ok_or_else(bad)?;
    let (time, offset) = match split_offset(time) {
        Some((t, o)) => (t, Some(o)),
        None => (time, None),
    };
    let days = civil_days(date, bc).ok_or_else(bad)?;
    let us = days * 86_400_000_000 + time_micros(time)? - offset.unwrap_or(0) * 1_000_000;
    Ok((us, offset.is_some()))
}

/// Microseconds since the epoch → `YYYY-MM-DDTHH:MM:SS[.f…]Z` with `digits` fraction digits
/// (Debezium's `ZonedTimestamp`).
pub(super) fn iso_utc(out: &mut String, us: i64, digits: u32) {
    let days = us.div_euclid(86_400_000_000);
    let rest = us.rem_euclid(86_400_000_000);
    let (y, m, d) = civil_from_days(days);
    let secs = rest / 1_000_000;
    let _ = if (0..=9999).contains(&y) {
        write!(out, "{y:04}")
    } else if y > 9999 {
        write!(out, "+{y}")
    } else {
        write!(out, "-{:04}", -y)
    };
    let _ = write!(
        out,
        "-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    );
    if digits > 0 {
        // The first `digits` of the six-digit fraction.
        let digits = digits.min(6);
        let _ = write!(
            out,
            ".{:0width$}",
            rest % 1_000_000 / 10i64.pow(6 - digits),
            width = digits as usize
        );
    }
    out.push('Z');
}

/// An interval's parts as PostgreSQL's `postgres` style prints them
/// (`1 year 2 mons -3 days 04:05:06.789`); the time part's sign applies to all of it.
struct IntervalParts {
    years: f64,
    months: f64,
    days: f64,
    hours: f64,
    minutes: f64,
    seconds: f64,
}

fn interval_parts(text: &str) -> Result<IntervalParts, String> {
    let bad = || format!("`{text}` is not an interval");
    let mut p = IntervalParts {
        years: 0.0,
        months: 0.0,
        days: 0.0,
        hours: 0.0,
        minutes: 0.0,
        seconds: 0.0,
    };
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w.contains(':') {
            let (sign, t) = match w.strip_prefix('-') {
                Some(t) => (-1.0, t),
                None => (1.0, w.strip_prefix('+').unwrap_or(w)),
            };
            let mut hms = t.splitn(3, ':');
            let mut part = || -> Result<f64, String> {
                hms.next()
                    .map_or(Ok(0.0), |v| v.parse::<f64>().map_err(|_| bad()))
            };
            p.hours = sign * part()?;
            p.minutes = sign * part()?;
            p.seconds = sign * part()?;
            continue;
        }
        let n: f64 = w.parse().map_err(|_| bad())?;
        match words.next().ok_or_else(bad)?.trim_end_matches('s') {
            "year" => p.years = n,
            "mon" => p.months = n,
            "day" => p.days = n,
            _ => return Err(bad()),
        }
    }
    Ok(p)
}

/// Microseconds as Debezium computes them (a month is 365.25 / 12 days, in floating point).
pub(super) fn interval_micros(text: &str) -> Result<i64, String> {
    let p = interval_parts(text)?;
    let days_per_month = 365.25 / 12.0;
    let total_days = (p.years * 12.0 + p.months) * days_per_month + p.days;
    let total_seconds = ((total_days * 24.0 + p.hours) * 60.0 + p.minutes) * 60.0 + p.seconds;
    Ok((total_seconds * 1_000_000.0).round() as i64)
}

/// The `postgres`-style interval as ISO 8601, as Debezium writes it
/// (`P<y>Y<m>M<d>DT<h>H<m>M<s>S`, every part present).
pub(super) fn interval_iso(text: &str) -> Result<String, String> {
    let p = interval_parts(text)?;
    let secs = if p.seconds.fract() == 0.0 {
        format!("{}", p.seconds as i64)
    } else {
        let mut s = String::new();
        java_float(&mut s, p.seconds, None);
        s
    };
    Ok(format!(
        "P{}Y{}M{}DT{}H{}M{secs}S",
        p.years as i64, p.months as i64, p.days as i64, p.hours as i64, p.minutes as i64
    ))
}
