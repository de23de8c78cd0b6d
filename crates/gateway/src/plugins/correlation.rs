//! The `correlation-id` plugin, and the W3C `traceparent` every proxied request carries.
//!
//! A request keeps the id it arrived with; otherwise the gateway makes one. The id travels
//! upstream in the configured header (and so into every service's log lines and events) and,
//! with `echo_downstream`, back to the client.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bazaar_trust::traceparent::Traceparent;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

/// How new ids look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Generator {
    /// A random UUID per request.
    Uuid,
    /// One UUID per process followed by `#` and a counter: cheap and still unique.
    UuidCounter,
    /// Where and when the request arrived: `server-client-counter-millis`.
    Tracker,
}

#[derive(Debug, Deserialize)]
struct CorrelationSpec {
    #[serde(default = "default_header")]
    header_name: String,
    #[serde(default = "default_generator")]
    generator: String,
    #[serde(default)]
    echo_downstream: bool,
}

fn default_header() -> String {
    "Kong-Request-ID".into()
}
fn default_generator() -> String {
    "uuid#counter".into()
}

/// The plugin's `config` block, checked: Kong's defaults are `Kong-Request-ID`,
/// `uuid#counter`, no echo.
#[derive(Debug, Deserialize)]
#[serde(try_from = "CorrelationSpec")]
pub(crate) struct CorrelationConfig {
    pub header: HeaderName,
    pub generator: Generator,
    pub echo_downstream: bool,
}

impl TryFrom<CorrelationSpec> for CorrelationConfig {
    type Error = String;

    fn try_from(spec: CorrelationSpec) -> Result<Self, String> {
        let header = HeaderName::from_bytes(spec.header_name.as_bytes())
            .map_err(|_| format!("header_name: {:?} is not a header name", spec.header_name))?;
        let generator = match spec.generator.as_str() {
            "uuid" => Generator::Uuid,
            "uuid#counter" => Generator::UuidCounter,
            "tracker" => Generator::Tracker,
            other => {
                return Err(format!(
                    "generator: {other:?} is not one of uuid, uuid#counter, tracker"
                ))
            }
        };
        Ok(CorrelationConfig {
            header,
            generator,
            echo_downstream: spec.echo_downstream,
        })
    }
}

/// Where the request came in, for the `tracker` generator.
pub(crate) struct Arrival {
    pub server: std::net::SocketAddr,
    pub client: std::net::SocketAddr,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new id; ASCII by construction, so its header value cannot fail in practice.
fn generate(generator: Generator, arrival: &Arrival) -> HeaderValue {
    let id = |text: &str| HeaderValue::from_str(text).unwrap_or(HeaderValue::from_static("0"));
    static PROCESS_ID: OnceLock<String> = OnceLock::new();
    let count = COUNTER.fetch_add(1, Ordering::Relaxed) + 1;
    match generator {
        // From the thread's generator (`new_v4` would ask the kernel for every id), written
        // into a buffer on the stack.
        Generator::Uuid => {
            let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
            id(uuid.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()))
        }
        Generator::UuidCounter => id(&format!(
            "{}#{count}",
            PROCESS_ID.get_or_init(|| uuid::Uuid::new_v4().to_string())
        )),
        Generator::Tracker => {
            let millis = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            id(&format!("{}-{}-{count}-{millis}", arrival.server, arrival.client))
        }
    }
}

/// The longest correlation id a client may send; a longer one (or one with spaces or control
/// characters) is replaced, so no client can make every log line and event carry kilobytes.
pub(crate) const MAX_CORRELATION_ID: usize = 128;

/// Ensures the request carries a correlation id and returns it (for echoing and logs): the
/// client's when it is 1 to [`MAX_CORRELATION_ID`] visible ASCII characters, else a new one.
pub(crate) fn apply(conf: &CorrelationConfig, headers: &mut HeaderMap, arrival: &Arrival) -> HeaderValue {
    let acceptable = |v: &&HeaderValue| {
        !v.is_empty() && v.len() <= MAX_CORRELATION_ID && v.as_bytes().iter().all(|b| (0x21..=0x7e).contains(b))
    };
    if let Some(existing) = headers.get(&conf.header).filter(acceptable) {
        return existing.clone();
    }
    let value = generate(conf.generator, arrival);
    headers.insert(conf.header.clone(), value.clone());
    value
}

/// Continues the caller's trace when it sent a valid `traceparent`, else starts one; either way
/// the gateway is a new span, so the parent id is fresh.
pub(crate) fn traceparent(headers: &mut HeaderMap) {
    // `00-` trace id (32 hex) `-` span id (16 hex) `-` flags (2 hex), written by hand: this
    // runs on every request.
    let mut value = *b"00-00000000000000000000000000000000-0000000000000000-01";
    match headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(Traceparent::parse)
    {
        Some(caller) => {
            value[3..35].copy_from_slice(caller.trace_id.as_bytes());
            value[53..55].copy_from_slice(caller.flags.as_bytes());
        }
        None => hex(rand::random::<u128>().max(1), &mut value[3..35]),
    }
    hex(u128::from(rand::random::<u64>().max(1)), &mut value[36..52]);
    if let Ok(value) = HeaderValue::from_bytes(&value) {
        headers.insert(TRACEPARENT, value);
    }
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Writes the low `out.len()` nibbles of `n` into `out` as lowercase hex, most significant first.
fn hex(mut n: u128, out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in out.iter_mut().rev() {
        *byte = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

impl super::Plugin for CorrelationConfig {
    const NAME: &'static str = "correlation-id";

    fn parse(config: serde_yaml::Value) -> Result<Self, Vec<String>> {
        super::typed(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_an_incoming_id_and_generates_otherwise() {
        let conf: CorrelationConfig = serde_yaml::from_str("{header_name: X-Correlation-ID, generator: uuid}").unwrap();
        let addr = "127.0.0.1:8000".parse().unwrap();
        let arrival = Arrival {
            server: addr,
            client: addr,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-correlation-id", HeaderValue::from_static("abc"));
        assert_eq!(apply(&conf, &mut headers, &arrival), "abc");
        let mut empty = HeaderMap::new();
        let made = apply(&conf, &mut empty, &arrival);
        assert_eq!(made.len(), 36);
        assert_eq!(empty.get("x-correlation-id"), Some(&made));
    }

    #[test]
    fn an_overlong_or_odd_incoming_id_is_replaced() {
        let conf: CorrelationConfig = serde_yaml::from_str("{header_name: X-Correlation-ID, generator: uuid}").unwrap();
        let addr = "127.0.0.1:8000".parse().unwrap();
        let arrival = Arrival {
            server: addr,
            client: addr,
        };
        let longest = "a".repeat(MAX_CORRELATION_ID);
        for (sent, kept) in [
            (longest.as_str(), true),
            (&*"a".repeat(MAX_CORRELATION_ID + 1), false),
            ("two words", false),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-correlation-id", HeaderValue::from_str(sent).unwrap());
            let id = apply(&conf, &mut headers, &arrival);
            assert_eq!(id == sent, kept, "{sent:?}");
            assert_eq!(
                headers.get("x-correlation-id"),
                Some(&id),
                "the upstream sees the id the gateway uses"
            );
        }
    }

    #[test]
    fn counter_ids_differ() {
        let conf: CorrelationConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(conf.header.as_str(), "kong-request-id");
        let addr = "127.0.0.1:8000".parse().unwrap();
        let arrival = Arrival {
            server: addr,
            client: addr,
        };
        let a = apply(&conf, &mut HeaderMap::new(), &arrival);
        let b = apply(&conf, &mut HeaderMap::new(), &arrival);
        assert_ne!(a, b);
        assert!(a.to_str().unwrap().contains('#'));
    }

    #[test]
    fn traceparent_keeps_the_trace_and_replaces_the_parent() {
        let mut headers = HeaderMap::new();
        let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        headers.insert("traceparent", HeaderValue::from_static(incoming));
        traceparent(&mut headers);
        let out = headers["traceparent"].to_str().unwrap().to_string();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert_ne!(out, incoming);
        let mut fresh = HeaderMap::new();
        traceparent(&mut fresh);
        assert!(Traceparent::parse(fresh["traceparent"].to_str().unwrap()).is_some());
    }

    #[test]
    fn a_later_version_is_continued_as_version_00_and_a_malformed_00_is_not() {
        let continued = |incoming: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert("traceparent", HeaderValue::from_static(incoming));
            traceparent(&mut headers);
            headers["traceparent"].to_str().unwrap().to_string()
        };
        let later = continued("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more");
        assert!(later.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{later}");
        let extra = continued("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more");
        assert!(!extra.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{extra}");
    }

    #[test]
    fn bad_generator_is_refused() {
        assert!(serde_yaml::from_str::<CorrelationConfig>("{generator: nope}").is_err());
    }
}
