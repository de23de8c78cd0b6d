//! The events as a contract: each message type a topic carries, with its payload's JSON
//! Schema generated from the Rust type that reads and writes it. [`Contract`] checks an
//! incoming envelope against it (a consumer dead-letters one that breaks it, with the
//! reason); `bazaar_kit::asyncapi` writes it as an AsyncAPI 3.0 document.

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::envelope::Envelope;
use crate::saga::CommandHeader;
use crate::schema::{SchemaError, Schemas};

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
    pub fn id(&self) -> String {
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
pub type Payloads<'a> = BTreeMap<&'static str, (&'a MessageSpec, Value)>;

/// The named schemas of `messages` (with the command header), and each type's payload
/// schema with its spec.
pub fn collect<'a>(messages: impl Iterator<Item = &'a MessageSpec>) -> (BTreeMap<String, Value>, Payloads<'a>) {
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
