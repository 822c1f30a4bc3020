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
