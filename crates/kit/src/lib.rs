//! Building blocks for event-driven services, knowing nothing of any shop. The light
//! shared part ([`envelope`], [`schema`], [`shutdown`], [`resilience`], the message
//! contract and the saga's wire types) lives in `bazaar_core`, and the [`store`] (with
//! [`sqlite`]) in `bazaar_store`; both are re-exported here.
//!
//! - [`store`]: a service's own database from a URL (SQLite or PostgreSQL) with migrations;
//!   [`sqlite`]: a SQLite file used inline, without a driver thread (the embedded broker's).
//! - [`envelope`]: the event envelope on the wire.
//! - [`outbox`] and [`inbox`]: publish in the same transaction as the change; handle each
//!   event once.
//! - [`broker`]: the durable log (embedded SQLite file or NATS JetStream) behind one trait.
//! - [`consumer`]: runs a handler over a subscription: inbox, retries, dead letters.
//! - [`saga`]: the durable orchestrated saga engine.
//! - [`http`], [`health`], [`auth`], [`telemetry`]: what every role's HTTP side shares;
//!   `bazaar_drain` stops a listener without leaving a request unanswered; [`otlp`]
//!   exports traces when a collector is configured.
//! - [`resilience`]: circuit breaker and jittered backoff for calls that can cascade.
//! - [`client`]: the one outbound HTTP client stack (timeout, retry budget, breaker, bulkhead).
//! - [`service`]: what a service is (name, tables, topics, routes), for the role table.
//! - [`runtime`]: what every service role starts with, and the owner of its tasks.
//! - [`shutdown`]: the stop signal every background task listens to.

pub use bazaar_core::{envelope, resilience, schema, shutdown};
pub use bazaar_store as store;
pub use bazaar_store::sqlite;

pub mod asyncapi;
pub mod auth;
pub mod broker;
pub mod client;
pub mod consumer;
pub mod deadletters;
pub mod health;
pub mod http;
pub mod inbox;
pub mod mesh;
pub mod openapi;
pub mod otlp;
pub mod outbox;
pub mod policy;
pub mod runtime;
pub mod saga;
pub mod service;
pub mod telemetry;
