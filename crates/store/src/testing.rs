//! Throwaway databases for tests: a SQLite file in a temporary directory, or a fresh
//! PostgreSQL database on the server `BAZAAR_TEST_POSTGRES_URL` names (created per test,
//! dropped by [`TestDb::drop_database`]); and the servers tests find through variables
//! ([`servers`]). Built only with the `testing` feature, which only dev-dependencies ask for.

use crate::{query, Store};

pub mod servers;
pub use servers::Server;

/// Where a test database lives.
#[derive(Debug)]
enum Backend {
    Sqlite { _dir: tempfile::TempDir },
    Postgres { admin: String, name: String },
}

/// A fresh database for one test.
#[derive(Debug)]
pub struct TestDb {
    /// The store URL to open it with.
    pub url: String,
    backend: Backend,
}

impl TestDb {
    /// A SQLite file `file` in a new temporary directory (removed on drop).
    pub fn sqlite(file: &str) -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join(file).display());
        TestDb {
            url,
            backend: Backend::Sqlite { _dir: dir },
        }
    }

    /// A new database `<prefix>_<uuid>` on the `BAZAAR_TEST_POSTGRES_URL` server, or `None`
    /// (after saying the test is skipped) when the variable is unset.
    pub async fn postgres(prefix: &str) -> Option<TestDb> {
        let admin = servers::url(Server::Postgres, "the PostgreSQL part")?;
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let server = Store::open(&admin).await.expect("connect to BAZAAR_TEST_POSTGRES_URL");
        query(&format!("CREATE DATABASE {name}"))
            .execute(&server)
            .await
            .expect("create a test database");
        server.close().await;
        Some(TestDb {
            url: with_database(&admin, &name),
            backend: Backend::Postgres { admin, name },
        })
    }

    /// A SQLite database, and a PostgreSQL one when `BAZAAR_TEST_POSTGRES_URL` is set: the
    /// engines a rule about concurrent writers must hold on.
    pub async fn both(prefix: &str) -> Vec<TestDb> {
        let mut dbs = vec![TestDb::sqlite(&format!("{prefix}.db"))];
        dbs.extend(TestDb::postgres(prefix).await);
        dbs
    }

    /// True for a PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres { .. })
    }

    /// Opens a store on this database, as an instance of a service would.
    pub async fn open(&self) -> Store {
        Store::open(&self.url).await.expect("open the store")
    }

    /// Drops a PostgreSQL database (a SQLite one goes with its directory).
    pub async fn drop_database(&self) {
        if let Backend::Postgres { admin, name } = &self.backend {
            if let Ok(server) = Store::open(admin).await {
                let _ = query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&server)
                    .await;
                server.close().await;
            }
        }
    }
}

/// `url` with its database name replaced by `database`, keeping any query string.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{server}/{database}{query}")
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_names_are_swapped_in_urls() {
        assert_eq!(with_database("postgres://u@h:5432/test", "x"), "postgres://u@h:5432/x");
        assert_eq!(
            with_database("postgres://u@h/test?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
