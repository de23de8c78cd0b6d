//! What a bench measured and how it is shown: a small table, the ratios, and notes.

use std::time::Duration;

use serde_json::{json, Value};

/// One measured variant: how many operations finished in how long, and each one's latency.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sample {
    /// Operations that finished successfully.
    pub(crate) count: usize,
    /// Operations that failed (wrong status, broken connection, …).
    pub(crate) errors: usize,
    /// Wall time of the measured phase.
    pub(crate) elapsed: Duration,
    /// Latency of each successful operation; sorted by [`Sample::finish`].
    pub(crate) latencies: Vec<Duration>,
    /// `(quantile, ms)` as an outside load generator reported them, when `latencies` is
    /// empty because it does not hand out each one.
    pub(crate) reported: Vec<(f64, f64)>,
}

impl Sample {
    /// Sorts the latencies so percentiles can be read.
    pub(crate) fn finish(mut self) -> Sample {
        self.latencies.sort_unstable();
        self
    }

    /// Operations per second.
    pub(crate) fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.count as f64 / secs
        } else {
            0.0
        }
    }

    /// The `q` quantile (0..=1) of the latencies, in milliseconds.
    pub(crate) fn ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            if let Some((_, ms)) = self.reported.iter().find(|(at, _)| (at - q).abs() < 1e-9) {
                return *ms;
            }
        }
        bazaar::load::percentile(&self.latencies, q)
    }
}

/// The median by rate of `rounds`, each a sample and its note; `None` when there is none.
/// The note says how many rounds it was taken from.
pub(crate) fn median(mut rounds: Vec<(Sample, String)>) -> Option<(Sample, String)> {
    let n = rounds.len();
    rounds.sort_by(|a, b| a.0.rate().total_cmp(&b.0.rate()));
    let (sample, note) = (n > 0).then(|| rounds.swap_remove(n / 2))?;
    Some(match n {
        1 => (sample, note),
        n => (sample, format!("{note}; median of {n} rounds")),
    })
}

/// One line of the table; `sample` is `None` when the variant could not run (`note` says why).
#[derive(Debug)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) sample: Option<Sample>,
    pub(crate) note: String,
}

/// A bench's result.
#[derive(Debug)]
pub(crate) struct Report {
    /// What was measured, e.g. `gateway: 10 s, 32 connections`.
    pub(crate) title: String,
    /// The throughput unit, e.g. `req/s`.
    pub(crate) unit: &'static str,
    pub(crate) rows: Vec<Row>,
    /// `(label, value)`; `None` when one side is missing.
    pub(crate) ratios: Vec<(String, Option<f64>)>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn new(title: impl Into<String>, unit: &'static str) -> Report {
        Report {
            title: title.into(),
            unit,
            rows: Vec::new(),
            ratios: Vec::new(),
            notes: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, name: impl Into<String>, sample: Option<Sample>, note: impl Into<String>) {
        self.rows.push(Row {
            name: name.into(),
            sample,
            note: note.into(),
        });
    }

    fn sample(&self, name: &str) -> Option<&Sample> {
        self.rows
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.sample.as_ref())
    }

    /// Adds the throughput and p99 ratios of row `a` over row `b`.
    pub(crate) fn compare(&mut self, a: &str, b: &str) {
        let (sa, sb) = (self.sample(a), self.sample(b));
        let tput = match (sa, sb) {
            (Some(x), Some(y)) if y.rate() > 0.0 => Some(x.rate() / y.rate()),
            _ => None,
        };
        let p99 = match (sa, sb) {
            (Some(x), Some(y)) if y.ms(0.99) > 0.0 => Some(x.ms(0.99) / y.ms(0.99)),
            _ => None,
        };
        self.ratios.push((format!("{a} / {b} {}", self.unit), tput));
        self.ratios.push((format!("{a} / {b} p99"), p99));
    }

    pub(crate) fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// Prints the table, the ratios and the notes; with `json`, one JSON line after them.
    pub(crate) fn print(&self, json: bool) {
        println!();
        println!("{}", self.title);
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(8);
        println!(
            "  {:<width$} {:>8} {:>7} {:>10} {:>9} {:>9} {:>6}  note",
            "variant", "ok", "secs", self.unit, "p50 ms", "p99 ms", "errors"
        );
        for r in &self.rows {
            match &r.sample {
                Some(s) => println!(
                    "  {:<width$} {:>8} {:>7.2} {:>10.1} {:>9.2} {:>9.2} {:>6}  {}",
                    r.name,
                    s.count,
                    s.elapsed.as_secs_f64(),
                    s.rate(),
                    s.ms(0.5),
                    s.ms(0.99),
                    s.errors,
                    r.note
                ),
                None => println!("  {:<width$} {:>8}  {}", r.name, "skipped", r.note),
            }
        }
        if !self.ratios.is_empty() {
            println!("ratios");
            for (label, value) in &self.ratios {
                match value {
                    Some(v) => println!("  {label}: {v:.3}"),
                    None => println!("  {label}: n/a"),
                }
            }
        }
        for n in &self.notes {
            println!("note: {n}");
        }
        if json {
            println!("{}", self.to_json());
        }
    }

    fn to_json(&self) -> Value {
        let rows: Vec<Value> = self
            .rows
            .iter()
            .map(|r| match &r.sample {
                Some(s) => json!({
                    "variant": r.name, "ok": s.count, "errors": s.errors,
                    "seconds": s.elapsed.as_secs_f64(), "rate": s.rate(),
                    "p50Ms": s.ms(0.5), "p99Ms": s.ms(0.99), "note": r.note,
                }),
                None => json!({"variant": r.name, "skipped": true, "note": r.note}),
            })
            .collect();
        let ratios: serde_json::Map<String, Value> = self.ratios.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        json!({"bench": self.title, "unit": self.unit, "rows": rows, "ratios": ratios, "notes": self.notes})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(count: usize, ms: u64) -> Sample {
        Sample {
            count,
            errors: 0,
            elapsed: Duration::from_secs(1),
            latencies: vec![Duration::from_millis(ms); count],
            ..Sample::default()
        }
        .finish()
    }

    #[test]
    fn ratios_compare_throughput_and_p99_and_skip_missing_rows() {
        let mut r = Report::new("t", "req/s");
        r.row("ours", Some(sample(50, 4)), "");
        r.row("theirs", Some(sample(100, 2)), "");
        r.row("absent", None, "not installed");
        r.compare("ours", "theirs");
        r.compare("ours", "absent");
        assert_eq!(r.ratios[0].1, Some(0.5));
        assert_eq!(r.ratios[1].1, Some(2.0));
        assert_eq!(r.ratios[2].1, None);
    }
}
