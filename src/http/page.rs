//! The status page at `/`: one read-only HTML page for a person at 3 a.m. — the role, the
//! source position, the lag over the last 15 minutes, the latest dead letters and the last
//! error — without Grafana, a shell, or `jq`. Plain HTML and an inline SVG chart, no script;
//! it refreshes itself every 5 s.
//!
//! Everything on it comes from places a writer controls (event ids, topics built from
//! `aggregatetype`, error text quoting a broker): every value is HTML-escaped, so a topic
//! named `<script>` is text, not markup. Secrets never reach it: errors are recorded
//! already redacted, as `/status` shows them.

use std::fmt::Write as _;
use std::time::SystemTime;

use crate::event::rfc3339_ms;
use crate::health::{recent_dead_letters, Health, Role};

/// `s` safe as HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(t: SystemTime) -> String {
    let ms = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    rfc3339_ms(ms)
}

const STYLE: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:70em}\
h1{font-size:1.5em;margin:0}h2{font-size:1.1em;margin-top:1.6em}\
.role{display:inline-block;padding:.2em .8em;border-radius:1em;font-weight:bold;color:#fff}\
.leader{background:#2a7d2a}.standby{background:#4a6fa5}.starting{background:#b36b00}\
table{border-collapse:collapse}td,th{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
th{font-weight:600}.bad{color:#b00020;font-weight:bold}.ok{color:#2a7d2a}\
code{font-size:.95em}.muted{color:#777}svg{background:#fafafa;border:1px solid #ddd}";

/// The lag chart: an SVG polyline over the samples (time on x, seconds on y).
fn chart(samples: &[(SystemTime, f64)], out: &mut String) {
    let (w, h) = (600.0, 120.0);
    let max = samples.iter().map(|s| s.1).fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max * 1.1 } else { 1.0 };
    let n = samples.len().max(2) - 1;
    let points: Vec<String> = samples
        .iter()
        .enumerate()
        .map(|(i, (_, lag))| {
            format!(
                "{:.1},{:.1}",
                i as f64 * w / n as f64,
                h - (lag / top) * (h - 4.0)
            )
        })
        .collect();
    let _ = write!(
        out,
        "<svg id=\"lag-chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"lag over the last minutes\">\
         <polyline fill=\"none\" stroke=\"#4a6fa5\" stroke-width=\"2\" points=\"{}\"/></svg>",
        points.join(" ")
    );
    let first = samples.first().map(|s| time(s.0)).unwrap_or_default();
    let _ = write!(
        out,
        "<p class=\"muted\" id=\"lag-range\">{} samples since {first}; highest {max:.3} s</p>",
        samples.len()
    );
}

/// The page.
pub fn render(health: &Health) -> String {
    let s = health.snapshot();
    let role = match s.role {
        Role::Leader => "leader",
        Role::Standby => "standby",
        Role::Starting => "starting",
    };
    let yes_no = |ok: bool| {
        if ok {
            "<span class=\"ok\">reachable</span>"
        } else {
            "<span class=\"bad\">not reachable</span>"
        }
    };
    let mut out = String::with_capacity(8 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>outboxd: {role}</title>\
         <style>{STYLE}</style></head><body>\
         <h1>outboxd <span class=\"muted\">{}</span></h1>\
         <p>Role: <span id=\"role\" class=\"role {role}\">{role}</span></p>",
        escape(s.version)
    );
    let position = match (&s.slot.confirmed_lsn, s.mode) {
        (Some(lsn), _) => format!(
            "slot <code>{}</code> confirmed at <code id=\"position\">{}</code>",
            escape(&s.slot.slot),
            escape(lsn)
        ),
        (None, "polling") => "the cursor row (see <code>outboxd status</code>)".into(),
        (None, _) => format!(
            "slot <code>{}</code>: <span id=\"position\">not known yet</span>",
            escape(&s.slot.slot)
        ),
    };
    let retained = s
        .slot
        .lag_bytes
        .map_or("—".into(), |b| format!("{b} bytes"));
    let _ = write!(
        out,
        "<table id=\"facts\">\
         <tr><th>Source</th><td>{} — {position}</td></tr>\
         <tr><th>WAL the slot retains</th><td>{}</td></tr>\
         <tr><th>PostgreSQL</th><td>{}</td></tr>\
         <tr><th>Broker ({})</th><td>{}</td></tr>\
         <tr><th>Lag now</th><td id=\"lag\">{:.3} s</td></tr>\
         <tr><th>In flight</th><td>{}</td></tr></table>",
        escape(s.mode),
        escape(&retained),
        yes_no(s.postgres_reachable),
        escape(s.sink),
        yes_no(s.broker_reachable),
        s.lag_seconds,
        s.inflight
    );
    out.push_str("<h2>Lag, last 15 minutes</h2>");
    let mut samples = health.lag_history();
    samples.push((SystemTime::now(), s.lag_seconds));
    chart(&samples, &mut out);

    out.push_str("<h2>Recent dead letters</h2>");
    let letters = recent_dead_letters();
    if letters.is_empty() {
        out.push_str("<p id=\"dead-letters\" class=\"muted\">none since this process started</p>");
    } else {
        out.push_str(
            "<table id=\"dead-letters\"><tr><th>When</th><th>Event</th><th>Reason</th>\
             <th>Destination</th><th>Now in</th><th>Detail</th></tr>",
        );
        for d in letters.iter().rev() {
            let _ = write!(
                out,
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"bad\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                time(d.at),
                escape(&d.event_id),
                escape(d.reason),
                escape(&d.destination),
                escape(d.to),
                escape(&d.detail)
            );
        }
        out.push_str("</table><p class=\"muted\">Redrive once the cause is fixed: <code>outboxd dead-letters redrive</code>.</p>");
    }

    out.push_str("<h2>Last error</h2>");
    match health.last_error() {
        Some((at, e)) => {
            let _ = write!(
                out,
                "<p id=\"last-error\"><span class=\"muted\">{}</span><br><code>{}</code></p>",
                time(at),
                escape(&e)
            );
        }
        None => out.push_str("<p id=\"last-error\" class=\"muted\">none</p>"),
    }
    out.push_str(
        "<p class=\"muted\">Read-only. Machine-readable: <a href=\"/status\">/status</a>, \
         <a href=\"/metrics\">/metrics</a>, <a href=\"/readyz\">/readyz</a>.</p></body></html>",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_writer_controls_is_text_not_markup() {
        assert_eq!(
            escape("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        let health = Health::new(
            "logical",
            "kafka",
            "slot<b>",
            1,
            std::time::Duration::from_secs(60),
        );
        health.record_error("broker said <img src=x onerror=alert(1)>");
        let page = render(&health);
        assert!(!page.contains("<img"), "{page}");
        assert!(!page.contains("slot<b>"), "{page}");
        assert!(page.contains("id=\"lag-chart\""));
    }
}
