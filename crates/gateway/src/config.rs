//! The declarative configuration: Kong's DB-less format (`_format_version: "3.0"`).
//!
//! Loading happens in two steps. First every entity is parsed on its own into a typed `*Spec`
//! with serde, so one bad entry yields one error naming its location (`routes[2]: …`) instead
//! of aborting the whole file. Then the specs are resolved into a [`Config`]: references
//! between entities are followed, URLs split and paths checked. A plugin's `config` block is
//! kept as written; the plugins type it, in the step `loaded` runs next. Every problem found
//! on the way is collected so `bazaar gateway check` can report them all at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;

/// Kong's default for the three upstream timeouts, in milliseconds.
const DEFAULT_TIMEOUT_MS: u64 = 60_000;

/// The whole file as written, each section still untyped so entries parse one by one.
#[derive(Debug, Default, Deserialize)]
struct FileSpec {
    #[serde(rename = "_format_version")]
    format_version: Option<Value>,
    #[serde(default)]
    services: Vec<Value>,
    #[serde(default)]
    routes: Vec<Value>,
    #[serde(default)]
    upstreams: Vec<Value>,
    #[serde(default)]
    targets: Vec<Value>,
    #[serde(default)]
    consumers: Vec<Value>,
    #[serde(default)]
    jwt_secrets: Vec<Value>,
    #[serde(default)]
    plugins: Vec<Value>,
    #[serde(default)]
    certificates: Vec<Value>,
    #[serde(default)]
    ca_certificates: Vec<Value>,
}

/// A reference to another entity: Kong accepts a bare name or `{name: …}` / `{id: …}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum EntityRef {
    Name(String),
    Object {
        name: Option<String>,
        id: Option<String>,
        username: Option<String>,
    },
}

impl EntityRef {
    fn key(&self) -> Option<&str> {
        match self {
            EntityRef::Name(name) => Some(name),
            EntityRef::Object { name, id, username } => name.as_deref().or(username.as_deref()).or(id.as_deref()),
        }
    }
}

#[derive(Debug, Deserialize)]
struct ServiceSpec {
    name: Option<String>,
    id: Option<String>,
    url: Option<String>,
    protocol: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    path: Option<String>,
    #[serde(default = "default_timeout")]
    connect_timeout: u64,
    #[serde(default = "default_timeout")]
    read_timeout: u64,
    #[serde(default = "default_timeout")]
    write_timeout: u64,
    #[serde(default = "default_retries")]
    retries: u32,
    #[serde(default)]
    routes: Vec<Value>,
    #[serde(default)]
    plugins: Vec<Value>,
    client_certificate: Option<EntityRef>,
    tls_verify: Option<bool>,
    #[allow(dead_code)]
    tls_verify_depth: Option<u32>,
    #[serde(default)]
    ca_certificates: Vec<String>,
}

/// A client certificate and its key (Kong's `certificates`).
#[derive(Debug, Deserialize)]
struct CertificateSpec {
    id: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

/// A CA certificate upstreams are verified against (Kong's `ca_certificates`).
#[derive(Debug, Deserialize)]
struct CaCertificateSpec {
    id: Option<String>,
    cert: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RouteSpec {
    name: Option<String>,
    id: Option<String>,
    service: Option<EntityRef>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    headers: BTreeMap<String, Vec<String>>,
    #[serde(default = "yes")]
    strip_path: bool,
    #[serde(default)]
    preserve_host: bool,
    #[serde(default)]
    regex_priority: i64,
    #[serde(default)]
    plugins: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct UpstreamSpec {
    name: Option<String>,
    #[serde(default = "default_algorithm")]
    algorithm: String,
    #[serde(default = "default_hash_on")]
    hash_on: String,
    hash_on_header: Option<String>,
    #[serde(default)]
    healthchecks: HealthchecksSpec,
    #[serde(default)]
    targets: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct TargetSpec {
    upstream: Option<EntityRef>,
    target: Option<String>,
    #[serde(default = "default_weight")]
    weight: u32,
}

/// Kong's `healthchecks` block; every default below is Kong's.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct HealthchecksSpec {
    #[serde(default)]
    pub active: ActiveChecks,
    #[serde(default)]
    pub passive: PassiveChecks,
}

/// Active probing: the gateway calls `http_path` on every target on a timer.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct ActiveChecks {
    #[serde(default = "default_http_path")]
    pub http_path: String,
    /// Probe timeout, in seconds.
    #[serde(default = "default_probe_timeout")]
    pub timeout: f64,
    #[serde(default = "default_active_healthy")]
    pub healthy: HealthyThresholds,
    #[serde(default = "default_active_unhealthy")]
    pub unhealthy: UnhealthyThresholds,
}

impl Default for ActiveChecks {
    fn default() -> Self {
        ActiveChecks {
            http_path: default_http_path(),
            timeout: default_probe_timeout(),
            healthy: default_active_healthy(),
            unhealthy: default_active_unhealthy(),
        }
    }
}

/// Passive checks: proxied traffic itself counts as probes.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PassiveChecks {
    #[serde(default = "default_passive_healthy")]
    pub healthy: HealthyThresholds,
    #[serde(default = "default_passive_unhealthy")]
    pub unhealthy: UnhealthyThresholds,
}

impl Default for PassiveChecks {
    fn default() -> Self {
        PassiveChecks {
            healthy: default_passive_healthy(),
            unhealthy: default_passive_unhealthy(),
        }
    }
}

/// When a target counts as healthy again. A zero threshold disables that rule, as in Kong.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct HealthyThresholds {
    /// Seconds between probes of healthy targets (active only); 0 stops probing them.
    #[serde(default)]
    pub interval: f64,
    /// Statuses that count as successes; the builder fills in Kong's default when unset.
    pub http_statuses: Option<Vec<u16>>,
    #[serde(default)]
    pub successes: u32,
}

/// When a target counts as unhealthy. A zero threshold disables that rule, as in Kong.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct UnhealthyThresholds {
    /// Seconds between probes of unhealthy targets (active only); 0 stops probing them.
    #[serde(default)]
    pub interval: f64,
    /// Statuses that count as failures; the builder fills in Kong's default when unset.
    pub http_statuses: Option<Vec<u16>>,
    #[serde(default)]
    pub http_failures: u32,
    #[serde(default)]
    pub tcp_failures: u32,
    #[serde(default)]
    pub timeouts: u32,
}

#[derive(Debug, Deserialize)]
struct ConsumerSpec {
    username: Option<String>,
    custom_id: Option<String>,
    id: Option<String>,
    #[serde(default)]
    jwt_secrets: Vec<Value>,
    #[serde(default)]
    plugins: Vec<Value>,
}

#[derive(Debug, Deserialize)]
struct JwtSecretSpec {
    consumer: Option<EntityRef>,
    key: Option<String>,
    secret: Option<String>,
    #[serde(default = "default_jwt_algorithm")]
    algorithm: String,
    rsa_public_key: Option<String>,
    jwks_uri: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PluginSpec {
    name: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    config: Value,
    service: Option<EntityRef>,
    route: Option<EntityRef>,
    consumer: Option<EntityRef>,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_retries() -> u32 {
    5
}
fn yes() -> bool {
    true
}
fn default_algorithm() -> String {
    "round-robin".into()
}
fn default_hash_on() -> String {
    "none".into()
}
fn default_weight() -> u32 {
    100
}
fn default_http_path() -> String {
    "/".into()
}
fn default_probe_timeout() -> f64 {
    1.0
}
fn default_jwt_algorithm() -> String {
    "HS256".into()
}
fn default_active_healthy() -> HealthyThresholds {
    HealthyThresholds {
        interval: 0.0,
        http_statuses: Some(vec![200, 302]),
        successes: 0,
    }
}
fn default_active_unhealthy() -> UnhealthyThresholds {
    UnhealthyThresholds {
        interval: 0.0,
        http_statuses: Some(vec![429, 404, 500, 501, 502, 503, 504, 505]),
        http_failures: 0,
        tcp_failures: 0,
        timeouts: 0,
    }
}
fn default_passive_healthy() -> HealthyThresholds {
    let statuses = (200..=226).chain(300..=308).collect();
    HealthyThresholds {
        interval: 0.0,
        http_statuses: Some(statuses),
        successes: 0,
    }
}
fn default_passive_unhealthy() -> UnhealthyThresholds {
    UnhealthyThresholds {
        interval: 0.0,
        http_statuses: Some(vec![429, 500, 503]),
        http_failures: 0,
        tcp_failures: 0,
        timeouts: 0,
    }
}

/// A service: where matched requests go and how patiently.
#[derive(Debug)]
pub(crate) struct Service {
    pub name: Arc<str>,
    /// The service's `host`: a DNS name or IP, or the name of an upstream to balance over.
    pub host: String,
    pub port: u16,
    /// Prefix of every upstream path; `/` when unset.
    pub path: String,
    pub connect_timeout_ms: u64,
    /// Kong's `read_timeout`: the longest wait for the upstream's next read, the response head
    /// after the request went out or the next part of its body.
    pub read_timeout_ms: u64,
    /// Kong's `write_timeout`: the longest the request may take to go out to the upstream
    /// (it is buffered whole first, so this bounds an upstream that stops reading).
    pub write_timeout_ms: u64,
    pub retries: u32,
    /// Set for `protocol: https`.
    pub tls: Option<ServiceTls>,
}

/// How an https service is reached.
#[derive(Debug, Clone)]
pub(crate) struct ServiceTls {
    /// Index into [`Config::certificates`]: presented to the upstream.
    pub client_certificate: Option<usize>,
    /// Verify the upstream's certificate against `ca_certificates`.
    pub verify: bool,
    /// Indexes into [`Config::ca_certificates`].
    pub ca_certificates: Vec<usize>,
}

/// A certificate with its key, PEM.
#[derive(Debug)]
pub(crate) struct Certificate {
    pub cert: String,
    pub key: String,
}

/// A trusted CA certificate, PEM.
#[derive(Debug)]
pub(crate) struct CaCertificate {
    pub cert: String,
}

/// A route: which requests belong to which service.
#[derive(Debug)]
pub(crate) struct Route {
    pub name: Arc<str>,
    /// Index into [`Config::services`]; `None` for a route without a service (answered 503).
    pub service: Option<usize>,
    pub paths: Vec<String>,
    pub methods: Vec<String>,
    pub hosts: Vec<String>,
    /// Header name (lowercase) to accepted values (lowercase).
    pub headers: Vec<(String, Vec<String>)>,
    pub strip_path: bool,
    pub preserve_host: bool,
    pub regex_priority: i64,
}

/// How an upstream picks a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Algorithm {
    RoundRobin,
    LeastConnections,
    /// Consistent hashing on the given request header (lowercase), or the client IP when `None`.
    ConsistentHashing {
        header: Option<String>,
    },
}

/// A virtual host name whose traffic is spread over targets.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub name: String,
    pub algorithm: Algorithm,
    pub healthchecks: HealthchecksSpec,
    pub targets: Vec<Target>,
}

/// One `host:port` behind an upstream.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub address: String,
    pub weight: u32,
}

/// An API client known to the gateway, identified by its credentials.
#[derive(Debug)]
pub(crate) struct Consumer {
    pub id: String,
    pub username: Option<String>,
    pub custom_id: Option<String>,
}

/// A JWT credential: tokens whose key claim equals `key` are checked against this secret.
#[derive(Debug)]
pub(crate) struct JwtSecret {
    pub consumer: usize,
    pub key: String,
    pub algorithm: String,
    pub secret: String,
    pub rsa_public_key: Option<String>,
    /// Where to load the verifying keys (a JWKS, by `kid`): bazaar's extension for EdDSA.
    pub jwks_uri: Option<http::Uri>,
}

/// A plugin attached somewhere, with its `config` block as written.
#[derive(Debug)]
pub(crate) struct PluginInstance {
    /// Where it is located in the file (`plugins[2]`), for problems with its config.
    pub path: String,
    pub name: String,
    pub scope: PluginScope,
    pub config: Value,
    /// A disabled plugin's config is still checked; it applies nowhere.
    pub enabled: bool,
}

/// Where a plugin is attached; `None` everywhere means global.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PluginScope {
    pub service: Option<usize>,
    pub route: Option<usize>,
    pub consumer: Option<usize>,
}

impl PluginScope {
    /// How specific this attachment is for a request, or `None` when it does not apply to it.
    pub fn rank(&self, route: usize, service: Option<usize>, consumer: Option<usize>) -> Option<u8> {
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

/// A configuration that passed every check; the gateway serves from this.
#[derive(Debug, Default)]
pub(crate) struct Config {
    pub services: Vec<Service>,
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    pub consumers: Vec<Consumer>,
    pub jwt_secrets: Vec<JwtSecret>,
    pub plugins: Vec<PluginInstance>,
    pub certificates: Vec<Certificate>,
    pub ca_certificates: Vec<CaCertificate>,
}

/// Everything wrong with a config file, one located line each, such as
/// `routes[2].paths[0]: must start with /`: all of them at once, so one edit fixes the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct ConfigProblems(Vec<String>);

impl ConfigProblems {
    /// Problems, one located line each.
    pub(crate) fn new(lines: Vec<String>) -> ConfigProblems {
        ConfigProblems(lines)
    }

    /// The problems, one located line each.
    pub fn lines(&self) -> &[String] {
        &self.0
    }
}

impl<'a> IntoIterator for &'a ConfigProblems {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Config {
    /// Reads YAML or JSON text (JSON is read as YAML, of which it is a subset): the config as
    /// far as it could be resolved, and every problem found, so a caller can add its own.
    pub fn read(text: &str) -> (Config, Vec<String>) {
        let file: FileSpec = match serde_yaml::from_str(text) {
            Ok(file) => file,
            Err(e) => return (Config::default(), vec![format!("config: {e}")]),
        };
        let mut b = Builder::default();
        b.build(file);
        (b.config, b.errors)
    }

    /// Reads text whose plugins' configs are not looked at (tests of what is not a plugin).
    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Config, ConfigProblems> {
        match Config::read(text) {
            (config, errors) if errors.is_empty() => Ok(config),
            (_, errors) => Err(ConfigProblems(errors)),
        }
    }

    /// A one-line human summary, e.g. "5 services, 9 routes, 1 consumer, 3 plugins".
    pub fn summary(&self) -> String {
        let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut parts = vec![
            plural(self.services.len(), "service"),
            plural(self.routes.len(), "route"),
            plural(self.consumers.len(), "consumer"),
            plural(self.plugins.iter().filter(|p| p.enabled).count(), "plugin"),
        ];
        if !self.upstreams.is_empty() {
            parts.push(plural(self.upstreams.len(), "upstream"));
        }
        parts.join(", ")
    }
}

/// Plugins seen while walking the file, resolved once every entity is known.
struct PendingPlugin {
    path: String,
    spec: PluginSpec,
    service: Option<usize>,
    route: Option<usize>,
    consumer: Option<usize>,
}

/// Routes seen while walking the file, resolved once every service is known.
struct PendingRoute {
    path: String,
    spec: RouteSpec,
    service: Option<usize>,
}

#[derive(Default)]
struct Builder {
    config: Config,
    errors: Vec<String>,
    service_keys: HashMap<String, usize>,
    route_keys: HashMap<String, usize>,
    consumer_keys: HashMap<String, usize>,
    upstream_keys: HashMap<String, usize>,
    certificate_keys: HashMap<String, usize>,
    ca_certificate_keys: HashMap<String, usize>,
    routes: Vec<PendingRoute>,
    plugins: Vec<PendingPlugin>,
}

impl Builder {
    fn parse<T: DeserializeOwned>(&mut self, path: &str, value: Value) -> Option<T> {
        match serde_yaml::from_value(value) {
            Ok(spec) => Some(spec),
            Err(e) => {
                self.errors.push(format!("{path}: {e}"));
                None
            }
        }
    }

    fn build(&mut self, file: FileSpec) {
        match &file.format_version {
            None => self.errors.push("_format_version: missing (expected \"3.0\")".into()),
            Some(Value::String(v)) if v.starts_with("3.") || v.starts_with("2.") || v.starts_with("1.") => {}
            Some(other) => self
                .errors
                .push(format!("_format_version: unsupported {other:?} (expected \"3.0\")")),
        }
        for (i, value) in file.certificates.into_iter().enumerate() {
            self.certificate(format!("certificates[{i}]"), value);
        }
        for (i, value) in file.ca_certificates.into_iter().enumerate() {
            self.ca_certificate(format!("ca_certificates[{i}]"), value);
        }
        for (i, value) in file.services.into_iter().enumerate() {
            self.service(format!("services[{i}]"), value);
        }
        for (i, value) in file.routes.into_iter().enumerate() {
            self.pending_route(format!("routes[{i}]"), value, None);
        }
        for (i, value) in file.upstreams.into_iter().enumerate() {
            self.upstream(format!("upstreams[{i}]"), value);
        }
        for (i, value) in file.targets.into_iter().enumerate() {
            self.target(format!("targets[{i}]"), value, None);
        }
        for (i, value) in file.consumers.into_iter().enumerate() {
            self.consumer(format!("consumers[{i}]"), value);
        }
        for (i, value) in file.jwt_secrets.into_iter().enumerate() {
            self.jwt_secret(format!("jwt_secrets[{i}]"), value, None);
        }
        for (i, value) in file.plugins.into_iter().enumerate() {
            self.pending_plugin(format!("plugins[{i}]"), value, None, None, None);
        }
        self.resolve_routes();
        self.resolve_plugins();
        self.check_upstreams();
    }

    /// One piece: one services entry checked and stored; the url overrides the separate fields,
    /// the protocol decides the TLS and default port, and the new index is registered in
    /// service_keys and handed to the nested routes and plugins.
    fn service(&mut self, path: String, value: Value) {
        let Some(spec) = self.parse::<ServiceSpec>(&path, value) else {
            return;
        };
        let index = self.config.services.len();
        let name = spec
            .name
            .clone()
            .or(spec.id.clone())
            .unwrap_or_else(|| format!("service-{index}"));
        let (mut protocol, mut host, mut port, mut svc_path) =
            (spec.protocol.clone(), spec.host.clone(), spec.port, spec.path.clone());
        if let Some(url) = &spec.url {
            match split_url(url) {
                Ok(parts) => {
                    protocol = Some(parts.0);
                    host = Some(parts.1);
                    port = parts.2.or(port);
                    svc_path = parts.3.or(svc_path);
                }
                Err(e) => self.errors.push(format!("{path}.url: {e}")),
            }
        }
        let protocol = protocol.unwrap_or_else(|| "http".into());
        let tls = match protocol.as_str() {
            "http" => {
                if spec.client_certificate.is_some()
                    || spec.tls_verify == Some(true)
                    || !spec.ca_certificates.is_empty()
                {
                    self.errors.push(format!(
                        "{path}: client_certificate, tls_verify and ca_certificates need protocol https"
                    ));
                }
                None
            }
            "https" => Some(self.service_tls(&path, &spec)),
            other => {
                self.errors.push(format!(
                    "{path}.protocol: {other:?} is not supported (\"http\" or \"https\")"
                ));
                None
            }
        };
        let default_port = if tls.is_some() { 443 } else { 80 };
        let Some(host) = host.filter(|h| !h.is_empty()) else {
            self.errors.push(format!("{path}: needs a url or a host"));
            return;
        };
        let svc_path = svc_path.unwrap_or_else(|| "/".into());
        if !svc_path.starts_with('/') {
            self.errors.push(format!("{path}.path: must start with /"));
        }
        for (field, value) in [
            ("connect_timeout", spec.connect_timeout),
            ("read_timeout", spec.read_timeout),
            ("write_timeout", spec.write_timeout),
        ] {
            if value == 0 {
                self.errors.push(format!("{path}.{field}: must be greater than 0"));
            }
        }
        if self.service_keys.insert(name.clone(), index).is_some() {
            self.errors
                .push(format!("{path}.name: duplicate service name {name:?}"));
        }
        if let Some(id) = &spec.id {
            self.service_keys.insert(id.clone(), index);
        }
        self.config.services.push(Service {
            name: name.into(),
            host,
            port: port.unwrap_or(default_port),
            path: svc_path,
            connect_timeout_ms: spec.connect_timeout,
            read_timeout_ms: spec.read_timeout,
            write_timeout_ms: spec.write_timeout,
            retries: spec.retries,
            tls,
        });
        for (i, value) in spec.routes.into_iter().enumerate() {
            self.pending_route(format!("{path}.routes[{i}]"), value, Some(index));
        }
        for (i, value) in spec.plugins.into_iter().enumerate() {
            self.pending_plugin(format!("{path}.plugins[{i}]"), value, Some(index), None, None);
        }
    }

    /// The TLS settings of https service `spec`, its references resolved.
    fn service_tls(&mut self, path: &str, spec: &ServiceSpec) -> ServiceTls {
        let client_certificate = spec.client_certificate.as_ref().and_then(|reference| {
            let key = reference.key().unwrap_or("");
            let found = self.certificate_keys.get(key).copied();
            if found.is_none() {
                self.errors
                    .push(format!("{path}.client_certificate: no certificate {key:?}"));
            }
            found
        });
        let mut ca_certificates = Vec::new();
        for (i, id) in spec.ca_certificates.iter().enumerate() {
            match self.ca_certificate_keys.get(id) {
                Some(index) => ca_certificates.push(*index),
                None => self
                    .errors
                    .push(format!("{path}.ca_certificates[{i}]: no CA certificate {id:?}")),
            }
        }
        let verify = spec.tls_verify.unwrap_or(false);
        if verify && ca_certificates.is_empty() {
            self.errors.push(format!(
                "{path}.ca_certificates: tls_verify needs the CA certificates to verify with (this gateway has no system store)"
            ));
        }
        ServiceTls {
            client_certificate,
            verify,
            ca_certificates,
        }
    }

    fn certificate(&mut self, path: String, value: Value) {
        let Some(spec) = self.parse::<CertificateSpec>(&path, value) else {
            return;
        };
        let (Some(id), Some(cert), Some(key)) = (spec.id, spec.cert, spec.key) else {
            self.errors.push(format!("{path}: needs id, cert and key"));
            return;
        };
        if let Err(e) = crate::tls::certificates(&cert) {
            self.errors.push(format!("{path}.cert: {e}"));
        }
        if let Err(e) = crate::tls::private_key(&key) {
            self.errors.push(format!("{path}.key: {e}"));
        }
        if self
            .certificate_keys
            .insert(id.clone(), self.config.certificates.len())
            .is_some()
        {
            self.errors.push(format!("{path}.id: duplicate certificate id {id:?}"));
        }
        self.config.certificates.push(Certificate { cert, key });
    }

    fn ca_certificate(&mut self, path: String, value: Value) {
        let Some(spec) = self.parse::<CaCertificateSpec>(&path, value) else {
            return;
        };
        let (Some(id), Some(cert)) = (spec.id, spec.cert) else {
            self.errors.push(format!("{path}: needs id and cert"));
            return;
        };
        if let Err(e) = crate::tls::certificates(&cert) {
            self.errors.push(format!("{path}.cert: {e}"));
        }
        if self
            .ca_certificate_keys
            .insert(id.clone(), self.config.ca_certificates.len())
            .is_some()
        {
            self.errors
                .push(format!("{path}.id: duplicate CA certificate id {id:?}"));
        }
        self.config.ca_certificates.push(CaCertificate { cert });
    }

    fn pending_route(&mut self, path: String, value: Value, service: Option<usize>) {
        if let Some(spec) = self.parse::<RouteSpec>(&path, value) {
            self.routes.push(PendingRoute { path, spec, service });
        }
    }

    /// One piece: one pass over the pending routes; each route's checks, its default name from
    /// `index`, its entry in route_keys and its plugins' route index all refer to the Route
    /// pushed at that same position.
    fn resolve_routes(&mut self) {
        for pending in std::mem::take(&mut self.routes) {
            let PendingRoute { path, spec, service } = pending;
            let index = self.config.routes.len();
            let service = match (&spec.service, service) {
                (_, Some(owner)) => Some(owner),
                (Some(reference), None) => {
                    let found = reference.key().and_then(|k| self.service_keys.get(k).copied());
                    if found.is_none() {
                        self.errors.push(format!(
                            "{path}.service: no service {:?}",
                            reference.key().unwrap_or("")
                        ));
                    }
                    found
                }
                (None, None) => None,
            };
            if spec.paths.is_empty() && spec.hosts.is_empty() && spec.methods.is_empty() && spec.headers.is_empty() {
                self.errors.push(format!(
                    "{path}: must set at least one of paths, hosts, methods, headers"
                ));
            }
            for (i, p) in spec.paths.iter().enumerate() {
                if let Some(pattern) = p.strip_prefix('~') {
                    if let Err(e) = regex::Regex::new(pattern) {
                        self.errors.push(format!("{path}.paths[{i}]: invalid regex: {e}"));
                    }
                } else if !p.starts_with('/') {
                    self.errors.push(format!("{path}.paths[{i}]: must start with /"));
                }
            }
            for (i, m) in spec.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                    self.errors
                        .push(format!("{path}.methods[{i}]: {m:?} is not an uppercase HTTP method"));
                }
            }
            for (i, h) in spec.hosts.iter().enumerate() {
                let wildcards = h.matches('*').count();
                let valid =
                    !h.is_empty() && (wildcards == 0 || (wildcards == 1 && (h.starts_with("*.") || h.ends_with(".*"))));
                if !valid {
                    self.errors.push(format!(
                        "{path}.hosts[{i}]: {h:?} is not a host name (a wildcard goes first or last)"
                    ));
                }
            }
            let name = spec
                .name
                .clone()
                .or(spec.id.clone())
                .unwrap_or_else(|| format!("route-{index}"));
            if self.route_keys.insert(name.clone(), index).is_some() {
                self.errors.push(format!("{path}.name: duplicate route name {name:?}"));
            }
            if let Some(id) = &spec.id {
                self.route_keys.insert(id.clone(), index);
            }
            self.config.routes.push(Route {
                name: name.into(),
                service,
                paths: spec.paths,
                methods: spec.methods,
                hosts: spec.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                headers: spec
                    .headers
                    .into_iter()
                    .map(|(k, v)| {
                        (
                            k.to_ascii_lowercase(),
                            v.into_iter().map(|s| s.to_ascii_lowercase()).collect(),
                        )
                    })
                    .collect(),
                strip_path: spec.strip_path,
                preserve_host: spec.preserve_host,
                regex_priority: spec.regex_priority,
            });
            for (i, value) in spec.plugins.into_iter().enumerate() {
                self.pending_plugin(format!("{path}.plugins[{i}]"), value, None, Some(index), None);
            }
        }
    }

    /// One piece: one upstreams entry checked and stored; algorithm errors fall back to
    /// round-robin so checking goes on under the same `path`, and the new index goes to
    /// upstream_keys and to the targets parsed after the Upstream is pushed.
    fn upstream(&mut self, path: String, value: Value) {
        let Some(spec) = self.parse::<UpstreamSpec>(&path, value) else {
            return;
        };
        let Some(name) = spec.name.clone().filter(|n| !n.is_empty()) else {
            self.errors.push(format!("{path}.name: required"));
            return;
        };
        let algorithm = match spec.algorithm.as_str() {
            "round-robin" => Algorithm::RoundRobin,
            "least-connections" => Algorithm::LeastConnections,
            "consistent-hashing" => match spec.hash_on.as_str() {
                "header" => match &spec.hash_on_header {
                    Some(h) => Algorithm::ConsistentHashing {
                        header: Some(h.to_ascii_lowercase()),
                    },
                    None => {
                        self.errors
                            .push(format!("{path}.hash_on_header: required when hash_on is \"header\""));
                        Algorithm::RoundRobin
                    }
                },
                "ip" | "none" => Algorithm::ConsistentHashing { header: None },
                other => {
                    self.errors.push(format!(
                        "{path}.hash_on: {other:?} is not supported (header, ip or none)"
                    ));
                    Algorithm::RoundRobin
                }
            },
            other => {
                self.errors.push(format!(
                    "{path}.algorithm: {other:?} is not one of round-robin, least-connections, consistent-hashing"
                ));
                Algorithm::RoundRobin
            }
        };
        let index = self.config.upstreams.len();
        if self.upstream_keys.insert(name.clone(), index).is_some() {
            self.errors
                .push(format!("{path}.name: duplicate upstream name {name:?}"));
        }
        let mut healthchecks = spec.healthchecks;
        // A partly written block keeps Kong's default statuses for what it leaves out.
        let (active, passive) = (&mut healthchecks.active, &mut healthchecks.passive);
        active.healthy.http_statuses = active
            .healthy
            .http_statuses
            .take()
            .or(default_active_healthy().http_statuses);
        active.unhealthy.http_statuses = active
            .unhealthy
            .http_statuses
            .take()
            .or(default_active_unhealthy().http_statuses);
        passive.healthy.http_statuses = passive
            .healthy
            .http_statuses
            .take()
            .or(default_passive_healthy().http_statuses);
        passive.unhealthy.http_statuses = passive
            .unhealthy
            .http_statuses
            .take()
            .or(default_passive_unhealthy().http_statuses);
        self.config.upstreams.push(Upstream {
            name,
            algorithm,
            healthchecks,
            targets: Vec::new(),
        });
        for (i, value) in spec.targets.into_iter().enumerate() {
            self.target(format!("{path}.targets[{i}]"), value, Some(index));
        }
    }

    fn target(&mut self, path: String, value: Value, upstream: Option<usize>) {
        let Some(spec) = self.parse::<TargetSpec>(&path, value) else {
            return;
        };
        let upstream = match (upstream, &spec.upstream) {
            (Some(owner), _) => owner,
            (None, Some(reference)) => match reference.key().and_then(|k| self.upstream_keys.get(k).copied()) {
                Some(found) => found,
                None => {
                    self.errors.push(format!(
                        "{path}.upstream: no upstream {:?}",
                        reference.key().unwrap_or("")
                    ));
                    return;
                }
            },
            (None, None) => {
                self.errors.push(format!("{path}.upstream: required"));
                return;
            }
        };
        let Some(address) = spec.target else {
            self.errors.push(format!("{path}.target: required"));
            return;
        };
        // Kong defaults a target without a port to 8000.
        let address = if address.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            address
        } else {
            format!("{address}:8000")
        };
        if spec.weight > 65535 {
            self.errors.push(format!("{path}.weight: must be between 0 and 65535"));
        }
        self.config.upstreams[upstream].targets.push(Target {
            address,
            weight: spec.weight,
        });
    }

    fn consumer(&mut self, path: String, value: Value) {
        let Some(spec) = self.parse::<ConsumerSpec>(&path, value) else {
            return;
        };
        if spec.username.is_none() && spec.custom_id.is_none() {
            self.errors.push(format!("{path}: needs a username or a custom_id"));
            return;
        }
        let index = self.config.consumers.len();
        let label = spec.username.clone().or(spec.custom_id.clone()).unwrap_or_default();
        let id = spec
            .id
            .clone()
            .unwrap_or_else(|| stable_uuid(&format!("consumer:{label}")));
        for key in [spec.username.clone(), spec.custom_id.clone(), Some(id.clone())]
            .into_iter()
            .flatten()
        {
            if self
                .consumer_keys
                .insert(key.clone(), index)
                .is_some_and(|previous| previous != index)
            {
                self.errors.push(format!("{path}: duplicate consumer {key:?}"));
            }
        }
        self.config.consumers.push(Consumer {
            id,
            username: spec.username,
            custom_id: spec.custom_id,
        });
        for (i, value) in spec.jwt_secrets.into_iter().enumerate() {
            self.jwt_secret(format!("{path}.jwt_secrets[{i}]"), value, Some(index));
        }
        for (i, value) in spec.plugins.into_iter().enumerate() {
            self.pending_plugin(format!("{path}.plugins[{i}]"), value, None, None, Some(index));
        }
    }

    /// One piece: one jwt_secrets entry checked and stored; the algorithm decides which of
    /// secret, rsa_public_key and jwks_uri are required or allowed, and every error is
    /// reported under the same `path` before the one JwtSecret is pushed.
    fn jwt_secret(&mut self, path: String, value: Value, consumer: Option<usize>) {
        let Some(spec) = self.parse::<JwtSecretSpec>(&path, value) else {
            return;
        };
        let consumer = match (consumer, &spec.consumer) {
            (Some(owner), _) => owner,
            (None, Some(reference)) => match reference.key().and_then(|k| self.consumer_keys.get(k).copied()) {
                Some(found) => found,
                None => {
                    self.errors.push(format!(
                        "{path}.consumer: no consumer {:?}",
                        reference.key().unwrap_or("")
                    ));
                    return;
                }
            },
            (None, None) => {
                self.errors.push(format!("{path}.consumer: required"));
                return;
            }
        };
        let Some(key) = spec.key.filter(|k| !k.is_empty()) else {
            self.errors.push(format!("{path}.key: required"));
            return;
        };
        if self.config.jwt_secrets.iter().any(|s| s.key == key) {
            self.errors.push(format!("{path}.key: duplicate jwt key {key:?}"));
        }
        let algorithm = spec.algorithm;
        match algorithm.as_str() {
            "HS256" | "HS384" | "HS512" => {
                if spec.secret.as_deref().unwrap_or("").is_empty() {
                    self.errors.push(format!("{path}.secret: required for {algorithm}"));
                }
            }
            "RS256" | "RS384" | "RS512" => match &spec.rsa_public_key {
                None => self
                    .errors
                    .push(format!("{path}.rsa_public_key: required for {algorithm}")),
                Some(pem) => {
                    if let Err(e) = crate::keys::rsa_public_key_der(pem) {
                        self.errors.push(format!("{path}.rsa_public_key: {e}"));
                    }
                }
            },
            "EdDSA" => match (&spec.rsa_public_key, &spec.jwks_uri) {
                (Some(pem), None) => {
                    if let Err(e) = crate::keys::ed25519_public_key(pem) {
                        self.errors.push(format!("{path}.rsa_public_key: {e}"));
                    }
                }
                (None, Some(_)) => {}
                _ => self.errors.push(format!(
                    "{path}: EdDSA needs exactly one of rsa_public_key (an Ed25519 PUBLIC KEY PEM) and jwks_uri"
                )),
            },
            other => self.errors.push(format!(
                "{path}.algorithm: {other:?} is not supported (HS256/384/512, RS256/384/512, EdDSA)"
            )),
        }
        let jwks_uri = match spec.jwks_uri.as_deref() {
            None => None,
            Some(_) if algorithm != "EdDSA" => {
                self.errors
                    .push(format!("{path}.jwks_uri: only EdDSA credentials load a JWKS"));
                None
            }
            Some(text) => match text.parse::<http::Uri>() {
                Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => Some(uri),
                // Reached as the gateway proxies to the service with that host.
                Ok(uri)
                    if uri.scheme_str() == Some("https")
                        && uri.host().is_some_and(|h| {
                            let port = uri.port_u16().unwrap_or(443);
                            self.config
                                .services
                                .iter()
                                .any(|s| s.host == h && s.port == port && s.tls.is_some())
                        }) =>
                {
                    Some(uri)
                }
                _ => {
                    self.errors.push(format!(
                        "{path}.jwks_uri: {text:?} is neither an http:// URL nor an https:// one whose host is an https service's host"
                    ));
                    None
                }
            },
        };
        self.config.jwt_secrets.push(JwtSecret {
            consumer,
            key,
            algorithm,
            secret: spec.secret.unwrap_or_default(),
            rsa_public_key: spec.rsa_public_key,
            jwks_uri,
        });
    }

    fn pending_plugin(
        &mut self,
        path: String,
        value: Value,
        service: Option<usize>,
        route: Option<usize>,
        consumer: Option<usize>,
    ) {
        if let Some(spec) = self.parse::<PluginSpec>(&path, value) {
            self.plugins.push(PendingPlugin {
                path,
                spec,
                service,
                route,
                consumer,
            });
        }
    }

    fn resolve_plugins(&mut self) {
        for pending in std::mem::take(&mut self.plugins) {
            let PendingPlugin {
                path,
                spec,
                service,
                route,
                consumer,
            } = pending;
            let service = service.or_else(|| self.lookup(&path, "service", spec.service.as_ref()));
            let route = route.or_else(|| self.lookup(&path, "route", spec.route.as_ref()));
            let consumer = consumer.or_else(|| self.lookup(&path, "consumer", spec.consumer.as_ref()));
            let scope = PluginScope {
                service,
                route,
                consumer,
            };
            if spec.enabled
                && self
                    .config
                    .plugins
                    .iter()
                    .any(|p| p.enabled && p.scope == scope && p.name == spec.name)
            {
                self.errors
                    .push(format!("{path}: a {} plugin is already set for this scope", spec.name));
            }
            self.config.plugins.push(PluginInstance {
                path,
                name: spec.name,
                scope,
                config: spec.config,
                enabled: spec.enabled,
            });
        }
    }

    fn lookup(&mut self, path: &str, field: &str, reference: Option<&EntityRef>) -> Option<usize> {
        let key = reference?.key().unwrap_or("");
        let keys = match field {
            "service" => &self.service_keys,
            "route" => &self.route_keys,
            _ => &self.consumer_keys,
        };
        let found = keys.get(key).copied();
        if found.is_none() {
            self.errors.push(format!("{path}.{field}: no {field} {key:?}"));
        }
        found
    }

    /// An upstream without targets could never serve; Kong accepts it, but it is always a mistake.
    fn check_upstreams(&mut self) {
        for (i, upstream) in self.config.upstreams.iter().enumerate() {
            if upstream.targets.is_empty() {
                self.errors
                    .push(format!("upstreams[{i}].targets: {:?} has no targets", upstream.name));
            }
        }
    }
}

/// Splits `http://host:port/path` into its parts; the path is `None` when absent.
fn split_url(url: &str) -> Result<(String, String, Option<u16>, Option<String>), String> {
    let (scheme, rest) = url.split_once("://").ok_or("must look like http://host:port/path")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(rest[i..].to_string())),
        None => (rest, None),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| format!("invalid port {p:?}"))?)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok((scheme.to_ascii_lowercase(), host.to_string(), port, path))
}

/// A UUID derived from a name, so an entity without an `id` keeps the same one across reloads.
fn stable_uuid(name: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest.as_ref()[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_with_its_location() {
        let text = r#"
_format_version: "3.0"
services:
  - name: a
    url: http://127.0.0.1:9/x
    routes:
      - name: r1
        paths: [nope]
routes:
  - name: r2
    service: missing
    paths: ["/ok", "~(unclosed"]
plugins:
  - name: no-such-plugin
  - name: rate-limiting
    config: {}
"#;
        let errors = crate::loaded::parse(text).unwrap_err();
        let joined = errors.to_string();
        assert!(
            joined.contains("services[0].routes[0].paths[0]: must start with /"),
            "{joined}"
        );
        assert!(joined.contains("routes[0].service: no service \"missing\""), "{joined}");
        assert!(joined.contains("routes[0].paths[1]: invalid regex"), "{joined}");
        assert!(
            joined.contains("plugins[0].name: unknown plugin \"no-such-plugin\""),
            "{joined}"
        );
        assert!(joined.contains("plugins[1].config"), "{joined}");
    }

    #[test]
    fn parses_services_routes_and_summary() {
        let text = r#"
_format_version: "3.0"
services:
  - name: orders
    url: http://127.0.0.1:8103/orders
    routes:
      - name: orders
        paths: [/api/v1/orders]
consumers:
  - username: alice
    jwt_secrets:
      - key: alice-key
        secret: s3cret
plugins:
  - name: correlation-id
"#;
        let config = Config::parse(text).unwrap();
        assert_eq!(config.summary(), "1 service, 1 route, 1 consumer, 1 plugin");
        let service = &config.services[0];
        assert_eq!(
            (service.host.as_str(), service.port, service.path.as_str()),
            ("127.0.0.1", 8103, "/orders")
        );
        assert_eq!(service.retries, 5);
        assert_eq!(service.read_timeout_ms, 60_000);
        assert!(config.routes[0].strip_path);
        assert_eq!(config.jwt_secrets[0].consumer, 0);
        assert_eq!(config.consumers[0].id, stable_uuid("consumer:alice"));
    }

    #[test]
    fn missing_format_version_is_an_error() {
        let errors = Config::parse("services: []").unwrap_err();
        assert!(errors.lines()[0].starts_with("_format_version"), "{errors:?}");
    }

    #[test]
    fn json_is_accepted() {
        let text = r#"{"_format_version":"3.0","services":[{"name":"s","host":"example.com","port":81}]}"#;
        let config = Config::parse(text).unwrap();
        assert_eq!(config.services[0].port, 81);
    }
}
