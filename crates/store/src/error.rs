//! What can go wrong with a store, and which of it is worth retrying.

use std::time::Duration;

/// Errors opening, migrating or querying a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names neither `sqlite://` nor `postgres://`.
    #[error("unsupported store URL `{0}`: expected sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// The directory for a SQLite file could not be created.
    #[error("cannot create the directory for `{path}`: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The database answered with an error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// This process's transactions held the SQLite writer past the busy limit.
    #[error("the database stayed busy with other transactions for {0:?}")]
    WriterBusy(Duration),
    /// A statement that must return a row returned none.
    #[error("no row returned by `{0}`")]
    NoRow(String),
    /// A SQLite file used inline (`crate::sqlite`) answered with an error.
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A migration failed; the store is left at the previous version.
    #[error("migration {version} ({name}) failed: {source}")]
    Migration {
        /// The version that failed.
        version: i64,
        /// Its name.
        name: &'static str,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored value could not be read back (a bug or a hand-edited row).
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// Every connection of the pool stayed busy past the wait: the role needs a larger pool
    /// (`--store-pool`) or the server is slow.
    #[error("{owner}: all {size} connections to PostgreSQL stayed busy for {waited:?} (raise --store-pool, or see what holds them)")]
    PoolExhausted {
        /// Whose pool (the role).
        owner: String,
        /// Its size.
        size: u32,
        /// How long the statement waited for a connection.
        waited: Duration,
    },
    /// The store records a migration this program does not have (as that version with that
    /// name): another version of it wrote the data, and running on it would corrupt it.
    #[error(
        "the store records migration {version} ({name}), which this version does not have: another version wrote it"
    )]
    UnknownMigration {
        /// The recorded version.
        version: i64,
        /// Its recorded name.
        name: String,
    },
    /// No connection to PostgreSQL could be opened in time when the store was opened.
    #[error("{owner}: could not open a connection to PostgreSQL in {waited:?} (is the server up, with connections to spare? its max_connections is shared by every role and tool)")]
    Unreachable {
        /// Whose store (the role).
        owner: String,
        /// How long it tried.
        waited: Duration,
    },
}

impl StoreError {
    /// True when retrying soon may succeed: the database was busy (SQLite's write lock held
    /// by another process past the busy limit, this process's writer or a pooled PostgreSQL
    /// connection not free in time) or the engine chose this transaction as a serialization
    /// or deadlock victim.
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Database(e) => is_busy(e),
            StoreError::Sqlite(e) => sqlite_is_busy(e),
            StoreError::WriterBusy(_) | StoreError::PoolExhausted { .. } | StoreError::Unreachable { .. } => true,
            _ => false,
        }
    }
}

/// See [`StoreError::is_busy`].
pub fn is_busy(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => {
            // SQLITE_BUSY (5) and SQLITE_LOCKED (6), with their extended codes; PostgreSQL's
            // serialization_failure and deadlock_detected.
            let code = db.code().unwrap_or_default();
            matches!(code.as_ref(), "5" | "6" | "261" | "262" | "517" | "40001" | "40P01")
                || db.message().contains("database is locked")
        }
        _ => false,
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED: another connection holds what this one needs.
pub(crate) fn sqlite_is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}
