//! What the gateway serves from: an immutable [`Snapshot`] of one loaded config, swapped whole
//! on reload, and the [`Shared`] state that outlives snapshots (rate-limit counts, HTTP client
//! pools, connection statistics).
//!
//! A request takes the current snapshot once (a read lock held for an `Arc` clone) and uses it
//! to the end, so a reload never mixes two configs within one request.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::balancer::{Balancers, HttpClient, UpstreamBalancer};
use crate::config::{Config, ServiceTls};
use crate::loaded::Loaded;
use crate::plugins::jwt::{Credentials, JwksRoute};
use crate::plugins::rate_limit::Limiter;
use crate::plugins::PluginSet;
use crate::pool::Pool;
use crate::router::Router;
use crate::tls::{UpstreamConnector, UpstreamTls};

/// How long an idle pooled upstream connection is kept. Kong keeps 60 s, but bazaar's
/// services close idle connections after 10 s, and a request sent on a connection the
/// upstream is closing fails without a safe retry; 5 s stays clear of that.
const UPSTREAM_IDLE: Duration = Duration::from_secs(5);

/// How a service is reached.
#[derive(Debug)]
pub(crate) struct ServiceRuntime {
    /// Upstream connection pools applying this service's connect timeout and TLS, one per
    /// worker so an upstream connection serves only the thread that opened it.
    pub pools: Box<[Arc<Pool>]>,
    /// A client with the same settings for the gateway's own requests (JWKS).
    pub client: HttpClient,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The upstream to balance over, when the service's host names one.
    pub upstream: Option<Arc<UpstreamBalancer>>,
    /// `host:port` for a service that names a host directly.
    pub address: String,
    /// The Host header sent upstream unless the route preserves the client's.
    pub host_header: HeaderValue,
}

impl ServiceRuntime {
    /// The calling worker's pool.
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pools[crate::workers::current() % self.pools.len()]
    }
}

/// One loaded config, compiled for serving.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub plugins: PluginSet,
    pub credentials: Credentials,
    pub balancers: Balancers,
    pub services: Vec<ServiceRuntime>,
    pub request_metrics: crate::request_metrics::RequestMetrics,
    pub loaded_at: SystemTime,
}

/// Connection and request counters for `/status`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub connections_accepted: AtomicU64,
    pub connections_handled: AtomicU64,
    pub connections_active: AtomicU64,
    pub requests_total: AtomicU64,
    pub requests_in_flight: AtomicU64,
}

/// Decrements a gauge-like counter when dropped, so early returns cannot leak a count.
pub(crate) struct CountGuard<'a>(&'a AtomicU64);

impl<'a> CountGuard<'a> {
    /// Increments `counter` until the guard is dropped.
    pub fn new(counter: &'a AtomicU64) -> CountGuard<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        CountGuard(counter)
    }
}

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Renders the Prometheus text for `/metrics`; supplied by the binary, which owns the recorder.
pub(crate) type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// State shared by every connection for the gateway's whole life.
pub(crate) struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    pub limiter: Limiter,
    /// Upstream connections, reused across reloads so keep-alive connections to upstreams
    /// survive them.
    connections: Connections,
    /// How many workers serve proxied connections.
    workers: usize,
    pub stats: Stats,
    pub started: Instant,
    pub config_path: PathBuf,
    pub render_metrics: RenderMetrics,
    /// Set when the gateway is about to stop: responses ask clients to close their
    /// connections, so none is cut under a request they are sending.
    pub draining: std::sync::atomic::AtomicBool,
    /// How many failed upstream attempts may still be retried.
    pub retries: crate::retry_budget::RetryBudget,
    /// Proxies whose `X-Forwarded-For` names the client, and the documents served beside
    /// the routes.
    pub edge: crate::Edge,
}

impl Shared {
    /// Loads the first config; fails if it is invalid.
    pub fn new(
        loaded: Loaded,
        config_path: PathBuf,
        render_metrics: RenderMetrics,
        edge: crate::Edge,
        workers: usize,
    ) -> Arc<Shared> {
        let connections = Connections::default();
        let snapshot = Arc::new(build_snapshot(loaded, None, &connections, workers));
        Arc::new(Shared {
            snapshot: RwLock::new(snapshot),
            limiter: Limiter::default(),
            connections,
            workers,
            stats: Stats::default(),
            started: Instant::now(),
            config_path,
            render_metrics,
            draining: std::sync::atomic::AtomicBool::new(false),
            retries: Default::default(),
            edge,
        })
    }

    /// The config in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        // A poisoned lock still holds a complete snapshot: swaps are a single assignment.
        self.snapshot.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts a new config in force; requests already running finish on the old one.
    pub fn install(&self, loaded: Loaded) {
        let previous = self.snapshot();
        let next = Arc::new(build_snapshot(
            loaded,
            Some(&previous.balancers),
            &self.connections,
            self.workers,
        ));
        *self.snapshot.write().unwrap_or_else(|e| e.into_inner()) = next;
    }
}

/// Clients and pools by connect timeout and TLS settings (and worker, for pools).
#[derive(Default)]
struct Connections {
    clients: Mutex<HashMap<String, HttpClient>>,
    pools: Mutex<HashMap<String, Arc<Pool>>>,
}

/// The key of clients and pools with these settings.
fn settings_key(connect_timeout_ms: u64, tls: Option<&Arc<UpstreamTls>>) -> String {
    format!("{connect_timeout_ms}|{}", tls.map_or("", |t| t.fingerprint.as_str()))
}

/// Opens TCP connections within `connect_timeout_ms`, adding `tls` for https.
fn connector(connect_timeout_ms: u64, tls: Option<Arc<UpstreamTls>>) -> UpstreamConnector {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_millis(connect_timeout_ms)));
    connector.set_nodelay(true);
    UpstreamConnector::new(connector, tls)
}

/// Compiles a config and starts its health probes.
///
/// One piece: one snapshot built under the clients and pools locks; services take balancers
/// and pooled clients, probes reuse those clients, and the JWKS route closure looks up
/// `services` by the position of each service in the same config.
fn build_snapshot(loaded: Loaded, previous: Option<&Balancers>, connections: &Connections, workers: usize) -> Snapshot {
    let Loaded { config, plugins } = loaded;
    let mut clients = connections.clients.lock().unwrap_or_else(|e| e.into_inner());
    let mut pools = connections.pools.lock().unwrap_or_else(|e| e.into_inner());
    let mut client_for = |connect_timeout_ms: u64, tls: Option<Arc<UpstreamTls>>| {
        clients
            .entry(settings_key(connect_timeout_ms, tls.as_ref()))
            .or_insert_with(|| {
                Client::builder(TokioExecutor::new())
                    .pool_idle_timeout(UPSTREAM_IDLE)
                    .build(connector(connect_timeout_ms, tls))
            })
            .clone()
    };
    let mut pool_for = |worker: usize, scheme: &'static str, connect_timeout_ms: u64, tls: Option<Arc<UpstreamTls>>| {
        // An https service whose TLS could not be set up keeps failing its connects rather
        // than share a plain pool.
        let key = format!("{worker}|{scheme}|{}", settings_key(connect_timeout_ms, tls.as_ref()));
        pools
            .entry(key)
            .or_insert_with(|| Pool::new(connector(connect_timeout_ms, tls), scheme, UPSTREAM_IDLE))
            .clone()
    };
    let balancers = Balancers::build(&config, previous);
    let mut probe_clients: HashMap<String, (HttpClient, &'static str)> = HashMap::new();
    let services: Vec<ServiceRuntime> = config
        .services
        .iter()
        .map(|s| {
            let upstream = balancers.get(&s.host).cloned();
            let address = format!("{}:{}", s.host, s.port);
            // Kong sends the upstream's name as Host when balancing, else host[:port].
            let default_port = if s.tls.is_some() { 443 } else { 80 };
            let host_text = if upstream.is_some() || s.port == default_port {
                s.host.clone()
            } else {
                address.clone()
            };
            let tls = s.tls.as_ref().and_then(|tls| upstream_tls(&config, &s.host, tls));
            let scheme = if s.tls.is_some() { "https" } else { "http" };
            let pools = (0..workers.max(1))
                .map(|worker| pool_for(worker, scheme, s.connect_timeout_ms, tls.clone()))
                .collect();
            let client = client_for(s.connect_timeout_ms, tls.clone());
            if upstream.is_some() {
                // Probes reach an upstream's targets as its services do.
                probe_clients
                    .entry(s.host.clone())
                    .or_insert_with(|| (client_for(1000, tls), scheme));
            }
            ServiceRuntime {
                pools,
                client,
                scheme,
                upstream,
                address,
                host_header: HeaderValue::from_str(&host_text).unwrap_or(HeaderValue::from_static("localhost")),
            }
        })
        .collect();
    balancers.start_probes(&client_for(1000, None), &probe_clients);
    Snapshot {
        router: Router::build(&config),
        plugins,
        credentials: Credentials::build_with(&config, |uri| {
            let https = uri.scheme_str() == Some("https");
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let index = config
                .services
                .iter()
                .position(|s| Some(s.host.as_str()) == uri.host() && s.port == port && s.tls.is_some() == https)?;
            let service: &ServiceRuntime = &services[index];
            Some(JwksRoute {
                client: service.client.clone(),
                scheme: service.scheme,
                upstream: service.upstream.clone(),
                address: service.address.clone(),
            })
        }),
        balancers,
        services,
        request_metrics: crate::request_metrics::RequestMetrics::new(&config),
        loaded_at: SystemTime::now(),
        config,
    }
}

/// The client TLS of an https service reaching `host`; config checking already reported
/// anything that keeps it from being built, so a failure here only logs.
fn upstream_tls(config: &Config, host: &str, tls: &ServiceTls) -> Option<Arc<UpstreamTls>> {
    let client = tls.client_certificate.map(|i| {
        (
            config.certificates[i].cert.as_str(),
            config.certificates[i].key.as_str(),
        )
    });
    let roots: Vec<&str> = tls
        .ca_certificates
        .iter()
        .map(|i| config.ca_certificates[*i].cert.as_str())
        .collect();
    match UpstreamTls::new(host, client, &roots, tls.verify) {
        Ok(tls) => Some(Arc::new(tls)),
        Err(e) => {
            tracing::error!(host, error = %e, "cannot set up TLS to the upstream");
            None
        }
    }
}
