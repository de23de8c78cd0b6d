//! The admin listener: health, metrics, status and the loaded config, for operators only.
//!
//! It listens on its own address so it can stay private while the proxy port is public.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use serde_json::json;

use crate::response::{self, ProxyBody};
use crate::state::Shared;

/// Answers one admin request.
pub(crate) fn handle<B>(shared: &Arc<Shared>, request: &Request<B>) -> Response<ProxyBody> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return response::message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
    }
    match request.uri().path() {
        "/health" => health(shared),
        "/health/live" => response::json(StatusCode::OK, &json!({ "status": "alive" })),
        "/metrics" => {
            let mut out = Response::new(response::full((shared.render_metrics)()));
            out.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            out
        }
        "/status" => status(shared),
        "/config" => config(shared),
        _ => response::message(StatusCode::NOT_FOUND, "Not found"),
    }
}

/// `healthy` with 200 unless an upstream has no healthy target (then `degraded`, 503).
fn health(shared: &Shared) -> Response<ProxyBody> {
    let snapshot = shared.snapshot();
    let mut upstreams = serde_json::Map::new();
    let mut degraded = false;
    for balancer in snapshot.balancers.iter() {
        let healthy = balancer.healthy_count();
        degraded |= healthy == 0;
        let targets: serde_json::Map<String, serde_json::Value> = balancer
            .targets
            .iter()
            .map(|t| {
                (
                    t.address.clone(),
                    json!(if t.is_healthy() { "healthy" } else { "unhealthy" }),
                )
            })
            .collect();
        upstreams.insert(
            balancer.name.clone(),
            json!({
                "status": if healthy == 0 { "down" } else { "up" },
                "healthy_targets": healthy,
                "total_targets": balancer.targets.len(),
                "targets": targets,
            }),
        );
    }
    let body = json!({
        "status": if degraded { "degraded" } else { "healthy" },
        "checks": { "config": "up", "upstreams": upstreams },
        "version": env!("CARGO_PKG_VERSION"),
        "uptime": shared.started.elapsed().as_secs(),
        // Tells processes sharing one listening socket apart (a rollout waits for the new one).
        "pid": std::process::id(),
    });
    response::json(
        if degraded {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        },
        &body,
    )
}

/// Kong's `/status` shape: connection counters, request total, and a DB-less "database".
fn status(shared: &Shared) -> Response<ProxyBody> {
    let stats = &shared.stats;
    let active = stats.connections_active.load(Ordering::Relaxed);
    let writing = stats.requests_in_flight.load(Ordering::Relaxed);
    let body = json!({
        "server": {
            "connections_accepted": stats.connections_accepted.load(Ordering::Relaxed),
            "connections_handled": stats.connections_handled.load(Ordering::Relaxed),
            "connections_active": active,
            "connections_reading": 0,
            "connections_writing": writing,
            "connections_waiting": active.saturating_sub(writing),
            "total_requests": stats.requests_total.load(Ordering::Relaxed),
        },
        "database": { "reachable": true },
    });
    response::json(StatusCode::OK, &body)
}

/// What is loaded: counts and names, never secrets.
fn config(shared: &Shared) -> Response<ProxyBody> {
    let snapshot = shared.snapshot();
    let config = &snapshot.config;
    let names = |items: Vec<String>| serde_json::Value::from(items);
    let body = json!({
        "path": shared.config_path.display().to_string(),
        "loaded_at": snapshot.loaded_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "summary": config.summary(),
        "services": names(config.services.iter().map(|s| s.name.to_string()).collect()),
        "routes": names(config.routes.iter().map(|r| r.name.to_string()).collect()),
        "upstreams": names(config.upstreams.iter().map(|u| u.name.clone()).collect()),
        "consumers": names(config.consumers.iter().map(|c| c.username.clone().or(c.custom_id.clone()).unwrap_or_default()).collect()),
        "plugins": names(config.plugins.iter().filter(|p| p.enabled).map(|p| p.name.clone()).collect()),
    });
    response::json(StatusCode::OK, &body)
}
