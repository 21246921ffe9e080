//! Charts for stages that report: a 2-D scatter of an embedding coloured by class (`scatter`)
//! and a grouped bar chart (`bars`). Pure functions from data to SVG text, written directly like
//! `plot`'s line plots (no plotting crate, no fonts) and in the same style: white background,
//! sans-serif 11 px text, a grey frame, the same first colours.

use super::plot::{esc, padded, short, ticks};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Twenty well-separated colours, `plot`'s eight first. A label's style is its colour and a
/// marker shape; past twenty labels the colours repeat with the next shape.
const PALETTE: [&str; 20] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#bcbd22", "#7f7f7f", "#000080", "#ff00ff", "#800000", "#008080", "#7cb800", "#ffc000",
    "#00bfff", "#b8860b", "#4b0082", "#ff6f61",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Shape {
    Circle,
    Square,
    Triangle,
    Diamond,
    Down,
}

const SHAPES: [Shape; 5] = [
    Shape::Circle,
    Shape::Square,
    Shape::Triangle,
    Shape::Diamond,
    Shape::Down,
];

/// The colour and shape of the label of frequency rank `rank` (0 = most frequent): one hundred
/// distinct styles, the twenty most frequent labels as circles of twenty colours.
fn style(rank: usize) -> (&'static str, Shape) {
    (
        PALETTE[rank % PALETTE.len()],
        SHAPES[(rank / PALETTE.len()) % SHAPES.len()],
    )
}

/// One marker centred on (x, y), of about the area of a circle of radius `r`.
fn marker(svg: &mut String, shape: Shape, x: f64, y: f64, r: f64) {
    let _ = match shape {
        Shape::Circle => writeln!(svg, r#"<circle cx="{x:.1}" cy="{y:.1}" r="{r}"/>"#),
        Shape::Square => {
            let s = 0.886 * r;
            writeln!(
                svg,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/>"#,
                x - s,
                y - s,
                2.0 * s,
                2.0 * s
            )
        }
        Shape::Triangle | Shape::Down => {
            // Equilateral, centred on its centroid.
            let (a, h) = (2.69 * r, 2.33 * r);
            let (tip, dir) = if shape == Shape::Triangle {
                (y - 2.0 * h / 3.0, 1.0)
            } else {
                (y + 2.0 * h / 3.0, -1.0)
            };
            writeln!(
                svg,
                r#"<path d="M{x:.1},{tip:.1}l{:.1},{:.1}h{:.1}z"/>"#,
                a / 2.0,
                dir * h,
                -a
            )
        }
        Shape::Diamond => {
            let d = 1.25 * r;
            writeln!(
                svg,
                r#"<path d="M{x:.1},{:.1}l{d:.1},{d:.1}l-{d:.1},{d:.1}l-{d:.1},-{d:.1}z"/>"#,
                y - d
            )
        }
    };
}

/// A 2-D scatter of an embedding (UMAP): point `i` at `points[i]`, coloured and shaped by its
/// class `labels[i]`, an index into `names` (`#N` past its end; a point without a label is
/// `?`). Points with a non-finite coordinate are skipped. Both axes have the same scale and no
/// numbers (the coordinates have no units). The `labelled` most frequent labels are listed in a
/// legend with their point counts and their names are written at the median of their points.
/// Token texts are shown with leading and trailing spaces as `␣` and control characters as
/// their Unicode pictures.
pub fn scatter(
    title: &str,
    points: &[[f32; 2]],
    labels: &[u32],
    names: &[String],
    labelled: usize,
) -> String {
    // class → indices of its finite points, in input order.
    let mut classes: BTreeMap<Option<u32>, Vec<usize>> = BTreeMap::new();
    for (i, p) in points.iter().enumerate() {
        if p[0].is_finite() && p[1].is_finite() {
            classes.entry(labels.get(i).copied()).or_default().push(i);
        }
    }
    let n: usize = classes.values().map(Vec::len).sum();
    let skipped = points.len() - n;
    // Most frequent first; ties by label, so that the output depends only on the input.
    let mut ranked: Vec<(Option<u32>, Vec<usize>)> = classes.into_iter().collect();
    ranked.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
    let shown = labelled.min(ranked.len());
    let name = |label: Option<u32>| match label {
        Some(l) => match names.get(l as usize) {
            Some(s) => visible(s),
            None => format!("#{l}"),
        },
        None => "?".to_string(),
    };

    // One scale for both axes (distances mean the same across and down), the frame shaped
    // like the data within a box of MAX × MAX, never narrower than MIN.
    const MAX: f64 = 560.0;
    const MIN: f64 = 240.0;
    const ROW: f64 = 16.0;
    let finite = || ranked.iter().flat_map(|c| c.1.iter()).map(|&i| points[i]);
    let ((x0, x1), (y0, y1)) = if n == 0 {
        ((0.0, 1.0), (0.0, 1.0))
    } else {
        (
            padded(finite().map(|p| p[0] as f64)),
            padded(finite().map(|p| p[1] as f64)),
        )
    };
    let scale = (MAX / (x1 - x0)).min(MAX / (y1 - y0));
    let (fw, fh) = (((x1 - x0) * scale).max(MIN), ((y1 - y0) * scale).max(MIN));
    let (cx, cy) = ((x0 + x1) / 2.0, (y0 + y1) / 2.0);
    let (l, t) = (16.0, 60.0);
    let (r, b) = (l + fw, t + fh);
    let sx = |x: f64| (l + r) / 2.0 + (x - cx) * scale;
    let sy = |y: f64| (t + b) / 2.0 - (y - cy) * scale;
    let legend_x = r + 24.0;
    let legend_w = 220.0;
    let width = (legend_x + legend_w + 16.0).max(7.8 * title.chars().count() as f64 + 32.0);
    let height = (b + 16.0).max(t + 24.0 + ROW * shown as f64 + 16.0);

    let mut svg = start(width, height, 22.0, title);
    let mut subtitle = format!(
        "{n} point{}, {} label{}",
        if n == 1 { "" } else { "s" },
        ranked.len(),
        if ranked.len() == 1 { "" } else { "s" }
    );
    if skipped > 0 {
        let _ = write!(
            subtitle,
            " ({skipped} with non-finite coordinates left out)"
        );
    }
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="40" text-anchor="middle" fill="#666">{subtitle}</text>"##,
        width / 2.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{l}" y="{t}" width="{fw:.1}" height="{fh:.1}" fill="none" stroke="#444"/>"##
    );

    if n == 0 {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#666">no points</text>"##,
            (l + r) / 2.0,
            (t + b) / 2.0
        );
    }
    // Many points: smaller and more transparent, so that dense regions still show structure.
    let (radius, opacity) = match n {
        0..=300 => (4.0, 0.85),
        301..=3000 => (3.0, 0.7),
        _ => (2.2, 0.55),
    };
    // The most frequent classes first, so that rare ones are drawn on top of them.
    let _ = writeln!(svg, r#"<g id="points">"#);
    for (rank, (_, members)) in ranked.iter().enumerate() {
        let (colour, shape) = style(rank);
        let _ = writeln!(svg, r#"<g fill="{colour}" fill-opacity="{opacity}">"#);
        for &i in members {
            let p = points[i];
            marker(&mut svg, shape, sx(p[0] as f64), sy(p[1] as f64), radius);
        }
        let _ = writeln!(svg, "</g>");
    }
    let _ = writeln!(svg, "</g>");

    // Names of the most frequent labels at the median of their points: a white outline drawn
    // first, then the text over it, so that it stays legible over the markers.
    // A name that would overlap one already placed (of a more frequent label) moves up or
    // down by whole lines to the nearest free place, if one is near.
    let mut placed: Vec<(f64, f64, f64, String)> = Vec::new();
    for (label, members) in &ranked[..shown] {
        let mx = median(members.iter().map(|&i| points[i][0] as f64).collect());
        let my = median(members.iter().map(|&i| points[i][1] as f64).collect());
        let s = truncate(&name(*label), 20);
        let half = 3.6 * s.chars().count() as f64 + 2.0;
        let x = sx(mx).clamp(l + half, (r - half).max(l + half));
        let y0 = sy(my) + 4.0;
        let free = |y: f64| {
            placed
                .iter()
                .all(|&(px, py, ph, _)| (px - x).abs() >= ph + half || (py - y).abs() >= 14.0)
        };
        let clamp = |y: f64| y.clamp(t + 14.0, b - 4.0);
        let y = (0..9)
            .map(|k| clamp(y0 + 14.0 * ((k + 1) / 2) as f64 * if k % 2 == 1 { 1.0 } else { -1.0 }))
            .find(|&y| free(y))
            .unwrap_or(clamp(y0));
        placed.push((x, y, half, text(&s)));
    }
    let _ = writeln!(
        svg,
        r#"<g id="names" font-size="12" font-weight="bold" text-anchor="middle">"#
    );
    let _ = writeln!(
        svg,
        r#"<g fill="white" stroke="white" stroke-width="3.5" stroke-linejoin="round">"#
    );
    for (x, y, _, s) in &placed {
        let _ = writeln!(svg, r#"<text x="{x:.1}" y="{y:.1}">{s}</text>"#);
    }
    let _ = writeln!(svg, "</g>");
    let _ = writeln!(svg, r##"<g fill="#111">"##);
    for (x, y, _, s) in &placed {
        let _ = writeln!(svg, r#"<text x="{x:.1}" y="{y:.1}">{s}</text>"#);
    }
    let _ = writeln!(svg, "</g>\n</g>");

    // The legend: marker, name, count, most frequent first.
    let _ = writeln!(svg, r#"<g id="legend">"#);
    if shown > 0 {
        let _ = writeln!(
            svg,
            r##"<text x="{legend_x}" y="{}" font-weight="bold">{}</text><text x="{}" y="{}" text-anchor="end" fill="#666">points</text>"##,
            t + 8.0,
            if shown < ranked.len() {
                format!("{shown} most frequent of {}", ranked.len())
            } else {
                "labels".to_string()
            },
            legend_x + legend_w,
            t + 8.0
        );
    }
    for (rank, (label, members)) in ranked[..shown].iter().enumerate() {
        let (colour, shape) = style(rank);
        let y = t + 24.0 + ROW * rank as f64;
        let _ = write!(svg, r#"<g class="entry" fill="{colour}">"#);
        marker(&mut svg, shape, legend_x + 5.0, y - 4.0, 4.5);
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{y}" fill="#111">{}</text><text x="{}" y="{y}" text-anchor="end" fill="#111">{}</text></g>"##,
            legend_x + 16.0,
            text(&truncate(&name(*label), 26)),
            legend_x + legend_w,
            members.len()
        );
    }
    let _ = writeln!(svg, "</g>");
    svg.push_str("</svg>\n");
    svg
}

/// A grouped bar chart: one group of bars per entry of `groups` along x, within it one bar per
/// entry of `series` (a colour, named in the legend) of height `values[s][g]`, labelled with
/// its value to two decimals. The y axis starts from zero (spanning the negative range too when
/// a value is negative, with a line at zero). A missing, `None` or non-finite value draws no bar
/// but a small `n/a`.
pub fn bars(
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[String],
    values: &[Vec<Option<f64>>],
) -> String {
    let value = |s: usize, g: usize| {
        values
            .get(s)
            .and_then(|v| v.get(g))
            .copied()
            .flatten()
            .filter(|v| v.is_finite())
    };
    let (ns, ng) = (series.len(), groups.len());
    let all: Vec<f64> = (0..ns)
        .flat_map(|s| (0..ng).map(move |g| (s, g)))
        .filter_map(|(s, g)| value(s, g))
        .collect();
    let label_chars = all
        .iter()
        .map(|&v| two_decimals(v).len())
        .max()
        .unwrap_or(4);
    // Bars wide enough for their labels, groups apart.
    let bw = (6.2 * label_chars as f64 + 6.0).max(22.0);
    let (bar_gap, group_gap) = (2.0, 28.0);
    let gw = ns as f64 * (bw + bar_gap) - bar_gap + group_gap;
    let pw = (ng as f64 * gw).max(300.0);
    let (ml, mr) = (64.0, 20.0);
    let width = ml + pw + mr;

    // The legend wraps: a swatch and a name per series.
    let mut legend = Vec::new();
    let (mut x, mut row) = (12.0, 0usize);
    for (s, name) in series.iter().enumerate() {
        let w = 12.0 + 6.0 + 6.2 * name.chars().count() as f64 + 18.0;
        if x + w > width - 12.0 && x > 12.0 {
            (x, row) = (12.0, row + 1);
        }
        legend.push((x, row, s));
        x += w;
    }
    let rows = if ns == 0 { 0 } else { row + 1 };
    let t = 36.0 + 18.0 * rows as f64 + 10.0;
    let ph = 300.0;
    let b = t + ph;
    let (l, r) = (ml, ml + pw);

    // Group names: level if they fit under their group, else slanted.
    let widest = groups
        .iter()
        .map(|g| 6.2 * g.chars().count() as f64)
        .fold(0.0, f64::max);
    let slant = widest > gw - 6.0;
    let height = b + if slant { 20.0 + widest * 0.6 } else { 30.0 } + 20.0;

    let (lo, hi) = {
        let lo = all.iter().copied().fold(0.0, f64::min);
        let hi = all.iter().copied().fold(0.0, f64::max);
        if hi - lo > 0.0 {
            // Room for the value labels beyond the longest bars.
            let room = 0.12 * (hi - lo);
            (
                if lo < 0.0 { lo - room } else { 0.0 },
                if hi > 0.0 { hi + room } else { 0.0 },
            )
        } else {
            (0.0, 1.0)
        }
    };
    let sy = |v: f64| b - (v - lo) / (hi - lo) * ph;

    let mut svg = start(width, height, 18.0, title);
    let _ = writeln!(svg, r#"<g id="legend">"#);
    for &(x, row, s) in &legend {
        let y = 36.0 + 18.0 * row as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/><text x="{}" y="{y}">{}</text>"#,
            y - 10.0,
            PALETTE[s % PALETTE.len()],
            x + 18.0,
            text(&series[s])
        );
    }
    let _ = writeln!(svg, "</g>");

    for v in ticks(lo, hi) {
        let _ = writeln!(
            svg,
            r##"<line x1="{l}" y1="{0:.1}" x2="{r}" y2="{0:.1}" stroke="#e4e4e4"/><line x1="{1}" y1="{0:.1}" x2="{l}" y2="{0:.1}" stroke="#444"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}</text>"##,
            sy(v),
            l - 4.0,
            l - 6.0,
            sy(v) + 4.0,
            short(v)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(14,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (t + b) / 2.0,
        text(y_label)
    );
    if ns == 0 || ng == 0 {
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="middle" fill="#666">no data</text>"##,
            (l + r) / 2.0,
            (t + b) / 2.0
        );
    }

    // Centre the groups when the frame is wider than they need.
    let left = l + (pw - ng as f64 * gw) / 2.0;
    let zero = sy(0.0);
    let _ = writeln!(svg, r#"<g id="bars" text-anchor="middle">"#);
    for g in 0..ng {
        for s in 0..ns {
            let x = left + g as f64 * gw + group_gap / 2.0 + s as f64 * (bw + bar_gap);
            let mid = x + bw / 2.0;
            match value(s, g) {
                Some(v) => {
                    let (top, bottom) = (sy(v.max(0.0)), sy(v.min(0.0)));
                    let label_y = if v >= 0.0 { top - 4.0 } else { bottom + 12.0 };
                    let _ = writeln!(
                        svg,
                        r#"<rect x="{x:.1}" y="{top:.1}" width="{bw:.1}" height="{:.1}" fill="{}"/><text x="{mid:.1}" y="{label_y:.1}">{}</text>"#,
                        bottom - top,
                        PALETTE[s % PALETTE.len()],
                        two_decimals(v),
                    );
                }
                None => {
                    let _ = writeln!(
                        svg,
                        r##"<text x="{mid:.1}" y="{:.1}" font-size="9" fill="#888">n/a</text>"##,
                        zero - 4.0
                    );
                }
            }
        }
    }
    let _ = writeln!(svg, "</g>");
    if lo < 0.0 {
        let _ = writeln!(
            svg,
            r##"<line x1="{l}" y1="{zero:.1}" x2="{r}" y2="{zero:.1}" stroke="#444"/>"##
        );
    }
    for (g, name) in groups.iter().enumerate() {
        let mid = left + (g as f64 + 0.5) * gw;
        if slant {
            let _ = writeln!(
                svg,
                r#"<text transform="translate({mid:.1},{}) rotate(-35)" text-anchor="end">{}</text>"#,
                b + 14.0,
                text(name)
            );
        } else {
            let _ = writeln!(
                svg,
                r#"<text x="{mid:.1}" y="{}" text-anchor="middle">{}</text>"#,
                b + 16.0,
                text(name)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// The median (of a non-empty list; the mean of the middle two when its length is even).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Control characters as their Unicode pictures (`␊` …), which also keeps the text valid XML.
fn clean(s: &str) -> String {
    s.chars().map(picture).collect()
}

fn picture(c: char) -> char {
    match c {
        '\n' => '↵',
        '\t' => '⇥',
        c if (c as u32) < 0x20 => char::from_u32(0x2400 + c as u32).unwrap_or('\u{fffd}'),
        '\u{7f}' => '␡',
        '\u{fffe}' | '\u{ffff}' => '\u{fffd}',
        c => c,
    }
}

/// A token's text as shown: leading and trailing spaces as `␣` (a space-only token all `␣`),
/// control characters as pictures, the empty string as `""`.
fn visible(s: &str) -> String {
    if s.is_empty() {
        return "\"\"".to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let first = chars.iter().position(|&c| c != ' ').unwrap_or(chars.len());
    let end = chars.iter().rposition(|&c| c != ' ').map_or(0, |i| i + 1);
    chars
        .iter()
        .enumerate()
        .map(|(i, &c)| match c {
            ' ' if i < first || i >= end => '␣',
            c => picture(c),
        })
        .collect()
}

/// At most `max` characters, the last an ellipsis when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// Text content, escaped (quotes too, so that it could also stand in an attribute).
fn text(s: &str) -> String {
    esc(&clean(s)).replace('"', "&quot;").replace('\'', "&#39;")
}

/// A bar's value label; a value that rounds to zero is "0.00", never "-0.00".
fn two_decimals(v: f64) -> String {
    format!("{:.2}", (v * 100.0).round() / 100.0 + 0.0)
}

/// An SVG document's opening: the root element, a white background and the centred title.
fn start(width: f64, height: f64, title_y: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{title_y}" text-anchor="middle" font-size="14">{}</text>"#,
        width / 2.0,
        text(title)
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny well-formedness check: tags balance and nest, attribute quotes pair, `<` never
    /// stands in text or inside a tag, every `&` starts an entity, one root `svg`.
    fn well_formed(svg: &str) {
        fn entities(s: &str) {
            for (i, _) in s.match_indices('&') {
                let rest = &s[i + 1..];
                let end = rest.find(';').unwrap_or_else(|| panic!("bare & in {s:?}"));
                let e = &rest[..end];
                let ok = ["amp", "lt", "gt", "quot", "apos"].contains(&e)
                    || (e.len() > 1
                        && e.starts_with('#')
                        && e[1..].chars().all(|c| c.is_ascii_digit()));
                assert!(ok, "bad entity &{e}; in {s:?}");
            }
            assert!(
                !s.chars()
                    .any(|c| (c as u32) < 0x20 && c != '\n' && c != '\t' && c != '\r'),
                "control character in {s:?}"
            );
        }
        let mut stack: Vec<&str> = Vec::new();
        let mut roots = 0;
        let mut rest = svg;
        while let Some(i) = rest.find('<') {
            entities(&rest[..i]);
            if stack.is_empty() {
                assert!(rest[..i].trim().is_empty(), "text outside the root");
            }
            let j = i + rest[i..].find('>').expect("unclosed tag");
            let tag = &rest[i + 1..j];
            assert!(!tag.contains('<'), "< inside tag {tag:?}");
            assert_eq!(tag.matches('"').count() % 2, 0, "unpaired quote in {tag:?}");
            entities(tag);
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop(), Some(name.trim()), "mismatched </{name}>");
            } else {
                let name = tag.trim_end_matches('/').split_whitespace().next().unwrap();
                assert!(
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()),
                    "bad tag name in {tag:?}"
                );
                if stack.is_empty() {
                    roots += 1;
                    assert_eq!(name, "svg");
                }
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[j + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert!(rest.trim().is_empty());
        assert_eq!(roots, 1);
    }

    /// The part of the SVG from `<g id="{id}"` to the next `</g>` that closes it.
    fn section<'a>(svg: &'a str, id: &str) -> &'a str {
        let start = svg
            .find(&format!(r#"<g id="{id}""#))
            .unwrap_or_else(|| panic!("no {id}"));
        let mut depth = 0;
        let mut at = start;
        loop {
            let open = svg[at..].find("<g ").map(|i| i + at);
            let close = svg[at..].find("</g>").map(|i| i + at).expect("unclosed g");
            match open {
                Some(o) if o < close => {
                    depth += 1;
                    at = o + 3;
                }
                _ => {
                    depth -= 1;
                    at = close + 4;
                    if depth == 0 {
                        return &svg[start..at];
                    }
                }
            }
        }
    }

    fn markers(s: &str) -> usize {
        s.matches("<circle ").count() + s.matches("<rect ").count() + s.matches("<path ").count()
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// `n` points in `k` clusters, the larger ones first.
    fn clusters(n: usize, k: u32) -> (Vec<[f32; 2]>, Vec<u32>) {
        let mut seed = 12345u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) as f32
        };
        let mut pts = Vec::new();
        let mut lab = Vec::new();
        for _ in 0..n {
            // Log-uniform class: class c holds about 1/(c+1) as many points as class 0.
            let c = ((k as f32).powf(rnd()) as u32).clamp(1, k) - 1;
            let (cx, cy) = (
                (c as f32 * 2.4).sin() * 8.0 + c as f32 * 0.1,
                (c as f32 * 2.4).cos() * 8.0,
            );
            let (a, rr) = (rnd() * std::f32::consts::TAU, rnd().sqrt() * 1.6);
            pts.push([cx + rr * a.cos(), cy + rr * a.sin()]);
            lab.push(c);
        }
        (pts, lab)
    }

    #[test]
    fn scatter_draws_one_marker_per_finite_point() {
        let (mut pts, lab) = clusters(2000, 30);
        pts[3] = [f32::NAN, 1.0];
        pts[7] = [0.0, f32::INFINITY];
        let nm: Vec<String> = (0..30).map(|i| format!("tok{i}")).collect();
        let svg = scatter("UMAP", &pts, &lab, &nm, 12);
        well_formed(&svg);
        assert_eq!(markers(section(&svg, "points")), 1998);
        let distinct = lab.iter().collect::<std::collections::BTreeSet<_>>().len();
        assert!(distinct > 12);
        assert!(svg.contains(&format!(
            "1998 points, {distinct} labels (2 with non-finite"
        )));
        // No coordinate numbers on the axes: the only texts are title, subtitle, names, legend.
        assert_eq!(svg.matches("<text").count(), 2 + 2 * 12 + 2 + 2 * 12);
    }

    #[test]
    fn scatter_legend_lists_the_most_frequent_labels_with_counts() {
        // Label 3: 4 points, label 1: 3, label 0: 2 (tie with 2 broken by label), label 2: 2.
        let lab = [3, 1, 3, 0, 1, 3, 2, 3, 1, 0, 2];
        let pts: Vec<[f32; 2]> = (0..lab.len()).map(|i| [i as f32, lab[i] as f32]).collect();
        let nm = names(&["a", "b", "c", "d"]);
        for (labelled, entries) in [(0, 0), (2, 2), (3, 3), (4, 4), (10, 4)] {
            let svg = scatter("t", &pts, &lab, &nm, labelled);
            well_formed(&svg);
            let legend = section(&svg, "legend");
            assert_eq!(legend.matches(r#"<g class="entry""#).count(), entries);
            let order: Vec<&str> = legend
                .match_indices(r#"<g class="entry""#)
                .filter_map(|(i, _)| {
                    let s = &legend[i..];
                    let a = s.find(r##"fill="#111">"##)? + 12;
                    Some(&s[a..a + s[a..].find('<')?])
                })
                .collect();
            assert_eq!(order, ["d", "b", "a", "c"][..entries], "{legend}");
            let names_drawn = section(&svg, "names");
            assert_eq!(names_drawn.matches("<text").count(), 2 * entries);
        }
        let svg = scatter("t", &pts, &lab, &nm, 2);
        assert!(svg.contains(r##"text-anchor="end" fill="#111">4</text>"##));
        assert!(svg.contains(r##"text-anchor="end" fill="#111">3</text>"##));
        assert!(svg.contains("2 most frequent of 4"));
    }

    #[test]
    fn scatter_styles_differ_across_palette_cycles() {
        let all: Vec<_> = (0..100).map(style).collect();
        for i in 0..100 {
            for j in 0..i {
                assert_ne!(all[i], all[j], "styles {i} and {j}");
            }
        }
        assert_eq!(all[0].0, all[20].0);
        assert_ne!(all[0].1, all[20].1);
        // Label of rank 20 is drawn with squares, in the same colour as rank 0's circles.
        let lab: Vec<u32> = (0..21)
            .flat_map(|l| std::iter::repeat_n(l, 30 - l as usize))
            .collect();
        let pts: Vec<[f32; 2]> = (0..lab.len()).map(|i| [i as f32, 0.0]).collect();
        let svg = scatter("t", &pts, &lab, &[], 21);
        let legend = section(&svg, "legend");
        assert_eq!(legend.matches("<circle").count(), 20);
        assert_eq!(legend.matches("<rect").count(), 1);
        assert!(legend.contains("#20<"));
    }

    #[test]
    fn scatter_escapes_hostile_names_and_shows_spaces() {
        let nm = names(&[
            "<script>",
            "a & b",
            "\"q\" 'x'",
            " the",
            "  ",
            "",
            "a\nb\u{1}",
        ]);
        let lab: Vec<u32> = (0..7).collect();
        let pts: Vec<[f32; 2]> = (0..7).map(|i| [i as f32, (i * i) as f32]).collect();
        let svg = scatter("<b>title</b> & \"more\"", &pts, &lab, &nm, 7);
        well_formed(&svg);
        assert!(!svg.contains("<script") && !svg.contains("<b>"));
        for s in [
            "&lt;script&gt;",
            "a &amp; b",
            "&quot;q&quot; &#39;x&#39;",
            ">␣the<",
            ">␣␣<",
            ">&quot;&quot;<",
            ">a↵b␁<",
            "&lt;b&gt;title&lt;/b&gt; &amp; &quot;more&quot;",
        ] {
            assert!(svg.contains(s), "{s} missing");
        }
        assert_eq!(visible(" New York "), "␣New York␣");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }

    #[test]
    fn scatter_edge_cases_do_not_panic() {
        let nm = names(&["x"]);
        // No points.
        let svg = scatter("empty", &[], &[], &nm, 5);
        well_formed(&svg);
        assert!(svg.contains("no points"));
        assert_eq!(markers(section(&svg, "points")), 0);
        assert_eq!(
            section(&svg, "legend").matches("class=\"entry\"").count(),
            0
        );
        // All identical (also at a huge coordinate).
        for p in [[0.0, 0.0], [1e30, -1e30]] {
            let svg = scatter("same", &[p; 50], &[0; 50], &nm, 3);
            well_formed(&svg);
            assert_eq!(markers(section(&svg, "points")), 50);
            assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        }
        // Only non-finite points.
        let svg = scatter("nan", &[[f32::NAN, f32::NAN]; 4], &[0; 4], &nm, 3);
        well_formed(&svg);
        assert_eq!(markers(section(&svg, "points")), 0);
        assert!(!svg.contains("NaN"));
        // Labels past the names, and points past the labels.
        let svg = scatter(
            "past",
            &[[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]],
            &[0, 7],
            &nm,
            5,
        );
        well_formed(&svg);
        assert_eq!(markers(section(&svg, "points")), 3);
        assert!(svg.contains(">#7<") && svg.contains(">?<") && svg.contains(">x<"));
        // A single point.
        let svg = scatter("one", &[[3.0, 4.0]], &[0], &nm, 1);
        well_formed(&svg);
        assert!(svg.contains("1 point, 1 label"));
    }

    #[test]
    fn bars_show_every_value_with_its_label() {
        let groups = names(&["layer 0", "layer 6", "all layers"]);
        let series = names(&["sgatlin gating", "dense MLP activation"]);
        let values = vec![
            vec![Some(0.91), Some(0.456), Some(0.7)],
            vec![Some(0.33), None, Some(f64::NAN)],
        ];
        let svg = bars("Probe accuracy", "accuracy", &groups, &series, &values);
        well_formed(&svg);
        let drawn = section(&svg, "bars");
        assert_eq!(drawn.matches("<rect").count(), 4);
        for v in ["0.91", "0.46", "0.70", "0.33"] {
            assert!(drawn.contains(&format!(">{v}</text>")), "{v}");
        }
        assert_eq!(drawn.matches(">n/a<").count(), 2);
        assert_eq!(section(&svg, "legend").matches("<rect").count(), 2);
        for s in groups.iter().chain(&series) {
            assert!(svg.contains(&format!(">{s}</text>")), "{s}");
        }
        // From zero, no zero line of its own (the frame's bottom is zero), ticks at round values.
        assert!(svg.contains(r#"text-anchor="end">0</text>"#));
        assert!(svg.contains(r#"text-anchor="end">0.8</text>"#));
        assert!(!svg.contains("-0."));
    }

    #[test]
    fn bars_span_negative_values_with_a_zero_line() {
        let svg = bars(
            "delta",
            "change",
            &names(&["a", "b"]),
            &names(&["s"]),
            &[vec![Some(-1.5), Some(2.25)]],
        );
        well_formed(&svg);
        let drawn = section(&svg, "bars");
        assert!(drawn.contains(">-1.50<") && drawn.contains(">2.25<"));
        assert!(svg.contains(r#"text-anchor="end">-1</text>"#));
        assert!(svg.contains(r#"text-anchor="end">0</text>"#));
        assert!(svg.contains(r#"text-anchor="end">2</text>"#));
        // The zero line runs across the frame, level with the 0 tick.
        let zero_line = svg
            .lines()
            .find(|l| l.starts_with(r#"<line x1="64""#) && l.ends_with(r##"stroke="#444"/>"##))
            .expect("zero line");
        let y = zero_line.split('"').nth(3).unwrap();
        assert!(
            svg.contains(&format!(r#"y1="{y}" x2="64" y2="{y}""#)),
            "{zero_line}"
        );
        // Only negative values: the axis runs down from zero.
        let svg = bars(
            "neg",
            "y",
            &names(&["a"]),
            &names(&["s"]),
            &[vec![Some(-0.4)]],
        );
        well_formed(&svg);
        assert!(svg.contains(">-0.40<"));
        assert!(svg.contains(r#"text-anchor="end">0</text>"#));
    }

    #[test]
    fn bars_edge_cases_do_not_panic() {
        let g = names(&["a", "b"]);
        let s = names(&["x", "y"]);
        // Nothing at all.
        for (gs, ss) in [(&[][..], &[][..]), (&g[..], &[][..]), (&[][..], &s[..])] {
            let svg = bars("", "", gs, ss, &[]);
            well_formed(&svg);
            assert!(svg.contains("no data"));
            assert_eq!(section(&svg, "bars").matches("<rect").count(), 0);
        }
        // All zero: zero-height bars, labels 0.00, an axis from 0 to 1.
        let svg = bars("z", "y", &g, &s, &[vec![Some(0.0); 2], vec![Some(0.0); 2]]);
        well_formed(&svg);
        assert_eq!(section(&svg, "bars").matches(">0.00<").count(), 4);
        assert!(svg.contains(r#"text-anchor="end">1</text>"#));
        // All missing, NaN, infinite, or absent from `values`.
        let svg = bars(
            "none",
            "y",
            &g,
            &s,
            &[vec![None, Some(f64::NAN)], vec![Some(f64::INFINITY)]],
        );
        well_formed(&svg);
        let drawn = section(&svg, "bars");
        assert_eq!(drawn.matches("<rect").count(), 0);
        assert_eq!(drawn.matches(">n/a<").count(), 4);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        // Long group names are slanted, and many series wrap the legend.
        let long = names(&["a very long group name indeed", "b"]);
        let many: Vec<String> = (0..12).map(|i| format!("series number {i}")).collect();
        let svg = bars("slant", "y", &long, &s, &[vec![Some(1.0)]]);
        well_formed(&svg);
        assert!(svg.contains("rotate(-35)"));
        let svg = bars("wrap", "y", &g, &many, &[vec![Some(1.0)]]);
        well_formed(&svg);
        assert!(!svg.contains("rotate(-35)"));
        assert!(
            svg.contains(r#"<text x="30" y="54">"#),
            "no second legend row"
        );
    }

    #[test]
    fn bars_escape_hostile_names() {
        let svg = bars(
            "<script>alert(1)</script>",
            "a & \"b\"",
            &names(&["<g>", "'q'"]),
            &names(&["&amp;", "x\u{0}y"]),
            &[vec![Some(1.0), None], vec![None, Some(2.0)]],
        );
        well_formed(&svg);
        assert!(!svg.contains("<script") && !svg.contains("<g>"));
        for s in [
            "&lt;script&gt;alert(1)&lt;/script&gt;",
            "a &amp; &quot;b&quot;",
            "&lt;g&gt;",
            "&#39;q&#39;",
            "&amp;amp;",
            "x␀y",
        ] {
            assert!(svg.contains(s), "{s} missing");
        }
    }

    #[test]
    fn charts_are_deterministic() {
        let (pts, lab) = clusters(3000, 40);
        let nm: Vec<String> = (0..40).map(|i| format!(" w{i}")).collect();
        let a = scatter("s", &pts, &lab, &nm, 15);
        assert_eq!(a, scatter("s", &pts, &lab, &nm, 15));
        let g = names(&["layer 0", "all layers"]);
        let s = names(&["a", "b", "c"]);
        let v = vec![vec![Some(0.1), Some(-0.2)]; 3];
        assert_eq!(bars("b", "y", &g, &s, &v), bars("b", "y", &g, &s, &v));
    }
}
