//! Small SVG charts drawn on the server (no script, no external library, nothing fetched):
//! a line chart of per-minute counts and a horizontal bar chart. Every text that reaches the
//! SVG (labels, legends, titles) is escaped here, so the result may be embedded as is.

use std::fmt::Write as _;

/// The colour of each series, in order (cycled).
const COLOURS: [&str; 6] = [
    "#2e7d32", "#f9a825", "#c62828", "#6a1b9a", "#1565c0", "#5d4037",
];

/// `text` safe in SVG/HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
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

/// One line of a [`line_chart`]: its legend and its values, one per x step.
pub struct Series<'a> {
    pub name: &'a str,
    pub values: Vec<u64>,
}

const W: f64 = 640.0;
const H: f64 = 200.0;
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 22.0;
const TOP: f64 = 22.0;

/// A line chart of `series` over the same x steps; `first` and `last` label the ends of the
/// x axis. The y axis runs from 0 to the largest value (at least 1).
pub fn line_chart(title: &str, series: &[Series<'_>], first: &str, last: &str) -> String {
    let steps = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let max = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1);
    let plot_w = W - LEFT - 8.0;
    let plot_h = H - TOP - BOTTOM;
    let x = |i: usize| LEFT + plot_w * i as f64 / (steps.max(2) - 1) as f64;
    let y = |v: u64| TOP + plot_h - plot_h * v as f64 / max as f64;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = escape(title)
    );
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="#888"/><line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/>"##,
        b = TOP + plot_h,
        r = W - 8.0
    );
    let _ = write!(
        svg,
        r##"<text x="{lx}" y="{ty}" font-size="11" text-anchor="end" fill="#444">{max}</text><text x="{lx}" y="{by}" font-size="11" text-anchor="end" fill="#444">0</text>"##,
        lx = LEFT - 4.0,
        ty = TOP + 4.0,
        by = TOP + plot_h
    );
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="{ly}" font-size="11" fill="#444">{}</text><text x="{rx}" y="{ly}" font-size="11" text-anchor="end" fill="#444">{}</text>"##,
        escape(first),
        escape(last),
        ly = H - 6.0,
        rx = W - 8.0
    );
    for (n, s) in series.iter().enumerate() {
        let colour = COLOURS[n % COLOURS.len()];
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .map(|(i, &v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline class="series" data-series="{name}" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" "),
            name = escape(s.name)
        );
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="6" width="10" height="10" fill="{colour}"/><text x="{tx}" y="15" font-size="11" fill="{colour}">{name}</text>"#,
            lx = LEFT + 110.0 * n as f64,
            tx = LEFT + 14.0 + 110.0 * n as f64,
            name = escape(s.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// A horizontal bar chart: one bar per `(label, value)`, scaled to the largest value; each
/// bar is annotated with `text` (the value as the page words it).
pub fn bar_chart(title: &str, bars: &[(String, f64, String)]) -> String {
    let row = 22.0;
    let label_w = 150.0;
    let h = TOP + row * bars.len().max(1) as f64 + 4.0;
    let max = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    let max = if max > 0.0 { max } else { 1.0 };
    let plot_w = W - label_w - 80.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {h}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = escape(title)
    );
    for (i, (label, value, text)) in bars.iter().enumerate() {
        let top = TOP + row * i as f64;
        let value = if value.is_finite() {
            value.max(0.0)
        } else {
            0.0
        };
        let w = plot_w * value / max;
        let colour = COLOURS[i % COLOURS.len()];
        let _ = write!(
            svg,
            r##"<text x="{lx}" y="{ty}" font-size="12" text-anchor="end" fill="#222">{}</text><rect class="bar" x="{label_w}" y="{top}" width="{w:.1}" height="{bh}" fill="{colour}"/><text x="{vx:.1}" y="{ty}" font-size="12" fill="#222">{}</text>"##,
            escape(label),
            escape(text),
            lx = label_w - 6.0,
            ty = top + 14.0,
            bh = row - 6.0,
            vx = label_w + w + 4.0
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_labels_are_escaped() {
        let svg = line_chart(
            "<script>alert(1)</script>",
            &[Series {
                name: "\"><script>x</script>",
                values: vec![1, 2, 3],
            }],
            "a&b",
            "<",
        );
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(
            svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{svg}"
        );
        assert!(svg.contains("&quot;&gt;&lt;script&gt;"), "{svg}");
        assert!(svg.contains("a&amp;b"), "{svg}");
        let bars = bar_chart("t", &[("<b>".into(), 1.0, "<i>".into())]);
        assert!(!bars.contains("<b>") && !bars.contains("<i>"), "{bars}");
    }

    #[test]
    fn lines_scale_to_the_largest_value_and_bars_to_the_longest() {
        let svg = line_chart(
            "t",
            &[Series {
                name: "a",
                values: vec![0, 4, 2],
            }],
            "",
            "",
        );
        // 0 sits on the axis (y = 178), the maximum at the top (y = 22), 2 half way.
        assert!(
            svg.contains("points=\"44.0,178.0 338.0,22.0 632.0,100.0\""),
            "{svg}"
        );
        assert!(
            svg.contains(">4</text>"),
            "the axis names the maximum: {svg}"
        );
        let bars = bar_chart(
            "t",
            &[
                ("x".into(), 2.0, "2".into()),
                ("y".into(), 1.0, "1".into()),
                ("z".into(), f64::NAN, "-".into()),
            ],
        );
        assert!(bars.contains("width=\"410.0\""), "{bars}");
        assert!(bars.contains("width=\"205.0\""), "{bars}");
        assert!(bars.contains("width=\"0.0\""), "{bars}");
    }
}
