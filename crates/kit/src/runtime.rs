//! What every service role starts with: its own store (migrated), the outbox relay, the
//! broker, and an HTTP listener with the shared layers, all stopped by one [`Shutdown`].

use std::net::SocketAddr;

use axum::Router;

use crate::{
    auth::JwtKeys,
    broker::{self, BrokerError, SharedBroker},
    health::Health,
    outbox::{self, Outbox},
    shutdown::Shutdown,
    store::{Migration, Store, StoreError},
};

/// Outbox lag beyond which a role reports itself degraded.
pub const OUTBOX_LAG_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Settings every service role reads (from flags or `BAZAAR_*` variables in the binary).
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// The role's own store: `sqlite://data/orders.db` or `postgres://…`.
    pub store_url: String,
    /// The broker: `sqlite://data/bus.db` or `nats://127.0.0.1:4222`.
    pub broker_url: String,
    /// The shared JWT secret.
    pub jwt_secret: String,
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
    /// The role's name, used as event source and in health output.
    pub role: &'static str,
    /// Its own store.
    pub store: Store,
    /// Its outbox (the relay is running).
    pub outbox: Outbox,
    /// The broker.
    pub broker: SharedBroker,
    /// Token keys.
    pub keys: JwtKeys,
    /// Fires when the role must stop.
    pub shutdown: Shutdown,
}

impl Runtime {
    /// Opens and migrates the store (outbox and inbox tables first, then `migrations`),
    /// connects the broker and starts the outbox relay.
    pub async fn start(
        role: &'static str,
        config: &RoleConfig,
        migrations: &[Migration],
        shutdown: Shutdown,
    ) -> Result<Runtime, ServiceError> {
        let store = Store::open(&config.store_url).await?;
        let all: Vec<Migration> = outbox::MIGRATIONS.iter().chain(migrations).cloned().collect();
        store.migrate(&all).await?;
        let broker = broker::connect(&config.broker_url).await?;
        let outbox = Outbox::new(store.clone());
        outbox.spawn_relay(broker.clone(), shutdown.clone());
        tracing::info!(role, store = %config.store_url.split('@').next_back().unwrap_or_default(), broker = broker.kind(), "started");
        Ok(Runtime {
            role,
            store,
            outbox,
            broker,
            keys: JwtKeys::new(&config.jwt_secret, std::time::Duration::from_secs(24 * 3600)),
            shutdown,
        })
    }

    /// Health checks for the store, the broker and the outbox (down when its oldest unsent
    /// event is older than [`OUTBOX_LAG_LIMIT`]: events are piling up).
    pub fn health(&self) -> Health {
        let outbox = self.outbox.clone();
        Health::new(self.role)
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
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                match sqlx::query_scalar::<_, i64>(sql).fetch_one(store.pool()).await {
                    Ok(v) => metrics::gauge!(name).set(v as f64),
                    Err(e) => tracing::debug!(gauge = name, error = %e, "gauge query failed"),
                }
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
                }
            }
        });
    }

    /// Serves `api` plus `health`'s routes on `addr` until shutdown.
    pub async fn serve(&self, addr: SocketAddr, api: Router, health: Health) -> Result<(), ServiceError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServiceError::Listen { addr, source })?;
        self.serve_on(listener, api, health).await
    }

    /// Serves on an already bound listener (tests bind port 0).
    pub async fn serve_on(
        &self,
        listener: tokio::net::TcpListener,
        api: Router,
        health: Health,
    ) -> Result<(), ServiceError> {
        let addr = listener.local_addr().map_err(|source| ServiceError::Listen {
            addr: ([0, 0, 0, 0], 0).into(),
            source,
        })?;
        let router = crate::http::finish(api.merge(health.routes()).layer(axum::Extension(self.keys.clone())));
        tracing::info!(role = self.role, %addr, "listening");
        crate::http::serve(listener, router, self.shutdown.clone())
            .await
            .map_err(|source| ServiceError::Listen { addr, source })
    }
}
