//! The Prometheus rules bazaar ships (`deploy/components/monitoring`): Prometheus's own
//! checker accepts them, promtool's unit tests of every alert pass, every alert is tested
//! firing and quiet and tells the operator what to look at, and no rule names a metric the
//! roles do not serve.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml::Value;

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/components/monitoring")
}

fn yaml(file: &str) -> Value {
    let text = std::fs::read_to_string(monitoring_dir().join(file)).expect("a monitoring file");
    serde_yaml::from_str(&text).expect("YAML")
}

/// Runs `promtool` with `args` in the monitoring directory; its output when it fails.
fn promtool(args: &[&str]) -> Result<(), String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring_dir())
        .output()
        .expect("this test needs promtool on PATH (Debian's prometheus package; .ci/run installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    out.status.success().then_some(()).ok_or(text)
}

/// Every rule of `rules.yaml`.
fn rules() -> Vec<Value> {
    let doc = yaml("rules.yaml");
    let groups = doc["groups"].as_sequence().expect("groups").clone();
    groups
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .collect()
}

#[test]
fn prometheus_accepts_the_rules_and_every_alert_unit_test_passes() {
    if let Err(problems) = promtool(&["check", "rules", "rules.yaml"]) {
        panic!("promtool check rules:\n{problems}");
    }
    if let Err(failures) = promtool(&["test", "rules", "rules.test.yaml"]) {
        panic!("promtool test rules:\n{failures}");
    }
}

#[test]
fn every_alert_is_tested_firing_and_quiet_and_says_what_to_look_at_first() {
    let tests = yaml("rules.test.yaml");
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().expect("alert tests") {
            let name = case["alertname"].as_str().expect("an alert name").to_string();
            let expected = case["exp_alerts"].as_sequence().map_or(0, Vec::len);
            if expected == 0 { &mut quiet } else { &mut firing }.insert(name);
        }
    }
    let mut missing = Vec::new();
    for rule in rules().iter().filter(|r| r["alert"].is_string()) {
        let name = rule["alert"].as_str().unwrap_or_default().to_string();
        let annotations = &rule["annotations"];
        for (what, ok) in [
            ("a firing test", firing.contains(&name)),
            ("a quiet test", quiet.contains(&name)),
            ("a summary", annotations["summary"].is_string()),
            ("a runbook", annotations["runbook"].is_string()),
            ("a severity", rule["labels"]["severity"].is_string()),
        ] {
            if !ok {
                missing.push(format!("{name} has no {what}"));
            }
        }
    }
    assert!(missing.is_empty(), "{missing:#?}");
}

#[test]
fn every_metric_a_rule_names_is_one_the_roles_serve() {
    let served: BTreeSet<String> = bazaar::metrics::catalogue()
        .iter()
        .map(|m| m.name.to_string())
        .collect();
    let mut unknown = BTreeSet::new();
    for rule in rules() {
        let expr = rule["expr"].as_str().expect("an expression");
        for (at, _) in expr.match_indices("bazaar_") {
            if expr[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let name: String = expr[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix).filter(|b| served.contains(*b)))
                .unwrap_or(&name);
            if !served.contains(base) {
                unknown.insert(name);
            }
        }
    }
    assert!(unknown.is_empty(), "rules name metrics no role serves: {unknown:?}");
}
