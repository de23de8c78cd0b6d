//! Upgrading a payments store that earlier releases wrote. Before migration 12 the tables
//! did not refuse a second hold, release, payment or refund of one order, and copies of a
//! command handled at once on PostgreSQL could write one twice; such a store must still
//! upgrade, with the doubled money set aside where an operator can see it.

use bazaar_kit::{
    runtime,
    store::{self, Store},
};
use bazaar_payments::ledger;
use bazaar_testkit::TestDb;

/// Runs `sql` with no arguments.
async fn exec(store: &Store, sql: &str) {
    store::query(sql).execute(store).await.expect(sql);
}

/// The one integer `sql` selects.
async fn number(store: &Store, sql: &str) -> i64 {
    store::query(sql)
        .fetch_one(store)
        .await
        .expect(sql)
        .try_get::<i64, _>(0)
        .expect("a number")
}

/// One balanced transfer of `amount` from `from` to `to`, tagged `(kind, reference, at)`:
/// entries and balances, as releases before 12 wrote them.
async fn transfer(
    store: &Store,
    txn: &str,
    (from, to, amount): (&str, &str, i64),
    (kind, reference, at): (&str, &str, i64),
) {
    for (n, (account, signed)) in [(from, -amount), (to, amount)].into_iter().enumerate() {
        store::query(
            "INSERT INTO ledger_entry (id, txn_id, account_id, amount_cents, kind, reference, at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(format!("{txn}-{n}"))
        .bind(txn)
        .bind(account)
        .bind(signed)
        .bind(kind)
        .bind(reference)
        .bind(at)
        .execute(store)
        .await
        .expect("entry");
        store::query("UPDATE account SET balance_cents = balance_cents + $1 WHERE id = $2")
            .bind(signed)
            .bind(account)
            .execute(store)
            .await
            .expect("balance");
    }
}

#[tokio::test]
async fn a_store_with_doubled_ledger_entries_upgrades_and_sets_the_doubles_aside() {
    for db in TestDb::both("payments_upgrade").await {
        let all = runtime::migrations(&bazaar_payments::SERVICE).expect("migrations");
        let before: Vec<_> = all.iter().filter(|m| m.version < 12).cloned().collect();
        let store = db.open().await;
        store.migrate(&before).await.expect("the earlier release's tables");
        let wallet = "customer:ann";
        for account in [wallet, ledger::EXTERNAL, ledger::HOLDS, ledger::REVENUE] {
            exec(
                &store,
                &format!("INSERT INTO account (id, currency, created_at) VALUES ('{account}', 'EUR', 0)"),
            )
            .await;
        }
        transfer(
            &store,
            "t0",
            (ledger::EXTERNAL, wallet, 10_000),
            ("deposit", "welcome", 1),
        )
        .await;
        // The hold of order o1 written twice by copies at once, in the same millisecond;
        // then its payment, once.
        transfer(&store, "t1", (wallet, ledger::HOLDS, 700), ("hold", "o1", 2)).await;
        transfer(&store, "t2", (wallet, ledger::HOLDS, 700), ("hold", "o1", 2)).await;
        transfer(
            &store,
            "t3",
            (ledger::HOLDS, ledger::REVENUE, 700),
            ("payment", "o1", 3),
        )
        .await;
        // A refund of order o2 given twice, a moment apart.
        transfer(&store, "t4", (ledger::REVENUE, wallet, 300), ("refund", "o2", 4)).await;
        transfer(&store, "t5", (ledger::REVENUE, wallet, 300), ("refund", "o2", 5)).await;

        store
            .migrate(&all)
            .await
            .unwrap_or_else(|e| panic!("{}: a store with doubled entries does not upgrade: {e}", db.url));

        let balance = |account: &str| format!("SELECT balance_cents FROM account WHERE id = '{account}'");
        assert_eq!(number(&store, &balance(wallet)).await, 10_000 - 700 + 300, "{}", db.url);
        assert_eq!(number(&store, &balance(ledger::HOLDS)).await, 0, "{}", db.url);
        assert_eq!(number(&store, &balance(ledger::REVENUE)).await, 700 - 300, "{}", db.url);
        assert_eq!(
            number(
                &store,
                "SELECT CAST(COALESCE(SUM(amount_cents), 0) AS BIGINT) FROM ledger_entry"
            )
            .await,
            0,
            "{}: the ledger still balances",
            db.url
        );
        assert_eq!(
            number(
                &store,
                "SELECT COUNT(*) FROM ledger_entry_doubled WHERE txn_id IN ('t2', 't5')"
            )
            .await,
            4,
            "{}: both entries of each later copy are set aside",
            db.url
        );
        assert_eq!(
            number(&store, "SELECT COUNT(*) FROM ledger_entry_doubled").await,
            4,
            "{}: and nothing else",
            db.url
        );
        let again = store::query(
            "INSERT INTO ledger_entry (id, txn_id, account_id, amount_cents, kind, reference, at) VALUES ('x', 'x', 'customer:ann', -1, 'hold', 'o1', 9)",
        )
        .execute(&store)
        .await;
        assert!(again.is_err(), "{}: the table now refuses a second hold", db.url);
        store.close().await;
        db.drop_database().await;
    }
}

#[tokio::test]
async fn a_store_that_ran_the_first_migration_12_upgrades_to_an_empty_set_aside_table() {
    for db in TestDb::both("payments_upgrade12").await {
        let all = runtime::migrations(&bazaar_payments::SERVICE).expect("migrations");
        // Version 12 as the release that introduced it wrote it: no set-aside table.
        let mut before: Vec<_> = all.iter().filter(|m| m.version < 12).cloned().collect();
        before.push(store::Migration::new(
            12,
            "payments_once",
            "ALTER TABLE payment ADD COLUMN refunded_cents BIGINT NOT NULL DEFAULT 0
                CHECK (refunded_cents >= 0 AND refunded_cents <= amount_cents);
            CREATE UNIQUE INDEX ledger_once_per_order ON ledger_entry (kind, reference, account_id)
                WHERE kind IN ('hold', 'release', 'payment', 'refund');",
        ));
        let store = db.open().await;
        store.migrate(&before).await.expect("the earlier release's tables");
        store.migrate(&all).await.expect("upgrade");
        assert_eq!(
            number(&store, "SELECT COUNT(DISTINCT txn_id) FROM ledger_entry_doubled").await,
            0,
            "{}",
            db.url
        );
        store.close().await;
        db.drop_database().await;
    }
}
