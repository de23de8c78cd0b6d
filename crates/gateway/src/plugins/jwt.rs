//! The `jwt` plugin: only requests carrying a token signed by a known credential pass.
//!
//! As in Kong, the token's key claim (`iss` by default) names the credential; the credential's
//! algorithm must equal the token's `alg`; the signature is checked with `ring` (HMAC for
//! HS256/384/512, RSA PKCS#1 v1.5 for RS256/384/512); then the registered claims listed in
//! `claims_to_verify` are checked. Rejections carry Kong's status and body so clients written
//! against Kong keep working.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use http::request::Parts;
use http::StatusCode;
use ring::{hmac, signature};
use serde::Deserialize;

use crate::config::Config;

/// base64url that accepts tokens with or without padding.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The plugin's `config` block, with Kong's defaults except `claims_to_verify`, which
/// defaults to `["exp", "nbf"]` here so an expired token is never accepted by accident.
#[derive(Debug, Deserialize)]
pub(crate) struct JwtConfig {
    #[serde(default = "default_key_claim")]
    pub key_claim_name: String,
    #[serde(default = "default_claims")]
    pub claims_to_verify: Vec<String>,
    #[serde(default = "default_header_names")]
    pub header_names: Vec<String>,
    #[serde(default = "default_uri_params")]
    pub uri_param_names: Vec<String>,
    #[serde(default)]
    pub cookie_names: Vec<String>,
    /// Longest accepted lifetime in seconds (`exp` − now); 0 means unlimited.
    #[serde(default)]
    pub maximum_expiration: u64,
    #[serde(default = "yes")]
    pub run_on_preflight: bool,
    #[serde(default)]
    pub secret_is_base64: bool,
}

fn default_key_claim() -> String {
    "iss".into()
}
fn default_claims() -> Vec<String> {
    vec!["exp".into(), "nbf".into()]
}
fn default_header_names() -> Vec<String> {
    vec!["authorization".into()]
}
fn default_uri_params() -> Vec<String> {
    vec!["jwt".into()]
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
}

impl Algorithm {
    fn parse(name: &str) -> Option<Algorithm> {
        Some(match name {
            "HS256" => Algorithm::Hs256,
            "HS384" => Algorithm::Hs384,
            "HS512" => Algorithm::Hs512,
            "RS256" => Algorithm::Rs256,
            "RS384" => Algorithm::Rs384,
            "RS512" => Algorithm::Rs512,
            _ => return None,
        })
    }

    fn hmac(self) -> Option<hmac::Algorithm> {
        match self {
            Algorithm::Hs256 => Some(hmac::HMAC_SHA256),
            Algorithm::Hs384 => Some(hmac::HMAC_SHA384),
            Algorithm::Hs512 => Some(hmac::HMAC_SHA512),
            _ => None,
        }
    }

    fn rsa(self) -> Option<&'static signature::RsaParameters> {
        match self {
            Algorithm::Rs256 => Some(&signature::RSA_PKCS1_2048_8192_SHA256),
            Algorithm::Rs384 => Some(&signature::RSA_PKCS1_2048_8192_SHA384),
            Algorithm::Rs512 => Some(&signature::RSA_PKCS1_2048_8192_SHA512),
            _ => None,
        }
    }
}

/// A credential ready to verify with: keys are built once per config load, not per request.
struct Credential {
    consumer: usize,
    key: String,
    algorithm: Algorithm,
    /// HMAC key from the secret as written.
    hmac_plain: Option<hmac::Key>,
    /// HMAC key from the base64-decoded secret, for `secret_is_base64`.
    hmac_base64: Option<hmac::Key>,
    /// PKCS#1 `RSAPublicKey` DER.
    rsa_der: Option<Vec<u8>>,
}

/// Every JWT credential of a config, by key.
#[derive(Default)]
pub(crate) struct Credentials {
    by_key: HashMap<String, Arc<Credential>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("keys", &self.by_key.len()).finish()
    }
}

impl Credentials {
    /// Prepares verification keys for every `jwt_secrets` entry.
    pub fn build(config: &Config) -> Credentials {
        let mut by_key = HashMap::new();
        for secret in &config.jwt_secrets {
            // Config loading already rejected unknown algorithms and bad PEMs.
            let Some(algorithm) = Algorithm::parse(&secret.algorithm) else {
                continue;
            };
            let (hmac_plain, hmac_base64) = match algorithm.hmac() {
                Some(alg) => (
                    Some(hmac::Key::new(alg, secret.secret.as_bytes())),
                    STANDARD
                        .decode(secret.secret.trim())
                        .or_else(|_| B64URL.decode(secret.secret.trim()))
                        .ok()
                        .map(|raw| hmac::Key::new(alg, &raw)),
                ),
                None => (None, None),
            };
            let rsa_der = secret
                .rsa_public_key
                .as_deref()
                .and_then(|pem| rsa_public_key_der(pem).ok());
            let credential = Credential {
                consumer: secret.consumer,
                key: secret.key.clone(),
                algorithm,
                hmac_plain,
                hmac_base64,
                rsa_der,
            };
            by_key.insert(secret.key.clone(), Arc::new(credential));
        }
        Credentials { by_key }
    }
}

/// Who a valid token belongs to.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated {
    /// Index into the config's consumers.
    pub consumer: usize,
    /// The credential's key, sent upstream as `X-Credential-Identifier`.
    pub credential_key: String,
}

/// Why a request was refused: Kong's status and JSON body.
#[derive(Debug, PartialEq)]
pub(crate) struct Rejection {
    pub status: StatusCode,
    pub body: serde_json::Value,
}

fn unauthorized(message: &str) -> Rejection {
    Rejection {
        status: StatusCode::UNAUTHORIZED,
        body: serde_json::json!({ "message": message }),
    }
}

/// Checks the request's token and names its consumer.
pub(crate) fn authenticate(
    conf: &JwtConfig,
    request: &Parts,
    credentials: &Credentials,
) -> Result<Authenticated, Rejection> {
    let token = find_token(conf, request)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    verify(conf, &token, credentials, now)
}

/// Collects the token from query, cookies and headers; Kong refuses two different ones.
fn find_token(conf: &JwtConfig, request: &Parts) -> Result<String, Rejection> {
    let mut tokens: Vec<String> = Vec::new();
    let mut add = |token: &str| {
        if !token.is_empty() && !tokens.iter().any(|t| t == token) {
            tokens.push(token.to_string());
        }
    };
    if let Some(query) = request.uri.query() {
        for pair in query.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if conf.uri_param_names.iter().any(|n| n == name) {
                add(value);
            }
        }
    }
    if !conf.cookie_names.is_empty() {
        for header in request.headers.get_all(http::header::COOKIE) {
            let Ok(text) = header.to_str() else { continue };
            for cookie in text.split(';') {
                if let Some((name, value)) = cookie.trim().split_once('=') {
                    if conf.cookie_names.iter().any(|n| n == name) {
                        add(value);
                    }
                }
            }
        }
    }
    for name in &conf.header_names {
        let Some(value) = request.headers.get(name.as_str()).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let value = value.trim_start();
        if let Some((scheme, token)) = value.split_once(char::is_whitespace) {
            if scheme.eq_ignore_ascii_case("bearer") {
                add(token.trim());
            }
        }
    }
    match tokens.len() {
        0 => Err(unauthorized("Unauthorized")),
        1 => Ok(tokens.remove(0)),
        _ => Err(unauthorized("Multiple tokens provided")),
    }
}

/// Verifies a compact JWS at time `now` (seconds since the epoch).
fn verify(conf: &JwtConfig, token: &str, credentials: &Credentials, now: f64) -> Result<Authenticated, Rejection> {
    let mut parts = token.split('.');
    let (Some(header64), Some(claims64), Some(signature64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized("Bad token; invalid JWT"));
    };
    let decode_json = |segment: &str| -> Result<serde_json::Map<String, serde_json::Value>, Rejection> {
        let raw = B64URL
            .decode(segment)
            .map_err(|_| unauthorized("Bad token; invalid JSON"))?;
        serde_json::from_slice(&raw).map_err(|_| unauthorized("Bad token; invalid JSON"))
    };
    let header = decode_json(header64)?;
    let claims = decode_json(claims64)?;
    let signature = B64URL
        .decode(signature64)
        .map_err(|_| unauthorized("Bad token; invalid signature encoding"))?;
    let Some(token_alg) = header.get("alg").and_then(|a| a.as_str()).and_then(Algorithm::parse) else {
        return Err(unauthorized("Bad token; invalid alg"));
    };

    let key_claim = &conf.key_claim_name;
    let key = match claims.get(key_claim).or_else(|| header.get(key_claim)) {
        None => return Err(unauthorized(&format!("No mandatory '{key_claim}' in claims"))),
        Some(serde_json::Value::String(s)) if !s.is_empty() => s.as_str(),
        Some(_) => return Err(unauthorized(&format!("Invalid '{key_claim}' in claims"))),
    };
    let Some(credential) = credentials.by_key.get(key) else {
        return Err(unauthorized(&format!("No credentials found for given '{key_claim}'")));
    };
    if credential.algorithm != token_alg {
        return Err(unauthorized("Invalid algorithm"));
    }

    // The signature covers the two first segments exactly as sent.
    let signing_input = &token[..header64.len() + 1 + claims64.len()];
    let valid = if let Some(rsa) = token_alg.rsa() {
        let Some(der) = &credential.rsa_der else {
            return Err(unauthorized("Invalid key/secret"));
        };
        signature::UnparsedPublicKey::new(rsa, der)
            .verify(signing_input.as_bytes(), &signature)
            .is_ok()
    } else {
        let key = if conf.secret_is_base64 {
            &credential.hmac_base64
        } else {
            &credential.hmac_plain
        };
        let Some(key) = key else {
            return Err(unauthorized("Invalid key/secret"));
        };
        hmac::verify(key, signing_input.as_bytes(), &signature).is_ok()
    };
    if !valid {
        return Err(unauthorized("Invalid signature"));
    }

    let mut errors = BTreeMap::new();
    for name in &conf.claims_to_verify {
        let Some(value) = claims.get(name) else { continue };
        let Some(seconds) = value.as_f64() else {
            errors.insert(name.clone(), "must be a number");
            continue;
        };
        match name.as_str() {
            "exp" if seconds <= now => {
                errors.insert(name.clone(), "token expired");
            }
            "nbf" if seconds > now => {
                errors.insert(name.clone(), "token not valid yet");
            }
            _ => {}
        }
    }
    if !errors.is_empty() {
        return Err(Rejection {
            status: StatusCode::UNAUTHORIZED,
            body: serde_json::json!(errors),
        });
    }
    if conf.maximum_expiration > 0 {
        let exp = claims.get("exp").and_then(|e| e.as_f64());
        if exp.is_none_or(|exp| exp - now > conf.maximum_expiration as f64) {
            return Err(Rejection {
                status: StatusCode::UNAUTHORIZED,
                body: serde_json::json!({ "exp": "exceeds maximum allowed expiration" }),
            });
        }
    }
    Ok(Authenticated {
        consumer: credential.consumer,
        credential_key: credential.key.clone(),
    })
}

/// Turns an RSA public key PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`) into the PKCS#1 DER ring uses.
pub(crate) fn rsa_public_key_der(pem: &str) -> Result<Vec<u8>, String> {
    let body: String = pem
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(body).map_err(|e| format!("not a PEM: {e}"))?;
    if pem.contains("BEGIN RSA PUBLIC KEY") {
        return Ok(der);
    }
    // SubjectPublicKeyInfo ::= SEQUENCE { algorithm SEQUENCE, subjectPublicKey BIT STRING }.
    let (tag, spki, _) = der_element(&der).ok_or("malformed DER")?;
    if tag != 0x30 {
        return Err("expected a SubjectPublicKeyInfo sequence".into());
    }
    let (_, _, rest) = der_element(spki).ok_or("malformed DER")?;
    let (tag, bits, _) = der_element(rest).ok_or("malformed DER")?;
    match (tag, bits.split_first()) {
        (0x03, Some((0, key))) => Ok(key.to_vec()),
        _ => Err("expected an RSA public key".into()),
    }
}

/// Reads one DER element: (tag, contents, what follows).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn config() -> Config {
        Config::parse(
            r#"
_format_version: "3.0"
consumers:
  - username: alice
    jwt_secrets:
      - key: alice-key
        secret: alice-secret
      - key: alice-512
        algorithm: HS512
        secret: other
"#,
        )
        .unwrap()
    }

    fn conf() -> JwtConfig {
        serde_yaml::from_str("{}").unwrap()
    }

    fn mint(alg: jsonwebtoken::Algorithm, secret: &str, claims: serde_json::Value) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    const NOW: f64 = 1_700_000_000.0;

    #[test]
    fn accepts_a_valid_token_and_rejects_each_fault() {
        let creds = Credentials::build(&config());
        let hs256 = jsonwebtoken::Algorithm::HS256;
        let good = mint(
            hs256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "exp": NOW + 60.0}),
        );
        let ok = verify(&conf(), &good, &creds, NOW).unwrap();
        assert_eq!((ok.consumer, ok.credential_key.as_str()), (0, "alice-key"));

        let msg = |m: &str| serde_json::json!({ "message": m });
        let bad_sig = mint(hs256, "wrong", serde_json::json!({"iss": "alice-key"}));
        assert_eq!(
            verify(&conf(), &bad_sig, &creds, NOW).unwrap_err().body,
            msg("Invalid signature")
        );
        let unknown = mint(hs256, "x", serde_json::json!({"iss": "bob"}));
        assert_eq!(
            verify(&conf(), &unknown, &creds, NOW).unwrap_err().body,
            msg("No credentials found for given 'iss'")
        );
        let no_iss = mint(hs256, "x", serde_json::json!({"sub": "bob"}));
        assert_eq!(
            verify(&conf(), &no_iss, &creds, NOW).unwrap_err().body,
            msg("No mandatory 'iss' in claims")
        );
        let expired = mint(
            hs256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "exp": NOW - 1.0}),
        );
        assert_eq!(
            verify(&conf(), &expired, &creds, NOW).unwrap_err().body,
            serde_json::json!({"exp": "token expired"})
        );
        let early = mint(
            hs256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "nbf": NOW + 100.0}),
        );
        assert_eq!(
            verify(&conf(), &early, &creds, NOW).unwrap_err().body,
            serde_json::json!({"nbf": "token not valid yet"})
        );
        let wrong_alg = mint(
            jsonwebtoken::Algorithm::HS384,
            "alice-secret",
            serde_json::json!({"iss": "alice-key"}),
        );
        assert_eq!(
            verify(&conf(), &wrong_alg, &creds, NOW).unwrap_err().body,
            msg("Invalid algorithm")
        );
        assert_eq!(
            verify(&conf(), "garbage", &creds, NOW).unwrap_err().body,
            msg("Bad token; invalid JWT")
        );
        let hs512 = mint(
            jsonwebtoken::Algorithm::HS512,
            "other",
            serde_json::json!({"iss": "alice-512"}),
        );
        assert!(verify(&conf(), &hs512, &creds, NOW).is_ok());
    }

    #[test]
    fn maximum_expiration_requires_a_near_exp() {
        let creds = Credentials::build(&config());
        let conf: JwtConfig = serde_yaml::from_str("{maximum_expiration: 60}").unwrap();
        let far = mint(
            jsonwebtoken::Algorithm::HS256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "exp": NOW + 3600.0}),
        );
        assert_eq!(
            verify(&conf, &far, &creds, NOW).unwrap_err().body,
            serde_json::json!({"exp": "exceeds maximum allowed expiration"})
        );
    }

    #[test]
    fn finds_tokens_in_header_query_and_cookie() {
        let conf: JwtConfig = serde_yaml::from_str("{cookie_names: [session]}").unwrap();
        let parts = |req: http::request::Builder| req.body(()).unwrap().into_parts().0;
        let header = parts(http::Request::get("/").header("authorization", "Bearer abc"));
        assert_eq!(find_token(&conf, &header).unwrap(), "abc");
        let query = parts(http::Request::get("/x?a=1&jwt=def"));
        assert_eq!(find_token(&conf, &query).unwrap(), "def");
        let cookie = parts(http::Request::get("/").header("cookie", "a=b; session=ghi"));
        assert_eq!(find_token(&conf, &cookie).unwrap(), "ghi");
        let none = parts(http::Request::get("/").header("authorization", "Basic xyz"));
        assert_eq!(
            find_token(&conf, &none).unwrap_err().body,
            serde_json::json!({"message": "Unauthorized"})
        );
        let two = parts(http::Request::get("/?jwt=one").header("authorization", "Bearer two"));
        assert_eq!(
            find_token(&conf, &two).unwrap_err().body,
            serde_json::json!({"message": "Multiple tokens provided"})
        );
    }
}
