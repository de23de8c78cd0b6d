//! The `request-size-limiting` plugin: bodies above the allowed size are refused with 413.
//!
//! A declared `Content-Length` is checked before anything is read; a body without one is
//! counted as it is read, so a chunked upload cannot slip past the limit.

use http::{HeaderMap, StatusCode};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct SizeLimitSpec {
    #[serde(default = "default_size")]
    allowed_payload_size: u64,
    #[serde(default = "default_unit")]
    size_unit: String,
    #[serde(default)]
    require_content_length: bool,
}

fn default_size() -> u64 {
    128
}
fn default_unit() -> String {
    "megabytes".into()
}

/// The plugin's `config` block, checked; sizes use binary units as Kong does (1 MB = 2^20).
#[derive(Debug, Deserialize)]
#[serde(try_from = "SizeLimitSpec")]
pub(crate) struct SizeLimitConfig {
    pub allowed_bytes: u64,
    pub require_content_length: bool,
}

impl TryFrom<SizeLimitSpec> for SizeLimitConfig {
    type Error = String;

    fn try_from(spec: SizeLimitSpec) -> Result<Self, String> {
        let unit = match spec.size_unit.as_str() {
            "megabytes" => 1 << 20,
            "kilobytes" => 1 << 10,
            "bytes" => 1,
            other => {
                return Err(format!(
                    "size_unit: {other:?} is not one of megabytes, kilobytes, bytes"
                ))
            }
        };
        let allowed_bytes = spec
            .allowed_payload_size
            .checked_mul(unit)
            .ok_or("allowed_payload_size: too large")?;
        Ok(SizeLimitConfig {
            allowed_bytes,
            require_content_length: spec.require_content_length,
        })
    }
}

/// Kong's refusal for a body that is too large.
pub(crate) const TOO_LARGE: (StatusCode, &str) = (StatusCode::PAYLOAD_TOO_LARGE, "Request size limit exceeded");

/// Checks the declared size; `Ok` means the body may still need counting while read.
pub(crate) fn check_headers(conf: &SizeLimitConfig, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    match declared {
        Some(length) if length > conf.allowed_bytes => Err(TOO_LARGE),
        Some(_) => Ok(()),
        None if conf.require_content_length => {
            Err((StatusCode::LENGTH_REQUIRED, "A valid Content-Length header is required"))
        }
        None => Ok(()),
    }
}

impl super::Plugin for SizeLimitConfig {
    const NAME: &'static str = "request-size-limiting";

    fn parse(config: serde_yaml::Value) -> Result<Self, Vec<String>> {
        super::typed(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_declared_length() {
        let conf: SizeLimitConfig = serde_yaml::from_str("{allowed_payload_size: 1, size_unit: kilobytes}").unwrap();
        assert_eq!(conf.allowed_bytes, 1024);
        let mut headers = HeaderMap::new();
        headers.insert("content-length", "1024".parse().unwrap());
        assert!(check_headers(&conf, &headers).is_ok());
        headers.insert("content-length", "1025".parse().unwrap());
        assert_eq!(check_headers(&conf, &headers), Err(TOO_LARGE));
        let strict: SizeLimitConfig = serde_yaml::from_str("{require_content_length: true}").unwrap();
        assert_eq!(
            check_headers(&strict, &HeaderMap::new()).unwrap_err().0,
            StatusCode::LENGTH_REQUIRED
        );
    }
}
