//! The tokens the users role issues, as every verifier must read them: Ed25519 keys
//! published as a JWKS (RFC 7517, RFC 8037) at [`JWKS_PATH`], loaded at most once per
//! [`RELOAD_INTERVAL`], trusted for [`KEYS_MAX_AGE`]. The services verify with these rules
//! through `bazaar_kit::auth`, the gateway through its `jwt` plugin.

use std::collections::HashMap;
use std::time::Duration;

use base64::alphabet::URL_SAFE;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

/// Base64url with or without padding: RFC 7515 says without, and some publishers pad.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The `iss` of every token the users service issues (the gateway's jwt credential key).
pub const ISSUER: &str = "bazaar-users";

/// Where users publishes its public keys, on its own port and through the gateway.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// How long a verifier trusts the key set it loaded before it reloads (retired keys go).
pub const KEYS_MAX_AGE: Duration = Duration::from_secs(300);

/// The shortest time between two loads of the keys, so a flood of tokens naming made-up
/// keys costs the users role one request a second, not one each (such a token waits for
/// the next load before it is refused, as a token signed by a just-rotated key must).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// The longest a load of the keys may take.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The largest JWKS document a verifier reads.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Raw 32-byte Ed25519 public keys by `kid`.
pub type Ed25519Keys = HashMap<String, [u8; 32]>;

/// Why a JWKS document, or a key in it, cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// The document is not JSON with a `keys` array.
    #[error("not a JWKS document: {0}")]
    Document(String),
    /// An Ed25519 key that cannot be read.
    #[error("key {kid:?}: {reason}")]
    Key {
        /// The key's id, as given.
        kid: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The raw public key of the Ed25519 JWK `kid` whose `x` is given (base64url).
pub fn ed25519_key(kid: &str, x: &str) -> Result<[u8; 32], JwksError> {
    let bad = |reason: String| JwksError::Key {
        kid: kid.to_string(),
        reason,
    };
    let raw = BASE64URL
        .decode(x)
        .map_err(|e| bad(format!("x is not base64url: {e}")))?;
    raw.try_into().map_err(|_| bad("not a 32-byte Ed25519 key".into()))
}

/// The Ed25519 keys of JWKS document `body` by `kid`. Keys of other types are skipped (a
/// JWKS may carry them for other consumers); an Ed25519 key that cannot be read is an error,
/// so a broken document never passes for one with fewer keys.
pub fn ed25519_keys(body: &[u8]) -> Result<Ed25519Keys, JwksError> {
    if body.len() > MAX_JWKS_BYTES {
        return Err(JwksError::Document(format!(
            "larger than {} KiB",
            MAX_JWKS_BYTES / 1024
        )));
    }
    let document: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| JwksError::Document(format!("not JSON: {e}")))?;
    let keys = document["keys"]
        .as_array()
        .ok_or_else(|| JwksError::Document("no \"keys\" array".into()))?;
    let mut found = HashMap::new();
    for key in keys.iter().filter(|k| k["kty"] == "OKP" && k["crv"] == "Ed25519") {
        let kid = key["kid"]
            .as_str()
            .ok_or_else(|| JwksError::Document("an Ed25519 key without kid".into()))?;
        let x = key["x"].as_str().ok_or_else(|| JwksError::Key {
            kid: kid.to_string(),
            reason: "no x".into(),
        })?;
        found.insert(kid.to_string(), ed25519_key(kid, x)?);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    #[test]
    fn ed25519_keys_are_read_and_other_kinds_skipped() {
        let body = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"a","x":"{KEY}"}},{{"kty":"RSA","n":"x","e":"AQAB"}}]}}"#
        );
        let keys = ed25519_keys(body.as_bytes()).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(keys["a"][0], 0xd7);
    }

    #[test]
    fn a_broken_ed25519_key_spoils_the_document() {
        for key in [
            r#"{"kty":"OKP","crv":"Ed25519","kid":"a"}"#,
            r#"{"kty":"OKP","crv":"Ed25519","kid":"a","x":"AAAA"}"#,
            r#"{"kty":"OKP","crv":"Ed25519","kid":"a","x":"!!"}"#,
        ] {
            let body = format!(r#"{{"keys":[{key}]}}"#);
            assert!(
                matches!(ed25519_keys(body.as_bytes()), Err(JwksError::Key { .. })),
                "{key}"
            );
        }
    }

    #[test]
    fn a_padded_key_reads_as_the_unpadded_one() {
        assert_eq!(ed25519_key("a", &format!("{KEY}=")), ed25519_key("a", KEY));
        assert!(ed25519_key("a", KEY).is_ok());
    }

    #[test]
    fn what_is_not_a_jwks_says_so() {
        let keyless = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA"}]}"#;
        for body in ["", "[]", r#"{"keys":{}}"#, keyless] {
            assert!(
                matches!(ed25519_keys(body.as_bytes()), Err(JwksError::Document(_))),
                "{body}"
            );
        }
        let huge = vec![b' '; MAX_JWKS_BYTES + 1];
        assert!(matches!(ed25519_keys(&huge), Err(JwksError::Document(_))));
    }
}
