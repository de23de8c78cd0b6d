//! The users HTTP API: register, log in, who am I.

use argon2::{
    password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use axum::{
    extract::State,
    http::StatusCode,
    routing::{get, post},
    Router,
};
use bazaar_contracts::{topics, types, UserRegistered};
use bazaar_kit::{
    auth::AuthUser,
    envelope::{Envelope, Metadata},
    http::{Json, Problem, RequestContext},
    runtime::Runtime,
    store::now_millis,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::Row;
use uuid::Uuid;

/// The API routes.
pub fn router(rt: Runtime) -> Router {
    Router::new()
        .route("/users", post(register))
        .route("/users/me", get(me))
        .route("/auth/login", post(login))
        .with_state(rt)
}

/// The body of `POST /users`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registration {
    email: String,
    name: String,
    password: String,
}

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
}

async fn register(
    State(rt): State<Runtime>,
    ctx: RequestContext,
    Json(body): Json<Registration>,
) -> Result<(StatusCode, Json<User>), Problem> {
    let email = Email::parse(&body.email)?;
    let name = body.name.trim().to_string();
    if name.is_empty() || name.len() > 200 {
        return Err(Problem::bad_request("name must be 1 to 200 characters"));
    }
    if body.password.chars().count() < 8 || body.password.len() > 1024 {
        return Err(Problem::bad_request("password must be at least 8 characters"));
    }
    let password = body.password;
    let hash = tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
    })
    .await
    .map_err(Problem::internal)?
    .map_err(Problem::internal)?;
    let id = Uuid::now_v7();
    let mut tx = rt.store.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, created_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (email) DO NOTHING",
    )
    .bind(id.to_string())
    .bind(&email.0)
    .bind(&name)
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
            name: name.clone(),
        },
        Metadata {
            correlation_id: ctx.correlation_id,
            traceparent: ctx.traceparent,
            source: "users".into(),
            ..Metadata::default()
        },
    );
    rt.outbox.add(&mut tx, topics::USERS_EVENTS, &event).await?;
    rt.outbox.commit(tx).await?;
    metrics::counter!("bazaar_users_registered_total").increment(1);
    Ok((
        StatusCode::CREATED,
        Json(User {
            id: id.to_string(),
            email: email.0,
            name,
        }),
    ))
}

/// The body of `POST /auth/login`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

async fn login(State(rt): State<Runtime>, Json(body): Json<Login>) -> Result<Json<Value>, Problem> {
    let refused = || Problem::unauthorized("unknown email or wrong password");
    let email = Email::parse(&body.email).map_err(|_| refused())?;
    let row = sqlx::query("SELECT id, password_hash FROM users WHERE email = $1")
        .bind(&email.0)
        .fetch_optional(rt.store.pool())
        .await?
        .ok_or_else(refused)?;
    let id: String = row.try_get("id")?;
    let hash: String = row.try_get("password_hash")?;
    let password = body.password;
    let ok = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&hash)
            .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            .unwrap_or(false)
    })
    .await
    .map_err(Problem::internal)?;
    if !ok {
        return Err(refused());
    }
    let user: Uuid = id.parse().map_err(Problem::internal)?;
    let token = rt.keys.issue(user, &email.0).map_err(Problem::internal)?;
    Ok(Json(
        json!({ "token": token, "tokenType": "Bearer", "expiresIn": 24 * 3600, "userId": user }),
    ))
}

async fn me(State(rt): State<Runtime>, AuthUser(claims): AuthUser) -> Result<Json<User>, Problem> {
    let row = sqlx::query("SELECT id, email, name FROM users WHERE id = $1")
        .bind(claims.sub.to_string())
        .fetch_optional(rt.store.pool())
        .await?
        .ok_or_else(|| Problem::not_found("your account no longer exists"))?;
    Ok(Json(User {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
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
}
