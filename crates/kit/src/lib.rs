//! Building blocks for event-driven services, knowing nothing of any shop.
//!
//! - [`store`]: a service's own database from a URL (SQLite or PostgreSQL) with migrations.
//! - [`envelope`]: the event envelope on the wire.
//! - [`outbox`] and [`inbox`]: publish in the same transaction as the change; handle each
//!   event once.
//! - [`broker`]: the durable log (embedded SQLite file or NATS JetStream) behind one trait.
//! - [`shutdown`]: the stop signal every background task listens to.

pub mod broker;
pub mod envelope;
pub mod inbox;
pub mod outbox;
pub mod shutdown;
pub mod store;
