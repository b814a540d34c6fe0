//! The outbox relay: publishes a service's committed outbox rows straight from memory and
//! deletes them by id once the broker has confirmed them; the hot path never reads the outbox
//! back. Several batches are confirmed at once, so the relay never idles waiting for one
//! confirm.
//!
//! The table stays the source of truth. A sweep publishes every row older than
//! [`SWEEP_AFTER`] (and, once at start, every row an earlier run left): those a crash, a
//! failed publish or a full hand-off queue left behind. A crash between commit and publish
//! loses nothing (the row is still there); a crash between publish and delete causes a
//! duplicate, which every receiver ignores because every handler is idempotent per (order,
//! step). The sweep takes rows with `FOR UPDATE SKIP LOCKED`, so several replicas share one
//! outbox; a row the sweep takes while its writer's relay is still publishing it is published
//! twice, which is harmless.

use std::time::Duration;

use futures_util::StreamExt;
use sqlx::{Connection, Row};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, Outgoing};
use crate::db::Pool;
use crate::metrics::Metrics;
use crate::outbox::{Committed, OutboxReceiver, OutboxRow, SWEEP_AFTER};
use crate::telemetry::{adopt, current_traceparent};
use ldt_contract::TRACEPARENT_HEADER;

/// Most rows published in one batch.
const RELAY_BATCH: usize = 256;

/// Batches published and not yet confirmed, at most: enough that the relay keeps publishing
/// while the broker confirms, few enough that a broker outage strands little work in memory.
const PUBLISHES_IN_FLIGHT: usize = 4;

/// How often the relay retries a batch it could not publish before leaving it to the sweep.
const PUBLISH_RETRIES: u32 = 4;

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
                let ids = match crate::bus::message::unbundle(&m.payload) {
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
