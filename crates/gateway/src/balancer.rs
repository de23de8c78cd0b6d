//! Upstreams: spreading a service's traffic over targets, and keeping track of their health.
//!
//! A service whose host names an upstream is sent to one of the upstream's healthy targets,
//! picked by weighted round-robin, least connections or consistent hashing. Health comes from
//! two sources, as in Kong: active probes (a background task calls `http_path` on every target)
//! and passive observation (the outcome of proxied requests). Each counts successes and
//! failures against its own thresholds; crossing one flips the target. Health survives config
//! reloads for targets that stay.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::client::legacy::Client;

use crate::config::{Algorithm, Config, HealthyThresholds, UnhealthyThresholds};

/// The HTTP client used both for proxying and for probes (plain or TLS per connector).
pub(crate) type HttpClient = Client<crate::tls::UpstreamConnector, crate::outgoing::OutgoingBody>;

/// What happened when a target was used or probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The target answered with this status.
    Status(u16),
    /// The connection failed.
    TcpFailure,
    /// The target did not answer in time.
    Timeout,
}

/// One target and its health counters.
#[derive(Debug)]
pub(crate) struct TargetState {
    /// `host:port`.
    pub address: String,
    weight: u32,
    healthy: AtomicBool,
    /// Requests in flight, for least-connections.
    active: AtomicUsize,
    successes: AtomicU32,
    http_failures: AtomicU32,
    tcp_failures: AtomicU32,
    timeouts: AtomicU32,
}

impl TargetState {
    /// Whether the target takes traffic.
    pub fn is_healthy(&self) -> bool {
        self.weight > 0 && self.healthy.load(Ordering::Relaxed)
    }

    fn reset_failures(&self) {
        self.http_failures.store(0, Ordering::Relaxed);
        self.tcp_failures.store(0, Ordering::Relaxed);
        self.timeouts.store(0, Ordering::Relaxed);
    }

    /// Applies one observation against a set of thresholds (active or passive).
    fn record(&self, outcome: Outcome, healthy: &HealthyThresholds, unhealthy: &UnhealthyThresholds) -> Option<bool> {
        let bump = |counter: &AtomicU32, threshold: u32| {
            self.successes.store(0, Ordering::Relaxed);
            let count = counter.fetch_add(1, Ordering::Relaxed) + 1;
            threshold > 0 && count >= threshold
        };
        let trips = match outcome {
            Outcome::TcpFailure => bump(&self.tcp_failures, unhealthy.tcp_failures),
            Outcome::Timeout => bump(&self.timeouts, unhealthy.timeouts),
            Outcome::Status(s) if listed(&unhealthy.http_statuses, s) => {
                bump(&self.http_failures, unhealthy.http_failures)
            }
            Outcome::Status(s) if listed(&healthy.http_statuses, s) => {
                self.reset_failures();
                let count = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
                if healthy.successes > 0 && count >= healthy.successes && !self.healthy.swap(true, Ordering::Relaxed) {
                    self.successes.store(0, Ordering::Relaxed);
                    return Some(true);
                }
                return None;
            }
            Outcome::Status(_) => return None,
        };
        if trips && self.healthy.swap(false, Ordering::Relaxed) {
            self.reset_failures();
            return Some(false);
        }
        None
    }
}

/// One upstream's targets, how to choose among them, and how to judge them.
#[derive(Debug)]
pub(crate) struct UpstreamBalancer {
    pub name: String,
    algorithm: Algorithm,
    checks: crate::config::HealthchecksSpec,
    pub targets: Vec<TargetState>,
    /// Round-robin order: target indices repeated by weight, interleaved.
    wheel: Vec<usize>,
    cursor: AtomicUsize,
}

/// Holds a target's in-flight count up until the response has been streamed.
#[derive(Debug)]
pub(crate) struct TargetGuard {
    balancer: Arc<UpstreamBalancer>,
    /// Index of the chosen target.
    pub index: usize,
}

impl TargetGuard {
    /// The chosen target's `host:port`.
    pub fn address(&self) -> &str {
        &self.balancer.targets[self.index].address
    }

    /// Reports how a proxied request to this target went (passive health checks).
    pub fn report(&self, outcome: Outcome) {
        let passive = &self.balancer.checks.passive;
        if let Some(now_healthy) =
            self.balancer.targets[self.index].record(outcome, &passive.healthy, &passive.unhealthy)
        {
            log_flip(&self.balancer.name, self.address(), now_healthy, "passive");
        }
    }
}

impl Drop for TargetGuard {
    fn drop(&mut self) {
        self.balancer.targets[self.index].active.fetch_sub(1, Ordering::Relaxed);
    }
}

fn listed(statuses: &Option<Vec<u16>>, status: u16) -> bool {
    statuses.as_ref().is_some_and(|list| list.contains(&status))
}

fn log_flip(upstream: &str, target: &str, healthy: bool, source: &str) {
    if healthy {
        tracing::info!(upstream, target, source, "target is healthy again");
    } else {
        tracing::warn!(upstream, target, source, "target marked unhealthy");
    }
}

impl UpstreamBalancer {
    fn new(upstream: &crate::config::Upstream, previous: Option<&UpstreamBalancer>) -> UpstreamBalancer {
        let targets: Vec<TargetState> = upstream
            .targets
            .iter()
            .map(|t| {
                let was_healthy = previous
                    .and_then(|p| p.targets.iter().find(|old| old.address == t.address))
                    .is_none_or(|old| old.healthy.load(Ordering::Relaxed));
                TargetState {
                    address: t.address.clone(),
                    weight: t.weight,
                    healthy: AtomicBool::new(was_healthy),
                    active: AtomicUsize::new(0),
                    successes: AtomicU32::new(0),
                    http_failures: AtomicU32::new(0),
                    tcp_failures: AtomicU32::new(0),
                    timeouts: AtomicU32::new(0),
                }
            })
            .collect();
        let wheel = build_wheel(&targets.iter().map(|t| t.weight).collect::<Vec<_>>());
        UpstreamBalancer {
            name: upstream.name.clone(),
            algorithm: upstream.algorithm.clone(),
            checks: upstream.healthchecks.clone(),
            targets,
            wheel,
            cursor: AtomicUsize::new(0),
        }
    }

    /// How many targets take traffic.
    pub fn healthy_count(&self) -> usize {
        self.targets.iter().filter(|t| t.is_healthy()).count()
    }

    /// Chooses a healthy target, avoiding those already tried when another is available.
    /// `hash_input` feeds consistent hashing (the header value or the client IP).
    pub fn pick(self: &Arc<Self>, hash_input: &str, tried: &[usize]) -> Option<TargetGuard> {
        let index = self
            .choose(hash_input, tried)
            .or_else(|| self.choose(hash_input, &[]))?;
        self.targets[index].active.fetch_add(1, Ordering::Relaxed);
        Some(TargetGuard {
            balancer: self.clone(),
            index,
        })
    }

    fn choose(&self, hash_input: &str, tried: &[usize]) -> Option<usize> {
        let usable = |i: usize| self.targets[i].is_healthy() && !tried.contains(&i);
        match &self.algorithm {
            Algorithm::RoundRobin => {
                if self.wheel.is_empty() {
                    return None;
                }
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..self.wheel.len())
                    .map(|k| self.wheel[(start + k) % self.wheel.len()])
                    .find(|&i| usable(i))
            }
            Algorithm::LeastConnections => (0..self.targets.len()).filter(|&i| usable(i)).min_by(|&a, &b| {
                // Compare active/weight without division: a.active * b.weight vs b.active * a.weight.
                let load = |x: usize, y: usize| {
                    self.targets[x].active.load(Ordering::Relaxed) as u64 * self.targets[y].weight as u64
                };
                load(a, b).cmp(&load(b, a))
            }),
            Algorithm::ConsistentHashing { .. } => (0..self.targets.len()).filter(|&i| usable(i)).max_by(|&a, &b| {
                rendezvous_score(hash_input, &self.targets[a])
                    .total_cmp(&rendezvous_score(hash_input, &self.targets[b]))
            }),
        }
    }

    /// The header consistent hashing reads, if any.
    pub fn hash_header(&self) -> Option<&str> {
        match &self.algorithm {
            Algorithm::ConsistentHashing { header } => header.as_deref(),
            _ => None,
        }
    }

    /// Whether the hash input matters at all (avoids computing it otherwise).
    pub fn uses_hash(&self) -> bool {
        matches!(self.algorithm, Algorithm::ConsistentHashing { .. })
    }
}

/// Weighted rendezvous hashing: each (key, target) pair gets a score; the highest wins, so a
/// key moves only when its own target goes away.
fn rendezvous_score(key: &str, target: &TargetState) -> f64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    target.address.hash(&mut hasher);
    // Map the hash into (0, 1) and weigh it: score = -w / ln(u).
    let unit = ((hasher.finish() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -(target.weight as f64) / unit.ln()
}

/// Round-robin order for the given weights: each target appears in proportion to its weight,
/// spread out rather than in runs (target i's k-th slot sits at (k + ½) / weight).
fn build_wheel(weights: &[u32]) -> Vec<usize> {
    let divisor = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd).max(1);
    let mut reduced: Vec<u32> = weights.iter().map(|w| w / divisor).collect();
    let total: u32 = reduced.iter().sum();
    // Keep the wheel small; proportions survive to within a percent.
    if total > 1000 {
        for (r, w) in reduced.iter_mut().zip(weights) {
            *r = if *w == 0 {
                0
            } else {
                ((*r as u64 * 1000 / total as u64) as u32).max(1)
            };
        }
    }
    let mut slots: Vec<(f64, usize)> = Vec::new();
    for (index, &weight) in reduced.iter().enumerate() {
        for k in 0..weight {
            slots.push(((k as f64 + 0.5) / weight as f64, index));
        }
    }
    slots.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    slots.into_iter().map(|(_, index)| index).collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Every upstream of a config, by name.
#[derive(Debug, Default)]
pub(crate) struct Balancers {
    by_name: HashMap<String, Arc<UpstreamBalancer>>,
}

impl Balancers {
    /// Builds the balancers, carrying target health over from the previous config.
    pub fn build(config: &Config, previous: Option<&Balancers>) -> Balancers {
        let by_name = config
            .upstreams
            .iter()
            .map(|u| {
                let old = previous.and_then(|p| p.by_name.get(&u.name)).map(|b| b.as_ref());
                (u.name.clone(), Arc::new(UpstreamBalancer::new(u, old)))
            })
            .collect();
        Balancers { by_name }
    }

    /// The upstream with this name, if the name is one.
    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamBalancer>> {
        self.by_name.get(name)
    }

    /// All upstreams, for health reporting.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<UpstreamBalancer>> {
        self.by_name.values()
    }

    /// Starts one active prober per upstream that asks for one. Each task holds only a weak
    /// reference, so it ends by itself once a reload or shutdown drops the balancer.
    /// Starts the active probes; an upstream that https services use is probed over TLS
    /// with their client (`by_upstream`), others with `plain`.
    pub fn start_probes(&self, plain: &HttpClient, by_upstream: &HashMap<String, (HttpClient, &'static str)>) {
        for (name, balancer) in &self.by_name {
            let active = &balancer.checks.active;
            if active.healthy.interval > 0.0 || active.unhealthy.interval > 0.0 {
                let (client, scheme) = by_upstream.get(name).cloned().unwrap_or((plain.clone(), "http"));
                tokio::spawn(probe_loop(Arc::downgrade(balancer), client, scheme));
            }
        }
    }
}

async fn probe_loop(balancer: Weak<UpstreamBalancer>, client: HttpClient, scheme: &'static str) {
    let mut next_due: Vec<Instant> = Vec::new();
    loop {
        let Some(upstream) = balancer.upgrade() else { return };
        let active = upstream.checks.active.clone();
        let interval = |healthy: bool| {
            let secs = if healthy {
                active.healthy.interval
            } else {
                active.unhealthy.interval
            };
            (secs > 0.0).then(|| Duration::from_secs_f64(secs))
        };
        next_due.resize(upstream.targets.len(), Instant::now());
        let now = Instant::now();
        for (index, target) in upstream.targets.iter().enumerate() {
            let healthy = target.healthy.load(Ordering::Relaxed);
            let Some(every) = interval(healthy) else { continue };
            if next_due[index] > now {
                continue;
            }
            next_due[index] = now + every;
            let outcome = probe(&client, scheme, &target.address, &active.http_path, active.timeout).await;
            if let Some(flipped) = target.record(outcome, &active.healthy, &active.unhealthy) {
                log_flip(&upstream.name, &target.address, flipped, "active");
            }
        }
        let tick = [interval(true), interval(false)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(Duration::from_secs(1));
        drop(upstream);
        tokio::time::sleep(tick.min(Duration::from_secs(1))).await;
    }
}

async fn probe(client: &HttpClient, scheme: &str, address: &str, path: &str, timeout_secs: f64) -> Outcome {
    let Ok(request) = http::Request::get(format!("{scheme}://{address}{path}"))
        .header(http::header::USER_AGENT, "bazaar-gateway health check")
        .body(crate::outgoing::OutgoingBody::new(Bytes::new()))
    else {
        return Outcome::TcpFailure;
    };
    match tokio::time::timeout(
        Duration::from_secs_f64(timeout_secs.max(0.001)),
        client.request(request),
    )
    .await
    {
        Ok(Ok(response)) => Outcome::Status(response.status().as_u16()),
        Ok(Err(_)) => Outcome::TcpFailure,
        Err(_) => Outcome::Timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn balancer(yaml_targets: &str, algorithm: &str) -> Arc<UpstreamBalancer> {
        let text = format!(
            "_format_version: \"3.0\"\nupstreams:\n  - name: u\n    algorithm: {algorithm}\n    healthchecks:\n      passive:\n        unhealthy: {{tcp_failures: 2}}\n    targets: {yaml_targets}\n"
        );
        let config = Config::parse(&text).unwrap();
        Balancers::build(&config, None).get("u").unwrap().clone()
    }

    #[test]
    fn round_robin_follows_weights() {
        let b = balancer(
            "[{target: 'a:1', weight: 300}, {target: 'b:1', weight: 100}]",
            "round-robin",
        );
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[b.pick("", &[]).unwrap().index] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn passive_failures_take_a_target_out() {
        let b = balancer("[{target: 'a:1'}, {target: 'b:1'}]", "round-robin");
        let guard = b.pick("", &[]).unwrap();
        let bad = guard.index;
        guard.report(Outcome::TcpFailure);
        assert_eq!(b.healthy_count(), 2);
        guard.report(Outcome::TcpFailure);
        assert_eq!(b.healthy_count(), 1);
        for _ in 0..5 {
            assert_ne!(b.pick("", &[]).unwrap().index, bad);
        }
        let other = b.pick("", &[]).unwrap();
        other.report(Outcome::TcpFailure);
        other.report(Outcome::TcpFailure);
        drop(other);
        assert!(b.pick("", &[]).is_none());
    }

    #[test]
    fn retries_avoid_tried_targets() {
        let b = balancer("[{target: 'a:1'}, {target: 'b:1'}]", "round-robin");
        let first = b.pick("", &[]).unwrap().index;
        assert_ne!(b.pick("", &[first]).unwrap().index, first);
    }

    #[test]
    fn least_connections_prefers_idle_targets() {
        let b = balancer("[{target: 'a:1'}, {target: 'b:1'}]", "least-connections");
        let held = b.pick("", &[]).unwrap();
        for _ in 0..3 {
            assert_ne!(b.pick("", &[]).unwrap().index, held.index);
        }
    }

    #[test]
    fn consistent_hashing_is_sticky() {
        let b = balancer(
            "[{target: 'a:1'}, {target: 'b:1'}, {target: 'c:1'}]",
            "consistent-hashing",
        );
        let first = b.pick("user-42", &[]).unwrap().index;
        for _ in 0..10 {
            assert_eq!(b.pick("user-42", &[]).unwrap().index, first);
        }
        let spread: std::collections::HashSet<usize> = (0..50)
            .map(|i| b.pick(&format!("user-{i}"), &[]).unwrap().index)
            .collect();
        assert_eq!(spread.len(), 3);
    }
}
