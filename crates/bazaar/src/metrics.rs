//! Every metric the roles record, with its help text: the kit's, each service's (from the
//! role table) and the gateway's. What `/metrics` says of each, and what rules and
//! dashboards may name.

use bazaar_kit::telemetry::MetricDoc;

use crate::roles;

/// Every metric of the system, each once.
pub fn catalogue() -> Vec<MetricDoc> {
    let mut all: Vec<MetricDoc> = bazaar_kit::telemetry::METRICS.to_vec();
    for (_, spec) in roles::services() {
        all.extend(spec.metrics);
    }
    all.extend(
        bazaar_gateway::METRICS
            .iter()
            .map(|&(name, help)| MetricDoc { name, help }),
    );
    all
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    /// The names given as the first argument of `counter!`, `gauge!`, `histogram!` and
    /// `spawn_gauge` in `text`.
    fn recorded_in(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        for call in ["counter!(", "gauge!(", "histogram!(", "spawn_gauge("] {
            for (at, _) in text.match_indices(call) {
                let rest = text[at + call.len()..].trim_start();
                if let Some(literal) = rest.strip_prefix('"') {
                    if let Some(end) = literal.find('"') {
                        names.push(literal[..end].to_string());
                    }
                }
            }
        }
        names
    }

    /// Every `.rs` file under `dir`.
    fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("a source directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn every_metric_recorded_has_help_text_and_every_help_text_a_metric() {
        let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = Vec::new();
        sources(&crates, &mut files);
        let recorded: BTreeSet<String> = files
            .iter()
            .filter(|f| f.components().all(|c| c.as_os_str() != "tests"))
            .flat_map(|f| recorded_in(&std::fs::read_to_string(f).expect("a source file")))
            .filter(|name| name.starts_with("bazaar_"))
            .collect();
        let catalogue = super::catalogue();
        let described: BTreeSet<String> = catalogue.iter().map(|m| m.name.to_string()).collect();
        assert_eq!(described.len(), catalogue.len(), "a metric is described twice");
        let undescribed: Vec<_> = recorded.difference(&described).collect();
        assert!(undescribed.is_empty(), "recorded without help text: {undescribed:?}");
        let stale: Vec<_> = described.difference(&recorded).collect();
        assert!(stale.is_empty(), "described but never recorded: {stale:?}");
        for metric in &catalogue {
            assert!(metric.help.ends_with('.'), "{}: help is a sentence", metric.name);
        }
    }
}
