//! Plugins: typed configs, and which instance applies to a request.
//!
//! A plugin can be attached globally or to a service, a route, a consumer, or a combination;
//! for each plugin name the most specific attachment matching the request wins, in Kong's
//! order (consumer+route+service > consumer+route > consumer+service > route+service >
//! consumer > route > service > global). Resolution without a consumer is done once per route
//! when the config loads; it is redone per request only when the JWT plugin identified a
//! consumer and some plugin is attached to consumers.
//!
//! A plugin is one file: its config type implements [`Plugin`]. It joins the gateway by one
//! line in the [`registry!`] below, which declares its module and generates everything that
//! names every plugin (the typed config enum, the known names, the parse and the per-request
//! resolution), so no list can be forgotten: a plugin missing from a `match` does not compile.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::config::{Config, PluginScope};

/// What a plugin is to the gateway: its name in config files and how its `config` block
/// becomes its typed config.
pub(crate) trait Plugin: std::fmt::Debug + Send + Sync + Sized + 'static {
    /// Its name in config files (`rate-limiting`).
    const NAME: &'static str;

    /// Reads its `config` block (an empty block means every default); problems come back
    /// as `config…: …`.
    fn parse(config: Value) -> Result<Self, Vec<String>>;
}

/// Reads a plugin's `config` block into `T` with serde.
pub(crate) fn typed<T: DeserializeOwned>(config: Value) -> Result<T, Vec<String>> {
    serde_yaml::from_value(config).map_err(|e| vec![format!("config: {e}")])
}

/// One attachment of a plugin as a request sees it: its config, and the attachment's
/// name (`global`, `route=r`, …), which keys anything it counts.
#[derive(Debug)]
pub(crate) struct Attached<T> {
    /// The plugin's config.
    pub config: Arc<T>,
    /// Which attachment it is.
    pub namespace: Arc<str>,
}

impl<T> Clone for Attached<T> {
    fn clone(&self) -> Self {
        Attached {
            config: self.config.clone(),
            namespace: self.namespace.clone(),
        }
    }
}

impl<T> std::ops::Deref for Attached<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.config
    }
}

/// Declares each plugin's module and generates what names every plugin. One line per
/// plugin: `field: module::ConfigType => Variant`.
macro_rules! registry {
    ($($field:ident: $module:ident::$config:ident => $variant:ident),+ $(,)?) => {
        $(pub(crate) mod $module;)+

        /// A plugin's typed configuration.
        #[derive(Debug, Clone)]
        pub(crate) enum PluginConfig {
            $(
                #[doc = concat!("`", stringify!($module), "`")]
                $variant(Arc<$module::$config>),
            )+
        }

        /// The plugin names this gateway knows.
        const KNOWN: &[&str] = &[$(<$module::$config as Plugin>::NAME),+];

        impl PluginConfig {
            /// Types the `config` block of plugin `name`; problems come back as
            /// `name: …`/`config…: …`.
            pub fn parse(name: &str, config: Value) -> Result<PluginConfig, Vec<String>> {
                // `config:` left empty means "all defaults", as in Kong.
                let config = if config.is_null() { Value::Mapping(Default::default()) } else { config };
                $(
                    if name == <$module::$config as Plugin>::NAME {
                        return Ok(PluginConfig::$variant(Arc::new(<$module::$config as Plugin>::parse(config)?)));
                    }
                )+
                Err(vec![format!("name: unknown plugin {name:?} (known: {})", KNOWN.join(", "))])
            }
        }

        /// The plugins that run for one request, each the most specific attachment of its
        /// name.
        #[derive(Debug, Clone, Default)]
        pub(crate) struct ResolvedPlugins {
            $(
                #[doc = concat!("`", stringify!($module), "`, when attached")]
                pub $field: Option<Attached<$module::$config>>,
            )+
        }

        /// The rank of the attachment each plugin of a [`ResolvedPlugins`] came from.
        #[derive(Default)]
        struct Ranks {
            $($field: u8,)+
        }

        impl ResolvedPlugins {
            /// Takes `config` (attachment `namespace`, of `rank`) when it is more specific
            /// than what the plugin of its name has.
            fn offer(&mut self, ranks: &mut Ranks, rank: u8, config: &PluginConfig, namespace: &Arc<str>) {
                match config {
                    $(
                        PluginConfig::$variant(c) if rank > ranks.$field => {
                            ranks.$field = rank;
                            self.$field = Some(Attached { config: c.clone(), namespace: namespace.clone() });
                        }
                    )+
                    _ => {}
                }
            }
        }
    };
}

registry! {
    correlation: correlation::CorrelationConfig => CorrelationId,
    cors: cors::CorsConfig => Cors,
    jwt: jwt::JwtConfig => Jwt,
    size_limit: size_limit::SizeLimitConfig => RequestSizeLimiting,
    rate_limit: rate_limit::RateLimitConfig => RateLimiting,
}

/// Every plugin attachment of a config, with the per-route resolution done up front.
#[derive(Debug, Default)]
pub(crate) struct PluginSet {
    instances: Vec<(PluginScope, PluginConfig, Arc<str>)>,
    per_route: Vec<ResolvedPlugins>,
    consumer_scoped: bool,
}

impl PluginSet {
    /// Types the plugins of `config` and indexes the enabled ones; problems come back
    /// located (`plugins[1].config: …`).
    pub fn build(config: &Config) -> Result<PluginSet, Vec<String>> {
        let mut problems = Vec::new();
        let mut typed = Vec::new();
        for p in &config.plugins {
            match PluginConfig::parse(&p.name, p.config.clone()) {
                Ok(typed_config) if p.enabled => typed.push((p, typed_config)),
                Ok(_) => {}
                Err(found) => problems.extend(found.into_iter().map(|e| format!("{}.{e}", p.path))),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let instances: Vec<_> = typed
            .into_iter()
            .map(|(p, typed_config)| {
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
                (p.scope, typed_config, Arc::from(namespace))
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
        Ok(set)
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
        let mut ranks = Ranks::default();
        let mut out = ResolvedPlugins::default();
        for (scope, config, namespace) in &self.instances {
            if let Some(rank) = scope.rank(route, service, consumer) {
                out.offer(&mut ranks, rank, config, namespace);
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
        let set = PluginSet::build(&config).unwrap();
        let minute = |p: ResolvedPlugins| p.rate_limit.map(|c| c.limits[0].1);
        assert_eq!(minute(set.for_route(0)), Some(10));
        assert_eq!(minute(set.for_route(1)), Some(50));
        assert_eq!(minute(set.resolve(0, Some(0), Some(0))), Some(1));
        assert_eq!(minute(set.resolve(1, Some(0), Some(0))), Some(50));
        assert!(set.has_consumer_plugins());
        assert_eq!(&*set.for_route(0).rate_limit.unwrap().namespace, "route=r");
    }
}
