//! The proxy path: one client request in, one upstream request out, in Kong's order.
//!
//! Route → correlation id and traceparent → CORS preflight → JWT → size limit → rate limit →
//! read the body → pick a target → send, retrying connect failures on another target → stream
//! the answer back with the plugins' response headers. Every refusal along the way uses Kong's
//! status and body.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::balancer::{Outcome, TargetGuard};
use crate::outgoing::OutgoingBody;
use crate::plugins::rate_limit::Identity;
use crate::plugins::{correlation, cors, jwt, size_limit};
use crate::response::{self, BoxError, ProxyBody};
use crate::router::{self, RouteMatch};
use crate::state::{CountGuard, Shared, Snapshot};

/// The `Via` value the gateway adds both ways.
const VIA: &str = "1.1 bazaar-gateway";

/// Headers that describe one connection, not the message; never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Identity headers only the gateway may set: a client sending them is ignored, so services
/// can trust them.
const CONSUMER_HEADERS: [&str; 5] = [
    "x-consumer-id",
    "x-consumer-username",
    "x-consumer-custom-id",
    "x-credential-identifier",
    "x-anonymous-consumer",
];

/// The two ends of the client connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connection {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

impl Connection {
    /// The client's address: the peer, or whom a trusted proxy says it forwards for.
    fn client(&self, shared: &Shared, headers: &HeaderMap) -> std::net::IpAddr {
        shared.edge.trusted.client(self.peer.ip(), headers)
    }
}

/// What plugins add to the response, whoever produced it (upstream or a refusal).
#[derive(Default)]
struct Decorations {
    service: Option<Arc<str>>,
    route: Option<Arc<str>>,
    correlation: Option<(HeaderName, HeaderValue)>,
    cors: Option<(Arc<cors::CorsConfig>, Option<HeaderValue>)>,
    rate_limit: HeaderMap,
}

/// Serves one proxied request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
    connection: Connection,
) -> Response<ProxyBody> {
    let started = Instant::now();
    shared
        .stats
        .requests_total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let _in_flight = CountGuard::new(&shared.stats.requests_in_flight);
    let snapshot = shared.snapshot();
    let mut decorations = Decorations::default();
    let method = request.method().clone();
    // A clone shares the URI's bytes: the access line costs no copy of the path.
    let uri = request.uri().clone();
    let page = response::wants_page(request.headers());
    let mut response = process(&shared, &snapshot, request, connection, &mut decorations).await;
    if page {
        response = response::as_page(response);
    }

    // One access line per request, carrying the correlation id the services will log too.
    let correlation_id = decorations
        .correlation
        .as_ref()
        .and_then(|(_, v)| v.to_str().ok())
        .unwrap_or("");
    let elapsed = started.elapsed();
    tracing::info!(
        %method,
        path = uri.path(),
        status = response.status().as_u16(),
        service = decorations.service.as_deref().unwrap_or(""),
        us = elapsed.as_micros() as u64,
        correlation_id,
        "proxied"
    );
    let headers = response.headers_mut();
    headers.append(header::VIA, HeaderValue::from_static(VIA));
    if let Some((name, value)) = decorations.correlation {
        headers.insert(name, value);
    }
    if let Some((conf, origin)) = &decorations.cors {
        conf.decorate(origin.as_ref(), headers);
    }
    for (name, value) in &decorations.rate_limit {
        headers.insert(name, value.clone());
    }

    let service = decorations.service.unwrap_or_else(|| Arc::from(""));
    let status = status_label(response.status());
    metrics::counter!("bazaar_gateway_requests_total", "service" => service.clone(), "route" => decorations.route.unwrap_or_else(|| Arc::from("")), "status" => status).increment(1);
    metrics::histogram!("bazaar_gateway_request_duration_seconds", "service" => service).record(elapsed.as_secs_f64());
    response
}

/// The status as a metrics label, without an allocation for the common ones.
fn status_label(status: StatusCode) -> metrics::SharedString {
    const COMMON: [&str; 16] = [
        "200", "201", "202", "204", "301", "302", "304", "400", "401", "403", "404", "409", "429", "500", "502", "503",
    ];
    match COMMON.iter().find(|s| s.as_bytes() == status.as_str().as_bytes()) {
        Some(text) => metrics::SharedString::const_str(text),
        None => metrics::SharedString::from(status.as_str().to_owned()),
    }
}

async fn process(
    shared: &Shared,
    snapshot: &Snapshot,
    request: Request<Incoming>,
    connection: Connection,
    decorations: &mut Decorations,
) -> Response<ProxyBody> {
    let (mut parts, body) = request.into_parts();
    // As Kong does: only a trusted proxy says which scheme the client used (TLS ended in
    // front of the gateway); anyone else's claim is replaced.
    let scheme_from_proxy = shared.edge.trusted.trusts(connection.peer.ip())
        && matches!(
            parts.headers.get("x-forwarded-proto").map(HeaderValue::as_bytes),
            Some(b"https" | b"http")
        );
    if !scheme_from_proxy {
        parts
            .headers
            .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(parts.uri.authority().map(|a| a.as_str()))
        .map(str::to_string);
    let Some(found) = snapshot
        .router
        .find(&parts.method, host.as_deref(), parts.uri.path(), &parts.headers)
    else {
        return shared
            .edge
            .document(&parts.method, parts.uri.path())
            .unwrap_or_else(|| response::message(StatusCode::NOT_FOUND, "no Route matched with those values"));
    };
    let route = &snapshot.config.routes[found.route];
    decorations.route = Some(route.name.clone());
    let Some(service_index) = route.service else {
        return response::message(StatusCode::SERVICE_UNAVAILABLE, "no Service found with those values");
    };
    let service = &snapshot.config.services[service_index];
    decorations.service = Some(service.name.clone());
    let mut plugins = snapshot.plugins.for_route(found.route);

    for name in CONSUMER_HEADERS {
        parts.headers.remove(name);
    }
    if let Some(conf) = &plugins.correlation {
        let id = correlation::apply(
            conf,
            &mut parts.headers,
            &correlation::Arrival {
                server: connection.local,
                client: connection.peer,
            },
        );
        if conf.echo_downstream {
            decorations.correlation = Some((conf.header.clone(), id));
        }
    }
    correlation::traceparent(&mut parts.headers);

    if let Some(conf) = &plugins.cors {
        if cors::is_preflight(&parts.method, &parts.headers) && !conf.preflight_continue {
            let mut preflight = Response::new(response::full(Bytes::new()));
            *preflight.headers_mut() = conf.preflight_headers(&parts.headers);
            return preflight;
        }
        decorations.cors = Some((conf.clone(), parts.headers.get(header::ORIGIN).cloned()));
    }

    let mut who: Option<(usize, String)> = None;
    if let Some(conf) = &plugins.jwt {
        if conf.run_on_preflight || parts.method != Method::OPTIONS {
            match jwt::authenticate(conf, &parts, &snapshot.credentials).await {
                Ok(found) => {
                    let consumer = &snapshot.config.consumers[found.consumer];
                    set_header(&mut parts.headers, "x-consumer-id", &consumer.id);
                    if let Some(username) = &consumer.username {
                        set_header(&mut parts.headers, "x-consumer-username", username);
                    }
                    if let Some(custom_id) = &consumer.custom_id {
                        set_header(&mut parts.headers, "x-consumer-custom-id", custom_id);
                    }
                    set_header(&mut parts.headers, "x-credential-identifier", &found.credential_key);
                    who = Some((found.consumer, found.credential_key));
                }
                Err(rejection) => return response::json(rejection.status, &rejection.body),
            }
        }
    }
    if who.is_some() && snapshot.plugins.has_consumer_plugins() {
        plugins = snapshot
            .plugins
            .resolve(found.route, Some(service_index), who.as_ref().map(|w| w.0));
    }

    let mut body_limit = None;
    if let Some(conf) = &plugins.size_limit {
        if let Err((status, message)) = size_limit::check_headers(conf, &parts.headers) {
            return response::message(status, message);
        }
        body_limit = Some(conf.allowed_bytes);
    }

    if let Some((conf, namespace)) = &plugins.rate_limit {
        let ip = connection.client(shared, &parts.headers).to_string();
        let identity = Identity {
            consumer: who.as_ref().map(|(c, _)| snapshot.config.consumers[*c].id.as_str()),
            credential: who.as_ref().map(|(_, key)| key.as_str()),
            ip: &ip,
            service: Some(&service.name),
            headers: &parts.headers,
            path: parts.uri.path(),
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        match shared
            .limiter
            .check(conf, namespace, conf.identifier(&identity), now)
            .await
        {
            Ok(decision) => {
                decorations.rate_limit = decision.headers;
                if !decision.allowed {
                    metrics::counter!("bazaar_gateway_rate_limited_total", "service" => service.name.clone())
                        .increment(1);
                    return response::message(conf.error_code, &conf.error_message);
                }
            }
            Err(error) if conf.fault_tolerant => {
                tracing::warn!(%error, service = %service.name, "rate-limiting counters unavailable; letting the request through");
            }
            Err(error) => {
                tracing::error!(%error, service = %service.name, "rate-limiting counters unavailable");
                return response::message(StatusCode::INTERNAL_SERVER_ERROR, "An unexpected error occurred");
            }
        }
    }

    // The body is read whole before sending, as nginx does by default: it enforces the size
    // limit on chunked uploads and lets a connect failure be retried on another target.
    let body = match read_body(body, body_limit).await {
        Ok(body) => body,
        Err(BodyFailure::TooLarge) => return response::message(size_limit::TOO_LARGE.0, size_limit::TOO_LARGE.1),
        Err(BodyFailure::Stalled) => {
            metrics::counter!("bazaar_gateway_slow_clients_total", "phase" => "body").increment(1);
            let mut refused = response::message(
                StatusCode::REQUEST_TIMEOUT,
                "The client took too long to send the request body",
            );
            refused
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return refused;
        }
        Err(BodyFailure::Broken) => return response::message(StatusCode::BAD_REQUEST, "Bad request"),
    };

    let client = connection.client(shared, &parts.headers);
    forward(
        snapshot,
        &shared.retries,
        service_index,
        found,
        parts,
        body,
        host,
        connection,
        client,
    )
    .await
}

/// Longest pause between two parts of a client's request body (nginx's
/// `client_body_timeout`, which Kong inherits, is 60 s; a trickle costs a socket and memory,
/// so ours is shorter).
pub(crate) const CLIENT_BODY_IDLE: Duration = Duration::from_secs(10);
/// Longest a client may take to send a whole request body, however steadily it trickles.
pub(crate) const CLIENT_BODY_DEADLINE: Duration = Duration::from_secs(30);

/// Why a client's body could not be read.
enum BodyFailure {
    TooLarge,
    Stalled,
    Broken,
}

/// Reads a client's body whole, within `limit` bytes, [`CLIENT_BODY_IDLE`] between parts and
/// [`CLIENT_BODY_DEADLINE`] in all.
async fn read_body(mut body: Incoming, limit: Option<u64>) -> Result<Bytes, BodyFailure> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let deadline = tokio::time::Instant::now() + CLIENT_BODY_DEADLINE;
    let mut collected = bytes::BytesMut::new();
    loop {
        let wait = deadline.min(tokio::time::Instant::now() + CLIENT_BODY_IDLE);
        let frame = match tokio::time::timeout_at(wait, body.frame()).await {
            Err(_) => return Err(BodyFailure::Stalled),
            Ok(None) => return Ok(collected.freeze()),
            Ok(Some(Err(_))) => return Err(BodyFailure::Broken),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            collected.extend_from_slice(&data);
            if limit.is_some_and(|limit| collected.len() as u64 > limit) {
                return Err(BodyFailure::TooLarge);
            }
        }
    }
}

fn set_header(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

/// Why the last attempt failed, when every attempt did.
enum Failure {
    Connect,
    Timeout,
    Other,
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    snapshot: &Snapshot,
    budget: &crate::retry_budget::RetryBudget,
    service_index: usize,
    found: RouteMatch,
    parts: http::request::Parts,
    body: Bytes,
    host: Option<String>,
    connection: Connection,
    client: std::net::IpAddr,
) -> Response<ProxyBody> {
    let service = &snapshot.config.services[service_index];
    let runtime = &snapshot.services[service_index];
    let route = &snapshot.config.routes[found.route];
    let path = parts.uri.path();
    let strip = route.strip_path.then_some(found.matched_len);
    let upstream_path = router::upstream_path(&service.path, path, strip);
    let path_and_query = match parts.uri.query() {
        Some(query) => format!("{upstream_path}?{query}"),
        None => upstream_path,
    };

    let mut headers = parts.headers;
    remove_hop_by_hop(&mut headers);
    // The body was read whole, so it goes out with a Content-Length, never chunked.
    headers.remove(header::TRANSFER_ENCODING);
    // As Kong does: the peer is appended to the chain, and X-Real-IP names the client.
    let ip = connection.peer.ip().to_string();
    let peer_value = HeaderValue::from_str(&ip).ok();
    match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => {
            let chain = format!("{earlier}, {ip}");
            set_header(&mut headers, "x-forwarded-for", &chain);
        }
        None => {
            if let Some(value) = &peer_value {
                headers.insert("x-forwarded-for", value.clone());
            }
        }
    }
    match peer_value.filter(|_| client == connection.peer.ip()) {
        Some(value) => {
            headers.insert("x-real-ip", value);
        }
        None => set_header(&mut headers, "x-real-ip", &client.to_string()),
    }
    if let Some(host) = &host {
        let bare = host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host.as_str(), |(h, _)| h);
        set_header(&mut headers, "x-forwarded-host", bare);
    }
    headers.insert("x-forwarded-port", HeaderValue::from(connection.local.port()));
    set_header(&mut headers, "x-forwarded-path", path);
    if let Some(len) = strip.filter(|len| *len > 0) {
        set_header(&mut headers, "x-forwarded-prefix", path.get(..len).unwrap_or(""));
    }
    if !route.preserve_host || host.is_none() {
        headers.insert(header::HOST, runtime.host_header.clone());
    }
    headers.append(header::VIA, HeaderValue::from_static(VIA));

    let hash_input = match &runtime.upstream {
        Some(upstream) if upstream.uses_hash() => upstream
            .hash_header()
            .and_then(|name| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or(&ip)
            .to_string(),
        _ => String::new(),
    };
    let read_timeout = Duration::from_millis(service.read_timeout_ms);
    let write_timeout = Duration::from_millis(service.write_timeout_ms);
    let mut tried: Vec<usize> = Vec::new();
    let mut failure = Failure::Other;
    budget.request();
    for attempt in 0..=service.retries {
        if attempt > 0 && !budget.try_retry() {
            metrics::counter!("bazaar_gateway_retries_refused_total", "service" => service.name.clone()).increment(1);
            tracing::warn!(service = %service.name, "retry budget spent; answering with the failure");
            break;
        }
        let guard = match &runtime.upstream {
            Some(upstream) => match upstream.pick(&hash_input, &tried) {
                Some(guard) => Some(guard),
                // The failed attempts took the last healthy targets out: report their failure.
                None if attempt > 0 => break,
                None => {
                    metrics::counter!("bazaar_gateway_upstream_errors_total", "service" => service.name.clone())
                        .increment(1);
                    return response::message(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "failure to get a peer from the ring-balancer",
                    );
                }
            },
            None => None,
        };
        let address = guard.as_ref().map_or(runtime.address.as_str(), TargetGuard::address);
        let Ok(uri) = format!("{}://{address}{path_and_query}", runtime.scheme).parse::<Uri>() else {
            return response::message(StatusCode::BAD_REQUEST, "Bad request");
        };
        let (outgoing, sent) = OutgoingBody::signalling(body.clone());
        let mut upstream_request = Request::new(outgoing);
        *upstream_request.method_mut() = parts.method.clone();
        *upstream_request.uri_mut() = uri;
        *upstream_request.headers_mut() = headers.clone();

        let report = |outcome| {
            if let Some(guard) = &guard {
                guard.report(outcome);
            }
        };
        match exchange(runtime.client(), upstream_request, sent, write_timeout, read_timeout).await {
            Ok(Ok(upstream_response)) => {
                report(Outcome::Status(upstream_response.status().as_u16()));
                let (mut head, incoming) = upstream_response.into_parts();
                remove_hop_by_hop(&mut head.headers);
                return Response::from_parts(
                    head,
                    GuardedBody {
                        inner: incoming,
                        _guard: guard,
                        idle: read_timeout,
                        stall: Box::pin(tokio::time::sleep(read_timeout)),
                        service: service.name.clone(),
                    }
                    .boxed(),
                );
            }
            Ok(Err(error)) if error.is_connect() => {
                let timed_out = is_timeout(&error);
                report(if timed_out {
                    Outcome::Timeout
                } else {
                    Outcome::TcpFailure
                });
                tracing::warn!(service = %service.name, target = address, %error, "upstream connect failed");
                failure = if timed_out { Failure::Timeout } else { Failure::Connect };
                if let Some(guard) = &guard {
                    tried.push(guard.index);
                }
            }
            Ok(Err(error)) => {
                report(Outcome::TcpFailure);
                tracing::warn!(service = %service.name, target = address, %error, "upstream request failed");
                failure = Failure::Other;
                // The connection broke after the request went out (typically an upstream
                // closing an idle keep-alive connection as it drains). Sending it again is
                // safe only when repeating it cannot double an effect: an idempotent method,
                // or a request that carries an Idempotency-Key. Anything else may have been
                // processed, so it fails as Kong's does.
                if !replay_safe(&parts.method, &headers) {
                    break;
                }
                if let Some(guard) = &guard {
                    tried.push(guard.index);
                }
            }
            Err(_) => {
                report(Outcome::Timeout);
                tracing::warn!(service = %service.name, target = address, "upstream timed out");
                failure = Failure::Timeout;
                break;
            }
        }
    }
    metrics::counter!("bazaar_gateway_upstream_errors_total", "service" => service.name.clone()).increment(1);
    match failure {
        Failure::Timeout => response::message(StatusCode::GATEWAY_TIMEOUT, "The upstream server is timing out"),
        Failure::Connect | Failure::Other => response::message(
            StatusCode::BAD_GATEWAY,
            "An invalid response was received from the upstream server",
        ),
    }
}

/// Sends `request` and waits for the answer's head: the body must go out within
/// `write_timeout` (Kong's limit on sending), then the head arrive within `read_timeout`.
/// `Err` when either passes.
async fn exchange(
    client: &crate::balancer::HttpClient,
    request: Request<OutgoingBody>,
    sent: tokio::sync::oneshot::Receiver<()>,
    write_timeout: Duration,
    read_timeout: Duration,
) -> Result<Result<Response<Incoming>, hyper_util::client::legacy::Error>, tokio::time::error::Elapsed> {
    let answer = client.request(request);
    tokio::pin!(answer);
    tokio::select! {
        answered = &mut answer => return Ok(answered),
        written = tokio::time::timeout(write_timeout, sent) => {
            // A closed signal means the request was dropped: the answer says why.
            if written.is_err() {
                return tokio::time::timeout(Duration::ZERO, std::future::pending()).await;
            }
        }
    }
    tokio::time::timeout(read_timeout, answer).await
}

/// Whether an error (or one of its causes) is a timeout.
fn is_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            || e.to_string().contains("timed out")
        {
            return true;
        }
        current = e.source();
    }
    false
}

/// An upstream response body that keeps its target counted as busy until fully sent, and is
/// cut when the upstream sends nothing for `idle` (Kong's `read_timeout` between two reads).
struct GuardedBody {
    inner: Incoming,
    _guard: Option<TargetGuard>,
    idle: Duration,
    stall: std::pin::Pin<Box<tokio::time::Sleep>>,
    service: Arc<str>,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + self.idle;
                self.stall.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => match self.stall.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    tracing::warn!(service = %self.service, "upstream stalled mid-body past read_timeout; cutting the response");
                    metrics::counter!("bazaar_gateway_upstream_errors_total", "service" => self.service.clone())
                        .increment(1);
                    Poll::Ready(Some(Err(BoxError::from("upstream stalled past read_timeout"))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a request may be sent again after its connection broke mid-flight.
fn replay_safe(method: &http::Method, headers: &http::HeaderMap) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || headers.contains_key("idempotency-key")
}

#[cfg(test)]
mod tests {
    use super::replay_safe;

    #[test]
    fn only_requests_that_cannot_double_an_effect_are_replayed() {
        let none = http::HeaderMap::new();
        let mut keyed = http::HeaderMap::new();
        keyed.insert("idempotency-key", http::HeaderValue::from_static("k-1"));
        assert!(replay_safe(&http::Method::GET, &none));
        assert!(replay_safe(&http::Method::DELETE, &none));
        assert!(!replay_safe(&http::Method::POST, &none));
        assert!(replay_safe(&http::Method::POST, &keyed));
        assert!(!replay_safe(&http::Method::PATCH, &none));
    }
}
