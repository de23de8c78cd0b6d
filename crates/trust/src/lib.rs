//! Security-relevant code the gateway and the services share, written once. The gateway
//! avoids the kit (it must stay small and fast to start); this crate is what it may depend
//! on, and it depends on no other bazaar crate.
//!
//! - [`token`]: where the users role publishes its token keys, how long a verifier trusts
//!   them, and how a JWKS document's Ed25519 keys are read.
//! - [`der`]: reading DER elements (public keys, certificate extensions).
//! - [`traceparent`]: the W3C trace context header, parsed as the recommendation asks.
//! - [`files`]: writing a file only its owner may read, atomically.

pub mod der;
pub mod files;
pub mod token;
pub mod traceparent;
