//! The transactional outbox: a service never publishes from a handler. It writes the
//! messages it emits into its own `outbox` table in the same transaction as its state change
//! ([`OutboxBatch`]), and once that transaction has committed it hands the rows, with their
//! ids, to its relay ([`OutboxSignal::committed`]; see [`crate::relay`]).
//!
//! This module is the only one that knows the table's columns: every write to an outbox —
//! a batch's rows, or a row inside a service's own one-statement write — is made by
//! [`insert_values`] or [`insert_from`].

use sqlx::Row;
use tokio::sync::mpsc;

use crate::db::Conn;
use crate::telemetry::current_traceparent;
use ldt_contract::{Envelope, Queues};

/// Rows older than this are taken by the relay's sweep: they were left behind, not in
/// flight (or held back: [`held_created_ms`]).
pub const SWEEP_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Committed batches waiting for the relay, at most. When it is full (the broker is slow or
/// away) further batches are left to the sweep.
const HANDOFF_QUEUE: usize = 1024;

/// Outbox rows gathered while a transaction handles a batch of messages, written with one
/// statement per [`ROWS_PER_INSERT`] rows just before it commits (fewer round trips than a
/// statement per message), and kept with their ids for the relay.
#[derive(Default)]
pub struct OutboxBatch {
    rows: Vec<OutboxRow>,
    /// The ids of `rows[..ids.len()]`, the rows written so far.
    ids: Vec<i64>,
}

/// The outbox columns of one message (`created_ms` aside).
#[derive(Clone)]
pub struct OutboxRow {
    pub queue: String,
    pub message_id: String,
    pub payload: Vec<u8>,
    pub traceparent: Option<String>,
}

/// A statement being built, on either backend.
pub type Query<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

impl OutboxRow {
    /// Binds the row's `queue, message_id, payload, traceparent`, in that order.
    pub fn bind_columns<'q>(&'q self, query: Query<'q>) -> Query<'q> {
        query
            .bind(&self.queue)
            .bind(&self.message_id)
            .bind(&self.payload)
            .bind(&self.traceparent)
    }

    /// An envelope's row, with the trace context of the current span (the message's).
    pub fn of(queues: &Queues, env: &Envelope) -> OutboxRow {
        OutboxRow {
            queue: queues.of(env.body.destination()),
            message_id: env.id.to_string(),
            payload: env.to_json(),
            traceparent: current_traceparent(),
        }
    }
}

/// Rows per multi-row statement (one shape per row count, all kept prepared: see `db::open`).
pub const ROWS_PER_INSERT: usize = 64;

impl OutboxBatch {
    /// Adds an envelope, with the trace context of the current span (the message's).
    pub fn push(&mut self, queues: &Queues, env: &Envelope) {
        self.rows.push(OutboxRow::of(queues, env));
    }

    /// The rows not written yet, for a caller writing them with a statement of its own (and
    /// then making a batch of those written, with [`OutboxBatch::push_written`]).
    pub fn unwritten(&self) -> &[OutboxRow] {
        &self.rows[self.ids.len()..]
    }

    /// The one row of a batch of one not written yet.
    pub fn into_single(mut self) -> Option<OutboxRow> {
        if self.rows.len() == 1 && self.ids.is_empty() {
            self.rows.pop()
        } else {
            None
        }
    }

    /// Adds a row made earlier (with the trace context of its own span).
    pub fn push_row(&mut self, row: OutboxRow) {
        self.rows.push(row);
    }

    /// Adds a row already written (by a statement of the caller's own), with its id.
    pub fn push_written(&mut self, id: i64, row: OutboxRow) {
        debug_assert_eq!(self.ids.len(), self.rows.len());
        self.rows.push(row);
        self.ids.push(id);
    }

    /// Writes the rows not written yet (in the order they were pushed), noting their ids.
    pub async fn write(&mut self, conn: &mut Conn) -> Result<(), sqlx::Error> {
        self.write_created(conn, crate::db::now_ms()).await
    }

    /// [`OutboxBatch::write`], the rows' `created_ms` given: for rows held back from the
    /// relay ([`held_created_ms`]).
    pub async fn write_created(&mut self, conn: &mut Conn, now: i64) -> Result<(), sqlx::Error> {
        let fresh = &self.rows[self.ids.len()..];
        for chunk in fresh.chunks(ROWS_PER_INSERT) {
            let (mut sql, _) = insert_values(1, chunk.len());
            sql.push_str(" RETURNING id");
            let mut query = sqlx::query(sqlx::AssertSqlSafe(crate::db::for_conn(&*conn, sql)));
            for row in chunk {
                query = row.bind_columns(query).bind(now);
            }
            let mut ids = Vec::with_capacity(chunk.len());
            for row in query.fetch_all(&mut *conn).await? {
                ids.push(row.try_get::<i64, _>(0)?);
            }
            self.ids.extend(ids);
        }
        Ok(())
    }
}

/// The `created_ms` of a row written at `now` and held back from the relay for `hold`: not
/// handed over when its transaction commits, so it stays in the table until the relay's
/// sweep takes it, unless the service deletes it first (the order service's `OrderPlaced`,
/// when the order is final before the hold is over). The sweep takes rows
/// [`SWEEP_AFTER`] old, so a held row is written as that much older, less its
/// hold (which that bounds); the sweep looks twice a second, so the row leaves up to half a
/// second after its hold.
pub fn held_created_ms(now: i64, hold: std::time::Duration) -> i64 {
    let hold = hold.min(SWEEP_AFTER);
    let early = SWEEP_AFTER.saturating_sub(hold);
    now.saturating_sub(i64::try_from(early.as_millis()).unwrap_or(i64::MAX))
}

/// The outbox's columns, in the order every insert gives them: what
/// [`OutboxRow::bind_columns`] binds, then `created_ms`.
pub const COLUMNS: &str = "queue, message_id, payload, traceparent, created_ms";

/// `INSERT INTO outbox (…) VALUES (…), …`: `rows` rows of placeholders from `$first` on, five
/// a row in the order of [`COLUMNS`]; returns the statement and the next placeholder's number.
pub fn insert_values(first: usize, rows: usize) -> (String, usize) {
    let mut sql = format!("INSERT INTO outbox ({COLUMNS}) ");
    let next = crate::db::push_values(&mut sql, first, 5, rows);
    (sql, next)
}

/// `INSERT INTO outbox (…) <source>`: the rows `source` (a `SELECT` or `VALUES` giving the
/// five columns in the order of [`COLUMNS`]) produces, for a service's own statements that
/// write their outbox rows together with their state change.
pub fn insert_from(source: &str) -> String {
    format!("INSERT INTO outbox ({COLUMNS}) {source}")
}

/// Rows of the outbox with their ids, committed and waiting to be published.
pub(crate) struct Committed {
    pub(crate) ids: Vec<i64>,
    pub(crate) rows: Vec<OutboxRow>,
}

/// Hands committed outbox rows to a service's relay.
#[derive(Clone)]
pub struct OutboxSignal(mpsc::Sender<Committed>);

impl OutboxSignal {
    /// A signal and the receiving end its relay takes.
    pub fn new() -> (OutboxSignal, OutboxReceiver) {
        let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
        let receiver = OutboxReceiver {
            batches: rx,
            since_ms: crate::db::now_ms(),
        };
        (OutboxSignal(tx), receiver)
    }

    /// Call once the transaction that wrote `outbox` has committed: its rows go to the relay
    /// to be published now. Rows the relay cannot take (its queue is full, it has stopped)
    /// stay in the table for the sweep.
    pub fn committed(&self, mut outbox: OutboxBatch) {
        outbox.rows.truncate(outbox.ids.len());
        if outbox.rows.is_empty() {
            return;
        }
        let batch = Committed {
            ids: outbox.ids,
            rows: outbox.rows,
        };
        if self.0.try_send(batch).is_err() {
            tracing::debug!("outbox relay busy: rows left to its sweep");
        }
    }
}

/// The relay's end of an [`OutboxSignal`].
pub struct OutboxReceiver {
    pub(crate) batches: mpsc::Receiver<Committed>,
    /// When the signal was made: rows written later are handed over, so the sweep at start
    /// leaves them alone (taking them too would publish each twice).
    pub(crate) since_ms: i64,
}
