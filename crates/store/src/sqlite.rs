//! A SQLite file used straight from the calling task.
//!
//! A driver that hands every statement to a thread of its own (sqlx's did) pays two thread
//! wake-ups per statement, 15 times what SQLite itself spends on a one-row write transaction
//! (measured with `bazaar-bench pipeline`: 148 µs of CPU against 10 µs). Here a whole
//! transaction runs inline, as one closure, on one connection per process: statements
//! take microseconds, so the task blocks its thread no longer than an in-memory operation
//! would. The write lock another process holds is never waited for on the thread: the
//! connection has no busy timeout, and a busy transaction is retried after an asynchronous
//! nap.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use crate::error::{sqlite_is_busy, StoreError};
use crate::migration::{unknown_migration, Migration, SCHEMA_MIGRATIONS};

/// How long a transaction keeps retrying while another process holds the write lock.
pub(crate) const BUSY_FOR: Duration = Duration::from_secs(10);
/// The first nap after a busy answer; doubled each time up to [`BUSY_NAP_MAX`].
const BUSY_NAP: Duration = Duration::from_micros(500);
const BUSY_NAP_MAX: Duration = Duration::from_millis(16);

/// One SQLite file, one connection, shared by the tasks of this process.
#[derive(Clone)]
pub struct Sqlite {
    conn: Arc<Mutex<rusqlite::Connection>>,
    path: PathBuf,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite").field("path", &self.path).finish()
    }
}

impl Sqlite {
    /// Opens (creating it and its directory when needed) the file at `path`, in WAL mode with
    /// `synchronous = NORMAL`, as every store is.
    pub async fn open(path: &Path) -> Result<Sqlite, StoreError> {
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(connect(path).await?)),
            path: path.to_path_buf(),
        })
    }

    /// Runs `work` outside a transaction (reads, or a single statement that is atomic on its
    /// own); retried while the file is busy.
    pub async fn read<T>(
        &self,
        mut work: impl FnMut(&rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        Ok(self.retrying(|conn| work(conn)).await?)
    }

    /// Runs `work` in one write transaction (`BEGIN IMMEDIATE`, so the write lock is taken up
    /// front) and commits it; an error rolls it back. While another process holds the lock
    /// the whole transaction is tried again, so `work` may run more than once.
    pub async fn write<T>(
        &self,
        work: impl FnMut(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        Ok(self.write_raw(work).await?)
    }

    /// Applies every migration newer than the file's version, each in its own transaction,
    /// recording them in the same `schema_migrations` table a [`crate::store::Store`] keeps;
    /// a file that records one `migrations` does not hold is refused, as a store's is.
    pub async fn migrate(&self, migrations: &[Migration]) -> Result<(), StoreError> {
        if migrations.is_empty() {
            return self.check_migrations(migrations).await;
        }
        for m in migrations {
            let unknown = self
                .write_raw(|tx| {
                    // Read under the write lock: a newer version migrating meanwhile is seen.
                    let applied = applied_migrations(tx)?;
                    if let Some(unknown) = unknown_migration(&applied, migrations) {
                        return Ok(Some(unknown));
                    }
                    if !applied.iter().any(|(version, _)| *version == m.version) {
                        tx.execute_batch(m.sql)?;
                        tx.execute(
                            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
                            rusqlite::params![m.version, m.name, chrono::Utc::now().to_rfc3339()],
                        )?;
                    }
                    Ok(None)
                })
                .await
                .map_err(|source| StoreError::Migration {
                    version: m.version,
                    name: m.name,
                    source: source.into(),
                })?;
            if let Some((version, name)) = unknown {
                return Err(StoreError::UnknownMigration { version, name });
            }
        }
        Ok(())
    }

    /// Refuses a file that records a migration `known` does not hold (another version's
    /// data), naming the first such. It writes: a new file gets its `schema_migrations`.
    pub async fn check_migrations(&self, known: &[Migration]) -> Result<(), StoreError> {
        let applied = self.write_raw(applied_migrations).await?;
        match unknown_migration(&applied, known) {
            Some((version, name)) => Err(StoreError::UnknownMigration { version, name }),
            None => Ok(()),
        }
    }

    async fn write_raw<T>(
        &self,
        mut work: impl FnMut(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.retrying(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let out = work(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// Runs `work` on the connection, napping and retrying while the file is busy.
    async fn retrying<T>(
        &self,
        mut work: impl FnMut(&mut rusqlite::Connection) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        retry_busy(|| work(&mut self.conn.lock().unwrap_or_else(PoisonError::into_inner))).await
    }
}

/// A connection to the file at `path` (created, with its directory, when missing): WAL,
/// `synchronous = NORMAL`, foreign keys on, statements cached, and no busy timeout (a busy
/// answer comes back at once, for [`retry_busy`] to wait out; setting the pragmas can meet
/// one too, while another process recovers the file after a crash).
pub(crate) async fn connect(path: &Path) -> Result<rusqlite::Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let mut conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::ZERO)?;
    conn.set_prepared_statement_cache_capacity(128);
    // Borrowed uniquely: a shared borrow of a connection held across the naps is not Send.
    let setting_up = &mut conn;
    retry_busy(move || {
        setting_up.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON")
    })
    .await?;
    Ok(conn)
}

/// Runs `work`, napping asynchronously and trying again while it answers busy, for up to
/// [`BUSY_FOR`].
pub(crate) async fn retry_busy<T>(mut work: impl FnMut() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    let deadline = tokio::time::Instant::now() + BUSY_FOR;
    let mut nap = BUSY_NAP;
    loop {
        match work() {
            Err(e) if sqlite_is_busy(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(nap).await;
                nap = (nap * 2).min(BUSY_NAP_MAX);
            }
            other => return other,
        }
    }
}

/// Every migration (version, name) a file records, its `schema_migrations` made when new.
fn applied_migrations(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<Vec<(i64, String)>> {
    tx.execute_batch(SCHEMA_MIGRATIONS)?;
    let mut select = tx.prepare("SELECT version, name FROM schema_migrations ORDER BY version")?;
    let rows = select.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_writer_waits_out_another_connections_write_lock_without_blocking_its_thread() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x.db");
        let db = Sqlite::open(&path).await.expect("open");
        db.write(|tx| tx.execute_batch("CREATE TABLE t (n BIGINT)"))
            .await
            .expect("create");
        // Another process's connection holds the write lock for a while.
        let other = rusqlite::Connection::open(&path).expect("open other");
        other
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
            .expect("lock");
        let writer = {
            let db = db.clone();
            tokio::spawn(async move { db.write(|tx| tx.execute("INSERT INTO t VALUES (2)", [])).await })
        };
        // This runtime's only thread keeps running other tasks meanwhile.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!writer.is_finished(), "the writer waits for the lock");
        other.execute_batch("COMMIT").expect("release");
        writer.await.expect("join").expect("write after the lock is released");
        let n: i64 = db
            .read(|c| c.query_row("SELECT SUM(n) FROM t", [], |r| r.get(0)))
            .await
            .expect("read");
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn a_failed_transaction_leaves_nothing_and_a_migration_applies_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = Sqlite::open(&dir.path().join("x.db")).await.expect("open");
        let migrations = [Migration::new(1, "t", "CREATE TABLE t (n BIGINT PRIMARY KEY)")];
        db.migrate(&migrations).await.expect("migrate");
        db.migrate(&migrations).await.expect("migrate again");
        let failed = db
            .write(|tx| {
                tx.execute("INSERT INTO t VALUES (1)", [])?;
                tx.execute("INSERT INTO t VALUES (1)", [])
            })
            .await;
        assert!(failed.is_err(), "a duplicate key fails the transaction");
        let n: i64 = db
            .read(|c| c.query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)))
            .await
            .expect("read");
        assert_eq!(n, 0, "its first insert was rolled back");
    }
}
