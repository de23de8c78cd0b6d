//! Bearer tokens: only the users service can sign them; the gateway and every other role
//! verify them with users' public keys.
//!
//! Tokens are EdDSA (Ed25519) JWTs whose header names the signing key (`kid`, the key's
//! RFC 7638 thumbprint); users publishes its public keys as a JWKS at [`JWKS_PATH`]. A
//! [`Verifier`] holds a [`KeySet`] and reloads it when a token names a key it has not seen
//! (a rotation) and every few minutes (a retirement), so no role but users holds anything
//! that can mint a token. `iss` is [`ISSUER`], the gateway's jwt credential key.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::{extract::FromRequestParts, http::request::Parts};
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use futures_util::future::BoxFuture;
use jsonwebtoken::{decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::http::Problem;

pub use bazaar_trust::token::{ISSUER, JWKS_PATH, KEYS_MAX_AGE, RELOAD_INTERVAL};
use bazaar_trust::token::{LOAD_TIMEOUT, MAX_JWKS_BYTES};

/// How long keys that can no longer be reloaded are still trusted: a token's lifetime, after
/// which any of them may have been retired.
pub const KEYS_TRUST_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Seconds past `exp` a token is still accepted, for clocks a little apart.
const LEEWAY_SECS: u64 = 60;

/// Most verified tokens a [`Verifier`] remembers; when full it forgets them all and starts
/// over, so the memory stays bounded whatever comes in.
const VERIFIED_MAX: usize = 4096;

/// What a token says about its holder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: Uuid,
    /// The user's email.
    pub email: String,
    /// Issuer, always [`ISSUER`].
    pub iss: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expires at (seconds since the epoch).
    pub exp: u64,
    /// What the holder may do beyond their own data: `admin` for operators.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// The role that may manage the catalogue, deposits and everyone's notifications.
pub const ADMIN: &str = "admin";

impl Claims {
    /// True when the holder has the admin role.
    pub fn is_admin(&self) -> bool {
        self.roles.iter().any(|r| r == ADMIN)
    }
}

/// Why a token was refused or keys could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("missing bearer token (send Authorization: Bearer <token> from POST /auth/token)")]
    Missing,
    /// Malformed, wrong algorithm, bad signature, wrong issuer or expired.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token names a key the issuer does not publish.
    #[error("invalid token: it names signing key {0:?}, which the users service does not publish")]
    UnknownKey(String),
    /// The key set could not be loaded (the users service is unreachable, say).
    #[error("cannot load the token signing keys: {0}")]
    KeysUnavailable(String),
    /// A key could not be made or read.
    #[error("bad signing key: {0}")]
    BadKey(String),
}

/// An Ed25519 key that signs tokens; only the users service has one.
pub struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    encoding: EncodingKey,
    public: PublicJwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.kid)
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<SigningKey, AuthError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .map_err(|e| AuthError::BadKey(e.to_string()))?;
        SigningKey::from_pkcs8(pkcs8.as_ref())
    }

    /// The key stored as PKCS#8 DER (from [`SigningKey::pkcs8`]).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<SigningKey, AuthError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|e| AuthError::BadKey(e.to_string()))?;
        let public = PublicJwk::ed25519(pair.public_key().as_ref());
        Ok(SigningKey {
            kid: public.kid.clone(),
            pkcs8: pkcs8.to_vec(),
            encoding: EncodingKey::from_ed_der(pkcs8),
            public,
        })
    }

    /// The key's id: its public key's RFC 7638 thumbprint.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 DER, for the users store only.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public half, as a JWKS publishes it.
    pub fn public(&self) -> &PublicJwk {
        &self.public
    }

    /// The public key as a `PUBLIC KEY` PEM (SubjectPublicKeyInfo), as a Kong jwt credential
    /// with `algorithm: EdDSA` takes it in `rsa_public_key`.
    pub fn public_key_pem(&self) -> String {
        // The fixed DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), then the key.
        let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        der.extend(URL_SAFE_NO_PAD.decode(&self.public.x).unwrap_or_default());
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n")
    }

    /// A token for `user` with `roles`, valid for `ttl`.
    pub fn issue(&self, user: Uuid, email: &str, roles: &[String], ttl: Duration) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: user,
            email: email.to_string(),
            iss: ISSUER.to_string(),
            iat: now,
            exp: now + ttl.as_secs(),
            roles: roles.to_vec(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        encode(&header, &claims, &self.encoding).map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// A public key as a JWKS (RFC 7517, RFC 8037) lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PublicJwk {
    /// Key type: `OKP`.
    pub kty: String,
    /// Curve: `Ed25519`.
    pub crv: String,
    /// The public key, base64url.
    pub x: String,
    /// The key id tokens name.
    pub kid: String,
    /// `EdDSA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// `sig`.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

impl PublicJwk {
    /// The JWK of the raw Ed25519 public key `public`, with its thumbprint as `kid`.
    fn ed25519(public: &[u8]) -> PublicJwk {
        let x = URL_SAFE_NO_PAD.encode(public);
        // RFC 7638: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()));
        PublicJwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x,
            kid,
            alg: Some("EdDSA".into()),
            use_: Some("sig".into()),
        }
    }
}

/// A JWKS document: `{"keys": [...]}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Jwks {
    /// The published keys.
    pub keys: Vec<PublicJwk>,
}

/// Public keys by id: what a role verifies tokens with.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.keys.keys()).finish()
    }
}

impl KeySet {
    /// The Ed25519 keys of `jwks`; keys of other types are skipped (a JWKS may carry them
    /// for other consumers), and a malformed Ed25519 key is an error.
    pub fn from_jwks(jwks: &Jwks) -> Result<KeySet, AuthError> {
        let mut keys = HashMap::new();
        for jwk in jwks.keys.iter().filter(|k| k.kty == "OKP" && k.crv == "Ed25519") {
            let raw =
                bazaar_trust::token::ed25519_key(&jwk.kid, &jwk.x).map_err(|e| AuthError::BadKey(e.to_string()))?;
            keys.insert(jwk.kid.clone(), DecodingKey::from_ed_der(&raw));
        }
        Ok(KeySet { keys })
    }

    /// The Ed25519 keys of JWKS document `body`, read as every verifier reads it
    /// ([`bazaar_trust::token::ed25519_keys`]).
    fn from_document(body: &[u8]) -> Result<KeySet, bazaar_trust::token::JwksError> {
        let keys = bazaar_trust::token::ed25519_keys(body)?
            .into_iter()
            .map(|(kid, raw)| (kid, DecodingKey::from_ed_der(&raw)))
            .collect();
        Ok(KeySet { keys })
    }

    /// How many keys it holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when it holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The claims of a valid token: EdDSA only (so neither an HMAC secret nor `alg: none`
    /// is ever a key), signed by a key of this set, from [`ISSUER`], not expired.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_named(token).map(|(claims, _)| claims)
    }

    /// [`KeySet::verify`], also naming the key that signed the token.
    fn verify_named(&self, token: &str) -> Result<(Claims, String), AuthError> {
        let header = decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted, only EdDSA",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("the token names no signing key (kid)".into()))?;
        let Some(key) = self.keys.get(&kid) else {
            return Err(AuthError::UnknownKey(kid));
        };
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = LEEWAY_SECS;
        decode::<Claims>(token, key, &validation)
            .map(|d| (d.claims, kid))
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// Verified tokens, each with its claims and the `kid` of the key that signed it.
type Verified = HashMap<Box<str>, (Claims, String)>;

/// Loads a key set: from users' JWKS over HTTP, from users' own store, or fixed in tests.
pub type KeyLoader = Arc<dyn Fn() -> BoxFuture<'static, Result<KeySet, AuthError>> + Send + Sync>;

/// Verifies tokens with a key set it loads on first use and reloads when a token names an
/// unknown key (at most once per [`RELOAD_INTERVAL`]; the token waits for that load) or the
/// set is older than [`KEYS_MAX_AGE`]. A failed load keeps the keys it had.
#[derive(Clone)]
pub struct Verifier {
    loaded: Arc<RwLock<Option<(KeySet, Instant)>>>,
    /// Tokens whose signature checked out, with their claims and signing key: a client
    /// sends the same token with every request, and checking an Ed25519 signature costs
    /// more than the rest of a small request. A remembered token still has to be unexpired
    /// and signed by a key of the current set.
    verified: Arc<Mutex<Verified>>,
    /// When the last load started; held while loading, so concurrent callers share it.
    attempt: Arc<tokio::sync::Mutex<Option<Instant>>>,
    loader: KeyLoader,
    source: Arc<str>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier({})", self.source)
    }
}

impl Verifier {
    /// A verifier whose keys come from `loader`; `source` names it in logs.
    pub fn new(source: impl Into<Arc<str>>, loader: KeyLoader) -> Verifier {
        Verifier {
            loaded: Arc::default(),
            verified: Arc::default(),
            attempt: Arc::default(),
            loader,
            source: source.into(),
        }
    }

    /// A verifier that trusts exactly `keys` (tests, tools).
    pub fn fixed(keys: KeySet) -> Verifier {
        Verifier::new(
            "fixed keys",
            Arc::new(move || Box::pin(std::future::ready(Ok(keys.clone())))),
        )
    }

    /// A verifier that loads users' JWKS from `url` (2 s timeout, 64 KiB at most).
    pub fn jwks(url: &str) -> Verifier {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .pool_idle_timeout(crate::http::CLIENT_POOL_IDLE)
            .build()
            .unwrap_or_default();
        Verifier::jwks_with(url, client)
    }

    /// A verifier that loads the JWKS from `url` with `client` (a mesh client, say, whose
    /// certificate follows renewals by itself).
    pub fn jwks_with(url: &str, client: reqwest::Client) -> Verifier {
        let target = url.to_string();
        Verifier::new(
            url,
            Arc::new(move || {
                let (client, url) = (client.clone(), target.clone());
                Box::pin(async move { fetch_jwks(&client, &url).await })
            }),
        )
    }

    /// The claims of a valid token.
    pub async fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let asked = Instant::now();
        let keys = self.current(asked).await?;
        if let Some(claims) = self.remembered(token, &keys) {
            return Ok(claims);
        }
        let (claims, kid) = self.verify_with(token, &keys, asked).await?;
        let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(token.into(), (claims.clone(), kid));
        Ok(claims)
    }

    /// The claims of `token` when it was verified before, is not expired, and the key that
    /// signed it is still in `keys` (a retired key's tokens go with it).
    fn remembered(&self, token: &str, keys: &KeySet) -> Option<Claims> {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        let (claims, kid) = verified.get(token)?;
        let now = jsonwebtoken::get_current_timestamp();
        (claims.exp.saturating_add(LEEWAY_SECS) > now && keys.keys.contains_key(kid)).then(|| claims.clone())
    }

    /// Checks `token`'s signature with `keys`, or with keys reloaded for it when it names
    /// one they do not have.
    async fn verify_with(&self, token: &str, keys: &KeySet, asked: Instant) -> Result<(Claims, String), AuthError> {
        match keys.verify_named(token) {
            // Perhaps a rotation: wait for a load that starts after this token arrived.
            // A load that began before the token arrived will do when it turned out to know the
            // key (the first requests after a start race with the first load).
            Err(AuthError::UnknownKey(kid)) => match self
                .reload(
                    |started| {
                        started >= asked
                            || self
                                .loaded_keys()
                                .is_some_and(|keys| !matches!(keys.verify(token), Err(AuthError::UnknownKey(_))))
                    },
                    RELOAD_INTERVAL,
                )
                .await
            {
                Some(fresh) => fresh.verify_named(token),
                None => Err(AuthError::UnknownKey(kid)),
            },
            other => other,
        }
    }

    /// The loaded keys, loading them first when there are none or they are old.
    async fn current(&self, asked: Instant) -> Result<KeySet, AuthError> {
        let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner()).clone();
        match loaded {
            Some((keys, at)) if at.elapsed() < KEYS_MAX_AGE => Ok(keys),
            // Old keys: one caller a second tries to reload them (the others go on with what
            // there is), and after a token's lifetime without a reload they are not trusted.
            Some((keys, at)) => {
                let keys = self
                    .reload(|started| started.elapsed() < RELOAD_INTERVAL, Duration::ZERO)
                    .await
                    .unwrap_or(keys);
                let age = self
                    .loaded
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .map_or(at.elapsed(), |(_, at)| at.elapsed());
                if age > KEYS_TRUST_LIMIT {
                    return Err(AuthError::KeysUnavailable(format!(
                        "the keys from {} could not be reloaded for {} h",
                        self.source,
                        age.as_secs() / 3600
                    )));
                }
                Ok(keys)
            }
            // Nothing loaded: whichever load succeeds first serves every caller waiting on it.
            None => self
                .reload(
                    |started| started >= asked || self.loaded_keys().is_some(),
                    RELOAD_INTERVAL,
                )
                .await
                .ok_or_else(|| AuthError::KeysUnavailable(format!("no keys loaded yet from {}", self.source))),
        }
    }

    /// The keys loaded last, if any load succeeded.
    fn loaded_keys(&self) -> Option<KeySet> {
        self.loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(k, _)| k.clone())
    }

    /// Loads the keys unless the last load started is `recent_enough` (then its keys are
    /// the answer), waiting until `gap` after the last load first: callers queue on one
    /// load, and loads happen at most once per `gap`. `None` when nothing could be loaded.
    async fn reload(&self, recent_enough: impl Fn(Instant) -> bool, gap: Duration) -> Option<KeySet> {
        let loaded_keys = || self.loaded_keys();
        // With no gap to keep, a caller does not queue behind a load under way; otherwise it
        // waits for at most one gap and one load before it gives up.
        let mut last = if gap.is_zero() {
            match self.attempt.try_lock() {
                Ok(last) => last,
                Err(_) => return loaded_keys(),
            }
        } else {
            tokio::time::timeout(gap + LOAD_TIMEOUT, self.attempt.lock())
                .await
                .ok()?
        };
        if last.is_some_and(&recent_enough) {
            return loaded_keys();
        }
        if let Some(at) = *last {
            tokio::time::sleep(gap.saturating_sub(at.elapsed())).await;
        }
        *last = Some(Instant::now());
        match tokio::time::timeout(LOAD_TIMEOUT, (self.loader)()).await {
            Ok(Ok(keys)) => {
                tracing::debug!(source = %self.source, keys = keys.len(), "token keys loaded");
                *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = Some((keys.clone(), Instant::now()));
                Some(keys)
            }
            Ok(Err(e)) => {
                tracing::warn!(source = %self.source, error = %e, "cannot load token keys; keeping the ones loaded before");
                loaded_keys()
            }
            Err(_) => {
                tracing::warn!(source = %self.source, "token keys did not load in time; keeping the ones loaded before");
                loaded_keys()
            }
        }
    }
}

/// Reads a JWKS document from `url`.
async fn fetch_jwks(client: &reqwest::Client, url: &str) -> Result<KeySet, AuthError> {
    let unavailable = |e: &dyn std::fmt::Display| AuthError::KeysUnavailable(format!("{url}: {e}"));
    let mut response = client.get(url).send().await.map_err(|e| unavailable(&e))?;
    if !response.status().is_success() {
        return Err(unavailable(&format!("answered {}", response.status())));
    }
    // Read in chunks, stopping past the limit: a peer must not make us hold more.
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| unavailable(&e))? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_JWKS_BYTES {
            break;
        }
    }
    KeySet::from_document(&body).map_err(|e| unavailable(&e))
}

/// The authenticated caller; handlers taking it answer 401 without a valid token (503 when
/// the keys cannot be loaded). Needs the router to carry `Extension(Verifier)`.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Claims);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let verifier = parts
            .extensions
            .get::<Verifier>()
            .cloned()
            .ok_or_else(|| Problem::internal("Verifier extension missing from router"))?;
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| Problem::unauthorized(AuthError::Missing.to_string()))?;
        match verifier.verify(token.trim()).await {
            Ok(claims) => Ok(AuthUser(claims)),
            Err(e @ AuthError::KeysUnavailable(_)) => Err(Problem::unavailable(e.to_string())),
            Err(e) => Err(Problem::unauthorized(e.to_string())),
        }
    }
}

/// An authenticated caller with the admin role; others get 403.
#[derive(Debug, Clone)]
pub struct AdminUser(pub Claims);

impl<S: Send + Sync> FromRequestParts<S> for AdminUser {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let AuthUser(claims) = AuthUser::from_request_parts(parts, state).await?;
        if claims.is_admin() {
            Ok(AdminUser(claims))
        } else {
            Err(Problem::forbidden("this needs the admin role"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn set(keys: &[&SigningKey]) -> KeySet {
        KeySet::from_jwks(&Jwks {
            keys: keys.iter().map(|k| k.public().clone()).collect(),
        })
        .unwrap()
    }

    #[test]
    fn issued_tokens_verify_with_the_public_key_and_name_it() {
        let key = SigningKey::generate().unwrap();
        let id = Uuid::now_v7();
        let token = key.issue(id, "a@example.com", &[ADMIN.to_string()], HOUR).unwrap();
        let claims = set(&[&key]).verify(&token).unwrap();
        assert_eq!((claims.sub, claims.iss.as_str(), claims.is_admin()), (id, ISSUER, true));
        assert_eq!(decode_header(&token).unwrap().kid.as_deref(), Some(key.kid()));
        // The stored form gives back the same key.
        assert_eq!(SigningKey::from_pkcs8(key.pkcs8()).unwrap().kid(), key.kid());
    }

    #[test]
    fn hmac_none_and_unknown_keys_are_refused() {
        let key = SigningKey::generate().unwrap();
        let keys = set(&[&key]);
        let claims = serde_json::json!({"sub": Uuid::now_v7(), "email": "e@x.io", "iss": ISSUER, "iat": 0, "exp": u64::MAX / 2, "roles": [ADMIN]});
        // HS256 signed with the public key's bytes as the secret: the classic confusion attack.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(key.kid().to_string());
        let hs = encode(&header, &claims, &EncodingKey::from_secret(key.public().x.as_bytes())).unwrap();
        assert!(matches!(keys.verify(&hs), Err(AuthError::Invalid(_))), "HS256 accepted");
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","kid":"{}"}}"#, key.kid())),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        assert!(
            matches!(keys.verify(&none), Err(AuthError::Invalid(_))),
            "alg none accepted"
        );
        let stranger = SigningKey::generate().unwrap();
        let foreign = stranger.issue(Uuid::now_v7(), "e@x.io", &[], HOUR).unwrap();
        assert!(matches!(keys.verify(&foreign), Err(AuthError::UnknownKey(_))));
        // A token naming a known kid but signed by another key fails the signature.
        let mut forged_header = Header::new(Algorithm::EdDSA);
        forged_header.kid = Some(key.kid().to_string());
        let forged = encode(&forged_header, &claims, &EncodingKey::from_ed_der(stranger.pkcs8())).unwrap();
        assert!(matches!(keys.verify(&forged), Err(AuthError::Invalid(_))));
        // Expired long ago (jsonwebtoken allows a minute of clock skew).
        let mut old = claims.clone();
        old["exp"] = serde_json::json!(1);
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid().to_string());
        let stale = encode(&header, &old, &EncodingKey::from_ed_der(key.pkcs8())).unwrap();
        assert!(matches!(keys.verify(&stale), Err(AuthError::Invalid(_))));
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_expired_or_once_its_key_is_retired() {
        let first = SigningKey::generate().unwrap();
        let second = SigningKey::generate().unwrap();
        let published = Arc::new(RwLock::new(vec![first.public().clone()]));
        let source = published.clone();
        let verifier = Verifier::new(
            "test",
            Arc::new(move || {
                let keys = source.read().unwrap().clone();
                Box::pin(async move { KeySet::from_jwks(&Jwks { keys }) })
            }),
        );
        let token = first.issue(Uuid::now_v7(), "a@example.com", &[], HOUR).unwrap();
        verifier.verify(&token).await.expect("a valid token");
        verifier.verify(&token).await.expect("the same token again");
        assert_eq!(
            verifier.verified.lock().unwrap().len(),
            1,
            "checked once, then remembered"
        );
        // A token remembered from long ago, now past its expiry.
        let old = Claims {
            sub: Uuid::now_v7(),
            email: "old@example.com".into(),
            iss: ISSUER.into(),
            iat: 0,
            exp: 1,
            roles: Vec::new(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(first.kid().to_string());
        let stale = encode(&header, &old, &EncodingKey::from_ed_der(first.pkcs8())).unwrap();
        verifier
            .verified
            .lock()
            .unwrap()
            .insert(stale.as_str().into(), (old, first.kid().to_string()));
        assert!(
            matches!(verifier.verify(&stale).await, Err(AuthError::Invalid(_))),
            "an expired token passed because it was remembered"
        );
        // Users rotates to a new key and retires the old one.
        *published.write().unwrap() = vec![second.public().clone()];
        let newer = second.issue(Uuid::now_v7(), "b@example.com", &[], HOUR).unwrap();
        verifier.verify(&newer).await.expect("the new key loads");
        assert!(
            matches!(verifier.verify(&token).await, Err(AuthError::UnknownKey(_))),
            "a retired key's token passed because it was remembered"
        );
    }

    #[tokio::test]
    async fn a_verifier_reloads_for_a_new_key_but_not_for_every_unknown_one() {
        let first = SigningKey::generate().unwrap();
        let second = SigningKey::generate().unwrap();
        let published = Arc::new(RwLock::new(vec![first.public().clone()]));
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (source, counter) = (published.clone(), loads.clone());
        let verifier = Verifier::new(
            "test",
            Arc::new(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let keys = source.read().unwrap().clone();
                Box::pin(async move { KeySet::from_jwks(&Jwks { keys }) })
            }),
        );
        let id = Uuid::now_v7();
        verifier
            .verify(&first.issue(id, "a@x.io", &[], HOUR).unwrap())
            .await
            .unwrap();
        // A rotation: the new key is published, and its first token makes the verifier reload.
        published.write().unwrap().push(second.public().clone());
        verifier
            .verify(&second.issue(id, "a@x.io", &[], HOUR).unwrap())
            .await
            .unwrap();
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Made-up keys, twenty at once, share one load and are refused.
        let stranger = SigningKey::generate().unwrap();
        let token = stranger.issue(id, "a@x.io", &[], HOUR).unwrap();
        let verdicts = futures_util::future::join_all((0..20).map(|_| verifier.verify(&token))).await;
        assert!(verdicts.iter().all(|v| matches!(v, Err(AuthError::UnknownKey(_)))));
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 3);
        // A key published just after a load still verifies: its token waits for the next one.
        let third = SigningKey::generate().unwrap();
        published.write().unwrap().push(third.public().clone());
        verifier
            .verify(&third.issue(id, "a@x.io", &[], HOUR).unwrap())
            .await
            .unwrap();
        assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn requests_arriving_during_the_first_load_share_it_instead_of_waiting_a_second() {
        let key = SigningKey::generate().unwrap();
        let published = vec![key.public().clone()];
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = loads.clone();
        let verifier = Verifier::new(
            "test",
            Arc::new(move || {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let keys = published.clone();
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    KeySet::from_jwks(&Jwks { keys })
                })
            }),
        );
        let token = key.issue(Uuid::now_v7(), "a@x.io", &[], HOUR).unwrap();
        let started = Instant::now();
        let first = verifier.verify(&token);
        let later = async {
            // These ask while the first load is under way.
            tokio::time::sleep(Duration::from_millis(30)).await;
            futures_util::future::join_all((0..8).map(|_| verifier.verify(&token))).await
        };
        let (first, later) = tokio::join!(first, later);
        first.unwrap();
        assert!(later.iter().all(Result::is_ok));
        assert_eq!(
            loads.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one load served all"
        );
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "they waited {:?}, not for the next load a second later",
            started.elapsed()
        );
    }
}
