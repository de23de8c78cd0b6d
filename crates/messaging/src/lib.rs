//! How services talk without losing or doubling a message: the [`outbox`] publishes in the
//! same transaction as the change, the [`broker`] (an embedded SQLite log or NATS
//! JetStream, behind one trait) carries it, and the [`consumer`] runner hands each message
//! to its handler once per group through the [`inbox`], with retries and dead letters.
//! Nothing here serves HTTP.

pub mod broker;
pub mod consumer;
pub mod inbox;
pub mod outbox;

// The shared pieces, under the names the modules use for them.
use bazaar_core::{envelope, resilience, shutdown};
use bazaar_store::{self as store, sqlite};
