//! A shutdown signal threaded explicitly to every task that must stop cleanly.

use tokio::sync::watch;

/// The sending side: call [`ShutdownTrigger::trigger`] once to stop every listener.
#[derive(Debug, Clone)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A cloneable handle a task awaits to learn it must stop.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new trigger and the handle its tasks hold.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    /// Tells every [`Shutdown`] handle to stop.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// A handle that never fires, for tests and one-shot tools.
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        // Leaking the sender keeps the channel open for the life of the process.
        std::mem::forget(tx);
        Shutdown(rx)
    }

    /// True once shutdown has been triggered.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when shutdown is triggered (or its trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
