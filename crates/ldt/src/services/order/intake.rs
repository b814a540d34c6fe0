//! The intake (group commit): requests hand their order to a writer task, which writes every
//! order that arrived while its writes were busy in one transaction. While orders come in
//! fast, a small group also waits a moment (`--intake-linger-ms`) for the next ones, until
//! it holds as many as the linger brings at the recent pace: the orders of a group travel
//! the whole saga together, one transaction and one broker message a hop, so at a moderate
//! load each hop's fixed costs are shared instead of paid per order. Orders coming so fast
//! that the linger brings half a full group are held for a full one, up to twice the linger:
//! the machine is busy then, and bigger groups unload it.

use std::sync::Arc;
use std::time::Duration;

use ldt_runtime::consumer::Pace;
use ldt_runtime::crash::Crash;
use ldt_runtime::db::{Held, Pool};
use ldt_runtime::http::ApiError;
use ldt_runtime::outbox::OutboxSignal;
use tracing::Instrument;

use super::admission::Admission;
use super::store::{self, Placement};

/// Most orders written by one transaction.
const INTAKE_GROUP: usize = 64;

/// A group this large is written without lingering for more: its hops' fixed costs are
/// already shared sixteen ways. Orders coming so fast that the linger brings half of it are
/// held for all of it, up to twice the linger.
const LINGER_ENOUGH: usize = 16;

/// PostgreSQL: how many groups of new orders are written at once. While fewer are in
/// flight (and orders come slower than the linger), an order is written as soon as it comes,
/// with a statement of its own; when all are busy (under load), the orders that arrive
/// meanwhile wait and go in together — an intake committing once per order made most of the
/// marketplace's commits (BENCHMARKS.md, "Where the defaults come from").
pub const INTAKE_WRITERS_POSTGRES: usize = 2;

/// The intake (group commit): requests hand their order to the writer task, which writes
/// every order that arrived while its writes were busy in one transaction — one statement
/// for the group on PostgreSQL, two multi-row inserts and a commit on SQLite. SQLite has one
/// writer anyway (and each statement is a hand-off to the connection's thread: four per
/// order before); PostgreSQL gets [`INTAKE_WRITERS_POSTGRES`] at once.
#[derive(Clone)]
pub struct Intake {
    queue: tokio::sync::mpsc::Sender<Queued>,
}

/// Whether the order was stored (`false`: its idempotency key was taken).
type PlaceResult = Result<bool, sqlx::Error>;

/// An order waiting for the writer, and where its result goes.
type Queued = (Placement, tokio::sync::oneshot::Sender<PlaceResult>);

/// Takes orders off the intake's queue in groups and hands each group to a free writer.
pub struct IntakeWriter {
    writes: Arc<GroupWrites>,
    queue: tokio::sync::mpsc::Receiver<Queued>,
    writers: usize,
    /// How long a group may wait for more orders while they come in fast
    /// (`--intake-linger-ms`); zero: never.
    linger: Duration,
}

/// Writes groups of new orders, with what a write needs besides its SQL: the admission gate
/// (a recount must not see an order half-committed), the crash points and the outbox relay.
pub struct GroupWrites {
    pub pool: Pool,
    pub conns: Arc<Held>,
    pub crash: Crash,
    pub signal: OutboxSignal,
    pub admission: Admission,
}

impl Intake {
    pub fn new(writes: GroupWrites, writers: usize, linger: Duration) -> (Intake, IntakeWriter) {
        let (tx, rx) = tokio::sync::mpsc::channel(4 * INTAKE_GROUP);
        let writers = writers.max(1);
        (
            Intake { queue: tx },
            IntakeWriter {
                writes: Arc::new(writes),
                queue: rx,
                writers,
                linger,
            },
        )
    }

    /// Hands the order to the writer and waits until it is committed (or refused).
    pub async fn place(&self, placement: Placement) -> Result<bool, ApiError> {
        let stopped = || ApiError::Overloaded("the order service is shutting down; retry".into());
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue
            .send((placement, reply))
            .await
            .map_err(|_| stopped())?;
        Ok(answer.await.map_err(|_| stopped())??)
    }
}

impl IntakeWriter {
    /// Writes groups until shutdown, then what is already queued, and waits for the writes
    /// in flight.
    pub async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let writers = Arc::new(tokio::sync::Semaphore::new(self.writers));
        let mut pace = Pace::default();
        loop {
            // A free writer first: what arrives while all are busy joins the next group.
            let Ok(permit) = writers.clone().acquire_owned().await else {
                return;
            };
            let first = tokio::select! {
                first = self.queue.recv() => first,
                _ = shutdown.cancelled() => {
                    self.queue.close();
                    self.queue.recv().await
                }
            };
            let Some(first) = first else { break };
            let started = tokio::time::Instant::now();
            let mut busy = !self.linger.is_zero() && pace.arrived(started, self.linger);
            let mut group = vec![first];
            while group.len() < INTAKE_GROUP {
                match self.queue.try_recv() {
                    Ok(next) => {
                        busy |= !self.linger.is_zero() && pace.arrived(started, self.linger);
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            // Orders coming in fast and a small group: hold it a moment for the next ones.
            // The group then goes through every hop of the saga together, one transaction and
            // one broker message a hop, instead of each order paying each hop alone.
            // It is written as soon as it holds the orders the linger brings at the recent
            // pace, the first included: at a steady pace the next order would come at the
            // linger's very end, or after it, and waiting for it costs every order of the
            // group the wait and shares the hops' costs only a little more.
            let mut enough = pace.expected_within(self.linger).clamp(2, LINGER_ENOUGH);
            let mut until = started + self.linger;
            // So fast that the linger brings half a full group (800/s at 10 ms): the machine
            // is busy with these orders, and a full group, gathered within twice the linger,
            // costs each order less CPU, while the less loaded hops make up for the wait
            // (BENCHMARKS.md, fourteenth sitting: at 1,000/s 1.24-1.41 ms an order against
            // 1.57-1.58, saga p50 24-30 ms against 37-51).
            if enough >= LINGER_ENOUGH / 2 {
                enough = LINGER_ENOUGH;
                until = started + self.linger.saturating_mul(2);
            }
            if busy && group.len() < enough && !shutdown.is_cancelled() {
                while group.len() < enough {
                    let next = tokio::select! {
                        next = tokio::time::timeout_at(until, self.queue.recv()) => next,
                        _ = shutdown.cancelled() => break,
                    };
                    match next {
                        Ok(Some(next)) => {
                            pace.arrived(tokio::time::Instant::now(), self.linger);
                            group.push(next);
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            let writes = self.writes.clone();
            tokio::spawn(async move {
                writes.write(group).await;
                drop(permit);
            });
        }
        // Every permit back: no write in flight.
        let all = u32::try_from(self.writers).unwrap_or(u32::MAX);
        let _ = writers.acquire_many(all).await;
    }
}

impl GroupWrites {
    async fn write(&self, group: Vec<Queued>) {
        let placements: Vec<&Placement> = group.iter().map(|(p, _)| p).collect();
        match self.insert(&placements).await {
            Ok(stored) => {
                for (p, reply) in group {
                    let _ = reply.send(Ok(stored.contains(&p.id)));
                }
            }
            // One bad order must not fail the others: each on its own, with its own error.
            Err(_) if group.len() > 1 => {
                for (p, reply) in group {
                    let result = self
                        .insert(&[&p])
                        .await
                        .map(|stored| stored.contains(&p.id));
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                if let Some((_, reply)) = group.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
        }
    }

    /// One statement for the group on PostgreSQL, one transaction on SQLite; returns the ids
    /// of the orders stored.
    async fn insert(
        &self,
        group: &[&Placement],
    ) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        if !ldt_runtime::db::is_sqlite(&self.pool) {
            return match group {
                [one] => self.insert_all(group).instrument(one.span.clone()).await,
                _ => self.insert_all(group).await,
            };
        }
        let mut tx = self.pool.begin().await?;
        let (stored, outbox) = store::insert_group(&mut tx, group).await?;
        // No recount while the orders commit: each is either in the count or counted as
        // committed after it, never both, never neither.
        let _gate = self.admission.state.gate.read().await;
        self.crash.commit(tx).await?;
        self.signal.committed(outbox);
        for _ in &stored {
            self.admission.committed();
        }
        Ok(stored)
    }

    /// PostgreSQL: the group's orders and their messages in one statement, which commits by
    /// itself (one round trip instead of a transaction's four); returns the ids of the orders
    /// stored.
    async fn insert_all(
        &self,
        group: &[&Placement],
    ) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        // No recount while the orders commit: each is either in the count or counted as
        // committed after it, never both, never neither. The connection before the gate, as
        // everywhere the gate is taken: a recount queued at the gate holds a connection and
        // holds back new readers, so a reader must not wait for a connection while it holds
        // the gate.
        let mut conn = self.conns.get().await?;
        let _gate = self.admission.state.gate.read().await;
        self.crash.at(ldt_runtime::crash::Point::BeforeCommit);
        let (stored, outbox) = store::insert_all(&mut conn, group).await?;
        conn.reuse();
        if stored.is_empty() {
            return Ok(stored);
        }
        self.crash.at(ldt_runtime::crash::Point::AfterCommit);
        for _ in &stored {
            self.admission.committed();
        }
        self.signal.committed(outbox);
        Ok(stored)
    }
}
