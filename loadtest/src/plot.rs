//! `--plot latency.svg`: throughput and p99 publish latency per second, one above the other,
//! as a self-contained SVG (a stall reads faster as a picture than as a table).

use std::fmt::Write;

use crate::stats::Point;

const W: f64 = 900.0;
const PANEL_H: f64 = 220.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 60.0;

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    unit: &str,
    series: &[(&str, &str, Vec<f64>)],
    warmup_secs: f64,
) -> std::fmt::Result {
    let n = series.first().map_or(0, |s| s.2.len()).max(2);
    let ymax = nice_max(series.iter().flat_map(|s| s.2.iter().copied()).fold(0.0, f64::max));
    let x = |i: f64| LEFT + (W - LEFT - RIGHT) * i / (n - 1) as f64;
    let y = |v: f64| top + PANEL_H - PANEL_H * (v / ymax).min(1.0);
    writeln!(out, r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"#, top - 8.0)?;
    writeln!(
        out,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{PANEL_H}" fill="none" stroke="#999"/>"##,
        W - LEFT - RIGHT
    )?;
    if warmup_secs > 0.0 {
        let wx = x(warmup_secs.min((n - 1) as f64));
        writeln!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{}" height="{PANEL_H}" fill="#eee"/><text x="{}" y="{}" font-size="10" fill="#777">warm-up</text>"##,
            wx - LEFT,
            LEFT + 4.0,
            top + 12.0
        )?;
    }
    for k in 0..=4 {
        let v = ymax * k as f64 / 4.0;
        let yy = y(v);
        writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{yy}" x2="{}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" font-size="11" text-anchor="end">{} {unit}</text>"##,
            W - RIGHT,
            LEFT - 5.0,
            yy + 4.0,
            if ymax >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
        )?;
    }
    let step = ((n as f64) / 10.0).ceil().max(1.0) as usize;
    for i in (0..n).step_by(step) {
        writeln!(
            out,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{i}s</text>"#,
            x(i as f64),
            top + PANEL_H + 15.0
        )?;
    }
    for (li, (label, color, values)) in series.iter().enumerate() {
        let pts: Vec<String> =
            values.iter().enumerate().map(|(i, v)| format!("{:.1},{:.1}", x(i as f64), y(*v))).collect();
        writeln!(out, r#"<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{}"/>"#, pts.join(" "))?;
        let lx = W - RIGHT - 160.0;
        let ly = top + 16.0 + 16.0 * li as f64;
        writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{label}</text>"#,
            lx + 20.0,
            lx + 25.0,
            ly + 4.0
        )?;
    }
    Ok(())
}

/// The SVG for a run's per-second points.
pub fn svg(title: &str, points: &[Point], warmup_secs: f64) -> String {
    let h = TOP + 2.0 * PANEL_H + GAP + 40.0;
    let mut out = String::new();
    let _ = (|| -> std::fmt::Result {
        writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif">"#
        )?;
        writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#)?;
        writeln!(out, r#"<text x="{LEFT}" y="20" font-size="16">{}</text>"#, escape(title))?;
        panel(
            &mut out,
            TOP + 20.0,
            "Publish throughput",
            "env/s",
            &[("acknowledged / s", "#1f77b4", points.iter().map(|p| p.publish_per_sec).collect())],
            warmup_secs,
        )?;
        panel(
            &mut out,
            TOP + 20.0 + PANEL_H + GAP,
            "Latency per second",
            "ms",
            &[
                ("publish p99", "#d62728", points.iter().map(|p| p.publish_p99_ms).collect()),
                ("publish p50", "#2ca02c", points.iter().map(|p| p.publish_p50_ms).collect()),
                ("end-to-end p99", "#9467bd", points.iter().map(|p| p.e2e_p99_ms).collect()),
            ],
            warmup_secs,
        )?;
        writeln!(out, "</svg>")
    })();
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plot_is_well_formed_svg_with_both_panels() {
        let points: Vec<Point> = (0..30)
            .map(|i| Point {
                second: i,
                publish_per_sec: if i == 12 { 0.0 } else { 20_000.0 },
                publish_p50_ms: 1.0,
                publish_p99_ms: if i == 12 { 900.0 } else { 4.0 },
                e2e_p99_ms: 6.0,
                errors: 0,
            })
            .collect();
        let s = svg("a <stall>", &points, 2.0);
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 4);
        assert!(s.contains("a &lt;stall&gt;"));
        assert!(s.contains("Publish throughput") && s.contains("Latency per second"));
    }
}
