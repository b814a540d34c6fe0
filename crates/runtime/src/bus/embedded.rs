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

/// The journal's one table: the messages not acknowledged yet.
const MESSAGES_TABLE: &str = "CREATE TABLE IF NOT EXISTS messages (\
    seq INTEGER PRIMARY KEY, queue TEXT NOT NULL, message_id TEXT NOT NULL, \
    payload BLOB NOT NULL, headers TEXT NOT NULL)";

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
        sqlx::query(MESSAGES_TABLE)
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

/// How long acks wait for an append to be written with, when none comes: a delete of their
/// own is a transaction, and at a moderate load they were half of the journal's. An ack
/// lost in a crash only means a redelivery.
const FORGET_LINGER: Duration = Duration::from_millis(50);

/// Acks that are written at once, without waiting for an append.
const FORGET_ENOUGH: usize = 1_000;

/// The journal's writer: takes every operation waiting, applies them in one transaction,
/// then confirms the appends. Acks ride along with the next appends (or a flush); without
/// any, they are written [`FORGET_LINGER`] after the first of them.
async fn write_journal(pool: SqlitePool, mut rx: mpsc::UnboundedReceiver<JournalOp>) {
    let mut ops = Vec::new();
    let mut forgets: Vec<u64> = Vec::new();
    let mut forgets_since: Option<tokio::time::Instant> = None;
    loop {
        let due = forgets_since.map(|since| since + FORGET_LINGER);
        let linger = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now));
        let open = tokio::select! {
            n = rx.recv_many(&mut ops, 512) => n > 0,
            () = linger, if due.is_some() => true,
        };
        let mut now = !open;
        for op in &mut ops {
            match op {
                JournalOp::Forget(seqs) => forgets.append(seqs),
                JournalOp::Append(..) | JournalOp::Flush(_) => now = true,
            }
        }
        if forgets.is_empty() {
            forgets_since = None;
        } else {
            let since = *forgets_since.get_or_insert_with(tokio::time::Instant::now);
            now |= forgets.len() >= FORGET_ENOUGH || since.elapsed() >= FORGET_LINGER;
        }
        if !now {
            ops.clear();
            continue;
        }
        let mut failures = 0u32;
        let result = loop {
            match apply(&pool, &ops, &forgets).await {
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
        // Written, or failed for good: either way not tried again (an ack that did not reach
        // the journal only means a redelivery after a restart).
        forgets.clear();
        forgets_since = None;
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
        if !open {
            break;
        }
    }
    pool.close().await;
}

/// Messages per journal statement (one per message made the journal writer the embedded
/// mode's bottleneck). Not far more: a statement's cost grows with its number of
/// parameters faster than with its rows.
const JOURNAL_CHUNK: usize = 100;

/// Writes a gathered run of appends and forgets in one transaction, many rows a statement.
/// Appends go first: a message is forgotten only after its append was sent.
async fn apply(pool: &SqlitePool, ops: &[JournalOp], forgets: &[u64]) -> Result<(), sqlx::Error> {
    let mut appended: Vec<(&str, &Stored, String)> = Vec::new();
    for op in ops {
        if let JournalOp::Append(messages, _) = op {
            appended.extend(messages.iter().map(|(queue, m)| {
                let headers = serde_json::to_string(&*m.headers).unwrap_or_else(|_| "[]".into());
                (queue.as_str(), m, headers)
            }));
        }
    }
    let forgotten: Vec<i64> = forgets
        .iter()
        .map(|seq| i64::try_from(*seq).unwrap_or(i64::MAX))
        .collect();
    if appended.is_empty() && forgotten.is_empty() {
        return Ok(());
    }
    // One script, BEGIN to COMMIT, sent to SQLite's worker thread at once: each statement
    // sent on its own is a hand-off to that thread and back, and at a moderate load, when
    // a write is one or two rows, the hand-offs were most of what the journal cost.
    let mut sql = String::from("BEGIN;\n");
    let mut next = 1;
    for chunk in appended.chunks(JOURNAL_CHUNK) {
        sql.push_str("INSERT OR REPLACE INTO messages (seq, queue, message_id, payload, headers) ");
        next = crate::db::push_values(&mut sql, next, 5, chunk.len());
        sql.push_str(";\n");
    }
    for chunk in forgotten.chunks(JOURNAL_CHUNK) {
        sql.push_str("DELETE FROM messages WHERE seq IN (");
        sql.push_str(&crate::db::placeholders(next, chunk.len()));
        sql.push_str(");\n");
        next += chunk.len();
    }
    sql.push_str("COMMIT;");
    let mut query = sqlx::query(sqlx::AssertSqlSafe(crate::db::for_sqlite(sql)));
    for (queue, m, headers) in &appended {
        query = query
            .bind(i64::try_from(m.seq).unwrap_or(i64::MAX))
            .bind(*queue)
            .bind(m.message_id.as_str())
            .bind(&*m.payload)
            .bind(headers.as_str());
    }
    for seq in forgotten {
        query = query.bind(seq);
    }
    let mut conn = pool.acquire().await?;
    let result = query.execute(&mut *conn).await;
    if result.is_err() {
        // A statement failed after BEGIN: end the transaction it left open (an error here
        // only means none was).
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal file in a directory of its own (SQLite puts its WAL beside it).
    fn temp_file(what: &str) -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("ldt-{what}-{}", uuid::Uuid::new_v4()))
            .join("journal.db")
    }

    fn remove(file: &Path) {
        if let Some(dir) = file.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    async fn count(pool: &SqlitePool) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM messages")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    fn stored(seq: u64) -> (String, Stored) {
        let m = Stored {
            seq,
            message_id: format!("m{seq}"),
            payload: Arc::from(&b"payload"[..]),
            headers: Arc::from(Vec::new()),
            redelivered: false,
        };
        ("q".to_owned(), m)
    }

    /// A journal write is one script, BEGIN to COMMIT: when a statement in it fails, the
    /// write changes nothing and the next one finds no transaction left open.
    #[tokio::test]
    async fn a_failed_journal_write_changes_nothing_and_the_next_one_succeeds() {
        let file = temp_file("journal-fail");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        let options = SqliteConnectOptions::from_str("sqlite://")
            .unwrap()
            .filename(&file)
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query(MESSAGES_TABLE).execute(&pool).await.unwrap();
        // The failure: forgetting message 666 is refused.
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE DELETE ON messages WHEN old.seq = 666 \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&pool)
        .await
        .unwrap();
        let append = |seqs: &[u64]| {
            let (done, _) = oneshot::channel();
            JournalOp::Append(seqs.iter().map(|s| stored(*s)).collect(), done)
        };
        apply(&pool, &[append(&[666])], &[]).await.unwrap();
        let failed = apply(&pool, &[append(&[1, 2])], &[666]).await;
        assert!(
            failed
                .as_ref()
                .is_err_and(|e| e.to_string().contains("refused")),
            "{failed:?}"
        );
        assert_eq!(
            count(&pool).await,
            1,
            "the failed write's appends were kept"
        );
        apply(&pool, &[append(&[3])], &[]).await.unwrap();
        assert_eq!(count(&pool).await, 2);
        pool.close().await;
        remove(&file);
    }

    /// An ack is written with the next append; with none to come, on its own shortly after.
    #[tokio::test]
    async fn an_ack_reaches_the_journal_without_a_flush_or_another_publish() {
        let file = temp_file("journal-ack");
        let bus = EmbeddedBus::open(Some(&file), vec!["q".into()], 10)
            .await
            .unwrap();
        let message = Outgoing {
            queue: "q".into(),
            message_id: "m1".into(),
            payload: b"payload".to_vec(),
            headers: Vec::new(),
        };
        bus.publish(&[message]).await.unwrap();
        let reader = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                SqliteConnectOptions::from_str("sqlite://")
                    .unwrap()
                    .filename(&file),
            )
            .await
            .unwrap();
        assert_eq!(count(&reader).await, 1);
        let mut sub = bus.subscribe("q", 1);
        let delivery = sub.next().await.unwrap().unwrap();
        delivery.ack().await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count(&reader).await > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the ack did not reach the journal within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reader.close().await;
        remove(&file);
    }
}
