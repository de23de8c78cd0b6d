//! `bazaar-gateway`: a reverse proxy configured by a Kong DB-less file (`_format_version: "3.0"`).
//!
//! It routes requests to services as Kong's router does, runs the `jwt`, `rate-limiting`,
//! `correlation-id`, `request-size-limiting` and `cors` plugins with Kong's precedence, headers
//! and error bodies, balances over upstream targets with active and passive health checks,
//! and reloads its config on SIGHUP or when the file changes. A second, private listener
//! serves `/health`, `/health/live`, `/metrics`, `/status` and `/config`.
//!
//! The `bazaar` binary calls [`serve`]; tests that need port 0 call [`serve_with_listeners`].
//!
//! Module map: `config` parses and checks the file; `router` picks routes; `plugins`
//! holds one file per plugin; `balancer` owns upstreams and health; `proxy` is the request
//! path; `admin` the operator endpoints; `state` the swappable snapshot; `server` the accept
//! loops and reload watcher.

#![warn(missing_docs)]

mod admin;
mod balancer;
mod config;
mod defaults;
mod edge;
mod keys;
mod loaded;
mod outgoing;
mod plugins;
mod pool;
mod proxy;
mod real_ip;
mod request_metrics;
mod response;
mod retry_budget;
mod router;
mod server;
mod state;
mod tls;
mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::ConfigProblems;
pub use defaults::{default_config, DefaultMesh, DefaultRoute, CLIENT_LIMITS, CREDENTIAL_LIMITS, GENERATED_MARKER};
pub use edge::{AccessEntry, Document, Edge};
pub use real_ip::TrustedProxies;
pub use server::{default_workers, serve_draining, serve_with_listeners};

/// What the gateway needs to run.
pub struct GatewayOptions {
    /// The declarative config file (YAML or JSON); re-read on SIGHUP and when it changes.
    pub config_path: PathBuf,
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where operators connect (`/health`, `/metrics`, `/status`, `/config`).
    pub admin_listen: SocketAddr,
    /// Renders Prometheus text for `/metrics`; the binary owns the recorder behind the
    /// `metrics` facade the gateway records into.
    pub render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    /// Proxies to believe, and documents served beside the routes.
    pub edge: Edge,
    /// Threads serving proxied connections (see [`default_workers`]).
    pub workers: usize,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The config file is missing or invalid; every problem is listed with its location.
    #[error("gateway config {} is invalid:\n  {}", path.display(), problems.lines().join("\n  "))]
    Config {
        /// The file that was read.
        path: PathBuf,
        /// One line per problem, e.g. `routes[2].paths[0]: must start with /`.
        problems: ConfigProblems,
    },
    /// The worker threads could not be started.
    #[error("cannot start the gateway's worker threads: {0}")]
    Workers(std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
}

/// Binds both listeners and serves until `shutdown` completes, then stops accepting and lets
/// in-flight requests finish (up to a drain deadline).
pub async fn serve(
    opts: GatewayOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })
    };
    // Check the config before binding so a bad file fails fast without taking the ports.
    loaded::load_file(&opts.config_path).map_err(|problems| GatewayError::Config {
        path: opts.config_path.clone(),
        problems,
    })?;
    let proxy = bind(opts.listen).await?;
    let admin = bind(opts.admin_listen).await?;
    serve_draining(
        opts.config_path,
        proxy,
        admin,
        opts.render_metrics,
        shutdown,
        std::time::Duration::ZERO,
        opts.edge,
        opts.workers,
    )
    .await
}

/// Checks a config file without serving it: a summary such as
/// `"5 services, 9 routes, 1 consumer, 3 plugins"`, or every problem with its location.
pub fn check_config_file(path: &Path) -> Result<String, ConfigProblems> {
    loaded::load_file(path).map(|loaded| loaded.config.summary())
}

/// The metrics the gateway records, each with the help text `/metrics` gives it.
pub const METRICS: &[(&str, &str)] = &[
    (
        "bazaar_gateway_requests_total",
        "Requests the gateway answered, by service, route and status.",
    ),
    (
        "bazaar_gateway_request_duration_seconds",
        "Time to answer a request through the gateway, in seconds, by service.",
    ),
    (
        "bazaar_gateway_rate_limited_total",
        "Requests refused with 429 by the rate-limiting plugin, by service.",
    ),
    (
        "bazaar_gateway_upstream_errors_total",
        "Requests no upstream answered (refused, reset or timed out), by service.",
    ),
    (
        "bazaar_gateway_retries_refused_total",
        "Retries not made because the service's retry budget was spent, by service.",
    ),
    (
        "bazaar_gateway_slow_clients_total",
        "Connections closed because the client sent too slowly, by phase.",
    ),
    (
        "bazaar_gateway_connection_cap_reached_total",
        "Times the gateway held a new connection because its cap of open connections was reached.",
    ),
];

/// Gives each of [`METRICS`] its help text in this process's `/metrics`.
pub fn describe_metrics() {
    for &(name, help) in METRICS {
        // The exporter keeps one help text per name, whatever the metric's kind.
        metrics::describe_gauge!(name, help);
    }
}
