//! The users service's token signing keys: the only keys in bazaar that can mint a token.
//!
//! They live in users' own store (so every users instance signs with the same keys and no
//! file elsewhere holds one). The newest key signs; a key is rotated out after
//! [`ROTATE_AFTER`] (or at once by an operator) and stays published in the JWKS until every
//! token it signed has expired, so verifiers see old and new keys side by side during the
//! overlap.

use bazaar_kit::store;
use std::{
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use bazaar_kit::{
    auth::{AuthError, Jwks, KeySet, PublicJwk, SigningKey, Verifier},
    http::Problem,
    store::{now_millis, Store},
};

/// How long a token lives.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a key signs before the users role replaces it.
pub const ROTATE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long an instance signs with the key it last read before reading again (another
/// instance may have rotated); retired keys stay published this much longer than tokens live.
const ACTIVE_KEY_MAX_AGE: Duration = Duration::from_secs(60);

type ActiveKey = (Arc<SigningKey>, Instant);

/// The users role's signing keys, in its store.
#[derive(Clone)]
pub struct KeyRing {
    store: Store,
    /// The key that signs now and when it was read.
    active: Arc<RwLock<Option<ActiveKey>>>,
}

impl KeyRing {
    /// The key ring in `store` (the `signing_keys` table).
    pub fn new(store: Store) -> KeyRing {
        KeyRing {
            store,
            active: Arc::default(),
        }
    }

    /// The key that signs now, creating the first one when there is none.
    pub async fn signer(&self) -> Result<Arc<SigningKey>, Problem> {
        if let Some((key, at)) = self.active.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            if at.elapsed() < ACTIVE_KEY_MAX_AGE {
                return Ok(key.clone());
            }
        }
        let key = match self.newest().await? {
            Some(key) => key,
            None => self.add().await?,
        };
        let key = Arc::new(key);
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = Some((key.clone(), Instant::now()));
        Ok(key)
    }

    /// Starts signing with a new key now; the old ones stay published until their tokens
    /// expire. Returns the new key's id.
    pub async fn rotate(&self) -> Result<String, Problem> {
        let key = Arc::new(self.add().await?);
        let kid = key.kid().to_string();
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = Some((key, Instant::now()));
        self.prune().await?;
        tracing::info!(kid, "token signing key rotated");
        Ok(kid)
    }

    /// Rotates when the signing key is older than [`ROTATE_AFTER`], and drops keys whose
    /// tokens have all expired. Runs hourly.
    pub async fn maintain(&self) -> Result<(), Problem> {
        let newest: Option<i64> = store::query("SELECT MAX(created_at) FROM signing_keys")
            .fetch_scalar(&self.store)
            .await?;
        if newest.is_none_or(|at| now_millis() - at > ROTATE_AFTER.as_millis() as i64) {
            self.rotate().await?;
        } else {
            self.prune().await?;
        }
        Ok(())
    }

    /// The public keys, as users publishes them.
    pub async fn jwks(&self) -> Result<Jwks, Problem> {
        let rows = store::query("SELECT public_jwk FROM signing_keys ORDER BY created_at DESC")
            .fetch_all(&self.store)
            .await?;
        let keys = rows
            .iter()
            .map(|row| {
                let jwk: String = row.try_get("public_jwk")?;
                serde_json::from_str::<PublicJwk>(&jwk).map_err(Problem::internal)
            })
            .collect::<Result<Vec<_>, Problem>>()?;
        Ok(Jwks { keys })
    }

    /// A verifier reading this ring's public keys from the store (users checks its own
    /// tokens without calling itself).
    pub fn verifier(&self) -> Verifier {
        let ring = self.clone();
        Verifier::new(
            "users' signing keys",
            Arc::new(move || {
                let ring = ring.clone();
                Box::pin(async move {
                    let jwks = ring.jwks().await.map_err(|p| AuthError::KeysUnavailable(p.detail))?;
                    KeySet::from_jwks(&jwks)
                })
            }),
        )
    }

    async fn newest(&self) -> Result<Option<SigningKey>, Problem> {
        let row = store::query("SELECT private_key FROM signing_keys ORDER BY created_at DESC, kid LIMIT 1")
            .fetch_optional(&self.store)
            .await?;
        row.map(|row| {
            let der = STANDARD
                .decode(row.try_get::<String, _>("private_key")?)
                .map_err(Problem::internal)?;
            SigningKey::from_pkcs8(&der).map_err(Problem::internal)
        })
        .transpose()
    }

    async fn add(&self) -> Result<SigningKey, Problem> {
        let key = SigningKey::generate().map_err(Problem::internal)?;
        let public = serde_json::to_string(key.public()).map_err(Problem::internal)?;
        store::query("INSERT INTO signing_keys (kid, private_key, public_jwk, created_at) VALUES ($1, $2, $3, $4)")
            .bind(key.kid())
            .bind(STANDARD.encode(key.pkcs8()))
            .bind(public)
            .bind(now_millis())
            .execute(&self.store)
            .await?;
        Ok(key)
    }

    /// Drops every key older than the newest one that stopped signing more than a token's
    /// lifetime ago: all their tokens have expired.
    async fn prune(&self) -> Result<(), Problem> {
        let horizon = now_millis() - (TOKEN_TTL + ACTIVE_KEY_MAX_AGE).as_millis() as i64;
        let dropped = store::query(
            "DELETE FROM signing_keys WHERE created_at < (SELECT MAX(created_at) FROM signing_keys WHERE created_at < $1)",
        )
        .bind(horizon)
        .execute(&self.store)
        .await?
        .rows_affected();
        if dropped > 0 {
            tracing::info!(dropped, "retired token signing keys whose tokens have all expired");
        }
        Ok(())
    }
}
