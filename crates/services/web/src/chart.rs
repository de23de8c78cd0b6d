//! Line charts as SVG drawn on the server: no chart library, no script. Each chart names
//! itself (`role="img"` with a title) and lists its series with their latest values, so a
//! screen reader and a test read the numbers the lines show.

use std::fmt::Write;

use serde::Serialize;

/// Colours of successive series (distinguishable in grey scale too, by dash).
const COLOURS: [&str; 6] = ["#0f7a3d", "#b3261e", "#0b5fff", "#8a5a00", "#6b3fa0", "#00796b"];

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// What it is.
    pub label: String,
    /// Its values, oldest first, one per sample.
    pub values: Vec<f64>,
}

/// A chart ready for a template.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    /// Its title.
    pub title: String,
    /// The SVG.
    pub svg: String,
    /// Each series with its latest value, in words.
    pub legend: Vec<Legend>,
}

/// One entry of a chart's legend.
#[derive(Debug, Clone, Serialize)]
pub struct Legend {
    /// The series.
    pub label: String,
    /// Its colour.
    pub colour: &'static str,
    /// Its latest value, formatted with the chart's unit.
    pub latest: String,
}

const WIDTH: f64 = 480.0;
const HEIGHT: f64 = 140.0;
const PAD: f64 = 4.0;

/// A chart of `series` titled `title`, values shown with `unit` (`/s`, ` ms`, ``).
pub fn line_chart(id: &str, title: &str, unit: &str, series: &[Series]) -> Chart {
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max);
    // A little headroom, and a scale of at least 1 so a quiet system draws flat lines low.
    let top = (top * 1.1).max(1.0);
    let points = series.iter().map(|s| s.values.len()).max().unwrap_or(0);
    let step = if points > 1 {
        (WIDTH - 2.0 * PAD) / (points - 1) as f64
    } else {
        0.0
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="{id}-title" class="chart" preserveAspectRatio="none"><title id="{id}-title">{title}</title><line x1="0" y1="{base}" x2="{WIDTH}" y2="{base}" class="axis"/><text x="{PAD}" y="12" class="scale">{max}</text>"##,
        title = escape(title),
        base = HEIGHT - PAD,
        max = escape(&format!("{}{unit}", number(top))),
    );
    let mut legend = Vec::new();
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let offset = points.saturating_sub(s.values.len());
        let coords: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .map(|(j, v)| {
                let x = PAD + (offset + j) as f64 * step;
                let v = if v.is_finite() { *v } else { 0.0 };
                let y = HEIGHT - PAD - (v / top) * (HEIGHT - 2.0 * PAD - 12.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        if !coords.is_empty() {
            let dash = if i % 2 == 1 { r#" stroke-dasharray="5 3""# } else { "" };
            let _ = write!(
                svg,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{}"/>"#,
                coords.join(" ")
            );
        }
        legend.push(Legend {
            label: s.label.clone(),
            colour,
            latest: s
                .values
                .last()
                .map_or_else(|| "—".to_string(), |v| format!("{}{unit}", number(*v))),
        });
    }
    svg.push_str("</svg>");
    Chart {
        title: title.to_string(),
        svg,
        legend,
    }
}

/// `v` with as many decimals as its size needs.
fn number(v: f64) -> String {
    if !v.is_finite() {
        "—".into()
    } else if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Text safe inside SVG markup.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_names_itself_and_says_its_latest_values() {
        let chart = line_chart(
            "orders",
            "Orders per second <by outcome>",
            "/s",
            &[
                Series {
                    label: "confirmed".into(),
                    values: vec![1.0, 2.5, 4.0],
                },
                Series {
                    label: "cancelled".into(),
                    values: vec![0.0],
                },
            ],
        );
        assert!(chart.svg.starts_with("<svg") && chart.svg.ends_with("</svg>"));
        assert!(chart.svg.contains("role=\"img\"") && chart.svg.contains("&lt;by outcome&gt;"));
        assert_eq!(chart.svg.matches("<polyline").count(), 2);
        assert_eq!(chart.legend[0].latest, "4/s");
        assert_eq!(chart.legend[1].latest, "0/s");
    }

    #[test]
    fn an_empty_chart_still_draws() {
        let chart = line_chart("x", "Nothing yet", "", &[]);
        assert!(chart.svg.contains("Nothing yet"));
        assert!(chart.legend.is_empty());
    }
}
