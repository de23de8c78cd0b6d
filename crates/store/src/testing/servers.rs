//! The servers some tests need (PostgreSQL, NATS, Redis), found through environment
//! variables. A test that finds one unset skips the work that needs it, says so, and leaves
//! a note for the run; the run's last test (this module's; see `.config/nextest.toml`) counts the notes
//! into one line, so a run on a machine without servers ends by saying what it did not test and
//! how to test it.

use std::path::PathBuf;

/// A server some tests need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Server {
    /// PostgreSQL, for the stores.
    Postgres,
    /// NATS with JetStream, for the broker.
    Nats,
    /// Redis, for the gateway's shared rate limits.
    Redis,
}

impl Server {
    /// The environment variable that points tests at it.
    pub fn var(self) -> &'static str {
        match self {
            Server::Postgres => "BAZAAR_TEST_POSTGRES_URL",
            Server::Nats => "BAZAAR_TEST_NATS_URL",
            Server::Redis => "BAZAAR_TEST_REDIS_URL",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Server::Postgres => "PostgreSQL",
            Server::Nats => "NATS",
            Server::Redis => "Redis",
        }
    }
}

/// The URL of `server`, or `None` after saying that `what` is skipped for want of it.
pub fn url(server: Server, what: &str) -> Option<String> {
    urls([server], what).map(|[url]| url)
}

/// The URLs of `servers` in their order, or `None` after saying that `what` is skipped for
/// want of those unset (and noting it for the run's summary).
pub fn urls<const N: usize>(servers: [Server; N], what: &str) -> Option<[String; N]> {
    let found = servers.map(|s| std::env::var(s.var()).ok().filter(|url| !url.is_empty()));
    let missing: Vec<Server> = servers
        .iter()
        .zip(&found)
        .filter(|(_, url)| url.is_none())
        .map(|(s, _)| *s)
        .collect();
    if missing.is_empty() {
        return Some(found.map(Option::unwrap_or_default));
    }
    let vars: Vec<&str> = missing.iter().map(|s| s.var()).collect();
    eprintln!("SKIPPED {what} (set {} to run it)", vars.join(" and "));
    note_skip(&missing);
    None
}

/// Where this run's skip notes go: one directory per nextest run, none outside nextest.
fn notes_dir() -> Option<PathBuf> {
    let run = std::env::var("NEXTEST_RUN_ID").ok().filter(|id| !id.is_empty())?;
    Some(std::env::temp_dir().join("bazaar-test-skips").join(run))
}

/// Notes that the running test skipped work for want of `missing`. A note is best effort:
/// failing to write it must not fail the test.
fn note_skip(missing: &[Server]) {
    let Some(dir) = notes_dir() else { return };
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let test = std::thread::current().name().unwrap_or("unnamed").to_string();
    let file = format!("{binary}--{test}").replace(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_', "_");
    let names: Vec<&str> = missing.iter().map(|s| s.name()).collect();
    let note = format!("{}\n", names.join(" "));
    let _ = std::fs::create_dir_all(&dir).and_then(|()| {
        use std::io::Write;
        // Appended: a test that skips two parts leaves both.
        let mut notes = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(file))?;
        notes.write_all(note.as_bytes())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The server a note names.
    fn from_name(name: &str) -> Option<Server> {
        [Server::Postgres, Server::Nats, Server::Redis]
            .into_iter()
            .find(|s| s.name() == name)
    }

    /// The one line that sums up a run's notes (each the names of the servers a test lacked).
    fn summary(notes: &[String]) -> String {
        let mut per_server: BTreeMap<Server, usize> = BTreeMap::new();
        for note in notes {
            let lacked: BTreeSet<Server> = note.split_whitespace().filter_map(from_name).collect();
            for server in lacked {
                *per_server.entry(server).or_default() += 1;
            }
        }
        if per_server.is_empty() {
            return "no test skipped work for want of a server: PostgreSQL, NATS and Redis were all set".into();
        }
        let counts: Vec<String> = per_server
            .iter()
            .map(|(s, n)| format!("{n} needed {} ({})", s.name(), s.var()))
            .collect();
        let tests = notes.len();
        let plural = if tests == 1 { "test" } else { "tests" };
        format!(
            "{tests} {plural} skipped work for want of a server: {}; set those variables to servers of yours, or run .ci/run, which starts them and runs every test",
            counts.join(", ")
        )
    }

    /// This run's notes, read and removed.
    fn take_notes(dir: &Path) -> Vec<String> {
        let notes = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(dir);
        notes
    }

    #[test]
    fn the_summary_counts_each_server_a_skipped_test_lacked() {
        let notes = ["PostgreSQL".to_string(), "PostgreSQL NATS".into(), "Redis".into()];
        assert_eq!(
            summary(&notes),
            "3 tests skipped work for want of a server: 2 needed PostgreSQL (BAZAAR_TEST_POSTGRES_URL), \
             1 needed NATS (BAZAAR_TEST_NATS_URL), 1 needed Redis (BAZAAR_TEST_REDIS_URL); set those variables \
             to servers of yours, or run .ci/run, which starts them and runs every test"
        );
        assert!(summary(&[]).starts_with("no test skipped"));
    }

    /// Runs last in a nextest run (priority -100, output shown at the end): every other test
    /// has started by then, and a test decides to skip as it starts, so waiting a moment
    /// lets the last of them leave their notes.
    #[test]
    fn the_run_ends_by_counting_the_tests_skipped_for_want_of_a_server() {
        let Some(dir) = notes_dir() else { return };
        std::thread::sleep(std::time::Duration::from_secs(2));
        println!("{}", summary(&take_notes(&dir)));
    }
}
