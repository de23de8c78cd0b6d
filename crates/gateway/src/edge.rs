//! What the gateway is given beside its declarative config: which proxies to believe about
//! the client, and documents it serves itself (bazaar's API reference) at paths no route of
//! the config matches.

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};

use crate::response::{full, ProxyBody};
use crate::TrustedProxies;

/// The gateway's setting beyond its config file.
#[derive(Debug, Clone, Default)]
pub struct Edge {
    /// Proxies whose `X-Forwarded-For` names the client (Kong's `trusted_ips`).
    pub trusted: TrustedProxies,
    /// Documents served at fixed paths where no route matches.
    pub documents: Vec<Document>,
    /// Writes the access line of each request when INFO is enabled; without it the line is
    /// a `tracing` event.
    pub access_log: Option<fn(&AccessEntry<'_>)>,
}

/// What the access line of one request says.
#[derive(Debug, Clone, Copy)]
pub struct AccessEntry<'a> {
    /// The request's method.
    pub method: &'a str,
    /// The request's path.
    pub path: &'a str,
    /// The answer's status.
    pub status: u16,
    /// The service the route led to (empty when none).
    pub service: &'a str,
    /// Microseconds from the request's head to the answer's head.
    pub us: u64,
    /// The correlation id the plugin gave the request (empty when none).
    pub correlation_id: &'a str,
}

/// A document the gateway serves itself for `GET` and `HEAD`.
#[derive(Debug, Clone)]
pub struct Document {
    /// The exact path, e.g. `/api/v1/openapi.json`.
    pub path: String,
    /// Its media type.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: Bytes,
}

impl Edge {
    /// The answer for `method` on `path` when it names one of the documents.
    pub(crate) fn document(&self, method: &Method, path: &str) -> Option<Response<ProxyBody>> {
        let document = self.documents.iter().find(|d| d.path == path)?;
        let mut response = if method == Method::GET || method == Method::HEAD {
            let mut response = Response::new(full(document.body.clone()));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(document.content_type));
            response
        } else {
            let mut response =
                crate::response::message(StatusCode::METHOD_NOT_ALLOWED, "this document is read with GET");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Some(response);
        };
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=60"));
        Some(response)
    }
}
