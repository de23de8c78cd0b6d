//! The contracts as documents, from the role table: each service's OpenAPI document, the
//! public one the gateway serves, and the AsyncAPI document of the events. They are also
//! committed under `api/` (see [`files`]), so a change to a contract shows in review, and
//! the public ones once more under `api/baseline/`: what clients and consumers rely on,
//! which a test holds every change to (see [`breaking_changes`]).

use serde_json::Value;

use crate::roles::services;

/// Where the gateway serves the public OpenAPI document.
pub const PUBLIC_OPENAPI: &str = "/api/v1/openapi.json";
/// Where the gateway serves the readable API reference.
pub const REFERENCE_PAGE: &str = "/api/v1/docs";
/// Where the gateway serves the AsyncAPI document.
pub const ASYNCAPI: &str = "/api/v1/asyncapi.json";

/// How one public operation leads into another (an OpenAPI link, which clients and stateful
/// fuzzers follow).
struct Link {
    /// The operation whose answer it starts from, and that answer's status.
    from: (&'static str, &'static str),
    /// The link's name.
    name: &'static str,
    /// The operation it leads to.
    to: &'static str,
    /// That operation's parameters (or request body fields) as runtime expressions.
    values: &'static [(&'static str, &'static str)],
}

const fn link(
    from: &'static str,
    status: &'static str,
    name: &'static str,
    to: &'static str,
    values: &'static [(&'static str, &'static str)],
) -> Link {
    Link {
        from: (from, status),
        name,
        to,
        values,
    }
}

/// How the public operations lead into each other.
const LINKS: &[Link] = &[
    link(
        "users_register",
        "202",
        "SignIn",
        "users_token",
        &[
            ("email", "$request.body#/email"),
            ("password", "$request.body#/password"),
        ],
    ),
    link(
        "users_register",
        "202",
        "Confirm",
        "users_confirm",
        &[
            ("email", "$request.body#/email"),
            ("password", "$request.body#/password"),
        ],
    ),
    link("users_confirm", "200", "Wallet", "payments_me", &[]),
    link("users_token", "200", "Me", "users_me", &[]),
    link(
        "orders_place",
        "202",
        "Order",
        "orders_show",
        &[("id", "$response.body#/id")],
    ),
    link(
        "orders_place",
        "202",
        "Payment",
        "payments_show",
        &[("order_id", "$response.body#/id")],
    ),
    link(
        "orders_place",
        "200",
        "Order",
        "orders_show",
        &[("id", "$response.body#/id")],
    ),
    link(
        "orders_show",
        "200",
        "Payment",
        "payments_show",
        &[("order_id", "$response.body#/id")],
    ),
    link("orders_show", "200", "Wallet", "payments_me", &[]),
    link(
        "orders_list",
        "200",
        "FirstOrder",
        "orders_show",
        &[("id", "$response.body#/0/id")],
    ),
    link(
        "inventory_list",
        "200",
        "FirstProduct",
        "inventory_show",
        &[("id", "$response.body#/0/id")],
    ),
    link(
        "inventory_create",
        "201",
        "Product",
        "inventory_show",
        &[("id", "$response.body#/id")],
    ),
    link(
        "inventory_create",
        "201",
        "Restock",
        "inventory_restock",
        &[("id", "$response.body#/id")],
    ),
    link(
        "orders_sagas",
        "200",
        "FirstSaga",
        "orders_saga",
        &[("id", "$response.body#/0/id")],
    ),
];

/// The public API as clients call it through the gateway.
pub fn public_openapi() -> Value {
    let specs: Vec<_> = services().map(|(_, spec)| spec).collect();
    let mut doc = bazaar_kit::openapi::public_document(&specs);
    let mut operations = std::collections::HashMap::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            if let Some(id) = op["operationId"].as_str() {
                operations.insert(id.to_string(), (path.clone(), method.clone()));
            }
        }
    }
    for Link {
        from: (from, status),
        name,
        to,
        values,
    } in LINKS
    {
        let (Some((path, method)), Some((target_path, target_method))) = (operations.get(*from), operations.get(*to))
        else {
            continue;
        };
        // Parameters the target declares are parameters; the rest make its request body.
        let declared: Vec<&str> = doc["paths"][target_path][target_method]["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str())
            .collect();
        let (parameters, body): (Vec<_>, Vec<_>) = values.iter().partition(|(k, _)| declared.contains(k));
        let mut described = serde_json::json!({ "operationId": to });
        if !parameters.is_empty() {
            described["parameters"] = parameters
                .iter()
                .map(|(k, v)| (k.to_string(), Value::from(*v)))
                .collect();
        }
        if !body.is_empty() {
            described["requestBody"] = body.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
        }
        doc["paths"][path][method]["responses"][status]["links"][name] = described;
    }
    doc
}

/// One service's own API document, or `None` for a name that is no service.
pub fn service_openapi(name: &str) -> Option<Value> {
    services()
        .find(|(role, _)| role.name == name)
        .map(|(_, spec)| bazaar_kit::openapi::service_document(spec))
}

/// Every event and command, who publishes and who consumes it.
pub fn asyncapi() -> Value {
    let specs: Vec<_> = services().map(|(_, spec)| spec).collect();
    bazaar_kit::asyncapi::document(
        "bazaar events",
        "The messages bazaar's services exchange through the broker, each inside the same \
         envelope. Domain events go to every consuming service's group; saga commands go to \
         one participant, which replies on `orders.saga-replies`. A consumer checks each \
         payload against its schema here and dead-letters one that breaks it.",
        &specs,
        bazaar_contracts::MESSAGES,
    )
}

/// A document as it is committed.
fn pretty(doc: &Value) -> String {
    format!("{}\n", serde_json::to_string_pretty(doc).unwrap_or_default())
}

/// The baseline documents (what clients and consumers rely on): path and contents.
pub fn baseline_files() -> Vec<(String, String)> {
    vec![
        ("api/baseline/openapi.json".to_string(), pretty(&public_openapi())),
        ("api/baseline/asyncapi.json".to_string(), pretty(&asyncapi())),
    ]
}

/// How the current contracts break the baseline under `root` (empty when they do not).
pub fn breaking_changes(root: &std::path::Path) -> Result<Vec<String>, String> {
    let read = |name: &str| -> Result<Value, String> {
        let path = root.join("api/baseline").join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))
    };
    let mut found: Vec<String> = bazaar_kit::schema::breaking_changes(&read("openapi.json")?, &public_openapi())
        .into_iter()
        .map(|c| format!("public API: {c}"))
        .collect();
    found.extend(
        bazaar_kit::schema::breaking_changes(&read("asyncapi.json")?, &asyncapi())
            .into_iter()
            .map(|c| format!("events: {c}")),
    );
    Ok(found)
}

/// The committed documents: path under the repository root, and contents.
pub fn files() -> Vec<(String, String)> {
    let mut files = vec![
        ("api/openapi.json".to_string(), pretty(&public_openapi())),
        ("api/asyncapi.json".to_string(), pretty(&asyncapi())),
    ];
    for (role, spec) in services() {
        files.push((
            format!("api/services/{}.openapi.json", role.name),
            pretty(&bazaar_kit::openapi::service_document(spec)),
        ));
    }
    files
}

/// What the gateway serves beside its routes: the public document, its reference page and
/// the events document.
pub fn gateway_documents() -> Vec<bazaar_gateway::Document> {
    let json = |path: &str, doc: Value| bazaar_gateway::Document {
        path: path.into(),
        content_type: "application/json",
        body: doc.to_string().into(),
    };
    vec![
        json(PUBLIC_OPENAPI, public_openapi()),
        json(ASYNCAPI, asyncapi()),
        bazaar_gateway::Document {
            path: REFERENCE_PAGE.into(),
            content_type: "text/html; charset=utf-8",
            body: bazaar_kit::openapi::reference_page("bazaar", PUBLIC_OPENAPI).into(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn the_committed_contract_documents_are_what_the_code_generates() {
        let mut stale = Vec::new();
        for (path, text) in files() {
            if std::fs::read_to_string(root().join(&path)).ok().as_deref() != Some(text.as_str()) {
                stale.push(path);
            }
        }
        assert!(
            stale.is_empty(),
            "{stale:?} differ from the contracts in the code: run `cargo run -p bazaar -- contracts write` and commit them"
        );
    }

    #[test]
    fn no_change_breaks_what_clients_and_consumers_rely_on() {
        let found = breaking_changes(&root()).unwrap();
        assert!(
            found.is_empty(),
            "these changes break the baseline contracts; keep the old field or event type beside the new one, \
             or, for a deliberate break, run `cargo run -p bazaar -- contracts write --baseline`:\n  {}",
            found.join("\n  ")
        );
    }

    #[test]
    fn every_link_joins_two_public_operations() {
        let doc = public_openapi();
        let ids: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|item| item.as_object().unwrap().values())
            .filter_map(|op| op["operationId"].as_str())
            .collect();
        for Link {
            from: (from, _),
            name,
            to,
            ..
        } in LINKS
        {
            assert!(
                ids.contains(from) && ids.contains(to),
                "link {name}: {from} -> {to} names an unknown operation"
            );
        }
    }

    #[test]
    fn every_message_schema_is_one_the_consumers_can_check() {
        bazaar_kit::asyncapi::Contract::new(bazaar_contracts::MESSAGES).unwrap();
    }
}
