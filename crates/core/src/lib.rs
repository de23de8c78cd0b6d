//! What every bazaar crate shares and nothing heavy: the envelope messages travel in, the
//! message contract and its schema checker, the saga's wire types, the stop signal, and the
//! guards for calls that can cascade. No database, broker, TLS or HTTP server in here, so
//! that `bazaar-contracts` (and anyone reading the messages) builds on this alone.
//!
//! - [`context`]: the correlation id and trace context of the request or event being served.
//! - [`envelope`]: the event envelope on the wire.
//! - [`message`]: each message type a topic carries, with its payload schema; [`schema`]
//!   checks payloads against it.
//! - [`saga`]: the saga command header, reply and verdict.
//! - [`shutdown`]: the stop signal every background task listens to.
//! - [`resilience`]: circuit breaker and jittered backoff.

pub mod context;
pub mod envelope;
pub mod message;
pub mod resilience;
pub mod saga;
pub mod schema;
pub mod shutdown;
