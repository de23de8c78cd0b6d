//! The users service: registration, credentials, and the tokens every other role trusts.
//!
//! `POST /users` stores the account unconfirmed and has a code mailed to the address
//! ([`verification`]); `POST /auth/verification` with that code and the password opens it and
//! announces `user.registered` (payments opens a wallet, notifications sends a welcome) in
//! one transaction. `POST /auth/token` checks the argon2 hash under a per-account
//! [`throttle`] and issues a JWT signed with users' own key (see [`keys`]), whose public half
//! it publishes at `/.well-known/jwks.json` for every other role to verify with.

mod api;
pub mod keys;
pub mod throttle;
pub mod verification;

use std::time::Duration;

use bazaar_contracts::{roles, topics};
use bazaar_kit::telemetry::MetricDoc;
use bazaar_kit::{
    runtime::{RoleConfig, Runtime, ServiceError},
    service::{Access, Mount, PublicRoute, ServiceSpec},
    shutdown::Shutdown,
    store::Migration,
};

pub use api::{router, routes, routes_limited, HashingLimit};

/// The users tables.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 10,
        name: "users",
        sql: "CREATE TABLE users (
            id TEXT PRIMARY KEY,
            email TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            phone TEXT,
            roles TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );",
    },
    Migration {
        version: 11,
        name: "signing_keys",
        sql: "CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            private_key TEXT NOT NULL,
            public_jwk TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );",
    },
    Migration {
        version: 12,
        name: "email_verification",
        // Accounts from before verification existed stay open.
        sql: "ALTER TABLE users ADD COLUMN verified_at BIGINT;
            ALTER TABLE users ADD COLUMN code_hash TEXT;
            ALTER TABLE users ADD COLUMN code_expires_at BIGINT;
            ALTER TABLE users ADD COLUMN code_failures BIGINT NOT NULL DEFAULT 0;
            ALTER TABLE users ADD COLUMN codes_sent BIGINT NOT NULL DEFAULT 0;
            ALTER TABLE users ADD COLUMN codes_since BIGINT NOT NULL DEFAULT 0;
            UPDATE users SET verified_at = created_at;",
    },
];

/// The metrics users records beside the kit's.
pub const METRICS: &[MetricDoc] = &[
    MetricDoc {
        name: "bazaar_users_registrations_total",
        help: "Registrations answered (whatever became of them: the answer never says).",
    },
    MetricDoc {
        name: "bazaar_users_registered_total",
        help: "Addresses confirmed: accounts that can sign in.",
    },
    MetricDoc {
        name: "bazaar_users_login_throttled_total",
        help: "Sign-ins refused with 429 while an account is locked after failures.",
    },
    MetricDoc {
        name: "bazaar_users_hashing_shed_total",
        help: "Requests refused with 503 because every password-hashing slot was busy.",
    },
];

/// The users service: it consumes nothing; anyone may register and log in.
pub const SERVICE: ServiceSpec = ServiceSpec {
    name: roles::USERS,
    migrations: MIGRATIONS,
    publishes: &[topics::USERS_EVENTS],
    consumes: &[],
    routes: &[
        // Registration is `POST /api/v1/users` exactly; everything else under it needs a token.
        PublicRoute {
            name: "users-register",
            methods: &["POST"],
            exact: true,
            access: Access::Credentials,
            ..PublicRoute::token("users")
        },
        PublicRoute::token("users"),
        PublicRoute::credentials("auth"),
        // The public keys, at the gateway's root as OpenID Connect clients look for them.
        PublicRoute {
            name: "users-jwks",
            mount: Mount::Root,
            ..PublicRoute::anyone(".well-known")
        },
    ],
    openapi: api::openapi,
    messages: bazaar_contracts::MESSAGES,
    metrics: METRICS,
};

/// An operator account to create at start when it does not exist yet.
#[derive(Debug, Clone)]
pub struct AdminAccount {
    /// Its email.
    pub email: String,
    /// Its password (at least 8 characters).
    pub password: String,
}

/// Runs the users role until `shutdown`, creating `admin` first when given.
pub async fn run(config: RoleConfig, admin: Option<AdminAccount>, shutdown: Shutdown) -> Result<(), ServiceError> {
    let rt = Runtime::start(&SERVICE, &config, shutdown).await?;
    let ring = keys::KeyRing::new(rt.store.clone());
    ring.maintain()
        .await
        .map_err(|p| ServiceError::Config(format!("cannot prepare the token signing key: {}", p.detail)))?;
    let maintained = ring.clone();
    rt.every(Duration::from_secs(3600), move || {
        let ring = maintained.clone();
        async move {
            if let Err(p) = ring.maintain().await {
                tracing::warn!(error = %p.detail, "cannot rotate or retire token signing keys");
            }
        }
    });
    if let Some(admin) = admin {
        api::ensure_admin(&rt, &admin.email, &admin.password)
            .await
            .map_err(|p| ServiceError::Config(format!("cannot create the admin account: {}", p.detail)))?;
    }
    rt.serve(config.listen, routes(rt.clone(), ring), rt.health()).await
}
