//! Reliable messaging on top of [`Bus`]: the transactional outbox and its relay, and the
//! consumer loop that feeds deliveries to a service's handler.
//!
//! A service never publishes from a handler. It writes the messages it emits into its own
//! `outbox` table in the same transaction as its state change ([`OutboxBatch`]), and once
//! that transaction has committed it hands the rows, with their ids, to its [`Relay`]
//! ([`OutboxSignal::committed`]). The relay publishes them straight from memory and deletes
//! them by id once the broker has confirmed them: the hot path never reads the outbox back.
//! Several batches are confirmed at once, so the relay never idles waiting for one confirm.
//!
//! The table stays the source of truth. A sweep publishes every row older than
//! [`SWEEP_AFTER`] (and, once at start, every row an earlier run left): those a crash, a failed
//! publish or a full hand-off queue left behind. A crash between commit and publish loses nothing (the row is
//! still there); a crash between publish and delete causes a duplicate, which every receiver
//! ignores because every handler is idempotent per (order, step). The sweep takes rows with
//! `FOR UPDATE SKIP LOCKED`, so several replicas share one outbox; a row the sweep takes while
//! its writer's relay is still publishing it is published twice, which is harmless.
//!
//! The consumer loop acks a delivery only after the handler committed; a message that cannot
//! be decoded or handled is parked on the dead-letter queue, never dropped.

use std::sync::Arc;
use std::time::Duration;

use crate::db::{Conn, Pool};
use futures_util::StreamExt;
use sqlx::{Connection, Row};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use tracing::Instrument;

use crate::bus::{Bus, Incoming, Outgoing};
use crate::contract::{Envelope, Message, Queues, TRACEPARENT_HEADER};
use crate::metrics::Metrics;
use crate::telemetry::{adopt, current_traceparent};

/// Header naming the queue a dead letter came from (so it can be replayed there).
pub const ORIGIN_QUEUE_HEADER: &str = "x-ldt-origin-queue";
/// Header saying why a message was parked.
pub const REASON_HEADER: &str = "x-ldt-reason";

/// Most rows published in one batch.
const RELAY_BATCH: usize = 256;

/// Batches published and not yet confirmed, at most: enough that the relay keeps publishing
/// while the broker confirms, few enough that a broker outage strands little work in memory.
const PUBLISHES_IN_FLIGHT: usize = 4;

/// How often the relay retries a batch it could not publish before leaving it to the sweep.
const PUBLISH_RETRIES: u32 = 4;

/// Committed batches waiting for the relay, at most. When it is full (the broker is slow or
/// away) further batches are left to the sweep.
const HANDOFF_QUEUE: usize = 1024;

/// Rows older than this are taken by the sweep: they were left behind, not in flight.
pub const SWEEP_AFTER: Duration = Duration::from_secs(2);

/// How often the sweep looks.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// How long published ids gather before they are deleted together: nothing waits for the
/// delete, and one statement per interval costs the database less than one per publish.
const DELETE_EVERY: Duration = Duration::from_millis(100);

/// Takes the oldest rows written before a cutoff out of a PostgreSQL outbox, in a
/// transaction that commits only once they are published (a failed publish rolls the delete
/// back); rows another replica's sweep holds are skipped. One statement instead of a select
/// and a delete. (SQLite's sweep does without the transaction: see `Relay::sweep_single_writer`.)
const TAKE_BATCH: &str = "DELETE FROM outbox WHERE id IN \
     (SELECT id FROM outbox WHERE created_ms <= $2 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
     RETURNING id, queue, message_id, payload, traceparent";

/// How often the relay counts its backlog for the `ldt_outbox_backlog` gauge.
const BACKLOG_EVERY: Duration = Duration::from_secs(1);

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

    /// The rows not written yet, for a caller writing them with a statement of its own (then
    /// [`OutboxBatch::written`]).
    pub fn unwritten(&self) -> &[OutboxRow] {
        &self.rows[self.ids.len()..]
    }

    /// Notes the ids of the rows [`OutboxBatch::unwritten`] gave, in its order.
    pub fn written(&mut self, ids: Vec<i64>) {
        debug_assert_eq!(self.ids.len() + ids.len(), self.rows.len());
        self.ids.extend(ids);
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
        let now = crate::db::now_ms();
        let fresh = &self.rows[self.ids.len()..];
        for chunk in fresh.chunks(ROWS_PER_INSERT) {
            let mut sql = crate::db::multi_row_insert(
                "INSERT INTO outbox (queue, message_id, payload, traceparent, created_ms)",
                5,
                chunk.len(),
            );
            sql.push_str(" RETURNING id");
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
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

/// Rows of the outbox with their ids, committed and waiting to be published.
struct Committed {
    ids: Vec<i64>,
    rows: Vec<OutboxRow>,
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
    batches: mpsc::Receiver<Committed>,
    /// When the signal was made: rows written later are handed over, so the sweep at start
    /// leaves them alone (taking them too would publish each twice).
    since_ms: i64,
}

/// Publishes a service's outbox.
pub struct Relay {
    pub pool: Pool,
    /// The connection of the deletes of published rows (see [`crate::db::Held`]).
    pub conns: crate::db::Held,
    pub bus: Bus,
    pub service: &'static str,
    pub crash: crate::crash::Crash,
    /// Publish every Nth message twice (0: never): chaos testing of the receivers.
    pub duplicate_every: u64,
    /// Most messages for one queue carried by one bus message (1: no bundles).
    pub bundle_max: usize,
    pub published: std::sync::atomic::AtomicU64,
    pub metrics: Metrics,
}

impl Relay {
    /// Publishes what `committed` hands over, and sweeps, until shutdown; then publishes
    /// what is left.
    pub async fn run(self, committed: OutboxReceiver, shutdown: CancellationToken) {
        let (deleted_tx, deleted_rx) = mpsc::unbounded_channel();
        tokio::join!(
            self.forward(committed.batches, deleted_tx, shutdown.clone()),
            self.delete_published(deleted_rx),
            self.sweep_until(committed.since_ms, shutdown.clone()),
        );
        // Whatever is still in the table now: committed after the hand-off stopped, or left
        // behind by a failed publish.
        if let Err(e) = self.sweep(i64::MAX).await {
            tracing::warn!(service = self.service, error = %e, "final outbox sweep failed; the rows stay for the next start");
        }
    }

    /// The hot path: publishes committed batches as they come, several awaiting their
    /// confirms at once, and passes the ids of confirmed rows on for deletion.
    async fn forward(
        &self,
        mut committed: mpsc::Receiver<Committed>,
        deleted: mpsc::UnboundedSender<Vec<i64>>,
        shutdown: CancellationToken,
    ) {
        // One allocation per batch: the relay's publishes, several awaiting confirms at once.
        let mut confirming: futures_util::stream::FuturesUnordered<
            futures_util::future::BoxFuture<'_, (Committed, u32, anyhow::Result<()>)>,
        > = futures_util::stream::FuturesUnordered::new();
        let mut stopping = false;
        loop {
            tokio::select! {
                biased;
                Some((batch, attempt, done)) = confirming.next(), if !confirming.is_empty() => {
                    match done {
                        Ok(()) => {
                            let _ = deleted.send(batch.ids);
                        }
                        // The broker is back within a second or two after a restart: retry
                        // now rather than leave the rows to the sweep's 2 s.
                        Err(e) if attempt < PUBLISH_RETRIES && !stopping => {
                            tracing::warn!(service = self.service, error = %e, attempt, "outbox publish failed; retrying");
                            confirming.push(Box::pin(self.publish_attempt(batch, attempt + 1)));
                        }
                        // The rows stay in the table: the sweep publishes them.
                        Err(e) => tracing::warn!(service = self.service, error = %e, "outbox publish failed; the sweep will retry"),
                    }
                }
                next = committed.recv(), if !stopping && confirming.len() < PUBLISHES_IN_FLIGHT => {
                    let Some(first) = next else {
                        stopping = true;
                        continue;
                    };
                    // Everything else already waiting goes into the same publish.
                    let mut batch = first;
                    while batch.rows.len() < RELAY_BATCH {
                        match committed.try_recv() {
                            Ok(more) => {
                                batch.ids.extend(more.ids);
                                batch.rows.extend(more.rows);
                            }
                            Err(_) => break,
                        }
                    }
                    confirming.push(Box::pin(self.publish_attempt(batch, 0)));
                }
                _ = shutdown.cancelled(), if !stopping => {
                    // Publish what was handed over already; later commits wait for the sweep.
                    stopping = true;
                    committed.close();
                }
                else => break,
            }
            if stopping && confirming.is_empty() {
                break;
            }
        }
    }

    /// Publishes a committed batch, after a backoff if it is a retry; hands the batch back
    /// with the outcome.
    async fn publish_attempt(
        &self,
        batch: Committed,
        attempt: u32,
    ) -> (Committed, u32, anyhow::Result<()>) {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100u64 << attempt.min(4))).await;
        }
        let done = self.publish_rows(&batch.rows).await;
        (batch, attempt, done)
    }

    /// Deletes published rows, those confirmed within [`DELETE_EVERY`] in one statement.
    async fn delete_published(&self, mut deleted: mpsc::UnboundedReceiver<Vec<i64>>) {
        while let Some(mut ids) = deleted.recv().await {
            let until = tokio::time::Instant::now() + DELETE_EVERY;
            loop {
                tokio::select! {
                    more = deleted.recv() => match more {
                        Some(more) => ids.extend(more),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            if let Err(e) = self.delete_ids(&ids).await {
                tracing::warn!(service = self.service, error = %e, "cannot delete published outbox rows; the sweep will publish them again");
            }
        }
    }

    /// Deletes outbox rows by id.
    async fn delete_ids(&self, ids: &[i64]) -> Result<(), sqlx::Error> {
        let postgres = !crate::db::is_sqlite(&self.pool);
        for chunk in ids.chunks(1024) {
            // Ids are integers from the database: formatting them into the statement is safe,
            // and one statement of any length is one round trip. Losing this delete in a
            // crash only re-publishes rows the receivers ignore: it need not wait for its WAL
            // flush.
            let list = chunk
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let sql = format!("DELETE FROM outbox WHERE id IN ({list})");
            let mut conn = self.conns.get().await?;
            if postgres {
                // A transaction sqlx knows of: if the delete fails, it is rolled back before
                // the connection is used again.
                let mut tx = conn
                    .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
                    .await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            } else {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut *conn)
                    .await?;
            }
            conn.reuse();
        }
        Ok(())
    }

    /// After a batch failed to publish: publishes its rows one by one while the bus takes
    /// them, and deletes those. A bounded queue with room for fewer rows than the batch
    /// refuses the batch's tail every time; without this, the sweep would publish the same
    /// head again and again and never get past it.
    async fn publish_what_fits(&self, rows: &[(i64, OutboxRow)]) {
        let mut published = Vec::new();
        for (id, row) in rows {
            if self.publish_rows(std::slice::from_ref(row)).await.is_err() {
                break;
            }
            published.push(*id);
        }
        if let Err(e) = self.delete_ids(&published).await {
            tracing::warn!(service = self.service, error = %e, "cannot delete published outbox rows; the sweep will publish them again");
        }
    }

    /// Publishes the rows nobody is publishing: once at start those written before `since_ms`
    /// (left by an earlier run), then every [`SWEEP_EVERY`] those older than [`SWEEP_AFTER`].
    async fn sweep_until(&self, since_ms: i64, shutdown: CancellationToken) {
        let mut failures: u32 = 0;
        // Strictly before: a row of this run may carry the very millisecond the signal was
        // made (and an earlier run's row of that millisecond waits for the next sweep).
        let mut cutoff = since_ms.saturating_sub(1);
        let mut counted = std::time::Instant::now();
        loop {
            match self.sweep(cutoff).await {
                Ok(()) => {
                    failures = 0;
                    cutoff = crate::db::now_ms() - SWEEP_AFTER.as_millis() as i64;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    tracing::warn!(service = self.service, error = %e, "outbox sweep failed; retrying");
                }
            }
            // Counting is a query of its own: not at every sweep.
            if counted.elapsed() >= BACKLOG_EVERY {
                counted = std::time::Instant::now();
                self.report_backlog().await;
            }
            let wait = if failures == 0 {
                SWEEP_EVERY
            } else {
                Duration::from_millis(100u64 << failures.min(4))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            if failures == 0 {
                cutoff = crate::db::now_ms() - SWEEP_AFTER.as_millis() as i64;
            }
        }
    }

    async fn report_backlog(&self) {
        if let Ok(n) = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await
        {
            self.metrics.set(
                "ldt_outbox_backlog",
                "Outbox rows not yet published.",
                &[("service", self.service)],
                n,
            );
        }
    }

    /// Publishes rows written at or before `cutoff` (ms) until none is left (of those not
    /// locked by another replica).
    async fn sweep(&self, cutoff: i64) -> anyhow::Result<()> {
        if crate::db::is_sqlite(&self.pool) {
            return self.sweep_single_writer(cutoff).await;
        }
        loop {
            // As in `delete_published`, the delete need not wait for its WAL flush. (Sent
            // with `BEGIN`: one round trip for both.)
            let mut tx = self
                .pool
                .begin_with("BEGIN; SET LOCAL synchronous_commit = off")
                .await?;
            // Planned afresh each time: the outbox swings between empty and full, and a plan
            // cached while it was empty scans it all.
            let mut found = sqlx::query(TAKE_BATCH)
                .persistent(false)
                .bind(RELAY_BATCH as i64)
                .bind(cutoff)
                .fetch_all(&mut *tx)
                .await?;
            if found.is_empty() {
                tx.commit().await?;
                return Ok(());
            }
            // RETURNING has no order: publish in the order the rows were written.
            found.sort_by_cached_key(|row| row.try_get::<i64, _>("id").unwrap_or(i64::MAX));
            let rows = outbox_rows(&found)?;
            if let Err(e) = self.publish_rows(&only_rows(&rows)).await {
                // The rows come back; those that fit are published and deleted on their own.
                tx.rollback().await?;
                self.publish_what_fits(&rows).await;
                return Err(e);
            }
            tx.commit().await?;
            if rows.len() < RELAY_BATCH {
                return Ok(());
            }
        }
    }

    /// The sweep of a SQLite outbox, which has one writer (this process): no transaction is
    /// held open while the bus confirms, so the service's handlers keep the connection
    /// meanwhile; exactly the rows read are deleted once published.
    async fn sweep_single_writer(&self, cutoff: i64) -> anyhow::Result<()> {
        loop {
            let found = sqlx::query(
                "SELECT id, queue, message_id, payload, traceparent FROM outbox \
                 WHERE created_ms <= $2 ORDER BY id LIMIT $1",
            )
            .bind(RELAY_BATCH as i64)
            .bind(cutoff)
            .fetch_all(&self.pool)
            .await?;
            if found.is_empty() {
                return Ok(());
            }
            let rows = outbox_rows(&found)?;
            if let Err(e) = self.publish_rows(&only_rows(&rows)).await {
                self.publish_what_fits(&rows).await;
                return Err(e);
            }
            let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
            self.delete_ids(&ids).await?;
            if rows.len() < RELAY_BATCH {
                return Ok(());
            }
        }
    }

    /// Publishes outbox rows (in the order given) and waits for the bus to confirm them.
    async fn publish_rows(&self, rows: &[OutboxRow]) -> anyhow::Result<()> {
        let mut batch = Vec::with_capacity(rows.len());
        // One producer span per message, in the message's own trace; they end when the
        // batch is confirmed.
        let mut spans = Vec::with_capacity(rows.len());
        for row in rows {
            let queue = &row.queue;
            let span = tracing::info_span!(
                "publish",
                otel.name = %format!("publish {queue}"),
                otel.kind = "producer",
                messaging.system = self.bus.system(),
                messaging.operation.type = "publish",
                messaging.operation.name = "publish",
                messaging.destination.name = %queue,
                messaging.message.id = %row.message_id,
                ldt.service = self.service,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty,
            );
            let mut headers = Vec::new();
            if row.traceparent.is_some() {
                adopt(&span, row.traceparent.as_deref());
                if let Some(tp) = span.in_scope(current_traceparent) {
                    headers.push((TRACEPARENT_HEADER.to_owned(), tp));
                }
            }
            spans.push(span);
            let out = Outgoing {
                queue: row.queue.clone(),
                message_id: row.message_id.clone(),
                payload: row.payload.clone(),
                headers,
            };
            if self.duplicate_every > 0 {
                let n = self
                    .published
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n % self.duplicate_every == self.duplicate_every - 1 {
                    tracing::info!(service = self.service, message_id = %out.message_id, "chaos: published a duplicate");
                    batch.push(out.clone());
                }
            }
            batch.push(out);
        }
        let messages = batch.len();
        let batch = bundled(batch, self.bundle_max);
        self.bus.publish(&batch).await?;
        drop(spans);
        let labels = [("service", self.service)];
        self.metrics.inc(
            "ldt_messages_published_total",
            "Messages published by the outbox relay (each part of a bundle counts).",
            &labels,
            messages as u64,
        );
        self.metrics.inc(
            "ldt_bus_messages_published_total",
            "Broker messages the outbox relay published (a bundle counts once).",
            &labels,
            batch.len() as u64,
        );
        self.crash.at(crate::crash::Point::AfterPublish);
        Ok(())
    }
}

/// `messages` with those for one queue gathered into bundles of at most `max`
/// ([`Outgoing::bundle`]): the broker's work is per message, and at a thousand orders a
/// second it was a quarter of the machine. A queue's messages keep their order; one alone
/// goes as it is.
fn bundled(messages: Vec<Outgoing>, max: usize) -> Vec<Outgoing> {
    if max < 2 || messages.len() < 2 {
        return messages;
    }
    // A service publishes to a handful of queues: a list beats a map.
    let mut by_queue: Vec<Vec<Outgoing>> = Vec::new();
    for m in messages {
        match by_queue.iter_mut().find(|q| q[0].queue == m.queue) {
            Some(q) => q.push(m),
            None => by_queue.push(vec![m]),
        }
    }
    let mut out = Vec::new();
    for queue in by_queue {
        let mut queue = queue.into_iter().peekable();
        while queue.peek().is_some() {
            let chunk: Vec<Outgoing> = queue.by_ref().take(max).collect();
            match chunk.as_slice() {
                [_] => out.extend(chunk),
                [first, ..] => match Outgoing::bundle(&first.queue, &chunk) {
                    Some(bundle) => out.push(bundle),
                    None => out.extend(chunk),
                },
                [] => {}
            }
        }
    }
    out
}

/// The outbox rows of a query's result, with their ids.
fn outbox_rows(found: &[crate::db::DbRow]) -> anyhow::Result<Vec<(i64, OutboxRow)>> {
    found
        .iter()
        .map(|row| {
            Ok((
                row.try_get("id")?,
                OutboxRow {
                    queue: row.try_get("queue")?,
                    message_id: row.try_get("message_id")?,
                    payload: row.try_get("payload")?,
                    traceparent: row.try_get("traceparent")?,
                },
            ))
        })
        .collect()
}

fn only_rows(rows: &[(i64, OutboxRow)]) -> Vec<OutboxRow> {
    rows.iter().map(|(_, row)| row.clone()).collect()
}

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

/// Decodes a delivery's envelope; undecodable messages are poison.
pub fn decode(msg: &Incoming) -> Result<Envelope, HandleError> {
    Envelope::from_json(&msg.payload).map_err(HandleError::Poison)
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
    pub metrics: Metrics,
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
        loop {
            let next = tokio::select! {
                next = sub.next() => next,
                _ = shutdown.cancelled() => break,
            };
            match next {
                Some(Ok(msg)) => {
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
                    while batch.len() < MAX_BATCH.min(usize::from(prefetch)) {
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
    let handler = handler.clone();
    let consumer = consumer.clone();
    tracker.spawn(async move {
        process(&*handler, &consumer, batch).await;
        drop(permit);
    });
}

/// The saga step a message concerns, for span attributes.
fn step_of(body: &Message) -> Option<&'static str> {
    match body {
        Message::Debit { .. } | Message::Refund => Some("payment"),
        Message::Reserve { .. } | Message::Release => Some("inventory"),
        Message::Deliver { .. } | Message::CancelDelivery => Some("delivery"),
        Message::StepResult { step, .. } | Message::Compensated { step } => Some(step.as_str()),
        Message::OrderPlaced { .. } | Message::OrderFinished { .. } => None,
    }
}

async fn process<H: Handler>(handler: &H, consumer: &Consumer, batch: Vec<Incoming>) {
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
            async move { settle(consumer, delivery.msg, &delivery.span, outcome).await }
                .instrument(span)
        },
    ))
    .await;
}

/// The consumer span of one delivery (messaging semantic conventions), continuing the
/// producer's trace from the message's `traceparent` header.
fn consumer_span(consumer: &Consumer, msg: &Incoming) -> tracing::Span {
    let queue = consumer.queue.as_str();
    let envelope = Envelope::from_json(&msg.payload).ok();
    let body = envelope.as_ref().map(|e| &e.body);
    let compensation = matches!(
        body,
        Some(
            Message::Refund
                | Message::Release
                | Message::CancelDelivery
                | Message::Compensated { .. }
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
        ldt.order_id = %envelope.as_ref().map(|e| e.order_id.to_string()).unwrap_or_default(),
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

/// Acks, parks or requeues one delivery according to how its handling ended.
async fn settle(
    consumer: &Consumer,
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
    let label = match &outcome {
        Ok(()) => "ok",
        Err(HandleError::Poison(_)) => "dead_lettered",
        Err(HandleError::Transient(_)) => "retried",
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
    let acked = match outcome {
        Ok(()) => msg.ack().await,
        Err(HandleError::Poison(reason)) => {
            tracing::warn!(%queue, %reason, "parking poison message as a dead letter");
            match park(bus, queue, dlq, &msg, &reason).await {
                Ok(()) => msg.ack().await,
                Err(e) => {
                    tracing::error!(%queue, error = %e, "cannot park dead letter; requeueing");
                    msg.nack_requeue(Duration::from_millis(500)).await
                }
            }
        }
        Err(HandleError::Transient(e)) => {
            tracing::warn!(%queue, error = %e, "handler failed; message requeued");
            msg.nack_requeue(Duration::from_millis(200)).await
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
    use super::*;

    fn to(queue: &str, i: usize) -> Outgoing {
        Outgoing {
            queue: queue.into(),
            message_id: format!("m{i}"),
            payload: vec![u8::try_from(i).unwrap_or(0)],
            headers: Vec::new(),
        }
    }

    /// What each bus message carries: its queue and its parts' ids.
    fn carried(messages: &[Outgoing]) -> Vec<(String, Vec<String>)> {
        messages
            .iter()
            .map(|m| {
                let ids = match crate::bus::unbundle(&m.payload) {
                    Some((first, rest)) => std::iter::once(first)
                        .chain(rest)
                        .map(|(id, _, _)| id)
                        .collect(),
                    None => vec![m.message_id.clone()],
                };
                (m.queue.clone(), ids)
            })
            .collect()
    }

    #[test]
    fn messages_for_one_queue_go_in_bundles_of_at_most_max_in_their_order() {
        let messages = vec![
            to("a", 0),
            to("b", 1),
            to("a", 2),
            to("a", 3),
            to("c", 4),
            to("a", 5),
        ];
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            carried(&bundled(messages.clone(), 3)),
            vec![
                ("a".into(), ids(&["m0", "m2", "m3"])),
                ("a".into(), ids(&["m5"])),
                ("b".into(), ids(&["m1"])),
                ("c".into(), ids(&["m4"])),
            ]
        );
        // A lone message, and a max of 1, leave everything as it was.
        assert_eq!(bundled(messages.clone(), 1).len(), 6);
        assert_eq!(bundled(vec![to("a", 0)], 64)[0].message_id, "m0");
    }
}
