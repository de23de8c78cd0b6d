//! Threads that serve proxied connections, each with its own single-threaded runtime and its
//! own upstream connection pools, as nginx's worker processes and HAProxy's threads do: a
//! client connection and every request on it stay on one thread, and so do the upstream
//! connections it uses, so no request wakes another thread. The accept loop hands each new
//! connection to the next worker in turn.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::sync::mpsc;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// The worker the current thread is (0 outside workers): which of a service's upstream
/// pools it uses.
pub(crate) fn current() -> usize {
    WORKER.get()
}

/// Work handed to a worker; it runs inside the worker's runtime, so what it spawns stays there.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// The running workers, stopped and joined by [`Workers::stop`].
pub(crate) struct Workers {
    queues: Vec<mpsc::UnboundedSender<Job>>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut workers = Workers {
            queues: Vec::new(),
            threads: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (queue, mut jobs) = mpsc::unbounded_channel::<Job>();
            let thread = std::thread::Builder::new()
                .name(format!("gateway-{index}"))
                .spawn(move || {
                    WORKER.set(index);
                    // Returns once the queue closes; the connections it spawned have been
                    // drained by then (see `Workers::stop`).
                    runtime.block_on(async move {
                        while let Some(job) = jobs.recv().await {
                            job();
                        }
                    });
                })?;
            workers.queues.push(queue);
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    /// How many workers run.
    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Runs `job` on the next worker in turn.
    pub fn run(&self, job: Job) {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        if self.queues[index].send(job).is_err() {
            // A worker ends only by panicking, which stops the whole process.
            tracing::error!(worker = index, "gateway worker is gone; connection dropped");
        }
    }

    /// Closes the queues and waits for every worker thread to end. Call once the
    /// connections they serve have been drained: what is still running is dropped.
    pub async fn stop(self) {
        drop(self.queues);
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        if let Err(e) = joined.await {
            tracing::error!(error = %e, "gateway workers did not stop cleanly");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_workers_in_turn_and_stop_waits_for_them() {
        let workers = Workers::start(2).unwrap();
        let (seen, mut saw) = mpsc::unbounded_channel();
        for _ in 0..4 {
            let seen = seen.clone();
            workers.run(Box::new(move || {
                tokio::spawn(async move {
                    let _ = seen.send(current());
                });
            }));
        }
        let mut indices = Vec::new();
        for _ in 0..4 {
            indices.push(saw.recv().await.unwrap());
        }
        indices.sort_unstable();
        assert_eq!(indices, [0, 0, 1, 1]);
        workers.stop().await;
    }
}
