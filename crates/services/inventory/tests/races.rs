//! Saga commands that arrive at once: the saga resends a command it heard nothing about with
//! a new event id (so the inbox lets each copy through), and two replicas or two consumer
//! tasks handle the copies side by side. On PostgreSQL (READ COMMITTED) they really run at
//! once; on SQLite the write lock queues them. Whatever the engine, a command's effect
//! happens once, every copy gets the first copy's answer, and the stock adds up.

mod support;

use bazaar_kit::{consumer::HandlerError, envelope::Envelope};
use bazaar_saga::SagaReply;
use futures_util::future::join_all;
use support::{commit, give_back, release, reserve, Inventory};
use uuid::Uuid;

/// Copies handled at once.
const COPIES: usize = 8;

/// Handles every command at once, each in its own transaction.
async fn at_once(inv: &Inventory, commands: &[Envelope]) -> Vec<Result<SagaReply, HandlerError>> {
    join_all(commands.iter().map(|c| inv.handle(c))).await
}

/// `COPIES` copies of one command, each with its own event id (as the saga resends them).
fn copies(make: impl Fn() -> Envelope) -> Vec<Envelope> {
    (0..COPIES).map(|_| make()).collect()
}

/// Every copy was handled (none failed on a lost race) and answered `ok`.
#[track_caller]
fn all_ok(inv: &Inventory, replies: &[Result<SagaReply, HandlerError>]) {
    for reply in replies {
        match reply {
            Ok(reply) => assert!(reply.ok, "{}: refused: {:?}", inv.engine(), reply.reason),
            Err(e) => panic!("{}: a copy failed instead of answering: {e}", inv.engine()),
        }
    }
}

#[tokio::test]
async fn copies_of_a_commit_at_once_take_the_units_off_the_shelf_once() {
    for inv in support::on_both_engines().await {
        let mug = inv.add_product("MUG", 100, 10).await;
        let order = Uuid::now_v7();
        inv.ok(&reserve(order, &[(mug, 2)])).await;
        // Another order's hold keeps `reserved` above this order's, so a second commit would
        // not trip the table's constraint: only the handler can stop it.
        inv.ok(&reserve(Uuid::now_v7(), &[(mug, 3)])).await;

        all_ok(&inv, &at_once(&inv, &copies(|| commit(order))).await);

        assert_eq!(
            inv.levels(mug).await,
            (5, 8, 3),
            "{}: (stock, on hand, reserved)",
            inv.engine()
        );
        inv.assert_stock_adds_up().await;
        inv.finish().await;
    }
}

#[tokio::test]
async fn copies_of_a_release_at_once_give_the_units_back_once() {
    for inv in support::on_both_engines().await {
        let mug = inv.add_product("MUG", 100, 10).await;
        let order = Uuid::now_v7();
        inv.ok(&reserve(order, &[(mug, 2)])).await;
        inv.ok(&reserve(Uuid::now_v7(), &[(mug, 3)])).await;

        all_ok(&inv, &at_once(&inv, &copies(|| release(order))).await);

        assert_eq!(
            inv.levels(mug).await,
            (7, 10, 3),
            "{}: (stock, on hand, reserved)",
            inv.engine()
        );
        inv.assert_stock_adds_up().await;
        inv.finish().await;
    }
}

#[tokio::test]
async fn copies_of_a_return_at_once_put_a_cancelled_sale_back_on_the_shelf_once() {
    for inv in support::on_both_engines().await {
        let mug = inv.add_product("MUG", 100, 10).await;
        let order = Uuid::now_v7();
        inv.ok(&reserve(order, &[(mug, 2)])).await;
        inv.ok(&commit(order)).await;
        inv.ok(&reserve(Uuid::now_v7(), &[(mug, 3)])).await;

        all_ok(&inv, &at_once(&inv, &copies(|| give_back(order))).await);

        assert_eq!(
            inv.levels(mug).await,
            (7, 10, 3),
            "{}: (stock, on hand, reserved)",
            inv.engine()
        );
        inv.assert_stock_adds_up().await;
        let never_sold = Uuid::now_v7();
        inv.ok(&reserve(never_sold, &[(mug, 1)])).await;
        let refused = inv.refused(&give_back(never_sold)).await;
        assert!(refused.contains("nothing was sold"), "{}: {refused}", inv.engine());
        let refused = inv.refused(&release(order)).await;
        assert!(refused.contains("returned"), "{}: {refused}", inv.engine());
        inv.finish().await;
    }
}

#[tokio::test]
async fn copies_of_a_reserve_at_once_hold_the_units_once_and_answer_alike() {
    for inv in support::on_both_engines().await {
        let mug = inv.add_product("MUG", 250, 10).await;
        let order = Uuid::now_v7();

        let replies = at_once(&inv, &copies(|| reserve(order, &[(mug, 3)]))).await;

        all_ok(&inv, &replies);
        let first = &replies[0].as_ref().expect("handled").data;
        for reply in &replies {
            assert_eq!(
                &reply.as_ref().expect("handled").data,
                first,
                "{}: one answer",
                inv.engine()
            );
        }
        assert_eq!(inv.levels(mug).await, (7, 10, 3), "{}: held once", inv.engine());
        inv.assert_stock_adds_up().await;
        inv.finish().await;
    }
}

#[tokio::test]
async fn orders_reserving_the_last_units_at_once_are_refused_not_failed() {
    for inv in support::on_both_engines().await {
        let mug = inv.add_product("MUG", 100, 5).await;
        let orders: Vec<Envelope> = (0..COPIES).map(|_| reserve(Uuid::now_v7(), &[(mug, 1)])).collect();

        let replies = at_once(&inv, &orders).await;

        let mut held = 0;
        for reply in &replies {
            match reply {
                Ok(r) if r.ok => held += 1,
                Ok(r) => {
                    let reason = r.reason.clone().unwrap_or_default();
                    assert!(reason.contains("insufficient stock"), "{}: {reason}", inv.engine());
                }
                Err(e) => panic!("{}: a reserve failed instead of answering: {e}", inv.engine()),
            }
        }
        assert_eq!(held, 5, "{}: every unit held, none twice", inv.engine());
        assert_eq!(inv.levels(mug).await, (0, 5, 5), "{}", inv.engine());
        inv.assert_stock_adds_up().await;
        inv.finish().await;
    }
}

#[tokio::test]
async fn a_release_crossing_a_commit_applies_exactly_one_of_them() {
    for inv in support::on_both_engines().await {
        let mug = inv.add_product("MUG", 100, 10).await;
        let order = Uuid::now_v7();
        inv.ok(&reserve(order, &[(mug, 2)])).await;
        inv.ok(&reserve(Uuid::now_v7(), &[(mug, 3)])).await;
        let crossing: Vec<Envelope> = (0..COPIES)
            .map(|i| if i % 2 == 0 { commit(order) } else { release(order) })
            .collect();

        let replies = at_once(&inv, &crossing).await;

        for reply in &replies {
            if let Err(e) = reply {
                panic!("{}: a copy failed instead of answering: {e}", inv.engine());
            }
        }
        let levels = inv.levels(mug).await;
        assert!(
            levels == (5, 8, 3) || levels == (7, 10, 3),
            "{}: sold or given back, once: {levels:?}",
            inv.engine()
        );
        inv.assert_stock_adds_up().await;
        inv.finish().await;
    }
}

#[tokio::test]
async fn a_release_crossing_its_reserve_leaves_nothing_held() {
    for inv in support::on_both_engines().await {
        let mug = inv.add_product("MUG", 100, 10).await;
        let order = Uuid::now_v7();
        let crossing: Vec<Envelope> = (0..COPIES)
            .map(|i| {
                if i % 2 == 0 {
                    reserve(order, &[(mug, 2)])
                } else {
                    release(order)
                }
            })
            .collect();

        let replies = at_once(&inv, &crossing).await;

        for reply in &replies {
            if let Err(e) = reply {
                panic!("{}: a copy failed instead of answering: {e}", inv.engine());
            }
        }
        // Released after holding, or tombstoned before: either way nothing stays held once a
        // release has answered, and a reserve after the tombstone is refused.
        let again = inv.handle(&release(order)).await.expect("handled");
        assert!(again.ok, "{}: {:?}", inv.engine(), again.reason);
        assert_eq!(inv.levels(mug).await, (10, 10, 0), "{}", inv.engine());
        inv.assert_stock_adds_up().await;
        inv.finish().await;
    }
}
