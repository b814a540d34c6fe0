//! The orchestrator's work: turn each message (and each due deadline, and each operator's
//! action) into an event, run it through the saga ([`super::saga`]), and have the store
//! write the saga, its log and its commands in one transaction (on PostgreSQL, a message on
//! its own, a batch of `OrderPlaced`s and a batch of answers in one or two statements that
//! commit by themselves). What the saga asks to be counted or told goes to the metrics and
//! the log here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use ldt_contract::{Envelope, Message, Queues};
use ldt_runtime::consumer::{Delivery, HandleError, Handler, decode};
use ldt_runtime::crash::{Crash, Point};
use ldt_runtime::db::{Held, Pool, now_ms};
use ldt_runtime::metrics::Metrics;
use ldt_runtime::outbox::{OutboxRow, OutboxSignal, ROWS_PER_INSERT};
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::saga::{self, Event, MetricEvent, Notice, Opening, Policy, Saga, Terms};
use super::store::{self, Pending, Stored};

#[derive(Clone)]
pub struct Orchestrator {
    pub pool: Pool,
    /// The connections of the consumer's and the deadline poller's transactions.
    pub conns: Arc<Held>,
    pub queues: Queues,
    pub signal: OutboxSignal,
    pub policy: Policy,
    pub crash: Crash,
    pub metrics: Metrics,
}

/// What a message asks of the orchestrator.
enum Work {
    /// Start a saga (an `OrderPlaced`), its first command sent by whom.
    Start(Terms, Opening),
    /// Something happened to a saga; with the saga's opening (its terms and when the order
    /// was placed) when the order service opened it, so the saga can start here if its held
    /// back `OrderPlaced` has not come (see [`ldt_contract::Envelope::opened`]).
    Event(Event, Option<(Terms, i64)>),
}

/// When the saga an `OrderPlaced` starts began: when its order was placed, if the order
/// service sent the slip then (its deadline runs from there, as for a saga started from an
/// answer's opening, however long the `OrderPlaced` was held back); else now, as the
/// orchestrator sends the slip.
fn started_at(env: &Envelope, opened_by: Opening, now: i64) -> i64 {
    match opened_by {
        Opening::OrderService => env.at_ms.min(now),
        Opening::Orchestrator => now,
    }
}

/// The saga an envelope's opening starts, if it carries one.
fn opened_of(env: &Envelope) -> Result<Option<(Terms, i64)>, HandleError> {
    let Some(opened) = &env.opened else {
        return Ok(None);
    };
    let terms = Terms {
        username: opened.username.clone(),
        price: opened.price,
        amount: opened.amount,
        faults: opened.faults,
    };
    if let Some(why) = saga::invalid_terms(&terms) {
        return Err(HandleError::Poison(format!(
            "{} whose opening has {why}",
            env.body.kind()
        )));
    }
    Ok(Some((terms, opened.placed_ms)))
}

fn work_of(env: &Envelope) -> Result<Work, HandleError> {
    Ok(match &env.body {
        Message::OrderPlaced {
            username,
            price,
            amount,
            faults,
            slip_sent,
        } => {
            let terms = Terms {
                username: username.clone(),
                price: *price,
                amount: *amount,
                faults: *faults,
            };
            if let Some(why) = saga::invalid_terms(&terms) {
                return Err(HandleError::Poison(format!("OrderPlaced with {why}")));
            }
            let opened_by = if *slip_sent {
                Opening::OrderService
            } else {
                Opening::Orchestrator
            };
            Work::Start(terms, opened_by)
        }
        Message::StepResult { step, outcome } => Work::Event(
            Event::Answered {
                step: *step,
                outcome: *outcome,
            },
            opened_of(env)?,
        ),
        Message::Compensated { step } => {
            Work::Event(Event::Compensated { step: *step }, opened_of(env)?)
        }
        Message::CompensationFailed { step, reason } => Work::Event(
            Event::CompensationFailed {
                step: *step,
                reason: reason.clone(),
            },
            opened_of(env)?,
        ),
        Message::CancelOrder => Work::Event(Event::Cancel, opened_of(env)?),
        other => {
            return Err(HandleError::Poison(format!(
                "the orchestrator does not handle `{}` messages",
                other.kind()
            )));
        }
    })
}

/// An event for a saga this orchestrator has not seen. The order service's `OrderPlaced` may
/// still be on its way: with `--order-opens-saga` it sends the saga's first command beside
/// it, so a step's answer can come first (the `OrderPlaced` in a batch committing this
/// moment, here or at another replica; a publish that failed and is sent again by the
/// outbox's sweep). The event waits a moment ([`EARLY_WAITS`]) and is then given back to be
/// tried again; one for an order that never gets a saga is parked after the last try.
fn unknown_saga(env: &Envelope) -> HandleError {
    HandleError::Transient(anyhow::anyhow!(
        "{} for order {}, whose saga has not started (its OrderPlaced may still be on its way)",
        env.body.kind(),
        env.order_id
    ))
}

/// How long an event whose saga has not started waits, and tries again, before it is given
/// back to the queue: its `OrderPlaced` is most often in a batch committing at this moment,
/// and a message given back comes again 100 ms later at the soonest.
const EARLY_WAITS: [Duration; 3] = [
    Duration::from_millis(5),
    Duration::from_millis(15),
    Duration::from_millis(40),
];

impl Orchestrator {
    /// Counts and tells what a transition asks for, in the current span.
    fn observe(&self, saga: &Saga, fx: &saga::Effects) {
        for m in &fx.metrics {
            match m {
                MetricEvent::StepLatency { step, outcome, ms } => self.metrics.observe_ms(
                    "ldt_step_latency_ms",
                    "Time from the command (or routing slip) a step answered to its answer.",
                    &[
                        ("step", step.as_str()),
                        ("outcome", &format!("{outcome:?}").to_lowercase()),
                    ],
                    *ms as f64,
                ),
                MetricEvent::Compensated { step } => self.metrics.inc(
                    "ldt_compensations_total",
                    "Compensations applied, by step.",
                    &[("step", step.as_str())],
                    1,
                ),
                MetricEvent::CompensationRetried { step } => self.metrics.inc(
                    "ldt_compensation_retries_total",
                    "Compensations sent again because the step did not answer.",
                    &[("step", step.as_str())],
                    1,
                ),
                MetricEvent::TimedOut { step } => self.metrics.inc(
                    "ldt_step_timeouts_total",
                    "Orders past their deadline, by the step their slip last started from.",
                    &[("step", step.as_str())],
                    1,
                ),
            }
        }
        let order_id = saga.order_id;
        for notice in &fx.notices {
            match notice {
                Notice::TimedOut { step } => tracing::info!(%order_id, step = step.as_str(),
                    "deadline passed: the order ends TIMEOUT"),
                Notice::Unanswered { step, attempts } => tracing::error!(%order_id,
                    step = step.as_str(), attempts, "compensation still unanswered; retrying"),
                Notice::Stuck { step, reason } => tracing::error!(%order_id, step = step.as_str(),
                    %reason, "compensation cannot succeed: the saga is stuck until an operator retries it \
                    (POST /api/v1/sagas/{order_id}/retry)"),
                Notice::Retried { step } => {
                    tracing::info!(%order_id, step = step.as_str(), "compensation retried by an operator")
                }
                Notice::Cancelled => tracing::info!(%order_id, "order cancelled by an operator"),
            }
        }
    }

    /// Applies `work` (envelope, span) in one transaction: inserts the sagas the
    /// `OrderPlaced`s start and locks those the other messages concern (one statement each),
    /// then runs every transition in memory, in the order given, each in its message's span.
    /// Returns the ids of the messages left out because their saga has not started.
    async fn apply_all(
        &self,
        tx: &mut ldt_runtime::db::Conn,
        pending: &mut Pending,
        work: &[(&Envelope, tracing::Span)],
    ) -> Result<Vec<Uuid>, HandleError> {
        let now = now_ms();
        let mut starts = Vec::new();
        let mut events = Vec::new();
        let mut openings = Vec::new();
        for (env, span) in work {
            match work_of(env)? {
                Work::Start(terms, opened_by) => {
                    let at = started_at(env, opened_by, now);
                    let (saga, fx) = saga::start(env.order_id, terms, opened_by, &self.policy, at);
                    let traceparent = span.in_scope(ldt_runtime::telemetry::current_traceparent);
                    starts.push((saga, fx, traceparent, span, false));
                }
                Work::Event(event, opened) => {
                    if let Some((terms, placed_ms)) = opened {
                        openings.push((env.order_id, terms, placed_ms, span));
                    }
                    events.push((env, event, span));
                }
            }
        }
        // An event carrying its saga's opening starts the saga, as it was when its order was
        // placed, unless an `OrderPlaced` in this batch does, or the saga exists already (the
        // insert below then leaves it as it is, and the event applies to it).
        for (order_id, terms, placed_ms, span) in openings {
            if starts.iter().any(|(saga, ..)| saga.order_id == order_id) {
                continue;
            }
            let (saga, fx) = saga::start(
                order_id,
                terms,
                Opening::OrderService,
                &self.policy,
                placed_ms,
            );
            let traceparent = span.in_scope(ldt_runtime::telemetry::current_traceparent);
            starts.push((saga, fx, traceparent, span, true));
        }
        let new: Vec<(&Saga, Option<String>)> = starts
            .iter()
            .map(|(saga, _, tp, _, _)| (saga, tp.clone()))
            .collect();
        let inserted = store::insert_sagas(tx, &new).await?;
        let mut answered: Vec<Uuid> = events
            .iter()
            .map(|(env, _, _)| env.order_id)
            .filter(|id| !inserted.contains(id))
            .collect();
        answered.sort();
        answered.dedup();
        store::lock(tx, pending, &answered).await?;
        for (saga, fx, traceparent, span, from_opening) in starts {
            let _entered = span.enter();
            let started =
                inserted.contains(&saga.order_id) && pending.saga(&saga.order_id).is_none();
            if from_opening {
                if started {
                    self.early_event("started");
                    pending.add(&self.queues, saga.order_id, &fx, saga.updated_ms);
                    pending.hold(Stored { saga, traceparent });
                }
                continue;
            }
            // The first `OrderPlaced` of a new saga starts it; any other is a duplicate.
            if !started {
                tracing::info!(order_id = %saga.order_id, "duplicate OrderPlaced ignored");
                let ignored = saga::Effects {
                    log: vec![saga::LogLine {
                        step: saga.step,
                        kind: saga::LogKind::OrderPlaced,
                        event: "duplicate (ignored)".into(),
                    }],
                    ..Default::default()
                };
                pending.add(&self.queues, saga.order_id, &ignored, now);
                continue;
            }
            pending.add(&self.queues, saga.order_id, &fx, now);
            pending.hold(Stored { saga, traceparent });
        }
        let mut not_started = Vec::new();
        for (env, event, span) in events {
            let _entered = span.enter();
            let Some(stored) = pending.saga(&env.order_id) else {
                // Left out, not failing the others: see [`unknown_saga`].
                not_started.push(env.id);
                continue;
            };
            let (after, fx) = saga::apply(&stored.saga, event, &self.policy, now);
            self.observe(&after, &fx);
            pending.change(&self.queues, after, &fx, now);
        }
        Ok(not_started)
    }

    /// Applies `work` (envelope, delivery span) in one transaction, sorted by order id (so
    /// that concurrent transactions lock sagas in the same order). Each message gets a
    /// database span of its own in its trace, covering the statements it shares with the
    /// rest of the batch.
    /// Returns the ids of the messages left out because their saga has not started.
    async fn apply_batch(
        &self,
        work: &mut [(Envelope, tracing::Span)],
    ) -> Result<Vec<Uuid>, HandleError> {
        work.sort_by_key(|(env, _)| env.order_id);
        let spans: Vec<(&Envelope, tracing::Span)> = work
            .iter()
            .map(|(env, span)| {
                (
                    env,
                    span.in_scope(|| ldt_runtime::db::span(&self.pool, "sagas")),
                )
            })
            .collect();
        let mut conn = self.conns.get().await?;
        let mut tx = conn.begin().await?;
        let mut pending = Pending::default();
        let not_started = self.apply_all(&mut tx, &mut pending, &spans).await?;
        pending.write(&mut tx).await?;
        self.crash.commit(tx).await?;
        conn.reuse();
        self.signal.committed(pending.outbox);
        Ok(not_started)
    }

    /// Applies one message on its own (on PostgreSQL with one statement when it can). An
    /// event whose saga has not started waits a moment for it ([`EARLY_WAITS`]), and is then
    /// given back to be tried again.
    async fn apply_alone(&self, env: Envelope, span: tracing::Span) -> Result<(), HandleError> {
        if !ldt_runtime::db::is_sqlite(&self.pool) {
            match self.apply_one(&env, &span).await {
                Ok(true) => return Ok(()),
                Err(HandleError::Poison(reason)) => return Err(HandleError::Poison(reason)),
                Ok(false) | Err(HandleError::Transient(_)) => {}
            }
        }
        let mut work = [(env, span)];
        if self.apply_batch(&mut work).await?.is_empty() {
            return Ok(());
        }
        for wait in EARLY_WAITS {
            tokio::time::sleep(wait).await;
            if self.apply_batch(&mut work).await?.is_empty() {
                self.early_event("applied");
                return Ok(());
            }
        }
        self.early_event("given_back");
        Err(unknown_saga(&work[0].0))
    }

    fn early_event(&self, outcome: &str) {
        self.metrics.inc(
            "ldt_saga_early_events_total",
            "Events that came before their saga's OrderPlaced, by what followed: applied \
             after a short wait, or given back to the queue.",
            &[("outcome", outcome)],
            1,
        );
    }

    /// The saga a message starts, made in its span, as one statement writes it: an
    /// `OrderPlaced`'s (its log line, and its first command unless the order service sent it),
    /// or that of an event carrying its saga's opening, started as it was when its order was
    /// placed and then past the event, with the event's effects to be counted and told once
    /// written. `None` for an event without an opening, or a start that would send more than
    /// one command.
    fn start_of(
        &self,
        env: &Envelope,
        work: &Work,
        span: &tracing::Span,
        now: i64,
    ) -> Option<(store::Start, Option<saga::Effects>)> {
        let (terms, opened_by, at_ms, answer) = match work {
            Work::Start(terms, opened_by) => (
                terms.clone(),
                *opened_by,
                started_at(env, *opened_by, now),
                None,
            ),
            // Most often its saga has not started: its `OrderPlaced` is held back.
            Work::Event(event, Some((terms, at_ms))) => (
                terms.clone(),
                Opening::OrderService,
                *at_ms,
                Some(event.clone()),
            ),
            Work::Event(_, None) => return None,
        };
        let (saga, fx) = saga::start(env.order_id, terms, opened_by, &self.policy, at_ms);
        let mut lines: Vec<(saga::LogLine, i64)> = fx.log.into_iter().map(|l| (l, at_ms)).collect();
        let mut send = fx.send;
        let (saga, answered) = match answer {
            None => (saga, None),
            Some(event) => {
                let (after, fx) = saga::apply(&saga, event, &self.policy, now);
                lines.extend(fx.log.iter().cloned().map(|l| (l, now)));
                send.extend(fx.send.iter().cloned());
                (after, Some(fx))
            }
        };
        if send.len() > 1 {
            return None;
        }
        let (command, traceparent) = span.in_scope(|| {
            let command = send.pop().map(|cmd| {
                let mut first = Envelope::new(env.order_id, now, cmd.body);
                first.then = cmd.then;
                OutboxRow::of(&self.queues, &first)
            });
            (command, ldt_runtime::telemetry::current_traceparent())
        });
        Some((
            store::Start {
                saga,
                created_ms: at_ms,
                lines,
                command,
                traceparent,
            },
            answered,
        ))
    }

    /// PostgreSQL, a batch without a transaction: `OrderPlaced`s only, their sagas started
    /// with one statement; or answers (events) on distinct sagas only, read with one
    /// statement (no lock) and written with one that writes each saga only if it is still as
    /// it was read. Two round trips at most instead of a transaction's four. Returns the ids
    /// of the messages applied; the others (a duplicate `OrderPlaced`, an unknown saga, a
    /// saga changed meanwhile, a batch of both kinds or too big) are the transaction path's.
    async fn apply_in_few_statements(
        &self,
        work: &[(&Envelope, &tracing::Span)],
    ) -> Result<HashSet<Uuid>, HandleError> {
        let now = now_ms();
        let mut orders: Vec<Uuid> = work.iter().map(|(env, _)| env.order_id).collect();
        orders.sort_unstable();
        orders.dedup();
        if orders.len() != work.len() || work.len() > ROWS_PER_INSERT {
            return Ok(HashSet::new());
        }
        let mut starts = Vec::new();
        let mut events = Vec::new();
        for (env, span) in work {
            let work = work_of(env)?;
            if let Work::Event(event, None) = work {
                events.push((*env, event, *span));
                continue;
            }
            let start = self.start_of(env, &work, span, now);
            match start {
                Some((start, answered)) => starts.push((env.id, start, answered, *span)),
                None => return Ok(HashSet::new()),
            }
        }
        // Each message's database span covers the statements it shares with the others.
        let _db: Vec<tracing::Span> = work
            .iter()
            .map(|(_, span)| span.in_scope(|| ldt_runtime::db::span(&self.pool, "sagas")))
            .collect();
        match (starts.is_empty(), events.is_empty()) {
            (false, true) => self.start_all(starts).await,
            (true, false) => self.answer_all(&orders, events, now).await,
            _ => Ok(HashSet::new()),
        }
    }

    /// Starts sagas with one statement; the ids of the messages whose saga it started. A saga
    /// started from an answer's opening has the answer's effects counted and told here.
    async fn start_all(
        &self,
        starts: Vec<(Uuid, store::Start, Option<saga::Effects>, &tracing::Span)>,
    ) -> Result<HashSet<Uuid>, HandleError> {
        let (rows, rest): (Vec<store::Start>, Vec<_>) = starts
            .into_iter()
            .map(|(message, start, answered, span)| (start, (message, answered, span)))
            .unzip();
        let mut conn = self.conns.get().await?;
        self.crash.at(Point::BeforeCommit);
        let (inserted, outbox) = store::insert_started(&mut conn, &rows).await?;
        conn.reuse();
        self.crash.at(Point::AfterCommit);
        self.signal.committed(outbox);
        let mut started = HashSet::with_capacity(rows.len());
        for (start, (message, answered, span)) in rows.iter().zip(rest) {
            if !inserted.contains(&start.saga.order_id) {
                continue;
            }
            if let Some(fx) = answered {
                self.early_event("started");
                span.in_scope(|| self.observe(&start.saga, &fx));
            }
            started.insert(message);
        }
        Ok(started)
    }

    /// Applies events on distinct sagas (`orders`, sorted): one read, one guarded write. The
    /// ids of the messages whose saga it wrote; each of those is counted and told here.
    async fn answer_all(
        &self,
        orders: &[Uuid],
        events: Vec<(&Envelope, Event, &tracing::Span)>,
        now: i64,
    ) -> Result<HashSet<Uuid>, HandleError> {
        let mut conn = self.conns.get().await?;
        let read = store::read_versioned_all(&mut conn, orders).await?;
        let mut pending = Pending::default();
        let mut versions = HashMap::with_capacity(read.len());
        let mut applied = Vec::with_capacity(events.len());
        for (env, event, span) in events {
            // An unknown saga is left to the transaction path (see [`unknown_saga`]).
            let Some((stored, version)) = read.get(&env.order_id) else {
                continue;
            };
            let (after, fx) = saga::apply(&stored.saga, event, &self.policy, now);
            pending.hold(stored.clone());
            span.in_scope(|| pending.change(&self.queues, after.clone(), &fx, now));
            versions.insert(env.order_id, version.clone());
            applied.push((env.id, after, fx, span));
        }
        if applied.is_empty() || !pending.fits_one_statement(true) {
            conn.reuse();
            return Ok(HashSet::new());
        }
        self.crash.at(Point::BeforeCommit);
        let written = pending
            .write_in_one_statement(&mut conn, Some(&versions))
            .await?;
        conn.reuse();
        self.crash.at(Point::AfterCommit);
        self.signal.committed(pending.outbox);
        Ok(applied
            .into_iter()
            .filter(|(_, after, _, _)| written.contains(&after.order_id))
            .map(|(message, after, fx, span)| {
                span.in_scope(|| self.observe(&after, &fx));
                message
            })
            .collect())
    }

    /// PostgreSQL, a batch of one message, without a transaction of its own (two round
    /// trips at most instead of five or six). An `OrderPlaced` inserts its saga, log line and
    /// command (unless the order service sent it) with one statement. Any other message reads
    /// its saga, runs the transition, and writes the result with one statement that applies
    /// only if the saga is still as it was read. `Ok(false)`: nothing was written (a
    /// duplicate `OrderPlaced`, an unknown saga, a saga changed meanwhile, a transition too
    /// big for one statement): the transaction path takes the message.
    async fn apply_one(&self, env: &Envelope, span: &tracing::Span) -> Result<bool, HandleError> {
        let now = now_ms();
        let db = span.in_scope(|| ldt_runtime::db::span(&self.pool, "sagas"));
        let mut conn = self.conns.get().await?;
        let work = work_of(env)?;
        let start = self.start_of(env, &work, span, now);
        let event = match work {
            Work::Event(event, _) => Some(event),
            Work::Start(..) => None,
        };
        if let Some((start, answered)) = start {
            self.crash.at(Point::BeforeCommit);
            let (inserted, outbox) = store::insert_started(&mut conn, std::slice::from_ref(&start))
                .instrument(db.clone())
                .await?;
            if !inserted.is_empty() {
                conn.reuse();
                self.crash.at(Point::AfterCommit);
                if let Some(fx) = answered {
                    self.early_event("started");
                    span.in_scope(|| self.observe(&start.saga, &fx));
                }
                self.signal.committed(outbox);
                return Ok(true);
            }
        }
        // A duplicate `OrderPlaced`, or an event: its saga exists (or has not started).
        let Some(event) = event else {
            conn.reuse();
            return Ok(false);
        };
        let read = store::read_versioned_all(&mut conn, &[env.order_id])
            .instrument(db.clone())
            .await?;
        let Some((stored, version)) = read.into_values().next() else {
            conn.reuse();
            return Ok(false);
        };
        let (after, fx) = saga::apply(&stored.saga, event, &self.policy, now);
        let mut pending = Pending::default();
        pending.hold(stored);
        span.in_scope(|| pending.change(&self.queues, after.clone(), &fx, now));
        if !pending.fits_one_statement(true) {
            conn.reuse();
            return Ok(false);
        }
        self.crash.at(Point::BeforeCommit);
        let versions = HashMap::from([(env.order_id, version)]);
        let written = pending
            .write_in_one_statement(&mut conn, Some(&versions))
            .instrument(db)
            .await?;
        if written.is_empty() {
            conn.reuse();
            return Ok(false);
        }
        conn.reuse();
        self.crash.at(Point::AfterCommit);
        // Counted and told once written: the transaction path does it otherwise.
        span.in_scope(|| self.observe(&after, &fx));
        self.signal.committed(pending.outbox);
        Ok(true)
    }

    /// An operator's event (retry, cancel) on one saga, in a transaction of its own; the
    /// saga as it is afterwards, `None` when there is no such saga.
    pub async fn operator(
        &self,
        order_id: Uuid,
        event: Event,
    ) -> Result<Option<Saga>, HandleError> {
        let now = now_ms();
        let mut conn = self.conns.get().await?;
        let mut tx = conn.begin().await?;
        let mut pending = Pending::default();
        store::lock(&mut tx, &mut pending, &[order_id]).await?;
        let Some(stored) = pending.saga(&order_id).cloned() else {
            tx.rollback().await?;
            conn.reuse();
            return Ok(None);
        };
        // In the order's own trace.
        let span = tracing::info_span!("saga operator", otel.name = "saga operator",
            ldt.service = "orchestrator", ldt.order_id = %order_id,
            trace_id = tracing::field::Empty, span_id = tracing::field::Empty);
        ldt_runtime::telemetry::adopt(&span, stored.traceparent.as_deref());
        let after = span.in_scope(|| {
            let (after, fx) = saga::apply(&stored.saga, event, &self.policy, now);
            self.observe(&after, &fx);
            pending.change(&self.queues, after.clone(), &fx, now);
            after
        });
        pending.write(&mut tx).await?;
        self.crash.commit(tx).await?;
        conn.reuse();
        self.signal.committed(pending.outbox);
        Ok(Some(after))
    }

    /// Fires due deadlines until shutdown, and keeps the count of stuck sagas.
    ///
    /// It sleeps until the earliest deadline in the table, but never longer than half of
    /// [`saga::Policy::least_deadline_ahead_ms`]: a deadline written meanwhile (by this
    /// process or another replica) lies at least that far ahead of when it was written, so
    /// the half left over covers a transaction still in flight when the poller looked and a
    /// replica's clock running a little behind. An idle orchestrator so looks a few times a
    /// second instead of fifty, and a deadline fires within a few milliseconds of its time.
    pub async fn run_deadlines(self, shutdown: CancellationToken) {
        // When due sagas are all claimed by another replica: look again this soon.
        let busy = Duration::from_millis(20)
            .min(Duration::from_millis(
                u64::try_from(self.policy.step_timeout_ms / 4).unwrap_or(20),
            ))
            .max(Duration::from_millis(5));
        // The stuck count is refreshed every STUCK_EVERY, so the poller wakes that often.
        const STUCK_EVERY: Duration = Duration::from_secs(2);
        let longest = Duration::from_millis(
            u64::try_from(self.policy.least_deadline_ahead_ms() / 2).unwrap_or(0),
        )
        .clamp(busy, STUCK_EVERY);
        let mut wait = busy;
        let mut counted = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            wait = loop {
                match self.fire_due().await {
                    Ok(Due::Fired) => continue,
                    Ok(Due::Next(None)) => break longest,
                    Ok(Due::Next(Some(at_ms))) => {
                        match u64::try_from(at_ms.saturating_sub(now_ms())) {
                            Ok(ahead) if ahead > 0 => {
                                break Duration::from_millis(ahead).min(longest);
                            }
                            // Due, and another replica's to fire.
                            _ => break busy,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "deadline poller failed; retrying");
                        break busy;
                    }
                }
            };
            if counted.elapsed() >= STUCK_EVERY.saturating_sub(busy) {
                counted = std::time::Instant::now();
                if let Ok(n) = store::stuck_count(&self.pool).await {
                    self.metrics.set(
                        "ldt_sagas_stuck",
                        "Sagas whose compensation cannot succeed until an operator retries it.",
                        &[],
                        n,
                    );
                }
            }
        }
    }

    /// Fires the deadlines due now (up to a hundred at a time), or tells when the next one is.
    async fn fire_due(&self) -> Result<Due, HandleError> {
        let now = now_ms();
        let mut conn = self.conns.get().await?;
        match store::next_deadline(&mut conn).await? {
            Some(at_ms) if at_ms <= now => {}
            next => {
                conn.reuse();
                return Ok(Due::Next(next));
            }
        }
        let mut tx = conn.begin().await?;
        let due = store::claim_due(&mut tx, now).await?;
        let n = due.len();
        let mut pending = Pending::default();
        for stored in due {
            let saga = &stored.saga;
            // The deadline's work belongs to the order's trace.
            let span = tracing::info_span!(
                "saga deadline",
                otel.name = "saga deadline",
                ldt.service = "orchestrator",
                ldt.order_id = %saga.order_id,
                ldt.step = saga.step.as_str(),
                ldt.compensation = saga.phase == saga::Phase::Compensating,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            ldt_runtime::telemetry::adopt(&span, stored.traceparent.as_deref());
            let _entered = span.enter();
            let due_ms = saga.deadline_ms.unwrap_or(now);
            let (after, fx) = saga::apply(saga, Event::Deadline { due_ms }, &self.policy, now);
            self.observe(&after, &fx);
            pending.hold(stored.clone());
            pending.change(&self.queues, after, &fx, now);
        }
        if n > 0 {
            pending.write(&mut tx).await?;
            self.crash.commit(tx).await?;
            self.signal.committed(pending.outbox);
        } else {
            tx.commit().await?;
        }
        conn.reuse();
        // None claimed: another replica holds the due ones; look again soon.
        Ok(if n > 0 {
            Due::Fired
        } else {
            Due::Next(Some(now))
        })
    }
}

/// What a look at the deadlines found.
enum Due {
    /// Some were due and are fired: there may be more.
    Fired,
    /// None is due (or those due are another replica's): the earliest deadline, if any.
    Next(Option<i64>),
}

impl Handler for Orchestrator {
    async fn handle(&self, msg: &ldt_runtime::bus::Incoming) -> Result<(), HandleError> {
        let env = decode(msg)?.clone();
        self.apply_alone(env, tracing::Span::current()).await
    }

    /// One transaction for the batch, leaving out the events whose saga has not started
    /// (each then waits for it on its own); if the transaction fails (a poison message, a
    /// deadlock), each message is applied on its own so one cannot hold back the others.
    async fn handle_batch(&self, batch: &[Delivery]) -> Vec<Result<(), HandleError>> {
        let mut results: Vec<Option<Result<(), HandleError>>> =
            batch.iter().map(|_| None).collect();
        let mut work = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            match decode(&d.msg) {
                Ok(env) => work.push((i, env)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        let mut alone = work;
        if alone.len() > 1 && !ldt_runtime::db::is_sqlite(&self.pool) {
            let few: Vec<(&Envelope, &tracing::Span)> = alone
                .iter()
                .map(|(i, env)| (*env, &batch[*i].span))
                .collect();
            if let Ok(done) = self.apply_in_few_statements(&few).await {
                alone.retain(|(i, env)| {
                    let applied = done.contains(&env.id);
                    if applied {
                        results[*i] = Some(Ok(()));
                    }
                    !applied
                });
            }
        }
        if alone.len() > 1 {
            let mut together: Vec<(Envelope, tracing::Span)> = alone
                .iter()
                .map(|(i, env)| ((*env).clone(), batch[*i].span.clone()))
                .collect();
            if let Ok(not_started) = self.apply_batch(&mut together).await {
                alone.retain(|(i, env)| {
                    let left_out = not_started.contains(&env.id);
                    if !left_out {
                        results[*i] = Some(Ok(()));
                    }
                    left_out
                });
            }
        }
        // In delivery order.
        for (i, env) in alone {
            let span = batch[i].span.clone();
            results[i] = Some(self.apply_alone(env.clone(), span).await);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(HandleError::Transient(anyhow::anyhow!("not handled"))))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! The one-message path against a real PostgreSQL database of its own (the test
    //! command makes sure the server runs).
    use super::*;
    use ldt_contract::{Service, Step, StepOutcome};
    use sqlx::Row;

    struct Fixture {
        orchestrator: Orchestrator,
        backend: ldt_runtime::db::Backend,
        db: String,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let server_url = std::env::var("LDT_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
            let backend = ldt_runtime::db::Backend::Postgres { server_url };
            let db = format!("unit_{}_orchestrator", Uuid::now_v7().simple());
            let pool = ldt_runtime::db::open(&backend, &db, &super::super::MIGRATORS, 8)
                .await
                .expect("the test PostgreSQL server (scripts/test.sh starts it)");
            let (signal, _) = OutboxSignal::new();
            let orchestrator = Orchestrator {
                conns: Arc::new(Held::new(&pool, 2)),
                pool,
                queues: Queues::new("unit"),
                signal,
                policy: Policy::new(500),
                crash: Crash::for_service(None, Service::Orchestrator),
                metrics: Default::default(),
            };
            Fixture {
                orchestrator,
                backend,
                db,
            }
        }

        async fn count(&self, sql: &str) -> i64 {
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&self.orchestrator.pool)
                .await
                .unwrap()
        }

        async fn drop(self) {
            // The held connections go back to the pool with their holder; closing waits
            // for every connection.
            let pool = self.orchestrator.pool.clone();
            drop(self.orchestrator);
            pool.close().await;
            ldt_runtime::db::drop_database(&self.backend, &self.db)
                .await
                .unwrap();
        }
    }

    fn placed(order_id: Uuid) -> Envelope {
        Envelope::new(
            order_id,
            now_ms(),
            Message::OrderPlaced {
                username: "ann".into(),
                price: 2,
                amount: 3,
                faults: Default::default(),
                slip_sent: false,
            },
        )
    }

    #[tokio::test]
    async fn a_placed_order_starts_its_saga_with_one_statement_once() {
        let fx = Fixture::new().await;
        let order_id = Uuid::now_v7();
        let span = tracing::Span::none();
        let orch = &fx.orchestrator;
        assert!(orch.apply_one(&placed(order_id), &span).await.unwrap());
        // A duplicate writes nothing on this path (the transaction path logs it).
        assert!(!orch.apply_one(&placed(order_id), &span).await.unwrap());
        assert_eq!(fx.count("SELECT count(*) FROM sagas").await, 1);
        assert_eq!(fx.count("SELECT count(*) FROM saga_log").await, 1);
        let debit: Vec<u8> = sqlx::query_scalar("SELECT payload FROM outbox")
            .fetch_one(&orch.pool)
            .await
            .unwrap();
        let debit = Envelope::from_json(&debit).unwrap();
        assert_eq!(
            debit.body,
            Message::Debit {
                username: "ann".into(),
                total: 6,
                fault: None
            }
        );
        assert_eq!(
            debit.then.len(),
            2,
            "the debit carries the rest of the slip"
        );
        fx.drop().await;
    }

    #[tokio::test]
    async fn an_answer_whose_saga_changed_after_it_was_read_writes_nothing() {
        let fx = Fixture::new().await;
        let orch = &fx.orchestrator;
        let order_id = Uuid::now_v7();
        assert!(
            orch.apply_one(&placed(order_id), &tracing::Span::none())
                .await
                .unwrap()
        );
        let mut conn = orch.conns.get().await.unwrap();
        let (read, stale) = store::read_versioned_all(&mut conn, &[order_id])
            .await
            .unwrap()
            .remove(&order_id)
            .unwrap();
        // Another writer (the deadline poller, another replica) changes the saga.
        sqlx::query("UPDATE sagas SET attempts = attempts + 1 WHERE order_id = $1")
            .bind(order_id.to_string())
            .execute(&orch.pool)
            .await
            .unwrap();
        let done = Event::Answered {
            step: Step::Delivery,
            outcome: StepOutcome::Done,
        };
        let answer = async |version: String, conn: &mut ldt_runtime::db::Conn| {
            let (after, effects) = saga::apply(&read.saga, done.clone(), &orch.policy, now_ms());
            let mut pending = Pending::default();
            pending.hold(read.clone());
            pending.change(&orch.queues, after, &effects, now_ms());
            assert!(pending.fits_one_statement(true));
            let versions = HashMap::from([(order_id, version)]);
            pending
                .write_in_one_statement(conn, Some(&versions))
                .await
                .unwrap()
                .contains(&order_id)
        };
        assert!(
            !answer(stale, &mut conn).await,
            "a stale version must not write"
        );
        assert_eq!(fx.count("SELECT count(*) FROM saga_log").await, 1);
        assert_eq!(fx.count("SELECT count(*) FROM outbox").await, 1);
        assert_eq!(
            fx.count("SELECT count(*) FROM sagas WHERE phase = 'running'")
                .await,
            1
        );
        // Read afresh, the same answer finishes the saga.
        let fresh: String = sqlx::query_scalar("SELECT xmin::text FROM sagas WHERE order_id = $1")
            .bind(order_id.to_string())
            .fetch_one(&orch.pool)
            .await
            .unwrap();
        assert!(answer(fresh, &mut conn).await);
        drop(conn);
        assert_eq!(
            fx.count("SELECT count(*) FROM sagas WHERE phase = 'done' AND status = 'SUCCESS'")
                .await,
            1
        );
        assert_eq!(fx.count("SELECT count(*) FROM outbox").await, 2);
        // Run through the handler, a late duplicate of the answer is ignored.
        let late = Envelope::new(
            order_id,
            now_ms(),
            Message::StepResult {
                step: Step::Delivery,
                outcome: StepOutcome::Done,
            },
        );
        assert!(
            !orch.apply_one(&late, &tracing::Span::none()).await.unwrap(),
            "an answer with nothing to send takes the transaction path"
        );
        let row = sqlx::query("SELECT status FROM sagas WHERE order_id = $1")
            .bind(order_id.to_string())
            .fetch_one(&orch.pool)
            .await
            .unwrap();
        assert_eq!(row.try_get::<String, _>("status").unwrap(), "SUCCESS");
        fx.drop().await;
    }

    /// The poller sleeps while no deadline is near, so a saga another replica starts
    /// meanwhile must still time out at its deadline: not before, and not a sleep later.
    #[tokio::test]
    async fn a_deadline_written_while_the_poller_sleeps_fires_on_time() {
        let mut fx = Fixture::new().await;
        // Deadlines 300 ms ahead: the poller sleeps at most 150 ms.
        fx.orchestrator.policy = Policy::new(100);
        let orch = &fx.orchestrator;
        let stop = CancellationToken::new();
        let polling = tokio::spawn(orch.clone().run_deadlines(stop.clone()));
        // The table is empty: the poller has looked and gone to sleep for as long as it may.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let order_id = Uuid::now_v7();
        assert!(
            orch.apply_one(&placed(order_id), &tracing::Span::none())
                .await
                .unwrap()
        );
        let deadline = |pool: Pool| async move {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT deadline_ms FROM sagas WHERE order_id = $1",
            )
            .bind(order_id.to_string())
            .fetch_one(&pool)
            .await
            .unwrap()
        };
        let due = deadline(orch.pool.clone()).await.unwrap();
        // Polled until the saga has moved on (its compensation's deadline, or none).
        let fired_at = loop {
            if deadline(orch.pool.clone()).await != Some(due) {
                break now_ms();
            }
            assert!(now_ms() < due + 5_000, "the deadline never fired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert!(fired_at >= due, "fired {} ms early", due - fired_at);
        // A poller that slept through the deadline (its idle sleep is up to 2 s) would be
        // well over a second late; a commit on a loaded host may take a few hundred ms.
        assert!(fired_at - due < 1_000, "fired {} ms late", fired_at - due);
        stop.cancel();
        polling.await.unwrap();
        fx.drop().await;
    }

    fn answered(order_id: Uuid, step: Step, outcome: StepOutcome) -> Envelope {
        Envelope::new(order_id, now_ms(), Message::StepResult { step, outcome })
    }

    #[tokio::test]
    async fn placed_orders_start_their_sagas_with_one_statement_and_leave_duplicates_out() {
        let fx = Fixture::new().await;
        let orch = &fx.orchestrator;
        let span = tracing::Span::none();
        let known = placed(Uuid::now_v7());
        assert!(orch.apply_one(&known, &span).await.unwrap());
        // The known order again (a duplicate), and two new ones.
        let batch = [
            placed(known.order_id),
            placed(Uuid::now_v7()),
            placed(Uuid::now_v7()),
        ];
        let work: Vec<(&Envelope, &tracing::Span)> = batch.iter().map(|env| (env, &span)).collect();
        let done = orch.apply_in_few_statements(&work).await.unwrap();
        assert_eq!(done, HashSet::from([batch[1].id, batch[2].id]));
        assert_eq!(fx.count("SELECT count(*) FROM sagas").await, 3);
        assert_eq!(fx.count("SELECT count(*) FROM saga_log").await, 3);
        // One debit per saga: the duplicate wrote none.
        assert_eq!(fx.count("SELECT count(*) FROM outbox").await, 3);
        for env in &batch[1..] {
            let sql = format!(
                "SELECT count(*) FROM sagas WHERE order_id = '{}' AND phase = 'running'",
                env.order_id
            );
            assert_eq!(fx.count(&sql).await, 1);
        }
        fx.drop().await;
    }

    /// An answer carrying its saga's opening (the order service opened the saga and holds
    /// its `OrderPlaced` back).
    fn answered_opened(order_id: Uuid, step: Step, outcome: StepOutcome) -> Envelope {
        let mut env = answered(order_id, step, outcome);
        env.opened = Some(ldt_contract::Opened {
            username: "ann".into(),
            price: 2,
            amount: 3,
            faults: Default::default(),
            placed_ms: now_ms() - 5,
        });
        env
    }

    #[tokio::test]
    async fn answers_carrying_openings_start_their_sagas_with_one_statement_past_the_answer() {
        let fx = Fixture::new().await;
        let orch = &fx.orchestrator;
        let span = tracing::Span::none();
        // A saga its `OrderPlaced` started first (it was slow; the hold was over).
        let known = Uuid::now_v7();
        let mut placed_first = placed(known);
        placed_first.body = Message::OrderPlaced {
            username: "ann".into(),
            price: 2,
            amount: 3,
            faults: Default::default(),
            slip_sent: true,
        };
        assert!(orch.apply_one(&placed_first, &span).await.unwrap());
        let (done, short) = (Uuid::now_v7(), Uuid::now_v7());
        let batch = [
            answered_opened(done, Step::Delivery, StepOutcome::Done),
            answered_opened(short, Step::Inventory, StepOutcome::Insufficient),
            answered_opened(known, Step::Delivery, StepOutcome::Done),
        ];
        let work: Vec<(&Envelope, &tracing::Span)> = batch.iter().map(|env| (env, &span)).collect();
        let started = orch.apply_in_few_statements(&work).await.unwrap();
        // The known saga's answer is the transaction path's.
        assert_eq!(started, HashSet::from([batch[0].id, batch[1].id]));
        let status = |id: Uuid| {
            format!(
                "SELECT count(*) FROM sagas WHERE order_id = '{id}' AND phase = 'done' AND status = 'SUCCESS'"
            )
        };
        assert_eq!(fx.count(&status(done)).await, 1);
        let refunding = format!(
            "SELECT count(*) FROM sagas WHERE order_id = '{short}' AND phase = 'compensating' \
             AND status = 'INSUFFICIENT_INVENTORY' AND pending_comp = 'payment'"
        );
        assert_eq!(fx.count(&refunding).await, 1);
        // Each started saga's log: the slip the order service sent, then the answer (and
        // what followed it).
        let opened_line = format!(
            "SELECT count(*) FROM saga_log WHERE order_id IN ('{done}', '{short}') \
             AND event = 'sent (slip: reserve, deliver) by the order service'"
        );
        assert_eq!(fx.count(&opened_line).await, 2);
        // The final status of one, the refund of the other.
        assert_eq!(fx.count("SELECT count(*) FROM outbox").await, 2);
        // The transaction path applies the third to its saga.
        let mut rest = [(batch[2].clone(), span.clone())];
        assert!(orch.apply_batch(&mut rest).await.unwrap().is_empty());
        assert_eq!(fx.count(&status(known)).await, 1);
        assert_eq!(fx.count("SELECT count(*) FROM sagas").await, 3);
        fx.drop().await;
    }

    #[tokio::test]
    async fn answers_on_distinct_sagas_are_written_together_each_only_if_unchanged() {
        let fx = Fixture::new().await;
        let orch = &fx.orchestrator;
        let span = tracing::Span::none();
        let orders: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
        for order_id in &orders {
            assert!(orch.apply_one(&placed(*order_id), &span).await.unwrap());
        }
        let done = |order_id: Uuid| answered(order_id, Step::Delivery, StepOutcome::Done);
        // Two answers and one for a saga that has not started: the two are applied.
        let unknown = Uuid::now_v7();
        let batch = [done(orders[0]), done(orders[1]), done(unknown)];
        let work: Vec<(&Envelope, &tracing::Span)> = batch.iter().map(|env| (env, &span)).collect();
        let applied = orch.apply_in_few_statements(&work).await.unwrap();
        assert_eq!(applied, HashSet::from([batch[0].id, batch[1].id]));
        let succeeded = "SELECT count(*) FROM sagas WHERE phase = 'done' AND status = 'SUCCESS'";
        assert_eq!(fx.count(succeeded).await, 2);
        // Three debits, and the two final statuses.
        assert_eq!(fx.count("SELECT count(*) FROM outbox").await, 5);

        // Two more sagas read at their versions; then one of them changes (another replica,
        // the deadline poller) before the answers are written.
        let (fresh, stale) = (orders[2], Uuid::now_v7());
        assert!(orch.apply_one(&placed(stale), &span).await.unwrap());
        let mut conn = orch.conns.get().await.unwrap();
        let read = store::read_versioned_all(&mut conn, &[fresh, stale])
            .await
            .unwrap();
        assert_eq!(read.len(), 2);
        sqlx::query("UPDATE sagas SET attempts = attempts + 1 WHERE order_id = $1")
            .bind(stale.to_string())
            .execute(&orch.pool)
            .await
            .unwrap();
        let mut pending = Pending::default();
        let mut versions = HashMap::new();
        for (order_id, (stored, version)) in &read {
            let event = Event::Answered {
                step: Step::Delivery,
                outcome: StepOutcome::Done,
            };
            let (after, effects) = saga::apply(&stored.saga, event, &orch.policy, now_ms());
            pending.hold(stored.clone());
            pending.change(&orch.queues, after, &effects, now_ms());
            versions.insert(*order_id, version.clone());
        }
        assert!(pending.fits_one_statement(true));
        let written = pending
            .write_in_one_statement(&mut conn, Some(&versions))
            .await
            .unwrap();
        drop(conn);
        assert_eq!(
            written,
            HashSet::from([fresh]),
            "a stale version must not write"
        );
        assert_eq!(fx.count(succeeded).await, 3);
        let log_of =
            |order_id: Uuid| format!("SELECT count(*) FROM saga_log WHERE order_id = '{order_id}'");
        assert_eq!(fx.count(&log_of(stale)).await, 1, "only its start's line");
        assert!(fx.count(&log_of(fresh)).await > 1);
        // Four debits and three final statuses: none for the stale saga.
        assert_eq!(fx.count("SELECT count(*) FROM outbox").await, 7);
        fx.drop().await;
    }
}
