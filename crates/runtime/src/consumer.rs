//! The consumer loop that feeds a queue's deliveries to a service's handler, in batches. A
//! delivery is acked only after its handler committed; a message that cannot be decoded or
//! handled is parked on the dead-letter queue with the reason, never dropped.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::bus::{Bus, Incoming, Outgoing};
use crate::metrics::Metrics;
use crate::telemetry::adopt;
use ldt_contract::{Envelope, Message, Queues, TRACEPARENT_HEADER};

/// Header naming the queue a dead letter came from (so it can be replayed there).
pub const ORIGIN_QUEUE_HEADER: &str = "x-ldt-origin-queue";
/// Header saying why a message was parked.
pub const REASON_HEADER: &str = "x-ldt-reason";

/// Why a handler did not process a message.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// A dependency (the database) failed: give the message back and try again later.
    #[error("transient failure: {0}")]
    Transient(#[from] anyhow::Error),
    /// The message can never be processed: park it as a dead letter.
    #[error("poison message: {0}")]
    Poison(String),
}

impl From<sqlx::Error> for HandleError {
    fn from(e: sqlx::Error) -> Self {
        HandleError::Transient(e.into())
    }
}

/// A delivery's envelope; undecodable messages are poison.
pub fn decode(msg: &Incoming) -> Result<&Envelope, HandleError> {
    msg.envelope()
        .map_err(|reason| HandleError::Poison(reason.to_owned()))
}

/// A service's message handler.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        msg: &Incoming,
    ) -> impl std::future::Future<Output = Result<(), HandleError>> + Send;

    /// Whether a delivery is to be handled on its own, outside the batches and their
    /// in-flight limit: one that will wait long (an injected stall) must not hold up others.
    fn runs_alone(&self, _msg: &Incoming) -> bool {
        false
    }

    /// Called when a delivery is parked because it failed for good (not for poison: that
    /// never reached the service's logic), before it is acked: a step service tells the saga
    /// that its compensation cannot succeed. An error gives the delivery back to be tried
    /// (and parked) again.
    fn parked(
        &self,
        _msg: &Incoming,
        _reason: &str,
    ) -> impl std::future::Future<Output = Result<(), HandleError>> + Send {
        async { Ok(()) }
    }

    /// Handles the deliveries that arrived together; one result per delivery, in order. By
    /// default each on its own, concurrently, inside its own span. Handlers on the hot path
    /// override it to apply a batch in one transaction.
    fn handle_batch(
        &self,
        batch: &[Delivery],
    ) -> impl std::future::Future<Output = Vec<Result<(), HandleError>>> + Send {
        async move {
            futures_util::future::join_all(
                batch
                    .iter()
                    .map(|d| self.handle(&d.msg).instrument(d.span.clone())),
            )
            .await
        }
    }
}

/// A delivery with the consumer span it is handled in.
pub struct Delivery {
    pub msg: Incoming,
    pub span: tracing::Span,
}

/// Most deliveries taken into one batch.
const MAX_BATCH: usize = 100;

/// What a consumer loop needs besides its handler.
#[derive(Clone)]
pub struct Consumer {
    pub bus: Bus,
    pub queues: Queues,
    pub queue: String,
    /// The service consuming (for spans and metrics).
    pub service: &'static str,
    pub prefetch: u16,
    /// Batches handled at once. While they run, new deliveries gather into the next batch:
    /// a busy consumer commits a few large transactions instead of many small ones that
    /// contend for the same rows and each wait for their own WAL flush.
    pub batches_in_flight: usize,
    /// How long a small batch may wait for more deliveries while the queue is busy
    /// (`--linger-ms`); zero: never.
    pub linger: Duration,
    /// Tries of a message failing the same way before it is parked as a dead letter (a
    /// failure to reach the database, or a serialization conflict, is retried for ever).
    pub max_attempts: u32,
    pub metrics: Metrics,
    /// The failures of the messages being retried (classic queues do not count redeliveries).
    pub attempts: Arc<Attempts>,
}

/// How often each message being retried has failed, and how.
#[derive(Default)]
pub struct Attempts(std::sync::Mutex<std::collections::HashMap<String, (u32, String)>>);

/// A batch this large is not held back to grow: lingering is for the nearly empty ones.
const LINGER_ENOUGH: usize = 8;

/// How fast work arrives (deliveries on one subscription, new orders at the intake): whether
/// it is busy enough that the next arrival is likely within a linger, so a small batch waits
/// for it.
#[derive(Default)]
pub struct Pace {
    last: Option<tokio::time::Instant>,
    /// Mean gap between deliveries (exponentially weighted, 1/8 to the newest; a gap counts
    /// at most four lingers, so one lull does not hide a busy queue for long).
    mean_gap: Duration,
}

impl Pace {
    /// Notes a delivery at `now`; whether the queue is busy for a linger of `linger`: this
    /// delivery came less than twice the linger after the last, and so did they on average.
    /// The first delivery after a lull (or ever) never waits.
    pub fn arrived(&mut self, now: tokio::time::Instant, linger: Duration) -> bool {
        let busy_below = linger.saturating_mul(2);
        let Some(last) = self.last.replace(now) else {
            return false;
        };
        let gap = now
            .saturating_duration_since(last)
            .min(busy_below.saturating_mul(2));
        // The first gap is the mean so far: started from zero, the mean would take a few
        // dozen arrivals to reach the pace.
        self.mean_gap = if self.mean_gap.is_zero() {
            gap
        } else {
            (self.mean_gap.saturating_mul(7) + gap) / 8
        };
        gap <= busy_below && self.mean_gap <= busy_below
    }

    /// How many arrivals a wait of `wait` brings at the recent pace, to the nearest (at least
    /// one; `usize::MAX` before any gap is known).
    pub fn expected_within(&self, wait: Duration) -> usize {
        let gap = self.mean_gap.as_nanos();
        if gap == 0 {
            return usize::MAX;
        }
        usize::try_from(wait.as_nanos().saturating_add(gap / 2) / gap)
            .unwrap_or(usize::MAX)
            .max(1)
    }
}

/// Messages whose failures are remembered, at most: past it, the oldest memories go (a
/// message another replica took never comes back to be forgotten).
const REMEMBERED: usize = 10_000;

impl Attempts {
    /// Records a failure of message `id`; the number of consecutive tries that failed with
    /// this same error.
    fn failed(&self, id: &str, error: &str) -> u32 {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= REMEMBERED && !map.contains_key(id) {
            map.clear();
        }
        let entry = map.entry(id.to_owned()).or_insert((0, String::new()));
        if entry.1 != error {
            *entry = (0, error.to_owned());
        }
        entry.0 = entry.0.saturating_add(1);
        entry.0
    }

    fn forget(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// Whether an error is the kind a retry mends by itself, however many it takes: the database
/// or the broker unreachable, a connection cut, a serialization conflict or deadlock.
pub fn is_retryable_for_ever(e: &anyhow::Error) -> bool {
    for cause in e.chain() {
        if let Some(e) = cause.downcast_ref::<sqlx::Error>() {
            return crate::db::is_transient(e);
        }
        if cause.downcast_ref::<crate::bus::BusError>().is_some() {
            return true;
        }
    }
    false
}

/// The wait before a failed message is given back, after `attempt` failures: 100 ms,
/// doubling, at most 5 s.
fn retry_backoff(attempt: u32) -> Duration {
    Duration::from_millis(100u64 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(5))
}

/// Consumes `queue` until shutdown, handling deliveries in batches (at most
/// `batches_in_flight` at once, plus any the handler wants on their own), re-subscribing with
/// backoff when the broker goes away.
pub async fn consume<H: Handler>(consumer: Consumer, handler: Arc<H>, shutdown: CancellationToken) {
    let Consumer {
        ref bus,
        ref queue,
        prefetch,
        ..
    } = consumer;
    let tracker = TaskTracker::new();
    let in_flight = Arc::new(tokio::sync::Semaphore::new(
        consumer.batches_in_flight.max(1),
    ));
    let mut failures: u32 = 0;
    let linger = consumer.linger;
    let max_batch = MAX_BATCH.min(usize::from(prefetch));
    while !shutdown.is_cancelled() {
        let mut sub = match bus.subscribe(queue, prefetch).await {
            Ok(sub) => {
                if failures > 0 {
                    tracing::info!(%queue, "consumer re-subscribed");
                }
                failures = 0;
                sub
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let backoff = Duration::from_millis(100u64 << failures.min(4));
                tracing::warn!(%queue, error = %e, ?backoff, "cannot subscribe; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let mut pace = Pace::default();
        loop {
            let next = tokio::select! {
                next = sub.next() => next,
                _ = shutdown.cancelled() => break,
            };
            match next {
                Some(Ok(msg)) => {
                    let busy =
                        !linger.is_zero() && pace.arrived(tokio::time::Instant::now(), linger);
                    if handler.runs_alone(&msg) {
                        spawn_batch(&tracker, &handler, &consumer, vec![msg], None);
                        continue;
                    }
                    // Wait for a free slot first: what arrives meanwhile joins this batch.
                    let permit = tokio::select! {
                        permit = in_flight.clone().acquire_owned() => permit.ok(),
                        _ = shutdown.cancelled() => break,
                    };
                    // Take whatever else has already arrived: one batch, one transaction.
                    let mut batch = vec![msg];
                    let mut broken = false;
                    while batch.len() < max_batch {
                        match futures_util::FutureExt::now_or_never(sub.next()) {
                            Some(Some(Ok(m))) if handler.runs_alone(&m) => {
                                spawn_batch(&tracker, &handler, &consumer, vec![m], None);
                            }
                            Some(Some(Ok(m))) => batch.push(m),
                            Some(Some(Err(_)) | None) => {
                                broken = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    // A busy queue and a small batch: wait a moment for more to join it (each
                    // batch is a transaction and its answers a bundle: fewer of each per message).
                    if busy && !broken && batch.len() < LINGER_ENOUGH.min(max_batch) {
                        let before = batch.len();
                        let until = tokio::time::Instant::now() + linger;
                        while batch.len() < LINGER_ENOUGH.min(max_batch) {
                            match tokio::time::timeout_at(until, sub.next()).await {
                                Ok(Some(Ok(m))) if handler.runs_alone(&m) => {
                                    spawn_batch(&tracker, &handler, &consumer, vec![m], None);
                                }
                                Ok(Some(Ok(m))) => {
                                    pace.arrived(tokio::time::Instant::now(), linger);
                                    batch.push(m);
                                }
                                Ok(Some(Err(_)) | None) => {
                                    broken = true;
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        let outcome = if batch.len() > before {
                            "joined"
                        } else {
                            "in_vain"
                        };
                        consumer.metrics.inc(
                            "ldt_consumer_lingers_total",
                            "Small batches that waited for more deliveries (--linger-ms), by \
                             queue and whether any joined.",
                            &[("queue", queue.as_str()), ("outcome", outcome)],
                            1,
                        );
                    }
                    spawn_batch(&tracker, &handler, &consumer, batch, permit);
                    if broken {
                        tracing::warn!(%queue, "subscription ended; re-subscribing");
                        break;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(%queue, error = %e, "delivery failed; re-subscribing");
                    break;
                }
                None => {
                    tracing::warn!(%queue, "subscription ended; re-subscribing");
                    break;
                }
            }
        }
        if shutdown.is_cancelled() {
            // Let in-flight handlers finish and ack before the channel closes; whatever is
            // still unacked then goes back to the queue for the next replica.
            tracker.close();
            tracker.wait().await;
            sub.close().await;
            return;
        }
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100u64 << failures.min(4))) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Handles a batch in a task of its own, holding its in-flight slot until it is settled.
fn spawn_batch<H: Handler>(
    tracker: &TaskTracker,
    handler: &Arc<H>,
    consumer: &Consumer,
    batch: Vec<Incoming>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    // Batches against messages (`ldt_messages_total`) is how well batching forms at a given
    // load: each batch costs a transaction and a round of acks whatever its size.
    consumer.metrics.inc(
        "ldt_consumer_batches_total",
        "Batches of deliveries handed to a handler together, by queue (ldt_messages_total \
         over this is the mean batch size).",
        &[("queue", consumer.queue.as_str())],
        1,
    );
    let handler = handler.clone();
    let consumer = consumer.clone();
    let settling = tracker.clone();
    tracker.spawn(async move {
        process(&*handler, &consumer, batch, &settling).await;
        drop(permit);
    });
}

/// The saga step a message concerns, for span attributes.
fn step_of(body: &Message) -> Option<&'static str> {
    match body {
        Message::Debit { .. } | Message::Refund => Some("payment"),
        Message::Reserve { .. } | Message::Release => Some("inventory"),
        Message::Deliver { .. } | Message::CancelDelivery => Some("delivery"),
        Message::StepResult { step, .. }
        | Message::Compensated { step }
        | Message::CompensationFailed { step, .. } => Some(step.as_str()),
        Message::OrderPlaced { .. } | Message::OrderFinished { .. } | Message::CancelOrder => None,
    }
}

async fn process<H: Handler>(
    handler: &H,
    consumer: &Consumer,
    batch: Vec<Incoming>,
    tracker: &TaskTracker,
) {
    let deliveries: Vec<Delivery> = batch
        .into_iter()
        .map(|msg| {
            let span = consumer_span(consumer, &msg);
            Delivery { msg, span }
        })
        .collect();
    let outcomes = handler.handle_batch(&deliveries).await;
    // All at once: the AMQP client then writes the batch's acks to the socket together, one
    // system call (and one read for the broker) instead of one per message.
    futures_util::future::join_all(deliveries.into_iter().zip(outcomes).map(
        |(delivery, outcome)| {
            let span = delivery.span.clone();
            async move {
                settle(
                    handler,
                    consumer,
                    tracker,
                    delivery.msg,
                    &delivery.span,
                    outcome,
                )
                .await
            }
            .instrument(span)
        },
    ))
    .await;
}

/// The consumer span of one delivery (messaging semantic conventions), continuing the
/// producer's trace from the message's `traceparent` header.
fn consumer_span(consumer: &Consumer, msg: &Incoming) -> tracing::Span {
    let queue = consumer.queue.as_str();
    let envelope = msg.envelope().ok();
    let body = envelope.map(|e| &e.body);
    let compensation = matches!(
        body,
        Some(
            Message::Refund
                | Message::Release
                | Message::CancelDelivery
                | Message::Compensated { .. }
                | Message::CompensationFailed { .. }
        )
    );
    let span = tracing::info_span!(
        "process",
        otel.name = %format!("process {queue}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = consumer.bus.system(),
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = %queue,
        messaging.message.id = msg.message_id.as_deref().unwrap_or(""),
        ldt.service = consumer.service,
        ldt.message.type = body.map(Message::kind).unwrap_or("unknown"),
        ldt.order_id = %envelope.map(|e| e.order_id.to_string()).unwrap_or_default(),
        ldt.step = body.and_then(step_of).unwrap_or(""),
        ldt.compensation = compensation,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    adopt(
        &span,
        msg.headers.get(TRACEPARENT_HEADER).map(String::as_str),
    );
    span
}

/// What becomes of a delivery.
enum Verdict {
    Ack,
    /// Parked as a dead letter with the reason; `failed`: it reached the service's logic and
    /// failed there for good (the handler hears of it), as opposed to poison.
    Park {
        reason: String,
        failed: bool,
    },
    /// Given back to be tried again after the wait.
    Retry(Duration),
}

/// Acks, parks or requeues one delivery according to how its handling ended.
async fn settle<H: Handler>(
    handler: &H,
    consumer: &Consumer,
    tracker: &TaskTracker,
    msg: Incoming,
    span: &tracing::Span,
    outcome: Result<(), HandleError>,
) {
    let (bus, queue, dlq) = (
        &consumer.bus,
        consumer.queue.as_str(),
        consumer.queues.dead_letters(),
    );
    let dlq = dlq.as_str();
    let id = msg.message_id.clone().unwrap_or_default();
    let verdict = match outcome {
        Ok(()) => Verdict::Ack,
        Err(HandleError::Poison(reason)) => Verdict::Park {
            reason,
            failed: false,
        },
        Err(HandleError::Transient(e)) => {
            let error = format!("{e:#}");
            let attempt = consumer.attempts.failed(&id, &error);
            if !is_retryable_for_ever(&e) && attempt >= consumer.max_attempts {
                Verdict::Park {
                    reason: format!("failed {attempt} times the same way: {error}"),
                    failed: true,
                }
            } else {
                // Once, not at every try: a message failing for minutes would fill the log.
                if attempt == 1 || attempt.is_multiple_of(100) {
                    tracing::warn!(%queue, error = %error, attempt, "handler failed; the message will be tried again");
                } else {
                    tracing::debug!(%queue, error = %error, attempt, "handler failed again");
                }
                Verdict::Retry(retry_backoff(attempt))
            }
        }
    };
    let label = match &verdict {
        Verdict::Ack => "ok",
        Verdict::Park { .. } => "dead_lettered",
        Verdict::Retry(_) => "retried",
    };
    if label != "ok" {
        span.record("otel.status_code", "ERROR");
    }
    consumer.metrics.inc(
        "ldt_messages_total",
        "Messages consumed, by queue and outcome (ok, retried, dead_lettered).",
        &[("queue", queue), ("outcome", label)],
        1,
    );
    let acked = match verdict {
        Verdict::Ack => {
            consumer.attempts.forget(&id);
            msg.ack().await
        }
        Verdict::Park { reason, failed } => {
            if failed {
                tracing::error!(%queue, %reason, "parking a message that keeps failing as a dead letter");
            } else {
                tracing::warn!(%queue, %reason, "parking poison message as a dead letter");
            }
            let parked = match park(bus, queue, dlq, &msg, &reason).await {
                Err(e) => Err(format!("cannot park dead letter: {e}")),
                Ok(()) if failed => handler
                    .parked(&msg, &reason)
                    .await
                    .map_err(|e| format!("parked, but the service could not record it: {e}")),
                Ok(()) => Ok(()),
            };
            match parked {
                Ok(()) => {
                    consumer.attempts.forget(&id);
                    msg.ack().await
                }
                Err(e) => {
                    tracing::error!(%queue, error = %e, "requeueing");
                    msg.nack_requeue(Duration::from_millis(500)).await
                }
            }
        }
        Verdict::Retry(wait) => {
            // Given back after the wait, without holding the batch's slot meanwhile.
            tracker.spawn(
                async move {
                    if let Err(e) = msg.nack_requeue(wait).await {
                        tracing::warn!(error = %e, "nack failed; the message will be redelivered");
                    }
                }
                .instrument(span.clone()),
            );
            Ok(())
        }
    };
    if let Err(e) = acked {
        // The channel is gone: the broker requeues the delivery by itself.
        tracing::warn!(%queue, error = %e, "ack failed; the message will be redelivered");
    }
}

/// Publishes a copy of `msg` to the dead-letter queue, with where it came from and why.
async fn park(
    bus: &Bus,
    queue: &str,
    dlq: &str,
    msg: &Incoming,
    reason: &str,
) -> Result<(), crate::bus::BusError> {
    let mut headers: Vec<(String, String)> = msg
        .headers
        .iter()
        .filter(|(k, _)| k.as_str() != ORIGIN_QUEUE_HEADER && k.as_str() != REASON_HEADER)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    headers.push((ORIGIN_QUEUE_HEADER.to_owned(), queue.to_owned()));
    headers.push((
        REASON_HEADER.to_owned(),
        reason.chars().take(1000).collect(),
    ));
    let out = Outgoing {
        queue: dlq.to_owned(),
        message_id: msg
            .message_id
            .clone()
            .unwrap_or_else(|| Uuid::now_v7().to_string()),
        payload: msg.payload.clone(),
        headers,
    };
    bus.publish(std::slice::from_ref(&out)).await
}

#[cfg(test)]
mod tests {
    use super::Pace;
    use std::time::Duration;

    #[test]
    fn work_is_busy_only_when_it_comes_faster_than_twice_the_linger() {
        let linger = Duration::from_millis(5);
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut pace = Pace::default();
        // The first arrival ever never waits; the next ones 3 ms apart (within 10 ms) do.
        assert!(!pace.arrived(at(0), linger));
        assert!(pace.arrived(at(3), linger));
        assert!(pace.arrived(at(6), linger));
        // After a lull longer than twice the linger, the next one goes at once...
        assert!(!pace.arrived(at(100), linger));
        // ...but one soon after it is held again: a lull weighs at most four lingers in the
        // mean, so one quiet moment does not hide a busy queue for long.
        assert!(pace.arrived(at(103), linger));
        // Work arriving 30 ms apart (30/s on one queue) is never held.
        let mut slow = Pace::default();
        assert!((0..20).all(|i| !slow.arrived(at(30 * i), linger)));
    }

    #[test]
    fn the_arrivals_expected_within_a_wait_follow_the_recent_pace() {
        let linger = Duration::from_millis(10);
        let t0 = tokio::time::Instant::now();
        let mut pace = Pace::default();
        assert_eq!(
            pace.expected_within(linger),
            usize::MAX,
            "no pace known yet"
        );
        // Steadily 4 ms apart: 13 ms brings three arrivals and a quarter (three, to the
        // nearest), 7 ms one and three quarters (two), 1 ms none but counts one.
        for i in 0..100 {
            pace.arrived(t0 + Duration::from_millis(4 * i), linger);
        }
        assert_eq!(pace.expected_within(Duration::from_millis(13)), 3);
        assert_eq!(pace.expected_within(Duration::from_millis(7)), 2);
        assert_eq!(pace.expected_within(Duration::from_millis(1)), 1);
        // The pace doubles: before long, the same wait brings twice as many.
        for i in 0..100 {
            pace.arrived(t0 + Duration::from_millis(400 + 2 * i), linger);
        }
        assert_eq!(pace.expected_within(Duration::from_millis(13)), 7);
    }
}
