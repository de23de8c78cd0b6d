//! `bazaar-bench saga --soak SECONDS`: orders placed without pause on embedded defaults, with
//! each role's resident memory and the size of every store's bookkeeping (outbox, inbox,
//! broker log, saga history) read every tenth of the time, so growth over time shows.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use bazaar::load;
use bazaar_bench::harness::System;

use super::{load_args, up_options, SagaBenchArgs};

/// The tables whose rows are bookkeeping rather than business data.
const BOOKKEEPING: [&str; 5] = ["outbox", "inbox", "bus_messages", "bus_deliveries", "saga"];

/// One look at the running system.
struct Snapshot {
    at: Duration,
    /// The largest resident size of any role, and which.
    rss: (String, f64),
    /// Rows of each [`BOOKKEEPING`] table, summed over every store.
    rows: [i64; 5],
    /// Every store's file with its write-ahead log, in MiB.
    files: f64,
}

/// Runs the soak for `seconds`; the report's lines.
pub(super) async fn run(args: &SagaBenchArgs, bin: &Path, dir: &Path, seconds: u64) -> anyhow::Result<String> {
    // Credit enough that orders keep confirming all along instead of turning into cheap
    // cancellations once the customers' welcome credit is spent.
    let env = vec![("BAZAAR_WELCOME_CREDIT_CENTS".to_string(), "1000000000".to_string())];
    let mut system = System::start(up_options(bin, dir, env, None, None)).await?;
    let result = rounds(args, &system, seconds).await;
    // What was placed last still settles, and its emails go out, before the audit counts.
    let audit = system.audit(Duration::from_secs(120)).await;
    system.stop().await;
    let mut text = result?;
    match audit {
        Ok((true, _)) => text.push_str("\naudit after the soak: passed"),
        Ok((false, report)) => text.push_str(&format!("\naudit after the soak: FAILED\n{report}")),
        Err(e) => text.push_str(&format!("\naudit after the soak could not run: {e:#}")),
    }
    Ok(text)
}

async fn rounds(args: &SagaBenchArgs, system: &System, seconds: u64) -> anyhow::Result<String> {
    // One load for the whole soak (one sign-in, one set of customers: rounds would each
    // sign in again and meet the sign-in limits), with more orders than it can place in
    // the time; it is stopped when the time is up and what it placed settles before the
    // audit.
    let mut shape = args.shape.clone();
    shape.orders = usize::try_from(seconds.saturating_mul(5_000)).unwrap_or(usize::MAX);
    shape.timeout = seconds + 60;
    let load = load_args(&shape, system)?;
    let placing = tokio::spawn(async move { load::measure(&load).await });
    let started = Instant::now();
    let every = Duration::from_secs((seconds / 10).clamp(1, 60));
    let mut snapshots = vec![look(system, started)?];
    while started.elapsed() < Duration::from_secs(seconds) && !placing.is_finished() {
        tokio::time::sleep(every.min(Duration::from_secs(seconds).saturating_sub(started.elapsed()))).await;
        snapshots.push(look(system, started)?);
    }
    placing.abort();
    match placing.await {
        Ok(Err(e)) => return Err(e.context("the soak's load failed")),
        Ok(Ok(_)) => {}
        Err(e) if e.is_cancelled() => {}
        Err(e) => anyhow::bail!("the soak's load panicked: {e}"),
    }
    let mut text = format!(
        "soak: {seconds} s of orders from {} workers on embedded defaults; resident MiB of the largest role, bookkeeping rows summed over every store (saga rows are the orders placed)\n",
        args.shape.concurrency
    );
    text.push_str(&format!(
        "  {:>6} {:>22} {:>8} {:>8} {:>12} {:>14} {:>7} {:>9}\n",
        "s", "largest RSS MiB", "outbox", "inbox", "bus_messages", "bus_deliveries", "saga", "files MiB"
    ));
    // At most about a dozen lines: the first, the last and evenly between.
    let step = (snapshots.len() / 12).max(1);
    let last = snapshots.len() - 1;
    for (i, s) in snapshots.iter().enumerate() {
        if i % step != 0 && i != last {
            continue;
        }
        text.push_str(&format!(
            "  {:>6.0} {:>22} {:>8} {:>8} {:>12} {:>14} {:>7} {:>9.1}\n",
            s.at.as_secs_f64(),
            format!("{} {:.1}", s.rss.0, s.rss.1),
            s.rows[0],
            s.rows[1],
            s.rows[2],
            s.rows[3],
            s.rows[4],
            s.files
        ));
    }
    text.push_str(
        "retention: sent outbox rows 1 min (delivery never reads them again), inbox records 7 days \
         (longer than any republish), acked broker messages 2 min (the de-duplication window), \
         finished sagas kept as order history.",
    );
    Ok(text)
}

fn look(system: &System, started: Instant) -> anyhow::Result<Snapshot> {
    let rss = system
        .memory()
        .into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_else(|| ("?".into(), f64::NAN));
    let mut rows = [0i64; 5];
    let mut bytes = 0u64;
    let entries = std::fs::read_dir(system.data()).context("cannot list the data dir")?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".db") || name.ends_with(".db-wal") {
            bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
        }
        if !name.ends_with(".db") {
            continue;
        }
        let db = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {}", path.display()))?;
        db.busy_timeout(Duration::from_secs(5))?;
        for (i, table) in BOOKKEEPING.iter().enumerate() {
            let exists: bool = db.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [table],
                |r| r.get(0),
            )?;
            if exists {
                rows[i] += db.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0))?;
            }
        }
    }
    Ok(Snapshot {
        at: started.elapsed(),
        rss,
        rows,
        files: bytes as f64 / (1024.0 * 1024.0),
    })
}
