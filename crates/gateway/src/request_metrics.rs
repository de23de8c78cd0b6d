//! The gateway's request counters and duration histogram, one set per route, made once and
//! kept: the proxy records into them, and each config snapshot holds its own.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;

/// The request counters and duration histogram of each route, looked up once per status and
/// kept, so a request does not build, hash and find its label set in the registry.
#[derive(Debug)]
pub(crate) struct RequestMetrics {
    /// One per route, then one for requests no route matched.
    routes: Box<[RouteMetrics]>,
}

#[derive(Debug)]
pub(crate) struct RouteMetrics {
    service: Arc<str>,
    route: Arc<str>,
    /// Counters for the statuses of [`COMMON_STATUSES`], in its order.
    counts: [OnceLock<metrics::Counter>; COMMON_STATUSES.len()],
    duration: OnceLock<metrics::Histogram>,
}

impl RequestMetrics {
    /// Handles for `config`'s routes, made on first use.
    pub fn new(config: &crate::config::Config) -> RequestMetrics {
        let route = |service: Option<usize>, route: &str| RouteMetrics {
            service: service.map_or_else(|| Arc::from(""), |i| config.services[i].name.clone()),
            route: Arc::from(route),
            counts: Default::default(),
            duration: OnceLock::new(),
        };
        let routes = config
            .routes
            .iter()
            .map(|r| route(r.service, &r.name))
            .chain(std::iter::once(route(None, "")))
            .collect();
        RequestMetrics { routes }
    }

    pub fn for_route(&self, route: Option<usize>) -> &RouteMetrics {
        let unmatched = self.routes.len() - 1;
        &self.routes[route.unwrap_or(unmatched).min(unmatched)]
    }
}

impl RouteMetrics {
    pub fn record(&self, status: StatusCode, elapsed: Duration) {
        let count = |status: metrics::SharedString| metrics::counter!("bazaar_gateway_requests_total", "service" => self.service.clone(), "route" => self.route.clone(), "status" => status);
        match COMMON_STATUSES
            .iter()
            .position(|s| s.as_bytes() == status.as_str().as_bytes())
        {
            Some(i) => self.counts[i]
                .get_or_init(|| count(metrics::SharedString::const_str(COMMON_STATUSES[i])))
                .increment(1),
            None => count(metrics::SharedString::from(status.as_str().to_owned())).increment(1),
        }
        self.duration
            .get_or_init(
                || metrics::histogram!("bazaar_gateway_request_duration_seconds", "service" => self.service.clone()),
            )
            .record(elapsed.as_secs_f64());
    }
}

/// Statuses whose counters are kept (the rest are looked up each time).
const COMMON_STATUSES: [&str; 16] = [
    "200", "201", "202", "204", "301", "302", "304", "400", "401", "403", "404", "409", "429", "500", "502", "503",
];
