//! The events as an AsyncAPI 3.0 document: [`document`] writes the contract
//! (`bazaar_core::message`) with who publishes and who consumes each topic.

use serde_json::{json, Value};

use bazaar_core::message::collect;
pub use bazaar_core::message::{schema_of, Contract, MessageKind, MessageSpec, PayloadSchema};

use crate::service::ServiceSpec;

/// The AsyncAPI 3.0 document of `messages` as `services` publish and consume them: a channel
/// per topic, a message per event type (the envelope with that type and payload), and for
/// each service a `send` operation per topic it publishes and a `receive` per topic it
/// consumes. Only the topics the services use are described.
///
/// One piece: one AsyncAPI document; the message loop builds the channels map that the
/// operations loop then reads for each topic's message refs, and both land in the single
/// JSON value returned with the same schemas.
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

/// The envelope every message travels in (see [`crate::envelope::Envelope`]).
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
    use crate::envelope::Envelope;
    use crate::schema::Schemas;
    use std::collections::BTreeMap;

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
