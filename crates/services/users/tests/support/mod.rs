//! The users role started in-process for tests (the kit's [`TestRole`]: the real [`Runtime`]
//! on a temporary SQLite store and embedded broker, its app called without a socket), with
//! helpers to register and log in through the API and to read what the role stored and
//! announced (`users` and `outbox` tables).
//!
//! Every registration and every login with a known email runs argon2 (about 19 MiB and real
//! CPU each), so tests register only the users they log in as; validation is checked before
//! any hashing, so refused registrations cost nothing.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use bazaar_contracts::{topics, types, UserRegistered, VerificationRequested};
use bazaar_kit::store;
use bazaar_kit::{envelope::Envelope, runtime::Runtime};
use bazaar_testkit::TestRole;

pub use bazaar_testkit::Answer;
use serde_json::{json, Value};
use uuid::Uuid;

/// The password every registered test user has.
pub const PASSWORD: &str = "correct horse battery";

/// A running users role.
pub struct Users {
    pub rt: Runtime,
    role: TestRole,
}

/// Starts users on a fresh store and broker.
pub async fn start() -> Users {
    start_limited(bazaar_users::HashingLimit::default()).await
}

/// Starts users hashing passwords under `limit`.
pub async fn start_limited(limit: bazaar_users::HashingLimit) -> Users {
    let role = TestRole::start(&bazaar_users::SERVICE, |rt| {
        bazaar_users::routes_limited(rt.clone(), bazaar_users::keys::KeyRing::new(rt.store.clone()), limit)
    })
    .await;
    Users {
        rt: role.rt.clone(),
        role,
    }
}

/// A registration body.
pub fn registration(email: &str, name: &str, password: &str, phone: Option<&str>) -> Value {
    let mut body = json!({"email": email, "name": name, "password": password});
    if let Some(phone) = phone {
        body["phone"] = json!(phone);
    }
    body
}

impl Users {
    /// Sends `method uri` with `token` and a JSON `body` through the served router.
    pub async fn call(&self, method: Method, uri: &str, token: Option<&str>, body: Option<Value>) -> Answer {
        self.role.call(method, uri, token, body).await
    }

    /// Sends one request through the served router.
    pub async fn send(&self, request: Request<Body>) -> Answer {
        self.role.send(request).await
    }

    /// `POST /users` with `body`.
    pub async fn post_user(&self, body: Value) -> Answer {
        self.call(Method::POST, "/users", None, Some(body)).await
    }

    /// Registers `email` (named Ann, with [`PASSWORD`]) and confirms it; returns the user as
    /// `GET /users/me` shows it.
    pub async fn register(&self, email: &str) -> Value {
        self.register_with(registration(email, "Ann", PASSWORD, None)).await
    }

    /// Registers with `body`, asserting the 202, confirms the address with the code the role
    /// announced for it and the body's password; returns the user as `GET /users/me` shows it.
    pub async fn register_with(&self, body: Value) -> Value {
        self.post_user(body.clone()).await.expect(StatusCode::ACCEPTED);
        let email = body["email"].as_str().expect("an email").trim().to_lowercase();
        let password = body["password"].as_str().expect("a password");
        let code = self.code_for(&email).await.expect("a code was sent");
        let token = self.confirm(&email, password, &code).await.expect(StatusCode::OK)["accessToken"]
            .as_str()
            .expect("a token")
            .to_string();
        self.call(Method::GET, "/users/me", Some(&token), None)
            .await
            .expect(StatusCode::OK)
    }

    /// `POST /auth/verification` with `email`, `password` and `code`.
    pub async fn confirm(&self, email: &str, password: &str, code: &str) -> Answer {
        let body = json!({"email": email, "password": password, "code": code});
        self.call(Method::POST, "/auth/verification", None, Some(body)).await
    }

    /// The codes the role asked to mail to `email`, oldest first.
    pub async fn codes_sent(&self, email: &str) -> Vec<VerificationRequested> {
        self.announced()
            .await
            .into_iter()
            .filter(|(_, e)| e.event_type == types::USER_VERIFICATION_REQUESTED)
            .map(|(_, e)| e.payload_as::<VerificationRequested>().expect("a verification payload"))
            .filter(|v| v.email == email)
            .collect()
    }

    /// The newest code the role asked to mail to `email`.
    pub async fn code_for(&self, email: &str) -> Option<String> {
        self.codes_sent(email).await.pop().map(|v| v.code)
    }

    /// `POST /auth/token` with `email` and `password`.
    pub async fn login(&self, email: &str, password: &str) -> Answer {
        self.call(
            Method::POST,
            "/auth/token",
            None,
            Some(json!({"email": email, "password": password})),
        )
        .await
    }

    /// A token for user `id` signed with the role's keys (no argon2).
    pub async fn token_for(&self, id: Uuid, email: &str) -> String {
        self.keys()
            .signer()
            .await
            .expect("a signing key")
            .issue(id, email, &[], bazaar_users::keys::TOKEN_TTL)
            .expect("a token")
    }

    /// A token for a new operator, signed with the role's own key.
    pub async fn admin_token(&self) -> String {
        self.keys()
            .signer()
            .await
            .expect("a signing key")
            .issue(
                Uuid::now_v7(),
                "admin@example.com",
                &[bazaar_kit::auth::ADMIN.to_string()],
                bazaar_users::keys::TOKEN_TTL,
            )
            .expect("a token")
    }

    /// The role's signing keys, as its own router reads them.
    pub fn keys(&self) -> bazaar_users::keys::KeyRing {
        bazaar_users::keys::KeyRing::new(self.rt.store.clone())
    }

    /// A token signed by a key the role does not know (a TestRole's own test key).
    pub fn foreign_token(&self, id: Uuid, email: &str) -> String {
        self.role.token(id, email, &[])
    }

    /// How many users are stored.
    pub async fn user_count(&self) -> i64 {
        store::query("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM users")
            .fetch_one(&self.rt.store)
            .await
            .expect("count")
            .try_get("n")
            .expect("a count")
    }

    /// Every event users wrote to its outbox, with its topic, oldest first.
    pub async fn announced(&self) -> Vec<(String, Envelope)> {
        store::query("SELECT topic, body FROM outbox ORDER BY id")
            .fetch_all(&self.rt.store)
            .await
            .expect("outbox")
            .iter()
            .map(|row| {
                let body: String = row.try_get("body").expect("a body");
                (
                    row.try_get("topic").expect("a topic"),
                    Envelope::from_slice(body.as_bytes()).expect("an envelope"),
                )
            })
            .collect()
    }

    /// The `user.registered` payloads in the outbox, oldest first (asserting every event
    /// went to `users.events`).
    pub async fn registrations(&self) -> Vec<UserRegistered> {
        self.announced()
            .await
            .into_iter()
            .filter_map(|(topic, e)| {
                assert_eq!(topic, topics::USERS_EVENTS);
                (e.event_type == types::USER_REGISTERED).then(|| e.payload_as().expect("a user.registered payload"))
            })
            .collect()
    }

    /// Asserts a refused registration left no user and announced nothing.
    pub async fn nothing_registered(&self) {
        assert_eq!(self.user_count().await, 0, "no user stored");
        assert!(self.announced().await.is_empty(), "nothing announced");
    }
}
