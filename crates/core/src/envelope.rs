//! The event envelope every message on the broker travels in (docs/architecture.md, "Messaging").
//!
//! Fields this version does not know are kept in `extra` maps and written back when the
//! event is relayed, so an older service never strips what a newer one added.

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Where an event came from and which request it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    /// The id of the client request the event descends from; the same across every hop.
    #[serde(default)]
    pub correlation_id: String,
    /// The id of the event or command that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// W3C trace context of the work that produced the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The role that produced the event.
    #[serde(default)]
    pub source: String,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An event or command as it travels through outbox, broker and inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Unique id (UUIDv7); the de-duplication key in broker and inbox.
    pub event_id: Uuid,
    /// What happened, e.g. `order.created`.
    pub event_type: String,
    /// The entity the event is about.
    pub aggregate_id: String,
    /// When it happened (UTC).
    pub timestamp: DateTime<Utc>,
    /// The aggregate's version after the change, for consumers that check order.
    pub version: i64,
    /// The event's own data.
    pub payload: Value,
    /// Correlation, causation, tracing and origin.
    #[serde(default)]
    pub metadata: Metadata,
    /// Fields this version does not know.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Why bytes could not be read as an [`Envelope`] or its payload.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not JSON, or not the envelope's shape.
    #[error("malformed envelope: {0}")]
    Malformed(serde_json::Error),
    /// The payload does not match the event type's schema.
    #[error("payload of `{event_type}` does not match its schema: {source}")]
    Payload {
        /// The event type.
        event_type: String,
        /// The cause.
        source: serde_json::Error,
    },
}

impl Envelope {
    /// A new event with a fresh UUIDv7 id, stamped now.
    pub fn new(
        event_type: impl Into<String>,
        aggregate_id: impl Into<String>,
        payload: impl Serialize,
        metadata: Metadata,
    ) -> Envelope {
        Envelope {
            event_id: Uuid::now_v7(),
            event_type: event_type.into(),
            aggregate_id: aggregate_id.into(),
            timestamp: Utc::now(),
            version: 1,
            // Serialising our own plain structs to a Value cannot fail.
            payload: serde_json::to_value(payload).unwrap_or(Value::Null),
            metadata,
            extra: Map::new(),
        }
    }

    /// Sets the aggregate version.
    pub fn with_version(mut self, version: i64) -> Envelope {
        self.version = version;
        self
    }

    /// Parses wire bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
        serde_json::from_slice(bytes).map_err(EnvelopeError::Malformed)
    }

    /// Serialises to wire bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        // An Envelope holds only JSON-safe data, so this cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads the payload as `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, EnvelopeError> {
        serde_json::from_value(self.payload.clone()).map_err(|source| EnvelopeError::Payload {
            event_type: self.event_type.clone(),
            source,
        })
    }

    /// Metadata for an event caused by this one: same correlation and trace, this event as cause.
    pub fn caused_metadata(&self, source: &str) -> Metadata {
        Metadata {
            correlation_id: self.metadata.correlation_id.clone(),
            causation_id: Some(self.event_id.to_string()),
            traceparent: self.metadata.traceparent.clone(),
            source: source.to_string(),
            extra: Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_camel_case_and_keeps_unknown_fields() {
        let raw = r#"{"eventId":"0192f0c1-7a2b-7c3d-8e4f-0a1b2c3d4e5f","eventType":"order.created",
            "aggregateId":"o1","timestamp":"2026-11-24T10:00:00Z","version":3,"payload":{"a":1},
            "metadata":{"correlationId":"c1","causationId":"x","source":"orders","baggage":"k=v"},
            "schema":"v2"}"#;
        let e = Envelope::from_slice(raw.as_bytes()).unwrap();
        assert_eq!(e.event_type, "order.created");
        assert_eq!(e.version, 3);
        let back: Value = serde_json::from_slice(&e.to_vec()).unwrap();
        assert_eq!(back["schema"], "v2");
        assert_eq!(back["metadata"]["baggage"], "k=v");
        assert_eq!(back["metadata"]["correlationId"], "c1");
        assert!(back.get("eventId").is_some());
    }

    #[test]
    fn new_events_get_v7_ids() {
        let e = Envelope::new("x.happened", "a", serde_json::json!({}), Metadata::default());
        assert_eq!(e.event_id.get_version_num(), 7);
    }

    #[test]
    fn garbage_is_a_malformed_error() {
        assert!(matches!(
            Envelope::from_slice(b"{nope"),
            Err(EnvelopeError::Malformed(_))
        ));
    }
}
