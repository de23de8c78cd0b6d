//! Settings from a file: `--config FILE` (or `BAZAAR_CONFIG`) names a file of `BAZAAR_*=value`
//! lines, the same names as the environment variables `bazaar --help` lists. Blank lines and
//! `#` comments are skipped. Precedence: flags, then the environment, then the file.

use std::path::Path;

/// Why the config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// It could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A line is not `BAZAAR_NAME=value`.
    #[error("{path}:{line}: expected BAZAAR_NAME=value, found `{text}`")]
    Syntax {
        /// The file.
        path: String,
        /// The 1-based line number.
        line: usize,
        /// What was there.
        text: String,
    },
}

/// The config file named by `--config FILE`, `--config=FILE` or `BAZAAR_CONFIG`, if any.
pub fn named(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--config" {
            return it.next().cloned();
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.to_string());
        }
    }
    std::env::var("BAZAAR_CONFIG").ok().filter(|p| !p.is_empty())
}

/// The `(name, value)` pairs of a config file's text.
pub fn parse(path: &str, text: &str) -> Result<Vec<(String, String)>, ConfigFileError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let pair = line.split_once('=').map(|(k, v)| (k.trim(), v.trim()));
        match pair {
            Some((key, value))
                if key.starts_with("BAZAAR_")
                    && key
                        .chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') =>
            {
                let value = value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value);
                out.push((key.to_string(), value.to_string()));
            }
            _ => {
                return Err(ConfigFileError::Syntax {
                    path: path.to_string(),
                    line: i + 1,
                    text: line.to_string(),
                })
            }
        }
    }
    Ok(out)
}

/// Reads `path` and sets each variable the environment does not already set.
pub fn apply(path: &str) -> Result<(), ConfigFileError> {
    let text = std::fs::read_to_string(Path::new(path)).map_err(|source| ConfigFileError::Read {
        path: path.to_string(),
        source,
    })?;
    for (key, value) in parse(path, &text)? {
        if std::env::var_os(&key).is_none() {
            // Single-threaded here: main calls this before the runtime or any thread starts.
            unsafe { std::env::set_var(key, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_variables_and_junk_is_refused_with_its_line() {
        let text = "# bazaar\n\nBAZAAR_BROKER_URL=nats://127.0.0.1:4222\nBAZAAR_DATA = \"/var/lib/bazaar\"\n";
        assert_eq!(
            parse("f", text).unwrap(),
            vec![
                ("BAZAAR_BROKER_URL".to_string(), "nats://127.0.0.1:4222".to_string()),
                ("BAZAAR_DATA".to_string(), "/var/lib/bazaar".to_string()),
            ]
        );
        let err = parse("f", "BAZAAR_DATA=x\nbroker = nats\n").unwrap_err().to_string();
        assert_eq!(err, "f:2: expected BAZAAR_NAME=value, found `broker = nats`");
    }

    #[test]
    fn the_file_is_found_in_flags_or_environment() {
        let args: Vec<String> = ["bazaar", "--config", "a.env", "up"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(named(&args).as_deref(), Some("a.env"));
        let args: Vec<String> = ["bazaar", "up", "--config=b.env"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(named(&args).as_deref(), Some("b.env"));
    }
}
