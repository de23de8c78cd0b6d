//! Versioned schema changes, and the table a store records them in.

use crate::url::Dialect;

/// The table a store records its applied migrations in (a `crate::sqlite::Sqlite` file too).
pub(crate) const SCHEMA_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)";

/// The first of `applied` (version, name) that `known` does not hold as the same version
/// with the same name.
pub(crate) fn unknown_migration(applied: &[(i64, String)], known: &[Migration]) -> Option<(i64, String)> {
    applied
        .iter()
        .find(|(version, name)| !known.iter().any(|m| m.version == *version && m.name == name))
        .cloned()
}

/// One versioned schema change. Write `sql` for SQLite: on PostgreSQL the store turns
/// `INTEGER PRIMARY KEY AUTOINCREMENT` into `BIGSERIAL PRIMARY KEY`, the one difference our
/// schemas meet.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Strictly increasing version number.
    pub version: i64,
    /// A short name, recorded with the version. Never rename or remove a released
    /// migration: a store that records it would be refused as another version's.
    pub name: &'static str,
    /// SQL for both engines (statements separated by `;`).
    pub sql: &'static str,
}

/// SQLite's auto-numbered key, and what PostgreSQL calls it.
const SQLITE_ROWID: &str = "INTEGER PRIMARY KEY AUTOINCREMENT";
const POSTGRES_SERIAL: &str = "BIGSERIAL PRIMARY KEY";

impl Migration {
    /// A migration whose SQL runs unchanged on both engines.
    pub const fn new(version: i64, name: &'static str, sql: &'static str) -> Self {
        Migration { version, name, sql }
    }

    /// Its SQL as `dialect` runs it.
    pub(crate) fn sql_for(&self, dialect: Dialect) -> String {
        match dialect {
            Dialect::Postgres => self.sql.replace(SQLITE_ROWID, POSTGRES_SERIAL),
            Dialect::Sqlite => self.sql.to_string(),
        }
    }
}
