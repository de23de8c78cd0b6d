//! The double-entry ledger: every transaction's entries sum to zero.

use bazaar_kit::store;
use bazaar_kit::store::{now_millis, Tx};
use uuid::Uuid;

/// The merchant's revenue account.
pub const REVENUE: &str = "merchant:revenue";
/// Money set aside for a charge the payment provider has not answered yet.
pub const HOLDS: &str = "payments:holds";
/// The outside world, where deposits come from.
pub const EXTERNAL: &str = "external:deposits";

/// The wallet account of a customer.
pub fn wallet(customer: &Uuid) -> String {
    format!("customer:{customer}")
}

/// Creates `account` if it does not exist.
pub async fn open(tx: &mut Tx, account: &str, currency: &str) -> Result<bool, store::StoreError> {
    let done =
        store::query("INSERT INTO account (id, currency, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(account)
            .bind(currency)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// True when `account` exists.
pub async fn exists(tx: &mut Tx, account: &str) -> Result<bool, store::StoreError> {
    Ok(store::query("SELECT 1 AS one FROM account WHERE id = $1")
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?
        .is_some())
}

/// The balance of `account` in minor units (0 for an account not opened).
pub async fn balance<'c>(db: impl Into<store::Target<'c>>, account: &str) -> Result<i64, store::StoreError> {
    match store::query("SELECT balance_cents FROM account WHERE id = $1")
        .bind(account)
        .fetch_optional(db)
        .await?
    {
        Some(row) => row.try_get("balance_cents"),
        None => Ok(0),
    }
}

/// Locks `account`'s row until the transaction ends and reads its currency and balance;
/// `None` when it is not open. Two payments of one customer on PostgreSQL (READ COMMITTED)
/// cannot then both spend the same balance; SQLite's write transaction already serialises
/// them.
pub async fn lock(tx: &mut Tx, account: &str) -> Result<Option<(String, i64)>, store::StoreError> {
    let row = store::query("UPDATE account SET currency = currency WHERE id = $1 RETURNING currency, balance_cents")
        .bind(account)
        .fetch_optional(&mut *tx)
        .await?;
    row.map(|r| Ok((r.try_get("currency")?, r.try_get("balance_cents")?)))
        .transpose()
}

/// Moves `amount` from `from` to `to` as one balanced transaction, and both balances with it.
pub async fn transfer(
    tx: &mut Tx,
    from: &str,
    to: &str,
    amount: i64,
    kind: &str,
    reference: &str,
) -> Result<(), store::StoreError> {
    let txn = Uuid::now_v7().to_string();
    let now = now_millis();
    let mut moves = [(from, -amount), (to, amount)];
    // Accounts are locked in one order by every transfer, so two on PostgreSQL cannot each
    // hold the row the other waits for (a charge locks its wallet first, and wallets sort
    // first).
    moves.sort_by_key(|(account, _)| *account);
    for (account, signed) in moves {
        store::query(
            "INSERT INTO ledger_entry (id, txn_id, account_id, amount_cents, kind, reference, at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(Uuid::now_v7().to_string())
        .bind(&txn)
        .bind(account)
        .bind(signed)
        .bind(kind)
        .bind(reference)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        store::query("UPDATE account SET balance_cents = balance_cents + $1 WHERE id = $2")
            .bind(signed)
            .bind(account)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// How many accounts' kept balance differs from the sum of their entries (0 unless a write
/// bypassed [`transfer`]).
pub const DRIFTED_ACCOUNTS: &str = "SELECT COUNT(*) FROM account WHERE balance_cents <>
    (SELECT COALESCE(SUM(amount_cents), 0) FROM ledger_entry WHERE ledger_entry.account_id = account.id)";
