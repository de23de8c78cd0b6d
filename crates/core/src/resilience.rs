//! Guards for calls that can cascade: a circuit breaker and jittered retry backoff.
//!
//! The breaker counts outcomes in a sliding window of the last `window` calls, as
//! resilience4j's count-based window does. When at least `min_calls` were made and either the
//! failure rate reaches `failure_rate` or the share of calls slower than `slow_call` reaches
//! `slow_call_rate`, it opens and rejects calls at once for `open_for`; then it lets
//! `half_open_probes` trial calls through and closes if they all succeed quickly, or opens
//! again on the first failed or slow one.
//!
//! [`CircuitBreaker::call`] guards one future; the outbound HTTP stack in
//! `bazaar_kit::client` uses [`CircuitBreaker::try_acquire`] and a [`BreakerPermit`] instead.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Breaker settings.
#[derive(Debug, Clone)]
pub struct BreakerConfig {
    /// Calls remembered.
    pub window: usize,
    /// Calls needed before the rate counts.
    pub min_calls: usize,
    /// Failure share (0..=1) that opens the breaker.
    pub failure_rate: f64,
    /// How long it stays open.
    pub open_for: Duration,
    /// Trial calls in half-open.
    pub half_open_probes: u32,
    /// A call lasting at least this long counts as slow, even when it succeeds.
    pub slow_call: Duration,
    /// Slow share (0..=1) that opens the breaker: a dependency that answers, but too late,
    /// ties up callers as surely as one that fails.
    pub slow_call_rate: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            window: 20,
            min_calls: 5,
            failure_rate: 0.5,
            open_for: Duration::from_secs(5),
            half_open_probes: 2,
            slow_call: Duration::from_secs(10),
            slow_call_rate: 1.0,
        }
    }
}

/// The breaker's state, as exported in metrics (0 closed, 1 half-open, 2 open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls flow.
    Closed,
    /// A few trial calls flow.
    HalfOpen,
    /// Calls are rejected without being made.
    Open,
}

/// Why a guarded call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError<E> {
    /// The breaker is open; the call was not made.
    #[error("circuit `{0}` is open")]
    Open(&'static str),
    /// The call ran out of time.
    #[error("call timed out after {0:?}")]
    Timeout(Duration),
    /// Too many calls to this dependency are in flight (the bulkhead is full); the call was
    /// not made.
    #[error("too many calls in flight to `{0}`")]
    Full(&'static str),
    /// The call failed.
    #[error(transparent)]
    Failed(E),
}

/// One call's result as the window remembers it.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    failed: bool,
    slow: bool,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    outcomes: VecDeque<Outcome>,
    opened_at: Option<Instant>,
    probes_left: u32,
}

/// A circuit breaker around one dependency.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: &'static str,
    config: BreakerConfig,
    inner: Mutex<Inner>,
}

impl CircuitBreaker {
    /// A closed breaker named `name` (the metrics label).
    pub fn new(name: &'static str, config: BreakerConfig) -> CircuitBreaker {
        metrics::gauge!("bazaar_breaker_state", "breaker" => name).set(0.0);
        CircuitBreaker {
            name,
            config,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                outcomes: VecDeque::new(),
                opened_at: None,
                probes_left: 0,
            }),
        }
    }

    /// The current state (moving open to half-open when its time is up).
    pub fn state(&self) -> BreakerState {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut inner);
        inner.state
    }

    fn refresh(&self, inner: &mut Inner) {
        if inner.state == BreakerState::Open && inner.opened_at.is_some_and(|t| t.elapsed() >= self.config.open_for) {
            self.set(inner, BreakerState::HalfOpen);
            inner.probes_left = self.config.half_open_probes;
        }
    }

    fn set(&self, inner: &mut Inner, state: BreakerState) {
        if inner.state != state {
            tracing::warn!(breaker = self.name, ?state, "circuit breaker changed state");
            metrics::counter!("bazaar_breaker_transitions_total", "breaker" => self.name).increment(1);
        }
        inner.state = state;
        let value = match state {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        metrics::gauge!("bazaar_breaker_state", "breaker" => self.name).set(value);
    }

    /// Asks to make a call; `false` means reject it now.
    fn admit(&self) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.refresh(&mut inner);
        match inner.state {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if inner.probes_left > 0 => {
                inner.probes_left -= 1;
                true
            }
            BreakerState::HalfOpen => false,
        }
    }

    /// Records a call's outcome: `ok` is false for a failure, `elapsed` decides slowness.
    fn record(&self, ok: bool, elapsed: Duration) {
        let outcome = Outcome {
            failed: !ok,
            slow: elapsed >= self.config.slow_call,
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match inner.state {
            BreakerState::HalfOpen if outcome.failed || outcome.slow => self.open(&mut inner),
            BreakerState::HalfOpen => {
                if inner.probes_left == 0 {
                    inner.outcomes.clear();
                    self.set(&mut inner, BreakerState::Closed);
                }
            }
            BreakerState::Open => {}
            BreakerState::Closed => {
                inner.outcomes.push_back(outcome);
                while inner.outcomes.len() > self.config.window {
                    inner.outcomes.pop_front();
                }
                let calls = inner.outcomes.len();
                let failures = inner.outcomes.iter().filter(|o| o.failed).count();
                let slow = inner.outcomes.iter().filter(|o| o.slow).count();
                if calls >= self.config.min_calls {
                    let failure_rate = failures as f64 / calls as f64;
                    let slow_rate = slow as f64 / calls as f64;
                    if failure_rate >= self.config.failure_rate {
                        tracing::warn!(breaker = self.name, failure_rate, calls, "failure rate over threshold");
                        self.open(&mut inner);
                    } else if slow_rate >= self.config.slow_call_rate {
                        tracing::warn!(breaker = self.name, slow_rate, calls, slow_call = ?self.config.slow_call, "slow-call rate over threshold");
                        self.open(&mut inner);
                    }
                }
            }
        }
    }

    /// Gives back a half-open trial slot whose call never finished (it was cancelled), so
    /// the breaker cannot stay half-open forever waiting for it.
    fn release(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.state == BreakerState::HalfOpen && inner.probes_left < self.config.half_open_probes {
            inner.probes_left += 1;
        }
    }

    /// Asks to make a call: a permit to report its outcome with, or `None` when the breaker
    /// rejects it now (open, or half-open with every trial slot taken).
    pub fn try_acquire(self: &Arc<Self>) -> Option<BreakerPermit> {
        if self.admit() {
            Some(BreakerPermit {
                breaker: self.clone(),
                started: Instant::now(),
                settled: false,
            })
        } else {
            metrics::counter!("bazaar_breaker_rejected_total", "breaker" => self.name).increment(1);
            None
        }
    }

    /// The name the breaker reports under.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn open(&self, inner: &mut Inner) {
        inner.opened_at = Some(Instant::now());
        inner.outcomes.clear();
        self.set(inner, BreakerState::Open);
    }

    /// Runs `call` with `timeout` unless the breaker is open, recording the outcome.
    pub async fn call<T, E, F>(&self, timeout: Duration, call: F) -> Result<T, CallError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        if !self.admit() {
            metrics::counter!("bazaar_breaker_rejected_total", "breaker" => self.name).increment(1);
            return Err(CallError::Open(self.name));
        }
        let started = Instant::now();
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => {
                self.record(true, started.elapsed());
                Ok(v)
            }
            Ok(Err(e)) => {
                self.record(false, started.elapsed());
                Err(CallError::Failed(e))
            }
            Err(_) => {
                self.record(false, started.elapsed());
                Err(CallError::Timeout(timeout))
            }
        }
    }
}

/// Leave to make one call through a [`CircuitBreaker`]; report how it went with
/// [`BreakerPermit::success`] or [`BreakerPermit::failure`]. Dropped unreported (the call was
/// cancelled), it counts as neither and frees its half-open trial slot.
#[derive(Debug)]
pub struct BreakerPermit {
    breaker: Arc<CircuitBreaker>,
    started: Instant,
    settled: bool,
}

impl BreakerPermit {
    /// The call succeeded (it may still count as slow).
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.record(true, self.started.elapsed());
    }

    /// The call failed.
    pub fn failure(mut self) {
        self.settled = true;
        self.breaker.record(false, self.started.elapsed());
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.release();
        }
    }
}

/// Exponential backoff: `base * 2^attempt`, capped. The one formula every retry loop in the
/// kit uses (consumer redelivery, outbox relay, saga resends, client retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The wait for attempt 0.
    pub base: Duration,
    /// The longest wait.
    pub cap: Duration,
}

impl Backoff {
    /// Waits from `base`, doubling, up to `cap`.
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff { base, cap }
    }

    /// The wait before retry number `attempt`.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.base.saturating_mul(1u32 << attempt.min(16)).min(self.cap)
    }

    /// Full jitter: a random wait in `[0, delay(attempt))`, so clients that failed together
    /// do not retry together.
    pub fn jittered(&self, attempt: u32) -> Duration {
        let ms = self.delay(attempt).as_millis().max(1) as u64;
        Duration::from_millis(rand::random::<u64>() % ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> BreakerConfig {
        BreakerConfig {
            window: 4,
            min_calls: 4,
            failure_rate: 0.5,
            open_for: Duration::from_millis(50),
            half_open_probes: 1,
            ..BreakerConfig::default()
        }
    }

    async fn fail(b: &CircuitBreaker) -> bool {
        matches!(
            b.call(Duration::from_secs(1), async { Err::<(), _>("boom") }).await,
            Err(CallError::Open(_))
        )
    }

    #[tokio::test]
    async fn opens_on_failures_rejects_then_recovers_through_half_open() {
        let b = CircuitBreaker::new("test", quick());
        for _ in 0..4 {
            assert!(!fail(&b).await, "closed breaker makes the call");
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(fail(&b).await, "open breaker rejects without calling");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let ok = b.call(Duration::from_secs(1), async { Ok::<_, ()>(7) }).await;
        assert_eq!(ok.ok(), Some(7));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_failed_probe_opens_again_and_timeouts_count_as_failures() {
        let b = CircuitBreaker::new("test2", quick());
        for _ in 0..4 {
            let r = b
                .call(Duration::from_millis(5), async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok::<_, ()>(())
                })
                .await;
            assert!(matches!(r, Err(CallError::Timeout(_))));
        }
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(!fail(&b).await);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test]
    async fn slow_successes_open_it_when_the_slow_rate_reaches_its_threshold() {
        let config = BreakerConfig {
            slow_call: Duration::from_millis(20),
            slow_call_rate: 0.5,
            failure_rate: 1.0,
            ..quick()
        };
        let b = Arc::new(CircuitBreaker::new("test-slow", config));
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            Ok::<_, ()>(())
        };
        // One slow call in three stays under the 50 % threshold.
        b.call(Duration::from_secs(1), slow()).await.ok();
        b.call(Duration::from_secs(1), async { Ok::<_, ()>(()) }).await.ok();
        b.call(Duration::from_secs(1), async { Ok::<_, ()>(()) }).await.ok();
        assert_eq!(b.state(), BreakerState::Closed);
        // The fourth call is slow too: 2 of 4 reaches it, though every call succeeded.
        b.call(Duration::from_secs(1), slow()).await.ok();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.try_acquire().is_none(), "open breaker hands out no permits");
        tokio::time::sleep(Duration::from_millis(60)).await;
        // A slow trial call opens it again; a quick one closes it.
        let permit = b.try_acquire().expect("half-open admits a trial call");
        tokio::time::sleep(Duration::from_millis(25)).await;
        permit.success();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::sleep(Duration::from_millis(60)).await;
        b.try_acquire().expect("trial call").success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_cancelled_trial_call_frees_its_slot() {
        let b = Arc::new(CircuitBreaker::new("test-cancel", quick()));
        for _ in 0..4 {
            b.try_acquire().expect("closed").failure();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        let probe = b.try_acquire().expect("the one trial slot");
        assert!(b.try_acquire().is_none(), "the only slot is taken");
        drop(probe);
        assert!(
            b.try_acquire().is_some(),
            "dropping an unreported permit frees the slot"
        );
    }

    #[test]
    fn backoff_stays_under_its_cap() {
        for attempt in 0..30 {
            assert!(
                Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).jittered(attempt)
                    < Duration::from_secs(2)
            );
        }
    }
}
