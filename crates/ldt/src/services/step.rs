//! What payment, inventory and delivery have in common: a saga step is an *action* paired
//! with its *undo* (as in steno), recorded per order in the service's `ledger` table.
//!
//! The ledger row is the idempotency key, per (order, step):
//! - an action claims the row (`INSERT … ON CONFLICT DO NOTHING`), applies its effect and
//!   records the outcome in the same transaction as the reply it puts in the outbox; a
//!   duplicate finds the row and replies what the first one replied;
//! - a compensation undoes a successful action once (`compensated`); if it arrives first —
//!   the action stalled past its deadline — it leaves a `TIMEOUT` tombstone so that the late
//!   action is refused instead of taking effect.
//!
//! On PostgreSQL the actions that arrive together take one statement when SQL can decide them
//! all ([`OneStatement`]; payment: every user known and each once; inventory: the stock covers
//! the whole batch, or the batch is one action; delivery: always): their effects, ledger rows
//! and replies at once. A duplicate makes that statement fail and change nothing. Otherwise,
//! and then, they take a transaction: their effects are decided together
//! ([`StepEffect::apply_all`]: payment and inventory read the rows they share once, locked,
//! and write them back once), and all their ledger rows (outcome decided) go in with one
//! insert at the end. A duplicate or a refused late action makes that insert fail on the
//! primary key; the batch then rolls back and is done again as a batch, the actions whose
//! ledger rows it found answered from them. Only when that fails too is each message redone
//! on its own, claiming first as above.
//!
//! Each service only supplies its effect ([`StepEffect`]); it never learns the saga's order.

use std::sync::Arc;
use std::time::Duration;

use ldt_runtime::db::{Conn, Held, Pool};
use sqlx::Connection;
use sqlx::Row;
use uuid::Uuid;

use ldt_contract::{Envelope, Fault, Message, Queues, Step, StepOutcome};
use ldt_runtime::bus::Incoming;
use ldt_runtime::consumer::{Delivery, HandleError, Handler};
use ldt_runtime::db::now_ms;
use ldt_runtime::outbox::{OutboxBatch, OutboxSignal};
use tracing::Instrument;

/// The action a command asks for.
#[derive(Debug, Clone)]
pub struct Action {
    pub username: Option<String>,
    /// Credits (payment) or tokens (inventory, delivery).
    pub quantity: i64,
    pub fault: Option<Fault>,
    /// The rest of the routing slip, sent on by this step when its action succeeds.
    pub then: Vec<Message>,
    /// The saga's opening, if the order service opened it: carried on with the slip and
    /// onto the answer (see [`ldt_contract::Envelope::opened`]).
    pub opened: Option<ldt_contract::Opened>,
}

enum Command {
    Act(Action),
    Compensate,
}

fn command_for(step: Step, env: &Envelope) -> Option<Command> {
    let then = env.then.clone();
    let opened = env.opened.clone();
    match (step, &env.body) {
        (
            Step::Payment,
            Message::Debit {
                username,
                total,
                fault,
            },
        ) => Some(Command::Act(Action {
            username: Some(username.clone()),
            quantity: *total,
            fault: *fault,
            then,
            opened,
        })),
        (Step::Inventory, Message::Reserve { amount, fault }) => Some(Command::Act(Action {
            username: None,
            quantity: *amount,
            fault: *fault,
            then,
            opened,
        })),
        (
            Step::Delivery,
            Message::Deliver {
                username,
                amount,
                fault,
            },
        ) => Some(Command::Act(Action {
            username: Some(username.clone()),
            quantity: *amount,
            fault: *fault,
            then,
            opened,
        })),
        (Step::Payment, Message::Refund)
        | (Step::Inventory, Message::Release)
        | (Step::Delivery, Message::CancelDelivery) => Some(Command::Compensate),
        _ => None,
    }
}

/// A ledger row: what happened to one order at this step.
#[derive(Debug, Clone)]
pub struct LedgerRow {
    pub order_id: String,
    pub username: Option<String>,
    pub quantity: i64,
    pub outcome: Outcome,
    pub compensated: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl LedgerRow {
    pub fn from_row(row: &ldt_runtime::db::DbRow) -> Result<LedgerRow, sqlx::Error> {
        Ok(LedgerRow {
            order_id: row.try_get("order_id")?,
            username: row.try_get("username")?,
            quantity: row.try_get("quantity")?,
            outcome: Outcome::parse(&row.try_get::<String, _>("outcome")?),
            compensated: ldt_runtime::db::get_bool(row, "compensated")?,
            created_ms: row.try_get("created_ms")?,
            updated_ms: row.try_get("updated_ms")?,
        })
    }
}

/// A ledger row, locked until the transaction ends (SQLite: its single writer does that).
const LOCK_LEDGER_ROW: ldt_runtime::db::Sql = ldt_runtime::db::Sql {
    postgres: "SELECT * FROM ledger WHERE order_id = $1 FOR UPDATE",
    sqlite: "SELECT * FROM ledger WHERE order_id = $1",
};

/// What the ledger records of one order at a step. Stored as the legacy vocabulary's
/// labels (`SUCCESS`, the step's own refusal such as `INSUFFICIENT_FUND`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Claimed by a transaction that has not decided yet (never seen outside it).
    Pending,
    /// The effect was applied.
    Success,
    /// The business rule refused the action (the step's [`StepEffect::INSUFFICIENT`] label).
    Insufficient,
    /// An injected failure: the step failed without an effect.
    Unknown,
    /// The compensation came before the action: a late action is refused.
    Timeout,
}

impl Outcome {
    /// The label stored for this outcome at a step whose refusal is `insufficient`.
    pub fn label(self, insufficient: &'static str) -> &'static str {
        match self {
            Outcome::Pending => "PENDING",
            Outcome::Success => "SUCCESS",
            Outcome::Insufficient => insufficient,
            Outcome::Unknown => "UNKNOWN",
            Outcome::Timeout => "TIMEOUT",
        }
    }

    /// The outcome a stored label stands for: the step's refusal is the only label left.
    pub fn parse(label: &str) -> Outcome {
        match label {
            "PENDING" => Outcome::Pending,
            "SUCCESS" => Outcome::Success,
            "UNKNOWN" => Outcome::Unknown,
            "TIMEOUT" => Outcome::Timeout,
            _ => Outcome::Insufficient,
        }
    }

    /// The answer the orchestrator gets for it.
    fn step_outcome(self) -> StepOutcome {
        match self {
            Outcome::Success => StepOutcome::Done,
            Outcome::Timeout => StepOutcome::Refused,
            Outcome::Insufficient => StepOutcome::Insufficient,
            Outcome::Pending | Outcome::Unknown => StepOutcome::Failed,
        }
    }
}

/// A step service's own effect and undo, run inside the ledger's transaction.
pub trait StepEffect: Send + Sync + 'static {
    const STEP: Step;
    /// The ledger label of a business refusal (`INSUFFICIENT_FUND`, …).
    const INSUFFICIENT: &'static str;

    /// Applies the action; `Ok(false)` when the business rule refuses it (nothing changed).
    fn apply(
        &self,
        conn: &mut Conn,
        action: &Action,
    ) -> impl std::future::Future<Output = Result<bool, sqlx::Error>> + Send;

    /// Applies actions one after the other, each seeing the effects of those before it, as
    /// `apply` would; one result per action. By default one `apply` each; effects whose rows
    /// many actions share override it to read and write those rows once per batch.
    fn apply_all(
        &self,
        conn: &mut Conn,
        actions: &[&Action],
    ) -> impl std::future::Future<Output = Result<Vec<bool>, sqlx::Error>> + Send {
        apply_each(self, conn, actions)
    }

    /// PostgreSQL: the effect of a batch of actions as SQL, so that applying them, recording
    /// them in the ledger and putting their replies in the outbox take one statement (one
    /// round trip, committing by itself) instead of a transaction of five or six. `None`: the
    /// effect has no such form.
    fn one_statement(&self) -> Option<OneStatement> {
        None
    }

    /// Undoes a successful action.
    fn undo(
        &self,
        conn: &mut Conn,
        row: &LedgerRow,
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send;

    /// Undoes successful actions, as one `undo` each would. By default one `undo` each;
    /// effects whose rows many undos share override it to write those rows once.
    fn undo_all(
        &self,
        conn: &mut Conn,
        rows: &[LedgerRow],
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send {
        undo_each(self, conn, rows)
    }

    /// Locks the rows that `actions` and the undos of `undone` are going to write, in one
    /// order, before a batch with compensations locks any ledger row. An action batch takes
    /// these rows first (in [`StepEffect::apply_all`]) and its ledger keys last; a
    /// compensation batch that took its ledger rows first and the shared rows last would
    /// deadlock against it whenever the two concern the same order (an action and its
    /// compensation racing after a deadline). By default nothing to lock.
    fn lock_shared(
        &self,
        conn: &mut Conn,
        actions: &[&Action],
        undone: &[LedgerRow],
    ) -> impl std::future::Future<Output = Result<(), sqlx::Error>> + Send {
        let _ = (conn, actions, undone);
        std::future::ready(Ok(()))
    }
}

/// Undoes actions one `undo` each: `StepEffect::undo_all`'s default.
pub async fn undo_each<E: StepEffect + ?Sized>(
    effect: &E,
    conn: &mut Conn,
    rows: &[LedgerRow],
) -> Result<(), sqlx::Error> {
    for row in rows {
        effect.undo(&mut *conn, row).await?;
    }
    Ok(())
}

/// The ledger rows of `order_ids` (sorted, distinct), in order-id order; locked until the
/// transaction ends when `lock` (SQLite: its single writer does that).
async fn read_ledger(
    conn: &mut Conn,
    order_ids: &[String],
    lock: bool,
) -> Result<Vec<LedgerRow>, sqlx::Error> {
    let lock = lock && !ldt_runtime::db::conn_is_sqlite(conn);
    let mut rows = Vec::with_capacity(order_ids.len());
    for chunk in order_ids.chunks(ldt_runtime::outbox::ROWS_PER_INSERT) {
        let mut sql = format!(
            "SELECT * FROM ledger WHERE order_id IN ({}) ORDER BY order_id",
            ldt_runtime::db::placeholders(1, chunk.len())
        );
        if lock {
            sql.push_str(" FOR UPDATE");
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*conn, sql)));
        for id in chunk {
            query = query.bind(id.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            rows.push(LedgerRow::from_row(&row)?);
        }
    }
    Ok(rows)
}

/// Whether compensating this row undoes something.
fn to_undo(row: &LedgerRow) -> bool {
    row.outcome == Outcome::Success && !row.compensated
}

/// A batch of actions' effect as SQL, for [`StepEffect::one_statement`]. The actions are the
/// rows of the common table expression `a (i, order_id, username, quantity, …)`, `i` their
/// place in the batch; the effect's SQL may read `a` and must not read the others' columns.
pub struct OneStatement {
    /// Common table expressions (`name AS (…), …`) that apply what can be applied and end
    /// with one named `applied (i)`: the actions applied. A data-modifying one among them
    /// must change nothing when `decided` does not hold.
    pub effect: &'static str,
    /// A condition, which may read `effect`'s expressions, that holds when every action's
    /// outcome is decided (applied, or refused by the business rule as `apply` one after
    /// the other would refuse it). When it does not hold (payment: a user first seen, who
    /// must be created first, or a user twice, whose second debit must see the first)
    /// nothing is written and the batch takes the transaction path.
    pub decided: &'static str,
}

/// Batches of at most this many plain actions take the one-statement path (each action binds
/// [`ONE_STATEMENT_COLUMNS`] parameters); a larger batch, or one with compensations, injected
/// faults or an undecided outcome, takes one transaction, whose statements read and write
/// shared rows once.
const ONE_STATEMENT_BATCH: usize = 64;

/// The columns of `a`, one parameter each per action.
const ONE_STATEMENT_COLUMNS: usize = 11;

/// Applies actions one `apply` each: `StepEffect::apply_all`'s default, and what the
/// batched effects do for batches too small to gain from reading their rows once.
pub async fn apply_each<E: StepEffect + ?Sized>(
    effect: &E,
    conn: &mut Conn,
    actions: &[&Action],
) -> Result<Vec<bool>, sqlx::Error> {
    let mut applied = Vec::with_capacity(actions.len());
    for action in actions {
        applied.push(effect.apply(&mut *conn, action).await?);
    }
    Ok(applied)
}

/// The message handler of a step service.
pub struct StepService<E: StepEffect> {
    pub effect: E,
    pub pool: Pool,
    /// The connections the handler's transactions run on (see [`Held`]).
    pub conns: Held,
    /// PostgreSQL, when the effect has a [`OneStatement`] form.
    one_statement: Option<OneStatement>,
    pub queues: Queues,
    pub signal: OutboxSignal,
    /// How long an action injected with a `timeout` fault stalls before it acts.
    pub stall: Duration,
    pub crash: ldt_runtime::crash::Crash,
    pub metrics: ldt_runtime::metrics::Metrics,
}

impl<E: StepEffect> StepService<E> {
    pub fn new(
        effect: E,
        ctx: &ldt_runtime::context::Context,
        pool: Pool,
        signal: OutboxSignal,
    ) -> Arc<Self> {
        let one_statement = match effect.one_statement() {
            Some(sql) if !ldt_runtime::db::is_sqlite(&pool) => Some(sql),
            _ => None,
        };
        Arc::new(StepService {
            effect,
            one_statement,
            conns: Held::new(&pool, 2),
            pool,
            queues: ctx.queues.clone(),
            signal,
            stall: ctx.settings.stall(),
            crash: ctx.crash(E::STEP.service()),
            metrics: ctx.metrics.clone(),
        })
    }

    /// The command a delivery carries, or why it is poison.
    fn command(msg: &Incoming) -> Result<(Uuid, Command), HandleError> {
        let env = ldt_runtime::consumer::decode(msg)?;
        match command_for(E::STEP, env) {
            // Zero is a legal debit (a free token); a negative quantity would turn a debit
            // into a credit.
            Some(Command::Act(action)) if action.quantity < 0 => Err(HandleError::Poison(format!(
                "{} command with negative quantity {}",
                E::STEP.as_str(),
                action.quantity
            ))),
            Some(cmd) => Ok((env.order_id, cmd)),
            None => Err(HandleError::Poison(format!(
                "the {} service does not handle `{}` messages",
                E::STEP.as_str(),
                env.body.kind()
            ))),
        }
    }

    /// Applies one command inside `tx` (its reply goes into the outbox there too).
    async fn apply_in(
        &self,
        tx: &mut Conn,
        outbox: &mut OutboxBatch,
        order_id: Uuid,
        cmd: &Command,
    ) -> Result<(), HandleError> {
        let span = ldt_runtime::db::span(&self.pool, "ledger");
        match cmd {
            Command::Act(action) => {
                self.act_in(tx, outbox, order_id, action)
                    .instrument(span)
                    .await
            }
            Command::Compensate => {
                self.compensate_in(tx, outbox, order_id)
                    .instrument(span)
                    .await
            }
        }
    }

    /// One command in a transaction of its own.
    async fn apply_alone(&self, order_id: Uuid, cmd: &Command) -> Result<(), HandleError> {
        if let Command::Act(action) = cmd
            && action.fault == Some(Fault::Timeout)
        {
            tracing::info!(%order_id, step = E::STEP.as_str(), stall = ?self.stall, "injected fault: stalling past the deadline");
            tokio::time::sleep(self.stall).await;
        }
        let mut conn = self.conns.get().await?;
        let mut tx = conn.begin().await?;
        let mut outbox = OutboxBatch::default();
        self.apply_in(&mut tx, &mut outbox, order_id, cmd).await?;
        outbox.write(&mut tx).await?;
        self.crash.commit(tx).await?;
        conn.reuse();
        self.signal.committed(outbox);
        Ok(())
    }

    async fn act_in(
        &self,
        tx: &mut Conn,
        outbox: &mut OutboxBatch,
        order_id: Uuid,
        action: &Action,
    ) -> Result<(), HandleError> {
        let id = order_id.to_string();
        let now = now_ms();
        let claimed = sqlx::query(
            "INSERT INTO ledger (order_id, username, quantity, outcome, compensated, created_ms, updated_ms) \
             VALUES ($1, $2, $3, 'PENDING', FALSE, $4, $4) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&id)
        .bind(&action.username)
        .bind(action.quantity)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        let outcome = if claimed {
            let outcome = self.act(tx, order_id, action).await?;
            sqlx::query("UPDATE ledger SET outcome = $2, updated_ms = $3 WHERE order_id = $1")
                .bind(&id)
                .bind(outcome.label(E::INSUFFICIENT))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            outcome
        } else {
            // A duplicate, or an action arriving after its compensation: answer as before.
            let label: String =
                sqlx::query_scalar("SELECT outcome FROM ledger WHERE order_id = $1")
                    .bind(&id)
                    .fetch_one(&mut *tx)
                    .await?;
            tracing::info!(%order_id, step = E::STEP.as_str(), outcome = %label, "repeated or late action; answered from the ledger");
            Outcome::parse(&label)
        };
        self.reply(outbox, order_id, action, now, outcome);
        Ok(())
    }

    /// PostgreSQL: applies a batch of plain actions (no compensation, no injected fault)
    /// with one statement ([`StepService::act_in_one_statement`]); `None` when the batch is
    /// not for this path, or the statement wrote nothing.
    async fn act_all_in_one_statement(
        &self,
        batch: &[Delivery],
        work: &[(usize, Uuid, Command)],
    ) -> Option<Vec<(usize, Result<(), HandleError>)>> {
        let mut actions = Vec::with_capacity(work.len());
        for (i, order_id, cmd) in work {
            match cmd {
                Command::Act(action) if action.fault.is_none() => {
                    actions.push((*order_id, action, &batch[*i].span));
                }
                _ => return None,
            }
        }
        let outcomes = self.act_in_one_statement(&actions).await?;
        Some(work.iter().map(|(i, _, _)| *i).zip(outcomes).collect())
    }

    /// Applies actions (order, action, the message's span), records their outcomes in the
    /// ledger and puts their replies in the outbox, all with one statement, which commits by
    /// itself: one round trip instead of a transaction's five or six. `None` when there is no
    /// such statement here or the batch is too large, or its outcome is not decided (see
    /// [`OneStatement::decided`]: nothing was written), or the statement failed (a duplicate
    /// or a late action finds its ledger row taken: the statement changes nothing); the
    /// actions then take the transaction path.
    async fn act_in_one_statement(
        &self,
        work: &[(Uuid, &Action, &tracing::Span)],
    ) -> Option<Vec<Result<(), HandleError>>> {
        let sql = self.one_statement.as_ref()?;
        if work.is_empty() || work.len() > ONE_STATEMENT_BATCH {
            return None;
        }
        let now = now_ms();
        // Each message's database span covers the statement it shares with the others, and
        // both of its possible replies carry that span's trace context.
        let spans: Vec<tracing::Span> = work
            .iter()
            .map(|(_, _, span)| span.in_scope(|| ldt_runtime::db::span(&self.pool, "ledger")))
            .collect();
        let mut actions = Vec::with_capacity(work.len());
        for ((order_id, action, _), span) in work.iter().zip(&spans) {
            let (done, refused) = span.in_scope(|| {
                let mut done = OutboxBatch::default();
                self.reply(&mut done, *order_id, action, now, Outcome::Success);
                let mut refused = OutboxBatch::default();
                self.reply(&mut refused, *order_id, action, now, Outcome::Insufficient);
                (done.into_single(), refused.into_single())
            });
            actions.push((order_id.to_string(), *action, done?, refused?));
        }
        let statement = one_statement_sql(sql, actions.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(E::INSUFFICIENT)
            .bind(now);
        for (i, (order_id, action, done, refused)) in actions.iter().enumerate() {
            query = query
                .bind(i as i64)
                .bind(order_id.as_str())
                .bind(action.username.as_deref())
                .bind(action.quantity)
                .bind(&done.queue)
                .bind(&done.message_id)
                .bind(&done.payload)
                .bind(&refused.queue)
                .bind(&refused.message_id)
                .bind(&refused.payload)
                .bind(&done.traceparent);
        }
        let written = async {
            let mut conn = self.conns.get().await?;
            self.crash.at(ldt_runtime::crash::Point::BeforeCommit);
            let rows = query.fetch_all(&mut *conn).await?;
            conn.reuse();
            rows.iter()
                .map(|row| Ok((row.try_get::<String, _>("message_id")?, row.try_get("id")?)))
                .collect::<Result<std::collections::HashMap<String, i64>, sqlx::Error>>()
        };
        let written = match written.await {
            Ok(written) if !written.is_empty() => written,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "a batch's one statement failed; it takes the transaction path");
                return None;
            }
        };
        self.crash.at(ldt_runtime::crash::Point::AfterCommit);
        let mut outbox = OutboxBatch::default();
        let mut outcomes = Vec::with_capacity(work.len());
        for (_, _, done, refused) in actions {
            outcomes.push(if let Some(id) = written.get(&done.message_id) {
                outbox.push_written(*id, done);
                Ok(())
            } else if let Some(id) = written.get(&refused.message_id) {
                outbox.push_written(*id, refused);
                Ok(())
            } else {
                // Cannot happen: a decided batch writes a reply for every action. Given back,
                // the message comes again and is answered from its ledger row.
                Err(HandleError::Transient(anyhow::anyhow!(
                    "the batch's statement wrote no reply for this action"
                )))
            });
        }
        self.signal.committed(outbox);
        drop(spans);
        Some(outcomes)
    }

    /// Applies the action's effect (or its injected failure); returns its outcome.
    async fn act(
        &self,
        tx: &mut Conn,
        order_id: Uuid,
        action: &Action,
    ) -> Result<Outcome, sqlx::Error> {
        let applied = if Self::takes_effect(action) {
            self.effect.apply(tx, action).await?
        } else {
            false
        };
        Ok(self.outcome(order_id, action, applied))
    }

    /// Whether the action gets to its effect (an injected `kill` fails the step first).
    fn takes_effect(action: &Action) -> bool {
        action.fault != Some(Fault::Kill)
    }

    /// The outcome of an action whose effect was (or was not) applied.
    fn outcome(&self, order_id: Uuid, action: &Action, applied: bool) -> Outcome {
        if !Self::takes_effect(action) {
            tracing::info!(%order_id, step = E::STEP.as_str(), "injected fault: the step fails");
            Outcome::Unknown
        } else if applied {
            Outcome::Success
        } else {
            Outcome::Insufficient
        }
    }

    /// Puts what follows an action with this outcome into the outbox: after a success
    /// the next command of its routing slip, if there is one; else the answer to the
    /// orchestrator. (A duplicate does the same again, and the next step ignores it.)
    fn reply(
        &self,
        outbox: &mut OutboxBatch,
        order_id: Uuid,
        action: &Action,
        now: i64,
        outcome: Outcome,
    ) {
        let outcome = outcome.step_outcome();
        let mut reply = Envelope::new(
            order_id,
            now,
            Message::StepResult {
                step: E::STEP,
                outcome,
            },
        );
        if outcome == StepOutcome::Done
            && let Some((next, rest)) = action.then.split_first()
        {
            reply.body = next.clone();
            reply.then = rest.to_vec();
        }
        reply.opened = action.opened.clone();
        outbox.push(&self.queues, &reply);
    }

    async fn compensate_in(
        &self,
        tx: &mut Conn,
        outbox: &mut OutboxBatch,
        order_id: Uuid,
    ) -> Result<(), HandleError> {
        let id = order_id.to_string();
        let now = now_ms();
        let tombstone = sqlx::query(
            "INSERT INTO ledger (order_id, username, quantity, outcome, compensated, created_ms, updated_ms) \
             VALUES ($1, NULL, 0, 'TIMEOUT', TRUE, $2, $2) ON CONFLICT (order_id) DO NOTHING",
        )
        .bind(&id)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if tombstone {
            tracing::info!(%order_id, step = E::STEP.as_str(), "compensation before its action: a late action will be refused");
        } else {
            let row = sqlx::query(LOCK_LEDGER_ROW.on(tx))
                .bind(&id)
                .fetch_one(&mut *tx)
                .await?;
            let row = LedgerRow::from_row(&row)?;
            if row.outcome == Outcome::Success && !row.compensated {
                self.effect.undo(&mut *tx, &row).await?;
                sqlx::query(
                    "UPDATE ledger SET compensated = TRUE, updated_ms = $2 WHERE order_id = $1",
                )
                .bind(&id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                tracing::info!(%order_id, step = E::STEP.as_str(), "compensated");
            }
        }
        let reply = Envelope::new(order_id, now, Message::Compensated { step: E::STEP });
        outbox.push(&self.queues, &reply);
        Ok(())
    }

    /// The compensations of a batch (order-id order; an order may come twice, a retry beside
    /// the first) in `tx`, a few statements for them all: the ledger rows they concern locked
    /// at once, the undos applied together ([`StepEffect::undo_all`]) and marked, a
    /// tombstone for each order whose action has not come, a `Compensated` reply for each.
    async fn compensate_all(
        &self,
        tx: &mut Conn,
        outbox: &mut OutboxBatch,
        compensating: &[(Uuid, &tracing::Span)],
    ) -> Result<(), HandleError> {
        if compensating.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let ids = distinct_ids(compensating);
        let mut found = read_ledger(tx, &ids, true).await?;
        let present: std::collections::HashSet<&str> =
            found.iter().map(|r| r.order_id.as_str()).collect();
        let absent: Vec<&String> = ids
            .iter()
            .filter(|id| !present.contains(id.as_str()))
            .collect();
        let mut tombstoned = std::collections::HashSet::new();
        for chunk in absent.chunks(ldt_runtime::outbox::ROWS_PER_INSERT) {
            let sql = ldt_runtime::db::multi_row_insert(
                "INSERT INTO ledger (order_id, username, quantity, outcome, compensated, \
                 created_ms, updated_ms)",
                7,
                chunk.len(),
            ) + " ON CONFLICT (order_id) DO NOTHING RETURNING order_id";
            let mut query = sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(
                ldt_runtime::db::for_conn(&*tx, sql),
            ));
            for id in chunk {
                query = query
                    .bind(id.as_str())
                    .bind(None::<String>)
                    .bind(0i64)
                    .bind("TIMEOUT")
                    .bind(true)
                    .bind(now)
                    .bind(now);
            }
            tombstoned.extend(query.fetch_all(&mut *tx).await?);
        }
        // An action that claimed its row after the read above (and has committed since:
        // the insert waited for it) is compensated like the others.
        let raced: Vec<String> = absent
            .into_iter()
            .filter(|id| !tombstoned.contains(*id))
            .cloned()
            .collect();
        if !raced.is_empty() {
            found.extend(read_ledger(tx, &raced, true).await?);
        }
        let undo: Vec<LedgerRow> = found.into_iter().filter(to_undo).collect();
        if !undo.is_empty() {
            self.effect.undo_all(tx, &undo).await?;
            for chunk in undo.chunks(ldt_runtime::outbox::ROWS_PER_INSERT) {
                let sql = format!(
                    "UPDATE ledger SET compensated = TRUE, updated_ms = $1 WHERE order_id IN ({})",
                    ldt_runtime::db::placeholders(2, chunk.len())
                );
                let mut query =
                    sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)))
                        .bind(now);
                for row in chunk {
                    query = query.bind(row.order_id.as_str());
                }
                query.execute(&mut *tx).await?;
            }
        }
        let undone: std::collections::HashSet<&str> =
            undo.iter().map(|r| r.order_id.as_str()).collect();
        for (order_id, span) in compensating {
            let id = order_id.to_string();
            span.in_scope(|| {
                if tombstoned.remove(&id) {
                    tracing::info!(%order_id, step = E::STEP.as_str(), "compensation before its action: a late action will be refused");
                } else if undone.contains(id.as_str()) {
                    tracing::info!(%order_id, step = E::STEP.as_str(), "compensated");
                }
                let reply = Envelope::new(*order_id, now, Message::Compensated { step: E::STEP });
                outbox.push(&self.queues, &reply);
            });
        }
        Ok(())
    }

    /// Applies `work` (delivery index, order, command) in one transaction, in order-id order
    /// so that concurrent batches take row locks in the same order.
    ///
    /// The actions' effects are applied together first; their ledger rows (outcome decided)
    /// go in with one insert at the end. No claim first: a duplicate or an action whose
    /// compensation came first finds its ledger row taken and the insert fails on the primary
    /// key (see [`StepService::handle_batch`] for what follows). The actions in `answered`
    /// (order id → the outcome its ledger row records) are not applied: each is answered as
    /// recorded, as the claiming path answers a duplicate. So is an action whose order came
    /// earlier in this batch (a message and its duplicate taken together): the first one's
    /// outcome.
    async fn apply_batch(
        &self,
        batch: &[Delivery],
        work: &mut [(usize, Uuid, Command)],
        answered: &std::collections::HashMap<Uuid, Outcome>,
    ) -> Result<(), HandleError> {
        work.sort_by_key(|(_, order_id, _)| *order_id);
        // Each message's database span covers the statements it shares with the others.
        let spans: Vec<tracing::Span> = work
            .iter()
            .map(|(i, _, _)| {
                batch[*i]
                    .span
                    .in_scope(|| ldt_runtime::db::span(&self.pool, "ledger"))
            })
            .collect();
        let mut conn = self.conns.get().await?;
        let mut tx = conn.begin().await?;
        // Which actions act: not those answered from the ledger, nor a second one for the same
        // order (`work` is in order-id order, so it follows the first).
        let mut first = None;
        let acts: Vec<bool> = work
            .iter()
            .map(|(_, order_id, cmd)| match cmd {
                Command::Act(_) => {
                    let again = first == Some(*order_id);
                    first = Some(*order_id);
                    !again && !answered.contains_key(order_id)
                }
                Command::Compensate => false,
            })
            .collect();
        let acting: Vec<&Action> = work
            .iter()
            .zip(&acts)
            .filter_map(|((_, _, cmd), acts)| match cmd {
                Command::Act(action) if *acts && Self::takes_effect(action) => Some(action),
                _ => None,
            })
            .collect();
        let compensating: Vec<(Uuid, &tracing::Span)> = work
            .iter()
            .zip(&spans)
            .filter(|((_, _, cmd), _)| matches!(cmd, Command::Compensate))
            .map(|((_, order_id, _), span)| (*order_id, span))
            .collect();
        if !compensating.is_empty() {
            // The rows the undos will write, locked with the actions' before any ledger row
            // (read unlocked first: a ledger row's user and quantity never change).
            let ids = distinct_ids(&compensating);
            let undone: Vec<LedgerRow> = read_ledger(&mut tx, &ids, false)
                .await?
                .into_iter()
                .filter(to_undo)
                .collect();
            self.effect.lock_shared(&mut tx, &acting, &undone).await?;
        }
        let mut applied = self.effect.apply_all(&mut tx, &acting).await?.into_iter();
        let mut outbox = OutboxBatch::default();
        let mut ledger = Vec::new();
        let mut decided: std::collections::HashMap<Uuid, Outcome> = Default::default();
        for (((_, order_id, cmd), span), acts) in work.iter().zip(&spans).zip(&acts) {
            match cmd {
                Command::Act(action) if !*acts => {
                    let outcome = answered
                        .get(order_id)
                        .or_else(|| decided.get(order_id))
                        .copied()
                        .unwrap_or(Outcome::Unknown);
                    span.in_scope(|| {
                        tracing::info!(%order_id, step = E::STEP.as_str(), outcome = outcome.label(E::INSUFFICIENT), "repeated or late action; answered from the ledger");
                        self.reply(&mut outbox, *order_id, action, now_ms(), outcome);
                    });
                }
                Command::Act(action) => {
                    let now = now_ms();
                    let applied = Self::takes_effect(action) && applied.next() == Some(true);
                    let outcome = span.in_scope(|| self.outcome(*order_id, action, applied));
                    decided.insert(*order_id, outcome);
                    ledger.push(NewLedgerRow {
                        order_id: order_id.to_string(),
                        username: action.username.clone(),
                        quantity: action.quantity,
                        outcome: outcome.label(E::INSUFFICIENT),
                        at_ms: now,
                    });
                    span.in_scope(|| self.reply(&mut outbox, *order_id, action, now, outcome));
                }
                // Together, below.
                Command::Compensate => {}
            }
        }
        self.compensate_all(&mut tx, &mut outbox, &compensating)
            .await?;
        NewLedgerRow::insert_all(&mut tx, &ledger).await?;
        outbox.write(&mut tx).await?;
        self.crash.commit(tx).await?;
        conn.reuse();
        self.signal.committed(outbox);
        Ok(())
    }

    /// After a batch failed: if some of its actions have a ledger row already (duplicates,
    /// actions whose compensation came first, an order another replica claimed meanwhile),
    /// the batch once more, those answered from the ledger. Whether that succeeded.
    ///
    /// Without it, one such message sent the whole batch down the one-at-a-time path: after a
    /// broker node is lost, when redelivered and republished messages are everywhere, nearly
    /// every batch did, each message paid a commit of its own (on a synchronous standby, a
    /// round trip to it), the step fell behind its queue, and the sagas waiting on it timed
    /// out, which sent more actions after their compensations.
    async fn apply_batch_again(
        &self,
        batch: &[Delivery],
        work: &mut [(usize, Uuid, Command)],
    ) -> bool {
        let mut ids: Vec<String> = work
            .iter()
            .filter(|(_, _, cmd)| matches!(cmd, Command::Act(_)))
            .map(|(_, order_id, _)| order_id.to_string())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let recorded = async {
            let mut conn = self.conns.get().await?;
            let rows = read_ledger(&mut conn, &ids, false).await?;
            conn.reuse();
            Ok::<_, sqlx::Error>(rows)
        };
        let answered: std::collections::HashMap<Uuid, Outcome> = match recorded.await {
            Ok(rows) => rows
                .iter()
                .filter_map(|r| Some((r.order_id.parse().ok()?, r.outcome)))
                .collect(),
            Err(_) => return false,
        };
        !answered.is_empty() && self.apply_batch(batch, work, &answered).await.is_ok()
    }
}

/// The orders of `compensating` (in order-id order), each once, as the ledger keys them.
fn distinct_ids(compensating: &[(Uuid, &tracing::Span)]) -> Vec<String> {
    let mut ids: Vec<String> = compensating.iter().map(|(id, _)| id.to_string()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The statement of [`StepService::act_all_in_one_statement`] for `n` actions: their effect,
/// their ledger rows and their replies (of the two prepared for each, the one its outcome
/// calls for), or nothing when the outcome is not decided. Parameters: `$1` the refusal's
/// ledger label, `$2` now; then per action, in the order of `a`'s columns: its place, order
/// id, username, quantity; the reply on success (queue, message id, payload); the reply on
/// refusal (the same); the trace context. The ledger insert has no `ON CONFLICT`: a duplicate
/// fails the whole statement, the effect with it. Returns `id, message_id` of each reply
/// written.
fn one_statement_sql(sql: &OneStatement, n: usize) -> String {
    let mut statement = String::from(
        "WITH a (i, order_id, username, quantity, done_queue, done_id, done_payload, \
         refused_queue, refused_id, refused_payload, traceparent) AS (",
    );
    ldt_runtime::db::push_values(&mut statement, 3, ONE_STATEMENT_COLUMNS, n);
    // Each action with whether it was applied; none when the outcome is not decided.
    let decided = format!(
        "), {effect}, \
         d AS (SELECT a.*, p.i IS NOT NULL AS ok FROM a LEFT JOIN applied p ON p.i = a.i \
               WHERE ({decided})), \
         l AS (INSERT INTO ledger (order_id, username, quantity, outcome, compensated, created_ms, updated_ms) \
               SELECT order_id, username, quantity, CASE WHEN ok THEN 'SUCCESS' ELSE $1 END, FALSE, $2, $2 \
               FROM d), \
         o AS ({reply}) \
         SELECT id, message_id FROM o",
        effect = sql.effect,
        decided = sql.decided,
        reply = ldt_runtime::outbox::insert_from(
            "SELECT CASE WHEN ok THEN done_queue ELSE refused_queue END, \
                    CASE WHEN ok THEN done_id ELSE refused_id END, \
                    CASE WHEN ok THEN done_payload ELSE refused_payload END, traceparent, $2 \
             FROM d RETURNING id, message_id"
        ),
    );
    statement.push_str(&decided);
    statement
}

/// A ledger row the batch path inserts, outcome decided.
struct NewLedgerRow {
    order_id: String,
    username: Option<String>,
    quantity: i64,
    outcome: &'static str,
    at_ms: i64,
}

impl NewLedgerRow {
    /// One multi-row insert; fails (the batch rolls back) if any order already has a row.
    async fn insert_all(tx: &mut Conn, rows: &[NewLedgerRow]) -> Result<(), sqlx::Error> {
        for chunk in rows.chunks(ldt_runtime::outbox::ROWS_PER_INSERT) {
            let sql = ldt_runtime::db::multi_row_insert(
                "INSERT INTO ledger (order_id, username, quantity, outcome, compensated, \
                 created_ms, updated_ms)",
                7,
                chunk.len(),
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)));
            for row in chunk {
                query = query
                    .bind(&row.order_id)
                    .bind(&row.username)
                    .bind(row.quantity)
                    .bind(row.outcome)
                    .bind(false)
                    .bind(row.at_ms)
                    .bind(row.at_ms);
            }
            query.execute(&mut *tx).await?;
        }
        Ok(())
    }
}

impl<E: StepEffect> Handler for StepService<E> {
    /// An action injected with a `timeout` fault stalls: it runs outside the batches.
    fn runs_alone(&self, msg: &Incoming) -> bool {
        matches!(Self::command(msg), Ok((_, Command::Act(a))) if a.fault == Some(Fault::Timeout))
    }

    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let (order_id, cmd) = Self::command(msg)?;
        self.apply_alone(order_id, &cmd).await
    }

    /// A compensation that failed for good tells the saga, which waits for an operator
    /// instead of sending it again and again. (An action parked so needs nothing: the saga's
    /// deadline passes, and its compensation leaves a tombstone that refuses a replay.)
    async fn parked(&self, msg: &Incoming, reason: &str) -> Result<(), HandleError> {
        let Ok((order_id, Command::Compensate)) = Self::command(msg) else {
            return Ok(());
        };
        let failed = Envelope::new(
            order_id,
            now_ms(),
            Message::CompensationFailed {
                step: E::STEP,
                reason: reason.chars().take(500).collect(),
            },
        );
        let mut outbox = OutboxBatch::default();
        outbox.push(&self.queues, &failed);
        let mut conn = self.conns.get().await?;
        let mut tx = conn.begin().await?;
        outbox.write(&mut tx).await?;
        tx.commit().await?;
        conn.reuse();
        self.signal.committed(outbox);
        Ok(())
    }

    /// One transaction for the whole batch (a batch of one too: the batch path takes fewer
    /// statements). A stalled command (injected `timeout`) waits on its own. If the batch's
    /// transaction fails because some of its actions have a ledger row already, it is done
    /// again as a batch with those answered from the ledger; if it fails otherwise (or again),
    /// each command is retried in its own, one after the other, so one bad message cannot
    /// hold back the others.
    async fn handle_batch(&self, batch: &[Delivery]) -> Vec<Result<(), HandleError>> {
        let mut results: Vec<Option<Result<(), HandleError>>> =
            batch.iter().map(|_| None).collect();
        let mut work = Vec::new();
        let mut alone = Vec::new();
        for (i, d) in batch.iter().enumerate() {
            match Self::command(&d.msg) {
                Err(e) => results[i] = Some(Err(e)),
                Ok((order_id, Command::Act(a))) if a.fault == Some(Fault::Timeout) => {
                    alone.push((i, order_id, Command::Act(a)));
                }
                Ok((order_id, cmd)) => work.push((i, order_id, cmd)),
            }
        }
        let stalled = futures_util::future::join_all(alone.iter().map(|(i, order_id, cmd)| {
            self.apply_alone(*order_id, cmd)
                .instrument(batch[*i].span.clone())
        }));
        let together = async {
            if let Some(outcomes) = self.act_all_in_one_statement(batch, &work).await {
                return outcomes;
            }
            let failed = |then: &str| {
                self.metrics.inc(
                    "ldt_step_batches_failed_total",
                    "Batches of a step whose transaction failed, by what followed: done again \
                     with the actions already in the ledger answered from it, or one message \
                     at a time.",
                    &[("step", E::STEP.as_str()), ("then", then)],
                    1,
                )
            };
            let done = !work.is_empty()
                && (self
                    .apply_batch(batch, &mut work, &Default::default())
                    .await
                    .is_ok()
                    || {
                        let again = self.apply_batch_again(batch, &mut work).await;
                        failed(if again {
                            "answered_from_ledger"
                        } else {
                            "one_at_a_time"
                        });
                        again
                    });
            if !done {
                // One at a time, in delivery order per order: a refund that was delivered
                // before its debit still comes first.
                let mut outcomes = Vec::with_capacity(work.len());
                for (i, order_id, cmd) in &work {
                    let r = self
                        .apply_alone(*order_id, cmd)
                        .instrument(batch[*i].span.clone())
                        .await;
                    outcomes.push((*i, r));
                }
                outcomes
            } else {
                work.iter().map(|w| (w.0, Ok(()))).collect()
            }
        };
        let (stalled, together) = futures_util::future::join(stalled, together).await;
        for ((i, _, _), r) in alone.iter().zip(stalled) {
            results[*i] = Some(r);
        }
        for (i, r) in together {
            results[i] = Some(r);
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
mod tests;
