//! The idempotent inbox: a consumer group records each handled `eventId` in the same
//! transaction as its effects, so a redelivered event commits nothing twice.
//! Its table is created by [`crate::outbox::MIGRATIONS`]; the relay prunes old records.

use crate::store;
use crate::store::{now_millis, StoreError, Tx};

/// Records that `group` handles `event_id` in `tx`. `false` means it was handled before:
/// the caller must roll back and only ack.
pub async fn record(tx: &mut Tx, group: &str, event_id: &str) -> Result<bool, StoreError> {
    let done = store::query("INSERT INTO inbox (grp, event_id, handled_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
        .bind(group)
        .bind(event_id)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// True when `group` already handled `event_id` (committed), without recording anything.
pub async fn seen(tx: &mut Tx, group: &str, event_id: &str) -> Result<bool, StoreError> {
    Ok(
        store::query("SELECT 1 AS one FROM inbox WHERE grp = $1 AND event_id = $2")
            .bind(group)
            .bind(event_id)
            .fetch_optional(&mut *tx)
            .await?
            .is_some(),
    )
}
