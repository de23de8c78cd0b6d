//! The library half of the `bazaar` binary, shared by its commands, its end-to-end tests
//! and the benches. It imports one way: `settings` (flags and variables, by who reads them)
//! ← `adapters` (settings into each role's config) ← `roles` (the table) ← `layout` (ports
//! and URLs per role) and `contracts` (the API documents) ← `serve` (start-up); `load` (the
//! load driver) and `metrics` (the catalogue) read the table and the settings.

pub mod adapters;
pub mod contracts;
pub mod layout;
pub mod load;
pub mod metrics;
pub mod roles;
pub mod serve;
pub mod settings;

/// `error` and its causes on one line, as `bazaar: …` prints it: a cause whose text an outer
/// message already quotes (`store: {0}` over its source) is said once.
pub fn error_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use bazaar_kit::{runtime::ServiceError, store::StoreError};

    #[test]
    fn a_role_that_cannot_start_says_why_once() {
        let unreachable = StoreError::Unreachable {
            owner: "orders".into(),
            waited: std::time::Duration::from_secs(10),
        };
        let listen = ServiceError::Listen {
            addr: "127.0.0.1:8103".parse().expect("an address"),
            source: std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use"),
        };
        for (error, cause) in [
            (ServiceError::from(unreachable), "could not open a connection"),
            (listen, "address in use"),
        ] {
            let line = super::error_line(&anyhow::Error::from(error).context("orders"));
            assert!(line.starts_with("orders: "), "{line}");
            assert_eq!(line.matches(cause).count(), 1, "{line}");
        }
    }
}
