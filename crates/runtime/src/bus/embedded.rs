//! The in-process message bus of the embedded mode (`ldt up` without a broker).
//!
//! It keeps the contract the services rely on with RabbitMQ:
//! - **at-least-once**: a publish returns once its messages are in the journal (a SQLite
//!   file, the embedded counterpart of a durable queue and a publisher confirm); a message
//!   leaves the journal only when it is acked, so a crash redelivers instead of losing it;
//! - **explicit ack / nack with requeue**; a subscription that ends gives back what it held;
//! - **per-queue FIFO**, a requeued message going back to the head of its queue;
//! - **prefetch**: a subscription holds at most that many unacknowledged messages;
//! - **bounded memory with back-pressure**: a queue holds at most `capacity` ready messages;
//!   a publish that would overflow it is refused (like RabbitMQ's `reject-publish`), the
//!   publisher's outbox keeps the messages and its relay retries with backoff.
//!
//! Dead letters are not a feature of the bus: the consumer loop parks poison messages on
//! the dead-letter queue, the same way over both transports.
//!
//! With `--ephemeral` there is no journal: everything lives and dies with the process.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use tokio::sync::{Notify, mpsc, oneshot};

use super::message::{Acknowledge, BusError, Incoming, Outgoing, Settling};

/// How many ready messages a queue holds by default before publishes are refused.
pub const DEFAULT_CAPACITY: usize = 20_000;

/// A message as the bus keeps it.
#[derive(Clone)]
struct Stored {
    seq: u64,
    message_id: String,
    payload: Arc<[u8]>,
    headers: Arc<[(String, String)]>,
    redelivered: bool,
}

#[derive(Default)]
struct Queue {
    ready: VecDeque<Stored>,
    /// Wakes the queue's subscribers: a message arrived, or a delivery was settled.
    wake: Arc<Notify>,
}

struct Shared {
    queues: Mutex<HashMap<String, Queue>>,
    capacity: usize,
    next_seq: AtomicU64,
    journal: Option<Journal>,
}

impl Shared {
    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, Queue>> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // loses messages (every update is a single push or pop): keep going.
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The in-process bus; cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBus {
    shared: Arc<Shared>,
}

impl EmbeddedBus {
    /// Opens the bus, journaled in `journal` (a file, created if missing; its unacked messages
    /// are delivered again) or in memory only when `None`.
    pub async fn open(
        journal: Option<&Path>,
        queues: Vec<String>,
        capacity: usize,
    ) -> Result<EmbeddedBus, BusError> {
        let mut map: HashMap<String, Queue> =
            queues.into_iter().map(|q| (q, Queue::default())).collect();
        let mut next_seq = 1;
        let journal = match journal {
            Some(path) => {
                let (journal, recovered) = Journal::open(path).await?;
                for m in recovered {
                    next_seq = next_seq.max(m.1.seq + 1);
                    map.entry(m.0).or_default().ready.push_back(m.1);
                }
                Some(journal)
            }
            None => None,
        };
        Ok(EmbeddedBus {
            shared: Arc::new(Shared {
                queues: Mutex::new(map),
                capacity: capacity.max(1),
                next_seq: AtomicU64::new(next_seq),
                journal,
            }),
        })
    }

    /// Publishes the batch: all of it or, when a queue is full or the journal fails, none.
    pub async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        if batch.is_empty() {
            return Ok(());
        }
        {
            let queues = self.shared.queues();
            let mut incoming: HashMap<&str, usize> = HashMap::new();
            for m in batch {
                *incoming.entry(m.queue.as_str()).or_default() += 1;
            }
            for (queue, n) in incoming {
                let ready = queues.get(queue).map_or(0, |q| q.ready.len());
                if ready.saturating_add(n) > self.shared.capacity {
                    return Err(BusError::Full(queue.to_owned()));
                }
            }
        }
        let stored: Vec<(String, Stored)> = batch
            .iter()
            .map(|m| {
                (
                    m.queue.clone(),
                    Stored {
                        seq: self.shared.next_seq.fetch_add(1, Ordering::Relaxed),
                        message_id: m.message_id.clone(),
                        payload: Arc::from(m.payload.as_slice()),
                        headers: Arc::from(m.headers.as_slice()),
                        redelivered: false,
                    },
                )
            })
            .collect();
        if let Some(journal) = &self.shared.journal {
            journal.append(&stored).await?;
        }
        let mut queues = self.shared.queues();
        let mut woken: Vec<Arc<Notify>> = Vec::new();
        for (queue, m) in stored {
            let q = queues.entry(queue).or_default();
            q.ready.push_back(m);
            if !woken.iter().any(|w| Arc::ptr_eq(w, &q.wake)) {
                woken.push(q.wake.clone());
            }
        }
        drop(queues);
        for w in woken {
            w.notify_waiters();
        }
        Ok(())
    }

    pub fn subscribe(&self, queue: &str, prefetch: u16) -> EmbeddedSubscription {
        let wake = self
            .shared
            .queues()
            .entry(queue.to_owned())
            .or_default()
            .wake
            .clone();
        EmbeddedSubscription {
            consumer: Arc::new(ConsumerState {
                shared: self.shared.clone(),
                queue: queue.to_owned(),
                wake,
                prefetch: usize::from(prefetch.max(1)),
                held: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn queue_depth(&self, queue: &str) -> u32 {
        let n = self.shared.queues().get(queue).map_or(0, |q| q.ready.len());
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Drops the queues and everything in them.
    pub async fn delete_queues(&self, queues: &[String]) -> Result<(), BusError> {
        let mut seqs = Vec::new();
        {
            let mut map = self.shared.queues();
            for q in queues {
                if let Some(queue) = map.remove(q) {
                    seqs.extend(queue.ready.iter().map(|m| m.seq));
                    queue.wake.notify_waiters();
                }
            }
        }
        if let Some(journal) = &self.shared.journal {
            journal.forget(seqs);
        }
        Ok(())
    }

    /// Whether the journal still accepts writes.
    pub fn healthy(&self) -> bool {
        self.shared.journal.as_ref().is_none_or(Journal::alive)
    }

    /// Waits until every ack taken so far is in the journal. Acks are written in the
    /// background; at shutdown, without this, the last of them were lost with the process and
    /// their messages delivered again at the next start (harmless duplicates, but each one
    /// handled and logged again).
    pub async fn flush(&self) {
        if let Some(journal) = &self.shared.journal {
            journal.flush().await;
        }
    }
}

/// What a subscription holds: the deliveries not yet settled.
struct ConsumerState {
    shared: Arc<Shared>,
    queue: String,
    wake: Arc<Notify>,
    prefetch: usize,
    held: Mutex<HashMap<u64, Stored>>,
}

impl ConsumerState {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stored>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts messages back at the head of the queue, in their original order.
    fn requeue(&self, mut messages: Vec<Stored>) {
        messages.sort_by_key(|m| m.seq);
        let mut queues = self.shared.queues();
        let q = queues.entry(self.queue.clone()).or_default();
        for mut m in messages.into_iter().rev() {
            m.redelivered = true;
            q.ready.push_front(m);
        }
        drop(queues);
        self.wake.notify_waiters();
    }
}

/// A stream of deliveries from one queue of the embedded bus.
pub struct EmbeddedSubscription {
    consumer: Arc<ConsumerState>,
}

impl EmbeddedSubscription {
    pub async fn next(&mut self) -> Option<Result<Incoming, BusError>> {
        loop {
            let woken = self.consumer.wake.notified();
            tokio::pin!(woken);
            // Register before looking, so a publish between the look and the wait wakes us.
            woken.as_mut().enable();
            {
                let mut held = self.consumer.held();
                if held.len() < self.consumer.prefetch {
                    let mut queues = self.consumer.shared.queues();
                    let Some(q) = queues.get_mut(&self.consumer.queue) else {
                        // The queue was deleted: the subscription ends, as with a broker.
                        return None;
                    };
                    if let Some(m) = q.ready.pop_front() {
                        drop(queues);
                        held.insert(m.seq, m.clone());
                        return Some(Ok(Incoming::new(
                            m.payload.to_vec(),
                            Some(m.message_id.clone()),
                            m.headers.iter().cloned().collect(),
                            m.redelivered,
                            Box::new(EmbeddedAcker {
                                consumer: self.consumer.clone(),
                                seq: m.seq,
                            }),
                        )));
                    }
                }
            }
            woken.await;
        }
    }

    /// Ends the subscription; what it still holds goes back to the queue (in `Drop`).
    pub fn close(self) {}
}

impl Drop for EmbeddedSubscription {
    fn drop(&mut self) {
        let held: Vec<Stored> = self.consumer.held().drain().map(|(_, m)| m).collect();
        if !held.is_empty() {
            self.consumer.requeue(held);
        }
    }
}

/// Settles one delivery of the embedded bus.
pub struct EmbeddedAcker {
    consumer: Arc<ConsumerState>,
    seq: u64,
}

impl EmbeddedAcker {
    fn take(&self) -> Result<Stored, BusError> {
        self.consumer.held().remove(&self.seq).ok_or_else(|| {
            // Its subscription ended and gave it back: it will be delivered again.
            BusError::Unavailable("the subscription of this delivery has ended".into())
        })
    }

    fn ack_now(&self) -> Result<(), BusError> {
        let m = self.take()?;
        if let Some(journal) = &self.consumer.shared.journal {
            journal.forget(vec![m.seq]);
        }
        self.consumer.wake.notify_waiters();
        Ok(())
    }

    fn nack_now(&self) -> Result<(), BusError> {
        let m = self.take()?;
        self.consumer.requeue(vec![m]);
        Ok(())
    }
}

impl Acknowledge for EmbeddedAcker {
    fn ack(&self) -> Settling<'_> {
        Box::pin(std::future::ready(self.ack_now()))
    }

    fn nack_requeue(&self) -> Settling<'_> {
        Box::pin(std::future::ready(self.nack_now()))
    }
}

/// The bus's durable copy of every unacknowledged message: a SQLite table written by one
/// task that groups concurrent appends into one transaction (group commit). Acks delete
/// in the background; an ack lost in a crash only means a redelivery.
struct Journal {
    tx: mpsc::UnboundedSender<JournalOp>,
}

enum JournalOp {
    Append(Vec<(String, Stored)>, oneshot::Sender<Result<(), String>>),
    Forget(Vec<u64>),
    /// Answered once everything sent before it has been written (or has failed to be).
    Flush(oneshot::Sender<()>),
}

impl Journal {
    async fn open(path: &Path) -> Result<(Journal, Vec<(String, Stored)>), BusError> {
        let fail = |e: &dyn std::fmt::Display| {
            BusError::Unavailable(format!("bus journal {}: {e}", path.display()))
        };
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let options = SqliteConnectOptions::from_str("sqlite://")
            .map_err(|e| fail(&e))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            // Checkpointed off the appends' path, below.
            .pragma(
                "wal_autocheckpoint",
                crate::db::SQLITE_AUTOCHECKPOINT_BACKSTOP.to_string(),
            );
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|e| fail(&e))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS messages (\
               seq INTEGER PRIMARY KEY, queue TEXT NOT NULL, message_id TEXT NOT NULL, \
               payload BLOB NOT NULL, headers TEXT NOT NULL)",
        )
        .execute(&pool)
        .await
        .map_err(|e| fail(&e))?;
        let rows = sqlx::query(
            "SELECT seq, queue, message_id, payload, headers FROM messages ORDER BY seq",
        )
        .fetch_all(&pool)
        .await
        .map_err(|e| fail(&e))?;
        let mut recovered = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get("seq").map_err(|e| fail(&e))?;
            let headers: String = row.try_get("headers").map_err(|e| fail(&e))?;
            let headers: Vec<(String, String)> = serde_json::from_str(&headers).unwrap_or_default();
            let payload: Vec<u8> = row.try_get("payload").map_err(|e| fail(&e))?;
            recovered.push((
                row.try_get("queue").map_err(|e| fail(&e))?,
                Stored {
                    seq: u64::try_from(seq).unwrap_or(0),
                    message_id: row.try_get("message_id").map_err(|e| fail(&e))?,
                    payload: Arc::from(payload),
                    headers: Arc::from(headers),
                    redelivered: true,
                },
            ));
        }
        if !recovered.is_empty() {
            tracing::info!(messages = recovered.len(), journal = %path.display(), "bus journal: redelivering unacknowledged messages");
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let checkpoints = tokio_util::sync::CancellationToken::new();
        tokio::spawn(crate::db::checkpoint_sqlite(
            path.to_owned(),
            format!("bus journal {}", path.display()),
            checkpoints.clone(),
        ));
        tokio::spawn(async move {
            write_journal(pool, rx).await;
            checkpoints.cancel();
        });
        Ok((Journal { tx }, recovered))
    }

    async fn append(&self, messages: &[(String, Stored)]) -> Result<(), BusError> {
        let (done, written) = oneshot::channel();
        self.tx
            .send(JournalOp::Append(messages.to_vec(), done))
            .map_err(|_| BusError::Unavailable("the bus journal has stopped".into()))?;
        match written.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BusError::Unavailable(format!("bus journal: {e}"))),
            Err(_) => Err(BusError::Unavailable("the bus journal has stopped".into())),
        }
    }

    fn forget(&self, seqs: Vec<u64>) {
        if !seqs.is_empty() {
            // If the writer is gone the process is stopping; the message is redelivered.
            let _ = self.tx.send(JournalOp::Forget(seqs));
        }
    }

    async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(JournalOp::Flush(done)).is_ok() {
            let _ = flushed.await;
        }
    }

    fn alive(&self) -> bool {
        !self.tx.is_closed()
    }
}

/// The journal's writer: takes every operation waiting, applies them in one transaction,
/// then confirms the appends.
async fn write_journal(pool: SqlitePool, mut rx: mpsc::UnboundedReceiver<JournalOp>) {
    let mut ops = Vec::new();
    while rx.recv_many(&mut ops, 512).await > 0 {
        let mut failures = 0u32;
        let result = loop {
            match apply(&pool, &ops).await {
                Ok(()) => break Ok(()),
                // A busy or full disk: retry a little, then report to the publishers.
                Err(e) if failures < 3 => {
                    failures += 1;
                    tracing::warn!(error = %e, "bus journal write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50 << failures)).await;
                }
                Err(e) => break Err(e.to_string()),
            }
        };
        for op in ops.drain(..) {
            match op {
                JournalOp::Append(_, done) => {
                    let _ = done.send(result.clone());
                }
                JournalOp::Flush(done) => {
                    let _ = done.send(());
                }
                JournalOp::Forget(_) => {}
            }
        }
    }
    pool.close().await;
}

/// Messages per journal statement. Each statement is a round trip to SQLite's worker thread,
/// and one per message made the journal writer the embedded mode's bottleneck. Not far
/// more: sqlx looks up each bound parameter's name, at a cost that grows with the
/// statement's number of parameters.
const JOURNAL_CHUNK: usize = 100;

/// Writes a gathered run of appends and forgets in one transaction, many rows a statement.
/// Appends go first: a message is forgotten only after its append was sent.
async fn apply(pool: &SqlitePool, ops: &[JournalOp]) -> Result<(), sqlx::Error> {
    let mut appended: Vec<(&str, &Stored, String)> = Vec::new();
    let mut forgotten: Vec<i64> = Vec::new();
    for op in ops {
        match op {
            JournalOp::Append(messages, _) => {
                appended.extend(messages.iter().map(|(queue, m)| {
                    let headers =
                        serde_json::to_string(&*m.headers).unwrap_or_else(|_| "[]".into());
                    (queue.as_str(), m, headers)
                }));
            }
            JournalOp::Forget(seqs) => {
                forgotten.extend(
                    seqs.iter()
                        .map(|seq| i64::try_from(*seq).unwrap_or(i64::MAX)),
                );
            }
            JournalOp::Flush(_) => {}
        }
    }
    let mut tx = pool.begin().await?;
    for chunk in appended.chunks(JOURNAL_CHUNK) {
        let mut sql = String::from(
            "INSERT OR REPLACE INTO messages (seq, queue, message_id, payload, headers) ",
        );
        crate::db::push_values(&mut sql, 1, 5, chunk.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(crate::db::for_sqlite(sql)));
        for (queue, m, headers) in chunk {
            query = query
                .bind(i64::try_from(m.seq).unwrap_or(i64::MAX))
                .bind(*queue)
                .bind(m.message_id.as_str())
                .bind(&*m.payload)
                .bind(headers.as_str());
        }
        query.execute(&mut *tx).await?;
    }
    for chunk in forgotten.chunks(JOURNAL_CHUNK) {
        let sql = format!(
            "DELETE FROM messages WHERE seq IN ({})",
            crate::db::placeholders(1, chunk.len())
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(crate::db::for_sqlite(sql)));
        for seq in chunk {
            query = query.bind(*seq);
        }
        query.execute(&mut *tx).await?;
    }
    tx.commit().await
}
