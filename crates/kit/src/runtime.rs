//! What every service role starts with: its own store (migrated), the outbox relay, the
//! broker, and an HTTP listener with the shared layers, all stopped by one [`Shutdown`].
//!
//! The runtime owns every background task a role starts (relay, consumers, timers, gauges):
//! they are spawned on its task set, and [`Runtime::serve`] returns only after HTTP has
//! drained and each of them has finished its unit of work or handed it back.

use crate::store;
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use axum::Router;
use tokio_util::task::TaskTracker;

use crate::{
    auth::Verifier,
    broker::{self, BrokerError, SharedBroker},
    consumer::{self, ConsumerConfig, Handler},
    health::{Draining, Health},
    mesh::Tls,
    outbox::{self, Outbox},
    policy::PolicyGuard,
    service::ServiceSpec,
    shutdown::Shutdown,
    store::{Migration, PoolOptions, Store, StoreError},
};

/// Outbox lag beyond which a role reports itself degraded.
pub const OUTBOX_LAG_LIMIT: Duration = Duration::from_secs(60);

/// How long a stopping role waits for its background tasks once HTTP has drained. Each
/// stops after its current delivery or round (short transactions), so this is a backstop;
/// whatever a task had not acked is redelivered to another instance.
pub const TASK_DRAIN_LIMIT: Duration = Duration::from_secs(20);

/// How often a role looks for renewed mesh certificates.
pub const MESH_RELOAD_PERIOD: Duration = Duration::from_secs(5);

/// Loads what changed of a workload's mesh files: a renewed certificate or rotated trust
/// bundle, and an edited policy. A file that cannot be used is logged and the one in use
/// kept. Every role runs it each [`MESH_RELOAD_PERIOD`]; so does anything else serving on
/// the mesh (the payment simulator).
pub fn reload_mesh(tls: &Tls, policy: Option<&PolicyGuard>) {
    match tls.reload_if_changed() {
        Ok(true) => tracing::info!(identity = %tls.identity(), "mesh: renewed certificate loaded"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "mesh: cannot load the renewed certificate; keeping the old one"),
    }
    match policy.map(PolicyGuard::reload_if_changed) {
        Some(Ok(true)) => tracing::info!("mesh: policy reloaded"),
        Some(Err(e)) => tracing::warn!(error = %e, "mesh: cannot load the edited policy; keeping the old one"),
        _ => {}
    }
}

/// Settings every service role reads (from flags or `BAZAAR_*` variables in the binary).
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// The role's own store: `sqlite://data/orders.db` or `postgres://…`.
    pub store_url: String,
    /// Most connections this instance opens to a PostgreSQL store.
    pub store_pool: u32,
    /// The broker: `sqlite://data/bus.db` or `nats://127.0.0.1:4222`.
    pub broker_url: String,
    /// How the role checks bearer tokens: users' JWKS ([`Verifier::jwks`]) when deployed,
    /// fixed keys in tests. The users role verifies with its own key ring instead.
    pub tokens: Verifier,
    /// How long a stopping instance answers not-ready (and keeps serving) before it stops
    /// accepting, so load balancers take it out first. Zero for a lone instance.
    pub drain_delay: Duration,
    /// A listening socket inherited from the supervisor (`bazaar up` passes each instance
    /// its port's socket, so a replacement accepts from the same queue and nothing queued is
    /// refused while one process hands over to the next); bind `listen` when `None`.
    pub listen_fd: Option<std::os::fd::RawFd>,
    /// The role's mesh certificate: its API listener then speaks only mutual TLS and every
    /// request names its caller. `None` serves plain HTTP.
    pub mesh: Option<Arc<Tls>>,
    /// Where `/health*` and `/metrics` are also served in plain HTTP, and nothing else, for
    /// probes and scrapers that hold no mesh certificate.
    pub admin_listen: Option<SocketAddr>,
    /// An inherited socket for the admin listener (as `listen_fd`).
    pub admin_listen_fd: Option<std::os::fd::RawFd>,
    /// The mesh's authorization policy (see [`crate::policy`]): who may call which routes of
    /// this role over the mesh. Without one, any certificate from the mesh CA may call.
    pub mesh_policy: Option<std::path::PathBuf>,
    /// Where roles are reached by name over the mesh (`bazaar up`: every role at 127.0.0.1);
    /// empty: names resolve through DNS.
    pub mesh_peers: Vec<(String, std::net::IpAddr)>,
}

/// Why a role could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The store failed to open or migrate.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The broker could not be reached.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
    /// The listener could not bind or serve.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// A setting is unusable.
    #[error("bad configuration: {0}")]
    Config(String),
}

/// A started role's shared parts.
#[derive(Clone)]
pub struct Runtime {
    /// What the role is: name (event source, consumer group), tables, topics, routes.
    pub spec: &'static ServiceSpec,
    /// Its own store.
    pub store: Store,
    /// Its outbox (the relay is running).
    pub outbox: Outbox,
    /// The broker.
    pub broker: SharedBroker,
    /// Checks bearer tokens (the routers' `AuthUser` extractor uses it).
    pub tokens: Verifier,
    /// Fires when the role must stop.
    pub shutdown: Shutdown,
    /// Every background task of the role; [`Runtime::serve`] waits for them.
    tasks: TaskTracker,
    /// Set when shutdown starts; readiness fails from then on.
    pub draining: Draining,
    drain_delay: Duration,
    listen_fd: Option<std::os::fd::RawFd>,
    mesh: Option<Arc<Tls>>,
    policy: Option<Arc<PolicyGuard>>,
    admin_listen: Option<SocketAddr>,
    admin_listen_fd: Option<std::os::fd::RawFd>,
    /// The message schemas its consumers hold incoming payloads to.
    contract: Arc<crate::asyncapi::Contract>,
    /// The consumers it runs, for replaying their dead letters.
    pub consumers: crate::deadletters::Consumers,
}

/// Every migration of `spec`'s store: the kit's and the service's, interleaved by version
/// (1, 2 saga, 3, 10…).
pub fn migrations(spec: &ServiceSpec) -> Result<Vec<Migration>, ServiceError> {
    let mut all: Vec<Migration> = outbox::MIGRATIONS.iter().chain(spec.migrations).cloned().collect();
    all.sort_by_key(|m| m.version);
    // A store records versions, not names: a second migration with a taken version would
    // never run.
    if let Some(pair) = all.windows(2).find(|pair| pair[0].version == pair[1].version) {
        return Err(ServiceError::Config(format!(
            "{} lists migrations {} and {} both as version {}",
            spec.name, pair[0].name, pair[1].name, pair[0].version
        )));
    }
    Ok(all)
}

impl Runtime {
    /// Opens and migrates the store (outbox and inbox tables first, then the spec's),
    /// connects the broker and starts the outbox relay.
    pub async fn start(
        spec: &'static ServiceSpec,
        config: &RoleConfig,
        shutdown: Shutdown,
    ) -> Result<Runtime, ServiceError> {
        let policy = match (&config.mesh, &config.mesh_policy) {
            (Some(_), Some(file)) => Some(Arc::new(
                PolicyGuard::load(spec.name, file.clone()).map_err(|e| ServiceError::Config(e.to_string()))?,
            )),
            (Some(_), None) => {
                tracing::warn!(
                    role = spec.name,
                    "no mesh policy: any certificate from the mesh CA may call every route"
                );
                None
            }
            (None, _) => None,
        };
        let contract = crate::asyncapi::Contract::new(spec.messages)
            .map_err(|e| ServiceError::Config(format!("message contract: {e}")))?;
        crate::telemetry::describe(crate::telemetry::METRICS);
        crate::telemetry::describe(spec.metrics);
        let store = Store::open_with(&config.store_url, PoolOptions::new(spec.name, config.store_pool)).await?;
        store.migrate(&migrations(spec)?).await?;
        let broker = broker::connect(&config.broker_url).await?;
        let outbox = Outbox::new(store.clone());
        let rt = Runtime {
            spec,
            store,
            outbox,
            broker,
            tokens: config.tokens.clone(),
            shutdown,
            tasks: TaskTracker::new(),
            draining: Draining::default(),
            drain_delay: config.drain_delay,
            listen_fd: config.listen_fd,
            mesh: config.mesh.clone(),
            policy,
            admin_listen: config.admin_listen,
            admin_listen_fd: config.admin_listen_fd,
            contract: Arc::new(contract),
            consumers: crate::deadletters::Consumers::default(),
        };
        if let Some(tls) = rt.mesh.clone() {
            // Renewed certificates, a rotated trust bundle and an edited policy apply without
            // a restart.
            let policy = rt.policy.clone();
            rt.every(MESH_RELOAD_PERIOD, move || {
                let (tls, policy) = (tls.clone(), policy.clone());
                async move { reload_mesh(&tls, policy.as_deref()) }
            });
        }
        rt.own(
            "outbox relay",
            rt.outbox.spawn_relay(rt.broker.clone(), rt.shutdown.clone()),
        );
        tracing::info!(role = spec.name, store = %config.store_url.split('@').next_back().unwrap_or_default(), broker = rt.broker.kind(), "started");
        Ok(rt)
    }

    /// The role's name.
    pub fn name(&self) -> &'static str {
        self.spec.name
    }

    /// Runs `task` as one of the role's background tasks; it must end once
    /// [`Runtime::shutdown`] fires.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Takes ownership of a task a kit component spawned, so `serve` waits for it too.
    pub fn own(&self, name: &'static str, handle: tokio::task::JoinHandle<()>) {
        self.tasks.spawn(async move {
            if let Err(e) = handle.await {
                tracing::error!(task = name, error = %e, "background task failed");
            }
        });
    }

    /// A consumer config for `topic` in this role's group, to adjust before [`Runtime::consume`].
    pub fn consumer(&self, topic: &str) -> ConsumerConfig {
        ConsumerConfig::new(self.spec.name, topic)
    }

    /// Starts `config.tasks` runners of `handler`, owned by the runtime, holding payloads to
    /// the message contract. A topic the spec does not list is refused, so the role table
    /// (and the audit that reads it) stays true.
    pub fn consume(&self, mut config: ConsumerConfig, handler: Arc<dyn Handler>) -> Result<(), ServiceError> {
        config.contract = Some(self.contract.clone());
        if config.group != self.spec.name || !self.spec.consumes(&config.topic) {
            return Err(ServiceError::Config(format!(
                "{} would consume {} as group {}, but its ServiceSpec lists only {:?} for group {}",
                self.spec.name, config.topic, config.group, self.spec.consumes, self.spec.name
            )));
        }
        self.consumers.add(config.clone(), handler.clone());
        let handles = consumer::spawn(
            self.outbox.clone(),
            self.broker.clone(),
            config,
            handler,
            self.shutdown.clone(),
        );
        for handle in handles {
            self.own("consumer", handle);
        }
        Ok(())
    }

    /// Health checks for the store, the broker and the outbox (down when its oldest unsent
    /// event is older than [`OUTBOX_LAG_LIMIT`]: events are piling up).
    pub fn health(&self) -> Health {
        let outbox = self.outbox.clone();
        Health::new(self.spec.name, self.draining.clone())
            .database(self.store.clone())
            .broker(self.broker.clone())
            .check("outbox", move || {
                let outbox = outbox.clone();
                Box::pin(async move {
                    let (unsent, age_ms) = outbox.lag().await.map_err(|e| e.to_string())?;
                    if age_ms > OUTBOX_LAG_LIMIT.as_millis() as u64 {
                        Err(format!("{unsent} events unsent, oldest {}s old", age_ms / 1000))
                    } else {
                        Ok(())
                    }
                })
            })
    }

    /// Keeps gauge `name` set to what `sql` (one BIGINT) returns, re-read every 10 s, for
    /// business figures cheap enough to count (units on hand, money in wallets).
    pub fn spawn_gauge(&self, name: &'static str, sql: &'static str) {
        let store = self.store.clone();
        self.every(Duration::from_secs(10), move || {
            let store = store.clone();
            async move {
                match store::query(sql).fetch_scalar::<i64>(&store).await {
                    Ok(v) => metrics::gauge!(name).set(v as f64),
                    Err(e) => tracing::debug!(gauge = name, error = %e, "gauge query failed"),
                }
            }
        });
    }

    /// Runs `round` now and then `period` after each round ends, as one of the role's tasks,
    /// until shutdown. A round in progress finishes before the task ends.
    pub fn every<F, Fut>(&self, period: Duration, mut round: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let mut shutdown = self.shutdown.clone();
        self.spawn(async move {
            loop {
                round().await;
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(period) => {}
                }
            }
        });
    }

    /// Serves `api` plus `health`'s routes on `addr` (and health alone on the admin
    /// listener, when configured) until shutdown.
    pub async fn serve(&self, addr: SocketAddr, api: Router, health: Health) -> Result<(), ServiceError> {
        let listener = listen(addr, self.listen_fd).await?;
        let admin = match (self.admin_listen, self.admin_listen_fd) {
            (Some(addr), fd) => Some(listen(addr, fd).await?),
            (None, Some(fd)) => Some(listen(([127, 0, 0, 1], 0).into(), Some(fd)).await?),
            (None, None) => None,
        };
        self.serve_with_admin(listener, admin, api, health).await
    }

    /// Serves on an already bound listener (tests bind port 0); once shutdown fires and HTTP
    /// has drained, waits for every background task (up to [`TASK_DRAIN_LIMIT`]).
    pub async fn serve_on(
        &self,
        listener: tokio::net::TcpListener,
        api: Router,
        health: Health,
    ) -> Result<(), ServiceError> {
        self.serve_with_admin(listener, None, api, health).await
    }

    /// Serves the API on `listener` (over mutual TLS when the role has a mesh certificate)
    /// and health alone on `admin` in plain HTTP; once shutdown fires and both have drained,
    /// waits for every background task (up to [`TASK_DRAIN_LIMIT`]).
    pub async fn serve_with_admin(
        &self,
        listener: tokio::net::TcpListener,
        admin: Option<tokio::net::TcpListener>,
        api: Router,
        health: Health,
    ) -> Result<(), ServiceError> {
        let addr = listener.local_addr().map_err(|source| ServiceError::Listen {
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        let health = health.routes().merge(self.documents());
        let router = self.app_with(api, health.clone());
        let mode = if self.mesh.is_some() {
            "mutual TLS"
        } else {
            "plain HTTP"
        };
        tracing::info!(role = self.spec.name, %addr, mode, "listening");
        let router = match &self.policy {
            Some(policy) => policy.guard(router),
            None => router,
        };
        let api_served = async {
            match &self.mesh {
                Some(tls) => crate::mesh::serve_mtls(listener, router, tls.clone(), self.stopping()).await,
                None => crate::http::serve_plain(listener, router, self.spec.name, self.stopping()).await,
            }
            .map_err(|source| ServiceError::Listen { addr, source })
        };
        let admin_served = async {
            let Some(admin) = admin else { return Ok(()) };
            let admin_addr = admin.local_addr().unwrap_or(addr);
            tracing::info!(role = self.spec.name, addr = %admin_addr, "health and metrics listening (plain HTTP)");
            crate::http::serve_plain(admin, crate::http::finish(health), "admin", self.stopping())
                .await
                .map_err(|source| ServiceError::Listen {
                    addr: admin_addr,
                    source,
                })
        };
        let (api, admin) = tokio::join!(api_served, admin_served);
        api?;
        admin?;
        self.stop_tasks().await;
        Ok(())
    }

    /// Resolves when a stopping role should stop accepting: after shutdown fires, readiness
    /// turns false, and the drain delay passes.
    fn stopping(&self) -> impl Future<Output = ()> + Send + 'static {
        let (mut stop, draining, delay) = (self.shutdown.clone(), self.draining.clone(), self.drain_delay);
        async move {
            stop.wait().await;
            if !draining.is_draining() && !delay.is_zero() {
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    "draining: not ready, still serving"
                );
            }
            draining.start();
            tokio::time::sleep(delay).await;
        }
    }

    /// The role's whole HTTP app as it is served: `api` plus `health`'s routes, the token
    /// verifier and the shared layers. Tests call it without a socket.
    pub fn app(&self, api: Router, health: Health) -> Router {
        self.app_with(api, health.routes().merge(self.documents()))
    }

    /// The role's contract documents (its API, and the messages it publishes and consumes),
    /// served beside health on both listeners.
    fn documents(&self) -> Router {
        let events = crate::asyncapi::document(
            &format!("bazaar {} events", self.spec.name),
            "The messages this service publishes and consumes.",
            &[self.spec],
            self.spec.messages,
        );
        crate::openapi::routes(crate::openapi::service_document(self.spec)).merge(crate::asyncapi::routes(events))
    }

    /// `api` with the role's dead-letter routes, `health`, the token verifier and the shared
    /// layers.
    fn app_with(&self, api: Router, health: Router) -> Router {
        let desk = crate::deadletters::Desk {
            role: self.name(),
            topics: self.spec.consumes,
            broker: self.broker.clone(),
            outbox: self.outbox.clone(),
            consumers: self.consumers.clone(),
        };
        let dead_letters = crate::deadletters::api().split_for_parts().0.with_state(desk);
        let api = api.merge(dead_letters);
        crate::http::finish(api.merge(health).layer(axum::Extension(self.tokens.clone())))
    }

    /// Waits for every background task to end (they watch [`Runtime::shutdown`]).
    async fn stop_tasks(&self) {
        self.tasks.close();
        if tokio::time::timeout(TASK_DRAIN_LIMIT, self.tasks.wait()).await.is_err() {
            tracing::warn!(
                role = self.spec.name,
                left = self.tasks.len(),
                "background tasks still running after the drain limit; exiting anyway"
            );
        } else {
            tracing::info!(role = self.spec.name, "every background task finished");
        }
    }
}

/// The inherited socket `fd`, or a new one bound to `addr`.
async fn listen(addr: SocketAddr, fd: Option<std::os::fd::RawFd>) -> Result<tokio::net::TcpListener, ServiceError> {
    match fd {
        Some(fd) => inherited_listener(fd).map_err(|source| ServiceError::Listen { addr, source }),
        None => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServiceError::Listen { addr, source }),
    }
}

/// The listening socket at `fd`, inherited from the process that started this one.
pub fn inherited_listener(fd: std::os::fd::RawFd) -> std::io::Result<tokio::net::TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` names a listening TCP socket the supervisor passed for this purpose and
    // nothing else in the process owns; it is taken once.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}
