//! What a saga puts on the wire: the header the engine adds to every command, the reply a
//! participant sends, and the verdict a participant reaches. The engine that sends and
//! matches them is `bazaar_saga`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::Envelope;

/// A message read as a saga command that lacks the engine's routing fields.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{event_type}` is not a saga command: {reason}")]
pub struct NotASagaCommand {
    /// The message's type.
    pub event_type: String,
    /// What its payload lacks.
    pub reason: String,
}

/// What a participant answers to a saga command.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Done; the data goes to the flow's `SagaFlow::record` (in `bazaar_saga`).
    Done(Value),
    /// Not done, and why: the saga compensates (or, for a compensation, retries).
    Refused(String),
    /// The answer comes later, from the participant itself (payments waiting for its
    /// outside provider).
    Later,
    /// The participant gave up on the command (it failed every attempt and was
    /// dead-lettered), and why: it will never be done, so the saga undoes the step or, for
    /// the pivot or a compensation, stops as stuck with the reason, rather than resending it
    /// forever.
    GaveUp(String),
}

impl Verdict {
    /// Done with `data` (a contract type).
    pub fn done(data: &impl Serialize) -> Verdict {
        Verdict::Done(serde_json::to_value(data).unwrap_or(Value::Null))
    }

    /// Done with nothing to report.
    pub fn done_empty() -> Verdict {
        Verdict::Done(Value::Null)
    }

    /// Refused for `reason`.
    pub fn refused(reason: impl Into<String>) -> Verdict {
        Verdict::Refused(reason.into())
    }
}

/// The reply a participant sends for a saga command (the reply event's payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SagaReply {
    /// The saga the command belonged to.
    pub saga_id: String,
    /// The step the command belonged to.
    pub step: String,
    /// True when it answers a compensating command.
    pub compensation: bool,
    /// Whether the participant did what was asked.
    pub ok: bool,
    /// Why not, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the participant reports on success, recorded into the context by the flow.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub data: Value,
    /// True when the participant gave up on the command (dead-lettered it) for `reason`
    /// ([`Verdict::GaveUp`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dead: bool,
}

/// The routing fields the engine adds to every command payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommandHeader {
    /// The saga.
    pub saga_id: String,
    /// The step.
    pub step: String,
    /// True for a compensating command.
    pub compensation: bool,
    /// Topic the reply goes to.
    pub reply_to: String,
    /// Event type the reply must carry.
    pub reply_type: String,
}

impl CommandHeader {
    /// Reads the header of a saga command.
    pub fn of(command: &Envelope) -> Result<CommandHeader, NotASagaCommand> {
        serde_json::from_value(command.payload.clone()).map_err(|e| NotASagaCommand {
            event_type: command.event_type.clone(),
            reason: e.to_string(),
        })
    }

    /// The reply envelope to `command` and the topic it goes to; `None` for
    /// [`Verdict::Later`].
    pub fn reply(&self, command: &Envelope, source: &str, verdict: Verdict) -> Option<(String, Envelope)> {
        let (ok, reason, data, dead) = match verdict {
            Verdict::Done(data) => (true, None, data, false),
            Verdict::Refused(reason) => (false, Some(reason), Value::Null, false),
            Verdict::GaveUp(reason) => (false, Some(reason), Value::Null, true),
            Verdict::Later => return None,
        };
        let reply = SagaReply {
            saga_id: self.saga_id.clone(),
            step: self.step.clone(),
            compensation: self.compensation,
            ok,
            reason,
            data,
            dead,
        };
        let env = Envelope::new(&self.reply_type, &self.saga_id, reply, command.caused_metadata(source));
        Some((self.reply_to.clone(), env))
    }
}
