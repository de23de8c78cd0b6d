//! OpenAPI 3.1 documents. A service declares its operations where it routes them (a
//! `#[utoipa::path]` on each handler, registered with [`OpenApiRouter`] so the path and
//! method that serve a request are the ones documented); this module finishes that into the
//! document each role serves at `/openapi.json`, and merges every service's public part into
//! the one the gateway serves, with the paths as clients see them.

use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};
use utoipa::PartialSchema;

use crate::http::Problem;
use crate::service::ServiceSpec;

pub use utoipa_axum::router::OpenApiRouter;

/// The name of the bearer-token security scheme. An operation that needs the `admin` role
/// lists it as the requirement's scope (OpenAPI 3.1 allows role names there).
pub const BEARER: &str = "bearer";

/// Where each role serves its own document.
pub const PATH: &str = "/openapi.json";

/// The HTTP methods an OpenAPI path item may carry, lower-case as the document writes them.
const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

/// The operations of a role that serves no API of its own.
pub fn no_operations() -> utoipa::openapi::OpenApi {
    utoipa::openapi::OpenApi::default()
}

/// The document `spec`'s role serves: its operations with bazaar's title and version, the
/// problem+json shape of every error, and the bearer scheme.
pub fn service_document(spec: &ServiceSpec) -> Value {
    let mut doc = operations(spec);
    finish(
        &mut doc,
        &format!("bazaar {}", spec.name),
        &format!(
            "The `{}` service's own API, at its own address. Clients reach the public part \
             through the gateway under `/api/v1` (see the gateway's `/api/v1/openapi.json`).",
            spec.name
        ),
    );
    errors(&mut doc, &[PROBLEM_MEDIA]);
    doc
}

/// The public API as the gateway serves it: every operation of `specs` that one of their
/// public routes exposes, at the path clients call, answering gateway errors (Kong's
/// `{"message"}` JSON) as well as the services' problem documents.
pub fn public_document(specs: &[&ServiceSpec]) -> Value {
    let mut doc = json!({ "paths": {}, "components": { "schemas": {} } });
    for spec in specs {
        let service = operations(spec);
        let paths = service["paths"].as_object().cloned().unwrap_or_default();
        for (path, item) in paths {
            let Some(item) = item.as_object() else { continue };
            for (method, operation) in item {
                let Some(public) = public_path(spec, &path, method) else {
                    continue;
                };
                doc["paths"][&public][method] = operation.clone();
            }
        }
        if let Some(schemas) = service["components"]["schemas"].as_object() {
            for (name, schema) in schemas {
                doc["components"]["schemas"][name] = schema.clone();
            }
        }
    }
    finish(
        &mut doc,
        "bazaar",
        "The public API of bazaar, an event-driven order system, as clients call it through \
         the gateway. Sign up with `POST /api/v1/users`, confirm the emailed code with \
         `POST /api/v1/auth/verification` (it answers with a token), then send the token as \
         `Authorization: Bearer …`. Errors from the services are `application/problem+json`; \
         errors the gateway answers itself (no route, missing token, rate limit) are Kong's \
         `{\"message\": …}` JSON.",
    );
    doc["components"]["schemas"]["GatewayMessage"] = json!({
        "type": "object",
        "description": "An error the gateway answered itself, in Kong's shape.",
        "required": ["message"],
        "properties": { "message": { "type": "string" } }
    });
    errors(&mut doc, &[PROBLEM_MEDIA, GATEWAY_MEDIA]);
    doc
}

/// `spec`'s operations as JSON, each `operationId` prefixed with the service's name so ids
/// stay unique once services are merged (`orders_show`, `payments_show`).
fn operations(spec: &ServiceSpec) -> Value {
    let mut doc = serde_json::to_value((spec.openapi)()).unwrap_or_else(|_| json!({}));
    // Every consuming role serves its dead letters (the runtime mounts the routes).
    if !spec.consumes.is_empty() {
        let dead = crate::deadletters::document(spec.name);
        for (path, item) in dead["paths"].as_object().cloned().unwrap_or_default() {
            doc["paths"][path] = item;
        }
        for (name, schema) in dead["components"]["schemas"].as_object().cloned().unwrap_or_default() {
            doc["components"]["schemas"][name] = schema;
        }
    }
    if let Some(paths) = doc["paths"].as_object_mut() {
        for item in paths.values_mut() {
            for method in METHODS {
                if let Some(id) = item
                    .get(method)
                    .and_then(|op| op["operationId"].as_str())
                    .map(str::to_string)
                {
                    item[method]["operationId"] = json!(format!("{}_{id}", spec.name));
                }
            }
        }
    }
    doc
}

/// The path `path` of `spec`'s service has behind the gateway for `method`, if a public
/// route exposes it.
fn public_path(spec: &ServiceSpec, path: &str, method: &str) -> Option<String> {
    let resource = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    spec.routes
        .iter()
        .find(|r| {
            let resource_matches = resource == r.resource
                || path == format!("/{}", r.resource)
                || path.starts_with(&format!("/{}/", r.resource));
            let exact = !r.exact || path == format!("/{}", r.resource);
            let method = r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
            resource_matches && exact && method
        })
        .map(|r| format!("{}{path}", r.mount.prefix()))
}

const PROBLEM_MEDIA: (&str, &str) = ("application/problem+json", "Problem");
const GATEWAY_MEDIA: (&str, &str) = ("application/json", "GatewayMessage");

/// Sets the title, version, description and shared components of `doc`.
fn finish(doc: &mut Value, title: &str, description: &str) {
    doc["openapi"] = json!("3.1.0");
    doc["info"] = json!({
        "title": title,
        "version": env!("CARGO_PKG_VERSION"),
        "description": description,
        "license": { "name": "MIT", "identifier": "MIT" },
    });
    let components = &mut doc["components"];
    components["schemas"]["Problem"] =
        serde_json::to_value(Problem::schema()).unwrap_or_else(|_| json!({ "type": "object" }));
    components["securitySchemes"][BEARER] = json!({
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A token from `POST /auth/token` or `POST /auth/verification`. \
                        Operations for operators list the role `admin`."
    });
    // utoipa writes no `paths` for a service without operations; the document needs one.
    if doc["paths"].is_null() {
        doc["paths"] = json!({});
    }
}

/// Gives every operation of `doc` a `4XX` response (and a `503`, for overload) in each of
/// `media` unless it documents one itself.
fn errors(doc: &mut Value, media: &[(&str, &str)]) {
    let content: Map<String, Value> = media
        .iter()
        .map(|(kind, schema)| {
            (
                kind.to_string(),
                json!({ "schema": { "$ref": format!("#/components/schemas/{schema}") } }),
            )
        })
        .collect();
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        for method in METHODS {
            let Some(operation) = item.get_mut(method) else {
                continue;
            };
            let responses = &mut operation["responses"];
            for (code, description) in [
                ("4XX", "The request was refused; `detail` (or `message`) says why."),
                (
                    "503",
                    "Overloaded or a dependency is down; retry after `Retry-After` seconds.",
                ),
            ] {
                if responses.get(code).is_none() {
                    responses[code] = json!({ "description": description, "content": content });
                }
            }
            // Documented error responses answer in the same media types.
            if let Some(responses) = responses.as_object_mut() {
                for (code, response) in responses.iter_mut() {
                    if code.starts_with('4') || code.starts_with('5') {
                        response["content"] = Value::Object(content.clone());
                    }
                }
            }
        }
    }
}

/// A router serving `doc` at [`PATH`].
pub fn routes(doc: Value) -> Router {
    json_route(PATH, doc)
}

/// A router serving the JSON document `doc` at `path`.
pub(crate) fn json_route(path: &str, doc: Value) -> Router {
    let body = std::sync::Arc::new(doc.to_string());
    Router::new().route(
        path,
        get(move || {
            let body = body.clone();
            async move { ([(http::header::CONTENT_TYPE, "application/json")], (*body).clone()) }
        }),
    )
}

/// A self-contained HTML page (no asset from elsewhere) that renders the OpenAPI document at
/// `document_url` as a readable reference.
pub fn reference_page(title: &str, document_url: &str) -> String {
    include_str!("openapi/reference.html")
        .replace("{{title}}", &html_escape(title))
        .replace("{{document}}", &html_escape(document_url))
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::PublicRoute;

    const ROUTES: &[PublicRoute] = &[
        PublicRoute {
            name: "things-browse",
            methods: &["GET"],
            ..PublicRoute::anyone("things")
        },
        PublicRoute {
            name: "signup",
            exact: true,
            methods: &["POST"],
            ..PublicRoute::credentials("signups")
        },
    ];

    fn spec(openapi: fn() -> utoipa::openapi::OpenApi) -> ServiceSpec {
        ServiceSpec {
            name: "shop",
            migrations: &[],
            publishes: &[],
            consumes: &[],
            routes: ROUTES,
            openapi,
            messages: &[],
            metrics: &[],
        }
    }

    fn paths() -> utoipa::openapi::OpenApi {
        let op = |id: &str| {
            utoipa::openapi::path::OperationBuilder::new()
                .operation_id(Some(id))
                .response("200", utoipa::openapi::Response::new("ok"))
                .build()
        };
        use utoipa::openapi::path::{HttpMethod, PathItem};
        utoipa::openapi::OpenApiBuilder::new()
            .paths(
                utoipa::openapi::PathsBuilder::new()
                    .path("/things", PathItem::new(HttpMethod::Get, op("list")))
                    .path("/things/{id}", PathItem::new(HttpMethod::Delete, op("remove")))
                    .path("/signups", PathItem::new(HttpMethod::Post, op("signup")))
                    .path("/signups/{id}", PathItem::new(HttpMethod::Post, op("confirm")))
                    .path("/internal", PathItem::new(HttpMethod::Get, op("internal"))),
            )
            .build()
    }

    #[test]
    fn the_public_document_holds_only_what_a_public_route_exposes_at_its_gateway_path() {
        let spec = spec(paths);
        let doc = public_document(&[&spec]);
        let mut exposed: Vec<String> = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                exposed.push(format!("{method} {path}"));
            }
        }
        exposed.sort();
        assert_eq!(exposed, ["get /api/v1/things", "post /api/v1/signups"]);
    }

    #[test]
    fn every_operation_documents_its_errors_in_both_shapes_behind_the_gateway() {
        let spec = spec(paths);
        let public = public_document(&[&spec]);
        let errors = &public["paths"]["/api/v1/things"]["get"]["responses"]["4XX"]["content"];
        assert!(errors["application/problem+json"].is_object(), "{errors}");
        assert!(errors["application/json"].is_object(), "{errors}");
        let own = service_document(&spec);
        let errors = &own["paths"]["/internal"]["get"]["responses"]["4XX"]["content"];
        assert!(errors["application/problem+json"].is_object(), "{errors}");
        assert!(errors["application/json"].is_null(), "{errors}");
        assert_eq!(
            own["components"]["schemas"]["Problem"]["required"],
            json!(["type", "title", "status", "detail"])
        );
    }
}
