//! The orchestrator: the only service that knows the saga's order. It drives each order
//! through payment → inventory → delivery, owns the step deadlines, and on failure runs the
//! compensations one at a time in reverse order before it declares the final status.
//!
//! All saga state is in its database (`sagas`, `saga_log`), changed only in transactions that
//! also write the outgoing commands to the outbox, so a restart resumes every saga where it
//! was. Deadlines are rows too (`deadline_ms`): a poller claims due sagas with
//! `FOR UPDATE SKIP LOCKED`, so a deadline fires once even with several replicas, and an
//! answer that races with its deadline is serialised by the row lock. Whatever loses the race
//! is a *late* answer: logged, and otherwise ignored, because the compensation already sent
//! for that step undoes the late effect (or makes the step refuse it).

use std::sync::Arc;
use std::time::Duration;

use crate::db::{Conn, Pool};
use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use sqlx::Row;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::bus::Incoming;
use crate::contract::{
    Envelope, FaultPlan, Message, OrderStatus, Queues, Service, Step, StepOutcome,
};
use tracing::Instrument;

use crate::crash::Crash;
use crate::db::{Tx, now_ms};
use crate::http::ApiError;
use crate::messaging::{self, Delivery, HandleError, Handler, OutboxBatch, OutboxSignal};
use crate::startup::{Context, Started};

/// One saga, locked until the transaction ends (SQLite: its single writer does that).
const LOCK_SAGA: crate::db::Sql = crate::db::Sql {
    postgres: "SELECT * FROM sagas WHERE order_id = $1 FOR UPDATE",
    sqlite: "SELECT * FROM sagas WHERE order_id = $1",
};

/// Sagas past their deadline, skipping those another replica is handling.
const CLAIM_DUE: crate::db::Sql = crate::db::Sql {
    postgres: "SELECT * FROM sagas WHERE deadline_ms <= $1 ORDER BY deadline_ms LIMIT 100 \
               FOR UPDATE SKIP LOCKED",
    sqlite: "SELECT * FROM sagas WHERE deadline_ms <= $1 ORDER BY deadline_ms LIMIT 100",
};

pub static MIGRATORS: crate::db::Migrators = crate::db::Migrators {
    postgres: sqlx::migrate!("./migrations/orchestrator"),
    sqlite: sqlx::migrate!("./migrations-sqlite/orchestrator"),
};

/// Longest wait between two tries of an unanswered compensation.
const MAX_COMPENSATION_BACKOFF: Duration = Duration::from_secs(30);
/// After this many unanswered tries a compensation is reported as stuck (and still retried).
const STUCK_AFTER_ATTEMPTS: i32 = 5;

#[derive(Clone)]
pub struct Orchestrator {
    pool: Pool,
    queues: Queues,
    signal: OutboxSignal,
    step_timeout: Duration,
    crash: Crash,
    metrics: crate::metrics::Metrics,
}

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::Orchestrator, &MIGRATORS).await?;
    let signal = ctx.spawn_relay(Service::Orchestrator, pool.clone());
    let orchestrator = Orchestrator {
        pool: pool.clone(),
        queues: ctx.queues.clone(),
        signal,
        step_timeout: ctx.settings.step_timeout(),
        crash: ctx.crash(Service::Orchestrator),
        metrics: ctx.metrics.clone(),
    };
    ctx.spawn_consumer(Service::Orchestrator, Arc::new(orchestrator.clone()));
    let poller = orchestrator.clone();
    let shutdown = ctx.shutdown.clone();
    ctx.tasks
        .spawn(async move { poller.run_deadlines(shutdown).await });
    let router = OpenApiRouter::new()
        .routes(routes!(get_saga))
        .with_state(pool.clone());
    Ok(Started { router, pool })
}

/// The mutable part of a saga row.
#[derive(Debug, Clone)]
struct Saga {
    order_id: Uuid,
    username: String,
    price: i64,
    amount: i64,
    faults: FaultPlan,
    phase: Phase,
    step: Step,
    status: Option<OrderStatus>,
    /// Compensations still to apply, the one in flight first.
    pending: Vec<Step>,
    attempts: i32,
    /// When the saga last changed (the command in flight was sent then).
    updated_ms: i64,
    traceparent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Compensating,
    Done,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Compensating => "compensating",
            Phase::Done => "done",
        }
    }
}

fn saga_from_row(row: &crate::db::DbRow) -> Result<Saga, HandleError> {
    let bad = |what: &str| HandleError::Transient(anyhow::anyhow!("corrupt saga row: {what}"));
    let order_id: String = row.try_get("order_id")?;
    let phase: String = row.try_get("phase")?;
    let step: String = row.try_get("step")?;
    let status: Option<String> = row.try_get("status")?;
    let pending: String = row.try_get("pending_comp")?;
    let faults: String = row.try_get("faults")?;
    Ok(Saga {
        order_id: Uuid::parse_str(&order_id).map_err(|_| bad("order_id"))?,
        username: row.try_get("username")?,
        price: row.try_get("price")?,
        amount: row.try_get("amount")?,
        faults: serde_json::from_str(&faults).map_err(|_| bad("faults"))?,
        phase: match phase.as_str() {
            "running" => Phase::Running,
            "compensating" => Phase::Compensating,
            "done" => Phase::Done,
            _ => return Err(bad("phase")),
        },
        step: Step::parse(&step).ok_or_else(|| bad("step"))?,
        status: match status {
            None => None,
            Some(s) => Some(OrderStatus::parse(&s).ok_or_else(|| bad("status"))?),
        },
        pending: pending
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| Step::parse(s).ok_or_else(|| bad("pending_comp")))
            .collect::<Result<_, _>>()?,
        attempts: row.try_get("attempts")?,
        updated_ms: row.try_get("updated_ms")?,
        traceparent: row.try_get("traceparent")?,
    })
}

/// What a transition does to the saga's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    Keep,
    Clear,
    At(i64),
}

/// The saga-log lines and outbox rows of the transitions in one transaction, written with
/// a few multi-row inserts just before it commits.
#[derive(Default)]
struct Pending {
    log: Vec<(String, Step, &'static str, String, i64)>,
    outbox: OutboxBatch,
}

impl Pending {
    /// Takes a transition's log lines and messages (the messages with the current span's
    /// trace context).
    fn add(&mut self, queues: &Queues, order_id: Uuid, fx: Effects, now: i64) {
        let id = order_id.to_string();
        for (step, kind, event) in fx.log {
            self.log.push((id.clone(), step, kind, event, now));
        }
        for env in &fx.out {
            self.outbox.push(queues, env);
        }
    }

    async fn write(&mut self, tx: &mut Conn) -> Result<(), sqlx::Error> {
        for chunk in self.log.chunks(messaging::ROWS_PER_INSERT) {
            let sql = crate::db::multi_row_insert(
                "INSERT INTO saga_log (order_id, step, kind, event, at_ms)",
                5,
                chunk.len(),
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (order_id, step, kind, event, at) in chunk {
                query = query
                    .bind(order_id)
                    .bind(step.as_str())
                    .bind(*kind)
                    .bind(event)
                    .bind(*at);
            }
            query.execute(&mut *tx).await?;
        }
        self.log.clear();
        self.outbox.write(tx).await
    }
}

/// What an `OrderPlaced` asks for.
struct OrderTerms<'a> {
    username: &'a str,
    price: i64,
    amount: i64,
    faults: FaultPlan,
}

/// What a transition wants written.
struct Effects {
    out: Vec<Envelope>,
    log: Vec<(Step, &'static str, String)>,
    deadline: Deadline,
}

impl Effects {
    fn new() -> Effects {
        Effects {
            out: Vec::new(),
            log: Vec::new(),
            deadline: Deadline::Keep,
        }
    }
}

impl Orchestrator {
    fn command(&self, saga: &Saga, step: Step, now: i64) -> Envelope {
        let fault = saga.faults.for_step(step);
        let body = match step {
            // Validated by the order service; checked again here because a message is input.
            Step::Payment => Message::Debit {
                username: saga.username.clone(),
                total: saga.price.checked_mul(saga.amount).unwrap_or(i64::MAX),
                fault,
            },
            Step::Inventory => Message::Reserve {
                amount: saga.amount,
                fault,
            },
            Step::Delivery => Message::Deliver {
                username: saga.username.clone(),
                amount: saga.amount,
                fault,
            },
        };
        Envelope::new(saga.order_id, now, body)
    }

    fn deadline_after(&self, now: i64, wait: Duration) -> i64 {
        now.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
    }

    /// The wait before retrying a compensation for the `attempts`-th time.
    fn compensation_backoff(&self, attempts: i32) -> Duration {
        let factor = 1u32 << attempts.clamp(0, 10);
        self.step_timeout
            .saturating_mul(factor)
            .min(MAX_COMPENSATION_BACKOFF)
    }

    /// Moves to compensating (or straight to done when nothing needs undoing).
    fn fail(
        &self,
        saga: &mut Saga,
        status: OrderStatus,
        undo: Vec<Step>,
        now: i64,
        fx: &mut Effects,
    ) {
        saga.status = Some(status);
        saga.attempts = 0;
        if undo.is_empty() {
            self.finish(saga, now, fx);
            return;
        }
        saga.phase = Phase::Compensating;
        saga.pending = undo;
        self.send_head_compensation(saga, now, fx);
    }

    fn send_head_compensation(&self, saga: &Saga, now: i64, fx: &mut Effects) {
        if let Some(&head) = saga.pending.first() {
            let msg = Message::compensation(head);
            fx.log.push((head, msg.kind(), "sent".into()));
            fx.out.push(Envelope::new(saga.order_id, now, msg));
            fx.deadline =
                Deadline::At(self.deadline_after(now, self.compensation_backoff(saga.attempts)));
        }
    }

    fn finish(&self, saga: &mut Saga, now: i64, fx: &mut Effects) {
        let status = saga.status.unwrap_or(OrderStatus::Unknown);
        saga.phase = Phase::Done;
        saga.pending.clear();
        fx.deadline = Deadline::Clear;
        fx.log
            .push((saga.step, "order_finished", status.as_str().into()));
        fx.out.push(Envelope::new(
            saga.order_id,
            now,
            Message::OrderFinished { status },
        ));
    }

    /// A step's answer.
    fn on_result(
        &self,
        saga: &mut Saga,
        step: Step,
        outcome: StepOutcome,
        now: i64,
        fx: &mut Effects,
    ) {
        let label = format!("{outcome:?}").to_lowercase();
        if saga.phase != Phase::Running || saga.step != step {
            fx.log
                .push((step, "step_result", format!("late: {label} (ignored)")));
            return;
        }
        fx.log.push((step, "step_result", label.clone()));
        self.metrics.observe_ms(
            "ldt_step_latency_ms",
            "Time from a step's command to its answer.",
            &[("step", step.as_str()), ("outcome", &label)],
            now.saturating_sub(saga.updated_ms) as f64,
        );
        let done_before: Vec<Step> = Step::ALL[..step.index()].iter().rev().copied().collect();
        match outcome {
            StepOutcome::Done => match step.next() {
                Some(next) => {
                    saga.step = next;
                    let cmd = self.command(saga, next, now);
                    fx.log.push((next, cmd.body.kind(), "sent".into()));
                    fx.out.push(cmd);
                    fx.deadline = Deadline::At(self.deadline_after(now, self.step_timeout));
                }
                None => {
                    saga.status = Some(OrderStatus::Success);
                    self.finish(saga, now, fx);
                }
            },
            StepOutcome::Insufficient => {
                let status = match step {
                    Step::Payment => OrderStatus::InsufficientFund,
                    Step::Inventory => OrderStatus::InsufficientInventory,
                    Step::Delivery => OrderStatus::Unknown,
                };
                self.fail(saga, status, done_before, now, fx);
            }
            StepOutcome::Failed | StepOutcome::Refused => {
                self.fail(saga, OrderStatus::Unknown, done_before, now, fx);
            }
        }
    }

    fn on_compensated(&self, saga: &mut Saga, step: Step, now: i64, fx: &mut Effects) {
        if saga.phase != Phase::Compensating || saga.pending.first() != Some(&step) {
            fx.log
                .push((step, "compensated", "duplicate (ignored)".into()));
            return;
        }
        fx.log.push((step, "compensated", "done".into()));
        self.metrics.inc(
            "ldt_compensations_total",
            "Compensations applied, by step.",
            &[("step", step.as_str())],
            1,
        );
        saga.pending.remove(0);
        saga.attempts = 0;
        if saga.pending.is_empty() {
            self.finish(saga, now, fx);
        } else {
            self.send_head_compensation(saga, now, fx);
        }
    }

    fn on_deadline(&self, saga: &mut Saga, now: i64, fx: &mut Effects) {
        match saga.phase {
            Phase::Running => {
                fx.log.push((saga.step, "deadline", "timeout".into()));
                tracing::info!(order_id = %saga.order_id, step = saga.step.as_str(), "step deadline passed: the order ends TIMEOUT");
                self.metrics.inc(
                    "ldt_step_timeouts_total",
                    "Steps that gave no answer within their deadline.",
                    &[("step", saga.step.as_str())],
                    1,
                );
                // The stalled step may still act: undo it first, then the ones before it.
                let undo: Vec<Step> = Step::ALL[..=saga.step.index()]
                    .iter()
                    .rev()
                    .copied()
                    .collect();
                self.fail(saga, OrderStatus::Timeout, undo, now, fx);
            }
            Phase::Compensating => {
                saga.attempts = saga.attempts.saturating_add(1);
                if let Some(&head) = saga.pending.first() {
                    if saga.attempts >= STUCK_AFTER_ATTEMPTS {
                        tracing::error!(order_id = %saga.order_id, step = head.as_str(), attempts = saga.attempts,
                            "compensation still unanswered; retrying");
                    }
                    fx.log
                        .push((head, "deadline", format!("retry #{}", saga.attempts)));
                    self.metrics.inc(
                        "ldt_compensation_retries_total",
                        "Compensations sent again because the step did not answer.",
                        &[("step", head.as_str())],
                        1,
                    );
                }
                self.send_head_compensation(saga, now, fx);
            }
            Phase::Done => fx.deadline = Deadline::Clear,
        }
    }

    /// Writes the transition: saga row, log lines, outbox; all in the caller's transaction.
    async fn persist(
        &self,
        tx: &mut Conn,
        pending: &mut Pending,
        saga: &Saga,
        fx: Effects,
        now: i64,
    ) -> Result<(), HandleError> {
        let compensations: Vec<&str> = saga.pending.iter().map(|s| s.as_str()).collect();
        let deadline = match fx.deadline {
            Deadline::Keep => None,
            Deadline::Clear => Some(None),
            Deadline::At(ms) => Some(Some(ms)),
        };
        let sql = if deadline.is_none() {
            "UPDATE sagas SET phase = $2, step = $3, status = $4, pending_comp = $5, attempts = $6, \
             updated_ms = $7 WHERE order_id = $1"
        } else {
            "UPDATE sagas SET phase = $2, step = $3, status = $4, pending_comp = $5, attempts = $6, \
             updated_ms = $7, deadline_ms = $8 WHERE order_id = $1"
        };
        sqlx::query(sql)
            .bind(saga.order_id.to_string())
            .bind(saga.phase.as_str())
            .bind(saga.step.as_str())
            .bind(saga.status.map(|s| s.as_str()))
            .bind(compensations.join(","))
            .bind(saga.attempts)
            .bind(now)
            .bind(deadline.flatten())
            .execute(&mut *tx)
            .await?;
        pending.add(&self.queues, saga.order_id, fx, now);
        Ok(())
    }

    async fn lock(&self, tx: &mut Tx, order_id: Uuid) -> Result<Option<Saga>, HandleError> {
        let row = sqlx::query(LOCK_SAGA.on(tx))
            .bind(order_id.to_string())
            .fetch_optional(&mut **tx)
            .await?;
        row.as_ref().map(saga_from_row).transpose()
    }

    async fn order_placed_in(
        &self,
        tx: &mut Tx,
        pending: &mut Pending,
        env: &Envelope,
        order: OrderTerms<'_>,
    ) -> Result<(), HandleError> {
        let OrderTerms {
            username,
            price,
            amount,
            faults,
        } = order;
        if price < 0 || amount <= 0 || price.checked_mul(amount).is_none() || username.is_empty() {
            return Err(HandleError::Poison(format!(
                "OrderPlaced with invalid terms (price {price}, amount {amount})"
            )));
        }
        let now = now_ms();
        let deadline = self.deadline_after(now, self.step_timeout);
        let inserted = sqlx::query(
            "INSERT INTO sagas (order_id, username, price, amount, faults, phase, step, deadline_ms, created_ms, updated_ms, traceparent) \
             VALUES ($1, $2, $3, $4, $5, 'running', 'payment', $6, $7, $7, $8) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(env.order_id.to_string())
        .bind(username)
        .bind(price)
        .bind(amount)
        .bind(serde_json::to_string(&faults).unwrap_or_default())
        .bind(deadline)
        .bind(now)
        .bind(crate::telemetry::current_traceparent())
        .execute(&mut **tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            tracing::info!(order_id = %env.order_id, "duplicate OrderPlaced ignored");
            let fx = Effects {
                log: vec![(Step::Payment, "order_placed", "duplicate (ignored)".into())],
                out: Vec::new(),
                deadline: Deadline::Keep,
            };
            pending.add(&self.queues, env.order_id, fx, now);
            return Ok(());
        }
        let saga = Saga {
            order_id: env.order_id,
            username: username.to_owned(),
            price,
            amount,
            faults,
            phase: Phase::Running,
            step: Step::Payment,
            status: None,
            pending: Vec::new(),
            attempts: 0,
            updated_ms: now,
            traceparent: None,
        };
        let cmd = self.command(&saga, Step::Payment, now);
        let fx = Effects {
            log: vec![(Step::Payment, cmd.body.kind(), "sent".into())],
            out: vec![cmd],
            deadline: Deadline::At(deadline),
        };
        pending.add(&self.queues, env.order_id, fx, now);
        Ok(())
    }

    async fn answer_in(
        &self,
        tx: &mut Tx,
        pending: &mut Pending,
        env: &Envelope,
    ) -> Result<(), HandleError> {
        let now = now_ms();
        let Some(mut saga) = self.lock(tx, env.order_id).await? else {
            return Err(HandleError::Poison(format!(
                "{} for unknown saga {}",
                env.body.kind(),
                env.order_id
            )));
        };
        let mut fx = Effects::new();
        match &env.body {
            Message::StepResult { step, outcome } => {
                self.on_result(&mut saga, *step, *outcome, now, &mut fx)
            }
            Message::Compensated { step } => self.on_compensated(&mut saga, *step, now, &mut fx),
            other => {
                return Err(HandleError::Poison(format!(
                    "`{}` is not an answer",
                    other.kind()
                )));
            }
        }
        self.persist(tx, pending, &saga, fx, now).await
    }

    /// Applies one message inside `tx`, in a database span.
    async fn apply_in(
        &self,
        tx: &mut Tx,
        pending: &mut Pending,
        env: &Envelope,
    ) -> Result<(), HandleError> {
        self.apply_in_span(tx, pending, env)
            .instrument(crate::db::span(&self.pool, "sagas"))
            .await
    }

    async fn apply_in_span(
        &self,
        tx: &mut Tx,
        pending: &mut Pending,
        env: &Envelope,
    ) -> Result<(), HandleError> {
        match &env.body {
            Message::OrderPlaced {
                username,
                price,
                amount,
                faults,
            } => {
                let terms = OrderTerms {
                    username,
                    price: *price,
                    amount: *amount,
                    faults: *faults,
                };
                self.order_placed_in(tx, pending, env, terms).await
            }
            Message::StepResult { .. } | Message::Compensated { .. } => {
                self.answer_in(tx, pending, env).await
            }
            other => Err(HandleError::Poison(format!(
                "the orchestrator does not handle `{}` messages",
                other.kind()
            ))),
        }
    }

    /// One message in a transaction of its own.
    async fn apply_alone(&self, env: &Envelope) -> Result<(), HandleError> {
        let mut tx = self.pool.begin().await?;
        let mut pending = Pending::default();
        self.apply_in(&mut tx, &mut pending, env).await?;
        pending.write(&mut tx).await?;
        self.crash.commit(tx).await?;
        self.signal.committed();
        Ok(())
    }

    /// Applies `work` (delivery index, envelope) in one transaction, sagas locked in order-id
    /// order so concurrent batches do not deadlock.
    async fn apply_batch(
        &self,
        batch: &[Delivery],
        work: &mut [(usize, Envelope)],
    ) -> Result<(), HandleError> {
        work.sort_by_key(|(_, env)| env.order_id);
        let mut tx = self.pool.begin().await?;
        let mut pending = Pending::default();
        for (i, env) in work.iter() {
            self.apply_in(&mut tx, &mut pending, env)
                .instrument(batch[*i].span.clone())
                .await?;
        }
        pending.write(&mut tx).await?;
        self.crash.commit(tx).await?;
        self.signal.committed();
        Ok(())
    }

    /// Fires due deadlines until shutdown.
    async fn run_deadlines(self, shutdown: CancellationToken) {
        let tick = Duration::from_millis(20)
            .min(self.step_timeout / 4)
            .max(Duration::from_millis(5));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = shutdown.cancelled() => return,
            }
            loop {
                match self.fire_due().await {
                    Ok(n) if n > 0 => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "deadline poller failed; retrying");
                        break;
                    }
                }
            }
        }
    }

    async fn fire_due(&self) -> Result<usize, HandleError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        // Planned afresh each time (not a cached generic plan): a plan made while `sagas` was
        // empty is a sequential scan, which a 20 ms poller would repeat over a growing table.
        let rows = sqlx::query(CLAIM_DUE.on(&tx))
            .persistent(false)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
        let n = rows.len();
        let mut pending = Pending::default();
        for row in &rows {
            let mut saga = saga_from_row(row)?;
            // The deadline's work belongs to the order's trace.
            let span = tracing::info_span!(
                "saga deadline",
                otel.name = "saga deadline",
                ldt.service = "orchestrator",
                ldt.order_id = %saga.order_id,
                ldt.step = saga.step.as_str(),
                ldt.compensation = saga.phase == Phase::Compensating,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            crate::telemetry::adopt(&span, saga.traceparent.as_deref());
            let mut fx = Effects::new();
            span.in_scope(|| self.on_deadline(&mut saga, now, &mut fx));
            self.persist(&mut tx, &mut pending, &saga, fx, now)
                .instrument(span)
                .await?;
        }
        if n > 0 {
            pending.write(&mut tx).await?;
            self.crash.commit(tx).await?;
            self.signal.committed();
        } else {
            tx.commit().await?;
        }
        Ok(n)
    }
}

impl Handler for Orchestrator {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = messaging::decode(msg)?;
        self.apply_alone(&env).await
    }

    /// One transaction for the batch; if it fails (a poison message, a deadlock), each message
    /// is applied in its own so one cannot hold back the others.
    async fn handle_batch(&self, batch: &[Delivery]) -> Vec<Result<(), HandleError>> {
        let mut results: Vec<Option<Result<(), HandleError>>> =
            batch.iter().map(|_| None).collect();
        let mut work = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            match messaging::decode(&d.msg) {
                Ok(env) => work.push((i, env)),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if work.len() > 1 && self.apply_batch(batch, &mut work).await.is_ok() {
            for (i, _) in &work {
                results[*i] = Some(Ok(()));
            }
        } else {
            let outcomes = futures_util::future::join_all(
                work.iter()
                    .map(|(i, env)| self.apply_alone(env).instrument(batch[*i].span.clone())),
            )
            .await;
            for ((i, _), r) in work.iter().zip(outcomes) {
                results[*i] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(HandleError::Transient(anyhow::anyhow!("not handled"))))
            })
            .collect()
    }
}

/// One line of a saga's log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SagaEvent {
    pub step: String,
    /// The message or timer concerned (`debit`, `refund`, `step_result`, `deadline`, …).
    pub kind: String,
    /// What happened (`sent`, `done`, `insufficient`, `timeout`, `late: done (ignored)`, …).
    pub event: String,
    pub at_ms: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SagaView {
    pub order_id: String,
    /// `running`, `compensating` or `done`.
    pub phase: String,
    /// The step in flight (or the last one reached).
    pub step: String,
    /// The final status, once decided.
    pub status: Option<String>,
    /// Compensations still to apply, in order.
    pub pending_compensations: Vec<String>,
    pub log: Vec<SagaEvent>,
}

/// The saga of an order: its step log, with every step and compensation and its outcome.
#[utoipa::path(get, path = "/api/v1/sagas/{order_id}", tag = "orchestrator",
    params(("order_id" = String, Path, description = "Order id")),
    responses((status = 200, body = SagaView), (status = 404, body = crate::http::ErrorBody)))]
async fn get_saga(
    State(pool): State<Pool>,
    Path(order_id): Path<String>,
) -> Result<Json<SagaView>, ApiError> {
    let row = sqlx::query(
        "SELECT order_id, phase, step, status, pending_comp FROM sagas WHERE order_id = $1",
    )
    .bind(&order_id)
    .fetch_optional(&pool)
    .await?
    .ok_or_else(|| ApiError::NotFound(format!("no saga for order {order_id:?}")))?;
    let log = sqlx::query(
        "SELECT step, kind, event, at_ms FROM saga_log WHERE order_id = $1 ORDER BY id",
    )
    .bind(&order_id)
    .fetch_all(&pool)
    .await?;
    let pending: String = row.try_get("pending_comp")?;
    Ok(Json(SagaView {
        order_id: row.try_get("order_id")?,
        phase: row.try_get("phase")?,
        step: row.try_get("step")?,
        status: row.try_get("status")?,
        pending_compensations: pending
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        log: log
            .iter()
            .map(|r| {
                Ok(SagaEvent {
                    step: r.try_get("step")?,
                    kind: r.try_get("kind")?,
                    event: r.try_get("event")?,
                    at_ms: r.try_get("at_ms")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?,
    }))
}
