//! A durable orchestrated saga engine.
//!
//! A saga is an ordered list of [`Step`]s. A remote step sends an execute command through the
//! outbox to a participant and waits for its [`SagaReply`]; a failure reply (or a step that
//! stays silent past its deadline and retries) turns the saga around, and the compensating
//! commands of the steps already done are sent in reverse order. The saga's row changes only
//! in the same transaction as the outbox command it sends, so killing the orchestrator at
//! any instant loses nothing: on restart the deadline timer resends whatever was awaited.
//!
//! A flow is typed end to end: its steps are an enum ([`SagaStep`]), its context a struct
//! that each success reply's data is recorded into by the flow ([`SagaFlow::record`]), and a
//! participant answers with a [`Verdict`] through one adapter ([`Participates`]). What a step
//! needs and the context lacks is an error that names the saga, never a default.
//!
//! Replies are matched by (saga, step, phase), not by command id, so a reply to an earlier
//! attempt of the same step counts, and a duplicate or late reply finds the saga elsewhere
//! and changes nothing. Participants must therefore be idempotent by business key (e.g. the
//! order id), and a compensation arriving before its execute must leave a tombstone that
//! makes the late execute fail. A failed compensation leaves the saga where it was, so its
//! failure counts only for the latest send, once: a redelivered or late failure cannot move
//! the retry. A participant that gave up on the latest send (dead-lettered it after every
//! attempt failed, [`Verdict::GaveUp`]) turns a step that can be undone around, and stops
//! the pivot or a compensation as `stuck` with its reason, rather than resending forever.
//!
//! Several flows share one orchestrator's saga table and reply topic: each engine reads and
//! moves only sagas of its own kind, and [`Flows`] hands each reply to the engine of its
//! saga's flow. A running saga can be stopped at a safe point ([`SagaEngine::stop`]): before
//! its pivot it turns around, its current step included; past it, it runs to its end.

use std::{fmt::Debug, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;

use bazaar_core::{
    envelope::{Envelope, Metadata},
    resilience::Backoff,
    shutdown::Shutdown,
};
use bazaar_messaging::{
    consumer::{Handler, HandlerError},
    outbox::{self, Outbox},
};
use bazaar_store::{self as store, now_millis, Migration, StoreError, Tx};

/// The saga tables; include them in the orchestrator's migrations (version 2).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 2,
    name: "sagas",
    sql: "CREATE TABLE saga (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            step BIGINT NOT NULL,
            context TEXT NOT NULL,
            correlation_id TEXT NOT NULL,
            traceparent TEXT,
            attempts BIGINT NOT NULL,
            deadline BIGINT,
            command_id TEXT,
            error TEXT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        );
        CREATE INDEX saga_due ON saga (status, deadline);
        CREATE TABLE saga_history (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            saga_id TEXT NOT NULL,
            at BIGINT NOT NULL,
            step TEXT NOT NULL,
            entry TEXT NOT NULL
        );
        CREATE INDEX saga_history_saga ON saga_history (saga_id, id);",
}];

/// Compensations are retried this many times (with backoff) before the saga is `stuck`.
pub const COMPENSATION_ATTEMPTS: u32 = 12;

/// Where a saga is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SagaStatus {
    /// Executing steps forward.
    Running,
    /// Undoing completed steps in reverse.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every compensation succeeded.
    Compensated,
    /// A compensation kept failing; needs an operator (see [`SagaEngine::retry`]).
    Stuck,
}

impl SagaStatus {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::Stuck => "stuck",
        }
    }

    /// The status a stored or requested name means.
    pub fn parse(s: &str) -> Result<SagaStatus, StoreError> {
        Ok(match s {
            "running" => SagaStatus::Running,
            "compensating" => SagaStatus::Compensating,
            "completed" => SagaStatus::Completed,
            "compensated" => SagaStatus::Compensated,
            "stuck" => SagaStatus::Stuck,
            other => return Err(StoreError::Corrupt(format!("unknown saga status `{other}`"))),
        })
    }

    /// True when the saga will not move again by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SagaStatus::Completed | SagaStatus::Compensated | SagaStatus::Stuck
        )
    }
}

/// The steps of a flow: an enum whose variants name them on the wire and in the history.
pub trait SagaStep: Copy + Eq + Debug + Send + Sync + 'static {
    /// The step's name, unique within its flow; commands and replies carry it.
    fn name(self) -> &'static str;
}

/// One step of a saga: a command to a participant on `topic`, answered by a [`SagaReply`].
#[derive(Debug, Clone)]
pub struct Step<S> {
    /// Which step of the flow.
    pub step: S,
    /// Topic the participant consumes.
    pub topic: &'static str,
    /// The service that consumes it and answers: a reply from anyone else is dead-lettered.
    pub participant: &'static str,
    /// Event type of the execute command.
    pub execute: &'static str,
    /// Event type of the compensating command, if the step has effects to undo. A step with
    /// nothing to undo is the pivot: once sent it may have acted, so it is retried forward
    /// until it answers.
    pub compensate: Option<&'static str>,
    /// How long to wait for a reply before resending.
    pub timeout: Duration,
    /// Sends of the execute command before the step counts as failed (not for the pivot).
    pub max_attempts: u32,
}

/// A saga's persisted state, with the flow's context `C`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaState<C> {
    /// The saga id (for the order saga, the order id).
    pub id: String,
    /// Which flow it runs.
    pub kind: String,
    /// Where it is.
    pub status: SagaStatus,
    /// Index of the current step (-1 once compensation passed the first step).
    pub step: i64,
    /// Data the steps share: the start input and what each success reply recorded.
    pub context: C,
    /// The correlation id of the request that started it.
    pub correlation_id: String,
    /// The W3C trace context of the request that started it, carried into its commands.
    pub traceparent: Option<String>,
    /// Sends of the current command.
    pub attempts: u32,
    /// The id of the latest command sent; a failure reply counts only when it answers it.
    pub command_id: Option<String>,
    /// When the current wait ends (ms since the epoch).
    pub deadline: Option<i64>,
    /// The last failure, the reason for compensating.
    pub error: Option<String>,
}

/// One line of a saga's history.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct HistoryEntry {
    /// When (RFC 3339).
    pub at: String,
    /// The step it concerns.
    pub step: String,
    /// What happened.
    pub entry: String,
}

pub use bazaar_core::saga::{CommandHeader, SagaReply, Verdict};

/// Adds `source`'s reply with `verdict` to saga command `command` to the outbox, inside the
/// caller's transaction (nothing for [`Verdict::Later`]).
pub async fn answer(tx: &mut Tx, command: &Envelope, source: &str, verdict: Verdict) -> Result<(), HandlerError> {
    let header = CommandHeader::of(command)?;
    if let Some((topic, reply)) = header.reply(command, source, verdict) {
        outbox::add(tx, &topic, &reply).await?;
    }
    Ok(())
}

/// A saga participant: acts on the commands it receives and says what came of each.
pub trait Participant: Send + Sync + 'static {
    /// Acts on `command` inside the consumer's transaction. Must be idempotent by business
    /// key: a redelivered command answers as the first did.
    fn act<'a>(&'a self, tx: &'a mut Tx, command: &'a Envelope) -> BoxFuture<'a, Result<Verdict, HandlerError>>;
}

/// Runs a [`Participant`] as a consumer handler: reads the command, acts, and replies in the
/// same transaction; when the command is dead-lettered, replies that it gave up. A command
/// from anyone but the orchestrator, or one asking for its reply on another topic, is
/// dead-lettered before anything is done: whoever could publish to the participant's topic
/// must not steer it (nor make it publish where it may not).
pub struct Participates<P> {
    /// The replying service (the reply's `source`).
    pub source: &'static str,
    /// The orchestrator: the only `source` a command may carry.
    pub commands_from: &'static str,
    /// The only topic replies may go to.
    pub replies_on: &'static str,
    /// The participant.
    pub participant: P,
}

impl<P> Participates<P> {
    /// Refuses a command without a saga header, from anyone but the orchestrator, or asking
    /// for its reply elsewhere.
    fn check(&self, event: &Envelope) -> Result<(), HandlerError> {
        let header = CommandHeader::of(event)?;
        if event.metadata.source != self.commands_from {
            return Err(HandlerError::Poison(format!(
                "`{}` claims to come from {:?}; only {} sends commands here",
                event.event_type, event.metadata.source, self.commands_from
            )));
        }
        if header.reply_to != self.replies_on {
            return Err(HandlerError::Poison(format!(
                "`{}` asks for its reply on {:?}; {} replies only on {}",
                event.event_type, header.reply_to, self.source, self.replies_on
            )));
        }
        Ok(())
    }
}

impl<P: Participant> Handler for Participates<P> {
    fn handle<'a>(&'a self, tx: &'a mut Tx, event: &'a Envelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.check(event)?;
            let verdict = self.participant.act(tx, event).await?;
            answer(tx, event, self.source, verdict).await
        })
    }

    /// Tells the orchestrator that the command will never be done, unless the command would
    /// have been refused unread (a forged one must not stop a saga).
    fn dead<'a>(
        &'a self,
        tx: &'a mut Tx,
        event: &'a Envelope,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if self.check(event).is_err() {
                return Ok(());
            }
            let why = format!("{} gave up on `{}`: {reason}", self.source, event.event_type);
            answer(tx, event, self.source, Verdict::GaveUp(why)).await
        })
    }
}

/// A saga's definition and the hooks that tie it to the orchestrator's data.
pub trait SagaFlow: Send + Sync + 'static {
    /// The steps.
    type Step: SagaStep;
    /// What the steps share, stored as JSON with the saga.
    type Context: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static;
    /// The flow's name, stored with each saga.
    fn kind(&self) -> &'static str;
    /// The steps, in execution order.
    fn steps(&self) -> &[Step<Self::Step>];
    /// The payload of `step`'s command (the engine adds the [`CommandHeader`] fields), or
    /// what the context lacks for it.
    fn command(&self, step: Self::Step, compensation: bool, context: &Self::Context) -> Result<Value, String>;
    /// Records what a successful `step` reported in the context, or says why it does not fit.
    fn record(&self, step: Self::Step, context: &mut Self::Context, data: Value) -> Result<(), String>;
    /// Called in the same transaction when the saga reaches a final status.
    fn finished<'a>(
        &'a self,
        tx: &'a mut Tx,
        saga: &'a SagaState<Self::Context>,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// Runs sagas of one flow for an orchestrator.
pub struct SagaEngine<F: SagaFlow> {
    flow: F,
    outbox: Outbox,
    source: &'static str,
    reply_topic: String,
    reply_type: String,
    /// Extra wait before each resend of a command (and retry of a failed compensation).
    resend: Backoff,
}

impl<F: SagaFlow> SagaEngine<F> {
    /// An engine for `flow` whose participants reply on `reply_topic` with `reply_type` events.
    pub fn new(
        flow: F,
        outbox: Outbox,
        source: &'static str,
        reply_topic: impl Into<String>,
        reply_type: impl Into<String>,
    ) -> SagaEngine<F> {
        SagaEngine {
            flow,
            outbox,
            source,
            reply_topic: reply_topic.into(),
            reply_type: reply_type.into(),
            resend: RESEND_BACKOFF,
        }
    }

    /// The engine with `resend` as the backoff between resends (default 500 ms doubling to
    /// 30 s), for flows whose steps are paced faster or slower than the default.
    pub fn with_resend_backoff(mut self, resend: Backoff) -> SagaEngine<F> {
        self.resend = resend;
        self
    }

    /// Starts saga `id` with `context` inside the caller's transaction; commit it with
    /// [`Outbox::commit`] so the first command leaves at once.
    pub async fn start(
        &self,
        tx: &mut Tx,
        id: &str,
        context: F::Context,
        correlation_id: &str,
    ) -> Result<SagaState<F::Context>, HandlerError> {
        self.start_traced(tx, id, context, correlation_id, None).await
    }

    /// [`SagaEngine::start`] carrying the starting request's W3C `traceparent` into every
    /// command the saga sends.
    pub async fn start_traced(
        &self,
        tx: &mut Tx,
        id: &str,
        context: F::Context,
        correlation_id: &str,
        traceparent: Option<&str>,
    ) -> Result<SagaState<F::Context>, HandlerError> {
        let now = now_millis();
        let mut state = SagaState {
            id: id.to_string(),
            kind: self.flow.kind().to_string(),
            status: SagaStatus::Running,
            step: 0,
            context,
            correlation_id: correlation_id.to_string(),
            traceparent: traceparent.map(str::to_string),
            attempts: 0,
            command_id: None,
            deadline: None,
            error: None,
        };
        store::query(
            "INSERT INTO saga (id, kind, status, step, context, correlation_id, traceparent, attempts, created_at, updated_at)
             VALUES ($1, $2, $3, 0, $4, $5, $6, 0, $7, $7)",
        )
        .bind(id)
        .bind(self.flow.kind())
        .bind(SagaStatus::Running.as_str())
        .bind(context_json(&state.context)?)
        .bind(correlation_id)
        .bind(traceparent)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        history(tx, id, "-", "started").await?;
        self.advance(tx, &mut state, None).await?;
        self.save(tx, &state).await?;
        Ok(state)
    }

    /// Applies a participant's reply; a duplicate or late one changes nothing.
    pub async fn on_reply(&self, tx: &mut Tx, event: &Envelope) -> Result<(), HandlerError> {
        let reply: SagaReply = event.payload_as()?;
        let Some(row) = lock_row(tx, &reply.saga_id).await? else {
            tracing::warn!(saga = %reply.saga_id, "reply for an unknown saga ignored");
            return Ok(());
        };
        self.on_locked_reply(tx, &row, reply, event).await
    }

    /// Applies `reply` to the saga in `row`, which the caller locked in `tx`.
    ///
    /// One piece: one transition of the saga row locked in the caller's transaction; the status
    /// and reply.ok state machine moves `state.step`, status and deadline, and one `save` at
    /// the end writes the branches that move the saga (a dead reply goes through `given_up`).
    async fn on_locked_reply(
        &self,
        tx: &mut Tx,
        row: &store::Row,
        reply: SagaReply,
        event: &Envelope,
    ) -> Result<(), HandlerError> {
        let mut state: SagaState<F::Context> = from_row(row)?;
        if state.kind != self.flow.kind() {
            return Err(HandlerError::Poison(format!(
                "a reply for saga {} of flow {:?} reached the {} flow",
                state.id,
                state.kind,
                self.flow.kind()
            )));
        }
        let current = self.step_at(state.step);
        let expected_phase = match state.status {
            SagaStatus::Running => false,
            SagaStatus::Compensating => true,
            _ => {
                return Ok(());
            }
        };
        let Some(step) = current.filter(|s| s.step.name() == reply.step && reply.compensation == expected_phase) else {
            history(tx, &state.id, &reply.step, "ignored a late or duplicate reply").await?;
            return Ok(());
        };
        if event.metadata.source != step.participant {
            return Err(HandlerError::Poison(format!(
                "{} saga {}: a {} reply claims to come from {:?}, but only {} answers that step",
                self.flow.kind(),
                state.id,
                reply.step,
                event.metadata.source,
                step.participant
            )));
        }
        let pivot = step.compensate.is_none();
        let step = step.step;
        metrics::counter!("bazaar_saga_replies_total", "saga" => self.flow.kind(), "ok" => reply.ok.to_string())
            .increment(1);
        if reply.dead {
            return self.given_up(tx, &mut state, event, reply, pivot).await;
        }
        match (state.status, reply.ok) {
            (SagaStatus::Running, true) => {
                self.flow.record(step, &mut state.context, reply.data).map_err(|e| {
                    HandlerError::Poison(format!(
                        "{} saga {}: the {} reply does not fit: {e}",
                        self.flow.kind(),
                        state.id,
                        step.name()
                    ))
                })?;
                history(tx, &state.id, &reply.step, "done").await?;
                state.step += 1;
                state.attempts = 0;
                self.advance(tx, &mut state, Some(event)).await?;
            }
            (SagaStatus::Running, false) => {
                let reason = reply.reason.unwrap_or_else(|| "failed".into());
                history(tx, &state.id, &reply.step, &format!("failed: {reason}; compensating")).await?;
                state.error = Some(format!("{}: {reason}", reply.step));
                state.status = SagaStatus::Compensating;
                state.step -= 1;
                state.attempts = 0;
                self.advance(tx, &mut state, Some(event)).await?;
            }
            (_, true) => {
                history(tx, &state.id, &reply.step, "compensated").await?;
                state.step -= 1;
                state.attempts = 0;
                self.advance(tx, &mut state, Some(event)).await?;
            }
            (_, false) => {
                // A failure answers one send: only the latest send's failure schedules a retry,
                // and only once, so a redelivered or late failure cannot move the retry (the
                // success of any send still counts, above). Replies without a causation id
                // cannot be told apart and are taken as they come.
                if let Some(cause) = &event.metadata.causation_id {
                    if state.command_id.as_ref() != Some(cause) {
                        history(tx, &state.id, &reply.step, "ignored a late or duplicate reply").await?;
                        return Ok(());
                    }
                }
                state.command_id = None;
                let reason = reply.reason.unwrap_or_else(|| "failed".into());
                history(
                    tx,
                    &state.id,
                    &reply.step,
                    &format!("compensation failed: {reason}; will retry"),
                )
                .await?;
                // Resent by the timer after a backoff, or marked stuck when out of attempts.
                state.deadline = Some(now_millis() + self.resend.delay(state.attempts).as_millis() as i64);
            }
        }
        self.save(tx, &state).await
    }

    /// Handles sagas whose deadline passed: resend, fail the step, or mark stuck.
    pub async fn tick(&self) -> Result<usize, HandlerError> {
        let due = store::query(
            "SELECT id FROM saga WHERE status IN ('running', 'compensating') AND deadline IS NOT NULL AND deadline <= $1
             AND kind = $2 ORDER BY deadline LIMIT 100",
        )
        .bind(now_millis())
        .bind(self.flow.kind())
        .fetch_all(self.outbox.store())
        .await?;
        let mut moved = 0;
        for row in due {
            let id: String = row.try_get("id")?;
            // One saga that cannot be handled (a corrupt row, a failing hook) must not stall
            // the others: it stays due, first in line, and would otherwise end every round.
            match self.tick_one(&id).await {
                Ok(true) => moved += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(saga = %id, error = %e, "saga deadline not handled; will retry"),
            }
        }
        Ok(moved)
    }

    /// Handles saga `id`'s passed deadline in its own transaction; false if it moved meanwhile.
    async fn tick_one(&self, id: &str) -> Result<bool, HandlerError> {
        let mut tx = self.outbox.store().begin().await?;
        let Some(mut state) = self.lock(&mut tx, id).await? else {
            return Ok(false);
        };
        if state.status.is_final() || state.deadline.is_none_or(|d| d > now_millis()) {
            return Ok(false);
        }
        self.on_deadline(&mut tx, &mut state).await?;
        self.save(&mut tx, &state).await?;
        self.outbox.commit(tx).await?;
        Ok(true)
    }

    async fn on_deadline(&self, tx: &mut Tx, state: &mut SagaState<F::Context>) -> Result<(), HandlerError> {
        let Some(step) = self.step_at(state.step).cloned() else {
            return Ok(());
        };
        let name = step.step.name();
        let compensating = state.status == SagaStatus::Compensating;
        // A step with nothing to undo is the pivot: once sent it may have acted, and
        // compensating earlier steps would leave its effect standing, so it is only retried
        // forward until it answers (a failure reply still turns the saga around).
        let pivot = step.compensate.is_none();
        let limit = if compensating {
            COMPENSATION_ATTEMPTS
        } else if pivot {
            u32::MAX
        } else {
            step.max_attempts
        };
        if state.attempts < limit {
            history(
                tx,
                &state.id,
                name,
                &format!("no reply in time; resending (attempt {})", state.attempts + 1),
            )
            .await?;
            metrics::counter!("bazaar_saga_retries_total", "saga" => self.flow.kind(), "step" => name).increment(1);
            self.send(tx, state, &step, compensating, None).await?;
        } else if !compensating {
            let reason = format!("no reply after {} attempts", state.attempts);
            self.undo_from_here(tx, state, name, &reason, None).await?;
        } else {
            self.stick(tx, state, name, "compensation kept failing").await?;
        }
        Ok(())
    }

    /// Applies a participant's word that it gave up on the command it answers. Only the
    /// latest send counts: an earlier copy's failure says nothing of a later one, and a
    /// forged command (its own event id) cannot stop a saga. A forward step that can be undone
    /// is compensated, itself included (an earlier copy may have acted); the pivot, or a
    /// compensation, stops the saga as stuck with the reason, for an operator.
    async fn given_up(
        &self,
        tx: &mut Tx,
        state: &mut SagaState<F::Context>,
        event: &Envelope,
        reply: SagaReply,
        pivot: bool,
    ) -> Result<(), HandlerError> {
        if event.metadata.causation_id.is_none() || event.metadata.causation_id != state.command_id {
            history(
                tx,
                &state.id,
                &reply.step,
                "ignored a given-up reply to an earlier or unknown send",
            )
            .await?;
            return Ok(());
        }
        let reason = reply.reason.unwrap_or_else(|| "the participant gave up".into());
        if state.status == SagaStatus::Running && !pivot {
            self.undo_from_here(tx, state, &reply.step, &reason, Some(event))
                .await?;
        } else {
            self.stick(tx, state, &reply.step, &reason).await?;
        }
        self.save(tx, state).await
    }

    /// Turns `state` around at `step` for `reason`, this step included: its participant may
    /// still act on a command it never answered (a late copy, an earlier one).
    async fn undo_from_here(
        &self,
        tx: &mut Tx,
        state: &mut SagaState<F::Context>,
        step: &str,
        reason: &str,
        cause: Option<&Envelope>,
    ) -> Result<(), HandlerError> {
        history(tx, &state.id, step, &format!("{reason}; compensating")).await?;
        state.error = Some(format!("{step}: {reason}"));
        state.status = SagaStatus::Compensating;
        state.attempts = 0;
        self.advance(tx, state, cause).await
    }

    /// Stops `state` as stuck at `step` for `reason`, until an operator retries it.
    async fn stick(
        &self,
        tx: &mut Tx,
        state: &mut SagaState<F::Context>,
        step: &str,
        reason: &str,
    ) -> Result<(), HandlerError> {
        history(tx, &state.id, step, &format!("{reason}; stuck")).await?;
        // Why it was compensating, if it was, and why it stopped.
        let stopped = format!("{step}: {reason}");
        state.error = Some(match state.error.take() {
            Some(cause) => format!("{cause}; then {stopped}"),
            None => stopped,
        });
        state.status = SagaStatus::Stuck;
        state.deadline = None;
        metrics::counter!("bazaar_saga_stuck_total", "saga" => self.flow.kind()).increment(1);
        self.flow.finished(tx, state).await
    }

    /// Sends a stuck saga on with fresh attempts (an operator's action): back to compensating
    /// what it did, or, when none of its steps so far can be undone (a flow of forward-only
    /// steps), forward again from the step it stopped at.
    pub async fn retry(&self, id: &str) -> Result<bool, HandlerError> {
        let mut tx = self.outbox.store().begin().await?;
        let Some(mut state) = self.lock(&mut tx, id).await? else {
            return Ok(false);
        };
        if state.status != SagaStatus::Stuck {
            return Ok(false);
        }
        // A saga stuck before its first step (none so far) goes back to compensating, as it was.
        let reached = usize::try_from(state.step.saturating_add(1)).unwrap_or(0);
        let undoable = state.step < 0 || self.flow.steps().iter().take(reached).any(|s| s.compensate.is_some());
        let (status, words) = match undoable {
            true => (SagaStatus::Compensating, "retried by an operator"),
            false => (SagaStatus::Running, "retried by an operator; resuming forward"),
        };
        history(&mut tx, id, "-", words).await?;
        state.status = status;
        state.attempts = 0;
        self.advance(&mut tx, &mut state, None).await?;
        self.save(&mut tx, &state).await?;
        self.outbox.commit(tx).await?;
        Ok(true)
    }

    /// Stops saga `id` at a safe point for `reason`, inside the caller's transaction. A running
    /// saga whose pivot was not sent turns around now, its current step included (its
    /// participant may still act on the command it has not answered); one whose pivot was
    /// sent runs to its end, since the pivot may have acted.
    pub async fn stop(&self, tx: &mut Tx, id: &str, reason: &str) -> Result<Stopped, HandlerError> {
        let Some(mut state) = self.lock(tx, id).await? else {
            return Ok(Stopped::Unknown);
        };
        match state.status {
            SagaStatus::Running => {}
            SagaStatus::Compensating => return Ok(Stopped::Undoing),
            done => return Ok(Stopped::Ended(done)),
        }
        let sent = usize::try_from(state.step.saturating_add(1)).unwrap_or(0);
        if self.flow.steps().iter().take(sent).any(|s| s.compensate.is_none()) {
            return Ok(Stopped::PastPivot);
        }
        let step = self.step_name(state.step).unwrap_or("-");
        self.undo_from_here(tx, &mut state, step, reason, None).await?;
        self.save(tx, &state).await?;
        Ok(Stopped::Undoing)
    }

    /// Runs [`SagaEngine::tick`] every 250 ms and counts sagas per status until `shutdown`.
    pub fn spawn_timer(self: Arc<Self>, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut rounds = 0u64;
            loop {
                if let Err(e) = self.tick().await {
                    tracing::warn!(error = %e, "saga timer round failed");
                }
                rounds += 1;
                if rounds % 20 == 1 {
                    if let Ok(counts) = self.counts().await {
                        for (status, n) in counts {
                            metrics::gauge!("bazaar_sagas", "saga" => self.flow.kind(), "status" => status)
                                .set(n as f64);
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        })
    }

    /// The saga `id`, if it exists.
    pub async fn load(&self, id: &str) -> Result<Option<SagaState<F::Context>>, StoreError> {
        self.load_row(id).await
    }

    /// The saga `id`, if it exists, locked in the caller's transaction until it ends (a
    /// decision on it in that transaction then holds).
    pub async fn load_locked(&self, tx: &mut Tx, id: &str) -> Result<Option<SagaState<F::Context>>, StoreError> {
        self.lock(tx, id).await
    }

    /// Up to `limit` sagas in `status`, most recently changed first (e.g. the stuck ones).
    pub async fn list(&self, status: SagaStatus, limit: i64) -> Result<Vec<SagaState<F::Context>>, StoreError> {
        let rows = store::query(&format!(
            "SELECT {SAGA_COLUMNS} FROM saga WHERE status = $1 AND kind = $3 ORDER BY updated_at DESC LIMIT $2"
        ))
        .bind(status.as_str())
        .bind(limit)
        .bind(self.flow.kind())
        .fetch_all(self.outbox.store())
        .await?;
        rows.iter().map(from_row).collect()
    }

    async fn load_row(&self, id: &str) -> Result<Option<SagaState<F::Context>>, StoreError> {
        let row = store::query(&format!("SELECT {SAGA_COLUMNS} FROM saga WHERE id = $1 AND kind = $2"))
            .bind(id)
            .bind(self.flow.kind())
            .fetch_optional(self.outbox.store())
            .await?;
        row.map(|r| from_row(&r)).transpose()
    }

    /// The history of saga `id`, oldest first.
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEntry>, StoreError> {
        let rows = store::query("SELECT at, step, entry FROM saga_history WHERE saga_id = $1 ORDER BY id")
            .bind(id)
            .fetch_all(self.outbox.store())
            .await?;
        rows.iter()
            .map(|r| {
                let at: i64 = r.try_get("at")?;
                Ok(HistoryEntry {
                    at: chrono::DateTime::from_timestamp_millis(at)
                        .unwrap_or_default()
                        .to_rfc3339(),
                    step: r.try_get("step")?,
                    entry: r.try_get("entry")?,
                })
            })
            .collect()
    }

    /// How many sagas are in each status.
    pub async fn counts(&self) -> Result<Vec<(&'static str, i64)>, StoreError> {
        let mut out = Vec::new();
        for status in [
            SagaStatus::Running,
            SagaStatus::Compensating,
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::Stuck,
        ] {
            let row = store::query("SELECT COUNT(*) AS n FROM saga WHERE status = $1 AND kind = $2")
                .bind(status.as_str())
                .bind(self.flow.kind())
                .fetch_one(self.outbox.store())
                .await?;
            out.push((status.as_str(), row.try_get::<i64, _>("n")?));
        }
        Ok(out)
    }

    /// The name of step `step` of this flow, if there is one.
    pub fn step_name(&self, step: i64) -> Option<&'static str> {
        self.step_at(step).map(|s| s.step.name())
    }

    fn step_at(&self, step: i64) -> Option<&Step<F::Step>> {
        usize::try_from(step).ok().and_then(|i| self.flow.steps().get(i))
    }

    /// Moves forward (or backward) through steps until one must wait for a reply or the
    /// saga ends.
    async fn advance(
        &self,
        tx: &mut Tx,
        state: &mut SagaState<F::Context>,
        cause: Option<&Envelope>,
    ) -> Result<(), HandlerError> {
        loop {
            let step = self.step_at(state.step).cloned();
            match (state.status, step) {
                (SagaStatus::Running, Some(step)) => {
                    self.send(tx, state, &step, false, cause).await?;
                    break;
                }
                (SagaStatus::Running, None) => {
                    state.status = SagaStatus::Completed;
                    state.deadline = None;
                    history(tx, &state.id, "-", "completed").await?;
                    self.flow.finished(tx, state).await?;
                    break;
                }
                (SagaStatus::Compensating, Some(step)) if step.compensate.is_some() => {
                    self.send(tx, state, &step, true, cause).await?;
                    break;
                }
                (SagaStatus::Compensating, Some(_)) => state.step -= 1,
                (SagaStatus::Compensating, None) => {
                    state.status = SagaStatus::Compensated;
                    state.deadline = None;
                    history(tx, &state.id, "-", "compensated").await?;
                    self.flow.finished(tx, state).await?;
                    break;
                }
                _ => break,
            }
        }
        metrics::counter!("bazaar_saga_transitions_total", "saga" => self.flow.kind(), "status" => state.status.as_str())
            .increment(1);
        Ok(())
    }

    /// Sends the current step's command through the outbox and arms its deadline.
    async fn send(
        &self,
        tx: &mut Tx,
        state: &mut SagaState<F::Context>,
        step: &Step<F::Step>,
        compensation: bool,
        cause: Option<&Envelope>,
    ) -> Result<(), HandlerError> {
        let event_type = match (compensation, step.compensate) {
            (true, Some(compensate)) => compensate,
            _ => step.execute,
        };
        let mut payload = self
            .flow
            .command(step.step, compensation, &state.context)
            .map_err(|e| {
                HandlerError::Poison(format!(
                    "{} saga {}: cannot build the {} command: {e}",
                    self.flow.kind(),
                    state.id,
                    step.step.name()
                ))
            })?;
        let header = CommandHeader {
            saga_id: state.id.clone(),
            step: step.step.name().to_string(),
            compensation,
            reply_to: self.reply_topic.clone(),
            reply_type: self.reply_type.clone(),
        };
        if let (Some(obj), Ok(Value::Object(h))) = (payload.as_object_mut(), serde_json::to_value(&header)) {
            obj.extend(h);
        }
        let metadata = match cause {
            Some(c) => c.caused_metadata(self.source),
            None => Metadata {
                correlation_id: state.correlation_id.clone(),
                traceparent: state.traceparent.clone(),
                source: self.source.to_string(),
                ..Metadata::default()
            },
        };
        let command = Envelope::new(event_type, &state.id, payload, metadata);
        self.outbox.add(tx, step.topic, &command).await?;
        state.command_id = Some(command.event_id.to_string());
        state.attempts += 1;
        let wait = if state.attempts > 1 {
            step.timeout + self.resend.delay(state.attempts)
        } else {
            step.timeout
        };
        state.deadline = Some(now_millis() + wait.as_millis() as i64);
        Ok(())
    }

    /// Locks saga `id` of this flow in `tx`.
    async fn lock(&self, tx: &mut Tx, id: &str) -> Result<Option<SagaState<F::Context>>, StoreError> {
        let sql = format!("SELECT {SAGA_COLUMNS} FROM saga WHERE id = $1 AND kind = $2 FOR UPDATE");
        let row = store::query(&sql)
            .bind(id)
            .bind(self.flow.kind())
            .fetch_optional(&mut *tx)
            .await?;
        row.map(|r| from_row(&r)).transpose()
    }

    async fn save(&self, tx: &mut Tx, state: &SagaState<F::Context>) -> Result<(), HandlerError> {
        store::query(
            "UPDATE saga SET status = $1, step = $2, context = $3, attempts = $4, deadline = $5, error = $6, updated_at = $7,
             command_id = $9 WHERE id = $8",
        )
        .bind(state.status.as_str())
        .bind(state.step)
        .bind(context_json(&state.context)?)
        .bind(state.attempts as i64)
        .bind(state.deadline)
        .bind(state.error.clone())
        .bind(now_millis())
        .bind(&state.id)
        .bind(state.command_id.clone())
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// What asking a saga to stop came to ([`SagaEngine::stop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It is undoing what it did (now, or it already was).
    Undoing,
    /// Its pivot was sent, so it runs to its end.
    PastPivot,
    /// It had ended, with this status.
    Ended(SagaStatus),
    /// No saga of this flow has that id.
    Unknown,
}

/// Locks saga `id`'s row in `tx`, whatever its flow.
async fn lock_row(tx: &mut Tx, id: &str) -> Result<Option<store::Row>, StoreError> {
    let sql = format!("SELECT {SAGA_COLUMNS} FROM saga WHERE id = $1 FOR UPDATE");
    store::query(&sql).bind(id).fetch_optional(&mut *tx).await
}

/// A flow's engine as [`Flows`] sees it: its kind, and how it applies a reply to a saga row
/// the caller locked.
pub trait FlowEngine: Send + Sync + 'static {
    /// The flow's kind.
    fn kind(&self) -> &'static str;
    /// Applies `reply` (the payload of `event`) to the locked saga `row`.
    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        row: &'a store::Row,
        reply: SagaReply,
        event: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

impl<F: SagaFlow> FlowEngine for SagaEngine<F> {
    fn kind(&self) -> &'static str {
        self.flow.kind()
    }

    fn apply<'a>(
        &'a self,
        tx: &'a mut Tx,
        row: &'a store::Row,
        reply: SagaReply,
        event: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.on_locked_reply(tx, row, reply, event))
    }
}

/// The flows of one orchestrator, sharing its saga table and reply topic: each reply goes to
/// the engine of its saga's flow, read from the row it locks (one statement, as for one flow).
pub struct Flows {
    engines: Vec<Arc<dyn FlowEngine>>,
}

impl Flows {
    /// The flows of `engines`, or which kind two of them share.
    pub fn new(engines: Vec<Arc<dyn FlowEngine>>) -> Result<Flows, String> {
        for (i, engine) in engines.iter().enumerate() {
            if engines[..i].iter().any(|e| e.kind() == engine.kind()) {
                return Err(format!("two flows are called {:?}", engine.kind()));
            }
        }
        Ok(Flows { engines })
    }

    /// Applies a participant's reply to its saga, whichever flow runs it; a reply for an
    /// unknown saga changes nothing, one for a flow none of these runs is refused.
    pub async fn on_reply(&self, tx: &mut Tx, event: &Envelope) -> Result<(), HandlerError> {
        let reply: SagaReply = event.payload_as()?;
        let Some(row) = lock_row(tx, &reply.saga_id).await? else {
            tracing::warn!(saga = %reply.saga_id, "reply for an unknown saga ignored");
            return Ok(());
        };
        let kind: String = row.try_get("kind")?;
        let Some(engine) = self.engines.iter().find(|e| e.kind() == kind) else {
            return Err(HandlerError::Poison(format!(
                "a reply for saga {} of flow {kind:?}, which no engine here runs",
                reply.saga_id
            )));
        };
        engine.apply(tx, &row, reply, event).await
    }
}

/// The columns [`from_row`] reads.
const SAGA_COLUMNS: &str =
    "id, kind, status, step, context, correlation_id, traceparent, attempts, command_id, deadline, error";

/// The context as stored.
fn context_json(context: &impl Serialize) -> Result<String, HandlerError> {
    serde_json::to_string(context).map_err(|e| HandlerError::Poison(format!("saga context does not serialise: {e}")))
}

fn from_row<C: DeserializeOwned>(r: &store::Row) -> Result<SagaState<C>, StoreError> {
    let context: String = r.try_get("context")?;
    Ok(SagaState {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        status: SagaStatus::parse(&r.try_get::<String, _>("status")?)?,
        step: r.try_get("step")?,
        context: serde_json::from_str(&context).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        correlation_id: r.try_get("correlation_id")?,
        traceparent: r.try_get("traceparent")?,
        attempts: r.try_get::<i64, _>("attempts")?.max(0) as u32,
        command_id: r.try_get("command_id")?,
        deadline: r.try_get("deadline")?,
        error: r.try_get("error")?,
    })
}

async fn history(tx: &mut Tx, saga: &str, step: &str, entry: &str) -> Result<(), StoreError> {
    store::query("INSERT INTO saga_history (saga_id, at, step, entry) VALUES ($1, $2, $3, $4)")
        .bind(saga)
        .bind(now_millis())
        .bind(step)
        .bind(entry)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Extra wait before a resend or a compensation retry: 500 ms doubling, capped at 30 s.
const RESEND_BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
