//! The store itself: a SQLite file (one writer, a few readers) or a PostgreSQL pool behind
//! one handle, its transactions, and its migrations run in order under a lock.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures_util::TryStreamExt;
use sqlx::{postgres::PgPoolOptions, Column, Executor, PgPool, Row as _, TypeInfo, ValueRef};

use crate::error::StoreError;
use crate::migration::{unknown_migration, Migration, SCHEMA_MIGRATIONS};
use crate::query::{query, Done, Kind, Query, Row, Value};
use crate::sqlite;
use crate::url::{Dialect, StoreUrl};

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
    pub(crate) async fn execute(self, q: Query<'_>) -> Result<Done, StoreError> {
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

    pub(crate) async fn fetch(self, q: Query<'_>) -> Result<Vec<Row>, StoreError> {
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
            tx.execute_batch(&m.sql_for(self.dialect()))
                .await
                .map_err(|source| StoreError::Migration {
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
