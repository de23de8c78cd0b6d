//! The one outbound HTTP client stack: every call that leaves a service (to a payment
//! provider, an SMS gateway, another system) goes through it.
//!
//! It is a stack of small tower layers over reqwest, composed in one place ([`stack`]) and
//! each testable alone, outermost first:
//!
//! 1. **retry** — only idempotent calls (GET, HEAD, OPTIONS, PUT, DELETE, or any request
//!    carrying an `Idempotency-Key`), on timeouts, transport errors, 5xx, 408 and 429, with
//!    exponential full-jitter backoff, at most `max_retries` times, and only while the retry
//!    budget allows: retries may add at most `budget_ratio` of the requests made in the last
//!    ten seconds (plus a small floor), so a sick dependency sees little extra load;
//! 2. **bulkhead** — at most `max_in_flight` calls at once; a call waits up to `queue_wait`
//!    for a slot and then fails with [`CallError::Full`];
//! 3. **circuit breaker** — [`CircuitBreaker`] over failures (transport errors, timeouts,
//!    5xx, 429) and slow calls; while it is open a call fails at once with
//!    [`CallError::Open`] and nothing is sent;
//! 4. **timeout** — per attempt, so one hung attempt cannot eat the whole budget of time.
//!
//! One [`HttpClient`] serves one destination (its name labels the breaker's metrics and
//! logs), so a sick provider opens only its own breaker.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use reqwest::{Method, Request, RequestBuilder, Response, StatusCode};
use tokio::sync::Semaphore;
use tower::{
    retry::{
        budget::{Budget, TpsBudget},
        Policy, Retry,
    },
    util::BoxCloneSyncService,
    Layer, Service, ServiceExt,
};

use crate::resilience::{Backoff, BreakerConfig, BreakerState, CallError, CircuitBreaker};

/// The header that makes a POST safe to retry: the receiver answers a repeat with the first
/// answer instead of acting twice.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Why a request could not be made or answered (inside [`ClientError`]'s `Failed`).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The request was malformed (bad URL, body that does not serialize).
    #[error("cannot build the request: {0}")]
    Build(String),
    /// Connecting, sending or reading the answer failed.
    #[error("{0}")]
    Transport(String),
}

/// What [`HttpClient::send`] fails with: open breaker, full bulkhead, timeout, or transport.
pub type ClientError = CallError<HttpError>;

/// How the stack treats calls to one destination.
#[derive(Debug, Clone)]
pub struct ClientPolicy {
    /// Limit for one attempt, from sending to the end of the answer's body.
    pub timeout: Duration,
    /// Retries of one idempotent call at most (0 turns retries off).
    pub max_retries: u32,
    /// Retries allowed as a share of recent requests (0.2: one retry per five requests).
    pub budget_ratio: f32,
    /// Retries per second allowed whatever the ratio, so a quiet client can still retry.
    pub budget_floor: u32,
    /// First backoff ceiling; it doubles per retry up to `backoff_cap`.
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_cap: Duration,
    /// The destination's circuit breaker.
    pub breaker: BreakerConfig,
    /// Calls in flight at most (the bulkhead).
    pub max_in_flight: usize,
    /// How long a call waits for a bulkhead slot before failing with [`CallError::Full`].
    pub queue_wait: Duration,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        ClientPolicy {
            timeout: Duration::from_secs(5),
            max_retries: 2,
            budget_ratio: 0.2,
            budget_floor: 1,
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_secs(1),
            breaker: BreakerConfig::default(),
            max_in_flight: 32,
            queue_wait: Duration::from_millis(100),
        }
    }
}

/// The future every layer returns.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Response, ClientError>> + Send>>;

/// True for a request that may be sent twice without acting twice.
pub fn is_idempotent(request: &Request) -> bool {
    matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    ) || request.headers().contains_key(IDEMPOTENCY_KEY)
}

/// Statuses that say "the dependency is struggling": they count against the breaker and
/// are worth retrying.
fn is_failure_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT
}

/// Ends every call: reqwest.
#[derive(Clone)]
struct Transport {
    client: reqwest::Client,
    timeout: Duration,
}

/// A reqwest error with its causes, which say *why* a connection failed.
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Service<Request> for Transport {
    type Response = Response;
    type Error = ClientError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> CallFuture {
        let client = self.client.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            client.execute(request).await.map_err(|e| {
                if e.is_timeout() {
                    CallError::Timeout(timeout)
                } else if e.is_builder() {
                    CallError::Failed(HttpError::Build(describe(&e)))
                } else {
                    CallError::Failed(HttpError::Transport(describe(&e)))
                }
            })
        })
    }
}

/// Fails an attempt that has not answered within its time.
#[derive(Debug, Clone)]
pub struct TimeoutLayer(pub Duration);

/// See [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    after: Duration,
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner, after: self.0 }
    }
}

impl<S> Service<Request> for Timeout<S>
where
    S: Service<Request, Response = Response, Error = ClientError>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = ClientError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> CallFuture {
        let after = self.after;
        let call = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(after, call).await {
                Ok(result) => result,
                Err(_) => Err(CallError::Timeout(after)),
            }
        })
    }
}

/// Rejects calls at once while the destination's breaker is open, and feeds it outcomes.
#[derive(Debug, Clone)]
pub struct BreakerLayer(pub Arc<CircuitBreaker>);

/// See [`BreakerLayer`].
#[derive(Debug, Clone)]
pub struct Breaker<S> {
    inner: S,
    breaker: Arc<CircuitBreaker>,
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;
    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker {
            inner,
            breaker: self.0.clone(),
        }
    }
}

impl<S> Service<Request> for Breaker<S>
where
    S: Service<Request, Response = Response, Error = ClientError>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = ClientError;
    type Future = CallFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> CallFuture {
        let Some(permit) = self.breaker.try_acquire() else {
            let name = self.breaker.name();
            return Box::pin(std::future::ready(Err(CallError::Open(name))));
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let result = call.await;
            match &result {
                Ok(response) if is_failure_status(response.status()) => permit.failure(),
                Ok(_) => permit.success(),
                // Not the destination's fault: the call never reached it.
                Err(CallError::Open(_) | CallError::Full(_)) => drop(permit),
                Err(_) => permit.failure(),
            }
            result
        })
    }
}

/// Caps the calls in flight to one destination, so a slow one cannot take every task and
/// connection of the caller (the bulkhead).
#[derive(Debug, Clone)]
pub struct BulkheadLayer {
    name: &'static str,
    slots: Arc<Semaphore>,
    wait: Duration,
}

impl BulkheadLayer {
    /// At most `max_in_flight` calls; a call waits up to `wait` for a slot.
    pub fn new(name: &'static str, max_in_flight: usize, wait: Duration) -> BulkheadLayer {
        BulkheadLayer {
            name,
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            wait,
        }
    }
}

/// See [`BulkheadLayer`].
#[derive(Debug, Clone)]
pub struct Bulkhead<S> {
    inner: S,
    layer: BulkheadLayer,
}

impl<S> Layer<S> for BulkheadLayer {
    type Service = Bulkhead<S>;
    fn layer(&self, inner: S) -> Bulkhead<S> {
        Bulkhead {
            inner,
            layer: self.clone(),
        }
    }
}

impl<S> Service<Request> for Bulkhead<S>
where
    S: Service<Request, Response = Response, Error = ClientError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = ClientError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ClientError>> {
        // Readiness is decided per call, after waiting for a slot.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> CallFuture {
        let BulkheadLayer { name, slots, wait } = self.layer.clone();
        let inner = self.inner.clone();
        Box::pin(async move {
            let slot = match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) if wait.is_zero() => None,
                Err(_) => tokio::time::timeout(wait, slots.acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok),
            };
            let Some(_slot) = slot else {
                metrics::counter!("bazaar_client_rejected_total", "client" => name, "reason" => "bulkhead")
                    .increment(1);
                return Err(CallError::Full(name));
            };
            inner.oneshot(request).await
        })
    }
}

/// Decides which attempts are retried, and spends the shared retry budget.
#[derive(Clone)]
pub struct RetryPolicy {
    name: &'static str,
    budget: Arc<TpsBudget>,
    max_retries: u32,
    backoff: Backoff,
    /// Retries made for this call so far (tower clones the policy per call).
    attempts: u32,
}

impl RetryPolicy {
    /// A policy for `policy`'s retries with a budget of its own.
    pub fn new(name: &'static str, policy: &ClientPolicy) -> RetryPolicy {
        RetryPolicy {
            name,
            // Ten seconds of history, as in finagle and linkerd.
            budget: Arc::new(TpsBudget::new(
                Duration::from_secs(10),
                policy.budget_floor,
                policy.budget_ratio.max(0.0),
            )),
            max_retries: policy.max_retries,
            backoff: Backoff::new(policy.backoff_base, policy.backoff_cap),
            attempts: 0,
        }
    }
}

impl Policy<Request, Response, ClientError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(&mut self, request: &mut Request, result: &mut Result<Response, ClientError>) -> Option<Self::Future> {
        let worth_it = match result {
            Ok(response) => is_failure_status(response.status()),
            Err(CallError::Timeout(_) | CallError::Failed(HttpError::Transport(_))) => true,
            // An open breaker or a full bulkhead must fail fast, not be hammered again.
            Err(CallError::Open(_) | CallError::Full(_) | CallError::Failed(HttpError::Build(_))) => false,
        };
        if !worth_it || !is_idempotent(request) || self.attempts >= self.max_retries {
            return None;
        }
        if !self.budget.withdraw() {
            metrics::counter!("bazaar_client_retry_budget_exhausted_total", "client" => self.name).increment(1);
            return None;
        }
        self.attempts += 1;
        metrics::counter!("bazaar_client_retries_total", "client" => self.name).increment(1);
        Some(tokio::time::sleep(self.backoff.jittered(self.attempts)))
    }

    fn clone_request(&mut self, request: &Request) -> Option<Request> {
        if self.attempts == 0 {
            // Called once before the first attempt: every call earns retry budget.
            self.budget.deposit();
        }
        if is_idempotent(request) {
            request.try_clone()
        } else {
            None
        }
    }
}

/// The composed stack (see the module docs for the order and why).
pub type Stack = BoxCloneSyncService<Request, Response, ClientError>;

/// Builds the stack for `policy` over `transport` and `breaker`.
pub fn stack<S>(name: &'static str, policy: &ClientPolicy, breaker: Arc<CircuitBreaker>, transport: S) -> Stack
where
    S: Service<Request, Response = Response, Error = ClientError> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    let service = tower::ServiceBuilder::new()
        .layer(BulkheadLayer::new(name, policy.max_in_flight, policy.queue_wait))
        .layer(BreakerLayer(breaker))
        .layer(TimeoutLayer(policy.timeout))
        .service(transport);
    BoxCloneSyncService::new(Retry::new(RetryPolicy::new(name, policy), service))
}

/// An HTTP client for one destination behind the full stack.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    stack: Stack,
    breaker: Arc<CircuitBreaker>,
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpClient")
            .field("name", &self.breaker.name())
            .finish_non_exhaustive()
    }
}

impl HttpClient {
    /// A client for the destination `name` (the label of its breaker's metrics).
    pub fn new(name: &'static str, policy: ClientPolicy) -> Result<HttpClient, ClientError> {
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout)
            .pool_idle_timeout(crate::http::CLIENT_POOL_IDLE)
            .build()
            .map_err(|e| CallError::Failed(HttpError::Build(describe(&e))))?;
        let transport = Transport {
            client: client.clone(),
            timeout: policy.timeout,
        };
        Ok(Self::with_transport(name, policy, client, transport))
    }

    /// A client for `name` over an already built `client` (a mesh client with its TLS, say);
    /// the stack's timeouts still apply.
    pub fn with_client(name: &'static str, policy: ClientPolicy, client: reqwest::Client) -> HttpClient {
        let transport = Transport {
            client: client.clone(),
            timeout: policy.timeout,
        };
        Self::with_transport(name, policy, client, transport)
    }

    /// A client whose last hop is `transport` instead of the network (tests).
    fn with_transport<S>(name: &'static str, policy: ClientPolicy, client: reqwest::Client, transport: S) -> HttpClient
    where
        S: Service<Request, Response = Response, Error = ClientError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        let breaker = Arc::new(CircuitBreaker::new(name, policy.breaker.clone()));
        HttpClient {
            stack: stack(name, &policy, breaker.clone(), transport),
            client,
            breaker,
        }
    }

    /// A request to build and then [`send`](Self::send).
    pub fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.client.request(method, url)
    }

    /// A GET to build.
    pub fn get(&self, url: &str) -> RequestBuilder {
        self.client.get(url)
    }

    /// A POST to build; add an [`IDEMPOTENCY_KEY`] header to make it retryable.
    pub fn post(&self, url: &str) -> RequestBuilder {
        self.client.post(url)
    }

    /// Sends `request` through the stack. Any answer, whatever its status, is `Ok` once
    /// retries are over: the caller decides what a 4xx or a final 5xx means.
    pub async fn send(&self, request: RequestBuilder) -> Result<Response, ClientError> {
        let request = request
            .build()
            .map_err(|e| CallError::Failed(HttpError::Build(describe(&e))))?;
        self.execute(request).await
    }

    /// Sends a built request through the stack. Inside a request or event being served, the
    /// call carries its `X-Correlation-ID` and `traceparent` unless the caller set them.
    pub async fn execute(&self, mut request: Request) -> Result<Response, ClientError> {
        if let Some(context) = bazaar_core::context::RequestContext::current() {
            let headers = request.headers_mut();
            if !headers.contains_key(crate::http::CORRELATION_HEADER) {
                if let Ok(v) = http::HeaderValue::from_str(&context.correlation_id) {
                    headers.insert(crate::http::CORRELATION_HEADER, v);
                }
            }
            if let Some(tp) = context
                .traceparent
                .as_deref()
                .filter(|_| !headers.contains_key("traceparent"))
            {
                if let Ok(v) = http::HeaderValue::from_str(tp) {
                    headers.insert("traceparent", v);
                }
            }
        }
        self.stack.clone().oneshot(request).await
    }

    /// The destination's breaker state (health checks report it).
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// The destination's name.
    pub fn name(&self) -> &'static str {
        self.breaker.name()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A transport that counts calls and answers `status` after `delay`.
    fn fake(
        calls: Arc<AtomicU32>,
        status: u16,
        delay: Duration,
    ) -> impl Service<Request, Response = Response, Error = ClientError, Future = CallFuture> + Clone + Send + Sync + 'static
    {
        tower::service_fn(move |_req: Request| {
            let calls = calls.clone();
            Box::pin(async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let response = http::Response::builder()
                    .status(status)
                    .body(String::new())
                    .map_err(|e| CallError::Failed(HttpError::Build(e.to_string())))?;
                Ok(Response::from(response))
            }) as CallFuture
        })
    }

    fn never_opens() -> BreakerConfig {
        BreakerConfig {
            failure_rate: 2.0,
            slow_call_rate: 2.0,
            ..BreakerConfig::default()
        }
    }

    fn client(
        name: &'static str,
        policy: ClientPolicy,
        calls: &Arc<AtomicU32>,
        status: u16,
        delay: Duration,
    ) -> HttpClient {
        HttpClient::with_transport(name, policy, reqwest::Client::new(), fake(calls.clone(), status, delay))
    }

    fn quick_retries() -> ClientPolicy {
        ClientPolicy {
            max_retries: 3,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(2),
            breaker: never_opens(),
            budget_floor: 10,
            ..ClientPolicy::default()
        }
    }

    #[tokio::test]
    async fn a_plain_post_is_not_retried_but_one_with_an_idempotency_key_is() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = client("t-post", quick_retries(), &calls, 503, Duration::ZERO);
        let r = c.send(c.post("http://x.invalid/charges")).await.expect("an answer");
        assert_eq!(r.status(), 503, "the last answer comes back once retries are over");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a POST without a key is sent once");

        calls.store(0, Ordering::SeqCst);
        let keyed = c.post("http://x.invalid/charges").header(IDEMPOTENCY_KEY, "k1");
        c.send(keyed).await.expect("an answer");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            4,
            "a keyed POST is retried max_retries times"
        );

        calls.store(0, Ordering::SeqCst);
        c.send(c.get("http://x.invalid/")).await.expect("an answer");
        assert_eq!(calls.load(Ordering::SeqCst), 4, "a GET is retried");
    }

    #[tokio::test]
    async fn success_and_client_errors_are_not_retried() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = client("t-404", quick_retries(), &calls, 404, Duration::ZERO);
        assert_eq!(c.send(c.get("http://x.invalid/")).await.expect("answer").status(), 404);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_budget_caps_retries_at_a_share_of_requests() {
        let calls = Arc::new(AtomicU32::new(0));
        let policy = ClientPolicy {
            budget_ratio: 0.2,
            budget_floor: 0,
            ..quick_retries()
        };
        let c = client("t-budget", policy, &calls, 503, Duration::ZERO);
        for _ in 0..100 {
            c.send(c.get("http://x.invalid/")).await.expect("answer");
        }
        let made = calls.load(Ordering::SeqCst);
        // Without a budget 100 failing calls with 3 retries each would make 400 attempts.
        assert!(made > 100, "some retries happen: {made}");
        assert!(made <= 100 + 21, "retries stay within 20 % of requests: {made}");
    }

    #[tokio::test]
    async fn the_bulkhead_rejects_beyond_its_limit_or_queues_within_its_wait() {
        let calls = Arc::new(AtomicU32::new(0));
        let policy = ClientPolicy {
            max_in_flight: 2,
            queue_wait: Duration::ZERO,
            max_retries: 0,
            ..ClientPolicy::default()
        };
        let c = client("t-bulkhead", policy.clone(), &calls, 200, Duration::from_millis(300));
        let running: Vec<_> = (0..2)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move { c.send(c.get("http://x.invalid/")).await.map(|r| r.status()) })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "the first two calls start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let third = c.send(c.get("http://x.invalid/")).await;
        assert!(matches!(third, Err(CallError::Full("t-bulkhead"))), "{third:?}");
        for task in running {
            assert_eq!(task.await.expect("task").expect("call"), 200);
        }

        // With a wait longer than a call, the third one queues and then goes through.
        let calls = Arc::new(AtomicU32::new(0));
        let waiting = ClientPolicy {
            queue_wait: Duration::from_secs(2),
            ..policy
        };
        let c = client("t-bulkhead-q", waiting, &calls, 200, Duration::from_millis(100));
        let all = futures_util::future::join_all((0..3).map(|_| c.send(c.get("http://x.invalid/")))).await;
        assert!(all.iter().all(|r| r.is_ok()), "{all:?}");
    }

    #[tokio::test]
    async fn slow_answers_time_out_and_open_the_breaker() {
        let calls = Arc::new(AtomicU32::new(0));
        let policy = ClientPolicy {
            timeout: Duration::from_millis(20),
            max_retries: 0,
            breaker: BreakerConfig {
                window: 4,
                min_calls: 4,
                ..BreakerConfig::default()
            },
            ..ClientPolicy::default()
        };
        let c = client("t-timeout", policy, &calls, 200, Duration::from_millis(200));
        for _ in 0..4 {
            let r = c.send(c.get("http://x.invalid/")).await;
            assert!(matches!(r, Err(CallError::Timeout(_))), "{r:?}");
        }
        assert_eq!(c.breaker_state(), BreakerState::Open);
        let r = c.send(c.get("http://x.invalid/")).await;
        assert!(matches!(r, Err(CallError::Open("t-timeout"))), "{r:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 4, "nothing is sent while open");
    }
}
