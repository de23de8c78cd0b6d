//! Plugins: typed configs, and which instance applies to a request.
//!
//! A plugin can be attached globally or to a service, a route, a consumer, or a combination;
//! for each plugin name the most specific attachment matching the request wins, in Kong's
//! order (consumer+route+service > consumer+route > consumer+service > route+service >
//! consumer > route > service > global). Resolution without a consumer is done once per route
//! when the config loads; it is redone per request only when the JWT plugin identified a
//! consumer and some plugin is attached to consumers.

pub(crate) mod correlation;
pub(crate) mod cors;
pub(crate) mod jwt;
pub(crate) mod rate_limit;
pub(crate) mod size_limit;

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::config::Config;

/// Where a plugin is attached; `None` everywhere means global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PluginScope {
    pub service: Option<usize>,
    pub route: Option<usize>,
    pub consumer: Option<usize>,
}

impl PluginScope {
    /// How specific this attachment is for a request, or `None` when it does not apply to it.
    fn rank(&self, route: usize, service: Option<usize>, consumer: Option<usize>) -> Option<u8> {
        let matches = |attached: Option<usize>, actual: Option<usize>| attached.is_none() || attached == actual;
        if !matches(self.route, Some(route)) || !matches(self.service, service) || !matches(self.consumer, consumer) {
            return None;
        }
        Some(
            match (self.consumer.is_some(), self.route.is_some(), self.service.is_some()) {
                (true, true, true) => 8,
                (true, true, false) => 7,
                (true, false, true) => 6,
                (false, true, true) => 5,
                (true, false, false) => 4,
                (false, true, false) => 3,
                (false, false, true) => 2,
                (false, false, false) => 1,
            },
        )
    }
}

/// A plugin's typed configuration.
#[derive(Debug, Clone)]
pub(crate) enum PluginConfig {
    Jwt(Arc<jwt::JwtConfig>),
    RateLimiting(Arc<rate_limit::RateLimitConfig>),
    CorrelationId(Arc<correlation::CorrelationConfig>),
    RequestSizeLimiting(Arc<size_limit::SizeLimitConfig>),
    Cors(Arc<cors::CorsConfig>),
}

/// The plugin names this gateway knows.
const KNOWN: [&str; 5] = [
    "jwt",
    "rate-limiting",
    "correlation-id",
    "request-size-limiting",
    "cors",
];

impl PluginConfig {
    /// Types the `config` block of plugin `name`; problems come back as `name: …`/`config…: …`.
    pub fn parse(name: &str, config: Value) -> Result<PluginConfig, Vec<String>> {
        // `config:` left empty means "all defaults", as in Kong.
        let config = if config.is_null() {
            Value::Mapping(Default::default())
        } else {
            config
        };
        Ok(match name {
            "jwt" => PluginConfig::Jwt(Arc::new(typed(config)?)),
            "rate-limiting" => PluginConfig::RateLimiting(Arc::new(typed(config)?)),
            "correlation-id" => PluginConfig::CorrelationId(Arc::new(typed(config)?)),
            "request-size-limiting" => PluginConfig::RequestSizeLimiting(Arc::new(typed(config)?)),
            "cors" => PluginConfig::Cors(Arc::new(cors::CorsConfig::compile(typed(config)?)?)),
            other => {
                return Err(vec![format!(
                    "name: unknown plugin {other:?} (known: {})",
                    KNOWN.join(", ")
                )]);
            }
        })
    }

    /// The plugin's name as written in config files.
    pub fn name(&self) -> &'static str {
        match self {
            PluginConfig::Jwt(_) => "jwt",
            PluginConfig::RateLimiting(_) => "rate-limiting",
            PluginConfig::CorrelationId(_) => "correlation-id",
            PluginConfig::RequestSizeLimiting(_) => "request-size-limiting",
            PluginConfig::Cors(_) => "cors",
        }
    }
}

fn typed<T: DeserializeOwned>(config: Value) -> Result<T, Vec<String>> {
    serde_yaml::from_value(config).map_err(|e| vec![format!("config: {e}")])
}

/// The plugins that run for one request, each the most specific attachment of its name.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResolvedPlugins {
    pub correlation: Option<Arc<correlation::CorrelationConfig>>,
    pub cors: Option<Arc<cors::CorsConfig>>,
    pub jwt: Option<Arc<jwt::JwtConfig>>,
    pub size_limit: Option<Arc<size_limit::SizeLimitConfig>>,
    /// The config and the counter namespace of the attachment (counts are per attachment).
    pub rate_limit: Option<(Arc<rate_limit::RateLimitConfig>, Arc<str>)>,
}

/// Every plugin attachment of a config, with the per-route resolution done up front.
#[derive(Debug, Default)]
pub(crate) struct PluginSet {
    instances: Vec<(PluginScope, PluginConfig, Arc<str>)>,
    per_route: Vec<ResolvedPlugins>,
    consumer_scoped: bool,
}

impl PluginSet {
    /// Indexes the plugins of `config`.
    pub fn build(config: &Config) -> PluginSet {
        let instances: Vec<_> = config
            .plugins
            .iter()
            .map(|p| {
                let mut namespace = Vec::new();
                if let Some(s) = p.scope.service {
                    namespace.push(format!("service={}", config.services[s].name));
                }
                if let Some(r) = p.scope.route {
                    namespace.push(format!("route={}", config.routes[r].name));
                }
                if let Some(c) = p.scope.consumer {
                    namespace.push(format!("consumer={}", config.consumers[c].id));
                }
                let namespace = if namespace.is_empty() {
                    "global".to_string()
                } else {
                    namespace.join(",")
                };
                (p.scope, p.config.clone(), Arc::from(namespace))
            })
            .collect();
        let consumer_scoped = instances.iter().any(|(scope, _, _)| scope.consumer.is_some());
        let mut set = PluginSet {
            instances,
            per_route: Vec::new(),
            consumer_scoped,
        };
        set.per_route = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| set.resolve(i, r.service, None))
            .collect();
        set
    }

    /// The plugins for a request on `route` before any consumer is known.
    pub fn for_route(&self, route: usize) -> ResolvedPlugins {
        self.per_route.get(route).cloned().unwrap_or_default()
    }

    /// Whether identifying a consumer can change which plugins apply.
    pub fn has_consumer_plugins(&self) -> bool {
        self.consumer_scoped
    }

    /// Picks, for each plugin name, the most specific attachment that applies.
    pub fn resolve(&self, route: usize, service: Option<usize>, consumer: Option<usize>) -> ResolvedPlugins {
        let mut best = [0u8; 5];
        let mut out = ResolvedPlugins::default();
        for (scope, config, namespace) in &self.instances {
            let Some(rank) = scope.rank(route, service, consumer) else {
                continue;
            };
            let slot = match config {
                PluginConfig::CorrelationId(_) => 0,
                PluginConfig::Cors(_) => 1,
                PluginConfig::Jwt(_) => 2,
                PluginConfig::RequestSizeLimiting(_) => 3,
                PluginConfig::RateLimiting(_) => 4,
            };
            if rank <= best[slot] {
                continue;
            }
            best[slot] = rank;
            match config {
                PluginConfig::CorrelationId(c) => out.correlation = Some(c.clone()),
                PluginConfig::Cors(c) => out.cors = Some(c.clone()),
                PluginConfig::Jwt(c) => out.jwt = Some(c.clone()),
                PluginConfig::RequestSizeLimiting(c) => out.size_limit = Some(c.clone()),
                PluginConfig::RateLimiting(c) => out.rate_limit = Some((c.clone(), namespace.clone())),
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_specific_attachment_wins() {
        let text = r#"
_format_version: "3.0"
services:
  - name: s
    url: http://127.0.0.1:1
    routes:
      - name: r
        paths: [/r]
      - name: other
        paths: [/o]
consumers:
  - username: alice
plugins:
  - name: rate-limiting
    config: {minute: 100}
  - name: rate-limiting
    service: s
    config: {minute: 50}
  - name: rate-limiting
    route: r
    config: {minute: 10}
  - name: rate-limiting
    route: r
    consumer: alice
    config: {minute: 1}
"#;
        let config = Config::parse(text).unwrap();
        let set = PluginSet::build(&config);
        let minute = |p: ResolvedPlugins| p.rate_limit.map(|(c, _)| c.limits[0].1);
        assert_eq!(minute(set.for_route(0)), Some(10));
        assert_eq!(minute(set.for_route(1)), Some(50));
        assert_eq!(minute(set.resolve(0, Some(0), Some(0))), Some(1));
        assert_eq!(minute(set.resolve(1, Some(0), Some(0))), Some(50));
        assert!(set.has_consumer_plugins());
        assert_eq!(&*set.for_route(0).rate_limit.unwrap().1, "route=r");
    }
}
