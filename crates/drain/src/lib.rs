//! Stopping an HTTP listener without leaving a request unanswered: the services' listeners
//! (`bazaar-kit`, `bazaar-mesh`) and the gateway's share it. How a listener takes and serves
//! its connections in the first place is in [`connections`].
//!
//! hyper's graceful shutdown closes a connection at once when no request is in progress on
//! it, and a connection accepted a moment before the stop, whose request is still on its way
//! (a client that opens a connection per request, as curl and urllib do), counts as idle: it
//! was closed unanswered ("connection closed without response", "broken pipe") on every
//! rollout. A [`Drain`] lets such a connection receive its first request, for up to
//! [`FIRST_REQUEST_GRACE`], before shutting it down gracefully; the request is answered with
//! `Connection: close`.

pub mod connections;

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::{watch, Notify};

/// How long a connection accepted before the stop may take to begin its first request.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);

/// Stops a listener's connections; each is served through a [`DrainWatcher`].
#[derive(Debug)]
pub struct Drain {
    stop: watch::Sender<()>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain::new()
    }
}

impl Drain {
    /// A drain with no connection yet.
    pub fn new() -> Drain {
        Drain {
            stop: watch::Sender::new(()),
        }
    }

    /// What one connection is served through.
    pub fn watcher(&self) -> DrainWatcher {
        DrainWatcher {
            stop: self.stop.subscribe(),
        }
    }

    /// Tells every connection to finish, and waits until all have.
    pub async fn shutdown(self) {
        self.stop.send_replace(());
        self.stop.closed().await;
    }
}

/// One connection's view of its listener's [`Drain`].
#[derive(Debug)]
pub struct DrainWatcher {
    stop: watch::Receiver<()>,
}

impl DrainWatcher {
    /// Serves `connection` until it ends. Once the drain begins, a connection on which no
    /// request began yet (`requests` says) gets [`FIRST_REQUEST_GRACE`] for its first; then
    /// it is shut down gracefully: the request in progress is answered, nothing new is read.
    /// Boxed, so that a caller spawning it needs no proof that a generic future is `Send`.
    pub fn watch<C>(mut self, connection: C, requests: Requests) -> Watched<C::Error>
    where
        C: GracefulConnection + Send + 'static,
    {
        Box::pin(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                done = connection.as_mut() => return done,
                _ = self.stop.changed() => {}
            }
            if !requests.begun() {
                tokio::select! {
                    done = connection.as_mut() => return done,
                    () = requests.first() => {}
                    () = tokio::time::sleep(FIRST_REQUEST_GRACE) => {}
                }
            }
            Pin::as_mut(&mut connection).graceful_shutdown();
            connection.await
        })
    }
}

/// A connection served through a [`DrainWatcher`].
pub type Watched<E> = Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send>>;

/// Whether a request began on a connection: its service calls [`Requests::begin`].
#[derive(Debug, Clone, Default)]
pub struct Requests {
    inner: Arc<RequestsInner>,
}

#[derive(Debug, Default)]
struct RequestsInner {
    begun: AtomicBool,
    first: Notify,
}

impl Requests {
    /// Records that a request began.
    pub fn begin(&self) {
        if !self.inner.begun.swap(true, Ordering::Relaxed) {
            self.inner.first.notify_waiters();
        }
    }

    fn begun(&self) -> bool {
        self.inner.begun.load(Ordering::Relaxed)
    }

    async fn first(&self) {
        let notified = self.inner.first.notified();
        if !self.begun() {
            notified.await;
        }
    }
}
