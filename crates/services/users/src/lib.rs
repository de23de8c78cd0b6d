//! The users service: registration, credentials, and the tokens every other role trusts.
//!
//! `POST /users` stores the user and announces `user.registered` (payments opens a wallet,
//! notifications sends a welcome) in one transaction; `POST /auth/login` checks the argon2
//! hash and issues a JWT (see `bazaar_kit::auth`).

mod api;

use bazaar_kit::{
    runtime::{RoleConfig, Runtime, ServiceError},
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
            password_hash TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );",
    postgres: None,
}];

/// Runs the users role until `shutdown`.
pub async fn run(config: RoleConfig, shutdown: Shutdown) -> Result<(), ServiceError> {
    let rt = Runtime::start("users", &config, MIGRATIONS, shutdown).await?;
    rt.serve(config.listen, router(rt.clone()), rt.health()).await
}
