//! Bearer tokens: the users service issues them, the gateway and every service verify them.
//!
//! HS256 with one shared secret (`BAZAAR_JWT_SECRET`); `iss` is [`ISSUER`] so the gateway's
//! Kong-style jwt plugin finds the credential by it.

use std::time::Duration;

use axum::{extract::FromRequestParts, http::request::Parts};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::http::Problem;

/// The `iss` of every token the users service issues (the gateway's jwt credential key).
pub const ISSUER: &str = "bazaar-users";

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

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("missing bearer token (send Authorization: Bearer <token> from POST /auth/login)")]
    Missing,
    /// Signature, issuer or expiry check failed.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Signing and verification keys made from the shared secret.
#[derive(Clone)]
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(..)")
    }
}

impl JwtKeys {
    /// Keys for `secret`; tokens live for `ttl`.
    pub fn new(secret: &str, ttl: Duration) -> JwtKeys {
        JwtKeys {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            ttl,
        }
    }

    /// How long issued tokens live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A signed token for `user` with `roles`.
    pub fn issue(&self, user: Uuid, email: &str, roles: &[String]) -> Result<String, AuthError> {
        let now = chrono::Utc::now().timestamp().max(0) as u64;
        let claims = Claims {
            sub: user,
            email: email.to_string(),
            iss: ISSUER.to_string(),
            iat: now,
            exp: now + self.ttl.as_secs(),
            roles: roles.to_vec(),
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding).map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        decode::<Claims>(token, &self.decoding, &validation)
            .map(|d| d.claims)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }
}

/// The authenticated caller; handlers taking it answer 401 without a valid token. Needs the
/// router to carry `Extension(JwtKeys)`.
#[derive(Debug, Clone)]
pub struct AuthUser(pub Claims);

impl<S: Send + Sync> FromRequestParts<S> for AuthUser {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let keys = parts
            .extensions
            .get::<JwtKeys>()
            .ok_or_else(|| Problem::internal("JwtKeys extension missing from router"))?;
        let token = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .ok_or_else(|| Problem::unauthorized(AuthError::Missing.to_string()))?;
        keys.verify(token.trim())
            .map(AuthUser)
            .map_err(|e| Problem::unauthorized(e.to_string()))
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

    #[test]
    fn issued_tokens_verify_and_foreign_ones_do_not() {
        let keys = JwtKeys::new("s3cret", Duration::from_secs(60));
        let id = Uuid::now_v7();
        let token = keys.issue(id, "a@example.com", &[ADMIN.to_string()]).unwrap();
        let claims = keys.verify(&token).unwrap();
        assert_eq!(claims.sub, id);
        assert!(claims.is_admin());
        assert_eq!(claims.iss, ISSUER);
        let other = JwtKeys::new("other", Duration::from_secs(60));
        assert!(other.verify(&token).is_err());
        assert!(keys.verify("not.a.token").is_err());
    }
}
