//! What every service role is built on: its HTTP side, its runtime, and the mesh policy, knowing
//! nothing of any shop. The layers below live in crates of their own and are re-exported
//! here, so a service can name them through the kit (the saga engine, `bazaar_saga`, is
//! not: only the roles in a saga depend on it):
//!
//! - `bazaar_core`: [`envelope`], [`schema`], [`shutdown`], [`resilience`] (its message
//!   contract and saga wire types are used from `bazaar_core` itself).
//! - `bazaar_store`: the [`store`] (a service's database from a URL).
//! - `bazaar_messaging`: [`outbox`], [`broker`], [`inbox`] and the [`consumer`] runner.
//! - `bazaar_mesh`: the [`mesh`]: workload identity, the CA, certificates, mutual TLS.
//!
//! Its own modules:
//!
//! - [`http`], [`health`], [`auth`], [`telemetry`]: what every role's HTTP side shares;
//!   `bazaar_drain` stops a listener without leaving a request unanswered; [`otlp`]
//!   exports traces when a collector is configured.
//! - [`client`]: the one outbound HTTP client stack (timeout, retry budget, breaker, bulkhead).
//! - [`policy`]: which workload may call which route over the mesh.
//! - [`openapi`], [`asyncapi`]: each role's API documents; [`deadletters`]: its dead-letter API.
//! - [`service`]: what a service is (name, tables, topics, routes), for the role table.
//! - [`runtime`]: what every service role starts with, and the owner of its tasks.

pub use bazaar_core::{envelope, resilience, schema, shutdown};
pub use bazaar_mesh as mesh;
pub use bazaar_messaging::{broker, consumer, inbox, outbox};
pub use bazaar_store as store;

pub mod asyncapi;
pub mod auth;
pub mod client;
pub mod deadletters;
pub mod health;
pub mod http;
pub mod openapi;
pub mod otlp;
pub mod policy;
pub mod runtime;
pub mod service;
pub mod telemetry;
