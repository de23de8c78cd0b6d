//! The users service: registration, credentials, and the tokens every other role trusts.
//!
//! `POST /users` stores the user and announces `user.registered` (payments opens a wallet,
//! notifications sends a welcome) in one transaction; `POST /auth/login` checks the argon2
//! hash and issues a JWT (see `bazaar_kit::auth`).

mod api;

use bazaar_kit::{
    runtime::{RoleConfig, Runtime, ServiceError},
    service::{Access, PublicRoute, ServiceSpec},
    shutdown::Shutdown,
    store::Migration,
};

pub use api::router;

/// The users tables.
pub const MIGRATIONS: &[Migration] = &[Migration {
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
}];

/// The users service: it consumes nothing; anyone may register and log in.
pub const SERVICE: ServiceSpec = ServiceSpec {
    name: "users",
    migrations: MIGRATIONS,
    consumes: &[],
    routes: &[
        // Registration is `POST /api/v1/users` exactly; everything else under it needs a token.
        PublicRoute {
            name: "users-register",
            methods: &["POST"],
            exact: true,
            access: Access::Anyone,
            ..PublicRoute::token("users")
        },
        PublicRoute::token("users"),
        PublicRoute::anyone("auth"),
    ],
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
    if let Some(admin) = admin {
        api::ensure_admin(&rt, &admin.email, &admin.password)
            .await
            .map_err(|p| ServiceError::Config(format!("cannot create the admin account: {}", p.detail)))?;
    }
    rt.serve(config.listen, router(rt.clone()), rt.health()).await
}
