//! Summaries of repeated measurements.

use std::time::Duration;

use serde_json::{Value, json};

/// Rounds to `digits` decimals, for readable JSON.
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Median, min and max of rates measured in repetitions of one workload.
pub(crate) fn spread(mut rates: Vec<f64>) -> Value {
    if rates.is_empty() {
        return Value::Null;
    }
    rates.sort_by(f64::total_cmp);
    json!({
        "median": round(rates[rates.len() / 2], 0),
        "min": round(rates[0], 0),
        "max": round(rates[rates.len() - 1], 0),
        "repetitions": rates.len(),
    })
}

/// The median of a [`spread`] as a number (0 when absent).
pub(crate) fn median(spread: &Value) -> f64 {
    spread["median"].as_f64().unwrap_or(0.0)
}

/// Min, p50, p95 and max of latency samples, in milliseconds, with the samples themselves
/// (for the histogram).
pub(crate) fn latency(samples: &mut [Duration]) -> Value {
    if samples.is_empty() {
        return Value::Null;
    }
    samples.sort();
    let ms = |d: Duration| round(d.as_secs_f64() * 1e3, 3);
    let at = |q: f64| ms(samples[((samples.len() as f64 - 1.0) * q).round() as usize]);
    json!({
        "n": samples.len(),
        "min": ms(samples[0]),
        "p50": at(0.5),
        "p95": at(0.95),
        "max": ms(samples[samples.len() - 1]),
        "samples_ms": samples.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
    })
}

/// Events per second for `n` events handled in `elapsed`.
pub(crate) fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// The median of `values` (the mean of the middle two for an even count).
pub(crate) fn median_of(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// How the median of `b` compares with that of `a`, in percent: the difference, a bootstrap
/// 95 % interval of it (5,000 resamples, fixed seed, so a rerun on the same JSON agrees), and
/// the median of the per-repetition ratios (the runs went in turns, so each pair shared the
/// machine's state of the moment).
pub(crate) fn compare(a: &[f64], b: &[f64]) -> Value {
    if a.is_empty() || b.is_empty() {
        return Value::Null;
    }
    let pct = |x: f64| round(100.0 * x, 1);
    let mut rng = fastrand::Rng::with_seed(42);
    let mut resample = |v: &[f64]| -> f64 {
        let drawn: Vec<f64> = (0..v.len()).map(|_| v[rng.usize(..v.len())]).collect();
        median_of(&drawn)
    };
    let mut diffs: Vec<f64> = (0..5_000)
        .map(|_| resample(b) / resample(a) - 1.0)
        .collect();
    diffs.sort_by(f64::total_cmp);
    let paired: Vec<f64> = a.iter().zip(b).map(|(x, y)| y / x - 1.0).collect();
    json!({
        "median_diff_pct": pct(median_of(b) / median_of(a) - 1.0),
        "ci95_pct": [pct(diffs[125]), pct(diffs[4_874])],
        "paired_median_pct": pct(median_of(&paired)),
    })
}
