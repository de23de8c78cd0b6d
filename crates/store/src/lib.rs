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
//! SQLite runs inline on the calling task (see [`sqlite`] for why): one writer
//! connection that transactions queue for in this process, plus reader connections for
//! statements outside a transaction that only read. PostgreSQL goes through sqlx's pool.

mod error;
mod migration;
mod query;
pub mod sqlite;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod url;

pub use error::{is_busy, StoreError};
pub use migration::Migration;
pub use query::{params, query, ColumnIndex, Decode, Done, Encode, Kind, Query, Row, Value};
pub use store::{now_millis, PoolOptions, Store, Target, Tx};
pub use url::{Dialect, StoreUrl};
