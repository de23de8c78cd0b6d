//! The configuration `bazaar up` writes: every service behind `/api/v1`, JWT everywhere except
//! registration, login and catalogue browsing, and permissive-but-bounded global plugins.
//!
//! Kong cannot strip part of a prefix, so each resource is its own Kong service whose URL
//! carries the resource path: route `/api/v1/orders` with `strip_path` sends
//! `/api/v1/orders/123` to `http://127.0.0.1:<orders>/orders/123`.

use std::fmt::Write;

/// Ports of the five bazaar services on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
pub struct DefaultPorts {
    /// Users service (also serves `/auth`).
    pub users: u16,
    /// Inventory service (also serves `/products`).
    pub inventory: u16,
    /// Orders service.
    pub orders: u16,
    /// Payments service (also serves `/accounts`).
    pub payments: u16,
    /// Notifications service.
    pub notifications: u16,
}

/// One public route: (route name, Kong service name, port, resource, methods, needs a token).
type RouteLine = (
    &'static str,
    &'static str,
    u16,
    &'static str,
    &'static [&'static str],
    bool,
);

/// The YAML text of the gateway config used by `bazaar up`; `jwt_secret` signs users' tokens.
pub fn default_config(ports: DefaultPorts, jwt_secret: &str) -> String {
    let routes: [RouteLine; 11] = [
        // Registration is `POST /api/v1/users` exactly; everything else under it needs a token.
        ("users-register", "users", ports.users, "users", &["POST"], false),
        ("users", "users", ports.users, "users", &[], true),
        ("auth", "auth", ports.users, "auth", &[], false),
        (
            "products-browse",
            "products",
            ports.inventory,
            "products",
            &["GET", "HEAD"],
            false,
        ),
        ("products", "products", ports.inventory, "products", &[], true),
        ("inventory", "inventory", ports.inventory, "inventory", &[], true),
        ("orders", "orders", ports.orders, "orders", &[], true),
        ("sagas", "sagas", ports.orders, "sagas", &[], true),
        ("accounts", "accounts", ports.payments, "accounts", &[], true),
        ("payments", "payments", ports.payments, "payments", &[], true),
        (
            "notifications",
            "notifications",
            ports.notifications,
            "notifications",
            &[],
            true,
        ),
    ];
    let mut out =
        String::from("# bazaar gateway configuration (Kong DB-less format).\n_format_version: \"3.0\"\n\nservices:\n");
    let mut written: Vec<&str> = Vec::new();
    for (_, service, port, resource, _, _) in &routes {
        if written.contains(service) {
            continue;
        }
        written.push(service);
        // Writing into a String cannot fail.
        let _ = write!(
            out,
            "  - name: {service}\n    url: http://127.0.0.1:{port}/{resource}\n    connect_timeout: 2000\n    read_timeout: 30000\n    retries: 2\n    routes:\n"
        );
        for (name, owner, _, resource, methods, jwt) in &routes {
            if owner != service {
                continue;
            }
            // The exact-path regex keeps registration from opening `POST /api/v1/users/{id}/…`.
            let path = if *name == "users-register" {
                format!("\"~/api/v1/{resource}$\"")
            } else {
                format!("/api/v1/{resource}")
            };
            let _ = write!(
                out,
                "      - name: {name}\n        paths: [{path}]\n        strip_path: true\n"
            );
            if !methods.is_empty() {
                let _ = writeln!(out, "        methods: [{}]", methods.join(", "));
            }
            if *jwt {
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

    fn ports() -> DefaultPorts {
        DefaultPorts {
            users: 8101,
            inventory: 8102,
            orders: 8103,
            payments: 8104,
            notifications: 8105,
        }
    }

    #[test]
    fn default_config_is_valid() {
        let config = Config::parse(&default_config(ports(), "it's a \"secret\"")).unwrap();
        assert_eq!(config.summary(), "9 services, 11 routes, 1 consumer, 12 plugins");
        assert_eq!(config.jwt_secrets[0].secret, "it's a \"secret\"");
    }

    #[test]
    fn default_routes_reach_the_right_paths_and_guard_the_right_ones() {
        let config = Config::parse(&default_config(ports(), "s")).unwrap();
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
        check("GET", "/api/v1/inventory/sku-1", 8102, "/inventory/sku-1", true);
        check("GET", "/api/v1/accounts/me", 8104, "/accounts/me", true);
        check("GET", "/api/v1/payments", 8104, "/payments", true);
        check("GET", "/api/v1/notifications", 8105, "/notifications", true);
    }
}
