//! The correlation id and trace context of the request or event a task is serving, kept in
//! a task-local so that whatever the task calls out to can carry them on. The HTTP side sets
//! it per request (and puts it in the request's extensions, for handlers that take
//! `Extension<RequestContext>`), the consumer runner per event.

/// The correlation id and trace context of the request being served.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// Carried from the client (or generated at the first hop) into every event.
    pub correlation_id: String,
    /// W3C traceparent, when the caller sent one.
    pub traceparent: Option<String>,
}

tokio::task_local! {
    /// The context of the request or event the current task is serving; the outbound client
    /// (`bazaar_kit::client`) copies it into the calls it makes.
    static CURRENT: RequestContext;
}

impl RequestContext {
    /// Runs `work` with `self` as the current context.
    pub async fn scope<F: std::future::Future>(self, work: F) -> F::Output {
        CURRENT.scope(self, work).await
    }

    /// The context of the request or event being served, if any.
    pub fn current() -> Option<RequestContext> {
        CURRENT.try_with(Clone::clone).ok()
    }
}
