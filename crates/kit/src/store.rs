//! A service's own database, opened from a URL.
//!
//! `sqlite://PATH` (the default: one file per service, WAL, foreign keys on) or
//! `postgres://…`, behind one API ([`query`], [`Row`], [`Tx`]) so that repository code and
//! migrations are written once. SQL in this workspace sticks to the common dialect: `$1`
//! placeholders, `BIGINT` and `TEXT` columns, `INSERT … ON CONFLICT`, `RETURNING`. Where the
//! two engines must differ (auto-increment keys, locking), a [`Migration`] carries both texts.
//!
//! A decision made on the database is race-free on both engines when the rows that decide
//! are locked: end the `SELECT` that reads them with `FOR UPDATE`. PostgreSQL (READ
//! COMMITTED) then makes a second transaction wait and read the first's result; SQLite's
//! write transaction already holds the whole file (`BEGIN IMMEDIATE`), so the store drops the
//! clause there. A row that may not exist yet cannot be locked: claim it with
//! `INSERT … ON CONFLICT DO NOTHING` and read it again when the insert affected no row.
//!
//! SQLite runs inline on the calling task (see [`crate::sqlite`] for why): one writer
//! connection that transactions queue for in this process, plus reader connections for
//! statements outside a transaction that only read. PostgreSQL goes through sqlx's pool.

mod query;

use std::{
    str::FromStr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures_util::TryStreamExt;
use sqlx::{postgres::PgPoolOptions, Column, Executor, PgPool, Row as _, TypeInfo, ValueRef};

pub use query::{query, ColumnIndex, Decode, Done, Encode, Kind, Query, Row, Value};

use crate::sqlite;

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
            StoreError::Sqlite(e) => crate::sqlite::is_busy(e),
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

/// The table a store records its applied migrations in (a [`crate::sqlite::Sqlite`] file too).
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

/// How a store connects to PostgreSQL (SQLite ignores it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolOptions {
    /// Whose store this is (a role's name), named by errors.
    pub owner: String,
    /// Most connections the pool opens: every instance of every role counts against the
    /// server's `max_connections` (100 by default).
    pub size: u32,
    /// How long a statement waits for a free connection before it fails.
    pub wait: Duration,
    /// How long a session may sit idle inside a transaction before PostgreSQL ends it and
    /// lets go of its locks (zero: no limit): a client cut off mid-transaction (a partition,
    /// a frozen host) would otherwise hold the rows it locked until it came back.
    pub idle_in_transaction: Duration,
}

impl PoolOptions {
    /// Connections for a store whose owner does not say: enough for a tool (the audit), few
    /// enough to leave the server's connections to the roles.
    pub const DEFAULT_SIZE: u32 = 4;

    /// `size` connections for `owner`, waiting up to 10 s for one.
    pub fn new(owner: impl Into<String>, size: u32) -> PoolOptions {
        PoolOptions {
            owner: owner.into(),
            size,
            wait: Duration::from_secs(10),
            idle_in_transaction: Duration::from_secs(5),
        }
    }
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions::new("bazaar", PoolOptions::DEFAULT_SIZE)
    }
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

/// A service's database: SQLite connections or a PostgreSQL pool, and the dialect it speaks.
#[derive(Debug, Clone)]
pub struct Store {
    engine: Engine,
}

#[derive(Debug, Clone)]
enum Engine {
    Sqlite(Arc<SqliteFile>),
    Postgres(Arc<PgStore>),
}

/// A PostgreSQL pool and whose it is, for errors that name them.
#[derive(Debug)]
struct PgStore {
    pool: PgPool,
    options: PoolOptions,
}

/// One SQLite file: the writer every transaction queues for, and idle readers.
#[derive(Debug)]
struct SqliteFile {
    path: String,
    writer: Arc<tokio::sync::Mutex<rusqlite::Connection>>,
    readers: Mutex<Vec<rusqlite::Connection>>,
}

/// Reader connections kept open per file.
const READERS: usize = 4;

impl SqliteFile {
    /// An idle reader (or a new one) for `sql` when it only reads; `None` when the writer
    /// must run it: a statement that writes, or any on `:memory:`, which has only its writer.
    async fn reader_for(&self, sql: &str) -> Result<Option<rusqlite::Connection>, StoreError> {
        if !is_read(sql) || self.path == ":memory:" {
            return Ok(None);
        }
        let idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner).pop();
        match idle {
            Some(conn) => Ok(Some(conn)),
            None => Ok(Some(sqlite::connect(std::path::Path::new(&self.path)).await?)),
        }
    }

    /// The writer, after the transactions queued before; a bounded wait, so a statement
    /// that needs the writer while its own task holds a transaction fails instead of
    /// hanging.
    async fn writer(&self) -> Result<tokio::sync::OwnedMutexGuard<rusqlite::Connection>, StoreError> {
        tokio::time::timeout(sqlite::BUSY_FOR, self.writer.clone().lock_owned())
            .await
            .map_err(|_| StoreError::WriterBusy(sqlite::BUSY_FOR))
    }

    fn give_back(&self, conn: rusqlite::Connection) {
        let mut idle = self.readers.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < READERS {
            idle.push(conn);
        }
    }
}

/// Where a statement runs: a store (a statement of its own) or a transaction.
pub enum Target<'c> {
    /// Outside any transaction.
    Store(&'c Store),
    /// Inside this transaction.
    Tx(&'c mut Tx),
}

impl<'c> From<&'c Store> for Target<'c> {
    fn from(store: &'c Store) -> Self {
        Target::Store(store)
    }
}

impl<'c> From<&'c mut Tx> for Target<'c> {
    fn from(tx: &'c mut Tx) -> Self {
        Target::Tx(tx)
    }
}

impl Target<'_> {
    async fn execute(self, q: Query<'_>) -> Result<Done, StoreError> {
        match self {
            Target::Store(store) => match &store.engine {
                Engine::Sqlite(file) => {
                    let mut conn = file.writer().await?;
                    Ok(sqlite::retry_busy(|| sqlite_execute(&mut conn, &q)).await?)
                }
                Engine::Postgres(pg) => Ok(Done::new(
                    pg_query(&q)
                        .execute(&pg.pool)
                        .await
                        .map_err(|e| pg.error(e))?
                        .rows_affected(),
                )),
            },
            Target::Tx(tx) => match &mut tx.inner {
                TxInner::Sqlite(conn) => Ok(sqlite_execute(conn, &q)?),
                TxInner::Postgres(pg) => Ok(Done::new(pg_query(&q).execute(&mut **pg).await?.rows_affected())),
                TxInner::Done => Err(StoreError::Corrupt("statement on a finished transaction".into())),
            },
        }
    }

    async fn fetch(self, q: Query<'_>) -> Result<Vec<Row>, StoreError> {
        match self {
            Target::Store(store) => match &store.engine {
                Engine::Sqlite(file) => match file.reader_for(q.sql).await? {
                    Some(mut conn) => {
                        let rows = sqlite::retry_busy(|| sqlite_fetch(&mut conn, &q)).await;
                        file.give_back(conn);
                        Ok(rows?)
                    }
                    None => {
                        let mut conn = file.writer().await?;
                        Ok(sqlite::retry_busy(|| sqlite_fetch(&mut conn, &q)).await?)
                    }
                },
                Engine::Postgres(pg) => pg_rows(pg_query(&q).fetch(&pg.pool))
                    .await
                    .map_err(|e| pg.store_error(e)),
            },
            Target::Tx(tx) => match &mut tx.inner {
                TxInner::Sqlite(conn) => Ok(sqlite_fetch(conn, &q)?),
                TxInner::Postgres(pg) => pg_rows(pg_query(&q).fetch(&mut **pg)).await,
                TxInner::Done => Err(StoreError::Corrupt("statement on a finished transaction".into())),
            },
        }
    }
}

/// A statement that only reads, which a reader connection may run beside the writer.
fn is_read(sql: &str) -> bool {
    let head = sql.trim_start();
    head.len() >= 6 && head[..6].eq_ignore_ascii_case("select")
}

/// `sql` as SQLite takes it: without a trailing `FOR UPDATE`, which its write transaction
/// makes redundant (see the module's doc).
fn sqlite_text(sql: &str) -> &str {
    const CLAUSE: &str = "FOR UPDATE";
    let trimmed = sql.trim_end();
    match trimmed.len().checked_sub(CLAUSE.len()) {
        Some(at) if trimmed.is_char_boundary(at) && trimmed[at..].eq_ignore_ascii_case(CLAUSE) => {
            trimmed[..at].trim_end()
        }
        _ => sql,
    }
}

/// Prepares (cached) `q` with its arguments bound by placeholder number: `$2` may come
/// before `$1` or appear twice, so each placeholder is looked up by its name.
fn sqlite_prepare<'c>(
    conn: &'c rusqlite::Connection,
    q: &Query<'_>,
) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
    let mut stmt = conn.prepare_cached(sqlite_text(q.sql))?;
    for i in 1..=stmt.parameter_count() {
        let n = stmt
            .parameter_name(i)
            .and_then(|name| name.trim_start_matches(['$', '?']).parse::<usize>().ok())
            .unwrap_or(i);
        let value = q
            .args
            .get(n - 1)
            .ok_or(rusqlite::Error::InvalidParameterCount(n, q.args.len()))?;
        match value {
            Value::Null(_) => stmt.raw_bind_parameter(i, rusqlite::types::Null)?,
            Value::Int(v) => stmt.raw_bind_parameter(i, v)?,
            Value::Bool(v) => stmt.raw_bind_parameter(i, v)?,
            Value::Real(v) => stmt.raw_bind_parameter(i, v)?,
            Value::Text(v) => stmt.raw_bind_parameter(i, v)?,
            Value::Blob(v) => stmt.raw_bind_parameter(i, v)?,
        }
    }
    Ok(stmt)
}

fn sqlite_execute(conn: &mut rusqlite::Connection, q: &Query<'_>) -> rusqlite::Result<Done> {
    let mut stmt = sqlite_prepare(conn, q)?;
    // Stepped to the end, so a statement with RETURNING still does all its work.
    let mut rows = stmt.raw_query();
    while rows.next()?.is_some() {}
    drop(rows);
    Ok(Done::new(conn.changes()))
}

fn sqlite_fetch(conn: &mut rusqlite::Connection, q: &Query<'_>) -> rusqlite::Result<Vec<Row>> {
    let mut stmt = sqlite_prepare(conn, q)?;
    let columns: Arc<[String]> = stmt.column_names().into_iter().map(String::from).collect();
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut values = Vec::with_capacity(columns.len());
        for i in 0..columns.len() {
            values.push(match row.get_ref(i)? {
                rusqlite::types::ValueRef::Null => Value::Null(Kind::Text),
                rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                rusqlite::types::ValueRef::Real(v) => Value::Real(v),
                rusqlite::types::ValueRef::Text(v) => Value::Text(String::from_utf8_lossy(v).into_owned()),
                rusqlite::types::ValueRef::Blob(v) => Value::Blob(v.to_vec()),
            });
        }
        out.push(Row::new(columns.clone(), values));
    }
    Ok(out)
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn pg_query<'q>(q: &'q Query<'_>) -> PgQuery<'q> {
    let mut out = sqlx::query(q.sql);
    for value in &q.args {
        out = match value {
            Value::Null(Kind::Int) => out.bind(None::<i64>),
            Value::Null(Kind::Bool) => out.bind(None::<bool>),
            Value::Null(Kind::Real) => out.bind(None::<f64>),
            Value::Null(Kind::Text) => out.bind(None::<String>),
            Value::Null(Kind::Blob) => out.bind(None::<Vec<u8>>),
            Value::Int(v) => out.bind(*v),
            Value::Bool(v) => out.bind(*v),
            Value::Real(v) => out.bind(*v),
            Value::Text(v) => out.bind(v.as_str()),
            Value::Blob(v) => out.bind(v.as_slice()),
        };
    }
    out
}

async fn pg_rows<'e>(
    mut rows: futures_util::stream::BoxStream<'e, Result<sqlx::postgres::PgRow, sqlx::Error>>,
) -> Result<Vec<Row>, StoreError> {
    let mut out = Vec::new();
    let mut columns: Option<Arc<[String]>> = None;
    while let Some(row) = rows.try_next().await? {
        let names = columns
            .get_or_insert_with(|| row.columns().iter().map(|c| c.name().to_string()).collect())
            .clone();
        let mut values = Vec::with_capacity(names.len());
        for (i, column) in row.columns().iter().enumerate() {
            let raw = row.try_get_raw(i)?;
            let value = if raw.is_null() {
                Value::Null(Kind::Text)
            } else {
                match column.type_info().name() {
                    "INT8" => Value::Int(row.try_get::<i64, _>(i)?),
                    "INT4" => Value::Int(i64::from(row.try_get::<i32, _>(i)?)),
                    "INT2" => Value::Int(i64::from(row.try_get::<i16, _>(i)?)),
                    "BOOL" => Value::Bool(row.try_get::<bool, _>(i)?),
                    "FLOAT8" => Value::Real(row.try_get::<f64, _>(i)?),
                    "FLOAT4" => Value::Real(f64::from(row.try_get::<f32, _>(i)?)),
                    "BYTEA" => Value::Blob(row.try_get::<Vec<u8>, _>(i)?),
                    "TEXT" | "VARCHAR" | "NAME" | "BPCHAR" => Value::Text(row.try_get::<String, _>(i)?),
                    other => {
                        return Err(StoreError::Corrupt(format!(
                            "column {} has type {other}, which stores do not read (cast it to BIGINT or TEXT)",
                            column.name()
                        )))
                    }
                }
            };
            values.push(value);
        }
        out.push(Row::new(names, values));
    }
    Ok(out)
}

/// How each PostgreSQL session of `pool` connects: a session idle inside a transaction
/// past the pool's limit is ended (its locks freed; zero: no limit), and the server probes
/// an idle client after 10 s, so one that vanished gives its connection back within about
/// 25 s instead of the kernel's two hours (probes wait while the server has unacknowledged
/// data for it). These travel as the startup packet's `options`, which a pooler in between
/// must pass on or ignore (PgBouncer: `ignore_startup_parameters = options`).
fn session_options(url: &str, pool: &PoolOptions) -> Result<sqlx::postgres::PgConnectOptions, StoreError> {
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let idle_ms = pool.idle_in_transaction.as_millis().to_string();
    Ok(options.options([
        ("idle_in_transaction_session_timeout", idle_ms.as_str()),
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
    ]))
}

impl Store {
    /// Opens (creating when needed) the store named by `url`, with the default pool.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        Store::open_with(url, PoolOptions::default()).await
    }

    /// Opens (creating when needed) the store named by `url`; `pool` says how it connects
    /// to PostgreSQL.
    pub async fn open_with(url: &str, pool: PoolOptions) -> Result<Store, StoreError> {
        let parsed: StoreUrl = url.parse()?;
        let engine = match parsed.dialect {
            Dialect::Sqlite => {
                let path = parsed.sqlite_path().unwrap_or_default().to_string();
                let writer = if path == ":memory:" {
                    rusqlite::Connection::open_in_memory()?
                } else {
                    sqlite::connect(std::path::Path::new(&path)).await?
                };
                Engine::Sqlite(Arc::new(SqliteFile {
                    path,
                    writer: Arc::new(tokio::sync::Mutex::new(writer)),
                    readers: Mutex::new(Vec::new()),
                }))
            }
            Dialect::Postgres => {
                let connected = PgPoolOptions::new()
                    .max_connections(pool.size.max(1))
                    .acquire_timeout(pool.wait)
                    .connect_with(session_options(&parsed.url, &pool)?)
                    .await;
                let unreachable = |e| match e {
                    sqlx::Error::PoolTimedOut => StoreError::Unreachable {
                        owner: pool.owner.clone(),
                        waited: pool.wait,
                    },
                    other => StoreError::Database(other),
                };
                Engine::Postgres(Arc::new(PgStore {
                    pool: connected.map_err(unreachable)?,
                    options: pool,
                }))
            }
        };
        Ok(Store { engine })
    }

    /// The engine behind this store.
    pub fn dialect(&self) -> Dialect {
        match self.engine {
            Engine::Sqlite(_) => Dialect::Sqlite,
            Engine::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Starts a write transaction. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`) after the transactions of this process before it; another
    /// process's lock is waited out asynchronously.
    pub async fn begin(&self) -> Result<Tx, StoreError> {
        let inner = match &self.engine {
            Engine::Sqlite(file) => {
                let mut conn = file.writer().await?;
                let writer: &mut rusqlite::Connection = &mut conn;
                sqlite::retry_busy(move || writer.execute_batch("BEGIN IMMEDIATE")).await?;
                TxInner::Sqlite(conn)
            }
            Engine::Postgres(pg) => TxInner::Postgres(pg.pool.begin().await.map_err(|e| pg.error(e))?),
        };
        Ok(Tx { inner })
    }

    /// Checks that the database answers; used by health checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        query("SELECT 1").fetch_all(self).await?;
        Ok(())
    }

    /// Applies every migration newer than the store's version, each in its own transaction;
    /// a store that records one `migrations` does not hold is refused.
    /// Safe to run from two instances at once, even of different versions: PostgreSQL
    /// serialises them on an advisory lock, SQLite on its write lock, and each instance
    /// re-reads what is applied under the lock.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        if migrations.is_empty() {
            return self.check_migrations(migrations).await;
        }
        for m in migrations {
            let (mut tx, applied) = self.migration_tx(migrations).await?;
            if applied.contains(&m.version) {
                tx.rollback().await?;
                continue;
            }
            let sql = match self.dialect() {
                Dialect::Postgres => m.sql.replace(SQLITE_ROWID, POSTGRES_SERIAL),
                Dialect::Sqlite => m.sql.to_string(),
            };
            tx.execute_batch(&sql).await.map_err(|source| StoreError::Migration {
                version: m.version,
                name: m.name,
                source: source.into(),
            })?;
            query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)")
                .bind(m.version)
                .bind(m.name)
                .bind(chrono::Utc::now().to_rfc3339())
                .execute(&mut tx)
                .await?;
            tx.commit().await?;
        }
        Ok(())
    }

    /// Refuses a store that records a migration `known` does not hold (another version's
    /// data), naming the first such. It writes: a new store gets its `schema_migrations`.
    pub async fn check_migrations(&self, known: &[Migration]) -> Result<(), StoreError> {
        let (tx, _) = self.migration_tx(known).await?;
        tx.commit().await
    }

    /// A transaction that holds the migration lock, on a store whose `schema_migrations`
    /// table exists, and the versions it records; refused when one is not in `known`.
    async fn migration_tx(&self, known: &[Migration]) -> Result<(Tx, Vec<i64>), StoreError> {
        let mut tx = self.begin().await?;
        if self.dialect() == Dialect::Postgres {
            query("SELECT pg_advisory_xact_lock(7243001)").execute(&mut tx).await?;
        }
        tx.execute_batch(SCHEMA_MIGRATIONS).await?;
        let rows = query("SELECT version, name FROM schema_migrations ORDER BY version")
            .fetch_all(&mut tx)
            .await?;
        let applied = rows
            .iter()
            .map(|r| Ok((r.try_get("version")?, r.try_get("name")?)))
            .collect::<Result<Vec<(i64, String)>, StoreError>>()?;
        if let Some((version, name)) = unknown_migration(&applied, known) {
            // Dropping the transaction rolls it back; a failed rollback must not hide why.
            drop(tx);
            return Err(StoreError::UnknownMigration { version, name });
        }
        Ok((tx, applied.into_iter().map(|(version, _)| version).collect()))
    }

    /// The highest applied migration version, 0 for a new store.
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_scalar(self)
            .await
    }

    /// Closes every connection; pending work finishes first.
    pub async fn close(&self) {
        match &self.engine {
            Engine::Sqlite(file) => file.readers.lock().unwrap_or_else(PoisonError::into_inner).clear(),
            Engine::Postgres(pg) => pg.pool.close().await,
        }
    }
}

/// A transaction on a [`Store`]; every write of a service happens inside one. Dropped
/// without [`Tx::commit`], it rolls back.
pub struct Tx {
    inner: TxInner,
}

enum TxInner {
    /// The file's writer, held until the end.
    Sqlite(tokio::sync::OwnedMutexGuard<rusqlite::Connection>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    /// Committed or rolled back.
    Done,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tx")
    }
}

impl Tx {
    /// Makes its changes durable and visible.
    pub async fn commit(mut self) -> Result<(), StoreError> {
        match std::mem::replace(&mut self.inner, TxInner::Done) {
            TxInner::Sqlite(conn) => {
                if let Err(e) = conn.execute_batch("COMMIT") {
                    // A failed commit leaves the transaction open on SQLite: end it.
                    let _ = conn.execute_batch("ROLLBACK");
                    return Err(e.into());
                }
                Ok(())
            }
            TxInner::Postgres(tx) => Ok(tx.commit().await?),
            TxInner::Done => Ok(()),
        }
    }

    /// Discards its changes.
    pub async fn rollback(mut self) -> Result<(), StoreError> {
        match std::mem::replace(&mut self.inner, TxInner::Done) {
            TxInner::Sqlite(conn) => Ok(conn.execute_batch("ROLLBACK")?),
            TxInner::Postgres(tx) => Ok(tx.rollback().await?),
            TxInner::Done => Ok(()),
        }
    }

    /// Runs several `;`-separated statements without arguments (schema changes).
    pub async fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match &mut self.inner {
            TxInner::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            TxInner::Postgres(tx) => {
                (&mut **tx).execute(sqlx::raw_sql(sql)).await?;
                Ok(())
            }
            TxInner::Done => Err(StoreError::Corrupt("statement on a finished transaction".into())),
        }
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        // sqlx rolls its own back when dropped; SQLite's is ended here, before the writer
        // goes back to the next transaction.
        if let TxInner::Sqlite(conn) = &self.inner {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
        }
    }
}

impl PgStore {
    /// `e` as a store error that names the pool when no connection came free.
    fn error(&self, e: sqlx::Error) -> StoreError {
        match e {
            sqlx::Error::PoolTimedOut => StoreError::PoolExhausted {
                owner: self.options.owner.clone(),
                size: self.options.size,
                waited: self.options.wait,
            },
            other => StoreError::Database(other),
        }
    }

    /// As [`PgStore::error`], for an error already wrapped.
    fn store_error(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Database(e) => self.error(e),
            other => other,
        }
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

    #[tokio::test]
    async fn a_locking_read_runs_on_sqlite_inside_and_outside_a_transaction() {
        assert_eq!(
            sqlite_text("SELECT a FROM t WHERE id = $1 for update \n"),
            "SELECT a FROM t WHERE id = $1"
        );
        assert_eq!(sqlite_text("SELECT 'FOR UPDATE'"), "SELECT 'FOR UPDATE'");
        let store = Store::open("sqlite://:memory:").await.unwrap();
        query("CREATE TABLE t (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)")
            .execute(&store)
            .await
            .unwrap();
        query("INSERT INTO t (id, n) VALUES (1, 7)")
            .execute(&store)
            .await
            .unwrap();
        let mut tx = store.begin().await.unwrap();
        let n: i64 = query("SELECT n FROM t WHERE id = $1 FOR UPDATE")
            .bind(1i64)
            .fetch_scalar(&mut tx)
            .await
            .unwrap();
        assert_eq!(n, 7);
        tx.commit().await.unwrap();
        let n: i64 = query("SELECT n FROM t WHERE id = 1 FOR UPDATE")
            .fetch_scalar(&store)
            .await
            .unwrap();
        assert_eq!(n, 7);
    }
}
