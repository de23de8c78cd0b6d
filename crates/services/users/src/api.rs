//! The users HTTP API: register, log in, who am I, and the token keys.

use std::{sync::Arc, time::Duration};

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::{get, post},
    Extension, Router,
};
use bazaar_contracts::{topics, types, UserRegistered};
use bazaar_kit::{
    auth::{AdminUser, AuthUser, ADMIN, JWKS_PATH},
    envelope::{Envelope, Metadata},
    http::{Json, Problem, RequestContext},
    runtime::Runtime,
    store::now_millis,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

use crate::keys::{KeyRing, TOKEN_TTL};

/// What every handler shares: the runtime, the signing keys and the hashing limit.
#[derive(Clone)]
struct Users {
    rt: Runtime,
    keys: KeyRing,
    hashing: Hashing,
}

/// The API routes, on a key ring of the role's own store.
pub fn router(rt: Runtime) -> Router {
    let keys = KeyRing::new(rt.store.clone());
    routes(rt, keys)
}

/// The API routes signing with `keys`. Tokens are verified against the ring itself, not the
/// runtime's verifier (which would fetch this role's own JWKS over HTTP).
pub fn routes(rt: Runtime, keys: KeyRing) -> Router {
    routes_limited(rt, keys, HashingLimit::default())
}

/// [`routes`] hashing passwords under `limit`.
pub fn routes_limited(rt: Runtime, keys: KeyRing, limit: HashingLimit) -> Router {
    let verifier = keys.verifier();
    Router::new()
        .route("/users", post(register))
        .route("/users/me", get(me))
        .route("/auth/token", post(token))
        .route("/auth/keys", post(rotate_keys))
        .route(JWKS_PATH, get(jwks))
        .layer(Extension(verifier))
        .with_state(Users {
            rt,
            keys,
            hashing: Hashing::new(limit),
        })
}

/// The body of `POST /users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    email: String,
    name: String,
    password: String,
    #[serde(default)]
    phone: Option<String>,
}

/// A mobile number in E.164 form: `+` and 8 to 15 digits (spaces and dashes dropped).
fn parse_phone(raw: &str) -> Result<String, Problem> {
    let phone: String = raw.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let digits = phone.strip_prefix('+').unwrap_or("");
    if (8..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) {
        Ok(phone)
    } else {
        Err(Problem::bad_request(format!(
            "`{raw}` is not a phone number in international form, such as +14155550123"
        )))
    }
}

/// How much password hashing (argon2id: 19 MiB and tens of milliseconds of CPU each) the
/// role does at once, and how long a request waits for a turn before it is turned away with
/// 503 and `Retry-After`: a flood of logins queues briefly and is then shed, instead of
/// growing threads and memory until the role falls over.
#[derive(Debug, Clone, Copy)]
pub struct HashingLimit {
    /// Hashes computed at once.
    pub concurrent: usize,
    /// Longest wait for a turn.
    pub wait: Duration,
}

impl Default for HashingLimit {
    /// One hash per core (at most four), two seconds' wait.
    fn default() -> HashingLimit {
        HashingLimit {
            concurrent: std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4),
            wait: Duration::from_secs(2),
        }
    }
}

/// Runs password work under a [`HashingLimit`].
#[derive(Clone)]
struct Hashing {
    permits: Arc<tokio::sync::Semaphore>,
    wait: Duration,
}

impl Hashing {
    fn new(limit: HashingLimit) -> Hashing {
        Hashing {
            permits: Arc::new(tokio::sync::Semaphore::new(limit.concurrent.max(1))),
            wait: limit.wait,
        }
    }

    /// Runs `work` on the blocking pool once a turn is free, or sheds the request.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, Problem> {
        let permit = match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(permit) => permit.map_err(Problem::internal)?,
            Err(_) => {
                metrics::counter!("bazaar_users_hashing_shed_total").increment(1);
                tracing::warn!("password hashing saturated; shedding a sign-in or registration");
                return Err(Problem::unavailable(
                    "too many sign-ins and registrations at once; nothing was changed, retry in a moment",
                ));
            }
        };
        tokio::task::spawn_blocking(move || {
            let _turn = permit;
            work()
        })
        .await
        .map_err(Problem::internal)
    }

    /// Hashes a password with argon2id.
    async fn hash(&self, password: String) -> Result<String, Problem> {
        self.run(move || {
            let salt = SaltString::generate(&mut OsRng);
            Argon2::default()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await?
        .map_err(Problem::internal)
    }

    /// Whether `password` matches `hash`; with no hash (an unknown email) it checks against
    /// a stand-in, so the answer takes as long either way.
    async fn verify(&self, hash: Option<String>, password: String) -> Result<bool, Problem> {
        self.run(move || {
            let stand_in = STAND_IN.get_or_init(|| {
                let salt = SaltString::generate(&mut OsRng);
                Argon2::default()
                    .hash_password(Uuid::new_v4().to_string().as_bytes(), &salt)
                    .map(|h| h.to_string())
                    .unwrap_or_default()
            });
            let known = hash.is_some();
            let hash = hash.as_deref().unwrap_or(stand_in);
            let matches = PasswordHash::new(hash)
                .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
                .unwrap_or(false);
            known && matches
        })
        .await
    }
}

/// The hash an unknown email's password is checked against (of a random password nobody has).
static STAND_IN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// An email address, trimmed and lower-cased, with one `@` between non-empty parts.
#[derive(Debug, Clone, PartialEq)]
struct Email(String);

impl Email {
    fn parse(raw: &str) -> Result<Email, Problem> {
        let email = raw.trim().to_lowercase();
        let valid = email.len() <= 254
            && email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
            })
            && !email.chars().any(char::is_whitespace)
            && email.matches('@').count() == 1;
        if valid {
            Ok(Email(email))
        } else {
            Err(Problem::bad_request(format!(
                "`{}` is not an email address",
                raw.trim()
            )))
        }
    }
}

/// A user as clients see it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct User {
    id: String,
    email: String,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    phone: Option<String>,
    roles: Vec<String>,
}

async fn register(
    State(Users { rt, hashing, .. }): State<Users>,
    ctx: RequestContext,
    Json(body): Json<Registration>,
) -> Result<(StatusCode, Json<User>), Problem> {
    let email = Email::parse(&body.email)?;
    let phone = body.phone.as_deref().map(parse_phone).transpose()?;
    if body.password.chars().count() < 8 {
        return Err(Problem::bad_request("password must be at least 8 characters"));
    }
    if body.password.len() > 1024 {
        return Err(Problem::bad_request("password must be at most 1024 bytes"));
    }
    let user = create(&rt, &hashing, &ctx, email, body.name.trim(), phone, &[], body.password).await?;
    Ok((StatusCode::CREATED, Json(user)))
}

/// Stores a user and announces `user.registered` in one transaction.
#[allow(clippy::too_many_arguments)]
async fn create(
    rt: &Runtime,
    hashing: &Hashing,
    ctx: &RequestContext,
    email: Email,
    name: &str,
    phone: Option<String>,
    roles: &[&str],
    password: String,
) -> Result<User, Problem> {
    if name.is_empty() || name.len() > 200 {
        return Err(Problem::bad_request("name must be 1 to 200 characters"));
    }
    let hash = hashing.hash(password).await?;
    let id = Uuid::now_v7();
    let mut tx = rt.store.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, name, phone, roles, password_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (email) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(&email.0)
    .bind(name)
    .bind(phone.clone())
    .bind(roles.join(","))
    .bind(&hash)
    .bind(now_millis())
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        return Err(Problem::conflict(format!("{} is already registered", email.0)));
    }
    let event = Envelope::new(
        types::USER_REGISTERED,
        id.to_string(),
        UserRegistered {
            user_id: id,
            email: email.0.clone(),
            name: name.to_string(),
            phone: phone.clone(),
        },
        Metadata {
            correlation_id: ctx.correlation_id.clone(),
            traceparent: ctx.traceparent.clone(),
            source: crate::SERVICE.name.into(),
            ..Metadata::default()
        },
    );
    rt.outbox.add(&mut tx, topics::USERS_EVENTS, &event).await?;
    rt.outbox.commit(tx).await?;
    metrics::counter!("bazaar_users_registered_total").increment(1);
    Ok(User {
        id: id.to_string(),
        email: email.0,
        name: name.to_string(),
        phone,
        roles: roles.iter().map(|r| r.to_string()).collect(),
    })
}

/// Creates the operator account `email` with the admin role unless it exists.
pub(crate) async fn ensure_admin(rt: &Runtime, email: &str, password: &str) -> Result<(), Problem> {
    let email = Email::parse(email)?;
    let exists = sqlx::query("SELECT 1 AS one FROM users WHERE email = $1")
        .bind(&email.0)
        .fetch_optional(rt.store.pool())
        .await?;
    if exists.is_some() {
        return Ok(());
    }
    if password.chars().count() < 8 {
        return Err(Problem::bad_request("the admin password must be at least 8 characters"));
    }
    let ctx = RequestContext {
        correlation_id: Uuid::now_v7().to_string(),
        traceparent: None,
    };
    let hashing = Hashing::new(HashingLimit::default());
    match create(
        rt,
        &hashing,
        &ctx,
        email,
        "Administrator",
        None,
        &[ADMIN],
        password.to_string(),
    )
    .await
    {
        // Another instance created it at the same moment.
        Err(p) if p.status == 409 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// The body of `POST /auth/token`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

/// Logs in: checks the password and issues an access token.
async fn token(
    State(Users { rt, keys, hashing }): State<Users>,
    Json(body): Json<Login>,
) -> Result<Json<Value>, Problem> {
    let refused = || Problem::unauthorized("unknown email or wrong password");
    if body.password.len() > 1024 {
        return Err(refused());
    }
    // An unknown or malformed email is checked against a stand-in hash, so the answer and
    // its timing say nothing about which emails are registered.
    let row = match Email::parse(&body.email) {
        Ok(email) => {
            sqlx::query("SELECT id, email, roles, password_hash FROM users WHERE email = $1")
                .bind(&email.0)
                .fetch_optional(rt.store.pool())
                .await?
        }
        Err(_) => None,
    };
    let hash = row
        .as_ref()
        .map(|r| r.try_get::<String, _>("password_hash"))
        .transpose()?;
    if !hashing.verify(hash, body.password).await? {
        return Err(refused());
    }
    let row = row.ok_or_else(refused)?;
    let id: String = row.try_get("id")?;
    let email: String = row.try_get("email")?;
    let roles = split_roles(&row.try_get::<String, _>("roles")?);
    let user: Uuid = id.parse().map_err(Problem::internal)?;
    let token = keys
        .signer()
        .await?
        .issue(user, &email, &roles, TOKEN_TTL)
        .map_err(Problem::internal)?;
    Ok(Json(json!({
        "accessToken": token,
        "tokenType": "Bearer",
        "expiresIn": TOKEN_TTL.as_secs(),
        "userId": user,
    })))
}

/// The public keys tokens are verified with (RFC 7517). Verifiers reload it when a token
/// names a key they have not seen, so a minute of caching is safe.
async fn jwks(State(Users { keys, .. }): State<Users>) -> Result<impl IntoResponse, Problem> {
    let jwks = keys.jwks().await?;
    Ok(([(header::CACHE_CONTROL, "public, max-age=60")], Json(jwks)))
}

/// Starts signing with a new key now (an operator suspects the old one leaked, or tests a
/// rotation); tokens already issued keep working until they expire.
async fn rotate_keys(
    State(Users { keys, .. }): State<Users>,
    AdminUser(_): AdminUser,
) -> Result<(StatusCode, Json<Value>), Problem> {
    let kid = keys.rotate().await?;
    let published = keys.jwks().await?.keys.len();
    Ok((StatusCode::CREATED, Json(json!({ "kid": kid, "published": published }))))
}

fn split_roles(stored: &str) -> Vec<String> {
    stored
        .split(',')
        .filter(|r| !r.is_empty())
        .map(str::to_string)
        .collect()
}

async fn me(State(Users { rt, .. }): State<Users>, AuthUser(claims): AuthUser) -> Result<Json<User>, Problem> {
    let row = sqlx::query("SELECT id, email, name, phone, roles FROM users WHERE id = $1")
        .bind(claims.sub.to_string())
        .fetch_optional(rt.store.pool())
        .await?
        .ok_or_else(|| Problem::not_found("your account no longer exists"))?;
    Ok(Json(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        phone: row.try_get("phone")?,
        roles: split_roles(&row.try_get::<String, _>("roles")?),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised_and_junk_refused() {
        assert_eq!(Email::parse(" Ann@Example.COM ").unwrap().0, "ann@example.com");
        for bad in ["", "ann", "ann@", "@x.io", "a@b", "a b@c.io", "a@@c.io", "a@.io"] {
            assert!(Email::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn phones_must_be_international() {
        assert_eq!(parse_phone("+1 415-555-0123").unwrap(), "+14155550123");
        for bad in ["4155550123", "+12", "+1415555012345678", "+1415abc0123"] {
            assert!(parse_phone(bad).is_err(), "{bad} accepted");
        }
    }
}
