//! Checks a JSON value against a JSON Schema (2020-12) of the kind the contracts generate:
//! `type`, `properties`, `required`, `additionalProperties`, `items`, `allOf`/`anyOf`/
//! `oneOf`, `enum`, `const`, numeric and length bounds, the `uuid`, `date-time`, `email` and
//! integer formats, and `$ref` into a set of named schemas. A schema using any other
//! assertion is refused when the checker is built, so nothing is ever passed unchecked.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Keywords that only annotate (they assert nothing).
const ANNOTATIONS: [&str; 7] = [
    "description",
    "title",
    "default",
    "example",
    "examples",
    "deprecated",
    "readOnly",
];

/// Keywords this checker asserts.
const ASSERTIONS: [&str; 16] = [
    "$ref",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "allOf",
    "anyOf",
    "oneOf",
    "enum",
    "const",
    "format",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
];

/// Why a set of schemas cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    /// A keyword this checker does not implement (it would be ignored otherwise).
    #[error("schema {schema}: keyword `{keyword}` is not supported")]
    Unsupported {
        /// The named schema it is in.
        schema: String,
        /// The keyword.
        keyword: String,
    },
    /// A `$ref` to a schema not in the set.
    #[error("schema {schema}: `$ref` to unknown schema `{target}`")]
    UnknownRef {
        /// The named schema it is in.
        schema: String,
        /// What it refers to.
        target: String,
    },
}

/// Named schemas (`#/components/schemas/<name>` refers to one), checked for support.
#[derive(Debug, Clone, Default)]
pub struct Schemas {
    named: BTreeMap<String, Value>,
}

impl Schemas {
    /// The set `named`, refused if any schema uses what this checker cannot assert.
    pub fn new(named: BTreeMap<String, Value>) -> Result<Schemas, SchemaError> {
        for (name, schema) in &named {
            supported(name, schema, &named)?;
        }
        Ok(Schemas { named })
    }

    /// The first way `value` breaks `schema` (which may `$ref` the named ones), as
    /// `at <path>: <what>`; `Ok` when it conforms.
    pub fn check(&self, schema: &Value, value: &Value) -> Result<(), String> {
        self.walk(schema, value, "$")
    }

    /// One piece: one schema node checked against one value at one `at` path; the keywords
    /// ($ref, type, enum, const, allOf, anyOf, oneOf) apply in turn and recurse through this
    /// same function before the per-kind checks already kept in helpers.
    fn walk(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let Some(schema) = schema.as_object() else {
            // `true` accepts anything, `false` nothing.
            return match schema {
                Value::Bool(false) => Err(format!("at {at}: no value is allowed here")),
                _ => Ok(()),
            };
        };
        if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
            let name = target.rsplit('/').next().unwrap_or_default();
            let named = self
                .named
                .get(name)
                .ok_or_else(|| format!("at {at}: unknown schema `{target}`"))?;
            self.walk(named, value, at)?;
        }
        if let Some(types) = schema.get("type") {
            let allowed: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            if !allowed.iter().any(|t| is_type(value, t)) {
                return Err(format!(
                    "at {at}: expected {}, found {}",
                    allowed.join(" or "),
                    kind(value)
                ));
            }
        }
        if let Some(options) = schema.get("enum").and_then(Value::as_array) {
            if !options.contains(value) {
                return Err(format!(
                    "at {at}: {value} is not one of {}",
                    Value::Array(options.clone())
                ));
            }
        }
        if let Some(expected) = schema.get("const") {
            if expected != value {
                return Err(format!("at {at}: expected {expected}, found {value}"));
            }
        }
        for part in schema.get("allOf").and_then(Value::as_array).into_iter().flatten() {
            self.walk(part, value, at)?;
        }
        if let Some(parts) = schema.get("anyOf").and_then(Value::as_array) {
            if !parts.iter().any(|p| self.walk(p, value, at).is_ok()) {
                return Err(format!("at {at}: matches none of the allowed shapes"));
            }
        }
        if let Some(parts) = schema.get("oneOf").and_then(Value::as_array) {
            let matched = parts.iter().filter(|p| self.walk(p, value, at).is_ok()).count();
            if matched != 1 {
                return Err(format!("at {at}: matches {matched} of the shapes, not exactly one"));
            }
        }
        match value {
            Value::Object(fields) => self.object(schema, fields, at)?,
            Value::Array(items) => {
                if let Some(item) = schema.get("items") {
                    for (i, v) in items.iter().enumerate() {
                        self.walk(item, v, &format!("{at}[{i}]"))?;
                    }
                }
            }
            Value::String(text) => string(schema, text, at)?,
            Value::Number(n) => number(schema, n, at)?,
            _ => {}
        }
        Ok(())
    }

    fn object(&self, schema: &Map<String, Value>, fields: &Map<String, Value>, at: &str) -> Result<(), String> {
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = name.as_str().unwrap_or_default();
            if !fields.contains_key(name) {
                return Err(format!("at {at}: `{name}` is required"));
            }
        }
        let properties = schema.get("properties").and_then(Value::as_object);
        for (name, v) in fields {
            let path = format!("{at}.{name}");
            match properties.and_then(|p| p.get(name)) {
                Some(property) => self.walk(property, v, &path)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => return Err(format!("at {at}: `{name}` is not allowed")),
                    Some(extra) => self.walk(extra, v, &path)?,
                    None => {}
                },
            }
        }
        Ok(())
    }
}

fn string(schema: &Map<String, Value>, text: &str, at: &str) -> Result<(), String> {
    let length = text.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
        if length < min {
            return Err(format!("at {at}: shorter than {min} characters"));
        }
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
        if length > max {
            return Err(format!("at {at}: longer than {max} characters"));
        }
    }
    let valid = match schema.get("format").and_then(Value::as_str) {
        Some("uuid") => uuid::Uuid::parse_str(text).is_ok(),
        Some("date-time") => chrono::DateTime::parse_from_rfc3339(text).is_ok(),
        Some("email") => text
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty()),
        _ => true,
    };
    if !valid {
        let format = schema.get("format").and_then(Value::as_str).unwrap_or_default();
        return Err(format!("at {at}: `{text}` is not a valid {format}"));
    }
    Ok(())
}

fn number(schema: &Map<String, Value>, n: &serde_json::Number, at: &str) -> Result<(), String> {
    let value = n.as_f64().unwrap_or(f64::NAN);
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        if value < min {
            return Err(format!("at {at}: {n} is below the minimum {min}"));
        }
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
        if value > max {
            return Err(format!("at {at}: {n} is above the maximum {max}"));
        }
    }
    let fits = match schema.get("format").and_then(Value::as_str) {
        Some("int64") => n.is_i64(),
        Some("int32") => n.as_i64().is_some_and(|v| i32::try_from(v).is_ok()),
        Some("uint64") => n.is_u64(),
        Some("uint32") => n.as_u64().is_some_and(|v| u32::try_from(v).is_ok()),
        _ => true,
    };
    if !fits {
        let format = schema.get("format").and_then(Value::as_str).unwrap_or_default();
        return Err(format!("at {at}: {n} does not fit {format}"));
    }
    Ok(())
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
        _ => false,
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses `schema` (inside the named schema `name`) if it asserts anything unsupported or
/// refers to a schema outside `named`.
fn supported(name: &str, schema: &Value, named: &BTreeMap<String, Value>) -> Result<(), SchemaError> {
    let Some(object) = schema.as_object() else {
        return Ok(());
    };
    for (keyword, inner) in object {
        if ANNOTATIONS.contains(&keyword.as_str()) {
            continue;
        }
        if !ASSERTIONS.contains(&keyword.as_str()) {
            return Err(SchemaError::Unsupported {
                schema: name.into(),
                keyword: keyword.clone(),
            });
        }
        match keyword.as_str() {
            "$ref" => {
                let target = inner.as_str().unwrap_or_default();
                if !named.contains_key(target.rsplit('/').next().unwrap_or_default()) {
                    return Err(SchemaError::UnknownRef {
                        schema: name.into(),
                        target: target.into(),
                    });
                }
            }
            "properties" => {
                for property in inner.as_object().into_iter().flat_map(|p| p.values()) {
                    supported(name, property, named)?;
                }
            }
            "items" | "additionalProperties" => supported(name, inner, named)?,
            "allOf" | "anyOf" | "oneOf" => {
                for part in inner.as_array().into_iter().flatten() {
                    supported(name, part, named)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line() -> Schemas {
        Schemas::new(BTreeMap::from([(
            "Line".to_string(),
            json!({
                "type": "object",
                "required": ["productId", "quantity"],
                "properties": {
                    "productId": { "type": "string", "format": "uuid" },
                    "quantity": { "type": "integer", "format": "int64", "minimum": 1 },
                    "note": { "type": ["string", "null"], "maxLength": 5 }
                }
            }),
        )]))
        .unwrap()
    }

    #[test]
    fn a_conforming_payload_passes_and_unknown_fields_are_tolerated() {
        let lines = json!({ "type": "array", "items": { "$ref": "#/components/schemas/Line" } });
        let ok = json!([{ "productId": "0190f0d4-7c1e-7a9b-8c3d-1e2f3a4b5c6d", "quantity": 2, "note": null, "colour": "red" }]);
        assert_eq!(line().check(&lines, &ok), Ok(()));
    }

    #[test]
    fn each_broken_rule_is_named_with_where_it_broke() {
        let schemas = line();
        let one = json!({ "$ref": "#/components/schemas/Line" });
        let cases = [
            (json!({ "quantity": 1 }), "at $: `productId` is required"),
            (
                json!({ "productId": "x", "quantity": 1 }),
                "at $.productId: `x` is not a valid uuid",
            ),
            (
                json!({ "productId": "0190f0d4-7c1e-7a9b-8c3d-1e2f3a4b5c6d", "quantity": 0 }),
                "at $.quantity: 0 is below the minimum 1",
            ),
            (
                json!({ "productId": "0190f0d4-7c1e-7a9b-8c3d-1e2f3a4b5c6d", "quantity": "2" }),
                "at $.quantity: expected integer, found a string",
            ),
            (
                json!({ "productId": "0190f0d4-7c1e-7a9b-8c3d-1e2f3a4b5c6d", "quantity": 1, "note": "toolong" }),
                "at $.note: longer than 5 characters",
            ),
        ];
        for (value, expected) in cases {
            assert_eq!(schemas.check(&one, &value), Err(expected.to_string()), "{value}");
        }
    }

    #[test]
    fn a_schema_using_an_unsupported_keyword_is_refused_rather_than_ignored() {
        let named = BTreeMap::from([("S".to_string(), json!({ "type": "string", "pattern": "^a" }))]);
        assert_eq!(
            Schemas::new(named).unwrap_err(),
            SchemaError::Unsupported {
                schema: "S".into(),
                keyword: "pattern".into()
            }
        );
        let named = BTreeMap::from([("S".to_string(), json!({ "$ref": "#/components/schemas/T" }))]);
        assert!(matches!(Schemas::new(named), Err(SchemaError::UnknownRef { .. })));
    }
}

/// What `new` breaks of the contract document `old` (OpenAPI or AsyncAPI) that its clients
/// and consumers rely on: a removed operation, message type or schema, a removed property,
/// or a property that was optional and is now required. Additions are not breaking.
pub fn breaking_changes(old: &Value, new: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let keys = |v: &Value| -> Vec<String> { v.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default() };
    for path in keys(&old["paths"]) {
        for method in keys(&old["paths"][&path]) {
            if new["paths"][&path][&method].is_null() {
                found.push(format!("operation {} {path} was removed", method.to_uppercase()));
            }
        }
    }
    for channel in keys(&old["channels"]) {
        for message in keys(&old["channels"][&channel]["messages"]) {
            if new["channels"][&channel]["messages"][&message].is_null() {
                found.push(format!("message {message} was removed from channel {channel}"));
            }
        }
    }
    let old_schemas = &old["components"]["schemas"];
    let new_schemas = &new["components"]["schemas"];
    for name in keys(old_schemas) {
        let (before, after) = (&old_schemas[&name], &new_schemas[&name]);
        if after.is_null() {
            found.push(format!("schema {name} was removed"));
            continue;
        }
        let required = |s: &Value| -> Vec<String> {
            s["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).map(str::to_string).collect())
                .unwrap_or_default()
        };
        let was_required = required(before);
        for property in keys(&before["properties"]) {
            if after["properties"][&property].is_null() {
                found.push(format!("schema {name}: property `{property}` was removed"));
            }
        }
        for property in required(after) {
            if !was_required.contains(&property) {
                found.push(format!("schema {name}: property `{property}` is now required"));
            }
        }
    }
    found
}

#[cfg(test)]
mod compatibility {
    use super::*;
    use serde_json::json;

    fn doc(properties: Value, required: Value) -> Value {
        json!({
            "paths": { "/orders": { "get": {}, "post": {} } },
            "channels": { "orders": { "messages": { "order_confirmed": {} } } },
            "components": { "schemas": { "Order": { "properties": properties, "required": required } } }
        })
    }

    #[test]
    fn adding_fields_and_operations_breaks_nothing() {
        let old = doc(json!({ "id": {}, "note": {} }), json!(["id"]));
        let mut new = doc(json!({ "id": {}, "note": {}, "extra": {} }), json!(["id"]));
        new["paths"]["/orders/{id}"] = json!({ "get": {} });
        assert_eq!(breaking_changes(&old, &new), Vec::<String>::new());
    }

    #[test]
    fn removing_a_field_or_an_event_type_or_requiring_an_optional_field_is_refused() {
        let old = doc(json!({ "id": {}, "note": {} }), json!(["id"]));
        let mut new = doc(json!({ "id": {} }), json!(["id"]));
        assert_eq!(
            breaking_changes(&old, &new),
            ["schema Order: property `note` was removed"]
        );
        new = doc(json!({ "id": {}, "note": {} }), json!(["id", "note"]));
        assert_eq!(
            breaking_changes(&old, &new),
            ["schema Order: property `note` is now required"]
        );
        new = doc(json!({ "id": {}, "note": {} }), json!(["id"]));
        new["channels"]["orders"]["messages"] = json!({});
        new["paths"]["/orders"] = json!({ "get": {} });
        assert_eq!(
            breaking_changes(&old, &new),
            [
                "operation POST /orders was removed",
                "message order_confirmed was removed from channel orders"
            ]
        );
    }
}
