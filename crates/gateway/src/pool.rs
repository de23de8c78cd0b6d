//! Keep-alive HTTP/1 connections to upstream targets, as HAProxy's `http-reuse always` keeps
//! them: one pool per worker and connection settings, so a connection only ever serves the
//! thread that opened it and taking one is an uncontended lock.
//!
//! The proxy path used hyper-util's general client before; it builds an absolute URI per
//! request, hashes it into a shared pool and goes through a connector service even for a
//! pooled connection. Here a request names its target's `host:port`, goes out in origin form
//! on an idle connection when there is one, and its connection comes back to the pool when
//! the answer's body has been read to its end. A connection whose answer is abandoned midway
//! is dropped, and hyper closes it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};

use crate::outgoing::OutgoingBody;
use crate::tls::UpstreamConnector;

/// Idle connections kept per target and pool; past it a returned connection is closed.
const IDLE_PER_TARGET: usize = 256;

/// Targets a pool remembers before it forgets those with no idle connection (targets come
/// and go with reloads and DNS).
const TARGETS_KEPT: usize = 1024;

/// How long a returned connection may take to be ready for its next request.
const SETTLE_FOR: Duration = Duration::from_millis(100);

/// Why no connection could be had.
pub(crate) type ConnectError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections by target, and how to open new ones.
pub(crate) struct Pool {
    connector: UpstreamConnector,
    scheme: &'static str,
    /// How long a connection may sit idle and still be used.
    idle_for: Duration,
    idle: Mutex<HashMap<Arc<str>, Slot>>,
}

/// One target's idle connections, oldest first, and the key requests to it carry.
struct Slot {
    target: Arc<str>,
    queue: VecDeque<Idle>,
}

struct Idle {
    sender: http1::SendRequest<OutgoingBody>,
    since: Instant,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("scheme", &self.scheme)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool opening connections with `connector` for `scheme` (`http` or `https`), reusing
    /// one idle for at most `idle_for`.
    pub fn new(connector: UpstreamConnector, scheme: &'static str, idle_for: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            scheme,
            idle_for,
            idle: Mutex::new(HashMap::new()),
        })
    }

    /// A connection to `address` (`host:port`) ready for a request: the most recently used
    /// idle one, else a new one. `Err` only when a new one cannot be opened.
    pub async fn connection(self: &Arc<Pool>, address: &str) -> Result<Pooled, ConnectError> {
        while let Some((target, mut sender)) = self.take_idle(address) {
            // A returned connection may not have settled its last exchange yet; it does so
            // on this thread in a moment. One the upstream closed says so here, and one that
            // does not settle at once is left behind.
            let settled =
                sender.is_ready() || matches!(tokio::time::timeout(SETTLE_FOR, sender.ready()).await, Ok(Ok(())));
            if settled {
                return Ok(Pooled {
                    sender,
                    target,
                    pool: self.clone(),
                    reused: true,
                });
            }
        }
        self.open(address).await
    }

    /// A new connection to `address`, bypassing the idle ones.
    pub async fn open(self: &Arc<Pool>, address: &str) -> Result<Pooled, ConnectError> {
        let uri: http::Uri = format!("{}://{address}/", self.scheme).parse()?;
        let io = tower::Service::call(&mut self.connector.clone(), uri).await?;
        let (sender, connection) = http1::Builder::new().handshake(io).await?;
        // The connection's task ends when its last sender is dropped and its exchange is
        // over, or when either side closes it; the worker's runtime drops it at shutdown.
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        let target = self.target(address);
        Ok(Pooled {
            sender,
            target,
            pool: self.clone(),
            reused: false,
        })
    }

    /// The freshest idle connection to `address`, dropping expired and closed ones.
    fn take_idle(&self, address: &str) -> Option<(Arc<str>, http1::SendRequest<OutgoingBody>)> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let slot = idle.get_mut(address)?;
        while let Some(entry) = slot.queue.pop_back() {
            if entry.since.elapsed() < self.idle_for && !entry.sender.is_closed() {
                return Some((slot.target.clone(), entry.sender));
            }
        }
        None
    }

    /// The pool's key for `address`.
    fn target(&self, address: &str) -> Arc<str> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = idle.get(address) {
            return slot.target.clone();
        }
        if idle.len() >= TARGETS_KEPT {
            idle.retain(|_, slot| !slot.queue.is_empty());
        }
        let target: Arc<str> = Arc::from(address);
        let slot = Slot {
            target: target.clone(),
            queue: VecDeque::new(),
        };
        idle.insert(target.clone(), slot);
        target
    }

    fn put(&self, target: Arc<str>, sender: http1::SendRequest<OutgoingBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let slot = idle.entry(target.clone()).or_insert_with(|| Slot {
            target,
            queue: VecDeque::new(),
        });
        let queue = &mut slot.queue;
        // The oldest are at the front: expired ones leave as fresh ones arrive.
        while queue
            .front()
            .is_some_and(|oldest| oldest.since.elapsed() >= self.idle_for)
        {
            queue.pop_front();
        }
        if queue.len() < IDLE_PER_TARGET {
            queue.push_back(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A connection taken from a [`Pool`]; [`Pooled::release`] gives it back once its answer has
/// been read whole, and dropping it closes the connection.
pub(crate) struct Pooled {
    sender: http1::SendRequest<OutgoingBody>,
    target: Arc<str>,
    pool: Arc<Pool>,
    reused: bool,
}

impl Pooled {
    /// Sends `request` (its URI in origin form, its Host header set). An error that carries
    /// the request back means it never left: it may be sent on another connection.
    pub fn send(
        &mut self,
        request: Request<OutgoingBody>,
    ) -> impl std::future::Future<Output = Result<Response<Incoming>, TrySendError<Request<OutgoingBody>>>> {
        self.sender.try_send_request(request)
    }

    /// Whether this connection served an earlier request.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Returns the connection to its pool for the next request to its target.
    pub fn release(self) {
        self.pool.put(self.target, self.sender);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// An upstream counting the connections it accepts; `/close` answers with
    /// `Connection: close`.
    async fn upstream() -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"hello")));
                        if request.uri().path() == "/close" {
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (address, accepted)
    }

    fn pool() -> Arc<Pool> {
        Pool::new(
            UpstreamConnector::new(HttpConnector::new(), None),
            "http",
            Duration::from_secs(5),
        )
    }

    /// Sends `GET path` to `address` and reads the answer whole; gives the connection back
    /// when `release`.
    async fn get(pool: &Arc<Pool>, address: &str, path: &'static str, release: bool) -> Bytes {
        let mut connection = pool.connection(address).await.unwrap();
        let request = Request::get(path)
            .header(http::header::HOST, address)
            .body(OutgoingBody::new(Bytes::new()))
            .unwrap();
        let response = connection.send(request).await.map_err(|e| e.into_error()).unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        if release {
            connection.release();
        }
        body
    }

    #[tokio::test]
    async fn answers_read_to_the_end_leave_their_connection_for_the_next_request() {
        let (address, accepted) = upstream().await;
        let pool = pool();
        for _ in 0..3 {
            assert_eq!(get(&pool, &address, "/", true).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_not_given_back_or_closed_by_the_upstream_is_not_used_again() {
        let (address, accepted) = upstream().await;
        let pool = pool();
        get(&pool, &address, "/", false).await;
        get(&pool, &address, "/close", true).await;
        assert_eq!(get(&pool, &address, "/", true).await, "hello");
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_unreachable_target_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        assert!(pool().connection(&address).await.is_err());
    }
}
