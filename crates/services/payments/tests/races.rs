//! Payment commands that arrive at once: the saga resends a command it heard nothing about
//! with a new event id (so the inbox lets each copy through), and two replicas or two
//! consumer tasks handle the copies side by side. On PostgreSQL (READ COMMITTED) they really
//! run at once; on SQLite the write lock queues them. Whatever the engine, money moves once,
//! every copy gets the first copy's answer, and the ledger balances. The tables refuse a
//! second refund of a payment, or one larger than what was captured, whatever the code does.

mod support;

use bazaar_kit::{consumer::HandlerError, envelope::Envelope, store};
use bazaar_saga::SagaReply;
use futures_util::future::join_all;
use support::{pay, refund, welcome, Payments};
use uuid::Uuid;

/// Copies handled at once.
const COPIES: usize = 8;

/// Handles every command at once, each in its own transaction.
async fn at_once(pay: &Payments, commands: &[Envelope]) -> Vec<Result<SagaReply, HandlerError>> {
    join_all(commands.iter().map(|c| pay.handle(c))).await
}

/// Every copy was handled (none failed on a lost race) and answered `ok`; their data.
#[track_caller]
fn all_ok(pay: &Payments, replies: Vec<Result<SagaReply, HandlerError>>) -> Vec<serde_json::Value> {
    replies
        .into_iter()
        .map(|reply| match reply {
            Ok(reply) => {
                assert!(reply.ok, "{}: refused: {:?}", pay.engine(), reply.reason);
                reply.data
            }
            Err(e) => panic!("{}: a copy failed instead of answering: {e}", pay.engine()),
        })
        .collect()
}

#[tokio::test]
async fn copies_of_a_charge_at_once_take_the_money_once_and_answer_alike() {
    for payments in support::on_both_engines().await {
        let customer = payments.customer().await;
        let order = Uuid::now_v7();
        let copies: Vec<Envelope> = (0..COPIES).map(|_| pay(order, customer.id, 700)).collect();

        let answers = all_ok(&payments, at_once(&payments, &copies).await);

        assert!(
            answers.iter().all(|a| a == &answers[0]),
            "{}: one payment id: {answers:?}",
            payments.engine()
        );
        assert_eq!(
            payments.wallet(customer.id).await,
            welcome() - 700,
            "{}",
            payments.engine()
        );
        assert_eq!(payments.revenue().await, 700, "{}", payments.engine());
        payments.assert_ledger_balances().await;
        payments.finish().await;
    }
}

#[tokio::test]
async fn copies_of_a_refund_at_once_give_the_money_back_once() {
    for payments in support::on_both_engines().await {
        let customer = payments.customer().await;
        let order = Uuid::now_v7();
        payments.ok(&pay(order, customer.id, 700)).await;
        // Another order's payment keeps revenue above this refund, so a second refund would
        // not be stopped by a balance: only the handler and the tables can stop it.
        payments.ok(&pay(Uuid::now_v7(), customer.id, 900)).await;
        let copies: Vec<Envelope> = (0..COPIES).map(|_| refund(order)).collect();

        all_ok(&payments, at_once(&payments, &copies).await);

        assert_eq!(
            payments.wallet(customer.id).await,
            welcome() - 900,
            "{}",
            payments.engine()
        );
        assert_eq!(payments.revenue().await, 900, "{}", payments.engine());
        assert_eq!(payments.payment(order).await.expect("a payment").0, "refunded");
        payments.assert_ledger_balances().await;
        payments.finish().await;
    }
}

#[tokio::test]
async fn a_refund_crossing_its_charge_leaves_the_wallet_whole() {
    for payments in support::on_both_engines().await {
        let customer = payments.customer().await;
        let order = Uuid::now_v7();
        let crossing: Vec<Envelope> = (0..COPIES)
            .map(|i| {
                if i % 2 == 0 {
                    pay(order, customer.id, 700)
                } else {
                    refund(order)
                }
            })
            .collect();

        let replies = at_once(&payments, &crossing).await;

        for reply in &replies {
            if let Err(e) = reply {
                panic!("{}: a copy failed instead of answering: {e}", payments.engine());
            }
        }
        // Whichever came first, once a refund has answered no money stays taken, and a later
        // refund changes nothing.
        assert!(payments.handle(&refund(order)).await.expect("handled").ok);
        assert_eq!(payments.wallet(customer.id).await, welcome(), "{}", payments.engine());
        assert_eq!(payments.revenue().await, 0, "{}", payments.engine());
        payments.assert_ledger_balances().await;
        payments.finish().await;
    }
}

#[tokio::test]
async fn charges_of_one_wallet_at_once_never_spend_more_than_it_holds() {
    for payments in support::on_both_engines().await {
        let customer = payments.customer().await;
        let price = welcome() / 3 + 1;
        let orders: Vec<Envelope> = (0..COPIES).map(|_| pay(Uuid::now_v7(), customer.id, price)).collect();

        let replies = at_once(&payments, &orders).await;

        let mut paid = 0;
        for reply in replies {
            match reply {
                Ok(r) if r.ok => paid += 1,
                Ok(r) => assert!(
                    r.reason.as_deref().unwrap_or_default().contains("insufficient funds"),
                    "{r:?}"
                ),
                Err(e) => panic!("{}: a charge failed instead of answering: {e}", payments.engine()),
            }
        }
        assert_eq!(paid, 2, "{}: two fit, the third would overdraw", payments.engine());
        assert_eq!(
            payments.wallet(customer.id).await,
            welcome() - 2 * price,
            "{}",
            payments.engine()
        );
        payments.assert_ledger_balances().await;
        payments.finish().await;
    }
}

#[tokio::test]
async fn the_tables_refuse_a_second_refund_of_a_payment() {
    for payments in support::on_both_engines().await {
        let customer = payments.customer().await;
        let order = Uuid::now_v7();
        payments.ok(&pay(order, customer.id, 700)).await;
        payments.ok(&refund(order)).await;

        // Bypass the handler: what the database itself allows.
        let mut tx = payments.rt.store.begin().await.expect("begin");
        let again = bazaar_payments::ledger::transfer(
            &mut tx,
            bazaar_payments::ledger::REVENUE,
            &bazaar_payments::ledger::wallet(&customer.id),
            700,
            "refund",
            &order.to_string(),
        )
        .await;
        assert!(
            again.is_err(),
            "{}: a second refund entry was accepted",
            payments.engine()
        );
        drop(tx);

        let mut tx = payments.rt.store.begin().await.expect("begin");
        let more = store::query("UPDATE payment SET refunded_cents = amount_cents + 1 WHERE order_id = $1")
            .bind(order.to_string())
            .execute(&mut tx)
            .await;
        assert!(
            more.is_err(),
            "{}: a refund above the captured amount was accepted",
            payments.engine()
        );
        drop(tx);
        payments.finish().await;
    }
}
