//! Which route a request belongs to, decided the way Kong's router decides it.
//!
//! Every (route, path) pair becomes one entry, compiled once per config load and sorted by
//! Kong's priority: routes matching on more kinds of attributes (hosts, methods, headers,
//! paths) first, then more header rules, then regex paths before prefix paths, then higher
//! `regex_priority`, then longer paths. A request takes the first entry that matches, so the
//! hot path is a linear scan with no allocation.

use http::{HeaderMap, Method};
use regex::Regex;

use crate::config::Config;

#[derive(Debug)]
enum PathRule {
    /// The route has no paths: any path matches, nothing is stripped.
    Any,
    /// A plain prefix, compared byte for byte as Kong does (`/orders` also matches `/ordersX`).
    Prefix(String),
    /// A `~` path, anchored at the start of the request path.
    Regex(Regex),
}

#[derive(Debug)]
enum HostRule {
    Exact(String),
    /// `*.example.com`: the stored suffix is `.example.com`.
    AnyPrefix(String),
    /// `example.*`: the stored prefix is `example.`.
    AnySuffix(String),
}

impl HostRule {
    fn parse(host: &str) -> HostRule {
        if let Some(suffix) = host.strip_prefix('*') {
            HostRule::AnyPrefix(suffix.to_string())
        } else if let Some(prefix) = host.strip_suffix('*') {
            HostRule::AnySuffix(prefix.to_string())
        } else {
            HostRule::Exact(host.to_string())
        }
    }

    /// `with_port` is the Host header as sent, `bare` the same without its port.
    fn matches(&self, with_port: &str, bare: &str) -> bool {
        match self {
            // A rule naming a port must match the port too.
            HostRule::Exact(h) if h.contains(':') => h.eq_ignore_ascii_case(with_port),
            HostRule::Exact(h) => h.eq_ignore_ascii_case(bare),
            HostRule::AnyPrefix(suffix) => {
                bare.len() > suffix.len()
                    && bare
                        .get(bare.len() - suffix.len()..)
                        .is_some_and(|end| end.eq_ignore_ascii_case(suffix))
            }
            HostRule::AnySuffix(prefix) => {
                bare.len() > prefix.len()
                    && bare.is_char_boundary(prefix.len())
                    && bare[..prefix.len()].eq_ignore_ascii_case(prefix)
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    route: usize,
    path: PathRule,
    methods: Vec<Method>,
    hosts: Vec<HostRule>,
    headers: Vec<(String, Vec<String>)>,
}

/// Kong's priority of an entry, larger first: (kinds of attributes, header rules, is regex,
/// regex_priority, path length).
type Priority = (u8, usize, bool, i64, usize);

/// The compiled routing table.
#[derive(Debug, Default)]
pub(crate) struct Router {
    entries: Vec<Entry>,
}

/// The route a request matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouteMatch {
    /// Index into the config's routes.
    pub route: usize,
    /// How many leading bytes of the path the route's path matched (what `strip_path` removes).
    pub matched_len: usize,
}

impl Router {
    /// Compiles the routes of a config that passed validation.
    pub fn build(config: &Config) -> Router {
        let mut keyed: Vec<(Entry, Priority)> = Vec::new();
        for (index, route) in config.routes.iter().enumerate() {
            let weight = [
                !route.hosts.is_empty(),
                !route.methods.is_empty(),
                !route.headers.is_empty(),
                !route.paths.is_empty(),
            ]
            .into_iter()
            .filter(|present| *present)
            .count() as u8;
            let paths: Vec<PathRule> = if route.paths.is_empty() {
                vec![PathRule::Any]
            } else {
                route
                    .paths
                    .iter()
                    .filter_map(|p| match p.strip_prefix('~') {
                        // Validation already compiled each pattern once, so this cannot fail.
                        Some(pattern) => Regex::new(&format!("^(?:{pattern})")).ok().map(PathRule::Regex),
                        None => Some(PathRule::Prefix(p.clone())),
                    })
                    .collect()
            };
            for path in paths {
                let (is_regex, length) = match &path {
                    PathRule::Any => (false, 0),
                    PathRule::Prefix(p) => (false, p.len()),
                    PathRule::Regex(re) => (true, re.as_str().len()),
                };
                let entry = Entry {
                    route: index,
                    path,
                    methods: route
                        .methods
                        .iter()
                        .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                        .collect(),
                    hosts: route.hosts.iter().map(|h| HostRule::parse(h)).collect(),
                    headers: route.headers.clone(),
                };
                keyed.push((
                    entry,
                    (weight, route.headers.len(), is_regex, route.regex_priority, length),
                ));
            }
        }
        // Stable sort keeps file order between equal priorities.
        keyed.sort_by_key(|(_, priority)| std::cmp::Reverse(*priority));
        Router {
            entries: keyed.into_iter().map(|(entry, _)| entry).collect(),
        }
    }

    /// Finds the route for a request; `host` is the Host header (or URI authority) as sent.
    pub fn find(&self, method: &Method, host: Option<&str>, path: &str, headers: &HeaderMap) -> Option<RouteMatch> {
        let with_port = host.unwrap_or("");
        let bare = strip_port(with_port);
        self.entries.iter().find_map(|entry| {
            if !entry.methods.is_empty() && !entry.methods.contains(method) {
                return None;
            }
            if !entry.hosts.is_empty() && !entry.hosts.iter().any(|h| h.matches(with_port, bare)) {
                return None;
            }
            for (name, accepted) in &entry.headers {
                let found = headers.get_all(name.as_str()).iter().any(|value| {
                    value
                        .to_str()
                        .is_ok_and(|v| accepted.iter().any(|a| a.eq_ignore_ascii_case(v.trim())))
                });
                if !found {
                    return None;
                }
            }
            let matched_len = match &entry.path {
                PathRule::Any => 0,
                PathRule::Prefix(prefix) => {
                    if !path.starts_with(prefix.as_str()) {
                        return None;
                    }
                    prefix.len()
                }
                PathRule::Regex(re) => re.find(path)?.end(),
            };
            Some(RouteMatch {
                route: entry.route,
                matched_len,
            })
        })
    }
}

/// `example.com:8000` → `example.com`; IPv6 literals (`[::1]:80`) keep their brackets.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
        _ => host,
    }
}

/// The path sent upstream: the service path joined with what is left of the request path.
///
/// This is Kong's `path_handling: v0`: with `strip_path` the matched part is removed, and the
/// rest is appended to the service path as is, except that a doubled slash is folded.
pub(crate) fn upstream_path(service_path: &str, request_path: &str, strip: Option<usize>) -> String {
    let rest = match strip {
        Some(len) => request_path.get(len..).unwrap_or(""),
        None => request_path,
    };
    if rest.is_empty() {
        return service_path.to_string();
    }
    if service_path.ends_with('/') && rest.starts_with('/') {
        format!("{service_path}{}", &rest[1..])
    } else {
        format!("{service_path}{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &str) -> (Router, Config) {
        let text = format!(
            "_format_version: \"3.0\"\nservices:\n  - name: s\n    url: http://127.0.0.1:1\n    routes:\n{routes}"
        );
        let config = Config::parse(&text).unwrap();
        (Router::build(&config), config)
    }

    fn find(r: &(Router, Config), method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        r.0.find(&method, Some(host), path, &map)
            .map(|m| r.1.routes[m.route].name.to_string())
    }

    #[test]
    fn longest_prefix_wins() {
        let r = router(
            "      - {name: short, paths: [/api]}\n      - {name: long, paths: [/api/v1/orders]}\n      - {name: mid, paths: [/api/v1]}\n",
        );
        assert_eq!(find(&r, "GET", "x", "/api/v1/orders/1", &[]).as_deref(), Some("long"));
        assert_eq!(find(&r, "GET", "x", "/api/v1/users", &[]).as_deref(), Some("mid"));
        assert_eq!(find(&r, "GET", "x", "/api/v2", &[]).as_deref(), Some("short"));
        assert_eq!(find(&r, "GET", "x", "/other", &[]), None);
    }

    #[test]
    fn more_attributes_beat_a_longer_path() {
        let r = router(concat!(
            "      - {name: any, paths: [/api/v1/products/list]}\n",
            "      - {name: get, paths: [/api/v1/products], methods: [GET]}\n",
            "      - {name: hosted, paths: [/api], hosts: [\"*.shop.test\"], methods: [GET]}\n",
        ));
        assert_eq!(
            find(&r, "GET", "a.shop.test:8000", "/api/v1/products/list", &[]).as_deref(),
            Some("hosted")
        );
        assert_eq!(
            find(&r, "GET", "localhost", "/api/v1/products/list", &[]).as_deref(),
            Some("get")
        );
        assert_eq!(
            find(&r, "POST", "localhost", "/api/v1/products/list", &[]).as_deref(),
            Some("any")
        );
        assert_eq!(find(&r, "POST", "localhost", "/api/v1/products", &[]), None);
    }

    #[test]
    fn regex_paths_ordered_by_regex_priority_and_before_prefixes() {
        let r = router(concat!(
            "      - {name: prefix, paths: [/users/]}\n",
            "      - {name: low, paths: [\"~/users/\\\\d+$\"], regex_priority: 1}\n",
            "      - {name: high, paths: [\"~/users/(\\\\d+|me)$\"], regex_priority: 5}\n",
        ));
        assert_eq!(find(&r, "GET", "x", "/users/12", &[]).as_deref(), Some("high"));
        assert_eq!(find(&r, "GET", "x", "/users/abc", &[]).as_deref(), Some("prefix"));
    }

    #[test]
    fn headers_and_hosts_must_match() {
        let r = router(concat!(
            "      - {name: v2, paths: [/api], headers: {x-version: [\"2\"]}}\n",
            "      - {name: plain, paths: [/api]}\n",
            "      - {name: tenant, hosts: [\"tenant.*\"]}\n",
        ));
        assert_eq!(
            find(&r, "GET", "x", "/api", &[("x-version", "2")]).as_deref(),
            Some("v2")
        );
        assert_eq!(
            find(&r, "GET", "x", "/api", &[("x-version", "3")]).as_deref(),
            Some("plain")
        );
        assert_eq!(
            find(&r, "GET", "tenant.io", "/anything", &[]).as_deref(),
            Some("tenant")
        );
    }

    #[test]
    fn joins_service_and_request_paths() {
        assert_eq!(upstream_path("/orders", "/api/v1/orders/123", Some(14)), "/orders/123");
        assert_eq!(upstream_path("/orders", "/api/v1/orders", Some(14)), "/orders");
        assert_eq!(upstream_path("/", "/api/v1/orders", Some(7)), "/orders");
        assert_eq!(upstream_path("/", "/x", None), "/x");
        assert_eq!(upstream_path("/base/", "/x", None), "/base/x");
        assert_eq!(upstream_path("/", "/api", Some(4)), "/");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
