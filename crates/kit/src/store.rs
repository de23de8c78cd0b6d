//! A service's own database, opened from a URL.
//!
//! `sqlite://PATH` (the default: one file per service, WAL, busy timeout, foreign keys on) or
//! `postgres://…`. Both go through sqlx's `Any` driver so that repository code and migrations
//! are written once. SQL in this workspace sticks to the common dialect: `$1` placeholders,
//! `BIGINT` and `TEXT` columns, `INSERT … ON CONFLICT`, `RETURNING`. Where the two engines
//! must differ (auto-increment keys, locking), a [`Migration`] carries both texts.

use std::{path::Path, str::FromStr, time::Duration};

use sqlx::{
    any::{AnyPoolOptions, AnyRow},
    AnyPool, Executor, Row,
};

/// A transaction on a [`Store`]; every write of a service happens inside one.
pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Any>;

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
    /// A SQLite file used inline ([`crate::sqlite`]) answered with an error.
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
}

impl StoreError {
    /// True when retrying soon may succeed: the database was busy (SQLite's write lock held
    /// past the busy timeout, no pooled connection in time) or the engine chose this
    /// transaction as a serialization or deadlock victim.
    pub fn is_busy(&self) -> bool {
        match self {
            StoreError::Database(e) => is_busy(e),
            StoreError::Sqlite(e) => crate::sqlite::is_busy(e),
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

/// `count` numbered placeholders from `$first` on, for a statement built at run time:
/// `$2, $3, $4`.
pub fn params(count: usize, first: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which SQL engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A parsed store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    dialect: Dialect,
    url: String,
}

impl StoreUrl {
    /// The engine this URL names.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.url
    }

    /// The file path of a SQLite URL.
    pub fn sqlite_path(&self) -> Option<&str> {
        match self.dialect {
            Dialect::Sqlite => Some(
                self.url
                    .trim_start_matches("sqlite://")
                    .trim_start_matches("sqlite:")
                    .split('?')
                    .next()
                    .unwrap_or_default(),
            ),
            Dialect::Postgres => None,
        }
    }
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Dialect::Postgres
        } else {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        };
        let store = StoreUrl {
            dialect,
            url: url.to_string(),
        };
        if store.sqlite_path().is_some_and(str::is_empty) {
            return Err(StoreError::UnsupportedUrl(url.to_string()));
        }
        Ok(store)
    }
}

impl std::fmt::Display for StoreUrl {
    /// Shows the URL with any password masked, fit for logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                let userinfo = &self.url[scheme + 3..at];
                match userinfo.split_once(':') {
                    Some((user, _)) => write!(f, "{}{}:****{}", &self.url[..scheme + 3], user, &self.url[at..]),
                    None => f.write_str(&self.url),
                }
            }
            _ => f.write_str(&self.url),
        }
    }
}

/// One versioned schema change. Write `sql` for SQLite: on PostgreSQL the store turns
/// `INTEGER PRIMARY KEY AUTOINCREMENT` into `BIGSERIAL PRIMARY KEY`, the one difference our
/// schemas meet.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Strictly increasing version number.
    pub version: i64,
    /// A short name, recorded with the version.
    pub name: &'static str,
    /// SQL for both engines (statements separated by `;`).
    pub sql: &'static str,
}

impl Migration {
    /// A migration whose SQL runs unchanged on both engines.
    pub const fn new(version: i64, name: &'static str, sql: &'static str) -> Self {
        Migration { version, name, sql }
    }
}

/// SQLite's auto-numbered key, and what PostgreSQL calls it.
const SQLITE_ROWID: &str = "INTEGER PRIMARY KEY AUTOINCREMENT";
const POSTGRES_SERIAL: &str = "BIGSERIAL PRIMARY KEY";

/// A service's database: a pool plus the dialect it speaks.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

impl Store {
    /// Opens (creating when needed) the store named by `url`.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let parsed: StoreUrl = url.parse()?;
        let mut connect_url = parsed.url.clone();
        let max = match parsed.dialect {
            Dialect::Sqlite => {
                let path = parsed.sqlite_path().unwrap_or_default();
                if path != ":memory:" {
                    if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
                            path: dir.display().to_string(),
                            source,
                        })?;
                    }
                }
                if !connect_url.contains("mode=") {
                    connect_url.push_str(if connect_url.contains('?') {
                        "&mode=rwc"
                    } else {
                        "?mode=rwc"
                    });
                }
                4
            }
            Dialect::Postgres => 8,
        };
        let dialect = parsed.dialect;
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(Duration::from_secs(30))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        // WAL lets readers run beside the one writer; the busy timeout makes a
                        // second writer (another process, or the relay) wait instead of failing.
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await?;
        Ok(Store { pool, dialect })
    }

    /// The engine behind this store.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The connection pool, for queries outside a transaction.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so two writers queue on the busy timeout instead of one failing
    /// when it upgrades a read lock.
    pub async fn begin(&self) -> Result<Tx<'static>, StoreError> {
        use sqlx::Connection;
        let mut discarded = 0;
        loop {
            let mut conn = self.pool.acquire().await?;
            if conn.is_in_transaction() {
                // Its last holder was cancelled mid-transaction (a client went away while a
                // handler held it) and sqlx rolls back lazily, on the connection's next use: a
                // ping runs after that rollback. One still inside a transaction after it is
                // closed rather than reused, so no work lands in someone else's transaction.
                let _ = conn.ping().await;
                if conn.is_in_transaction() {
                    let _ = conn.close().await;
                    discarded += 1;
                    if discarded > 8 {
                        return Err(StoreError::Corrupt(
                            "every pooled connection is stuck inside a transaction".into(),
                        ));
                    }
                    continue;
                }
            }
            let statement = match self.dialect {
                // Take the write lock up front: a deferred transaction that reads first can
                // fail to upgrade when another writer got in between.
                Dialect::Sqlite => Some("BEGIN IMMEDIATE".into()),
                Dialect::Postgres => None,
            };
            return Ok(sqlx::Transaction::begin(conn, statement).await?);
        }
    }

    /// Checks that the database answers; used by health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Applies every migration newer than the store's version, each in its own transaction.
    /// Safe to run from two instances at once: PostgreSQL serialises them on an advisory
    /// lock, SQLite on its write lock, and each instance re-reads the version under the lock.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        let create = "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)";
        for m in migrations {
            let mut tx = self.begin().await?;
            if self.dialect == Dialect::Postgres {
                sqlx::query("SELECT pg_advisory_xact_lock(7243001)")
                    .execute(&mut *tx)
                    .await?;
            }
            tx.execute(create).await?;
            let done: Option<AnyRow> = sqlx::query("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await?;
            if done.is_some() {
                tx.rollback().await?;
                continue;
            }
            let sql = match self.dialect {
                Dialect::Postgres => m.sql.replace(SQLITE_ROWID, POSTGRES_SERIAL),
                Dialect::Sqlite => m.sql.to_string(),
            };
            sqlx::raw_sql(&sql)
                .execute(&mut *tx)
                .await
                .map_err(|source| StoreError::Migration {
                    version: m.version,
                    name: m.name,
                    source: source.into(),
                })?;
            sqlx::query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                .bind(m.version)
                .bind(m.name)
                .bind(chrono::Utc::now().to_rfc3339())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// The highest applied migration version, 0 for a new store.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<i64, _>("v")?)
    }

    /// Closes every connection; pending work finishes first.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch, the time format of every timestamp column.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_their_dialect() {
        let s: StoreUrl = "sqlite://data/orders.db".parse().unwrap();
        assert_eq!(s.dialect(), Dialect::Sqlite);
        assert_eq!(s.sqlite_path(), Some("data/orders.db"));
        let p: StoreUrl = "postgres://u:secret@127.0.0.1/orders".parse().unwrap();
        assert_eq!(p.dialect(), Dialect::Postgres);
        assert_eq!(p.to_string(), "postgres://u:****@127.0.0.1/orders");
        assert!("mysql://x".parse::<StoreUrl>().is_err());
        assert!("sqlite://".parse::<StoreUrl>().is_err());
    }
}
