//! What the console watches: every role instance's `/health` and `/metrics`, read from its
//! plain admin listener as a probe or Prometheus would, every couple of seconds while
//! someone has looked at the console in the last five minutes. The last few minutes of
//! samples are kept in memory for the charts; nothing is stored.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, RwLock},
    time::Duration,
};

use serde::Serialize;
use serde_json::Value;

/// One role instance the console watches.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Its role.
    pub role: &'static str,
    /// Its name in logs (`orders-1`).
    pub name: String,
    /// Its plain health-and-metrics listener (`http://127.0.0.1:8203`).
    pub admin_url: String,
}

/// How often instances are read.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Samples kept: five minutes.
const KEPT: usize = 150;

/// How long one instance may take to answer.
const READ_TIMEOUT: Duration = Duration::from_secs(1);

/// An instance as the console shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    /// Its role.
    pub role: &'static str,
    /// Its name.
    pub name: String,
    /// `healthy`, `degraded` or `unreachable`.
    pub status: String,
    /// `ready`, `not ready` (draining, or its store or broker down), or `—` where the role
    /// serves no readiness (the gateway).
    pub ready: &'static str,
    /// Its checks, `name: up` or `name: down: why`.
    pub checks: Vec<String>,
    /// Its version.
    pub version: String,
    /// Seconds since it started.
    pub uptime: u64,
    /// Its circuit breakers: `name: closed|open|half-open`.
    pub breakers: Vec<String>,
}

/// The counters and gauges of every instance at one moment, summed per label set.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Seconds since the monitor started.
    pub at: f64,
    /// `bazaar_orders_finished_total` by status.
    pub finished: BTreeMap<String, f64>,
    /// `bazaar_order_saga_seconds` buckets (upper bound, cumulative count).
    pub saga_buckets: Vec<(f64, f64)>,
    /// `bazaar_outbox_unsent` by role.
    pub outbox: BTreeMap<String, f64>,
    /// `bazaar_consumer_lag` by `group ← topic`.
    pub lag: BTreeMap<String, f64>,
    /// `bazaar_dead_letters_total` by topic.
    pub dead: BTreeMap<String, f64>,
    /// `bazaar_mesh_requests_total` by `caller → callee`.
    pub mesh_requests: BTreeMap<String, f64>,
    /// `bazaar_mesh_refusals_total` by `caller → callee`.
    pub mesh_refusals: BTreeMap<String, f64>,
    /// Mesh requests answered with a server error, by `caller → callee`.
    pub mesh_errors: BTreeMap<String, f64>,
    /// `bazaar_mesh_request_seconds` buckets by `caller → callee`.
    pub mesh_buckets: BTreeMap<String, Vec<(f64, f64)>>,
}

/// The console's view of the system, refreshed by [`Monitor::sample`].
#[derive(Debug, Default)]
pub struct Watch {
    /// The last reading of each instance.
    pub instances: Vec<InstanceStatus>,
    /// The last samples, oldest first.
    pub samples: VecDeque<Sample>,
}

/// How long after the console was last looked at the monitor keeps reading instances; a
/// system nobody watches is not scraped by its own console.
const WATCHED_FOR: Duration = Duration::from_secs(300);

/// Reads every instance, keeps the samples.
#[derive(Debug, Clone)]
pub struct Monitor {
    instances: Arc<Vec<Instance>>,
    client: reqwest::Client,
    watch: Arc<RwLock<Watch>>,
    started: std::time::Instant,
    /// Until when (ms since `started`) someone is watching.
    watched_until: Arc<std::sync::atomic::AtomicU64>,
}

impl Monitor {
    /// A monitor of `instances`.
    pub fn new(instances: Vec<Instance>) -> Result<Monitor, reqwest::Error> {
        Ok(Monitor {
            instances: Arc::new(instances),
            client: reqwest::Client::builder()
                .timeout(READ_TIMEOUT)
                .connect_timeout(READ_TIMEOUT)
                .pool_idle_timeout(bazaar_kit::http::CLIENT_POOL_IDLE)
                .build()?,
            watch: Arc::new(RwLock::new(Watch::default())),
            started: std::time::Instant::now(),
            watched_until: Arc::default(),
        })
    }

    /// Notes that someone is looking at the console: instances are read for the next
    /// five minutes. The first look after a quiet spell reads them at once.
    pub async fn look(&self) {
        let now = self.started.elapsed();
        let until = (now + WATCHED_FOR).as_millis() as u64;
        let was = self.watched_until.swap(until, std::sync::atomic::Ordering::Relaxed);
        if was <= now.as_millis() as u64 {
            self.sample().await;
        }
    }

    /// Reads every instance once if someone is watching (the periodic round).
    pub async fn round(&self) {
        let until = self.watched_until.load(std::sync::atomic::Ordering::Relaxed);
        if self.started.elapsed().as_millis() as u64 <= until {
            self.sample().await;
        }
    }

    /// What was last read.
    pub fn read<T>(&self, f: impl FnOnce(&Watch) -> T) -> T {
        f(&self.watch.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reads every instance once and keeps the sample.
    pub async fn sample(&self) {
        let reads = self.instances.iter().map(|i| self.read_instance(i));
        let read = futures_util::future::join_all(reads).await;
        let mut sample = Sample {
            at: self.started.elapsed().as_secs_f64(),
            ..Sample::default()
        };
        let mut statuses = Vec::with_capacity(read.len());
        for (instance, (status, metrics)) in self.instances.iter().zip(read) {
            let mut status = status;
            for m in &metrics {
                add(&mut sample, instance.role, m, &mut status);
            }
            statuses.push(status);
        }
        let mut watch = self.watch.write().unwrap_or_else(|e| e.into_inner());
        watch.instances = statuses;
        watch.samples.push_back(sample);
        while watch.samples.len() > KEPT {
            watch.samples.pop_front();
        }
    }

    async fn read_instance(&self, instance: &Instance) -> (InstanceStatus, Vec<Metric>) {
        let mut status = InstanceStatus {
            role: instance.role,
            name: instance.name.clone(),
            status: "unreachable".into(),
            ready: "not ready",
            checks: Vec::new(),
            version: String::new(),
            uptime: 0,
            breakers: Vec::new(),
        };
        let health = self.client.get(format!("{}/health", instance.admin_url)).send().await;
        if let Ok(answer) = health {
            if let Ok(body) = answer.json::<Value>().await {
                status.status = body["status"].as_str().unwrap_or("unknown").to_string();
                status.version = body["version"].as_str().unwrap_or_default().to_string();
                status.uptime = body["uptime"].as_u64().unwrap_or(0);
                status.checks = body["checks"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, v)| match v {
                        Value::String(s) => format!("{name}: {s}"),
                        other => format!("{name}: {}", other["status"].as_str().unwrap_or("see details")),
                    })
                    .collect();
            }
        }
        status.ready = match self
            .client
            .get(format!("{}/health/ready", instance.admin_url))
            .send()
            .await
        {
            Ok(answer) if answer.status().is_success() => "ready",
            Ok(answer) if answer.status() == reqwest::StatusCode::NOT_FOUND => "—",
            _ => "not ready",
        };
        let metrics = match self.client.get(format!("{}/metrics", instance.admin_url)).send().await {
            Ok(answer) => answer.text().await.map(|t| parse(&t)).unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        (status, metrics)
    }
}

/// One line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// The samples of a Prometheus text exposition (comments and malformed lines left out).
pub fn parse(text: &str) -> Vec<Metric> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|line| {
            let (head, value) = line.rsplit_once(' ')?;
            let value: f64 = value.trim().parse().ok()?;
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, labels(rest.strip_suffix('}')?)),
                None => (head, BTreeMap::new()),
            };
            Some(Metric {
                name: name.trim().to_string(),
                labels,
                value,
            })
        })
        .collect()
}

/// `a="1",b="x"` as a map (values are bazaar's own: no escaped quotes or commas in them).
fn labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}

/// Adds one metric of an instance of `role` to the sample (and its breakers to `status`).
fn add(sample: &mut Sample, role: &str, m: &Metric, status: &mut InstanceStatus) {
    let label = |name: &str| m.labels.get(name).cloned().unwrap_or_default();
    let sum = |map: &mut BTreeMap<String, f64>, key: String| *map.entry(key).or_default() += m.value;
    match m.name.as_str() {
        "bazaar_orders_finished_total" => sum(&mut sample.finished, label("status")),
        "bazaar_order_saga_seconds_bucket" => add_bucket(&mut sample.saga_buckets, &label("le"), m.value),
        "bazaar_mesh_request_seconds_bucket" => {
            let edge = format!("{} → {}", short(&label("caller")), label("callee"));
            add_bucket(sample.mesh_buckets.entry(edge).or_default(), &label("le"), m.value);
        }
        "bazaar_outbox_unsent" => sum(&mut sample.outbox, role.to_string()),
        "bazaar_consumer_lag" => sum(&mut sample.lag, format!("{} ← {}", label("group"), label("topic"))),
        "bazaar_dead_letters_total" => sum(&mut sample.dead, label("topic")),
        "bazaar_mesh_requests_total" => {
            let edge = format!("{} → {}", short(&label("caller")), label("callee"));
            if label("outcome") == "error" {
                sum(&mut sample.mesh_errors, edge.clone());
            }
            sum(&mut sample.mesh_requests, edge);
        }
        "bazaar_mesh_refusals_total" => sum(
            &mut sample.mesh_refusals,
            format!("{} → {}", short(&label("caller")), label("callee")),
        ),
        "bazaar_breaker_state" => {
            let state = match m.value as i64 {
                0 => "closed",
                1 => "half-open",
                _ => "open",
            };
            status.breakers.push(format!("{}: {state}", label("breaker")));
        }
        _ => {}
    }
}

/// Adds `count` to the cumulative bucket `le` (`+Inf` for the last) of `buckets`, kept in
/// order of their bounds.
fn add_bucket(buckets: &mut Vec<(f64, f64)>, le: &str, count: f64) {
    let le = match le {
        "+Inf" => f64::INFINITY,
        le => le.parse().unwrap_or(f64::INFINITY),
    };
    match buckets.iter_mut().find(|(b, _)| *b == le) {
        Some(bucket) => bucket.1 += count,
        None => {
            buckets.push((le, count));
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
}

/// `spiffe://bazaar/role/orders` as `orders`.
fn short(identity: &str) -> String {
    identity.rsplit('/').next().unwrap_or(identity).to_string()
}

/// Per-second rates of `key`'s counter between consecutive samples.
pub fn rates(samples: &VecDeque<Sample>, pick: impl Fn(&Sample) -> f64) -> Vec<f64> {
    samples
        .iter()
        .zip(samples.iter().skip(1))
        .map(|(a, b)| {
            let dt = (b.at - a.at).max(0.001);
            // A restarted instance starts its counters again: count nothing rather than less.
            ((pick(b) - pick(a)) / dt).max(0.0)
        })
        .collect()
}

/// The `q` quantile (0..1) of what a histogram recorded between two readings of its
/// cumulative buckets, `before` and `after` (the bucket's upper bound, as Prometheus
/// estimates without interpolation); `None` when nothing was recorded.
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let count = |le: f64| before.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
    let deltas: Vec<(f64, f64)> = after.iter().map(|&(le, c)| (le, (c - count(le)).max(0.0))).collect();
    let total = deltas.iter().map(|(_, c)| *c).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    deltas
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| if le.is_finite() { *le } else { 10.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_lines_are_read_with_their_labels() {
        let text = "# HELP x\nbazaar_consumer_lag{topic=\"orders.saga-replies\",group=\"orders\"} 3\nbazaar_outbox_unsent 2\nbroken line\n";
        let m = parse(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].labels["group"], "orders");
        assert_eq!(m[0].value, 3.0);
        assert_eq!(m[1].name, "bazaar_outbox_unsent");
    }

    fn sample(at: f64, buckets: &[(f64, f64)], confirmed: f64) -> Sample {
        Sample {
            at,
            saga_buckets: buckets.to_vec(),
            finished: BTreeMap::from([("confirmed".to_string(), confirmed)]),
            ..Sample::default()
        }
    }

    #[test]
    fn rates_and_percentiles_come_from_what_changed_between_samples() {
        let a = sample(0.0, &[(0.1, 10.0), (0.5, 10.0), (f64::INFINITY, 10.0)], 10.0);
        let b = sample(2.0, &[(0.1, 19.0), (0.5, 20.0), (f64::INFINITY, 20.0)], 20.0);
        let samples = VecDeque::from([a.clone(), b.clone()]);
        assert_eq!(rates(&samples, |s| s.finished["confirmed"]), [5.0]);
        assert_eq!(quantile(&a.saga_buckets, &b.saga_buckets, 0.5), Some(0.1));
        assert_eq!(quantile(&a.saga_buckets, &b.saga_buckets, 0.99), Some(0.5));
        assert_eq!(quantile(&b.saga_buckets, &b.saga_buckets, 0.5), None);
    }
}
