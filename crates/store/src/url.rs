//! Where a store lives: a `sqlite://` or `postgres://` URL, and the dialect it speaks.

use std::str::FromStr;

use crate::error::StoreError;

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
    pub(crate) dialect: Dialect,
    pub(crate) url: String,
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
