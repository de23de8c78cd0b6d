//! Responses the gateway makes itself, in Kong's shape: a JSON body `{"message": …}`.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Any error a body can fail with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every response the gateway sends: either streamed from an upstream or
/// built in memory.
pub(crate) type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body from bytes already in memory.
pub(crate) fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed()
}

/// A JSON response with the given status.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Kong's error response: `{"message": "…"}` with the given status.
pub(crate) fn message(status: StatusCode, message: &str) -> Response<ProxyBody> {
    json(status, &serde_json::json!({ "message": message }))
}
