//! The orchestrator: the only service that knows the saga's order. It starts each order on
//! a routing slip — the debit carries the reserve and the deliver after it, and each step
//! that succeeds sends the next command on itself — so a successful order costs the
//! orchestrator two messages (the order placed, the last step's answer), not four. It owns
//! the deadline (the step timeout for each step on the slip), and when a step fails or the
//! deadline passes it runs the compensations one at a time in reverse order before it
//! declares the final status. A step fails at most once per slip: the steps after it never
//! hear of the order. On a deadline the orchestrator does not know how far the slip got, so
//! it compensates every step on it, last first: a step that never acted leaves a tombstone
//! that refuses the late command, and compensating in reverse order means a command the
//! slip sends on later finds its step already compensated.
//!
//! All saga state is in its database (`sagas`, `saga_log`), changed only in transactions that
//! also write the outgoing commands to the outbox, so a restart resumes every saga where it
//! was. Deadlines are rows too (`deadline_ms`): a poller claims due sagas with
//! `FOR UPDATE SKIP LOCKED`, so a deadline fires once even with several replicas, and an
//! answer that races with its deadline is serialised by the row lock. Whatever loses the race
//! is a *late* answer: logged, and otherwise ignored, because the compensation already sent
//! for that step undoes the late effect (or makes the step refuse it).

use std::collections::{HashMap, HashSet};
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

use crate::crash::Crash;
use crate::db::{Held, now_ms};
use crate::http::ApiError;
use crate::messaging::{
    self, Delivery, HandleError, Handler, OutboxBatch, OutboxRow, OutboxSignal,
};
use crate::startup::{Context, Started};
use sqlx::Connection;
use tracing::Instrument;

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

/// The last step of the routing slip: its answer ends a successful saga.
const SLIP_END: Step = Step::ALL[Step::ALL.len() - 1];

#[derive(Clone)]
pub struct Orchestrator {
    pool: Pool,
    /// The connections of the consumer's and the deadline poller's transactions.
    conns: Arc<Held>,
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
        conns: Arc::new(Held::new(&pool, 3)),
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
    /// The step the last command went to: the slip runs from there to its end.
    step: Step,
    status: Option<OrderStatus>,
    /// Compensations still to apply, the one in flight first.
    pending: Vec<Step>,
    attempts: i32,
    /// When the saga last changed (the command in flight was sent then).
    updated_ms: i64,
    traceparent: Option<String>,
}

impl Saga {
    /// A saga as an `OrderPlaced` with these terms starts it: running, at the first step.
    fn started(order_id: Uuid, terms: &OrderTerms<'_>, now: i64) -> Saga {
        Saga {
            order_id,
            username: terms.username.to_owned(),
            price: terms.price,
            amount: terms.amount,
            faults: terms.faults,
            phase: Phase::Running,
            step: Step::ALL[0],
            status: None,
            pending: Vec::new(),
            attempts: 0,
            updated_ms: now,
            traceparent: None,
        }
    }
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

/// Applies the changed sagas in `v` (one row per saga: the columns [`SagaValues`] lists).
const UPDATE_SAGAS_FROM_V: &str = "UPDATE sagas SET phase = v.phase, step = v.step, \
     status = v.status, pending_comp = v.pending_comp, attempts = v.attempts, \
     updated_ms = v.updated_ms, \
     deadline_ms = CASE WHEN v.set_deadline THEN v.deadline_ms ELSE sagas.deadline_ms END \
     FROM v WHERE sagas.order_id = v.order_id";

/// A transaction writing at most this many rows into each table writes them all with one
/// statement (PostgreSQL); more, and it takes a statement per table.
const ONE_STATEMENT_ROWS: usize = 4;

/// The values of a changed saga's row, in the order of `v`'s columns.
struct SagaValues {
    order_id: String,
    phase: &'static str,
    step: &'static str,
    status: Option<&'static str>,
    pending_comp: String,
    attempts: i32,
    updated_ms: i64,
    set_deadline: bool,
    deadline_ms: Option<i64>,
}

/// A saga log line: order id, step, kind, event, when.
type LogLine = (String, Step, &'static str, String, i64);

/// Binds a log line's columns, in the order of `saga_log`'s insert.
fn bind_log_line<'q>(query: messaging::Query<'q>, line: &'q LogLine) -> messaging::Query<'q> {
    let (order_id, step, kind, event, at) = line;
    query
        .bind(order_id)
        .bind(step.as_str())
        .bind(*kind)
        .bind(event)
        .bind(*at)
}

impl SagaValues {
    /// Binds the values, in the order of `v`'s columns.
    fn bind_to(self, query: messaging::Query<'_>) -> messaging::Query<'_> {
        query
            .bind(self.order_id)
            .bind(self.phase)
            .bind(self.step)
            .bind(self.status)
            .bind(self.pending_comp)
            .bind(self.attempts)
            .bind(self.updated_ms)
            .bind(self.set_deadline)
            .bind(self.deadline_ms)
    }

    fn of(saga: &Saga, deadline: Deadline) -> SagaValues {
        let (set_deadline, deadline_ms) = match deadline {
            Deadline::Keep => (false, None),
            Deadline::Clear => (true, None),
            Deadline::At(ms) => (true, Some(ms)),
        };
        SagaValues {
            order_id: saga.order_id.to_string(),
            phase: saga.phase.as_str(),
            step: saga.step.as_str(),
            status: saga.status.map(|s| s.as_str()),
            pending_comp: saga
                .pending
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(","),
            attempts: saga.attempts,
            updated_ms: saga.updated_ms,
            set_deadline,
            deadline_ms,
        }
    }
}

/// What one transaction works on: the sagas it holds (read with one statement), the log
/// lines and outbox rows its transitions produce — all written back with a few multi-row
/// statements just before it commits, however many messages it handles.
#[derive(Default)]
struct Pending {
    log: Vec<LogLine>,
    outbox: OutboxBatch,
    /// The sagas this transaction holds (locked by it, or inserted by it), by order id, each
    /// with the deadline change to write back (`None`: the saga is unchanged).
    sagas: HashMap<Uuid, (Saga, Option<Deadline>)>,
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

    /// Records a transition of `saga`: its new state, log lines and messages.
    fn change(&mut self, queues: &Queues, mut saga: Saga, fx: Effects, now: i64) {
        let order_id = saga.order_id;
        saga.updated_ms = now;
        // Several transitions of one saga in a transaction: the last deadline set wins.
        let earlier = self.sagas.get(&order_id).and_then(|(_, d)| *d);
        let deadline = match (earlier, fx.deadline) {
            (Some(d), Deadline::Keep) => d,
            (_, d) => d,
        };
        self.sagas.insert(order_id, (saga, Some(deadline)));
        self.add(queues, order_id, fx, now);
    }

    /// Writes the transaction's saga changes, log lines and messages: on PostgreSQL with one
    /// statement when there are few (a round trip each costs more than the rows), else with a
    /// multi-row statement per table.
    async fn write(&mut self, tx: &mut Conn) -> Result<(), sqlx::Error> {
        if !crate::db::conn_is_sqlite(tx) && self.fits_one_statement(false) {
            self.write_in_one_statement(tx, None).await?;
            return Ok(());
        }
        self.write_per_table(tx).await
    }

    /// Whether [`Pending::write_in_one_statement`] can write what this transaction holds
    /// (`guarded`: with a row version, which covers exactly one changed saga).
    fn fits_one_statement(&self, guarded: bool) -> bool {
        let changed = self.sagas.values().filter(|(_, d)| d.is_some()).count();
        let sagas_fit = if guarded {
            changed == 1
        } else {
            changed <= ONE_STATEMENT_ROWS
        };
        sagas_fit
            && self.log.len() <= ONE_STATEMENT_ROWS
            && (1..=ONE_STATEMENT_ROWS).contains(&self.outbox.unwritten().len())
    }

    /// PostgreSQL: the saga updates, the log lines and the outbox rows in one statement.
    /// With `version`, the transaction holds one saga, read without a lock at that row
    /// version (`xmin`): the statement writes only if the saga is still at it, and returns
    /// `false` (nothing written) if it changed meanwhile.
    async fn write_in_one_statement(
        &mut self,
        tx: &mut Conn,
        version: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let changed: Vec<(&Saga, Deadline)> = self
            .sagas
            .values()
            .filter_map(|(saga, d)| d.map(|d| (saga, d)))
            .collect();
        let mut sql = String::from("WITH ");
        let mut next = 1;
        if !changed.is_empty() {
            sql.push_str(
                "v (order_id, phase, step, status, pending_comp, attempts, updated_ms, \
                 set_deadline, deadline_ms) AS (",
            );
            next = crate::db::push_values(&mut sql, next, 9, changed.len());
            sql.push_str("), u AS (");
            sql.push_str(UPDATE_SAGAS_FROM_V);
            if version.is_some() {
                sql.push_str(&format!(" AND sagas.xmin = ${next}::text::xid"));
                next += 1;
            }
            sql.push_str(" RETURNING sagas.order_id), ");
        }
        // Unguarded, `u` is always there to read: the condition is then true.
        let only_if = if version.is_some() {
            " WHERE EXISTS (SELECT 1 FROM u)"
        } else {
            ""
        };
        if !self.log.is_empty() {
            sql.push_str(
                "l AS (INSERT INTO saga_log (order_id, step, kind, event, at_ms) SELECT * FROM (",
            );
            next = crate::db::push_values(&mut sql, next, 5, self.log.len());
            sql.push_str(") AS x");
            sql.push_str(only_if);
            sql.push_str("), ");
        }
        sql.push_str(
            "o AS (INSERT INTO outbox (queue, message_id, payload, traceparent, created_ms) \
             SELECT * FROM (",
        );
        crate::db::push_values(&mut sql, next, 5, self.outbox.unwritten().len());
        sql.push_str(") AS x");
        sql.push_str(only_if);
        sql.push_str(" RETURNING id, message_id) SELECT id, message_id FROM o");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (saga, deadline) in &changed {
            query = SagaValues::of(saga, *deadline).bind_to(query);
        }
        if let Some(version) = version {
            query = query.bind(version);
        }
        for line in &self.log {
            query = bind_log_line(query, line);
        }
        let now = now_ms();
        for row in self.outbox.unwritten() {
            query = row.bind_columns(query).bind(now);
        }
        let mut ids = HashMap::new();
        for row in query.fetch_all(&mut *tx).await? {
            ids.insert(row.try_get::<String, _>(1)?, row.try_get::<i64, _>(0)?);
        }
        if ids.is_empty() {
            // Only a guarded statement writes nothing: the saga changed meanwhile.
            return Ok(false);
        }
        let ids = self
            .outbox
            .unwritten()
            .iter()
            .map(|row| {
                ids.get(&row.message_id).copied().ok_or_else(|| {
                    sqlx::Error::Protocol(format!("no outbox id for message {}", row.message_id))
                })
            })
            .collect::<Result<Vec<i64>, sqlx::Error>>()?;
        self.outbox.written(ids);
        self.sagas.clear();
        self.log.clear();
        Ok(true)
    }

    async fn write_per_table(&mut self, tx: &mut Conn) -> Result<(), sqlx::Error> {
        let changed: Vec<(&Saga, Deadline)> = self
            .sagas
            .values()
            .filter_map(|(saga, d)| d.map(|d| (saga, d)))
            .collect();
        for chunk in changed.chunks(messaging::ROWS_PER_INSERT) {
            let mut sql = crate::db::multi_row_insert(
                "WITH v (order_id, phase, step, status, pending_comp, attempts, updated_ms, \
                 set_deadline, deadline_ms) AS (",
                9,
                chunk.len(),
            );
            sql.push_str(") ");
            sql.push_str(UPDATE_SAGAS_FROM_V);
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (saga, deadline) in chunk {
                query = SagaValues::of(saga, *deadline).bind_to(query);
            }
            query.execute(&mut *tx).await?;
        }
        self.sagas.clear();
        for chunk in self.log.chunks(messaging::ROWS_PER_INSERT) {
            let sql = crate::db::multi_row_insert(
                "INSERT INTO saga_log (order_id, step, kind, event, at_ms)",
                5,
                chunk.len(),
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for line in chunk {
                query = bind_log_line(query, line);
            }
            query.execute(&mut *tx).await?;
        }
        self.log.clear();
        self.outbox.write(tx).await
    }
}

/// What an `OrderPlaced` asks for, checked.
struct OrderTerms<'a> {
    username: &'a str,
    price: i64,
    amount: i64,
    faults: FaultPlan,
}

impl<'a> OrderTerms<'a> {
    /// Binds a new saga's row with these terms, in the order of `sagas`' insert (`order_id,
    /// username, price, amount, faults, phase, step, deadline_ms, created_ms, updated_ms,
    /// traceparent`).
    fn bind_new_saga<'q>(
        &self,
        query: messaging::Query<'q>,
        order_id: Uuid,
        deadline: i64,
        now: i64,
        traceparent: Option<String>,
    ) -> messaging::Query<'q> {
        query
            .bind(order_id.to_string())
            .bind(self.username.to_owned())
            .bind(self.price)
            .bind(self.amount)
            .bind(serde_json::to_string(&self.faults).unwrap_or_default())
            .bind(Phase::Running.as_str())
            .bind(Step::ALL[0].as_str())
            .bind(deadline)
            .bind(now)
            .bind(now)
            .bind(traceparent)
    }

    /// The terms of an `OrderPlaced` (`None` for any other message); invalid terms are poison.
    fn of(env: &'a Envelope) -> Result<Option<OrderTerms<'a>>, HandleError> {
        let Message::OrderPlaced {
            username,
            price,
            amount,
            faults,
        } = &env.body
        else {
            return Ok(None);
        };
        let (price, amount) = (*price, *amount);
        if price < 0 || amount <= 0 || price.checked_mul(amount).is_none() || username.is_empty() {
            return Err(HandleError::Poison(format!(
                "OrderPlaced with invalid terms (price {price}, amount {amount})"
            )));
        }
        Ok(Some(OrderTerms {
            username,
            price,
            amount,
            faults: *faults,
        }))
    }
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

    /// The command for `from` carrying the commands of the steps after it as its routing
    /// slip.
    fn slip(&self, saga: &Saga, from: Step, now: i64) -> Envelope {
        let mut env = self.command(saga, from, now);
        env.then = Step::ALL[from.index() + 1..]
            .iter()
            .map(|&step| self.command(saga, step, now).body)
            .collect();
        env
    }

    /// A log line for a slip sent: its first command, and those it carries.
    fn slip_sent(env: &Envelope) -> String {
        if env.then.is_empty() {
            return "sent".into();
        }
        let rest: Vec<&str> = env.then.iter().map(Message::kind).collect();
        format!("sent (slip: {})", rest.join(", "))
    }

    /// How long a saga's slip may take: the step timeout for each step on it.
    fn saga_timeout(&self) -> Duration {
        self.step_timeout
            .saturating_mul(u32::try_from(Step::ALL.len()).unwrap_or(u32::MAX))
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
        // While the slip runs, any step on it may be the one that answers.
        if saga.phase != Phase::Running || step.index() < saga.step.index() {
            fx.log
                .push((step, "step_result", format!("late: {label} (ignored)")));
            return;
        }
        fx.log.push((step, "step_result", label.clone()));
        self.metrics.observe_ms(
            "ldt_step_latency_ms",
            "Time from the command (or routing slip) a step answered to its answer.",
            &[("step", step.as_str()), ("outcome", &label)],
            now.saturating_sub(saga.updated_ms) as f64,
        );
        let done_before: Vec<Step> = Step::ALL[..step.index()].iter().rev().copied().collect();
        match outcome {
            StepOutcome::Done => match step.next() {
                // A step that answered instead of sending the slip on (one that predates
                // slips): the rest of the slip goes from here, within the same deadline.
                Some(next) => {
                    saga.step = next;
                    let cmd = self.slip(saga, next, now);
                    fx.log.push((next, cmd.body.kind(), Self::slip_sent(&cmd)));
                    fx.out.push(cmd);
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
                tracing::info!(order_id = %saga.order_id, step = saga.step.as_str(), "deadline passed: the order ends TIMEOUT");
                self.metrics.inc(
                    "ldt_step_timeouts_total",
                    "Orders past their deadline, by the step their slip last started from.",
                    &[("step", saga.step.as_str())],
                    1,
                );
                // Whichever step stalled may still act: undo every step the slip could have
                // reached, the last first.
                let undo: Vec<Step> = Step::ALL[..=SLIP_END.index()]
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

    /// Applies messages in one transaction: inserts the sagas the `OrderPlaced`s start and
    /// locks those the answers concern (one statement each, PostgreSQL locking in order-id
    /// order so that concurrent batches cannot deadlock), then runs every transition in
    /// memory, in the order given, each in its message's span. `work` is sorted by order id.
    async fn apply_all(
        &self,
        tx: &mut Conn,
        pending: &mut Pending,
        work: &[(&Envelope, tracing::Span)],
    ) -> Result<(), HandleError> {
        let now = now_ms();
        let deadline = self.deadline_after(now, self.saga_timeout());
        let mut placed = Vec::new();
        let mut answered = Vec::new();
        for (env, span) in work {
            match OrderTerms::of(env)? {
                Some(terms) => placed.push((env.order_id, terms, span)),
                None => answered.push(env.order_id),
            }
        }
        let inserted = self.insert_sagas(tx, &placed, deadline, now).await?;
        // A saga this transaction inserted is held already.
        answered.dedup();
        answered.retain(|id| !inserted.contains(id));
        self.lock(tx, pending, &answered).await?;
        for (env, span) in work {
            let _entered = span.enter();
            match OrderTerms::of(env)? {
                Some(terms) => self.order_placed(pending, env, terms, &inserted, now),
                None => self.answer(pending, env, now)?,
            }
        }
        Ok(())
    }

    /// Inserts the sagas of `OrderPlaced`s (each with its message's trace context); returns
    /// the order ids of those that are new (the others are duplicates).
    async fn insert_sagas(
        &self,
        tx: &mut Conn,
        placed: &[(Uuid, OrderTerms<'_>, &tracing::Span)],
        deadline: i64,
        now: i64,
    ) -> Result<HashSet<Uuid>, HandleError> {
        let mut inserted = HashSet::new();
        for chunk in placed.chunks(messaging::ROWS_PER_INSERT) {
            let mut sql = crate::db::multi_row_insert(
                "INSERT INTO sagas (order_id, username, price, amount, faults, phase, step, \
                 deadline_ms, created_ms, updated_ms, traceparent)",
                11,
                chunk.len(),
            );
            sql.push_str(" ON CONFLICT (order_id) DO NOTHING RETURNING order_id");
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (order_id, terms, span) in chunk {
                let traceparent = span.in_scope(crate::telemetry::current_traceparent);
                query = terms.bind_new_saga(query, *order_id, deadline, now, traceparent);
            }
            for row in query.fetch_all(&mut *tx).await? {
                let id: String = row.try_get("order_id")?;
                if let Ok(id) = Uuid::parse_str(&id) {
                    inserted.insert(id);
                }
            }
        }
        Ok(inserted)
    }

    /// Reads (PostgreSQL: locks) the sagas `order_ids` name into `pending`.
    async fn lock(
        &self,
        tx: &mut Conn,
        pending: &mut Pending,
        order_ids: &[Uuid],
    ) -> Result<(), HandleError> {
        let sqlite = crate::db::is_sqlite(&self.pool);
        for chunk in order_ids.chunks(messaging::ROWS_PER_INSERT) {
            let mut sql = String::from("SELECT * FROM sagas WHERE order_id IN (");
            for i in 1..=chunk.len() {
                if i > 1 {
                    sql.push_str(", ");
                }
                sql.push('$');
                sql.push_str(&i.to_string());
            }
            sql.push_str(") ORDER BY order_id");
            if !sqlite {
                sql.push_str(" FOR UPDATE");
            }
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id.to_string());
            }
            for row in query.fetch_all(&mut *tx).await? {
                let saga = saga_from_row(&row)?;
                pending.sagas.entry(saga.order_id).or_insert((saga, None));
            }
        }
        Ok(())
    }

    fn order_placed(
        &self,
        pending: &mut Pending,
        env: &Envelope,
        terms: OrderTerms<'_>,
        inserted: &HashSet<Uuid>,
        now: i64,
    ) {
        // The first `OrderPlaced` of a new saga starts it; any other is a duplicate.
        if !inserted.contains(&env.order_id) || pending.sagas.contains_key(&env.order_id) {
            tracing::info!(order_id = %env.order_id, "duplicate OrderPlaced ignored");
            let fx = Effects {
                log: vec![(Step::Payment, "order_placed", "duplicate (ignored)".into())],
                out: Vec::new(),
                deadline: Deadline::Keep,
            };
            pending.add(&self.queues, env.order_id, fx, now);
            return;
        }
        let saga = Saga::started(env.order_id, &terms, now);
        let first = Step::ALL[0];
        let cmd = self.slip(&saga, first, now);
        let fx = Effects {
            log: vec![(first, cmd.body.kind(), Self::slip_sent(&cmd))],
            out: vec![cmd],
            deadline: Deadline::Keep,
        };
        // Written by the insert already: held, unchanged unless a later message changes it.
        pending.sagas.insert(env.order_id, (saga, None));
        pending.add(&self.queues, env.order_id, fx, now);
    }

    fn answer(&self, pending: &mut Pending, env: &Envelope, now: i64) -> Result<(), HandleError> {
        let Some((saga, _)) = pending.sagas.get(&env.order_id) else {
            return Err(HandleError::Poison(format!(
                "{} for unknown saga {}",
                env.body.kind(),
                env.order_id
            )));
        };
        let mut saga = saga.clone();
        let mut fx = Effects::new();
        match &env.body {
            Message::StepResult { step, outcome } => {
                self.on_result(&mut saga, *step, *outcome, now, &mut fx)
            }
            Message::Compensated { step } => self.on_compensated(&mut saga, *step, now, &mut fx),
            other => {
                return Err(HandleError::Poison(format!(
                    "the orchestrator does not handle `{}` messages",
                    other.kind()
                )));
            }
        }
        pending.change(&self.queues, saga, fx, now);
        Ok(())
    }

    /// Applies `work` (envelope, delivery span) in one transaction. Each message gets a
    /// database span of its own in its trace, covering the statements it shares with the
    /// rest of the batch.
    async fn apply_batch(&self, work: &mut [(Envelope, tracing::Span)]) -> Result<(), HandleError> {
        work.sort_by_key(|(env, _)| env.order_id);
        let spans: Vec<(&Envelope, tracing::Span)> = work
            .iter()
            .map(|(env, span)| (env, span.in_scope(|| crate::db::span(&self.pool, "sagas"))))
            .collect();
        let mut conn = self.conns.get().await?;
        let mut tx = conn.begin().await?;
        let mut pending = Pending::default();
        self.apply_all(&mut tx, &mut pending, &spans).await?;
        pending.write(&mut tx).await?;
        self.crash.commit(tx).await?;
        conn.reuse();
        self.signal.committed(pending.outbox);
        Ok(())
    }

    /// PostgreSQL, a batch of one message, without a transaction of its own (two round
    /// trips at most instead of five or six). An `OrderPlaced` inserts its saga, log line and
    /// command with one statement. An answer reads its saga, runs the transition, and writes
    /// the result with one statement that applies only if the saga is still as it was read.
    /// `Ok(false)`: nothing was written (a duplicate `OrderPlaced`, an unknown saga, a saga
    /// changed meanwhile, a transition too big for one statement): the transaction path takes
    /// the message.
    async fn apply_one(&self, env: &Envelope, span: &tracing::Span) -> Result<bool, HandleError> {
        let now = now_ms();
        let db = span.in_scope(|| crate::db::span(&self.pool, "sagas"));
        let mut conn = self.conns.get().await?;
        let outbox = match OrderTerms::of(env)? {
            Some(terms) => {
                let placed = span.in_scope(|| self.placed_rows(env, &terms, now));
                match self
                    .insert_placed(&mut conn, env, &terms, &placed, now)
                    .instrument(db)
                    .await?
                {
                    Some(outbox) => outbox,
                    None => {
                        conn.reuse();
                        return Ok(false);
                    }
                }
            }
            None => {
                let read =
                    sqlx::query("SELECT *, xmin::text AS version FROM sagas WHERE order_id = $1")
                        .bind(env.order_id.to_string())
                        .fetch_optional(&mut *conn)
                        .instrument(db.clone())
                        .await?;
                let Some(row) = read else {
                    conn.reuse();
                    return Ok(false);
                };
                let version: String = row.try_get("version")?;
                let saga = saga_from_row(&row)?;
                let mut pending = Pending::default();
                pending.sagas.insert(saga.order_id, (saga, None));
                span.in_scope(|| self.answer(&mut pending, env, now))?;
                if !pending.fits_one_statement(true) {
                    conn.reuse();
                    return Ok(false);
                }
                self.crash.at(crate::crash::Point::BeforeCommit);
                let written = pending
                    .write_in_one_statement(&mut conn, Some(&version))
                    .instrument(db)
                    .await?;
                if !written {
                    conn.reuse();
                    return Ok(false);
                }
                pending.outbox
            }
        };
        conn.reuse();
        self.crash.at(crate::crash::Point::AfterCommit);
        self.signal.committed(outbox);
        Ok(true)
    }

    /// What a new saga's start writes besides the saga: its log line and its first command
    /// (with the trace context of the current span).
    fn placed_rows(
        &self,
        env: &Envelope,
        terms: &OrderTerms<'_>,
        now: i64,
    ) -> ((Step, &'static str, String), OutboxRow, Option<String>) {
        let saga = Saga::started(env.order_id, terms, now);
        let first = Step::ALL[0];
        let cmd = self.slip(&saga, first, now);
        (
            (first, cmd.body.kind(), Self::slip_sent(&cmd)),
            OutboxRow::of(&self.queues, &cmd),
            crate::telemetry::current_traceparent(),
        )
    }

    /// Inserts a new saga with its log line and first command, in one statement; `None` if
    /// the saga exists (a duplicate `OrderPlaced`: nothing written).
    async fn insert_placed(
        &self,
        conn: &mut Conn,
        env: &Envelope,
        terms: &OrderTerms<'_>,
        placed: &((Step, &'static str, String), OutboxRow, Option<String>),
        now: i64,
    ) -> Result<Option<OutboxBatch>, HandleError> {
        let ((step, kind, event), row, traceparent) = placed;
        self.crash.at(crate::crash::Point::BeforeCommit);
        let query = sqlx::query(
            "WITH s AS (INSERT INTO sagas (order_id, username, price, amount, faults, phase, step, \
             deadline_ms, created_ms, updated_ms, traceparent) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT (order_id) DO NOTHING RETURNING order_id), \
             l AS (INSERT INTO saga_log (order_id, step, kind, event, at_ms) \
             SELECT $1, $12, $13, $14, $9 FROM s) \
             INSERT INTO outbox (queue, message_id, payload, traceparent, created_ms) \
             SELECT $15, $16, $17, $18, $9 FROM s RETURNING id",
        );
        let deadline = self.deadline_after(now, self.saga_timeout());
        let query = terms
            .bind_new_saga(query, env.order_id, deadline, now, traceparent.clone())
            .bind(step.as_str())
            .bind(*kind)
            .bind(event);
        let id = row.bind_columns(query).fetch_optional(&mut *conn).await?;
        let Some(id) = id else {
            return Ok(None);
        };
        let mut outbox = OutboxBatch::default();
        outbox.push_written(id.try_get(0)?, row.clone());
        Ok(Some(outbox))
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
        // Mostly nothing is due: one round trip to find out, not a transaction's three.
        let mut conn = self.conns.get().await?;
        let due =
            sqlx::query("SELECT 1 FROM sagas WHERE deadline_ms <= $1 ORDER BY deadline_ms LIMIT 1")
                .persistent(false)
                .bind(now)
                .fetch_optional(&mut *conn)
                .await?;
        if due.is_none() {
            conn.reuse();
            return Ok(0);
        }
        let mut tx = conn.begin().await?;
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
            let _entered = span.enter();
            let mut fx = Effects::new();
            self.on_deadline(&mut saga, now, &mut fx);
            pending.change(&self.queues, saga, fx, now);
        }
        if n > 0 {
            pending.write(&mut tx).await?;
            self.crash.commit(tx).await?;
            self.signal.committed(pending.outbox);
        } else {
            tx.commit().await?;
        }
        conn.reuse();
        Ok(n)
    }
}

impl Handler for Orchestrator {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let env = messaging::decode(msg)?;
        self.apply_batch(&mut [(env, tracing::Span::current())])
            .await
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
        let mut together: Vec<(Envelope, tracing::Span)> = work
            .iter()
            .map(|(i, env)| (env.clone(), batch[*i].span.clone()))
            .collect();
        if work.len() > 1 && self.apply_batch(&mut together).await.is_ok() {
            for (i, _) in &work {
                results[*i] = Some(Ok(()));
            }
        } else {
            // One at a time, in delivery order.
            let postgres = !crate::db::is_sqlite(&self.pool);
            for (i, env) in work {
                let span = batch[i].span.clone();
                let alone = if postgres {
                    self.apply_one(&env, &span).await
                } else {
                    Ok(false)
                };
                results[i] = Some(match alone {
                    Ok(true) => Ok(()),
                    Err(HandleError::Poison(reason)) => Err(HandleError::Poison(reason)),
                    Ok(false) | Err(HandleError::Transient(_)) => {
                        self.apply_batch(&mut [(env, span)]).await
                    }
                });
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
    /// The step the last command went to (the routing slip runs from there to the last step).
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
    saga_view(&pool, &order_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no saga for order {order_id:?}")))
}

/// An order's saga and its log, if the orchestrator has seen the order.
async fn saga_view(pool: &Pool, order_id: &str) -> Result<Option<SagaView>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT order_id, phase, step, status, pending_comp FROM sagas WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let log = sqlx::query(
        "SELECT step, kind, event, at_ms FROM saga_log WHERE order_id = $1 ORDER BY id",
    )
    .bind(order_id)
    .fetch_all(pool)
    .await?;
    let pending: String = row.try_get("pending_comp")?;
    Ok(Some(SagaView {
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

#[cfg(test)]
mod tests {
    //! The one-message path against a real PostgreSQL database of its own (the test
    //! command makes sure the server runs).
    use super::*;
    use crate::contract::Service;

    struct Fixture {
        orchestrator: Orchestrator,
        backend: crate::db::Backend,
        db: String,
    }

    impl Fixture {
        async fn new() -> Fixture {
            let server_url = std::env::var("LDT_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
            let backend = crate::db::Backend::Postgres { server_url };
            let db = format!("unit_{}_orchestrator", Uuid::now_v7().simple());
            let pool = crate::db::open(&backend, &db, &MIGRATORS, 8)
                .await
                .expect("the test PostgreSQL server (scripts/test.sh starts it)");
            let (signal, _) = OutboxSignal::new();
            let orchestrator = Orchestrator {
                conns: Arc::new(Held::new(&pool, 2)),
                pool,
                queues: Queues::new("unit"),
                signal,
                step_timeout: Duration::from_millis(500),
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
            crate::db::drop_database(&self.backend, &self.db)
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
        let read = sqlx::query("SELECT *, xmin::text AS version FROM sagas WHERE order_id = $1")
            .bind(order_id.to_string())
            .fetch_one(&orch.pool)
            .await
            .unwrap();
        let stale: String = read.try_get("version").unwrap();
        // Another writer (the deadline poller, another replica) changes the saga.
        sqlx::query("UPDATE sagas SET attempts = attempts + 1 WHERE order_id = $1")
            .bind(order_id.to_string())
            .execute(&orch.pool)
            .await
            .unwrap();
        let done = Envelope::new(
            order_id,
            now_ms(),
            Message::StepResult {
                step: Step::Delivery,
                outcome: StepOutcome::Done,
            },
        );
        let answer = |version: String| {
            let saga = saga_from_row(&read).unwrap();
            let done = done.clone();
            async move {
                let mut pending = Pending::default();
                pending.sagas.insert(saga.order_id, (saga, None));
                orch.answer(&mut pending, &done, now_ms()).unwrap();
                assert!(pending.fits_one_statement(true));
                let mut conn = orch.conns.get().await.unwrap();
                pending
                    .write_in_one_statement(&mut conn, Some(&version))
                    .await
                    .unwrap()
            }
        };
        assert!(!answer(stale).await, "a stale version must not write");
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
        assert!(answer(fresh).await);
        assert_eq!(
            fx.count("SELECT count(*) FROM sagas WHERE phase = 'done' AND status = 'SUCCESS'")
                .await,
            1
        );
        assert_eq!(fx.count("SELECT count(*) FROM outbox").await, 2);
        // Run through the handler, a late duplicate of the answer is ignored.
        assert!(
            !orch.apply_one(&done, &tracing::Span::none()).await.unwrap(),
            "an answer with nothing to send takes the transaction path"
        );
        fx.drop().await;
    }
}
