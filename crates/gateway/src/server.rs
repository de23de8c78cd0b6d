//! Accept loops for the two listeners, graceful drain, and the config reload watcher.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bazaar_drain::{Drain, DrainWatcher, Requests};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::state::{CountGuard, RenderMetrics, Shared};
use crate::workers::Workers;
use crate::{admin, proxy, GatewayError};

/// How often the config file's modification time is checked.
const RELOAD_POLL: Duration = Duration::from_secs(2);

/// How long a client may take to send a request's headers, and how long a keep-alive
/// connection may sit idle before its next request.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the proxy listener serves at once; past it new ones wait in the backlog.
pub const MAX_PROXY_CONNECTIONS: usize = 4096;
/// Connections the admin listener serves at once.
const MAX_ADMIN_CONNECTIONS: usize = 256;

/// How long in-flight requests get to finish after shutdown begins.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Proxy,
    Admin,
}

/// Serves on listeners the caller already bound (tests bind `127.0.0.1:0` and read the
/// addresses back). Runs until `shutdown` completes, then drains as [`crate::serve`] does.
pub async fn serve_with_listeners(
    config_path: PathBuf,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    serve_draining(
        config_path,
        proxy_listener,
        admin_listener,
        render_metrics,
        shutdown,
        Duration::ZERO,
        crate::Edge::default(),
        default_workers(),
    )
    .await
}

/// One worker per core, as nginx's `worker_processes auto`.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// [`serve_with_listeners`], keeping on serving for `drain` once `shutdown` completes with
/// `Connection: close` on every response, so clients move their keep-alive connections (to a
/// replacement on the same socket, say) before this gateway closes the idle ones. Requests
/// from `edge`'s trusted proxies are attributed to the client their `X-Forwarded-For` names,
/// and its documents are served where no route matches. Proxied connections are served by
/// `workers` threads (at least one), each with its own runtime and upstream pools.
#[allow(clippy::too_many_arguments)]
pub async fn serve_draining(
    config_path: PathBuf,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    render_metrics: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
    edge: crate::Edge,
    workers: usize,
) -> Result<(), GatewayError> {
    crate::describe_metrics();
    let loaded = crate::loaded::load_file(&config_path).map_err(|problems| GatewayError::Config {
        path: config_path.clone(),
        problems,
    })?;
    let workers = Workers::start(workers).map_err(GatewayError::Workers)?;
    tracing::info!(config = %config_path.display(), summary = %loaded.config.summary(), "gateway config loaded");
    let render: RenderMetrics = render_metrics;
    let shared = Shared::new(loaded, config_path, render, edge, workers.count());
    let draining = shared.clone();
    let (stop, stopped) = watch::channel(false);
    let tasks = [
        tokio::spawn(accept_loop(
            proxy_listener,
            shared.clone(),
            stopped.clone(),
            Role::Proxy,
            Some(workers),
        )),
        tokio::spawn(accept_loop(
            admin_listener,
            shared.clone(),
            stopped.clone(),
            Role::Admin,
            None,
        )),
        tokio::spawn(watch_config(shared, stopped)),
    ];
    shutdown.await;
    if !drain.is_zero() {
        tracing::info!(
            drain_ms = drain.as_millis() as u64,
            "gateway stopping: asking clients to close their connections"
        );
        draining.draining.store(true, Ordering::Relaxed);
        tokio::time::sleep(drain).await;
    }
    tracing::info!("gateway shutting down; draining in-flight requests");
    // Every receiver lives in a task we await below, so a send error cannot happen here.
    let _ = stop.send(true);
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "gateway task failed");
        }
    }
    Ok(())
}

/// Accepts connections until `stop`; proxied ones are served by `workers` when there are
/// any, the rest on this runtime.
///
/// One piece: one listener's lifetime; the connection slot taken before accept travels with
/// the stream to a worker or this runtime, the drain watcher ties each connection to the
/// shutdown, and drain and worker stop run after the loop breaks.
async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    role: Role,
    workers: Option<Workers>,
) {
    let drain = Drain::new();
    let cap = match role {
        Role::Proxy => MAX_PROXY_CONNECTIONS,
        Role::Admin => MAX_ADMIN_CONNECTIONS,
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(cap));
    let mut warned: Option<std::time::Instant> = None;
    loop {
        // At the cap, new connections wait in the kernel's backlog rather than take
        // descriptors and memory from the clients already being served.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    tracing::warn!(listener = ?role, cap, "connection cap {cap} reached on the gateway's {role:?} listener; new connections wait");
                    warned = Some(std::time::Instant::now());
                }
                metrics::counter!("bazaar_gateway_connection_cap_reached_total").increment(1);
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(local) = stream.local_addr() else { continue };
        let _ = stream.set_nodelay(true);
        let watcher = drain.watcher();
        let shared = shared.clone();
        match (role, &workers) {
            (Role::Proxy, Some(workers)) => {
                shared.stats.connections_accepted.fetch_add(1, Ordering::Relaxed);
                shared.stats.connections_handled.fetch_add(1, Ordering::Relaxed);
                // The socket leaves this runtime's reactor and joins the worker's.
                let stream = match stream.into_std() {
                    Ok(stream) => stream,
                    Err(error) => {
                        tracing::warn!(%error, %peer, "cannot hand a connection to a worker");
                        continue;
                    }
                };
                workers.run(Box::new(move || match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        tokio::spawn(serve_connection(stream, peer, local, shared, role, slot, watcher));
                    }
                    Err(error) => tracing::warn!(%error, %peer, "a worker cannot take a connection"),
                }));
            }
            _ => {
                tokio::spawn(serve_connection(stream, peer, local, shared, role, slot, watcher));
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_DEADLINE, drain.shutdown()).await.is_err() {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    if let Some(workers) = workers {
        workers.stop().await;
    }
}

/// Serves one accepted connection until it closes or the drain ends it.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    shared: Arc<Shared>,
    role: Role,
    slot: OwnedSemaphorePermit,
    watcher: DrainWatcher,
) {
    let _slot = slot;
    let _active = (role == Role::Proxy).then(|| CountGuard::new(&shared.stats.connections_active));
    let for_requests = shared.clone();
    let ends = proxy::Connection::new(peer, local);
    let requests = Requests::default();
    let begun = requests.clone();
    let service = service_fn(move |request| {
        begun.begin();
        let shared = for_requests.clone();
        let ends = ends.clone();
        async move {
            let mut response = match role {
                Role::Proxy => proxy::handle(shared.clone(), request, ends).await,
                Role::Admin => admin::handle(&shared, &request),
            };
            if shared.draining.load(Ordering::Relaxed) {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(response)
        }
    });
    // A header deadline stops idle or slow-loris clients from holding connections forever.
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(error) = watcher.watch(connection, requests).await {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

/// Identifies a version of the file cheaply: modification time and length.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reloads on SIGHUP and whenever the file changes; a bad file is logged and ignored.
async fn watch_config(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let path = shared.config_path.clone();
    let mut last = file_stamp(&path);
    let mut hangup = hangup_signal();
    let mut poll = tokio::time::interval(RELOAD_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = poll.tick() => false,
            _ = next_hangup(&mut hangup) => true,
            _ = stop.changed() => return,
        };
        let stamp = file_stamp(&path);
        if !forced && stamp == last {
            continue;
        }
        last = stamp;
        match crate::loaded::load_file(&path) {
            Ok(loaded) => {
                tracing::info!(config = %path.display(), summary = %loaded.config.summary(), forced, "gateway config reloaded");
                shared.install(loaded);
            }
            Err(problems) => {
                tracing::error!(config = %path.display(), problems = %problems.lines().join("; "), "new gateway config rejected; keeping the old one");
            }
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

/// Resolves on the next SIGHUP; never, where there is none.
async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup {
        signal.recv().await;
        return;
    }
    #[cfg(not(unix))]
    let _ = hangup;
    std::future::pending::<()>().await
}
