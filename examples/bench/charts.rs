//! PNG charts of a bench run: coop scaling, wake-up latency, drain throughput, and consumption
//! while the xmin horizon is held.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use serde_json::Value;

use crate::coop::MEMBERS;

/// Fonts tried for chart text (plotters' `ab_glyph` backend needs one registered).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a font for chart text; fails with what to install when none is found.
fn register_font() -> anyhow::Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).exists())
        .context("no DejaVu Sans font found for chart text: install fonts-dejavu-core")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// Writes every chart the results allow into `dir`; returns the files written.
pub(crate) fn render(results: &[Value], dir: &Path) -> anyhow::Result<Vec<String>> {
    register_font()?;
    std::fs::create_dir_all(dir)?;
    let by_name = |name: &str| results.iter().find(|r| r["workload"] == name);
    let mut written = Vec::new();
    if let Some(coop) = by_name("coop") {
        let file = dir.join("coop_scaling.png");
        coop_chart(coop, &file)?;
        written.push(file.display().to_string());
    }
    if let Some(wakeup) = by_name("wakeup") {
        let file = dir.join("wakeup_latency.png");
        wakeup_chart(wakeup, &file)?;
        written.push(file.display().to_string());
    }
    if let Some(hold) = by_name("xmin_hold") {
        let file = dir.join("xmin_hold.png");
        xmin_chart(hold, &file)?;
        written.push(file.display().to_string());
    }
    let bars = throughput_bars(by_name("drain"), by_name("publish_batch"));
    if !bars.is_empty() {
        let file = dir.join("throughput.png");
        bar_chart(&bars, &file)?;
        written.push(file.display().to_string());
    }
    Ok(written)
}

/// Points of one coop series: the capped (main) one, or with `uncapped` the one without a
/// fetch cap.
fn coop_points(coop: &Value, handler_ms: f64, uncapped: bool, key: &str) -> Vec<(f64, f64)> {
    coop["results"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["handler_ms"].as_f64() == Some(handler_ms))
        .filter(|r| r["fetch_cap"].is_null() == uncapped)
        .filter_map(|r| {
            let y = match key {
                "ideal" => r["ideal_events_per_s"].as_f64(),
                _ => r["events_per_s"]["median"].as_f64(),
            };
            Some((r["members"].as_f64()?, y?))
        })
        .collect()
}

fn coop_chart(coop: &Value, file: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(file, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let panels = [
        (left, 0.0, "coop, no-op handler: events/s vs members"),
        (right, 1.0, "coop, 1 ms handler: events/s vs members"),
    ];
    for (area, handler_ms, title) in panels {
        let measured = coop_points(coop, handler_ms, false, "median");
        let uncapped = coop_points(coop, handler_ms, true, "median");
        let ideal = coop_points(coop, handler_ms, false, "ideal");
        let top = measured
            .iter()
            .chain(&uncapped)
            .chain(&ideal)
            .map(|p| p.1)
            .fold(1.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.5f64..8.5f64, 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("members")
            .y_desc("events/s (median)")
            .y_label_formatter(&|y| format!("{y:.0}"))
            .x_labels(MEMBERS.len() * 2)
            .x_label_formatter(&|x| {
                if MEMBERS.iter().any(|m| (*m as f64 - x).abs() < 1e-9) {
                    format!("{x:.0}")
                } else {
                    String::new()
                }
            })
            .draw()?;
        chart
            .draw_series(LineSeries::new(measured.clone(), BLUE.stroke_width(2)))?
            .label("measured (capped fetches)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart.draw_series(measured.iter().map(|p| Circle::new(*p, 4, BLUE.filled())))?;
        if !uncapped.is_empty() {
            let grey = RGBColor(128, 128, 128);
            chart
                .draw_series(LineSeries::new(uncapped.clone(), grey.stroke_width(2)))?
                .label("no fetch cap, pool of 16")
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
            chart.draw_series(uncapped.iter().map(|p| Circle::new(*p, 3, grey.filled())))?;
        }
        if !ideal.is_empty() {
            chart
                .draw_series(LineSeries::new(ideal, RED.stroke_width(1)))?
                .label("linear (N / measured handler time)")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

fn wakeup_chart(wakeup: &Value, file: &Path) -> anyhow::Result<()> {
    let listen = &wakeup["commit_to_handler_ms"]["listen"];
    let samples: Vec<f64> = listen["samples_ms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_f64)
        .collect();
    anyhow::ensure!(!samples.is_empty(), "no wake-up samples to chart");
    const BUCKET_MS: f64 = 0.05;
    let max = samples.iter().copied().fold(0.0, f64::max);
    let buckets = (max / BUCKET_MS).ceil() as usize + 1;
    let mut counts = vec![0u32; buckets];
    for s in &samples {
        counts[(s / BUCKET_MS) as usize] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1) + 1;
    let root = BitMapBackend::new(file, (800, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "wake-up commit→handler with LISTEN: p50 {} ms, p95 {} ms (polling only: p50 {} ms)",
        listen["p50"], listen["p95"], wakeup["commit_to_handler_ms"]["polling_only"]["p50"]
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(buckets as f64 * BUCKET_MS), 0u32..top)?;
    chart
        .configure_mesh()
        .x_desc("ms (buckets of 0.05 ms)")
        .y_desc("rounds")
        .draw()?;
    chart.draw_series(counts.iter().enumerate().map(|(i, c)| {
        let x0 = i as f64 * BUCKET_MS;
        Rectangle::new([(x0, 0), (x0 + BUCKET_MS * 0.9, *c)], BLUE.filled())
    }))?;
    root.present()?;
    Ok(())
}

fn throughput_bars(drain: Option<&Value>, publish: Option<&Value>) -> Vec<(String, f64)> {
    let mut bars = Vec::new();
    if let Some(p) = publish.and_then(|p| p["msgs_per_s"]["median"].as_f64()) {
        bars.push(("publish_batch".to_owned(), p));
    }
    if let Some(results) = drain.and_then(|d| d["results"].as_object()) {
        for (name, r) in results {
            if let Some(v) = r["msgs_per_s"]["median"].as_f64() {
                bars.push((format!("drain {name}"), v));
            }
        }
    }
    bars
}

fn bar_chart(bars: &[(String, f64)], file: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(file, (900, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = bars.iter().map(|b| b.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "messages per second (median of repetitions)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..bars.len() as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 1e-6 {
                bars.get(i).map(|b| b.0.clone()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("msg/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        Rectangle::new(
            [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, *v)],
            BLUE.filled(),
        )
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(i, (_, v))| {
        // Text hangs below its anchor: anchor it a label's height above the bar.
        Text::new(
            format!("{v:.0}"),
            (i as f64 + 0.3, *v + top * 0.06),
            ("sans-serif", 14),
        )
    }))?;
    root.present()?;
    Ok(())
}

/// `(t, value)` points of one xmin_hold run's series.
fn hold_points(run: &Value, key: &str) -> Vec<(f64, f64)> {
    run["series"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s["t"].as_f64()?, s[key].as_f64()?)))
        .collect()
}

/// Consumed/s and backlog over time for both holder kinds, the holder's phase shaded.
fn xmin_chart(hold: &Value, file: &Path) -> anyhow::Result<()> {
    let runs: Vec<&Value> = hold["results"].as_array().into_iter().flatten().collect();
    let phases = &hold["phases_s"];
    let clean = phases["clean"].as_f64().unwrap_or(0.0);
    let held = clean + phases["hold"].as_f64().unwrap_or(0.0);
    let end = held + phases["after"].as_f64().unwrap_or(0.0);
    let offered = hold["offered_per_s"].as_f64().unwrap_or(0.0);
    let root = BitMapBackend::new(file, (1200, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(600);
    let colors = [BLUE, RED, GREEN, MAGENTA];
    for (area, key, title, label) in [
        (left, "consumed_per_s", "consumed/s (5 s windows)", "msg/s"),
        (right, "backlog", "backlog (published - acked)", "messages"),
    ] {
        let series: Vec<(String, Vec<(f64, f64)>)> = runs
            .iter()
            .map(|r| {
                (
                    format!(
                        "{}, holder: {}",
                        r["storage"].as_str().unwrap_or("queue"),
                        r["holder"].as_str().unwrap_or("?")
                    ),
                    hold_points(r, key),
                )
            })
            .collect();
        let top = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|p| p.1))
            .fold(offered.max(1.0), f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..end.max(1.0), 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("s (holder open in the shaded span)")
            .y_desc(label)
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()?;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(clean, 0.0), (held, top)],
            RGBColor(230, 230, 230).filled(),
        )))?;
        for ((name, points), color) in series.into_iter().zip(colors) {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
