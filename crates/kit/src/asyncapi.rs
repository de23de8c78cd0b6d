//! The events as a contract: each message type a topic carries, with its payload's JSON
//! Schema generated from the Rust type that reads and writes it. [`Contract`] checks an
//! incoming envelope against it (a consumer dead-letters one that breaks it, with the
//! reason), and [`document`] writes it as an AsyncAPI 3.0 document with who publishes and
//! who consumes each topic.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::envelope::Envelope;
use crate::saga::CommandHeader;
use crate::schema::{SchemaError, Schemas};
use crate::service::ServiceSpec;

/// What a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    /// A domain event: something that happened.
    Event,
    /// A saga command: its payload also carries the engine's routing fields
    /// ([`CommandHeader`]).
    Command,
    /// A participant's reply to a saga command.
    Reply,
}

/// The schema of a payload type and of every type it refers to, by name.
#[derive(Debug, Clone)]
pub struct PayloadSchema {
    /// The payload type's schema name.
    pub name: String,
    /// It and the schemas it refers to.
    pub schemas: Vec<(String, Value)>,
}

/// The schema of `T`, for [`MessageSpec::payload`].
pub fn schema_of<T: ToSchema>() -> PayloadSchema {
    let mut refs = Vec::new();
    T::schemas(&mut refs);
    let mut schemas = vec![(T::name().into_owned(), to_json(T::schema()))];
    schemas.extend(refs.into_iter().map(|(name, schema)| (name, to_json(schema))));
    PayloadSchema {
        name: T::name().into_owned(),
        schemas,
    }
}

fn to_json(schema: impl serde::Serialize) -> Value {
    serde_json::to_value(schema).unwrap_or_else(|_| json!({}))
}

/// One message type: its `eventType`, the topic that carries it and its payload.
#[derive(Debug)]
pub struct MessageSpec {
    /// The envelope's `eventType`.
    pub event_type: &'static str,
    /// The topic it travels on.
    pub topic: &'static str,
    /// Event, command or reply.
    pub kind: MessageKind,
    /// One line on what it means.
    pub summary: &'static str,
    /// The payload's schema.
    pub payload: fn() -> PayloadSchema,
}

impl MessageSpec {
    /// Its id in documents (ids may not contain `.`).
    fn id(&self) -> String {
        self.event_type.replace('.', "_")
    }
}

/// Every message's payload schema, ready to check envelopes against.
#[derive(Debug, Clone)]
pub struct Contract {
    schemas: Schemas,
    payloads: HashMap<&'static str, Value>,
}

impl Contract {
    /// The contract of `messages`; refused if a schema uses what the checker cannot assert.
    pub fn new(messages: &[MessageSpec]) -> Result<Contract, SchemaError> {
        let (named, payloads) = collect(messages.iter());
        Ok(Contract {
            schemas: Schemas::new(named)?,
            payloads: payloads.into_iter().map(|(t, (_, s))| (t, s)).collect(),
        })
    }

    /// Checks `event`'s payload against its type's schema: `Err` says where and how it
    /// breaks it. A type the contract does not list is left to the handler.
    pub fn check(&self, event: &Envelope) -> Result<(), String> {
        let Some(schema) = self.payloads.get(event.event_type.as_str()) else {
            return Ok(());
        };
        self.schemas
            .check(schema, &event.payload)
            .map_err(|e| format!("payload of `{}` does not match its schema: {e}", event.event_type))
    }
}

/// Each event type's spec and payload schema.
type Payloads<'a> = BTreeMap<&'static str, (&'a MessageSpec, Value)>;

/// The named schemas of `messages` (with the command header), and each type's payload
/// schema with its spec.
fn collect<'a>(messages: impl Iterator<Item = &'a MessageSpec>) -> (BTreeMap<String, Value>, Payloads<'a>) {
    let mut named = BTreeMap::new();
    let header = schema_of::<CommandHeader>();
    named.extend(header.schemas.iter().cloned());
    let mut payloads = BTreeMap::new();
    for message in messages {
        let payload = (message.payload)();
        named.extend(payload.schemas.iter().cloned());
        let own = json!({ "$ref": format!("#/components/schemas/{}", payload.name) });
        let schema = match message.kind {
            MessageKind::Command => json!({
                "allOf": [{ "$ref": format!("#/components/schemas/{}", header.name) }, own]
            }),
            MessageKind::Event | MessageKind::Reply => own,
        };
        payloads.insert(message.event_type, (message, schema));
    }
    (named, payloads)
}

/// The AsyncAPI 3.0 document of `messages` as `services` publish and consume them: a channel
/// per topic, a message per event type (the envelope with that type and payload), and for
/// each service a `send` operation per topic it publishes and a `receive` per topic it
/// consumes. Only the topics the services use are described.
pub fn document(title: &str, description: &str, services: &[&ServiceSpec], messages: &[MessageSpec]) -> Value {
    let used = |topic: &str| {
        services
            .iter()
            .any(|s| s.publishes.contains(&topic) || s.consumes.contains(&topic))
    };
    let (mut named, payloads) = collect(messages.iter().filter(|m| used(m.topic)));
    named.insert("Envelope".into(), envelope_schema());
    let mut channels = serde_json::Map::new();
    let mut components_messages = serde_json::Map::new();
    for (event_type, (message, payload)) in &payloads {
        let id = message.id();
        components_messages.insert(
            id.clone(),
            json!({
                "name": event_type,
                "title": event_type,
                "summary": message.summary,
                "contentType": "application/json",
                "payload": {
                    "allOf": [
                        { "$ref": "#/components/schemas/Envelope" },
                        {
                            "type": "object",
                            "properties": { "eventType": { "const": event_type }, "payload": payload }
                        }
                    ]
                },
                "x-bazaar-kind": match message.kind {
                    MessageKind::Event => "event",
                    MessageKind::Command => "command",
                    MessageKind::Reply => "reply",
                },
            }),
        );
        let channel = channels.entry(channel_id(message.topic)).or_insert_with(|| {
            json!({
                "address": message.topic,
                "description": format!("The `{}` topic: a consumer group per consuming service, each reading every message once.", message.topic),
                "messages": {}
            })
        });
        channel["messages"][&id] = json!({ "$ref": format!("#/components/messages/{id}") });
    }
    let mut operations = serde_json::Map::new();
    for spec in services {
        for (action, topics) in [("send", spec.publishes), ("receive", spec.consumes)] {
            for topic in topics {
                let channel = channel_id(topic);
                let Some(declared) = channels.get(&channel) else {
                    continue;
                };
                let refs: Vec<Value> = declared["messages"]
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.keys())
                    .map(|id| json!({ "$ref": format!("#/channels/{channel}/messages/{id}") }))
                    .collect();
                let verb = if action == "send" { "publishes to" } else { "consumes" };
                operations.insert(
                    format!("{}_{action}_{channel}", spec.name),
                    json!({
                        "action": action,
                        "channel": { "$ref": format!("#/channels/{channel}") },
                        "summary": format!("{} {verb} `{topic}`", spec.name),
                        "messages": refs,
                        "x-bazaar-service": spec.name,
                    }),
                );
            }
        }
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": title,
            "version": env!("CARGO_PKG_VERSION"),
            "description": description,
            "license": { "name": "MIT" }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": components_messages,
            "schemas": named,
        }
    })
}

/// Where each role serves the document of what it publishes and consumes.
pub const PATH: &str = "/asyncapi.json";

/// A router serving `doc` at [`PATH`].
pub fn routes(doc: Value) -> axum::Router {
    crate::openapi::json_route(PATH, doc)
}

/// Channel ids may not contain every character a topic may.
fn channel_id(topic: &str) -> String {
    topic.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_")
}

/// The envelope every message travels in (see [`Envelope`]).
fn envelope_schema() -> Value {
    json!({
        "type": "object",
        "description": "Every message's wrapper: camelCase JSON; unknown fields are kept and ignored.",
        "required": ["eventId", "eventType", "aggregateId", "timestamp", "version", "payload"],
        "properties": {
            "eventId": { "type": "string", "format": "uuid", "description": "UUIDv7; the de-duplication key in broker and inbox." },
            "eventType": { "type": "string", "description": "What the payload is." },
            "aggregateId": { "type": "string", "description": "The entity the message is about." },
            "timestamp": { "type": "string", "format": "date-time" },
            "version": { "type": "integer", "format": "int64", "description": "The aggregate's version after the change." },
            "payload": { "description": "The message's own data (see each message)." },
            "metadata": {
                "type": "object",
                "properties": {
                    "correlationId": { "type": "string" },
                    "causationId": { "type": ["string", "null"] },
                    "traceparent": { "type": ["string", "null"] },
                    "source": { "type": "string", "description": "The publishing service." }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_envelope_schema_names_every_field_an_envelope_is_written_with() {
        let meta = crate::envelope::Metadata {
            correlation_id: "c".into(),
            causation_id: Some("e".into()),
            traceparent: Some("00-1-2-01".into()),
            source: "orders".into(),
            extra: Default::default(),
        };
        let written = serde_json::to_value(Envelope::new("t", "a", json!({}), meta)).unwrap();
        let schema = envelope_schema();
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        for key in keys(&written) {
            assert!(
                schema["properties"][&key].is_object(),
                "envelope field {key} is not in the schema"
            );
        }
        for key in keys(&written["metadata"]) {
            assert!(
                schema["properties"]["metadata"]["properties"][&key].is_object(),
                "metadata field {key} is not in the schema"
            );
        }
        let named = BTreeMap::from([("Envelope".to_string(), schema.clone())]);
        let checker = Schemas::new(named).unwrap();
        assert_eq!(
            checker.check(&json!({ "$ref": "#/components/schemas/Envelope" }), &written),
            Ok(())
        );
    }
}
