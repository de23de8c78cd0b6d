//! The `cors` plugin: answers preflight requests itself and marks responses for browsers.
//!
//! Origins are matched as Kong does: `*` (or no origins) allows any, an entry made only of
//! URL characters is compared exactly, anything else is a regular expression that must match
//! the whole `Origin` header.

use http::header::{self, HeaderMap, HeaderValue};
use regex::Regex;
use serde::Deserialize;

/// The plugin's `config` block as written.
#[derive(Debug, Deserialize)]
pub(crate) struct CorsSpec {
    #[serde(default)]
    origins: Vec<String>,
    #[serde(default = "default_methods")]
    methods: Vec<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    exposed_headers: Vec<String>,
    #[serde(default)]
    credentials: bool,
    max_age: Option<u64>,
    #[serde(default)]
    preflight_continue: bool,
}

fn default_methods() -> Vec<String> {
    [
        "GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug)]
enum Origin {
    Exact(String),
    Pattern(Regex),
}

/// The checked config, with header values built once.
#[derive(Debug)]
pub(crate) struct CorsConfig {
    allow_any: bool,
    origins: Vec<Origin>,
    methods: HeaderValue,
    headers: Option<HeaderValue>,
    exposed_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
    /// Pass preflight requests on to the upstream instead of answering them.
    pub preflight_continue: bool,
}

impl CorsConfig {
    /// Checks the spec and builds the header values.
    pub fn compile(spec: CorsSpec) -> Result<CorsConfig, Vec<String>> {
        let mut errors = Vec::new();
        let mut origins = Vec::new();
        for (i, origin) in spec.origins.iter().enumerate() {
            if origin == "*" {
                continue;
            }
            if origin
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".:/-_".contains(&b))
            {
                origins.push(Origin::Exact(origin.to_ascii_lowercase()));
            } else {
                match Regex::new(&format!("^(?:{origin})$")) {
                    Ok(re) => origins.push(Origin::Pattern(re)),
                    Err(e) => errors.push(format!("config.origins[{i}]: invalid regex: {e}")),
                }
            }
        }
        let joined = |list: &[String], field: &str, errors: &mut Vec<String>| -> Option<HeaderValue> {
            if list.is_empty() {
                return None;
            }
            HeaderValue::from_str(&list.join(","))
                .map_err(|_| errors.push(format!("config.{field}: not valid header text")))
                .ok()
        };
        let methods = joined(&spec.methods, "methods", &mut errors).unwrap_or(HeaderValue::from_static(""));
        let headers = joined(&spec.headers, "headers", &mut errors);
        let exposed_headers = joined(&spec.exposed_headers, "exposed_headers", &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(CorsConfig {
            allow_any: spec.origins.is_empty() || spec.origins.iter().any(|o| o == "*"),
            origins,
            methods,
            headers,
            exposed_headers,
            credentials: spec.credentials,
            max_age: spec.max_age.map(HeaderValue::from),
            preflight_continue: spec.preflight_continue,
        })
    }

    /// Adds the origin headers for a request whose `Origin` is `origin`.
    fn allow_origin(&self, origin: Option<&HeaderValue>, out: &mut HeaderMap) {
        if self.allow_any {
            // Browsers refuse `*` together with credentials, so echo the origin then.
            match (self.credentials, origin) {
                (true, Some(origin)) => {
                    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                    out.append(header::VARY, HeaderValue::from_static("Origin"));
                }
                _ => {
                    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
                }
            }
            return;
        }
        out.append(header::VARY, HeaderValue::from_static("Origin"));
        let Some(origin) = origin else { return };
        let Ok(text) = origin.to_str() else { return };
        let lower = text.to_ascii_lowercase();
        let allowed = self.origins.iter().any(|rule| match rule {
            Origin::Exact(exact) => *exact == lower,
            Origin::Pattern(re) => re.is_match(text),
        });
        if allowed {
            out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
    }

    /// The headers of the gateway's answer to a preflight request.
    pub fn preflight_headers(&self, request: &HeaderMap) -> HeaderMap {
        let mut out = HeaderMap::new();
        self.allow_origin(request.get(header::ORIGIN), &mut out);
        if self.credentials {
            out.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let allow_headers = self
            .headers
            .clone()
            .or_else(|| request.get(header::ACCESS_CONTROL_REQUEST_HEADERS).cloned());
        if let Some(value) = allow_headers {
            out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, value);
        }
        out.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        if let Some(max_age) = &self.max_age {
            out.insert(header::ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        out
    }

    /// Adds the CORS headers to an ordinary response.
    pub fn decorate(&self, origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        self.allow_origin(origin, response);
        if self.credentials {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(exposed) = &self.exposed_headers {
            response.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed.clone());
        }
    }
}

/// Whether a request is a CORS preflight (not merely an `OPTIONS` call).
pub(crate) fn is_preflight(method: &http::Method, headers: &HeaderMap) -> bool {
    method == http::Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl super::Plugin for CorsConfig {
    const NAME: &'static str = "cors";

    fn parse(config: serde_yaml::Value) -> Result<Self, Vec<String>> {
        CorsConfig::compile(super::typed(config)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compile(yaml: &str) -> CorsConfig {
        CorsConfig::compile(serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn exact_and_regex_origins() {
        let conf = compile(r#"{origins: ["https://shop.example", "http://localhost:\\d+"], credentials: true}"#);
        let mut request = HeaderMap::new();
        request.insert(header::ORIGIN, HeaderValue::from_static("http://localhost:5173"));
        let out = conf.preflight_headers(&request);
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_ORIGIN], "http://localhost:5173");
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        request.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(!conf
            .preflight_headers(&request)
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
        request.insert(header::ORIGIN, HeaderValue::from_static("https://SHOP.example"));
        assert!(conf
            .preflight_headers(&request)
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    }

    #[test]
    fn any_origin_without_credentials_is_a_star() {
        let conf = compile("{}");
        let mut out = HeaderMap::new();
        conf.decorate(Some(&HeaderValue::from_static("http://a")), &mut out);
        assert_eq!(out[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    }

    #[test]
    fn bad_regex_is_a_config_error() {
        let spec = serde_yaml::from_str(r#"{origins: ["http://(x"]}"#).unwrap();
        assert!(CorsConfig::compile(spec).unwrap_err()[0].starts_with("config.origins[0]"));
    }
}
