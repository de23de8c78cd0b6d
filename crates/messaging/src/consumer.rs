//! Runs a handler over a subscription: on SQLite each fetched batch in one store transaction
//! (group commit), each event under a savepoint that also records it in the inbox and holds
//! the handler's outbox events; on PostgreSQL one transaction per event. Retries with
//! backoff, and dead-letters what cannot be handled.
//!
//! A delivery is acked only after its transaction commits, so a crash anywhere redelivers
//! it, and the inbox makes the second run a no-op: effectively once in the data. A failing
//! event is rolled back to its savepoint alone; the rest of its batch commits.

use crate::store;
use std::{sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::{
    broker::{Broker, BrokerError, DeadLetter, Delivery, SharedBroker, SubscribeOptions},
    envelope::Envelope,
    inbox,
    outbox::Outbox,
    resilience::Backoff,
    shutdown::Shutdown,
    store::{Dialect, StoreError, Tx},
};

/// Why a handler did not handle an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later (a database hiccup, a peer down).
    #[error("{0}")]
    Transient(String),
    /// Will never succeed (unknown event type, payload that breaks its schema): dead-letter now.
    #[error("{0}")]
    Poison(String),
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        HandlerError::Transient(e.to_string())
    }
}

impl From<bazaar_core::saga::NotASagaCommand> for HandlerError {
    fn from(e: bazaar_core::saga::NotASagaCommand) -> Self {
        HandlerError::Poison(e.to_string())
    }
}

impl From<crate::envelope::EnvelopeError> for HandlerError {
    fn from(e: crate::envelope::EnvelopeError) -> Self {
        HandlerError::Poison(e.to_string())
    }
}

/// Handles one event inside the transaction the runner opened; outbox rows added to `tx`
/// commit with it.
pub trait Handler: Send + Sync + 'static {
    /// Applies `event`; an error rolls the transaction back.
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>>;

    /// Called after the transaction that handled `event` committed, e.g. to wake readers
    /// waiting for its effect. Must not fail or block.
    fn committed(&self, _event: &Envelope) {}

    /// Called, in a transaction of its own, when `event` is dead-lettered for `reason`: to
    /// tell whoever waits on it (a saga participant answers its orchestrator) that it will
    /// never be handled. Nothing by default.
    fn dead<'a>(
        &'a self,
        _tx: &'a mut Tx,
        _event: &'a Envelope,
        _reason: &'a str,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Ok(()) })
    }
}

/// Where and how a consumer group reads.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The consumer group; every instance of a service uses the same one.
    pub group: String,
    /// The topic to read.
    pub topic: String,
    /// Deliveries tried before the message is dead-lettered.
    pub max_attempts: u32,
    /// A delivery not settled within this time is redelivered (the handler died).
    pub ack_wait: Duration,
    /// Runner tasks in this process competing for the group's messages.
    pub tasks: usize,
    /// Schemas a payload must match before the handler sees it; one that does not is
    /// dead-lettered with the schema error.
    pub contract: Option<Arc<bazaar_core::message::Contract>>,
}

impl ConsumerConfig {
    /// Defaults: 8 attempts, 10 s ack wait (handlers are short transactions), one task.
    pub fn new(group: impl Into<String>, topic: impl Into<String>) -> Self {
        ConsumerConfig {
            group: group.into(),
            topic: topic.into(),
            max_attempts: 8,
            ack_wait: Duration::from_secs(10),
            tasks: 1,
            contract: None,
        }
    }
}

/// Deliveries leased per fetch and handled in one transaction: every lease counts an
/// attempt, so a modest batch keeps a crash from spending many messages' attempts, and the
/// batch well inside the ack wait.
const FETCH: usize = 16;

/// How often a runner reports its group's lag (`bazaar_consumer_lag`).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Backoff before the next attempt: 100 ms doubling, capped at 10 s.
pub const RETRY_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

/// Starts `config.tasks` runners; they stop after finishing their current batch once
/// `shutdown` fires.
pub fn spawn(
    outbox: Outbox,
    broker: SharedBroker,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    shutdown: Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..config.tasks.max(1))
        .map(|_| {
            let runner = Runner {
                outbox: outbox.clone(),
                broker: broker.clone(),
                config: config.clone(),
                handler: handler.clone(),
            };
            tokio::spawn(runner.run(shutdown.clone()))
        })
        .collect()
}

struct Runner {
    outbox: Outbox,
    broker: SharedBroker,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
}

/// What became of one delivery.
enum Outcome {
    Handled,
    Duplicate,
    Retry(String),
    Dead(String),
}

impl Runner {
    async fn run(self, mut shutdown: Shutdown) {
        let options = SubscribeOptions {
            ack_wait: self.config.ack_wait,
        };
        let mut failures = 0u32;
        let mut subscription = loop {
            match self
                .broker
                .subscribe(&self.config.topic, &self.config.group, options)
                .await
            {
                Ok(s) => break s,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(topic = %self.config.topic, group = %self.config.group, error = %e, "subscribe failed; retrying");
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep(RETRY_BACKOFF.delay(failures)) => {}
                    }
                }
            }
        };
        failures = 0;
        let mut lag_checked = std::time::Instant::now() - LAG_EVERY;
        loop {
            if shutdown.is_triggered() {
                return;
            }
            if lag_checked.elapsed() >= LAG_EVERY {
                lag_checked = std::time::Instant::now();
                if let Ok(lag) = self.broker.pending(&self.config.topic, &self.config.group).await {
                    metrics::gauge!("bazaar_consumer_lag", "topic" => self.config.topic.clone(), "group" => self.config.group.clone())
                        .set(lag as f64);
                }
            }
            let batch = tokio::select! {
                _ = shutdown.wait() => return,
                b = subscription.fetch(FETCH, Duration::from_secs(1)) => b,
            };
            let deliveries = match batch {
                Ok(d) => {
                    failures = 0;
                    d
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(topic = %self.config.topic, error = %e, "fetch failed; retrying");
                    tokio::select! {
                        _ = shutdown.wait() => return,
                        _ = tokio::time::sleep(RETRY_BACKOFF.delay(failures)) => {}
                    }
                    continue;
                }
            };
            let fetched = tokio::time::Instant::now();
            let partial = !deliveries.is_empty() && deliveries.len() < FETCH;
            self.settle_batch(deliveries).await;
            // As the relay does: while messages trickle in, the next ones gather for a moment
            // and share one transaction instead of each paying for its own.
            if partial {
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep_until(fetched + crate::outbox::COALESCE) => {}
                }
            }
        }
    }

    /// Handles a fetched batch in one store transaction (group commit): each event under a
    /// savepoint, so a failing one is rolled back alone, then one commit, then the acks (all
    /// at once). A
    /// crash before the commit redelivers the whole batch; the inbox makes that harmless.
    async fn settle_batch(&self, deliveries: Vec<Delivery>) {
        let group = &self.config.group;
        let topic = &self.config.topic;
        let mut work = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            if delivery.attempt > 1 {
                metrics::counter!("bazaar_consumer_redeliveries_total", "topic" => topic.clone(), "group" => group.clone())
                    .increment(1);
            }
            if delivery.attempt > self.config.max_attempts {
                let reason = format!(
                    "gave up after {} attempts: {}",
                    delivery.attempt - 1,
                    delivery
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "no ack within the ack wait".into())
                );
                self.park(delivery, reason).await;
                continue;
            }
            match Envelope::from_slice(&delivery.message.body) {
                Err(e) => self.park(delivery, e.to_string()).await,
                Ok(event) => match self.config.contract.as_ref().map(|c| c.check(&event)) {
                    Some(Err(reason)) => self.park(delivery, reason).await,
                    _ => work.push((delivery, event)),
                },
            }
        }
        if work.is_empty() {
            return;
        }
        let events: Vec<&Envelope> = work.iter().map(|(_, event)| event).collect();
        let outcomes = apply_all(&self.outbox, group, self.handler.as_ref(), &events).await;
        // Settled together: the embedded broker writes acks that arrive at once in one
        // statement, and NATS pipelines them.
        let settling = work.into_iter().zip(outcomes).map(|((delivery, event), outcome)| {
            if matches!(outcome, Outcome::Handled) {
                self.handler.committed(&event);
            }
            self.finish(delivery, outcome)
        });
        futures_util::future::join_all(settling).await;
    }

    /// Acks, retries or parks one delivery as its outcome says.
    async fn finish(&self, delivery: Delivery, outcome: Outcome) {
        let group = &self.config.group;
        let topic = &self.config.topic;
        let settled = match outcome {
            Outcome::Handled | Outcome::Duplicate => {
                metrics::counter!("bazaar_consumer_handled_total", "topic" => topic.clone(), "group" => group.clone())
                    .increment(1);
                delivery.ack().await
            }
            Outcome::Retry(reason) if delivery.attempt < self.config.max_attempts => {
                tracing::warn!(topic = %topic, group = %group, attempt = delivery.attempt, error = %reason, "handler failed; will retry");
                let delay = RETRY_BACKOFF.delay(delivery.attempt);
                delivery.nack(delay, reason).await
            }
            Outcome::Retry(reason) => {
                let reason = format!("gave up after {} attempts: {reason}", delivery.attempt);
                self.park(delivery, reason).await;
                return;
            }
            Outcome::Dead(reason) => {
                self.park(delivery, reason).await;
                return;
            }
        };
        if let Err(e) = settled {
            // The broker redelivers it; the inbox turns that into a no-op.
            tracing::warn!(topic = %topic, error = %e, "could not settle delivery");
        }
    }

    async fn park(&self, delivery: Delivery, reason: String) {
        tracing::error!(topic = %self.config.topic, group = %self.config.group, msg_id = %delivery.message.msg_id, %reason, "dead-lettering message");
        if let Ok(event) = Envelope::from_slice(&delivery.message.body) {
            // Told before parking: a crash between the two parks it again and tells again,
            // which a saga takes as the duplicate it is.
            if let Err(e) = self.tell_dead(&event, &reason).await {
                tracing::warn!(topic = %self.config.topic, error = %e, "could not tell that a message was dead-lettered");
            }
        }
        if let Err(e) = DeadLetter::park(self.broker.as_ref(), &self.config.group, delivery, reason).await {
            tracing::warn!(error = %e, "could not dead-letter; it will be redelivered");
        }
    }

    /// Runs the handler's [`Handler::dead`] for `event` in a transaction of its own, unless
    /// the event was handled after all (a copy whose ack was lost ran out of attempts).
    async fn tell_dead(&self, event: &Envelope, reason: &str) -> Result<(), HandlerError> {
        let mut tx = self.outbox.store().begin().await?;
        if inbox::seen(&mut tx, &self.config.group, &event.event_id.to_string()).await? {
            return Ok(());
        }
        self.handler.dead(&mut tx, event, reason).await?;
        self.outbox.commit(tx).await?;
        Ok(())
    }
}

/// Handles `event` once for `group`: the inbox records it and the handler's effects commit
/// in one transaction (a duplicate changes nothing), inside the event's trace and
/// correlation id.
async fn apply(outbox: &Outbox, group: &str, handler: &dyn Handler, event: &Envelope) -> Outcome {
    in_event_scope(event, apply_in_span(outbox, group, handler, event)).await
}

async fn apply_in_span(outbox: &Outbox, group: &str, handler: &dyn Handler, event: &Envelope) -> Outcome {
    let mut tx = match outbox.store().begin().await {
        Ok(tx) => tx,
        Err(e) => return Outcome::Retry(e.to_string()),
    };
    match inbox::record(&mut tx, group, &event.event_id.to_string()).await {
        Ok(true) => {}
        Ok(false) => {
            let _ = tx.rollback().await;
            return Outcome::Duplicate;
        }
        Err(e) => return Outcome::Retry(e.to_string()),
    }
    match handler.handle(&mut tx, event).await {
        Ok(()) => match outbox.commit(tx).await {
            Ok(()) => {
                tracing::info!(%group, "handled");
                handler.committed(event);
                Outcome::Handled
            }
            Err(e) => Outcome::Retry(e.to_string()),
        },
        Err(HandlerError::Transient(reason)) => {
            let _ = tx.rollback().await;
            Outcome::Retry(reason)
        }
        Err(HandlerError::Poison(reason)) => {
            let _ = tx.rollback().await;
            Outcome::Dead(reason)
        }
    }
}

/// Handles `events` for `group` in one transaction, each under a savepoint: a duplicate or
/// failing event leaves nothing behind, the others commit together. `Handled` means
/// committed; when the commit fails every event that was to be handled is retried.
async fn apply_all(outbox: &Outbox, group: &str, handler: &dyn Handler, events: &[&Envelope]) -> Vec<Outcome> {
    if events.len() == 1 {
        return vec![apply(outbox, group, handler, events[0]).await];
    }
    // On PostgreSQL, writers run side by side: a batch would hold the row locks of all its
    // events while other consumers' batches take the same rows in another order, and
    // deadlock (measured: p99 2 s in the saga bench). There each event commits on its own,
    // and the batch's aggregates are handled at once, each its events in order: one after
    // another, a batch waited a dozen network round trips per event (a saga reply 44 ms).
    // Group commit is for SQLite, whose one writer at a time pays per transaction.
    if outbox.store().dialect() == Dialect::Postgres {
        return apply_by_aggregate(outbox, group, handler, events).await;
    }
    let mut tx = match outbox.store().begin().await {
        Ok(tx) => tx,
        Err(e) => return events.iter().map(|_| Outcome::Retry(e.to_string())).collect(),
    };
    let mut outcomes = Vec::with_capacity(events.len());
    for event in events {
        let outcome = match savepoint(&mut tx, "SAVEPOINT bazaar_event").await {
            Ok(()) => in_event_scope(event, apply_under_savepoint(&mut tx, group, handler, event)).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => {
                // The transaction itself broke: nothing of the batch commits.
                let _ = tx.rollback().await;
                return events.iter().map(|_| Outcome::Retry(e.to_string())).collect();
            }
        }
    }
    if let Err(e) = outbox.commit(tx).await {
        return outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Handled => Outcome::Retry(e.to_string()),
                other => other,
            })
            .collect();
    }
    for (event, outcome) in events.iter().zip(&outcomes) {
        if matches!(outcome, Outcome::Handled) {
            event_span(event).in_scope(|| tracing::info!(%group, "handled"));
        }
    }
    outcomes
}

/// Handles `events` each in a transaction of its own, the events of one aggregate in their
/// order and different aggregates concurrently; outcomes in the order of `events`.
async fn apply_by_aggregate(outbox: &Outbox, group: &str, handler: &dyn Handler, events: &[&Envelope]) -> Vec<Outcome> {
    // A batch holds at most `FETCH` events: a linear search finds an aggregate's lane.
    let mut lanes: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, event) in events.iter().enumerate() {
        match lanes.iter_mut().find(|(aggregate, _)| *aggregate == event.aggregate_id) {
            Some((_, lane)) => lane.push(i),
            None => lanes.push((&event.aggregate_id, vec![i])),
        }
    }
    let handled = futures_util::future::join_all(lanes.into_iter().map(|(_, lane)| async move {
        let mut outcomes = Vec::with_capacity(lane.len());
        for i in lane {
            outcomes.push((i, apply(outbox, group, handler, events[i]).await));
        }
        outcomes
    }))
    .await;
    let mut outcomes: Vec<(usize, Outcome)> = handled.into_iter().flatten().collect();
    outcomes.sort_unstable_by_key(|(i, _)| *i);
    outcomes.into_iter().map(|(_, outcome)| outcome).collect()
}

/// One event of a batch, inside the savepoint its caller opened; the savepoint is released
/// (kept) when the event was handled, rolled back otherwise. `Err` when the transaction
/// cannot go on.
async fn apply_under_savepoint(
    tx: &mut Tx,
    group: &str,
    handler: &dyn Handler,
    event: &Envelope,
) -> Result<Outcome, StoreError> {
    let outcome = match inbox::record(tx, group, &event.event_id.to_string()).await {
        Ok(true) => match handler.handle(tx, event).await {
            Ok(()) => Outcome::Handled,
            Err(HandlerError::Transient(reason)) => Outcome::Retry(reason),
            Err(HandlerError::Poison(reason)) => Outcome::Dead(reason),
        },
        Ok(false) => Outcome::Duplicate,
        Err(e) => Outcome::Retry(e.to_string()),
    };
    if !matches!(outcome, Outcome::Handled) {
        savepoint(tx, "ROLLBACK TO SAVEPOINT bazaar_event").await?;
    }
    savepoint(tx, "RELEASE SAVEPOINT bazaar_event").await?;
    Ok(outcome)
}

async fn savepoint(tx: &mut Tx, statement: &str) -> Result<(), StoreError> {
    store::query(statement).execute(&mut *tx).await?;
    Ok(())
}

/// The tracing span an event is handled in.
fn event_span(event: &Envelope) -> tracing::Span {
    tracing::info_span!(
        "handle",
        event_type = %event.event_type,
        event_id = %event.event_id,
        correlation_id = %event.metadata.correlation_id,
        traceparent = event.metadata.traceparent.as_deref().unwrap_or("")
    )
}

/// Runs `work` inside `event`'s span and correlation id, so its logs and outgoing calls
/// carry them.
async fn in_event_scope<T>(event: &Envelope, work: impl std::future::Future<Output = T>) -> T {
    let context = bazaar_core::context::RequestContext {
        correlation_id: event.metadata.correlation_id.clone(),
        traceparent: event.metadata.traceparent.clone(),
    };
    context.scope(work).instrument(event_span(event)).await
}

/// A dead letter of one group, as an operator lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct Parked {
    /// Its place in the dead-letter topic.
    pub seq: u64,
    /// What was set aside and why.
    pub letter: DeadLetter,
}

/// The dead letters `group` set aside from `topic`, oldest first (at most `limit`).
pub async fn dead_letters(
    broker: &dyn Broker,
    group: &str,
    topic: &str,
    limit: usize,
) -> Result<Vec<Parked>, BrokerError> {
    let messages = broker.read(&crate::broker::dlq_topic(topic), limit).await?;
    Ok(messages
        .into_iter()
        .filter_map(|m| {
            let letter: DeadLetter = serde_json::from_slice(&m.body).ok()?;
            (letter.group == group).then_some(Parked { seq: m.seq, letter })
        })
        .collect())
}

/// What replaying a dead letter did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replayed {
    /// The handler took it now; the dead letter is gone.
    Handled,
    /// The group had handled it meanwhile (its inbox says so); the dead letter is gone.
    AlreadyHandled,
}

/// Why a dead letter was not replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The group has no dead letter there (replayed already, or never).
    #[error("no dead letter #{seq} of {group} on {topic}")]
    NotFound {
        /// The group.
        group: String,
        /// The topic.
        topic: String,
        /// The place asked for.
        seq: u64,
    },
    /// The handler still fails; the dead letter stays for another try.
    #[error("it still fails: {0}")]
    StillFailing(String),
    /// The broker could not be read or changed.
    #[error("broker: {0}")]
    Broker(#[from] BrokerError),
}

/// Hands the dead letter at `seq` of `config`'s topic back to its own group's `handler`,
/// exactly as a delivery would be handled (contract, inbox, one transaction), and removes
/// it once handled. Publishing nothing, it needs no right on the topic beyond reading and
/// trimming the group's dead letters.
pub async fn replay(
    outbox: &Outbox,
    broker: &dyn Broker,
    config: &ConsumerConfig,
    handler: &dyn Handler,
    seq: u64,
) -> Result<Replayed, ReplayError> {
    let not_found = || ReplayError::NotFound {
        group: config.group.clone(),
        topic: config.topic.clone(),
        seq,
    };
    let parked = dead_letters(broker, &config.group, &config.topic, 10_000)
        .await?
        .into_iter()
        .find(|p| p.seq == seq)
        .ok_or_else(not_found)?;
    let event =
        Envelope::from_slice(parked.letter.body.as_bytes()).map_err(|e| ReplayError::StillFailing(e.to_string()))?;
    if let Some(Err(reason)) = config.contract.as_ref().map(|c| c.check(&event)) {
        return Err(ReplayError::StillFailing(reason));
    }
    let replayed = match apply(outbox, &config.group, handler, &event).await {
        Outcome::Handled => Replayed::Handled,
        Outcome::Duplicate => Replayed::AlreadyHandled,
        Outcome::Retry(reason) | Outcome::Dead(reason) => return Err(ReplayError::StillFailing(reason)),
    };
    broker.delete(&crate::broker::dlq_topic(&config.topic), seq).await?;
    tracing::info!(topic = %config.topic, group = %config.group, seq, ?replayed, "dead letter replayed");
    Ok(replayed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(RETRY_BACKOFF.delay(1), Duration::from_millis(200));
        assert!(RETRY_BACKOFF.delay(3) > RETRY_BACKOFF.delay(2));
        assert_eq!(RETRY_BACKOFF.delay(30), Duration::from_secs(10));
    }
}
