//! Admission control: the order service sheds new orders at the door when too many are in
//! flight, so accepted orders stay fast under overload instead of queueing behind a backlog —
//! after a short wait for a place, so that clients retrying at once do not spin.

use std::sync::Arc;

use ldt_runtime::db::Pool;
use ldt_runtime::http::ApiError;

/// Admission control: an estimate of the orders in flight, from the database (so it holds
/// across replicas) plus the orders this process committed since that count was taken,
/// against a limit. The limit follows the measured completion rate — about `target` worth
/// of work in flight (Little's law), never below [`MIN_IN_FLIGHT`] nor above `max_pending` —
/// so under overload the excess is shed at the door and accepted orders stay fast, instead
/// of queueing behind a fixed, too-deep backlog.
#[derive(Clone)]
pub struct Admission {
    max_pending: i64,
    /// How long the accepted backlog may take to clear; zero: the limit is `max_pending`.
    target: std::time::Duration,
    pub state: Arc<AdmissionState>,
    /// Cancelled when the process shuts down: whoever waits at the door is refused at once,
    /// to try another replica, instead of holding up the drain.
    shutdown: tokio_util::sync::CancellationToken,
}

/// The adaptive limit's floor: room for a burst from idle and for orders that wait out a
/// step's deadline.
const MIN_IN_FLIGHT: i64 = 256;

#[derive(Default)]
pub struct AdmissionState {
    /// Orders this process has committed, ever.
    committed: std::sync::atomic::AtomicI64,
    /// Orders this process has moved to a final status, ever.
    finished: std::sync::atomic::AtomicI64,
    /// The last count of PENDING orders, and `committed` and `finished` as they were when it
    /// was taken.
    snapshot: std::sync::Mutex<(i64, i64, i64)>,
    /// Commits and finishes hold it shared; a recount holds it exclusively, so the count,
    /// `committed` and `finished` are taken at the same point (for this process's orders;
    /// other replicas' are counted when they have committed).
    pub gate: tokio::sync::RwLock<()>,
    /// The current limit.
    limit: std::sync::atomic::AtomicI64,
    /// Requests admitted and not yet answered. Until its order commits, an admitted request
    /// is in no count: without this, while commits are slow (a recount holds the gate, the
    /// database is busy) every request that arrived meanwhile would be admitted.
    admitting: std::sync::atomic::AtomicI64,
    /// Requests waiting at the door for a place ([`Admission::admit_within`]), and the bell
    /// that wakes them when one may have come up: an order finished, or a request answered.
    waiting: std::sync::atomic::AtomicUsize,
    room: tokio::sync::Notify,
}

impl AdmissionState {
    /// Wakes up to `n` of the requests waiting at the door, the longest waiting first; each
    /// looks again, and waits again if the place went to another.
    fn ring(&self, n: usize) {
        let waiting = self.waiting.load(std::sync::atomic::Ordering::Acquire);
        for _ in 0..n.min(waiting) {
            self.room.notify_one();
        }
    }
}

/// An admitted request's place in the in-flight estimate, given back when it is dropped
/// (answered, failed, or its client went away).
pub struct Admitted(Arc<AdmissionState>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0
            .admitting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        // Between its commit and its answer an order counts twice (committed and admitting):
        // its answer frees a place.
        self.0.ring(1);
    }
}

/// A request's place in the queue at the door, left when it is dropped (admitted, refused,
/// or its client went away).
struct Waiting<'a>(&'a AdmissionState);

impl<'a> Waiting<'a> {
    fn enter(state: &'a AdmissionState) -> Waiting<'a> {
        state
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Waiting(state)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Admission {
    pub fn new(max_pending: i64, target: std::time::Duration) -> Admission {
        let state = AdmissionState::default();
        let first = if target.is_zero() {
            max_pending
        } else {
            MIN_IN_FLIGHT.min(max_pending)
        };
        state
            .limit
            .store(first, std::sync::atomic::Ordering::Relaxed);
        Admission {
            max_pending,
            target,
            state: Arc::new(state),
            shutdown: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// The same admission, refusing whoever waits at the door once `shutdown` is cancelled.
    pub fn with_shutdown(self, shutdown: tokio_util::sync::CancellationToken) -> Admission {
        Admission { shutdown, ..self }
    }

    /// The limit for a completion rate of `per_second` orders.
    fn limit_for(&self, per_second: f64) -> i64 {
        if self.target.is_zero() {
            return self.max_pending;
        }
        let wanted = (per_second * self.target.as_secs_f64()).ceil();
        let wanted = if wanted.is_finite() && wanted < i64::MAX as f64 {
            wanted as i64
        } else {
            i64::MAX
        };
        wanted.max(MIN_IN_FLIGHT).min(self.max_pending)
    }

    /// The orders in flight: the last count, plus what this process committed since, minus
    /// what it finished since (without the finishes, the estimate would grow by the whole
    /// intake between two counts and shed orders that fit), plus the requests admitted and
    /// not yet committed (an order is counted twice between its commit and its answer: a
    /// moment, on the safe side). [`Admission::admit`] reads it in two parts.
    #[cfg(test)]
    fn estimate(&self) -> i64 {
        let admitting = self
            .state
            .admitting
            .load(std::sync::atomic::Ordering::Acquire);
        self.estimate_committed().saturating_add(admitting.max(0))
    }

    /// The estimate without the requests not yet committed.
    fn estimate_committed(&self) -> i64 {
        let (count, committed_then, finished_then) = *self
            .state
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let committed = self
            .state
            .committed
            .load(std::sync::atomic::Ordering::Acquire);
        let finished = self
            .state
            .finished
            .load(std::sync::atomic::Ordering::Acquire);
        count
            .saturating_add(committed.saturating_sub(committed_then))
            .saturating_sub(finished.saturating_sub(finished_then))
            .max(0)
    }

    /// Takes a place in flight for a new order, or refuses it when the limit is reached.
    /// Compare-and-swap: of concurrent requests that see the last place free, one gets it.
    pub fn admit(&self) -> Result<Admitted, ApiError> {
        use std::sync::atomic::Ordering;
        let limit = self.state.limit.load(Ordering::Relaxed);
        let mut admitting = self.state.admitting.load(Ordering::Acquire);
        loop {
            let now = self.estimate_committed().saturating_add(admitting.max(0));
            if now >= limit {
                return Err(ApiError::Overloaded(format!(
                    "overloaded: {now} orders in flight (limit {limit}); retry after 1 s"
                )));
            }
            match self.state.admitting.compare_exchange_weak(
                admitting,
                admitting.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(Admitted(self.state.clone())),
                Err(current) => admitting = current,
            }
        }
    }

    /// Takes a place in flight for a new order, waiting up to `wait` for one when the limit
    /// is reached; refuses it if none came up by then. Under a flood of clients that retry as
    /// soon as they are refused, each refusal is an HTTP round trip for nothing on both
    /// sides; waiting turns that spinning into a queue that moves as orders finish.
    pub async fn admit_within(&self, wait: std::time::Duration) -> Result<Admitted, ApiError> {
        let refused = match self.admit() {
            Ok(admitted) => return Ok(admitted),
            Err(refused) => refused,
        };
        if wait.is_zero() || self.shutdown.is_cancelled() {
            return Err(refused);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let _waiting = Waiting::enter(&self.state);
        loop {
            // In the queue before looking again: a place freed in between rings this bell.
            let bell = self.state.room.notified();
            let mut bell = std::pin::pin!(bell);
            bell.as_mut().enable();
            match self.admit() {
                Ok(admitted) => return Ok(admitted),
                Err(refused) => {
                    tokio::select! {
                        woken = tokio::time::timeout_at(deadline, bell) => {
                            if woken.is_err() {
                                return Err(refused);
                            }
                        }
                        () = self.shutdown.cancelled() => return Err(refused),
                    }
                }
            }
        }
    }

    /// Called after an order's transaction committed.
    pub fn committed(&self) {
        self.state
            .committed
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Called after `n` orders were moved to their final status.
    pub fn finished(&self, n: usize) {
        self.state.finished.fetch_add(
            i64::try_from(n).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::AcqRel,
        );
        self.state.ring(n);
    }

    /// Re-counts the PENDING orders every second until shutdown, and from the counts the
    /// completion rate that sets the limit. Between two counts the estimate follows this
    /// process's commits and finishes; the count corrects it for other replicas' and for
    /// restarts. Not more often: every order leaves a dead `PENDING` entry in the status
    /// index until the table is vacuumed, so a count wades through every order since the
    /// last vacuum (tens of milliseconds under load), and commits wait at the gate
    /// meanwhile.
    pub async fn refresh(self, pool: Pool, shutdown: tokio_util::sync::CancellationToken) {
        const TICK: std::time::Duration = std::time::Duration::from_secs(1);
        // Completions per second, smoothed over a few seconds.
        let mut rate = 0.0f64;
        let mut last: Option<(i64, i64, std::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.cancelled() => return,
            }
            // The connection first, then the gate: a commit waiting at the gate holds a
            // connection, and the count must not wait for one while holding the gate.
            let Ok(mut conn) = pool.acquire().await else {
                continue;
            };
            let (before, finished_before, count) = {
                let _gate = self.state.gate.write().await;
                let before = self
                    .state
                    .committed
                    .load(std::sync::atomic::Ordering::Acquire);
                let finished_before = self
                    .state
                    .finished
                    .load(std::sync::atomic::Ordering::Acquire);
                let count: Result<i64, _> =
                    sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
                        .fetch_one(&mut *conn)
                        .await;
                (before, finished_before, count)
            };
            drop(conn);
            let Ok(n) = count else { continue };
            *self
                .state
                .snapshot
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = (n, before, finished_before);
            let at = std::time::Instant::now();
            if let Some((pending, committed, then)) = last {
                // Finished = what was pending + what came in − what is pending now. (Orders
                // other replicas took are not in `committed`: an underestimate, on the safe
                // side.)
                let finished = pending
                    .saturating_add(before.saturating_sub(committed))
                    .saturating_sub(n)
                    .max(0);
                let secs = at.duration_since(then).as_secs_f64().max(0.001);
                rate = 0.5 * rate + 0.5 * (finished as f64 / secs);
                self.state
                    .limit
                    .store(self.limit_for(rate), std::sync::atomic::Ordering::Relaxed);
            }
            last = Some((n, before, at));
            // The count may have found room (orders another replica finished, a higher
            // limit): whoever waits looks again.
            self.state.room.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_admission_limit_follows_the_completion_rate_within_its_bounds() {
        let a = Admission::new(2000, std::time::Duration::from_secs(1));
        assert_eq!(a.limit_for(0.0), MIN_IN_FLIGHT);
        assert_eq!(a.limit_for(300.0), 300);
        assert_eq!(a.limit_for(1e9), 2000);
        assert_eq!(a.limit_for(f64::NAN), 2000);
        let fixed = Admission::new(2000, std::time::Duration::ZERO);
        assert_eq!(fixed.limit_for(300.0), 2000);
        let tiny = Admission::new(3, std::time::Duration::from_secs(1));
        assert_eq!(tiny.limit_for(0.0), 3);
    }

    #[test]
    fn the_in_flight_estimate_counts_what_finished_since_the_last_count() {
        let a = Admission::new(2, std::time::Duration::ZERO);
        *a.state.snapshot.lock().unwrap() = (1, 0, 0);
        a.committed();
        assert_eq!(a.estimate(), 2);
        assert!(a.admit().is_err(), "two in flight fill a limit of two");
        a.finished(1);
        assert_eq!(a.estimate(), 1);
        assert!(
            a.admit().is_ok(),
            "a finished order makes room before the next count"
        );
        // Finishes of orders another replica took can outrun this one's commits.
        a.finished(5);
        assert_eq!(a.estimate(), 0);
    }

    /// A request waiting at the door of `a` for up to 30 s, once it waits there.
    async fn waiter(a: &Admission) -> tokio::task::JoinHandle<Result<(), ApiError>> {
        let waiter = tokio::spawn({
            let a = a.clone();
            async move {
                a.admit_within(std::time::Duration::from_secs(30))
                    .await
                    .map(drop)
            }
        });
        while a.state.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        waiter
    }

    #[tokio::test]
    async fn a_waiting_request_takes_the_place_a_finished_order_frees() {
        let a = Admission::new(1, std::time::Duration::ZERO);
        *a.state.snapshot.lock().unwrap() = (1, 0, 0);
        let waiter = waiter(&a).await;
        assert!(!waiter.is_finished(), "no place yet: it waits");
        a.finished(1);
        let admitted = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken when the order finished, long before its 30 s")
            .unwrap();
        assert!(admitted.is_ok(), "{:?}", admitted.err());
        assert_eq!(a.state.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_waiting_request_is_refused_when_no_place_comes_up_in_time() {
        let a = Admission::new(1, std::time::Duration::ZERO);
        *a.state.snapshot.lock().unwrap() = (1, 0, 0);
        let started = std::time::Instant::now();
        let refused = a
            .admit_within(std::time::Duration::from_millis(50))
            .await
            .map(drop);
        assert!(
            matches!(refused, Err(ApiError::Overloaded(_))),
            "{refused:?}"
        );
        assert!(started.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(a.state.waiting.load(Ordering::Acquire), 0);
        // A request answered without its order stored (refused, failed) gives its place back,
        // and the longest waiting takes it.
        let first = Admission::new(1, std::time::Duration::ZERO);
        let held = first.admit().expect("room for one");
        let waiter = waiter(&first).await;
        drop(held);
        let admitted = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("woken when the request before it was answered")
            .unwrap();
        assert!(admitted.is_ok(), "{:?}", admitted.err());
    }

    #[tokio::test]
    async fn whoever_waits_at_the_door_is_refused_at_once_on_shutdown() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let a = Admission::new(1, std::time::Duration::ZERO).with_shutdown(shutdown.clone());
        *a.state.snapshot.lock().unwrap() = (1, 0, 0);
        let waiter = waiter(&a).await;
        shutdown.cancel();
        let refused = tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
            .await
            .expect("refused at the shutdown, long before its 30 s")
            .unwrap();
        assert!(
            matches!(refused, Err(ApiError::Overloaded(_))),
            "{refused:?}"
        );
        let after = a.admit_within(std::time::Duration::from_secs(30)).await;
        assert!(after.is_err(), "no waiting once shut down");
    }

    #[test]
    fn an_admitted_request_holds_its_place_until_it_is_answered() {
        let a = Admission::new(2, std::time::Duration::ZERO);
        let first = a.admit().expect("room for two");
        let second = a.admit().expect("room for two");
        assert_eq!(
            a.estimate(),
            2,
            "admitted, not yet committed, still in flight"
        );
        assert!(
            a.admit().is_err(),
            "two admitted requests fill a limit of two before either commits"
        );
        assert_eq!(a.estimate(), 2, "a refused request takes no place");
        drop(first);
        assert_eq!(a.estimate(), 1);
        let third = a.admit().expect("an answered request makes room");
        drop((second, third));
        assert_eq!(a.estimate(), 0);
    }
}
