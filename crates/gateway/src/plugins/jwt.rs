//! The `jwt` plugin: only requests carrying a token signed by a known credential pass.
//!
//! As in Kong, the token's key claim (`iss` by default) names the credential; the credential's
//! algorithm must equal the token's `alg`; the signature is checked with `ring` (HMAC for
//! HS256/384/512, RSA PKCS#1 v1.5 for RS256/384/512, Ed25519 for EdDSA); then the registered
//! claims listed in `claims_to_verify` are checked. Rejections carry Kong's status and body so
//! clients written against Kong keep working.
//!
//! An EdDSA credential may name a `jwks_uri` instead of one key (bazaar's extension): the
//! token's `kid` picks the key from that JWKS, which is loaded on first use, again when a
//! token names a key not in it (a rotation; at most once a second, the token waiting for
//! that load) and when it is five minutes old (a retirement). This is how the gateway trusts the users service's tokens
//! while holding nothing that could sign one.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use http::request::Parts;
use http::{HeaderName, StatusCode};
use ring::{hmac, signature};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use bazaar_trust::token;

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
    pub claims_to_verify: Vec<TimeClaim>,
    #[serde(default = "default_header_names", deserialize_with = "header_names")]
    pub header_names: Vec<HeaderName>,
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
fn default_claims() -> Vec<TimeClaim> {
    vec![TimeClaim::Exp, TimeClaim::Nbf]
}
fn default_header_names() -> Vec<HeaderName> {
    vec![http::header::AUTHORIZATION]
}
/// Header names parsed once, not on every lookup.
fn header_names<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<HeaderName>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|name| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| serde::de::Error::custom(format!("{name:?} is not a header name")))
        })
        .collect()
}
fn default_uri_params() -> Vec<String> {
    vec!["jwt".into()]
}
fn yes() -> bool {
    true
}

/// A registered time claim `claims_to_verify` may name (Kong allows these two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TimeClaim {
    /// Expiry: refused at or after it.
    Exp,
    /// Not before: refused until it.
    Nbf,
}

impl TimeClaim {
    fn name(self) -> &'static str {
        match self {
            TimeClaim::Exp => "exp",
            TimeClaim::Nbf => "nbf",
        }
    }
}

/// A member's value, as far as verification cares; strings are borrowed from the decoded
/// segment unless they hold escapes.
#[derive(Clone)]
enum Member<'de> {
    Text(Cow<'de, str>),
    Number(f64),
    Other,
}

impl<'de> Deserialize<'de> for Member<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = Member<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Member<'de>, E> {
                Ok(Member::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Member<'de>, E> {
                Ok(Member::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Member<'de>, E> {
                Ok(Member::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Member<'de>, E> {
                Ok(Member::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Member<'de>, E> {
                Ok(Member::Number(v as f64))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Member<'de>, E> {
                Ok(Member::Other)
            }
            fn visit_unit<E>(self) -> Result<Member<'de>, E> {
                Ok(Member::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Member<'de>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Member::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Member<'de>, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Member::Other)
            }
        }
        deserializer.deserialize_any(Any)
    }
}

/// The members of a token's header or claims that verification reads. The whole segment is
/// parsed, so bad JSON is still refused, but nothing else is kept: building a map of every
/// member was 7 % of a proxied request's CPU.
#[derive(Default)]
struct Members<'de> {
    alg: Option<Member<'de>>,
    kid: Option<Member<'de>>,
    /// The member named by `key_claim_name`.
    key: Option<Member<'de>>,
    exp: Option<Member<'de>>,
    nbf: Option<Member<'de>>,
}

impl<'de> Members<'de> {
    /// Parses one decoded segment, which must be a JSON object; a repeated member counts
    /// once, the last one, as with any JSON object.
    fn parse(json: &'de [u8], key_claim: &str) -> Option<Members<'de>> {
        let mut deserializer = serde_json::Deserializer::from_slice(json);
        let members = Pick { key_claim }.deserialize(&mut deserializer).ok()?;
        deserializer.end().ok()?;
        Some(members)
    }
}

/// Reads a segment into [`Members`], keeping the member named `key_claim`.
struct Pick<'c> {
    key_claim: &'c str,
}

impl<'de> DeserializeSeed<'de> for Pick<'_> {
    type Value = Members<'de>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Members<'de>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Pick<'_> {
    type Value = Members<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
        let mut members = Members::default();
        while let Some(name) = map.next_key::<Member<'de>>()? {
            let Member::Text(name) = name else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let name: &str = &name;
            let is_key = name == self.key_claim;
            let slot = match name {
                "alg" => Some(&mut members.alg),
                "kid" => Some(&mut members.kid),
                "exp" => Some(&mut members.exp),
                "nbf" => Some(&mut members.nbf),
                _ => None,
            };
            match (slot, is_key) {
                (None, false) => {
                    map.next_value::<IgnoredAny>()?;
                }
                (None, true) => members.key = Some(map.next_value()?),
                (Some(slot), is_key) => {
                    let value: Member<'de> = map.next_value()?;
                    if is_key {
                        members.key = Some(value.clone());
                    }
                    *slot = Some(value);
                }
            }
        }
        Ok(members)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
    EdDsa,
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
            "EdDSA" => Algorithm::EdDsa,
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
    /// A raw Ed25519 public key, from `rsa_public_key` with EdDSA.
    ed_key: Option<Vec<u8>>,
    /// Ed25519 keys by `kid`, from `jwks_uri`.
    jwks: Option<Arc<JwksKeys>>,
}

/// Every JWT credential of a config, by key, and the tokens they have verified.
#[derive(Default)]
pub(crate) struct Credentials {
    by_key: HashMap<String, Arc<Credential>>,
    verified: Mutex<HashMap<Box<str>, Vouched>>,
}

/// Most tokens [`Credentials`] remembers as verified; when full it forgets them all, so a
/// flood of valid tokens costs at most this many entries.
const VERIFIED_KEPT: usize = 4096;
/// Longer tokens are verified every time rather than kept.
const VERIFIED_TOKEN_MAX: usize = 2048;

/// A token whose signature a credential's own key verified, with what the per-request
/// checks still need: a client that sends the same token again (every request of a
/// session) costs a lookup instead of base64, JSON and a signature check, as Envoy's
/// `jwt_authn` cache does. A token verified by a JWKS key counts only while that key is in
/// the set last loaded: a retired key's tokens go with it.
struct Vouched {
    /// The `key_claim_name` and `secret_is_base64` it was verified under.
    key_claim: Box<str>,
    secret_is_base64: bool,
    credential: Arc<Credential>,
    /// The JWKS key that verified it, when a JWKS did.
    kid: Option<Box<str>>,
    exp: Option<TimeValue>,
    nbf: Option<TimeValue>,
}

/// A time claim's value: seconds, or something that is not a number.
#[derive(Clone, Copy)]
enum TimeValue {
    Seconds(f64),
    NotNumber,
}

impl TimeValue {
    fn of(member: Option<&Member<'_>>) -> Option<TimeValue> {
        member.map(|m| match m {
            &Member::Number(seconds) => TimeValue::Seconds(seconds),
            _ => TimeValue::NotNumber,
        })
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("keys", &self.by_key.len()).finish()
    }
}

impl Credential {
    fn authenticated(&self) -> Authenticated {
        Authenticated {
            consumer: self.consumer,
            credential_key: self.key.clone(),
            jwks: self.jwks.clone(),
        }
    }
}

impl Credentials {
    /// The credential that verified `token` before under `conf`'s key claim and secret
    /// encoding, with the token's time claims.
    fn vouched_for(
        &self,
        conf: &JwtConfig,
        token: &str,
    ) -> Option<(Arc<Credential>, Option<TimeValue>, Option<TimeValue>)> {
        let verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        let found = verified.get(token)?;
        let key_kept = match (&found.credential.jwks, &found.kid) {
            (None, _) => true,
            (Some(jwks), Some(kid)) => jwks.knows(kid),
            (Some(_), None) => false,
        };
        (key_kept && *found.key_claim == *conf.key_claim_name && found.secret_is_base64 == conf.secret_is_base64)
            .then(|| (found.credential.clone(), found.exp, found.nbf))
    }

    /// Remembers that `credential` (its JWKS key `kid`, if from a JWKS) verified `token`'s
    /// signature under `conf`.
    fn vouch(
        &self,
        conf: &JwtConfig,
        token: &str,
        credential: &Arc<Credential>,
        kid: Option<&str>,
        exp: Option<TimeValue>,
        nbf: Option<TimeValue>,
    ) {
        if token.len() > VERIFIED_TOKEN_MAX {
            return;
        }
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= VERIFIED_KEPT {
            verified.clear();
        }
        verified.insert(
            token.into(),
            Vouched {
                key_claim: conf.key_claim_name.as_str().into(),
                secret_is_base64: conf.secret_is_base64,
                credential: credential.clone(),
                kid: kid.map(Into::into),
                exp,
                nbf,
            },
        );
    }

    /// Prepares verification keys for every `jwt_secrets` entry, each JWKS fetched directly.
    #[cfg(test)]
    pub fn build(config: &Config) -> Credentials {
        Credentials::build_with(config, |_| None)
    }

    /// Prepares verification keys, reaching each JWKS whose host is a service's host the way
    /// the gateway proxies to that service (`route_for`): over its upstream and TLS.
    pub fn build_with(config: &Config, route_for: impl Fn(&http::Uri) -> Option<JwksRoute>) -> Credentials {
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
            let (rsa_der, ed_key) = match (algorithm, secret.rsa_public_key.as_deref()) {
                (Algorithm::EdDsa, Some(pem)) => (None, crate::keys::ed25519_public_key(pem).ok()),
                (_, Some(pem)) => (crate::keys::rsa_public_key_der(pem).ok(), None),
                (_, None) => (None, None),
            };
            let jwks = secret.jwks_uri.clone().map(|uri| {
                let route = route_for(&uri);
                Arc::new(JwksKeys::new(uri, route))
            });
            let credential = Credential {
                consumer: secret.consumer,
                key: secret.key.clone(),
                algorithm,
                hmac_plain,
                hmac_base64,
                rsa_der,
                ed_key,
                jwks,
            };
            by_key.insert(secret.key.clone(), Arc::new(credential));
        }
        Credentials {
            by_key,
            verified: Mutex::default(),
        }
    }
}

/// Who a valid token belongs to.
#[derive(Debug, Clone)]
pub(crate) struct Authenticated {
    /// Index into the config's consumers.
    pub consumer: usize,
    /// The credential's key, sent upstream as `X-Credential-Identifier`.
    pub credential_key: String,
    /// The JWKS the key came from, if it came from one.
    jwks: Option<Arc<JwksKeys>>,
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

/// Why [`verify`] did not accept a token.
enum Failure {
    /// Refused for good.
    Rejected(Rejection),
    /// The token names a key the credential's JWKS does not hold (yet).
    NeedKeys(Arc<JwksKeys>),
}

impl From<Rejection> for Failure {
    fn from(rejection: Rejection) -> Failure {
        Failure::Rejected(rejection)
    }
}

/// Checks the request's token and names its consumer, loading a credential's JWKS when the
/// token needs it.
pub(crate) async fn authenticate(
    conf: &JwtConfig,
    request: &Parts,
    credentials: &Credentials,
) -> Result<Authenticated, Rejection> {
    let token = find_token(conf, request)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let asked = Instant::now();
    let mut reloaded = false;
    loop {
        match verify(conf, token, credentials, now) {
            Ok(found) => match &found.jwks {
                Some(jwks) if !reloaded && jwks.is_stale() => {
                    // One request a second tries; the others go on with the keys there are.
                    jwks.reload(|started| started.elapsed() < token::RELOAD_INTERVAL, Duration::ZERO)
                        .await;
                    reloaded = true;
                }
                _ => return Ok(found),
            },
            Err(Failure::Rejected(rejection)) => return Err(rejection),
            // Perhaps a rotation: wait for a load that starts after this token arrived.
            Err(Failure::NeedKeys(jwks)) if !reloaded => {
                jwks.reload(|started| started >= asked, token::RELOAD_INTERVAL).await;
                reloaded = true;
            }
            Err(Failure::NeedKeys(jwks)) if jwks.is_loaded() => {
                return Err(unauthorized("No credentials found for given 'kid'"))
            }
            Err(Failure::NeedKeys(jwks)) => {
                return Err(Rejection {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: serde_json::json!({
                        "message": format!("cannot load the keys that verify tokens from {}", jwks.uri)
                    }),
                })
            }
        }
    }
}

/// How a JWKS is reached when its host is one of the gateway's services' hosts.
#[derive(Clone)]
pub(crate) struct JwksRoute {
    /// The service's client (its connect timeout and TLS).
    pub client: crate::balancer::HttpClient,
    /// `http` or `https`.
    pub scheme: &'static str,
    /// The service's upstream, when its host names one.
    pub upstream: Option<Arc<crate::balancer::UpstreamBalancer>>,
    /// `host:port` otherwise.
    pub address: String,
}

/// Raw Ed25519 public keys by `kid`.
type KeysByKid = token::Ed25519Keys;

/// Ed25519 keys by `kid` from a JWKS document.
pub(crate) struct JwksKeys {
    uri: http::Uri,
    route: Option<JwksRoute>,
    /// The keys and when they were loaded (`None` before the first load).
    keys: RwLock<(KeysByKid, Option<Instant>)>,
    /// When the last load started; held during a load so concurrent callers share it.
    attempt: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwksKeys({})", self.uri)
    }
}

impl JwksKeys {
    fn new(uri: http::Uri, route: Option<JwksRoute>) -> JwksKeys {
        JwksKeys {
            uri,
            route,
            keys: RwLock::new((HashMap::new(), None)),
            attempt: tokio::sync::Mutex::new(None),
        }
    }

    fn is_loaded(&self) -> bool {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).1.is_some()
    }

    fn is_stale(&self) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .is_some_and(|at| at.elapsed() > token::KEYS_MAX_AGE)
    }

    /// Whether key `kid` is in the set last loaded.
    fn knows(&self, kid: &str) -> bool {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).0.contains_key(kid)
    }

    /// Whether `signature` over `message` is valid for key `kid`; `None` for an unknown kid.
    fn verify(&self, kid: &str, message: &[u8], sig: &[u8]) -> Option<bool> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        let key = keys.0.get(kid)?;
        Some(
            signature::UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(message, sig)
                .is_ok(),
        )
    }

    /// Loads the document unless the last load started is `recent_enough`, waiting until
    /// `gap` after the last load first: callers queue on one load, and loads happen at most
    /// once per `gap`. A failed load keeps the keys loaded before.
    async fn reload(&self, recent_enough: impl Fn(Instant) -> bool, gap: Duration) {
        let mut last = if gap.is_zero() {
            // Nothing to wait for: a load under way is someone else's.
            match self.attempt.try_lock() {
                Ok(last) => last,
                Err(_) => return,
            }
        } else {
            let Ok(last) = tokio::time::timeout(gap + token::LOAD_TIMEOUT, self.attempt.lock()).await else {
                return;
            };
            last
        };
        if last.is_some_and(&recent_enough) {
            return;
        }
        if let Some(at) = *last {
            tokio::time::sleep(gap.saturating_sub(at.elapsed())).await;
        }
        *last = Some(Instant::now());
        match tokio::time::timeout(token::LOAD_TIMEOUT, self.fetch()).await {
            Ok(Ok(keys)) => {
                tracing::debug!(uri = %self.uri, keys = keys.len(), "jwt: JWKS loaded");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = (keys, Some(Instant::now()));
            }
            Ok(Err(e)) => {
                tracing::warn!(uri = %self.uri, error = %e, "jwt: cannot load the JWKS; keeping the keys loaded before")
            }
            Err(_) => {
                tracing::warn!(uri = %self.uri, "jwt: the JWKS did not arrive in time; keeping the keys loaded before")
            }
        }
    }

    async fn fetch(&self) -> Result<KeysByKid, String> {
        use http_body_util::BodyExt;
        let request = |uri: http::Uri| {
            http::Request::get(uri)
                .header(http::header::USER_AGENT, "bazaar-gateway jwt")
                .header(http::header::HOST, self.uri.host().unwrap_or_default())
                .body(crate::outgoing::OutgoingBody::new(bytes::Bytes::new()))
                .map_err(|e| e.to_string())
        };
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let response = match &self.route {
            Some(route) => {
                let guard = route.upstream.as_ref().and_then(|u| u.pick("", &[]));
                let address = guard.as_ref().map_or(route.address.as_str(), |g| g.address());
                let uri = format!("{}://{address}{path}", route.scheme)
                    .parse::<http::Uri>()
                    .map_err(|e| e.to_string())?;
                route.client.request(request(uri)?).await.map_err(|e| e.to_string())?
            }
            None => {
                let client: hyper_util::client::legacy::Client<_, crate::outgoing::OutgoingBody> =
                    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                        .build(hyper_util::client::legacy::connect::HttpConnector::new());
                client
                    .request(request(self.uri.clone())?)
                    .await
                    .map_err(|e| e.to_string())?
            }
        };
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = http_body_util::Limited::new(response.into_body(), token::MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("cannot read the document: {e}"))?
            .to_bytes();
        token::ed25519_keys(&body).map_err(|e| e.to_string())
    }
}

/// Finds the token in query, cookies and headers; Kong refuses two different ones.
fn find_token<'r>(conf: &JwtConfig, request: &'r Parts) -> Result<&'r str, Rejection> {
    let mut found: Option<&'r str> = None;
    let mut several = false;
    let mut add = |token: &'r str| match found {
        _ if token.is_empty() => {}
        None => found = Some(token),
        Some(first) => several |= first != token,
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
        let Some(value) = request.headers.get(name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let value = value.trim_start();
        if let Some((scheme, token)) = value.split_once(char::is_whitespace) {
            if scheme.eq_ignore_ascii_case("bearer") {
                add(token.trim());
            }
        }
    }
    match (found, several) {
        (None, _) => Err(unauthorized("Unauthorized")),
        (Some(token), false) => Ok(token),
        (Some(_), true) => Err(unauthorized("Multiple tokens provided")),
    }
}

/// Verifies a compact JWS at time `now` (seconds since the epoch).
///
/// One piece: one token check; the header and claims segments are both the parsed members
/// and the exact signing input, the credential found by the key claim picks the signature
/// check, and the same exp/nbf are cached by `vouch` and checked.
fn verify(conf: &JwtConfig, token: &str, credentials: &Credentials, now: f64) -> Result<Authenticated, Failure> {
    if let Some((credential, exp, nbf)) = credentials.vouched_for(conf, token) {
        check_times(conf, exp, nbf, now)?;
        return Ok(credential.authenticated());
    }
    let mut parts = token.split('.');
    let (Some(header64), Some(claims64), Some(signature64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(unauthorized("Bad token; invalid JWT").into());
    };
    let decode = |segment: &str| {
        B64URL
            .decode(segment)
            .map_err(|_| unauthorized("Bad token; invalid JSON"))
    };
    let (header_json, claims_json) = (decode(header64)?, decode(claims64)?);
    let key_claim = &conf.key_claim_name;
    let invalid_json = || Failure::from(unauthorized("Bad token; invalid JSON"));
    let header = Members::parse(&header_json, key_claim).ok_or_else(invalid_json)?;
    let claims = Members::parse(&claims_json, key_claim).ok_or_else(invalid_json)?;
    let signature = B64URL
        .decode(signature64)
        .map_err(|_| unauthorized("Bad token; invalid signature encoding"))?;
    let Some(token_alg) = (match &header.alg {
        Some(Member::Text(alg)) => Algorithm::parse(alg),
        _ => None,
    }) else {
        return Err(unauthorized("Bad token; invalid alg").into());
    };

    let key = match claims.key.as_ref().or(header.key.as_ref()) {
        None => return Err(unauthorized(&format!("No mandatory '{key_claim}' in claims")).into()),
        Some(Member::Text(s)) if !s.is_empty() => &**s,
        Some(_) => return Err(unauthorized(&format!("Invalid '{key_claim}' in claims")).into()),
    };
    let Some(credential) = credentials.by_key.get(key) else {
        return Err(unauthorized(&format!("No credentials found for given '{key_claim}'")).into());
    };
    if credential.algorithm != token_alg {
        return Err(unauthorized("Invalid algorithm").into());
    }

    // The signature covers the two first segments exactly as sent.
    let signing_input = &token[..header64.len() + 1 + claims64.len()];
    let mut jwks_kid = None;
    let valid = if token_alg == Algorithm::EdDsa {
        match (&credential.ed_key, &credential.jwks) {
            (Some(key), _) => signature::UnparsedPublicKey::new(&signature::ED25519, key)
                .verify(signing_input.as_bytes(), &signature)
                .is_ok(),
            (None, Some(jwks)) => {
                let Some(Member::Text(kid)) = &header.kid else {
                    return Err(unauthorized("No mandatory 'kid' in header").into());
                };
                jwks_kid = Some(&**kid);
                match jwks.verify(kid, signing_input.as_bytes(), &signature) {
                    Some(valid) => valid,
                    None => return Err(Failure::NeedKeys(jwks.clone())),
                }
            }
            (None, None) => return Err(unauthorized("Invalid key/secret").into()),
        }
    } else if let Some(rsa) = token_alg.rsa() {
        let Some(der) = &credential.rsa_der else {
            return Err(unauthorized("Invalid key/secret").into());
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
            return Err(unauthorized("Invalid key/secret").into());
        };
        hmac::verify(key, signing_input.as_bytes(), &signature).is_ok()
    };
    if !valid {
        return Err(unauthorized("Invalid signature").into());
    }

    let (exp, nbf) = (TimeValue::of(claims.exp.as_ref()), TimeValue::of(claims.nbf.as_ref()));
    credentials.vouch(conf, token, credential, jwks_kid, exp, nbf);
    check_times(conf, exp, nbf, now)?;
    Ok(credential.authenticated())
}

/// The checks of `claims_to_verify` and `maximum_expiration` at time `now`.
fn check_times(conf: &JwtConfig, exp: Option<TimeValue>, nbf: Option<TimeValue>, now: f64) -> Result<(), Failure> {
    let mut errors = BTreeMap::new();
    for &claim in &conf.claims_to_verify {
        let value = match claim {
            TimeClaim::Exp => exp,
            TimeClaim::Nbf => nbf,
        };
        let Some(value) = value else { continue };
        let TimeValue::Seconds(seconds) = value else {
            errors.insert(claim.name(), "must be a number");
            continue;
        };
        match claim {
            TimeClaim::Exp if seconds <= now => {
                errors.insert(claim.name(), "token expired");
            }
            TimeClaim::Nbf if seconds > now => {
                errors.insert(claim.name(), "token not valid yet");
            }
            _ => {}
        }
    }
    if !errors.is_empty() {
        return Err(Rejection {
            status: StatusCode::UNAUTHORIZED,
            body: serde_json::json!(errors),
        }
        .into());
    }
    if conf.maximum_expiration > 0 {
        let exp = match exp {
            Some(TimeValue::Seconds(exp)) => Some(exp),
            _ => None,
        };
        if exp.is_none_or(|exp| exp - now > conf.maximum_expiration as f64) {
            return Err(Rejection {
                status: StatusCode::UNAUTHORIZED,
                body: serde_json::json!({ "exp": "exceeds maximum allowed expiration" }),
            }
            .into());
        }
    }
    Ok(())
}

impl super::Plugin for JwtConfig {
    const NAME: &'static str = "jwt";

    fn parse(config: serde_yaml::Value) -> Result<Self, Vec<String>> {
        super::typed(config)
    }
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

    fn check(conf: &JwtConfig, token: &str, creds: &Credentials, now: f64) -> Result<Authenticated, Rejection> {
        verify(conf, token, creds, now).map_err(|failure| match failure {
            Failure::Rejected(rejection) => rejection,
            Failure::NeedKeys(_) => unauthorized("needs keys"),
        })
    }

    #[test]
    fn accepts_a_valid_token_and_rejects_each_fault() {
        let creds = Credentials::build(&config());
        let hs256 = jsonwebtoken::Algorithm::HS256;
        let good = mint(
            hs256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "exp": NOW + 60.0}),
        );
        let ok = check(&conf(), &good, &creds, NOW).unwrap();
        assert_eq!((ok.consumer, ok.credential_key.as_str()), (0, "alice-key"));

        let msg = |m: &str| serde_json::json!({ "message": m });
        let bad_sig = mint(hs256, "wrong", serde_json::json!({"iss": "alice-key"}));
        assert_eq!(
            check(&conf(), &bad_sig, &creds, NOW).unwrap_err().body,
            msg("Invalid signature")
        );
        let unknown = mint(hs256, "x", serde_json::json!({"iss": "bob"}));
        assert_eq!(
            check(&conf(), &unknown, &creds, NOW).unwrap_err().body,
            msg("No credentials found for given 'iss'")
        );
        let no_iss = mint(hs256, "x", serde_json::json!({"sub": "bob"}));
        assert_eq!(
            check(&conf(), &no_iss, &creds, NOW).unwrap_err().body,
            msg("No mandatory 'iss' in claims")
        );
        let expired = mint(
            hs256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "exp": NOW - 1.0}),
        );
        assert_eq!(
            check(&conf(), &expired, &creds, NOW).unwrap_err().body,
            serde_json::json!({"exp": "token expired"})
        );
        let early = mint(
            hs256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "nbf": NOW + 100.0}),
        );
        assert_eq!(
            check(&conf(), &early, &creds, NOW).unwrap_err().body,
            serde_json::json!({"nbf": "token not valid yet"})
        );
        let wrong_alg = mint(
            jsonwebtoken::Algorithm::HS384,
            "alice-secret",
            serde_json::json!({"iss": "alice-key"}),
        );
        assert_eq!(
            check(&conf(), &wrong_alg, &creds, NOW).unwrap_err().body,
            msg("Invalid algorithm")
        );
        assert_eq!(
            check(&conf(), "garbage", &creds, NOW).unwrap_err().body,
            msg("Bad token; invalid JWT")
        );
        let hs512 = mint(
            jsonwebtoken::Algorithm::HS512,
            "other",
            serde_json::json!({"iss": "alice-512"}),
        );
        assert!(check(&conf(), &hs512, &creds, NOW).is_ok());
    }

    #[test]
    fn reads_the_members_it_needs_from_any_json_object_and_refuses_the_rest() {
        let text = |m: &Option<Member>| match m {
            Some(Member::Text(s)) => Some(s.to_string()),
            _ => None,
        };
        // Escapes, nesting, repeats (the last counts) and a key claim that is also `kid`.
        let json =
            br#"{"alg":"HS\u00325\u0036","x":{"exp":1,"y":[1,{"z":null}]},"kid":"k1","exp":5,"exp":7.5,"nbf":"soon"}"#;
        let m = Members::parse(json, "kid").unwrap();
        assert_eq!(text(&m.alg).as_deref(), Some("HS256"));
        assert_eq!((text(&m.kid), text(&m.key)), (Some("k1".into()), Some("k1".into())));
        assert!(matches!(m.exp, Some(Member::Number(n)) if n == 7.5));
        assert_eq!(text(&m.nbf).as_deref(), Some("soon"));
        for bad in [&b"[1]"[..], b"\"a\"", b"{\"alg\":", b"{} x", b"{\"a\":tru}"] {
            assert!(Members::parse(bad, "iss").is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_time_claim_that_is_not_a_number_is_refused() {
        let creds = Credentials::build(&config());
        let token = mint(
            jsonwebtoken::Algorithm::HS256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "exp": "tomorrow"}),
        );
        assert_eq!(
            check(&conf(), &token, &creds, NOW).unwrap_err().body,
            serde_json::json!({"exp": "must be a number"})
        );
    }

    #[test]
    fn config_problems_are_named() {
        let refused = serde_yaml::from_str::<JwtConfig>("{claims_to_verify: [exp, iat]}").unwrap_err();
        assert!(refused.to_string().contains("unknown variant `iat`"), "{refused}");
        let refused = serde_yaml::from_str::<JwtConfig>("{header_names: [x-token, 'bad name']}").unwrap_err();
        assert!(
            refused.to_string().contains("\"bad name\" is not a header name"),
            "{refused}"
        );
    }

    #[test]
    fn a_remembered_token_is_still_checked_for_expiry_and_only_under_the_same_settings() {
        let creds = Credentials::build(&config());
        let good = mint(
            jsonwebtoken::Algorithm::HS256,
            "alice-secret",
            serde_json::json!({"iss": "alice-key", "exp": NOW + 60.0}),
        );
        assert!(check(&conf(), &good, &creds, NOW).is_ok());
        assert!(check(&conf(), &good, &creds, NOW + 30.0).is_ok(), "remembered");
        assert_eq!(
            check(&conf(), &good, &creds, NOW + 61.0).unwrap_err().body,
            serde_json::json!({"exp": "token expired"})
        );
        // The same token under a base64 secret is verified afresh, and fails.
        let base64: JwtConfig = serde_yaml::from_str("{secret_is_base64: true}").unwrap();
        assert_eq!(
            check(&base64, &good, &creds, NOW).unwrap_err().body,
            serde_json::json!({"message": "Invalid signature"})
        );
        // A token with another signature is not the remembered one.
        let (unsigned, _) = good.rsplit_once('.').unwrap();
        let forged = format!("{unsigned}.AAAA");
        assert_eq!(
            check(&conf(), &forged, &creds, NOW).unwrap_err().body,
            serde_json::json!({"message": "Invalid signature"})
        );
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
            check(&conf, &far, &creds, NOW).unwrap_err().body,
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
