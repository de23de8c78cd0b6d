//! Who may call what: a role's authorization policy over mesh identities, default deny.
//!
//! The policy is a YAML file (`bazaar up` writes `data/mesh/policy.yaml` from the role table's
//! edges). For each role it lists rules; a rule names callers (workload identity URIs, or a
//! prefix ending in `*`, such as `spiffe://bazaar/tool/*`) and the routes they may call
//! (`*`, or `METHOD /path`, where a path ending in `*` covers everything below it and a
//! method of `*` any method):
//!
//! ```yaml
//! roles:
//!   users:
//!     - from: [spiffe://bazaar/role/gateway]
//!       routes: ["*"]
//!     - from: [spiffe://bazaar/role/orders, spiffe://bazaar/role/payments]
//!       routes: ["GET /.well-known/jwks.json"]
//! ```
//!
//! A request its caller's rules do not cover is answered 403 with a problem naming the
//! caller, counted as `bazaar_mesh_refusals_total{caller, callee}` and logged. Every request
//! over the mesh is counted and timed by caller and route (`bazaar_mesh_requests_total`,
//! `bazaar_mesh_request_seconds`): the golden metrics of each edge.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Instant,
};

use axum::{extract::Request, middleware::Next, response::IntoResponse, response::Response};
use serde::Deserialize;

use crate::{http::Problem, mesh::PeerIdentity};

/// Why a policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// It could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// It is not a policy.
    #[error("{path}: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    roles: BTreeMap<String, Vec<RuleSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    from: Vec<String>,
    routes: Vec<String>,
}

/// A caller pattern: an exact identity URI or a prefix.
#[derive(Debug, Clone, PartialEq)]
enum Caller {
    Exact(String),
    Prefix(String),
}

/// A route pattern.
#[derive(Debug, Clone, PartialEq)]
struct Route {
    /// `None` for any method.
    method: Option<String>,
    path: String,
    /// The path covers everything below it.
    prefix: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    from: Vec<Caller>,
    routes: Vec<Route>,
}

/// The rules of one role.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Route {
    fn parse(text: &str) -> Result<Route, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(Route {
                method: None,
                path: "/".into(),
                prefix: true,
            });
        }
        let (method, path) = text
            .split_once(' ')
            .ok_or_else(|| format!("route {text:?} is not `*` or `METHOD /path`"))?;
        let method = match method {
            "*" => None,
            m if m.chars().all(|c| c.is_ascii_uppercase()) && !m.is_empty() => Some(m.to_string()),
            m => return Err(format!("route {text:?}: {m:?} is not a method")),
        };
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("route {text:?}: the path must start with /"));
        }
        let (path, prefix) = match path.strip_suffix('*') {
            Some(p) => (p.to_string(), true),
            None => (path.to_string(), false),
        };
        Ok(Route { method, path, prefix })
    }

    /// Whether the route covers `method path`: a `GET` rule covers `HEAD` (servers answer
    /// it with the GET handler), and a prefix covers itself and what is below it by whole
    /// segments (`/orders*` covers `/orders` and `/orders/1`, not `/orders-admin`).
    fn covers(&self, method: &str, path: &str) -> bool {
        let method_ok = self
            .method
            .as_deref()
            .is_none_or(|m| m == method || (m == "GET" && method == "HEAD"));
        let path_ok = if self.prefix {
            let base = self.path.trim_end_matches('/');
            base.is_empty() || path == base || path.strip_prefix(base).is_some_and(|rest| rest.starts_with('/'))
        } else {
            path == self.path
        };
        method_ok && path_ok
    }
}

impl Caller {
    fn parse(text: &str) -> Result<Caller, String> {
        let text = text.trim();
        if !text.starts_with("spiffe://") {
            return Err(format!("caller {text:?} is not a spiffe:// identity"));
        }
        Ok(match text.strip_suffix('*') {
            Some(prefix) => Caller::Prefix(prefix.to_string()),
            None => Caller::Exact(text.to_string()),
        })
    }

    fn matches(&self, uri: &str) -> bool {
        match self {
            Caller::Exact(e) => e == uri,
            Caller::Prefix(p) => uri.starts_with(p),
        }
    }
}

impl Policy {
    /// The rules for `role` in the policy text `yaml` (read from `path`, for messages). A
    /// role the file does not mention may be called by no one.
    pub fn parse(yaml: &str, role: &str, path: &Path) -> Result<Policy, PolicyError> {
        let invalid = |why: String| PolicyError::Invalid {
            path: path.to_path_buf(),
            why,
        };
        let file: PolicyFile = serde_yaml::from_str(yaml).map_err(|e| invalid(e.to_string()))?;
        let mut rules = Vec::new();
        for (name, specs) in &file.roles {
            for (i, spec) in specs.iter().enumerate() {
                let at = |why: String| invalid(format!("roles.{name}[{i}]: {why}"));
                let from = spec
                    .from
                    .iter()
                    .map(|c| Caller::parse(c))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(at)?;
                let routes = spec
                    .routes
                    .iter()
                    .map(|r| Route::parse(r))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(at)?;
                if name == role {
                    rules.push(Rule { from, routes });
                }
            }
        }
        Ok(Policy { rules })
    }

    /// Whether `caller` may call `method path`.
    pub fn allows(&self, caller: &str, method: &str, path: &str) -> bool {
        self.rules.iter().any(|r| {
            r.from.iter().any(|c| c.matches(caller)) && r.routes.iter().any(|route| route.covers(method, path))
        })
    }
}

/// A role's policy loaded from its file, reloaded when the file changes, and the layer that
/// enforces it on requests served over the mesh.
#[derive(Debug)]
pub struct PolicyGuard {
    role: &'static str,
    file: PathBuf,
    /// The rules in force and the text they came from.
    state: RwLock<(Arc<Policy>, String)>,
}

impl PolicyGuard {
    /// `role`'s rules in `file`; fails when the file cannot be read or is not a policy.
    pub fn load(role: &'static str, file: PathBuf) -> Result<PolicyGuard, PolicyError> {
        let text = PolicyGuard::read(&file)?;
        let policy = Policy::parse(&text, role, &file)?;
        Ok(PolicyGuard {
            role,
            file,
            state: RwLock::new((Arc::new(policy), text)),
        })
    }

    fn read(file: &Path) -> Result<String, PolicyError> {
        std::fs::read_to_string(file).map_err(|source| PolicyError::Io {
            path: file.to_path_buf(),
            source,
        })
    }

    /// Reloads the file when it changed; true when it did. A file that no longer parses
    /// keeps the rules in force.
    pub fn reload_if_changed(&self) -> Result<bool, PolicyError> {
        let text = PolicyGuard::read(&self.file)?;
        if self.state.read().unwrap_or_else(|e| e.into_inner()).1 == text {
            return Ok(false);
        }
        let policy = Policy::parse(&text, self.role, &self.file)?;
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = (Arc::new(policy), text);
        Ok(true)
    }

    fn policy(&self) -> Arc<Policy> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).0.clone()
    }

    /// The file it reads.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// `router` with this policy enforced on every request ([`enforce`]).
    pub fn guard(self: &Arc<Self>, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(self.clone(), enforce))
    }
}

/// The middleware: a request over the mesh is served only when the policy lets its caller
/// call it, and is counted and timed by edge either way. Requests without a
/// [`PeerIdentity`] (a role serving plain HTTP) pass untouched.
pub async fn enforce(
    axum::extract::State(guard): axum::extract::State<Arc<PolicyGuard>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(PeerIdentity(caller)) = request.extensions().get::<PeerIdentity>().cloned() else {
        return next.run(request).await;
    };
    let caller = caller.uri();
    let method = request.method().as_str().to_string();
    let path = request.uri().path().to_string();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let callee = guard.role;
    if !guard.policy().allows(&caller, &method, &path) {
        metrics::counter!("bazaar_mesh_refusals_total", "caller" => caller.clone(), "callee" => callee).increment(1);
        tracing::warn!(%caller, callee, %method, %path, "mesh: refused by the policy");
        return Problem::forbidden(format!(
            "{caller} may not call {method} {path} on {callee}: the mesh policy ({}) does not allow it",
            guard.file().display()
        ))
        .into_response();
    }
    let started = Instant::now();
    let response = next.run(request).await;
    let outcome = if response.status().is_server_error() {
        "error"
    } else {
        "ok"
    };
    metrics::counter!("bazaar_mesh_requests_total", "caller" => caller.clone(), "callee" => callee, "route" => route.clone(), "outcome" => outcome).increment(1);
    metrics::histogram!("bazaar_mesh_request_seconds", "caller" => caller, "callee" => callee, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
roles:
  users:
    - from: [spiffe://bazaar/role/gateway, "spiffe://bazaar/tool/*"]
      routes: ["*"]
    - from: [spiffe://bazaar/role/orders]
      routes: ["GET /.well-known/jwks.json"]
  orders:
    - from: [spiffe://bazaar/role/gateway]
      routes: ["GET /orders*", "POST /orders"]
"#;

    fn policy(role: &str) -> Policy {
        Policy::parse(FILE, role, Path::new("policy.yaml")).unwrap()
    }

    #[test]
    fn callers_get_exactly_the_routes_their_rules_name() {
        let users = policy("users");
        assert!(users.allows("spiffe://bazaar/role/gateway", "POST", "/auth/token"));
        assert!(users.allows("spiffe://bazaar/tool/curl", "GET", "/users/me"));
        assert!(users.allows("spiffe://bazaar/role/orders", "GET", "/.well-known/jwks.json"));
        assert!(!users.allows("spiffe://bazaar/role/orders", "POST", "/auth/keys"));
        assert!(!users.allows("spiffe://bazaar/role/orders", "GET", "/.well-known/jwks.json.bak"));
        assert!(!users.allows("spiffe://other/role/gateway", "GET", "/users/me"));
        let orders = policy("orders");
        assert!(orders.allows("spiffe://bazaar/role/gateway", "GET", "/orders/123"));
        assert!(!orders.allows("spiffe://bazaar/role/gateway", "DELETE", "/orders/123"));
        assert!(!orders.allows("spiffe://bazaar/role/notifications", "GET", "/orders"));
        assert!(orders.allows("spiffe://bazaar/role/gateway", "GET", "/orders"));
        assert!(
            orders.allows("spiffe://bazaar/role/gateway", "HEAD", "/orders/1"),
            "GET covers HEAD"
        );
        assert!(
            !orders.allows("spiffe://bazaar/role/gateway", "GET", "/orders-admin"),
            "whole segments only"
        );
        assert!(
            policy("payments").rules.is_empty(),
            "a role the file omits admits no one"
        );
    }

    #[test]
    fn a_malformed_policy_is_refused_with_its_place() {
        for (bad, expect) in [
            (
                "roles: {users: [{from: [gateway], routes: ['*']}]}",
                "not a spiffe:// identity",
            ),
            (
                "roles: {users: [{from: ['spiffe://b/role/g'], routes: ['get /x']}]}",
                "not a method",
            ),
            (
                "roles: {users: [{from: ['spiffe://b/role/g'], routes: ['GET x']}]}",
                "must start with /",
            ),
            ("roles: {users: [{from: [], routes: [], extra: 1}]}", "unknown field"),
        ] {
            let err = Policy::parse(bad, "users", Path::new("p.yaml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{bad}: {err}");
        }
    }
}
