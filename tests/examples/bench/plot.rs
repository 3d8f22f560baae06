//! The benchmark's PNG: ns/packet against the number of reservations (left) and delivered Mpps
//! per forwarding configuration and flow count (right), from the run's JSON report.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

/// Text needs a font file; Debian's fonts-dejavu-core (installed by `cargo xtask setup`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> Result<(), String> {
    let bytes = std::fs::read(FONT).map_err(|e| format!("reading the plot's font {FONT}: {e}"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into()))
        .map_err(|_| format!("{FONT} is not a usable font"))
}

fn err(e: impl std::fmt::Display) -> String {
    format!("drawing the plot: {e}")
}

pub fn draw(report: &Value, path: &Path) -> Result<(), String> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "pf benchmark ({} profile), {} cores {}, Linux {}",
        report["profile"].as_str().unwrap_or("?"),
        report["cores"],
        report["cpu_model"].as_str().unwrap_or("?"),
        report["kernel"].as_str().unwrap_or("?"),
    );
    let root = root.titled(&title, ("sans-serif", 20)).map_err(err)?;
    let (left, right) = root.split_horizontally(760);
    per_packet(report, &left)?;
    forwarding(report, &right)?;
    root.present().map_err(err)?;
    Ok(())
}

fn per_packet(
    report: &Value,
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
) -> Result<(), String> {
    let results = report["per_packet"]["results"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut cases: Vec<String> = Vec::new();
    for r in &results {
        let case = r["case"].as_str().unwrap_or("?").to_string();
        if !cases.contains(&case) {
            cases.push(case);
        }
    }
    let max_ns = results
        .iter()
        .filter_map(|r| r["median_ns"].as_f64())
        .fold(0.0, f64::max);
    let max_size = results
        .iter()
        .filter_map(|r| r["reservations"].as_f64())
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "per-packet cost (BPF_PROG_TEST_RUN, median)",
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((0.5f64..max_size * 2.0).log_scale(), 0f64..max_ns * 1.7)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("reservations")
        .y_desc("ns per packet")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(err)?;
    for (i, case) in cases.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = results
            .iter()
            .filter(|r| r["case"] == case.as_str())
            .filter_map(|r| Some((r["reservations"].as_f64()?, r["median_ns"].as_f64()?)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(case.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )
            .map_err(err)?;
    }
    legend(&mut chart)
}

fn forwarding(
    report: &Value,
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
) -> Result<(), String> {
    let results = report["forwarding"].as_array().cloned().unwrap_or_default();
    let mut configs: Vec<String> = Vec::new();
    let mut flows: Vec<u64> = Vec::new();
    for r in &results {
        let c = r["configuration"].as_str().unwrap_or("?").to_string();
        if !configs.contains(&c) {
            configs.push(c);
        }
        if let Some(f) = r["flows"].as_u64().filter(|f| !flows.contains(f)) {
            flows.push(f);
        }
    }
    let max = results
        .iter()
        .filter_map(|r| r["median_delivered_pps"].as_f64())
        .fold(0.0, f64::max)
        / 1e6;
    let short: Vec<String> = configs
        .iter()
        .map(|c| c.split(" (").next().unwrap_or(c).to_string())
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption("forwarding, 64-byte UDP, one core", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..configs.len() as f64, 0f64..max * 1.2)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(configs.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < short.len() {
                short[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc("delivered Mpps (median)")
        .draw()
        .map_err(err)?;
    let width = 0.8 / flows.len().max(1) as f64;
    for (j, &f) in flows.iter().enumerate() {
        let color = Palette99::pick(j + 3).to_rgba();
        let bars: Vec<Rectangle<(f64, f64)>> = configs
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let pps = results
                    .iter()
                    .find(|r| r["configuration"] == c.as_str() && r["flows"] == f)?
                    ["median_delivered_pps"]
                    .as_f64()?;
                let x0 = i as f64 + 0.1 + j as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.95, pps / 1e6)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(format!("{f} flow{}", if f == 1 { "" } else { "s" }))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    legend(&mut chart)
}

/// The series labels, boxed in the upper right corner.
fn legend<'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(err)
}
