//! Latency percentiles, one rule for every benchmark example.

/// "p50 …, p90 …, p99 …, max … (n samples)" of `ms` (milliseconds; sorted here). The
/// percentile is the nearest rank: the sample at `round((n - 1) × p)`.
pub fn summary(ms: &mut [f64]) -> String {
    if ms.is_empty() {
        return "no samples".into();
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    format!(
        "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(1.0),
        ms.len()
    )
}
