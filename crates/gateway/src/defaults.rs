//! The configuration `bazaar up` writes: the given routes under `/api/v1`, JWT on those that
//! need a token, and permissive-but-bounded global plugins. The routes come from the caller
//! (the binary's role table), so this module knows no service by name.
//!
//! Kong cannot strip part of a prefix, so each resource is its own Kong service whose URL
//! carries the resource path: route `/api/v1/orders` with `strip_path` sends
//! `/api/v1/orders/123` to `http://127.0.0.1:<orders>/orders/123`.

use std::fmt::Write;

/// One client-facing route of the default config.
#[derive(Debug, Clone, Copy)]
pub struct DefaultRoute<'a> {
    /// The route's name, unique in the file.
    pub name: &'a str,
    /// `/api/v1/<resource>` reaches `http://127.0.0.1:<port>/<resource>`.
    pub resource: &'a str,
    /// The serving service's port on 127.0.0.1.
    pub port: u16,
    /// Methods matched; empty matches every method.
    pub methods: &'a [&'a str],
    /// Match `/api/v1/<resource>` exactly rather than every path under it.
    pub exact: bool,
    /// Require a valid JWT.
    pub jwt: bool,
}

/// The YAML text of the gateway config used by `bazaar up`; `jwt_secret` signs users' tokens.
pub fn default_config(routes: &[DefaultRoute<'_>], jwt_secret: &str) -> String {
    let mut out =
        String::from("# bazaar gateway configuration (Kong DB-less format).\n_format_version: \"3.0\"\n\nservices:\n");
    let mut written: Vec<&str> = Vec::new();
    for first in routes {
        let (resource, port) = (first.resource, first.port);
        if written.contains(&resource) {
            continue;
        }
        written.push(resource);
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "  - name: {resource}\n    url: http://127.0.0.1:{port}/{resource}\n    connect_timeout: 2000\n    read_timeout: 30000\n    retries: 2\n    routes:\n"
        );
        for route in routes.iter().filter(|r| r.resource == resource) {
            // The exact-path regex keeps registration from opening `POST /api/v1/users/{id}/…`.
            let path = if route.exact {
                format!("\"~/api/v1/{resource}$\"")
            } else {
                format!("/api/v1/{resource}")
            };
            let name = route.name;
            let _ = write!(
                out,
                "      - name: {name}\n        paths: [{path}]\n        strip_path: true\n"
            );
            if !route.methods.is_empty() {
                let _ = writeln!(out, "        methods: [{}]", route.methods.join(", "));
            }
            if route.jwt {
                out.push_str("        plugins:\n          - name: jwt\n            config:\n              claims_to_verify: [exp]\n");
            }
        }
    }
    let secret = serde_json::to_string(jwt_secret).unwrap_or_else(|_| "\"\"".into());
    let _ = write!(
        out,
        r#"
consumers:
  - username: bazaar-users
    jwt_secrets:
      - key: bazaar-users
        algorithm: HS256
        secret: {secret}

plugins:
  - name: correlation-id
    config:
      header_name: X-Correlation-ID
      generator: uuid
      echo_downstream: true
  - name: rate-limiting
    config:
      second: 1000
      minute: 30000
      limit_by: ip
      policy: local
  - name: request-size-limiting
    config:
      allowed_payload_size: 1
      size_unit: megabytes
  - name: cors
    config:
      origins: ["http://localhost(:\\d+)?", "http://127\\.0\\.0\\.1(:\\d+)?"]
      credentials: true
      headers: [Authorization, Content-Type, X-Correlation-ID, Idempotency-Key]
      exposed_headers: [X-Correlation-ID, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After]
      max_age: 3600
"#
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::router::{upstream_path, Router};

    /// A shop shaped like bazaar's: an exact open route beside a guarded one on the same
    /// resource, an open resource, and a resource open to reads only.
    fn routes() -> Vec<DefaultRoute<'static>> {
        let route = |name, resource, port, methods, exact, jwt| DefaultRoute {
            name,
            resource,
            port,
            methods,
            exact,
            jwt,
        };
        vec![
            route("users-register", "users", 8101, &["POST"], true, false),
            route("users", "users", 8101, &[], false, true),
            route("auth", "auth", 8101, &[], false, false),
            route("products-browse", "products", 8102, &["GET", "HEAD"], false, false),
            route("products", "products", 8102, &[], false, true),
            route("orders", "orders", 8103, &[], false, true),
        ]
    }

    #[test]
    fn default_config_is_valid() {
        let config = Config::parse(&default_config(&routes(), "it's a \"secret\"")).unwrap();
        assert_eq!(config.summary(), "4 services, 6 routes, 1 consumer, 7 plugins");
        assert_eq!(config.jwt_secrets[0].secret, "it's a \"secret\"");
    }

    #[test]
    fn default_routes_reach_the_right_paths_and_guard_the_right_ones() {
        let config = Config::parse(&default_config(&routes(), "s")).unwrap();
        let router = Router::build(&config);
        let plugins = crate::plugins::PluginSet::build(&config);
        let check = |method: &str, path: &str, port: u16, upstream: &str, guarded: bool| {
            let method = http::Method::from_bytes(method.as_bytes()).unwrap();
            let found = router
                .find(&method, Some("localhost"), path, &http::HeaderMap::new())
                .unwrap();
            let route = &config.routes[found.route];
            let service = &config.services[route.service.unwrap()];
            assert_eq!(service.port, port, "{path}");
            assert_eq!(upstream_path(&service.path, path, Some(found.matched_len)), upstream);
            assert_eq!(plugins.for_route(found.route).jwt.is_some(), guarded, "{method} {path}");
        };
        check("GET", "/api/v1/orders/123", 8103, "/orders/123", true);
        check("POST", "/api/v1/users", 8101, "/users", false);
        check("POST", "/api/v1/users/7/avatar", 8101, "/users/7/avatar", true);
        check("GET", "/api/v1/users/7", 8101, "/users/7", true);
        check("POST", "/api/v1/auth/login", 8101, "/auth/login", false);
        check("GET", "/api/v1/products/42", 8102, "/products/42", false);
        check("POST", "/api/v1/products", 8102, "/products", true);
    }
}
