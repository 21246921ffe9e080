//! `plot`: an SVG line plot of two columns of a CSV file, one curve per `series` value and one
//! panel per `panel` value.
//!
//! ```text
//! plot:
//!   uses: plot
//!   with: {input: results/isoflop.csv, x: total_params, y: heldout_loss, series: ffn,
//!          panel: budget, logx: true, title: "Held-out loss at equal compute"}
//!   outs: [results/isoflop.svg]
//! ```
//!
//! The SVG is written directly: plotters (DESIGN.md's choice) cannot lay out text without its
//! `ttf` feature, which needs the system's fonts, and a build that depends on fonts being
//! installed is not one CI can trust.

use super::{parse_with, StageContext, StageKind};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct With {
    input: String,
    x: String,
    y: String,
    #[serde(default)]
    series: Option<String>,
    #[serde(default)]
    panel: Option<String>,
    #[serde(default)]
    logx: bool,
    #[serde(default)]
    title: Option<String>,
}

pub struct Plot;

impl StageKind for Plot {
    fn name(&self) -> &'static str {
        "plot"
    }

    fn version(&self) -> &'static str {
        "1"
    }

    fn inputs(&self, with: &Map<String, Value>) -> Result<Vec<String>, String> {
        let w: With = parse_with(with)?;
        Ok(vec![w.input])
    }

    fn run(&self, ctx: &StageContext) -> Result<()> {
        let w: With = parse_with(&ctx.with).map_err(anyhow::Error::msg)?;
        let svg_out = ctx
            .outs
            .iter()
            .find(|o| o.ends_with(".svg"))
            .context("a plot stage needs an out ending in .svg")?;
        let path = ctx.workspace.join(&w.input);
        let mut reader = csv::Reader::from_path(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let headers = reader.headers()?.clone();
        let col = |name: &str| {
            headers
                .iter()
                .position(|h| h == name)
                .with_context(|| format!("{}: no column `{name}`", w.input))
        };
        let (xi, yi) = (col(&w.x)?, col(&w.y)?);
        let si = w.series.as_deref().map(col).transpose()?;
        let pi = w.panel.as_deref().map(col).transpose()?;
        let mut data = Panels::new();
        for row in reader.records() {
            let row = row?;
            let num = |i: usize| row.get(i).and_then(|s| s.parse::<f64>().ok());
            let (Some(x), Some(y)) = (num(xi), num(yi)) else {
                continue;
            };
            if w.logx && x <= 0.0 {
                continue;
            }
            let key = |i: Option<usize>| Key(i.and_then(|i| row.get(i)).unwrap_or("").to_string());
            data.entry(key(pi))
                .or_default()
                .entry(key(si))
                .or_default()
                .push((x, y));
        }
        if data.is_empty() {
            bail!(
                "{}: no rows with numbers in `{}` and `{}`",
                w.input,
                w.x,
                w.y
            );
        }
        let svg = render(&w, &data);
        std::fs::write(ctx.workspace.join(svg_out), svg)?;
        Ok(())
    }
}

/// panel → series → (x, y) points.
type Panels = BTreeMap<Key, BTreeMap<Key, Vec<(f64, f64)>>>;

/// Sorts numbers numerically and text alphabetically.
#[derive(PartialEq, Eq, Clone)]
struct Key(String);

impl Ord for Key {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        match (self.0.parse::<f64>(), o.0.parse::<f64>()) {
            (Ok(a), Ok(b)) => a.total_cmp(&b),
            _ => self.0.cmp(&o.0),
        }
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const PW: f64 = 360.0;
const PH: f64 = 280.0;
const M: (f64, f64, f64, f64) = (64.0, 20.0, 34.0, 48.0); // left, right, top, bottom

fn render(w: &With, data: &Panels) -> String {
    let series: Vec<Key> = {
        let mut s: Vec<Key> = data.values().flat_map(|m| m.keys().cloned()).collect();
        s.sort();
        s.dedup();
        s
    };
    let color = |k: &Key| COLORS[series.iter().position(|s| s == k).unwrap_or(0) % COLORS.len()];
    let (width, top) = (PW * data.len() as f64, 56.0);
    let height = PH + top;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    if let Some(t) = &w.title {
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
            width / 2.0,
            esc(t)
        );
    }
    for (i, k) in series.iter().enumerate() {
        let x = 12.0 + 130.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{x}" y1="36" x2="{}" y2="36" stroke="{}" stroke-width="2"/><text x="{}" y="40">{}</text>"#,
            x + 18.0,
            color(k),
            x + 22.0,
            esc(if k.0.is_empty() { &w.y } else { &k.0 })
        );
    }
    let tx = |x: f64| if w.logx { x.log10() } else { x };
    for (p, (panel, curves)) in data.iter().enumerate() {
        let pts: Vec<(f64, f64)> = curves
            .values()
            .flatten()
            .map(|&(x, y)| (tx(x), y))
            .collect();
        let (x0, x1) = padded(pts.iter().map(|p| p.0));
        let (y0, y1) = padded(pts.iter().map(|p| p.1));
        let ox = PW * p as f64;
        let (l, r, t, b) = (ox + M.0, ox + PW - M.1, top + M.2, top + PH - M.3);
        let sx = |x: f64| l + (x - x0) / (x1 - x0) * (r - l);
        let sy = |y: f64| b - (y - y0) / (y1 - y0) * (b - t);
        let _ = writeln!(
            svg,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            r - l,
            b - t
        );
        if let Some(name) = &w.panel {
            let _ = writeln!(
                svg,
                r#"<text x="{}" y="{}" text-anchor="middle">{} = {}</text>"#,
                (l + r) / 2.0,
                t - 8.0,
                esc(name),
                esc(&panel.0)
            );
        }
        for v in ticks(x0, x1) {
            let label = if w.logx {
                scientific(10f64.powf(v))
            } else {
                short(v)
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{0}" y1="{b}" x2="{0}" y2="{1}" stroke="#444"/><text x="{0}" y="{2}" text-anchor="middle">{label}</text>"##,
                sx(v),
                b + 4.0,
                b + 16.0
            );
        }
        for v in ticks(y0, y1) {
            let _ = writeln!(
                svg,
                r##"<line x1="{0}" y1="{1}" x2="{l}" y2="{1}" stroke="#444"/><text x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
                l - 4.0,
                sy(v),
                l - 6.0,
                sy(v) + 4.0,
                short(v)
            );
        }
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}{}</text>"#,
            (l + r) / 2.0,
            b + 34.0,
            esc(&w.x),
            if w.logx { " (log)" } else { "" }
        );
        let _ = writeln!(
            svg,
            r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            ox + 14.0,
            (t + b) / 2.0,
            esc(&w.y)
        );
        for (name, points) in curves {
            let mut pts: Vec<(f64, f64)> =
                points.iter().map(|&(x, y)| (sx(tx(x)), sy(y))).collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let line: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let c = color(name);
            let _ = writeln!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
                line.join(" ")
            );
            for (x, y) in pts {
                let _ = writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{c}"/>"#);
            }
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// The range of the values with a little room on each side (never empty).
pub(super) fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let pad = ((hi - lo) * 0.08).max(1e-9 + lo.abs() * 0.02);
    (lo - pad, hi + pad)
}

/// About five round tick values inside [lo, hi]: the step among 1, 2, 2.5 and 5 times a power
/// of ten that gives closest to five ticks.
pub(super) fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let range = hi - lo;
    let mag = 10f64.powf((range / 5.0).log10().floor());
    let step = [0.5, 1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .min_by(|a, b| {
            ((range / a) - 5.0)
                .abs()
                .total_cmp(&((range / b) - 5.0).abs())
        })
        .unwrap_or(mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + 1e-12 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

pub(super) fn short(v: f64) -> String {
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `3.2e5`, `1e6`: two significant digits.
fn scientific(v: f64) -> String {
    format!("{v:.1e}").replace(".0e", "e")
}

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside() {
        let t = ticks(0.13, 0.97);
        assert_eq!(t.len(), 4, "{t:?}");
        assert!(
            (t[0] - 0.2).abs() < 1e-12 && (t[3] - 0.8).abs() < 1e-9,
            "{t:?}"
        );
        let t = ticks(4.1, 6.9);
        assert_eq!(t, vec![4.5, 5.0, 5.5, 6.0, 6.5]);
        assert!(Key("10".into()) > Key("9".into()));
        assert_eq!(scientific(10f64.powf(5.5)), "3.2e5");
        assert_eq!(scientific(1e6), "1e6");
    }
}
