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
use crate::pool::{ConnectError, Pool, Pooled};
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

const X_CONSUMER_ID: HeaderName = HeaderName::from_static("x-consumer-id");
const X_CONSUMER_USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");
const X_CONSUMER_CUSTOM_ID: HeaderName = HeaderName::from_static("x-consumer-custom-id");
const X_CREDENTIAL_IDENTIFIER: HeaderName = HeaderName::from_static("x-credential-identifier");

/// Identity headers only the gateway may set: a client sending them is ignored, so services
/// can trust them.
const CONSUMER_HEADERS: [HeaderName; 5] = [
    X_CONSUMER_ID,
    X_CONSUMER_USERNAME,
    X_CONSUMER_CUSTOM_ID,
    X_CREDENTIAL_IDENTIFIER,
    HeaderName::from_static("x-anonymous-consumer"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PATH: HeaderName = HeaderName::from_static("x-forwarded-path");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The two ends of the client connection.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The peer's address as a header value, rendered once per connection.
    peer_ip: HeaderValue,
}

impl Connection {
    /// The connection from `peer` to `local`.
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Connection {
        let peer_ip = HeaderValue::try_from(peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown"));
        Connection { peer, local, peer_ip }
    }

    /// The client's address: the peer, or whom a trusted proxy says it forwards for.
    fn client(&self, shared: &Shared, headers: &HeaderMap) -> std::net::IpAddr {
        shared.edge.trusted.client(self.peer.ip(), headers)
    }

    /// [`Connection::client`] as text, borrowed from the peer's rendering when the client is
    /// the peer (formatting an address per request showed in the profile).
    fn client_text(&self, shared: &Shared, headers: &HeaderMap) -> std::borrow::Cow<'_, str> {
        let client = self.client(shared, headers);
        match self.peer_ip.to_str() {
            Ok(peer) if client == self.peer.ip() => std::borrow::Cow::Borrowed(peer),
            _ => std::borrow::Cow::Owned(client.to_string()),
        }
    }
}

/// What plugins add to the response, whoever produced it (upstream or a refusal).
#[derive(Default)]
struct Decorations {
    service: Option<Arc<str>>,
    /// The matched route's index.
    route: Option<usize>,
    correlation: Option<(HeaderName, HeaderValue)>,
    cors: Option<(Arc<cors::CorsConfig>, Option<HeaderValue>)>,
    rate_limit: Vec<(HeaderName, HeaderValue)>,
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
    let mut response = process(&shared, &snapshot, request, connection, &mut decorations)
        .await
        .unwrap_or_else(|refusal| refusal);
    if page {
        response = response::as_page(response);
    }

    let elapsed = started.elapsed();
    if tracing::enabled!(tracing::Level::INFO) {
        log_access(&shared, method.as_str(), uri.path(), &response, &decorations, elapsed);
    }
    let headers = response.headers_mut();
    headers.append(header::VIA, HeaderValue::from_static(VIA));
    if let Some((name, value)) = decorations.correlation {
        headers.insert(name, value);
    }
    if let Some((conf, origin)) = &decorations.cors {
        conf.decorate(origin.as_ref(), headers);
    }
    for (name, value) in decorations.rate_limit {
        headers.insert(name, value);
    }

    snapshot
        .request_metrics
        .for_route(decorations.route)
        .record(response.status(), elapsed);
    response
}

/// One access line per request, carrying the correlation id the services will log too.
fn log_access(
    shared: &Shared,
    method: &str,
    path: &str,
    response: &Response<ProxyBody>,
    decorations: &Decorations,
    elapsed: Duration,
) {
    let correlation_id = decorations
        .correlation
        .as_ref()
        .and_then(|(_, v)| v.to_str().ok())
        .unwrap_or("");
    let entry = crate::AccessEntry {
        method,
        path,
        status: response.status().as_u16(),
        service: decorations.service.as_deref().unwrap_or(""),
        us: elapsed.as_micros() as u64,
        correlation_id,
    };
    match shared.edge.access_log {
        Some(write) => write(&entry),
        None => tracing::info!(
            method = %entry.method,
            path = entry.path,
            status = entry.status,
            service = entry.service,
            us = entry.us,
            correlation_id,
            "proxied"
        ),
    }
}

/// What a refusal along the way answers.
type Refusal = Response<ProxyBody>;

/// Runs the plugins on a request in Kong's order, then forwards it; any step may refuse it
/// with its answer instead.
///
/// One piece: it is the pipeline's order, read top to bottom (route, correlation, CORS,
/// JWT, size limit, rate limit, body, forward); each phase is a call or a few lines, and each
/// reads what an earlier one decided (the route, the service, the consumer).
async fn process(
    shared: &Shared,
    snapshot: &Snapshot,
    request: Request<Incoming>,
    connection: Connection,
    decorations: &mut Decorations,
) -> Result<Response<ProxyBody>, Refusal> {
    let (mut parts, body) = request.into_parts();
    set_forwarded_proto(shared, &connection, &mut parts.headers);
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
        return Err(shared
            .edge
            .document(&parts.method, parts.uri.path())
            .unwrap_or_else(|| response::message(StatusCode::NOT_FOUND, "no Route matched with those values")));
    };
    let route = &snapshot.config.routes[found.route];
    decorations.route = Some(found.route);
    let Some(service_index) = route.service else {
        return Err(response::message(
            StatusCode::SERVICE_UNAVAILABLE,
            "no Service found with those values",
        ));
    };
    let service = &snapshot.config.services[service_index];
    decorations.service = Some(service.name.clone());
    let mut plugins = snapshot.plugins.for_route(found.route);

    remove_all(&mut parts.headers, &CONSUMER_HEADERS);
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
            return Err(preflight);
        }
        decorations.cors = Some((conf.config.clone(), parts.headers.get(header::ORIGIN).cloned()));
    }

    let who = match &plugins.jwt {
        Some(conf) => identify(conf, &mut parts, snapshot).await?,
        None => None,
    };
    if who.is_some() && snapshot.plugins.has_consumer_plugins() {
        plugins = snapshot
            .plugins
            .resolve(found.route, Some(service_index), who.as_ref().map(|w| w.0));
    }

    let mut body_limit = None;
    if let Some(conf) = &plugins.size_limit {
        size_limit::check_headers(conf, &parts.headers)
            .map_err(|(status, message)| response::message(status, message))?;
        body_limit = Some(conf.allowed_bytes);
    }

    if let Some(attached) = &plugins.rate_limit {
        let ip = connection.client_text(shared, &parts.headers);
        let identity = Identity {
            consumer: who.as_ref().map(|(c, _)| snapshot.config.consumers[*c].id.as_str()),
            credential: who.as_ref().map(|(_, key)| key.as_str()),
            ip: &ip,
            service: Some(&service.name),
            headers: &parts.headers,
            path: parts.uri.path(),
        };
        limit_rate(shared, attached, &identity, &service.name, decorations).await?;
    }

    // The body is read whole before sending, as nginx does by default: it enforces the size
    // limit on chunked uploads and lets a connect failure be retried on another target.
    let body = read_body(body, body_limit).await.map_err(BodyFailure::refusal)?;
    let client = connection.client(shared, &parts.headers);
    Ok(forward(
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
    .await)
}

/// As Kong does: only a trusted proxy says which scheme the client used (TLS ended in front
/// of the gateway); anyone else's claim is replaced.
fn set_forwarded_proto(shared: &Shared, connection: &Connection, headers: &mut HeaderMap) {
    let scheme_from_proxy = shared.edge.trusted.trusts(connection.peer.ip())
        && matches!(
            headers.get(X_FORWARDED_PROTO).map(HeaderValue::as_bytes),
            Some(b"https" | b"http")
        );
    if !scheme_from_proxy {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
}

/// The JWT plugin: the consumer whose credential signed the token (index and credential
/// key), named in the consumer headers the service trusts; none for a preflight it skips.
async fn identify(
    conf: &jwt::JwtConfig,
    parts: &mut http::request::Parts,
    snapshot: &Snapshot,
) -> Result<Option<(usize, String)>, Refusal> {
    if !conf.run_on_preflight && parts.method == Method::OPTIONS {
        return Ok(None);
    }
    let found = jwt::authenticate(conf, parts, &snapshot.credentials)
        .await
        .map_err(|rejection| response::json(rejection.status, &rejection.body))?;
    let consumer = &snapshot.config.consumers[found.consumer];
    set_header(&mut parts.headers, X_CONSUMER_ID, &consumer.id);
    if let Some(username) = &consumer.username {
        set_header(&mut parts.headers, X_CONSUMER_USERNAME, username);
    }
    if let Some(custom_id) = &consumer.custom_id {
        set_header(&mut parts.headers, X_CONSUMER_CUSTOM_ID, custom_id);
    }
    set_header(&mut parts.headers, X_CREDENTIAL_IDENTIFIER, &found.credential_key);
    Ok(Some((found.consumer, found.credential_key)))
}

/// The rate-limiting plugin: counts the request against `identity`'s windows, keeps the
/// headers to answer with, and refuses it past a limit (or when the counters are out of
/// reach and the plugin is not fault tolerant).
async fn limit_rate(
    shared: &Shared,
    attached: &crate::plugins::Attached<crate::plugins::rate_limit::RateLimitConfig>,
    identity: &Identity<'_>,
    service: &Arc<str>,
    decorations: &mut Decorations,
) -> Result<(), Refusal> {
    let (conf, namespace) = (&attached.config, &attached.namespace);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match shared
        .limiter
        .check(conf, namespace, conf.identifier(identity), now)
        .await
    {
        Ok(decision) => {
            decorations.rate_limit = decision.headers;
            if !decision.allowed {
                metrics::counter!("bazaar_gateway_rate_limited_total", "service" => service.clone()).increment(1);
                return Err(response::message(conf.error_code, &conf.error_message));
            }
            Ok(())
        }
        Err(error) if conf.fault_tolerant => {
            tracing::warn!(%error, %service, "rate-limiting counters unavailable; letting the request through");
            Ok(())
        }
        Err(error) => {
            tracing::error!(%error, %service, "rate-limiting counters unavailable");
            Err(response::message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            ))
        }
    }
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

impl BodyFailure {
    /// The answer to a request whose body could not be read.
    fn refusal(self) -> Refusal {
        match self {
            BodyFailure::TooLarge => response::message(size_limit::TOO_LARGE.0, size_limit::TOO_LARGE.1),
            BodyFailure::Stalled => {
                metrics::counter!("bazaar_gateway_slow_clients_total", "phase" => "body").increment(1);
                let mut refused = response::message(
                    StatusCode::REQUEST_TIMEOUT,
                    "The client took too long to send the request body",
                );
                refused
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                refused
            }
            BodyFailure::Broken => response::message(StatusCode::BAD_REQUEST, "Bad request"),
        }
    }
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

fn set_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Removes every header of `names`; a message carries few of them (an upstream's
/// `Connection: keep-alive`, say), so only the ones found are looked up to be removed.
fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    while let Some(found) = headers.keys().find(|k| names.contains(k)).cloned() {
        headers.remove(found);
    }
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // Connection options that are not header names (or name one removed anyway).
        .filter(|name| !name.eq_ignore_ascii_case("close") && !name.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    remove_all(headers, &HOP_BY_HOP);
    for name in listed {
        headers.remove(name);
    }
}

/// Why the last attempt failed, when every attempt did.
enum Failure {
    Connect,
    Timeout,
    Other,
}

/// Sends the request to the service's upstream and relays the answer, retrying on another
/// target when no connection could be made (or, for a request safe to repeat, when the
/// connection broke), within the service's retries and the gateway's retry budget.
///
/// One piece: each attempt's outcome (its target's report, the targets tried, the last
/// failure) decides whether another attempt is made and what the client is finally told;
/// split up, that state would travel between functions as a machine of its own.
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
    let strip = route.strip_path.then_some(found.matched_len);
    let Some(uri) = upstream_uri(&service.path, &parts.uri, strip) else {
        return response::message(StatusCode::BAD_REQUEST, "Bad request");
    };
    let mut headers = parts.headers;
    let ip = connection.peer_ip.to_str().unwrap_or("");
    forwarding_headers(
        &mut headers,
        &connection,
        client,
        host.as_deref(),
        parts.uri.path(),
        strip,
    );
    if !route.preserve_host || host.is_none() {
        headers.insert(header::HOST, runtime.host_header.clone());
    }
    headers.append(header::VIA, HeaderValue::from_static(VIA));

    let hash_input = match &runtime.upstream {
        Some(upstream) if upstream.uses_hash() => upstream
            .hash_header()
            .and_then(|name| headers.get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or(ip)
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
        let report = |outcome| {
            if let Some(guard) = &guard {
                guard.report(outcome);
            }
        };
        let mut upstream_request = Request::new(());
        *upstream_request.method_mut() = parts.method.clone();
        *upstream_request.uri_mut() = uri.clone();
        *upstream_request.headers_mut() = headers.clone();
        match exchange(
            runtime.pool(),
            address,
            upstream_request,
            &body,
            write_timeout,
            read_timeout,
        )
        .await
        {
            Exchange::Answered(upstream_response, connection) => {
                report(Outcome::Status(upstream_response.status().as_u16()));
                return relay(upstream_response, connection, guard, read_timeout, &service.name);
            }
            Exchange::NoConnection(error) => {
                let timed_out = is_timeout(&*error);
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
            Exchange::Failed(error) => {
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
            Exchange::TimedOut => {
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

/// The path and query the upstream is asked for: the service's path joined to the request's,
/// less the matched prefix when the route strips it, in origin form (the connection already
/// names the target).
fn upstream_uri(service_path: &str, uri: &Uri, strip: Option<usize>) -> Option<Uri> {
    let upstream_path = router::upstream_path(service_path, uri.path(), strip);
    let path_and_query = match uri.query() {
        Some(query) => format!("{upstream_path}?{query}"),
        None => upstream_path,
    };
    Uri::from_maybe_shared(Bytes::from(path_and_query)).ok()
}

/// The request's headers as the upstream gets them: without hop-by-hop headers or chunked
/// framing (the body was read whole, so it goes out with a Content-Length), and with Kong's
/// X-Forwarded-* and X-Real-IP (the peer appended to the chain, the client named).
fn forwarding_headers(
    headers: &mut HeaderMap,
    connection: &Connection,
    client: std::net::IpAddr,
    host: Option<&str>,
    path: &str,
    strip: Option<usize>,
) {
    remove_hop_by_hop(headers);
    headers.remove(header::TRANSFER_ENCODING);
    let ip = connection.peer_ip.to_str().unwrap_or("");
    match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(earlier) => {
            let chain = format!("{earlier}, {ip}");
            set_header(headers, X_FORWARDED_FOR, &chain);
        }
        None => {
            headers.insert(X_FORWARDED_FOR, connection.peer_ip.clone());
        }
    }
    if client == connection.peer.ip() {
        headers.insert(X_REAL_IP, connection.peer_ip.clone());
    } else {
        set_header(headers, X_REAL_IP, &client.to_string());
    }
    if let Some(host) = host {
        let bare = host
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(host, |(h, _)| h);
        set_header(headers, X_FORWARDED_HOST, bare);
    }
    headers.insert(X_FORWARDED_PORT, HeaderValue::from(connection.local.port()));
    set_header(headers, X_FORWARDED_PATH, path);
    if let Some(len) = strip.filter(|len| *len > 0) {
        set_header(headers, X_FORWARDED_PREFIX, path.get(..len).unwrap_or(""));
    }
}

/// The upstream's answer as the client gets it: its head without hop-by-hop headers, its
/// body streamed under the read timeout, holding the connection and the target's guard
/// until the body ends.
fn relay(
    upstream_response: Response<Incoming>,
    connection: Pooled,
    guard: Option<TargetGuard>,
    read_timeout: Duration,
    service: &Arc<str>,
) -> Response<ProxyBody> {
    let (mut head, incoming) = upstream_response.into_parts();
    remove_hop_by_hop(&mut head.headers);
    Response::from_parts(
        head,
        GuardedBody {
            inner: incoming,
            connection: Some(connection),
            _guard: guard,
            idle: read_timeout,
            stall: None,
            armed: false,
            service: service.clone(),
        }
        .boxed(),
    )
}

/// How one attempt at an upstream went.
enum Exchange {
    /// The answer's head arrived, on this connection.
    Answered(Response<Incoming>, Pooled),
    /// No connection could be opened: nothing was sent.
    NoConnection(ConnectError),
    /// The connection failed once the request may have gone out.
    Failed(hyper::Error),
    /// The body was not taken within `write_timeout` or no head came within `read_timeout`.
    TimedOut,
}

/// Sends `request` with `body` to `address` on a pooled connection and waits for the
/// answer's head: the body must go out within `write_timeout` (Kong's limit on sending), then
/// the head arrive within `read_timeout`. A request refused by an idle connection before it
/// left goes out once more on a new one.
async fn exchange(
    pool: &Arc<Pool>,
    address: &str,
    request: Request<()>,
    body: &Bytes,
    write_timeout: Duration,
    read_timeout: Duration,
) -> Exchange {
    let mut connection = match pool.connection(address).await {
        Ok(connection) => connection,
        Err(error) => return Exchange::NoConnection(error),
    };
    let (outgoing, mut sent) = OutgoingBody::signalling(body.clone());
    let mut request = request.map(|()| outgoing);
    loop {
        let answer = connection.send(request);
        tokio::pin!(answer);
        // A body-less request is written with its head: only the wait for the answer is timed.
        let mut answered = None;
        if !body.is_empty() {
            tokio::select! {
                early = &mut answer => answered = Some(early),
                written = tokio::time::timeout(write_timeout, &mut sent) => {
                    // A closed signal (the request was dropped) waits for the answer, which
                    // says why.
                    if written.is_err() {
                        return Exchange::TimedOut;
                    }
                }
            }
        }
        let answered = match answered {
            Some(answered) => answered,
            None => match tokio::time::timeout(read_timeout, answer).await {
                Ok(answered) => answered,
                Err(_) => return Exchange::TimedOut,
            },
        };
        match answered {
            Ok(response) => return Exchange::Answered(response, connection),
            Err(refused) => match retry_unsent(pool, address, &connection, refused).await {
                Ok((fresh, again)) => (connection, request) = (fresh, again),
                Err(outcome) => return outcome,
            },
        }
    }
}

/// After `connection` failed a request: a new connection and the request back when it never
/// left a connection that had served before (the upstream closed it while idle), else the
/// failure.
async fn retry_unsent(
    pool: &Arc<Pool>,
    address: &str,
    connection: &Pooled,
    mut refused: hyper::client::conn::TrySendError<Request<OutgoingBody>>,
) -> Result<(Pooled, Request<OutgoingBody>), Exchange> {
    match refused.take_message() {
        Some(request) if connection.reused() => match pool.open(address).await {
            Ok(fresh) => Ok((fresh, request)),
            Err(error) => Err(Exchange::NoConnection(error)),
        },
        _ => Err(Exchange::Failed(refused.into_error())),
    }
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
    /// The connection the body arrives on, back to its pool once the body has ended.
    connection: Option<Pooled>,
    _guard: Option<TargetGuard>,
    idle: Duration,
    /// Made the first time the upstream has nothing to read (most small answers never
    /// wait), then re-armed each time it has nothing again.
    stall: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Whether `stall` counts from the latest wait rather than an earlier one.
    armed: bool,
    service: Arc<str>,
}

impl GuardedBody {
    /// Gives the connection back: the whole answer has been read.
    fn release(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.release();
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // An answer left unread (a client gone midway) makes its connection unusable, unless
        // there was nothing left to read (HEAD, 204, 304).
        if self.inner.is_end_stream() {
            self.release();
        }
    }
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
                self.armed = false;
                match frame {
                    None => self.release(),
                    Some(Ok(_)) if self.inner.is_end_stream() => self.release(),
                    _ => {}
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + self.idle;
                let armed = std::mem::replace(&mut self.armed, true);
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !armed {
                    stall.as_mut().reset(deadline);
                }
                match stall.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        tracing::warn!(service = %self.service, "upstream stalled mid-body past read_timeout; cutting the response");
                        metrics::counter!("bazaar_gateway_upstream_errors_total", "service" => self.service.clone())
                            .increment(1);
                        Poll::Ready(Some(Err(BoxError::from("upstream stalled past read_timeout"))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
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
