//! The broker's stop-the-world collections during a run, read from the GC log that
//! `scripts/stack.sh` has the broker write (`$OUTBOXD_STACK_DIR/kafka-gc.log`, each line
//! stamped with the wall clock in ms). A latency measured through the broker includes its
//! pauses: a record whose produce request arrives while the JVM is stopped waits the pause
//! out. So the benchmark says how much of its tail waited through one.

use std::path::Path;

/// One pause: wall-clock ms since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct Pause {
    pub start_ms: f64,
    pub end_ms: f64,
}

/// The pauses logged, or `None` when there is no log (a broker not started by the stack).
/// A line reads `[1796172062123ms] GC(8) Pause Young (Allocation Failure) 93M->60M(123M)
/// 19.815ms`: logged as the pause ends, its length last.
pub fn pauses(log: &Path) -> Option<Vec<Pause>> {
    let text = std::fs::read_to_string(log).ok()?;
    Some(
        text.lines()
            .filter(|l| l.contains(" Pause "))
            .filter_map(|l| {
                let stamp = l.strip_prefix('[')?.split("ms]").next()?;
                let end_ms: f64 = stamp.parse().ok()?;
                let length: f64 = l.rsplit(' ').next()?.strip_suffix("ms")?.parse().ok()?;
                Some(Pause {
                    start_ms: end_ms - length,
                    end_ms,
                })
            })
            .collect(),
    )
}

/// "N pauses, T ms in all, longest M ms; of the slowest 1 % of the S spans, P % overlap a
/// pause", and the lengths of the spans that overlap none (for `latency::summary`). `spans`
/// are (start, end) wall-clock ms of each record's way to the broker.
pub fn summary(pauses: &[Pause], spans: &[(f64, f64)]) -> (String, Vec<f64>) {
    let (Some(first), Some(last)) = (
        spans.iter().map(|s| s.0).min_by(f64::total_cmp),
        spans.iter().map(|s| s.1).max_by(f64::total_cmp),
    ) else {
        return ("no spans".into(), Vec::new());
    };
    let during: Vec<&Pause> = pauses
        .iter()
        .filter(|p| p.end_ms > first && p.start_ms < last)
        .collect();
    let total: f64 = during.iter().map(|p| p.end_ms - p.start_ms).sum();
    let longest = during
        .iter()
        .map(|p| p.end_ms - p.start_ms)
        .fold(0.0, f64::max);
    let overlaps = |s: &(f64, f64)| during.iter().any(|p| p.start_ms < s.1 && p.end_ms > s.0);
    let mut by_length: Vec<&(f64, f64)> = spans.iter().collect();
    by_length.sort_by(|a, b| (b.1 - b.0).total_cmp(&(a.1 - a.0)));
    let slowest = &by_length[..(spans.len() / 100).max(1)];
    let hit = slowest.iter().filter(|s| overlaps(s)).count();
    let clear: Vec<f64> = spans
        .iter()
        .filter(|s| !overlaps(s))
        .map(|s| s.1 - s.0)
        .collect();
    let line = format!(
        "{} pauses, {total:.0} ms in all, longest {longest:.1} ms; of the slowest 1 % of {} changes, {:.0} % waited through one",
        during.len(),
        spans.len(),
        100.0 * hit as f64 / slowest.len() as f64,
    );
    (line, clear)
}
