//! Responses the gateway makes itself, in Kong's shape: a JSON body `{"message": …}`, or
//! for a browser a short page in words.

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

/// Kong's error response: `{"message": "…"}` with the given status. It is marked as the
/// gateway's own, so a browser asking for a page gets one instead ([`as_page`]).
pub(crate) fn message(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = json(status, &serde_json::json!({ "message": message }));
    response.extensions_mut().insert(OwnMessage);
    response
}

/// Marks a response the gateway wrote itself (not an upstream's).
#[derive(Debug, Clone, Copy)]
struct OwnMessage;

/// Whether a client asked for a web page first (a browser navigating), as Kong's error
/// handler decides between its HTML and JSON templates.
pub(crate) fn wants_page(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.starts_with("text/html"))
}

/// The gateway's own error `response` as a short HTML page in words; anything else as it is.
pub(crate) fn as_page(response: Response<ProxyBody>) -> Response<ProxyBody> {
    if response.extensions().get::<OwnMessage>().is_none() {
        return response;
    }
    let status = response.status();
    let words = match status {
        StatusCode::TOO_MANY_REQUESTS => {
            "Too many requests from your address in a short time; wait a moment and try again."
        }
        StatusCode::NOT_FOUND => "There is no page here.",
        StatusCode::PAYLOAD_TOO_LARGE => "What was sent is too large.",
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "You are not allowed to see this.",
        s if s.is_server_error() => "The shop is busy or down for a moment; please try again shortly.",
        _ => "That request could not be served.",
    };
    let (mut parts, _) = response.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    let page = format!(
        "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{title}</title><h1>{title}</h1><p role=\"alert\">{words}</p><p><a href=\"/\">Back to the shop</a></p></html>",
        title = status.canonical_reason().unwrap_or("Error"),
    );
    Response::from_parts(parts, full(page))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browser_gets_the_gateways_own_errors_as_a_page_and_upstream_answers_untouched() {
        let page = as_page(message(StatusCode::TOO_MANY_REQUESTS, "API rate limit exceeded"));
        assert_eq!(page.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        let upstream = as_page(json(StatusCode::TOO_MANY_REQUESTS, &serde_json::json!({"detail": "x"})));
        assert_eq!(
            upstream.headers()[header::CONTENT_TYPE],
            "application/json; charset=utf-8"
        );
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("text/html,application/xhtml+xml,*/*;q=0.8"),
        );
        assert!(wants_page(&headers));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert!(!wants_page(&headers));
    }
}
