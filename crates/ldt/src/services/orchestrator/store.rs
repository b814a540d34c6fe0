//! The orchestrator's tables: `sagas` (one row per saga, with its deadline), `saga_log` and
//! its outbox. A transaction gathers what its transitions produced ([`Pending`]) and writes
//! it with a few multi-row statements just before it commits, however many messages it
//! handled; on PostgreSQL a small write is one statement. On PostgreSQL new sagas are also
//! written without a transaction, with one statement ([`insert_started`]), and so are answers:
//! their sagas read without a lock, each with its row version ([`read_versioned_all`]), and
//! written only where still at it ([`Pending::write_in_one_statement`]). The deadline poller claims due
//! sagas with `FOR UPDATE SKIP LOCKED`, so a deadline fires once even with several replicas.

use std::collections::{HashMap, HashSet};

use ldt_contract::{Envelope, OrderStatus, Queues, Step};
use ldt_runtime::consumer::HandleError;
use ldt_runtime::db::{Conn, DbRow, Pool};
use ldt_runtime::outbox::{self, OutboxBatch, OutboxRow, Query, ROWS_PER_INSERT};
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use super::saga::{Effects, LogKind, LogLine, Phase, Saga, Terms};

/// Sagas past their deadline, skipping those another replica is handling.
const CLAIM_DUE: ldt_runtime::db::Sql = ldt_runtime::db::Sql {
    postgres: "SELECT * FROM sagas WHERE deadline_ms <= $1 ORDER BY deadline_ms LIMIT 100 \
               FOR UPDATE SKIP LOCKED",
    sqlite: "SELECT * FROM sagas WHERE deadline_ms <= $1 ORDER BY deadline_ms LIMIT 100",
};

/// A saga as stored, with the trace context of its order (so work the orchestrator starts
/// by itself, a deadline, stays in the order's trace).
#[derive(Debug, Clone)]
pub struct Stored {
    pub saga: Saga,
    pub traceparent: Option<String>,
}

fn corrupt(what: &str) -> HandleError {
    HandleError::Transient(anyhow::anyhow!("corrupt saga row: {what}"))
}

/// The compensations still to apply, as stored: step names, comma-separated.
fn pending_to_text(pending: &[Step]) -> String {
    pending
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn pending_from_text(text: &str) -> Option<Vec<Step>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(Step::parse)
        .collect()
}

pub fn saga_from_row(row: &DbRow) -> Result<Stored, HandleError> {
    let order_id: String = row.try_get("order_id")?;
    let phase: String = row.try_get("phase")?;
    let step: String = row.try_get("step")?;
    let status: Option<String> = row.try_get("status")?;
    let pending: String = row.try_get("pending_comp")?;
    let faults: String = row.try_get("faults")?;
    let attempts: i32 = row.try_get("attempts")?;
    let saga = Saga {
        order_id: Uuid::parse_str(&order_id).map_err(|_| corrupt("order_id"))?,
        terms: Terms {
            username: row.try_get("username")?,
            price: row.try_get("price")?,
            amount: row.try_get("amount")?,
            faults: serde_json::from_str(&faults).map_err(|_| corrupt("faults"))?,
        },
        phase: Phase::parse(&phase).ok_or_else(|| corrupt("phase"))?,
        step: Step::parse(&step).ok_or_else(|| corrupt("step"))?,
        status: match status {
            None => None,
            Some(s) => Some(OrderStatus::parse(&s).ok_or_else(|| corrupt("status"))?),
        },
        pending: pending_from_text(&pending).ok_or_else(|| corrupt("pending_comp"))?,
        attempts: u32::try_from(attempts).unwrap_or(0),
        stuck: row.try_get("stuck_reason")?,
        deadline_ms: row.try_get("deadline_ms")?,
        updated_ms: row.try_get("updated_ms")?,
    };
    Ok(Stored {
        saga,
        traceparent: row.try_get("traceparent")?,
    })
}

/// Applies the changed sagas in `v` (one row per saga: the columns [`bind_saga_values`]
/// binds).
const UPDATE_SAGAS_FROM_V: &str = "UPDATE sagas SET phase = v.phase, step = v.step, \
     status = v.status, pending_comp = v.pending_comp, attempts = v.attempts, \
     stuck_reason = v.stuck_reason, deadline_ms = v.deadline_ms, updated_ms = v.updated_ms \
     FROM v WHERE sagas.order_id = v.order_id";

/// The columns of `v`.
const V_COLUMNS: &str = "v (order_id, phase, step, status, pending_comp, attempts, stuck_reason, \
                         deadline_ms, updated_ms)";
const V_WIDTH: usize = 9;

/// The columns of `v` for a guarded write: each saga with the row version it was read at.
const V_COLUMNS_VERSIONED: &str = "v (order_id, phase, step, status, pending_comp, attempts, \
                                   stuck_reason, deadline_ms, updated_ms, version)";

/// Binds a changed saga's values, in the order of [`V_COLUMNS`].
fn bind_saga_values<'q>(query: Query<'q>, saga: &'q Saga) -> Query<'q> {
    query
        .bind(saga.order_id.to_string())
        .bind(saga.phase.as_str())
        .bind(saga.step.as_str())
        .bind(saga.status.map(|s| s.as_str()))
        .bind(pending_to_text(&saga.pending))
        .bind(i32::try_from(saga.attempts).unwrap_or(i32::MAX))
        .bind(saga.stuck.as_deref())
        .bind(saga.deadline_ms)
        .bind(saga.updated_ms)
}

/// The columns of a new saga's row.
const SAGA_COLUMNS: &str = "sagas (order_id, username, price, amount, faults, phase, step, \
                            status, pending_comp, attempts, stuck_reason, deadline_ms, \
                            created_ms, updated_ms, traceparent)";
const SAGA_WIDTH: usize = 15;

/// Binds a new saga's row, in the order of [`SAGA_COLUMNS`]: a saga just started, or one
/// started from an answer and already past it (see [`Start`]).
fn bind_new_saga<'q>(
    query: Query<'q>,
    saga: &'q Saga,
    created_ms: i64,
    traceparent: Option<String>,
) -> Query<'q> {
    query
        .bind(saga.order_id.to_string())
        .bind(saga.terms.username.as_str())
        .bind(saga.terms.price)
        .bind(saga.terms.amount)
        .bind(serde_json::to_string(&saga.terms.faults).unwrap_or_default())
        .bind(saga.phase.as_str())
        .bind(saga.step.as_str())
        .bind(saga.status.map(|s| s.as_str()))
        .bind(pending_to_text(&saga.pending))
        .bind(i32::try_from(saga.attempts).unwrap_or(i32::MAX))
        .bind(saga.stuck.as_deref())
        .bind(saga.deadline_ms)
        .bind(created_ms)
        .bind(saga.updated_ms)
        .bind(traceparent)
}

/// A saga log line: order id, step, kind, event, when.
#[derive(Debug, Clone)]
struct LogRow {
    order_id: String,
    line: LogLine,
    at_ms: i64,
}

const LOG_COLUMNS: &str = "saga_log (order_id, step, kind, event, at_ms)";

fn bind_log_row<'q>(query: Query<'q>, row: &'q LogRow) -> Query<'q> {
    query
        .bind(row.order_id.as_str())
        .bind(row.line.step.as_str())
        .bind(row.line.kind.as_str())
        .bind(row.line.event.as_str())
        .bind(row.at_ms)
}

/// The rows a one-statement write returns: `(key, NULL)` for each saga written (its order id),
/// `(message id, id)` for each outbox row written.
fn written_rows(rows: &[DbRow]) -> Result<(HashSet<Uuid>, HashMap<String, i64>), sqlx::Error> {
    let mut sagas = HashSet::new();
    let mut ids = HashMap::new();
    for row in rows {
        let key: String = row.try_get(0)?;
        match row.try_get::<Option<i64>, _>(1)? {
            Some(id) => {
                ids.insert(key, id);
            }
            None => {
                let order_id = Uuid::parse_str(&key)
                    .map_err(|_| sqlx::Error::Protocol(format!("not an order id: {key}")))?;
                sagas.insert(order_id);
            }
        }
    }
    Ok((sagas, ids))
}

/// A transaction writing at most this many rows into each table writes them all with one
/// statement (PostgreSQL); more, and it takes a statement per table.
const ONE_STATEMENT_ROWS: usize = 4;

/// What one transaction works on: the sagas it holds (read with one statement), the log
/// lines and outbox rows its transitions produce — all written back with a few multi-row
/// statements just before it commits.
#[derive(Default)]
pub struct Pending {
    log: Vec<LogRow>,
    pub outbox: OutboxBatch,
    /// The order of each row of `outbox` not written yet, in its order.
    outbox_orders: Vec<Uuid>,
    /// The sagas this transaction holds (locked by it, or inserted by it), by order id, each
    /// with whether it changed since.
    sagas: HashMap<Uuid, (Stored, bool)>,
}

impl Pending {
    /// The saga of `order_id`, if this transaction holds it.
    pub fn saga(&self, order_id: &Uuid) -> Option<&Stored> {
        self.sagas.get(order_id).map(|(stored, _)| stored)
    }

    /// Holds a saga as read (or as just inserted): unchanged.
    pub fn hold(&mut self, stored: Stored) {
        self.sagas
            .entry(stored.saga.order_id)
            .or_insert((stored, false));
    }

    /// Takes a transition's log lines and commands (the commands with the current span's
    /// trace context).
    pub fn add(&mut self, queues: &Queues, order_id: Uuid, fx: &Effects, now: i64) {
        let id = order_id.to_string();
        for line in &fx.log {
            self.log.push(LogRow {
                order_id: id.clone(),
                line: line.clone(),
                at_ms: now,
            });
        }
        for cmd in &fx.send {
            let mut env = Envelope::new(order_id, now, cmd.body.clone());
            env.then = cmd.then.clone();
            self.outbox.push(queues, &env);
            self.outbox_orders.push(order_id);
        }
    }

    /// Records a transition: the saga after it, its log lines and commands.
    pub fn change(&mut self, queues: &Queues, saga: Saga, fx: &Effects, now: i64) {
        let order_id = saga.order_id;
        match self.sagas.get_mut(&order_id) {
            Some((stored, changed)) => {
                *changed |= stored.saga != saga;
                stored.saga = saga;
            }
            None => {
                self.sagas.insert(
                    order_id,
                    (
                        Stored {
                            saga,
                            traceparent: None,
                        },
                        true,
                    ),
                );
            }
        }
        self.add(queues, order_id, fx, now);
    }

    fn changed(&self) -> Vec<&Saga> {
        self.sagas
            .values()
            .filter(|(_, changed)| *changed)
            .map(|(stored, _)| &stored.saga)
            .collect()
    }

    /// Writes the transaction's saga changes, log lines and messages: on PostgreSQL with one
    /// statement when there are few (a round trip each costs more than the rows), else with a
    /// multi-row statement per table.
    pub async fn write(&mut self, tx: &mut Conn) -> Result<(), sqlx::Error> {
        if !ldt_runtime::db::conn_is_sqlite(tx) && self.fits_one_statement(false) {
            self.write_in_one_statement(tx, None).await?;
            return Ok(());
        }
        self.write_per_table(tx).await
    }

    /// Whether [`Pending::write_in_one_statement`] can write what this transaction holds.
    /// `guarded`: the sagas were read without a lock, each at a row version; every saga held
    /// must then have changed (the log lines of one that did not would have no version to
    /// guard them), and the statement may hold up to [`ROWS_PER_INSERT`] rows a table.
    pub fn fits_one_statement(&self, guarded: bool) -> bool {
        let changed = self.changed().len();
        let (sagas_fit, rows) = if guarded {
            (changed >= 1 && changed == self.sagas.len(), ROWS_PER_INSERT)
        } else {
            (changed <= ONE_STATEMENT_ROWS, ONE_STATEMENT_ROWS)
        };
        sagas_fit && self.log.len() <= rows && (1..=rows).contains(&self.outbox.unwritten().len())
    }

    /// PostgreSQL: the saga updates, the log lines and the outbox rows in one statement.
    /// With `versions`, the sagas were read without a lock, each at a row version (`xmin`):
    /// the statement writes a saga, its log lines and its messages only if the saga is still
    /// at that version, and leaves out (writes nothing of) one that changed meanwhile.
    /// Returns the sagas written; `outbox` then holds only their messages.
    pub async fn write_in_one_statement(
        &mut self,
        tx: &mut Conn,
        versions: Option<&HashMap<Uuid, String>>,
    ) -> Result<HashSet<Uuid>, sqlx::Error> {
        let changed = self.changed();
        let mut sql = String::from("WITH ");
        let mut next = 1;
        if !changed.is_empty() {
            sql.push_str(if versions.is_some() {
                V_COLUMNS_VERSIONED
            } else {
                V_COLUMNS
            });
            sql.push_str(" AS (");
            let width = V_WIDTH + usize::from(versions.is_some());
            next = ldt_runtime::db::push_values(&mut sql, next, width, changed.len());
            sql.push_str("), u AS (");
            sql.push_str(UPDATE_SAGAS_FROM_V);
            if versions.is_some() {
                sql.push_str(" AND sagas.xmin = v.version::xid");
            }
            sql.push_str(" RETURNING sagas.order_id), ");
        }
        // Guarded, only the rows of the sagas written.
        let only_if = if versions.is_some() {
            " WHERE x.order_id IN (SELECT order_id FROM u)"
        } else {
            ""
        };
        if !self.log.is_empty() {
            sql.push_str(&format!("l AS (INSERT INTO {LOG_COLUMNS} SELECT * FROM ("));
            next = ldt_runtime::db::push_values(&mut sql, next, 5, self.log.len());
            sql.push_str(") AS x (order_id, step, kind, event, at_ms)");
            sql.push_str(only_if);
            sql.push_str("), ");
        }
        let mut values = format!("SELECT {} FROM (", outbox::COLUMNS);
        ldt_runtime::db::push_values(&mut values, next, 6, self.outbox.unwritten().len());
        values.push_str(") AS x (order_id, queue, message_id, payload, traceparent, created_ms)");
        values.push_str(only_if);
        sql.push_str("o AS (");
        sql.push_str(&outbox::insert_from(&values));
        sql.push_str(" RETURNING id, message_id) ");
        // The sagas written (without an id), then the messages (with theirs).
        if !changed.is_empty() {
            sql.push_str("SELECT order_id AS key, NULL::bigint AS id FROM u UNION ALL ");
        }
        sql.push_str("SELECT message_id, id FROM o");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)));
        for saga in &changed {
            query = bind_saga_values(query, saga);
            if let Some(versions) = versions {
                query = query.bind(versions.get(&saga.order_id).cloned().unwrap_or_default());
            }
        }
        for row in &self.log {
            query = bind_log_row(query, row);
        }
        let now = ldt_runtime::db::now_ms();
        for (row, order_id) in self.outbox.unwritten().iter().zip(&self.outbox_orders) {
            query = row.bind_columns(query.bind(order_id.to_string())).bind(now);
        }
        let (written, ids) = written_rows(&query.fetch_all(&mut *tx).await?)?;
        let mut outbox = OutboxBatch::default();
        for (row, order_id) in self.outbox.unwritten().iter().zip(&self.outbox_orders) {
            if versions.is_some() && !written.contains(order_id) {
                continue;
            }
            let id = ids.get(&row.message_id).copied().ok_or_else(|| {
                sqlx::Error::Protocol(format!("no outbox id for message {}", row.message_id))
            })?;
            outbox.push_written(id, row.clone());
        }
        self.outbox = outbox;
        self.outbox_orders.clear();
        self.sagas.clear();
        self.log.clear();
        Ok(written)
    }

    async fn write_per_table(&mut self, tx: &mut Conn) -> Result<(), sqlx::Error> {
        let changed = self.changed();
        for chunk in changed.chunks(ROWS_PER_INSERT) {
            let mut sql = format!("WITH {V_COLUMNS} AS (");
            ldt_runtime::db::push_values(&mut sql, 1, V_WIDTH, chunk.len());
            sql.push_str(") ");
            sql.push_str(UPDATE_SAGAS_FROM_V);
            let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)));
            for saga in chunk {
                query = bind_saga_values(query, saga);
            }
            query.execute(&mut *tx).await?;
        }
        self.sagas.clear();
        for chunk in self.log.chunks(ROWS_PER_INSERT) {
            let sql = ldt_runtime::db::multi_row_insert(
                &format!("INSERT INTO {LOG_COLUMNS}"),
                5,
                chunk.len(),
            );
            let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)));
            for row in chunk {
                query = bind_log_row(query, row);
            }
            query.execute(&mut *tx).await?;
        }
        self.log.clear();
        self.outbox_orders.clear();
        self.outbox.write(tx).await
    }
}

/// Inserts new sagas (each with its order's trace context); returns the order ids of those
/// that are new (the others existed: their `OrderPlaced` was a duplicate).
pub async fn insert_sagas(
    tx: &mut Conn,
    sagas: &[(&Saga, Option<String>)],
) -> Result<HashSet<Uuid>, sqlx::Error> {
    let mut inserted = HashSet::new();
    for chunk in sagas.chunks(ROWS_PER_INSERT) {
        let mut sql = ldt_runtime::db::multi_row_insert(
            &format!("INSERT INTO {SAGA_COLUMNS}"),
            SAGA_WIDTH,
            chunk.len(),
        );
        sql.push_str(" ON CONFLICT (order_id) DO NOTHING RETURNING order_id");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)));
        for (saga, traceparent) in chunk {
            query = bind_new_saga(query, saga, saga.updated_ms, traceparent.clone());
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

/// A saga to start with [`insert_started`]: its log lines (each with its time), its one
/// command (none when the order service sent the first) and its order's trace context. Most
/// often a saga just started by its `OrderPlaced`; or, when a step's answer carrying the
/// saga's opening came first (`--order-opens-saga`), the saga started from that opening and
/// already past the answer.
pub struct Start {
    pub saga: Saga,
    /// When the saga started: when its order was placed, for one started from an answer.
    pub created_ms: i64,
    pub lines: Vec<(LogLine, i64)>,
    pub command: Option<OutboxRow>,
    pub traceparent: Option<String>,
}

/// PostgreSQL: inserts new sagas (each order once) with their log lines and commands, in one
/// statement that commits by itself. Returns the sagas inserted and their commands as
/// written; of a saga that existed (a duplicate `OrderPlaced`, an answer whose saga its
/// `OrderPlaced` started first) nothing is written.
pub async fn insert_started(
    conn: &mut Conn,
    starts: &[Start],
) -> Result<(HashSet<Uuid>, OutboxBatch), sqlx::Error> {
    let commands: Vec<(&Start, &OutboxRow)> = starts
        .iter()
        .filter_map(|start| Some((start, start.command.as_ref()?)))
        .collect();
    let lines = starts.iter().map(|start| start.lines.len()).sum();
    let mut sql = format!("WITH s AS (INSERT INTO {SAGA_COLUMNS} ");
    let mut next = ldt_runtime::db::push_values(&mut sql, 1, SAGA_WIDTH, starts.len());
    sql.push_str(&format!(
        " ON CONFLICT (order_id) DO NOTHING RETURNING order_id), \
         l AS (INSERT INTO {LOG_COLUMNS} SELECT * FROM ("
    ));
    next = ldt_runtime::db::push_values(&mut sql, next, 5, lines);
    sql.push_str(
        ") AS x (order_id, step, kind, event, at_ms) WHERE x.order_id IN (SELECT order_id FROM s))",
    );
    if !commands.is_empty() {
        let mut values = format!("SELECT {} FROM (", outbox::COLUMNS);
        ldt_runtime::db::push_values(&mut values, next, 6, commands.len());
        values.push_str(
            ") AS x (order_id, queue, message_id, payload, traceparent, created_ms) \
             WHERE x.order_id IN (SELECT order_id FROM s)",
        );
        sql.push_str(", o AS (");
        sql.push_str(&outbox::insert_from(&values));
        sql.push_str(" RETURNING id, message_id)");
    }
    // The sagas inserted (without an id), then the commands (with theirs).
    sql.push_str(" SELECT order_id AS key, NULL::bigint AS id FROM s");
    if !commands.is_empty() {
        sql.push_str(" UNION ALL SELECT message_id, id FROM o");
    }
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for start in starts {
        query = bind_new_saga(
            query,
            &start.saga,
            start.created_ms,
            start.traceparent.clone(),
        );
    }
    for start in starts {
        for (line, at_ms) in &start.lines {
            query = query
                .bind(start.saga.order_id.to_string())
                .bind(line.step.as_str())
                .bind(line.kind.as_str())
                .bind(line.event.as_str())
                .bind(*at_ms);
        }
    }
    for (start, command) in &commands {
        query = command
            .bind_columns(query.bind(start.saga.order_id.to_string()))
            .bind(start.saga.updated_ms);
    }
    let (inserted, ids) = written_rows(&query.fetch_all(&mut *conn).await?)?;
    let mut outbox = OutboxBatch::default();
    for (start, command) in commands {
        if let Some(id) = ids.get(&command.message_id) {
            outbox.push_written(*id, command.clone());
        } else if inserted.contains(&start.saga.order_id) {
            return Err(sqlx::Error::Protocol(format!(
                "no outbox id for message {}",
                command.message_id
            )));
        }
    }
    Ok((inserted, outbox))
}

/// Reads (PostgreSQL: locks, in order-id order so concurrent batches cannot deadlock) the
/// sagas `order_ids` name into `pending`.
pub async fn lock(
    tx: &mut Conn,
    pending: &mut Pending,
    order_ids: &[Uuid],
) -> Result<(), HandleError> {
    let sqlite = ldt_runtime::db::conn_is_sqlite(tx);
    for chunk in order_ids.chunks(ROWS_PER_INSERT) {
        let mut sql = format!(
            "SELECT * FROM sagas WHERE order_id IN ({}) ORDER BY order_id",
            ldt_runtime::db::placeholders(1, chunk.len())
        );
        if !sqlite {
            sql.push_str(" FOR UPDATE");
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*tx, sql)));
        for id in chunk {
            query = query.bind(id.to_string());
        }
        for row in query.fetch_all(&mut *tx).await? {
            pending.hold(saga_from_row(&row)?);
        }
    }
    Ok(())
}

/// PostgreSQL: sagas (their order ids distinct) read without a lock, each with its row
/// version for a guarded write; those that do not exist are left out.
pub async fn read_versioned_all(
    conn: &mut Conn,
    order_ids: &[Uuid],
) -> Result<HashMap<Uuid, (Stored, String)>, HandleError> {
    let sql = format!(
        "SELECT *, xmin::text AS version FROM sagas WHERE order_id IN ({})",
        ldt_runtime::db::placeholders(1, order_ids.len())
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for id in order_ids {
        query = query.bind(id.to_string());
    }
    let mut sagas = HashMap::with_capacity(order_ids.len());
    for row in query.fetch_all(&mut *conn).await? {
        let stored = saga_from_row(&row)?;
        sagas.insert(stored.saga.order_id, (stored, row.try_get("version")?));
    }
    Ok(sagas)
}

/// The earliest deadline of any saga (due or not), if one has a deadline: one round trip on
/// the deadline index.
pub async fn next_deadline(conn: &mut Conn) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT deadline_ms FROM sagas WHERE deadline_ms IS NOT NULL ORDER BY deadline_ms LIMIT 1",
    )
    .persistent(false)
    .fetch_optional(&mut *conn)
    .await
}

/// Claims up to 100 due sagas for the rest of the transaction.
pub async fn claim_due(tx: &mut Conn, now: i64) -> Result<Vec<Stored>, HandleError> {
    // Planned afresh each time (not a cached generic plan): a plan made while `sagas` was
    // empty is a sequential scan, which the poller would repeat over a growing table.
    let rows = sqlx::query(CLAIM_DUE.on(tx))
        .persistent(false)
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
    rows.iter().map(saga_from_row).collect()
}

/// How many sagas are stuck now.
pub async fn stuck_count(pool: &Pool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM sagas WHERE stuck_reason IS NOT NULL")
        .fetch_one(pool)
        .await
}

/// One line of a saga's log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SagaEvent {
    pub step: Step,
    /// The message or timer concerned.
    #[schema(example = "step_result")]
    pub kind: String,
    /// What happened (`sent`, `done`, `insufficient`, `timeout`, `late: done (ignored)`, …).
    #[schema(example = "done")]
    pub event: String,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: i64,
}

/// A saga as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SagaView {
    pub order_id: Uuid,
    /// `running`, `compensating` or `done`.
    #[schema(example = "done")]
    pub phase: String,
    /// The step the last command went to (the routing slip runs from there to the last step).
    pub step: Step,
    /// The final status, once decided.
    pub status: Option<OrderStatus>,
    /// Compensations still to apply, the one in flight first.
    pub pending_compensations: Vec<Step>,
    /// Tries of the compensation in flight that went unanswered.
    pub attempts: i64,
    /// Why the compensation in flight cannot succeed, when it cannot: the saga waits for an
    /// operator (`POST /api/v1/sagas/{order_id}/retry`).
    pub stuck_reason: Option<String>,
    /// When the saga acts next by itself (its deadline, or the next try of a compensation).
    pub deadline_at_ms: Option<i64>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Present on a single saga: every command, answer, deadline and compensation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<Vec<SagaEvent>>,
}

fn view_from_row(row: &DbRow) -> Result<SagaView, HandleError> {
    let stored = saga_from_row(row)?;
    let saga = stored.saga;
    Ok(SagaView {
        order_id: saga.order_id,
        phase: saga.phase.as_str().to_owned(),
        step: saga.step,
        status: saga.status,
        pending_compensations: saga.pending,
        attempts: i64::from(saga.attempts),
        stuck_reason: saga.stuck,
        deadline_at_ms: saga.deadline_ms,
        created_at_ms: row.try_get("created_ms")?,
        updated_at_ms: saga.updated_ms,
        log: None,
    })
}

/// An order's saga and its log, if the orchestrator has seen the order.
pub async fn saga_view(pool: &Pool, order_id: Uuid) -> Result<Option<SagaView>, HandleError> {
    let Some(row) = sqlx::query("SELECT * FROM sagas WHERE order_id = $1")
        .bind(order_id.to_string())
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    let mut view = view_from_row(&row)?;
    let log = sqlx::query(
        "SELECT step, kind, event, at_ms FROM saga_log WHERE order_id = $1 ORDER BY id",
    )
    .bind(order_id.to_string())
    .fetch_all(pool)
    .await?;
    let log = log
        .iter()
        .map(|r| {
            let step: String = r.try_get("step")?;
            let kind: String = r.try_get("kind")?;
            Ok(SagaEvent {
                step: Step::parse(&step).ok_or_else(|| corrupt("saga_log.step"))?,
                kind: LogKind::parse(&kind)
                    .map(|k| k.as_str().to_owned())
                    .unwrap_or(kind),
                event: r.try_get("event")?,
                at_ms: r.try_get("at_ms")?,
            })
        })
        .collect::<Result<_, HandleError>>()?;
    view.log = Some(log);
    Ok(Some(view))
}

/// Which sagas a page lists.
pub struct SagaFilter {
    /// Only sagas in this phase.
    pub phase: Option<Phase>,
    /// Only stuck sagas (`Some(true)`), or only those that are not (`Some(false)`).
    pub stuck: Option<bool>,
    /// Only sagas that have not changed since this time (ms since the epoch).
    pub unchanged_since_ms: Option<i64>,
    /// Only sagas after this order id (the cursor).
    pub after: Option<Uuid>,
    pub limit: i64,
}

/// A page of sagas, oldest first (order ids are time-ordered), with the cursor of the next.
pub async fn list(
    pool: &Pool,
    filter: SagaFilter,
) -> Result<(Vec<SagaView>, Option<Uuid>), HandleError> {
    let rows = sqlx::query(
        "SELECT * FROM sagas WHERE order_id > $1 \
         AND (CAST($2 AS TEXT) IS NULL OR phase = $2) \
         AND ($3 = 0 OR ($3 = 1 AND stuck_reason IS NOT NULL) OR ($3 = 2 AND stuck_reason IS NULL)) \
         AND updated_ms <= $4 \
         ORDER BY order_id LIMIT $5",
    )
    .bind(filter.after.map(|u| u.to_string()).unwrap_or_default())
    .bind(filter.phase.map(Phase::as_str))
    .bind(match filter.stuck {
        None => 0i64,
        Some(true) => 1,
        Some(false) => 2,
    })
    .bind(filter.unchanged_since_ms.unwrap_or(i64::MAX))
    .bind(filter.limit.saturating_add(1))
    .fetch_all(pool)
    .await?;
    let take = usize::try_from(filter.limit).unwrap_or(0);
    let page = &rows[..rows.len().min(take)];
    let views = page
        .iter()
        .map(view_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next = (rows.len() > page.len())
        .then(|| views.last().map(|v| v.order_id))
        .flatten();
    Ok((views, next))
}
