//! HTTP building blocks every service shares: RFC 9457 problem responses, a JSON extractor
//! whose rejections are problems, request observation (correlation id, traceparent, metrics,
//! a log line per request) and graceful serving.

use std::time::{Duration, Instant};

use axum::{
    extract::{FromRequest, MatchedPath, Request},
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Router,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tracing::Instrument;

use crate::shutdown::Shutdown;

/// The header carrying the correlation id between roles.
pub const CORRELATION_HEADER: &str = "x-correlation-id";

/// An `application/problem+json` error response (RFC 9457).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`about:blank` when only the status matters).
    #[serde(rename = "type")]
    pub kind: String,
    /// The status's reason phrase.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong in this occurrence, for a human.
    pub detail: String,
    /// Seconds to send as `Retry-After` (429 and 503 only; 503 defaults to one second).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem with `status` and `detail`.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".into(),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// 429 with `Retry-After`: this client or account asked too often; nothing was changed
    /// and the same request may be sent again after `retry_after`.
    pub fn too_many(detail: impl Into<String>, retry_after: std::time::Duration) -> Problem {
        Problem {
            retry_after: Some(retry_after.as_secs_f64().ceil().max(1.0) as u64),
            ..Problem::new(StatusCode::TOO_MANY_REQUESTS, detail)
        }
    }

    /// 400: the request is malformed or breaks a rule.
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    /// 401: no or bad credentials.
    pub fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNAUTHORIZED, detail)
    }

    /// 403: authenticated but not allowed.
    pub fn forbidden(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::FORBIDDEN, detail)
    }

    /// 404: no such resource.
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }

    /// 409: conflicts with the current state.
    pub fn conflict(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::CONFLICT, detail)
    }

    /// 422: well-formed but not acceptable.
    pub fn unprocessable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    /// 500 for an unexpected failure; the cause goes to the log, not to the client.
    pub fn internal(cause: impl std::fmt::Display) -> Problem {
        tracing::error!(error = %cause, "internal error");
        Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the service log")
    }

    /// 503 with `Retry-After`: the role sheds this request to keep serving the ones it took;
    /// nothing was changed and the same request may be sent again shortly.
    pub fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail)
    }

    /// 503 with `Retry-After`: the store was busy and nothing was changed, so the same
    /// request may be sent again (with its Idempotency-Key, where it has one).
    pub fn busy(cause: impl std::fmt::Display) -> Problem {
        tracing::warn!(error = %cause, "store busy; asking the client to retry");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the service's store is busy; nothing was changed, retry shortly",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body,
        )
            .into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            let seconds = self.retry_after.unwrap_or(1);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<crate::store::StoreError> for Problem {
    fn from(e: crate::store::StoreError) -> Self {
        if e.is_busy() {
            Problem::busy(e)
        } else {
            Problem::internal(e)
        }
    }
}

impl From<crate::consumer::HandlerError> for Problem {
    /// A transient failure (the store) inside work a request started rolled it back: retry.
    fn from(e: crate::consumer::HandlerError) -> Self {
        match e {
            crate::consumer::HandlerError::Transient(_) => Problem::busy(e),
            crate::consumer::HandlerError::Poison(_) => Problem::internal(e),
        }
    }
}

/// `?limit=&offset=` of a list endpoint (`Query<Page>`); every list bounds its page the same way.
#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct Page {
    /// Most items to return; each list has its own default, and a value outside 1 to its
    /// maximum is taken as the nearest of them.
    limit: Option<i64>,
    /// Items to skip (a negative value counts as 0).
    offset: Option<i64>,
}

impl Page {
    /// Rows to return: `default` when not given, else clamped to `1..=max`.
    pub fn limit(&self, default: i64, max: i64) -> i64 {
        self.limit.unwrap_or(default).clamp(1, max)
    }

    /// Rows to skip (never negative).
    pub fn offset(&self) -> i64 {
        self.offset.unwrap_or(0).max(0)
    }
}

/// A JSON body whose rejections (wrong content type, bad syntax, missing fields) are
/// problem responses that say what was wrong. Numbers are read as JSON Schema reads them:
/// `3.0` is the integer 3, as the API documents promise.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let reject = |rejection: axum::extract::rejection::JsonRejection| {
            Problem::new(rejection.status(), rejection.body_text())
        };
        let axum::Json(mut value) = axum::Json::<serde_json::Value>::from_request(req, state)
            .await
            .map_err(reject)?;
        if let Ok(v) = T::deserialize(&value) {
            return Ok(Json(v));
        }
        integral_floats_as_integers(&mut value);
        // Through bytes again, so a type error names the field it is in.
        let bytes = serde_json::to_vec(&value).unwrap_or_default();
        axum::Json::<T>::from_bytes(&bytes)
            .map(|axum::Json(v)| Json(v))
            .map_err(reject)
    }
}

/// Turns every number with no fractional part (`3.0`) into an integer, in place.
fn integral_floats_as_integers(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15) {
                *value = serde_json::Value::from(f as i64);
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(integral_floats_as_integers),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(integral_floats_as_integers),
        _ => {}
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

pub use bazaar_core::context::RequestContext;

/// Middleware: takes or makes the correlation id, echoes it, logs one line and records
/// `bazaar_http_requests_total` and `bazaar_http_request_duration_seconds` per route.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let start = Instant::now();
    let correlation_id = req
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let traceparent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let traceparent_field = traceparent.clone();
    let context = RequestContext {
        correlation_id: correlation_id.clone(),
        traceparent,
    };
    req.extensions_mut().insert(context.clone());
    let span = tracing::info_span!(
        "request",
        correlation_id = %correlation_id,
        traceparent = traceparent_field.as_deref().unwrap_or(""),
        http.method = %method,
        http.route = %route
    );
    let mut response = context.scope(next.run(req)).instrument(span.clone()).await;
    if response.status().as_u16() >= 400 && !is_json(&response) {
        response = as_problem(response, &method, &path).await;
    }
    let status = response.status().as_u16();
    let elapsed = start.elapsed();
    if let Ok(v) = HeaderValue::from_str(&correlation_id) {
        response.headers_mut().insert(CORRELATION_HEADER, v);
    }
    metrics::counter!("bazaar_http_requests_total", "method" => method.to_string(), "route" => route.clone(), "status" => status.to_string()).increment(1);
    metrics::histogram!("bazaar_http_request_duration_seconds", "route" => route).record(elapsed.as_secs_f64());
    span.in_scope(|| {
        let ms = elapsed.as_secs_f64() * 1000.0;
        // Probes would drown the log; they are counted in metrics all the same.
        if path.starts_with("/health") || path == "/metrics" {
            tracing::debug!(%method, %path, status, ms, "served");
        } else {
            tracing::info!(%method, %path, status, ms, "served");
        }
    });
    response
}

/// True for a JSON body (a problem, or a health report's 503) or a web page saying what went
/// wrong, which are left as they are.
fn is_json(response: &Response) -> bool {
    response.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.starts_with(b"application/problem+json") || v.starts_with(b"application/json") || v.starts_with(b"text/html")
    })
}

/// Rewrites an error the framework produced (a rejected path or query, a wrong method) as a
/// problem, keeping its status and using its text as the detail.
async fn as_problem(response: Response, method: &axum::http::Method, path: &str) -> Response {
    let status = response.status();
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let detail = match (status, text.is_empty()) {
        (StatusCode::METHOD_NOT_ALLOWED, true) => format!("{method} is not allowed on {path}"),
        (_, true) => status.canonical_reason().unwrap_or("error").to_string(),
        (_, false) => text,
    };
    let problem = Problem::new(status, detail).into_response();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    Response::from_parts(parts, problem.into_body())
}

/// A router's 404 for unknown paths, as a problem.
pub async fn not_found(req: Request) -> Problem {
    Problem::not_found(format!("no resource at {} {}", req.method(), req.uri().path()))
}

/// Adds the shared layers (observation, contained panics, bounded bodies, problem 404) to a
/// service's router.
pub fn finish(router: Router) -> Router {
    router
        .fallback(not_found)
        .layer(axum::middleware::from_fn(bounded_body))
        .layer(axum::middleware::from_fn(contain_panics))
        .layer(axum::middleware::from_fn(observe))
}

/// Answers a handler's panic with a 500 problem (and logs it) instead of dropping the
/// connection unanswered: no input takes more than its own request down.
pub async fn contain_panics(request: Request, next: Next) -> Response {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            metrics::counter!("bazaar_http_panics_total").increment(1);
            Problem::internal(format!("a request handler panicked: {what}")).into_response()
        }
    }
}

pub use bazaar_drain::connections::{
    connection_builder, ConnectionCap, CLIENT_POOL_IDLE, HEADER_TIMEOUT, MAX_CONNECTIONS,
};

/// Longest pause between two parts of a request body.
pub const BODY_IDLE: Duration = Duration::from_secs(10);
/// Longest a request body may take in all, however steadily it trickles.
pub const BODY_DEADLINE: Duration = Duration::from_secs(30);
/// Largest request body a service reads (every API takes small JSON documents).
pub const BODY_LIMIT: usize = 1024 * 1024;
/// How long in-flight requests get to finish once serving stops.
const CLOSE_LIMIT: Duration = Duration::from_secs(30);

/// Serves `router` in plain HTTP on `listener` until `stop` resolves, then lets in-flight
/// requests finish (up to 30 s): heads bounded by [`HEADER_TIMEOUT`], at most
/// [`MAX_CONNECTIONS`] at once.
pub async fn serve_plain(
    listener: tokio::net::TcpListener,
    router: Router,
    name: &'static str,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let drain = bazaar_drain::Drain::new();
    let builder = connection_builder();
    let cap = ConnectionCap::new(MAX_CONNECTIONS, name);
    tokio::pin!(stop);
    while let Some((slot, stream, peer)) = cap.accept(&listener, &mut stop).await {
        let router = router.clone();
        let requests = bazaar_drain::Requests::default();
        let begun = requests.clone();
        let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            begun.begin();
            router.clone().oneshot(request.map(axum::body::Body::new))
        });
        let connection = builder
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), service)
            .into_owned();
        let watcher = drain.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = watcher.watch(connection, requests).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_LIMIT, drain.shutdown()).await.is_err() {
        tracing::warn!(
            listener = name,
            "connections still open after {CLOSE_LIMIT:?}; leaving them to the exit"
        );
    }
    Ok(())
}

/// [`serve_plain`] until `shutdown` fires.
pub async fn serve(listener: tokio::net::TcpListener, router: Router, mut shutdown: Shutdown) -> std::io::Result<()> {
    serve_plain(listener, router, "http", async move { shutdown.wait().await }).await
}

/// Reads the whole request body before the handler runs, within [`BODY_LIMIT`] bytes,
/// [`BODY_IDLE`] between parts and [`BODY_DEADLINE`] in all: a client trickling a body is
/// answered 408 and cut, instead of holding a connection and a task forever.
pub async fn bounded_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    if axum::body::HttpBody::is_end_stream(&body) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let mut stream = body.into_data_stream();
    let deadline = tokio::time::Instant::now() + BODY_DEADLINE;
    let mut collected = Vec::new();
    loop {
        let wait = deadline.min(tokio::time::Instant::now() + BODY_IDLE);
        match tokio::time::timeout_at(wait, futures_util::StreamExt::next(&mut stream)).await {
            Err(_) => {
                metrics::counter!("bazaar_http_slow_bodies_total").increment(1);
                let mut refused = Problem::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body arrived too slowly; send it again",
                )
                .into_response();
                refused
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return refused;
            }
            Ok(None) => break,
            Ok(Some(Err(_))) => return Problem::bad_request("the request body could not be read").into_response(),
            Ok(Some(Ok(data))) => {
                collected.extend_from_slice(&data);
                if collected.len() > BODY_LIMIT {
                    return Problem::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request body is over {BODY_LIMIT} bytes"),
                    )
                    .into_response();
                }
            }
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(collected)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_store_asks_the_client_to_retry_and_a_broken_one_does_not() {
        let busy =
            Problem::from(crate::store::StoreError::WriterBusy(std::time::Duration::from_secs(10))).into_response();
        assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            busy.headers().get(header::RETRY_AFTER).map(|v| v.as_bytes()),
            Some(&b"1"[..])
        );
        let broken = Problem::from(crate::store::StoreError::NoRow("SELECT 1".into())).into_response();
        assert_eq!(broken.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(broken.headers().get(header::RETRY_AFTER).is_none());
    }

    #[tokio::test]
    async fn a_listener_at_its_cap_makes_the_next_connection_wait_for_a_slot() {
        let cap = ConnectionCap::new(2, "test");
        let (one, _two) = (cap.slot().await, cap.slot().await);
        let third = tokio::spawn({
            let cap = cap.clone();
            async move { cap.slot().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "a third connection was served past the cap");
        drop(one);
        let _slot = tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("a freed slot goes to the waiting connection")
            .unwrap();
    }

    async fn boom() -> &'static str {
        panic!("a bug")
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_router_keeps_serving() {
        use tower::ServiceExt;
        let router = finish(
            Router::new()
                .route("/boom", axum::routing::get(boom))
                .route("/fine", axum::routing::get(|| async { "fine" })),
        );
        let call = |path: &'static str| {
            router
                .clone()
                .oneshot(axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap())
        };
        let boom = call("/boom").await.unwrap();
        assert_eq!(boom.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(boom.headers()[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(call("/fine").await.unwrap().status(), StatusCode::OK);
    }

    #[test]
    fn problem_has_the_rfc_fields() {
        let p = serde_json::to_value(Problem::bad_request("quantity must be positive")).unwrap();
        assert_eq!(p["status"], 400);
        assert_eq!(p["title"], "Bad Request");
        assert_eq!(p["type"], "about:blank");
        assert_eq!(p["detail"], "quantity must be positive");
    }
}
