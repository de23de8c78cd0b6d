//! How a listener takes and serves its connections: at most [`MAX_CONNECTIONS`] at once
//! ([`ConnectionCap`]), each through the HTTP/1 and HTTP/2 [`connection_builder`] that cuts a
//! request head (or an idle keep-alive connection) after [`HEADER_TIMEOUT`]. The services'
//! plain and mutual-TLS listeners share it.

use std::time::{Duration, Instant};

/// How long a client may take to send a request's head, and how long a keep-alive connection
/// may sit idle before its next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client keeps an idle pooled connection to a service: well under
/// [`HEADER_TIMEOUT`], so a client never sends a request on a connection the service is
/// closing at that moment (a POST lost that way cannot be retried safely).
pub const CLIENT_POOL_IDLE: Duration = Duration::from_secs(5);
/// Connections one listener serves at once; past it, new ones wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;
/// A listener's limit on connections served at once. Past it, accepting pauses (new clients
/// wait in the backlog instead of taking descriptors from those being served), and a warning
/// says so at most every ten seconds.
#[derive(Debug, Clone)]
pub struct ConnectionCap {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    cap: usize,
    listener: &'static str,
    warned: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
}

impl ConnectionCap {
    /// At most `cap` connections on the listener called `listener` (for the log).
    pub fn new(cap: usize, listener: &'static str) -> ConnectionCap {
        ConnectionCap {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(cap.max(1))),
            cap: cap.max(1),
            listener,
            warned: Default::default(),
        }
    }

    /// The next connection on `listener` with the slot it holds while served, or `None` once
    /// `stop` resolves.
    pub async fn accept<F: std::future::Future<Output = ()>>(
        &self,
        listener: &tokio::net::TcpListener,
        stop: &mut std::pin::Pin<&mut F>,
    ) -> Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::net::TcpStream,
        std::net::SocketAddr,
    )> {
        let slot = tokio::select! {
            slot = self.slot() => slot,
            () = stop.as_mut() => return None,
        };
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        return Some((slot, stream, peer));
                    }
                    Err(e) => {
                        // Out of descriptors, say: back off rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = stop.as_mut() => return None,
            }
        }
    }

    /// A slot for the next connection, held while it is served; waits when all are taken.
    pub async fn slot(&self) -> tokio::sync::OwnedSemaphorePermit {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return slot;
        }
        {
            let mut warned = self.warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    listener = self.listener,
                    cap = self.cap,
                    "connection cap {} reached on {}; new connections wait",
                    self.cap,
                    self.listener
                );
                *warned = Some(Instant::now());
            }
        }
        metrics::counter!("bazaar_connection_cap_reached_total", "listener" => self.listener).increment(1);
        // The semaphore is never closed.
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed")
    }
}

/// The HTTP/1 and HTTP/2 connection builder every service listener uses: request heads (and
/// idle keep-alive connections) are cut after [`HEADER_TIMEOUT`].
pub fn connection_builder() -> hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Some(HEADER_TIMEOUT));
    builder
}
