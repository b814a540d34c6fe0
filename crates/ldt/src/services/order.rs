//! The order service: the public order API (legacy and v1). It stores an order as PENDING
//! together with the `OrderPlaced` message in one transaction, answers at once, and records
//! the final status when the orchestrator says the saga is over.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ldt_runtime::db::{Held, Pool};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use tracing::Instrument;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use ldt_contract::{Envelope, Fault, FaultPlan, Message, OrderStatus, Queues, Service};
use ldt_runtime::bus::Incoming;
use ldt_runtime::consumer::{Delivery, HandleError, Handler};
use ldt_runtime::context::{Context, Started};
use ldt_runtime::crash::{Crash, Point};
use ldt_runtime::db::now_ms;
use ldt_runtime::http::{ApiError, ApiJson, page_limit};
use ldt_runtime::outbox::OutboxSignal;

pub static MIGRATORS: ldt_runtime::db::Migrators = ldt_runtime::db::Migrators {
    postgres: sqlx::migrate!("./migrations/order"),
    sqlite: sqlx::migrate!("./migrations-sqlite/order"),
};

/// Longest accepted username, in characters.
pub const MAX_USERNAME: usize = 64;

#[derive(Clone)]
pub struct OrderState {
    pool: Pool,
    /// The connections of new orders' and finishes' statements (see [`Held`]).
    conns: Arc<Held>,
    queues: Queues,
    signal: OutboxSignal,
    crash: Crash,
    fault_injection: bool,
    admission: Admission,
    metrics: ldt_runtime::metrics::Metrics,
    /// The writers of new orders (`None` only in the writers' own copy).
    intake: Option<Intake>,
}

/// Admission control: an estimate of the orders in flight, from the database (so it holds
/// across replicas) plus the orders this process committed since that count was taken,
/// against a limit. The limit follows the measured completion rate — about `target` worth
/// of work in flight (Little's law), never below [`MIN_IN_FLIGHT`] nor above `max_pending` —
/// so under overload the excess is shed at the door and accepted orders stay fast, instead
/// of queueing behind a fixed, too-deep backlog.
#[derive(Clone)]
struct Admission {
    max_pending: i64,
    /// How long the accepted backlog may take to clear; zero: the limit is `max_pending`.
    target: std::time::Duration,
    state: Arc<AdmissionState>,
}

/// The adaptive limit's floor: room for a burst from idle and for orders that wait out a
/// step's deadline.
const MIN_IN_FLIGHT: i64 = 256;

#[derive(Default)]
struct AdmissionState {
    /// Orders this process has committed, ever.
    committed: std::sync::atomic::AtomicI64,
    /// Orders this process has moved to a final status, ever.
    finished: std::sync::atomic::AtomicI64,
    /// The last count of PENDING orders, and `committed` and `finished` as they were when it
    /// was taken.
    snapshot: std::sync::Mutex<(i64, i64, i64)>,
    /// Commits and finishes hold it shared; a recount holds it exclusively, so the count,
    /// `committed` and `finished` are taken at the same point (for this process's orders;
    /// other replicas' are counted when they have committed).
    gate: tokio::sync::RwLock<()>,
    /// The current limit.
    limit: std::sync::atomic::AtomicI64,
    /// Requests admitted and not yet answered. Until its order commits, an admitted request
    /// is in no count: without this, while commits are slow (a recount holds the gate, the
    /// database is busy) every request that arrived meanwhile would be admitted.
    admitting: std::sync::atomic::AtomicI64,
}

/// An admitted request's place in the in-flight estimate, given back when it is dropped
/// (answered, failed, or its client went away).
struct Admitted(Arc<AdmissionState>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0
            .admitting
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Admission {
    fn new(max_pending: i64, target: std::time::Duration) -> Admission {
        let state = AdmissionState::default();
        let first = if target.is_zero() {
            max_pending
        } else {
            MIN_IN_FLIGHT.min(max_pending)
        };
        state
            .limit
            .store(first, std::sync::atomic::Ordering::Relaxed);
        Admission {
            max_pending,
            target,
            state: Arc::new(state),
        }
    }

    /// The limit for a completion rate of `per_second` orders.
    fn limit_for(&self, per_second: f64) -> i64 {
        if self.target.is_zero() {
            return self.max_pending;
        }
        let wanted = (per_second * self.target.as_secs_f64()).ceil();
        let wanted = if wanted.is_finite() && wanted < i64::MAX as f64 {
            wanted as i64
        } else {
            i64::MAX
        };
        wanted.max(MIN_IN_FLIGHT).min(self.max_pending)
    }

    /// The orders in flight: the last count, plus what this process committed since, minus
    /// what it finished since (without the finishes, the estimate would grow by the whole
    /// intake between two counts and shed orders that fit), plus the requests admitted and
    /// not yet committed (an order is counted twice between its commit and its answer: a
    /// moment, on the safe side). [`Admission::admit`] reads it in two parts.
    #[cfg(test)]
    fn estimate(&self) -> i64 {
        let admitting = self
            .state
            .admitting
            .load(std::sync::atomic::Ordering::Acquire);
        self.estimate_committed().saturating_add(admitting.max(0))
    }

    /// The estimate without the requests not yet committed.
    fn estimate_committed(&self) -> i64 {
        let (count, committed_then, finished_then) = *self
            .state
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let committed = self
            .state
            .committed
            .load(std::sync::atomic::Ordering::Acquire);
        let finished = self
            .state
            .finished
            .load(std::sync::atomic::Ordering::Acquire);
        count
            .saturating_add(committed.saturating_sub(committed_then))
            .saturating_sub(finished.saturating_sub(finished_then))
            .max(0)
    }

    /// Takes a place in flight for a new order, or refuses it when the limit is reached.
    /// Compare-and-swap: of concurrent requests that see the last place free, one gets it.
    fn admit(&self) -> Result<Admitted, ApiError> {
        use std::sync::atomic::Ordering;
        let limit = self.state.limit.load(Ordering::Relaxed);
        let mut admitting = self.state.admitting.load(Ordering::Acquire);
        loop {
            let now = self.estimate_committed().saturating_add(admitting.max(0));
            if now >= limit {
                return Err(ApiError::Overloaded(format!(
                    "overloaded: {now} orders in flight (limit {limit}); retry after 1 s"
                )));
            }
            match self.state.admitting.compare_exchange_weak(
                admitting,
                admitting.saturating_add(1),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(Admitted(self.state.clone())),
                Err(current) => admitting = current,
            }
        }
    }

    /// Called after an order's transaction committed.
    fn committed(&self) {
        self.state
            .committed
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Called after `n` orders were moved to their final status.
    fn finished(&self, n: usize) {
        self.state.finished.fetch_add(
            i64::try_from(n).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::AcqRel,
        );
    }

    /// Re-counts the PENDING orders every second until shutdown, and from the counts the
    /// completion rate that sets the limit. Between two counts the estimate follows this
    /// process's commits and finishes; the count corrects it for other replicas' and for
    /// restarts. Not more often: every order leaves a dead `PENDING` entry in the status
    /// index until the table is vacuumed, so a count wades through every order since the
    /// last vacuum (tens of milliseconds at 1,000 orders/s), and commits wait at the gate
    /// meanwhile.
    async fn refresh(self, pool: Pool, shutdown: tokio_util::sync::CancellationToken) {
        const TICK: std::time::Duration = std::time::Duration::from_secs(1);
        // Completions per second, smoothed over a few seconds.
        let mut rate = 0.0f64;
        let mut last: Option<(i64, i64, std::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = shutdown.cancelled() => return,
            }
            // The connection first, then the gate: a commit waiting at the gate holds a
            // connection, and the count must not wait for one while holding the gate.
            let Ok(mut conn) = pool.acquire().await else {
                continue;
            };
            let (before, finished_before, count) = {
                let _gate = self.state.gate.write().await;
                let before = self
                    .state
                    .committed
                    .load(std::sync::atomic::Ordering::Acquire);
                let finished_before = self
                    .state
                    .finished
                    .load(std::sync::atomic::Ordering::Acquire);
                let count: Result<i64, _> =
                    sqlx::query_scalar("SELECT count(*) FROM orders WHERE status = 'PENDING'")
                        .fetch_one(&mut *conn)
                        .await;
                (before, finished_before, count)
            };
            drop(conn);
            let Ok(n) = count else { continue };
            *self
                .state
                .snapshot
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = (n, before, finished_before);
            let at = std::time::Instant::now();
            if let Some((pending, committed, then)) = last {
                // Finished = what was pending + what came in − what is pending now. (Orders
                // other replicas took are not in `committed`: an underestimate, on the safe
                // side.)
                let finished = pending
                    .saturating_add(before.saturating_sub(committed))
                    .saturating_sub(n)
                    .max(0);
                let secs = at.duration_since(then).as_secs_f64().max(0.001);
                rate = 0.5 * rate + 0.5 * (finished as f64 / secs);
                self.state
                    .limit
                    .store(self.limit_for(rate), std::sync::atomic::Ordering::Relaxed);
            }
            last = Some((n, before, at));
        }
    }
}

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::Order, &MIGRATORS).await?;
    let signal = ctx.spawn_relay(Service::Order, pool.clone());
    let mut state = OrderState {
        conns: Arc::new(Held::new(&pool, 3)),
        pool: pool.clone(),
        queues: ctx.queues.clone(),
        signal,
        crash: ctx.crash(Service::Order),
        fault_injection: ctx.settings.fault_injection,
        admission: Admission::new(ctx.settings.max_pending, ctx.settings.target_latency()),
        metrics: ctx.metrics.clone(),
        intake: None,
    };
    // The writer's copy has no intake of its own: the queue closes when the last request
    // handler's copy is gone.
    let writers = if ldt_runtime::db::is_sqlite(&pool) {
        1
    } else {
        INTAKE_WRITERS_POSTGRES
    };
    let (intake, writer) = Intake::new(state.clone(), writers);
    ctx.tasks.spawn(writer.run(ctx.shutdown.clone()));
    state.intake = Some(intake);
    ctx.tasks.spawn(
        state
            .admission
            .clone()
            .refresh(pool.clone(), ctx.shutdown.clone()),
    );
    ctx.spawn_consumer(Service::Order, Arc::new(state.clone()));
    let router = OpenApiRouter::new()
        .routes(routes!(legacy_purchase))
        .routes(routes!(legacy_purchase_slash))
        .routes(routes!(legacy_all_transactions))
        .routes(routes!(create_order, list_orders))
        .routes(routes!(get_order))
        .with_state(state);
    Ok(Started { router, pool })
}

/// An order as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Order {
    pub id: Uuid,
    pub username: String,
    pub price: i64,
    pub amount: i64,
    pub status: OrderStatus,
    pub faults: FaultPlan,
    pub created_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

/// A validated order request.
#[derive(Debug, Clone, PartialEq)]
struct NewOrder {
    username: String,
    price: i64,
    amount: i64,
    faults: FaultPlan,
    /// `kill_create`: the order is never stored.
    kill_create: bool,
}

impl NewOrder {
    fn validate(
        username: String,
        price: i64,
        amount: i64,
        faults: FaultPlan,
        kill_create: bool,
    ) -> Result<NewOrder, ApiError> {
        let name_len = username.chars().count();
        if username.trim().is_empty() {
            return Err(ApiError::Invalid("username must not be empty".into()));
        }
        if name_len > MAX_USERNAME {
            return Err(ApiError::Invalid(format!(
                "username is {name_len} characters long; at most {MAX_USERNAME} are allowed"
            )));
        }
        if username.chars().any(char::is_control) {
            return Err(ApiError::Invalid(
                "username must not contain control characters".into(),
            ));
        }
        if price < 0 {
            return Err(ApiError::Invalid(format!(
                "price must not be negative, got {price}"
            )));
        }
        if amount <= 0 {
            return Err(ApiError::Invalid(format!(
                "amount must be positive, got {amount}"
            )));
        }
        if price.checked_mul(amount).is_none() {
            return Err(ApiError::Invalid(format!(
                "price × amount ({price} × {amount}) overflows a 64-bit integer"
            )));
        }
        Ok(NewOrder {
            username,
            price,
            amount,
            faults,
            kill_create,
        })
    }

    /// Stable digest of what the request asks for, to recognise a retry of it.
    fn fingerprint(&self) -> String {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.username,
            self.price,
            self.amount,
            serde_json::to_string(&self.faults).unwrap_or_default(),
            self.kill_create
        )
    }
}

/// What `POST /api/purchase/` accepts (the legacy contract).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LegacyPurchase {
    pub username: String,
    pub price: i64,
    pub amount: i64,
    #[serde(default)]
    pub kill_create: bool,
    #[serde(default)]
    pub kill_payment: bool,
    #[serde(default)]
    pub timeout_payment: bool,
    #[serde(default)]
    pub kill_inventory: bool,
    #[serde(default)]
    pub timeout_inventory: bool,
    #[serde(default)]
    pub kill_deliver: bool,
    #[serde(default)]
    pub timeout_deliver: bool,
}

fn legacy_fault(kill: bool, timeout: bool) -> Option<Fault> {
    // A step told both to fail and to stall fails: failing is the earlier event.
    match (kill, timeout) {
        (true, _) => Some(Fault::Kill),
        (false, true) => Some(Fault::Timeout),
        _ => None,
    }
}

impl LegacyPurchase {
    fn into_new_order(self) -> Result<NewOrder, ApiError> {
        let faults = FaultPlan {
            payment: legacy_fault(self.kill_payment, self.timeout_payment),
            inventory: legacy_fault(self.kill_inventory, self.timeout_inventory),
            delivery: legacy_fault(self.kill_deliver, self.timeout_deliver),
        };
        NewOrder::validate(
            self.username,
            self.price,
            self.amount,
            faults,
            self.kill_create,
        )
    }
}

/// A new order and its `OrderPlaced`, as the intake writes them.
struct Placement {
    id: String,
    username: String,
    price: i64,
    amount: i64,
    faults: String,
    created_ms: i64,
    idempotency_key: Option<String>,
    request_hash: Option<String>,
    message: ldt_runtime::outbox::OutboxRow,
    /// The request's database span, for an order written on its own.
    span: tracing::Span,
}

/// Most orders written by one transaction.
const INTAKE_GROUP: usize = 64;

/// PostgreSQL: how many groups of new orders are written at once. While fewer are in
/// flight, an order is written as soon as it comes, with one statement of its own; when all
/// are busy (under load), the orders that arrive meanwhile wait and go in together. At
/// 1,000 orders/s the order service made 1,100 of the 1,500 commits a second the five
/// services made: each step service commits once per consumed batch, the intake once per
/// order.
const INTAKE_WRITERS_POSTGRES: usize = 2;

/// The intake (group commit): requests hand their order to the writer task, which writes
/// every order that arrived while its writes were busy in one transaction — two multi-row
/// inserts and one commit for the group. SQLite has one writer anyway (and each statement
/// is a hand-off to the connection's thread: four per order before); PostgreSQL gets
/// [`INTAKE_WRITERS_POSTGRES`] at once.
#[derive(Clone)]
struct Intake {
    queue: tokio::sync::mpsc::Sender<Queued>,
}

/// Whether the order was stored (`false`: its idempotency key was taken).
type PlaceResult = Result<bool, sqlx::Error>;

/// An order waiting for the writer, and where its result goes.
type Queued = (Placement, tokio::sync::oneshot::Sender<PlaceResult>);

/// Takes orders off the intake's queue in groups and hands each group to a free writer.
struct IntakeWriter {
    writes: Arc<GroupWrites>,
    queue: tokio::sync::mpsc::Receiver<Queued>,
    writers: usize,
}

/// Writes one group of new orders.
struct GroupWrites {
    state: OrderState,
}

impl Intake {
    fn new(state: OrderState, writers: usize) -> (Intake, IntakeWriter) {
        let (tx, rx) = tokio::sync::mpsc::channel(4 * INTAKE_GROUP);
        let writers = writers.max(1);
        (
            Intake { queue: tx },
            IntakeWriter {
                writes: Arc::new(GroupWrites { state }),
                queue: rx,
                writers,
            },
        )
    }

    /// Hands the order to the writer and waits until it is committed (or refused).
    async fn place(&self, placement: Placement) -> Result<bool, ApiError> {
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
    async fn run(mut self, shutdown: tokio_util::sync::CancellationToken) {
        let writers = Arc::new(tokio::sync::Semaphore::new(self.writers));
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
            let mut group = vec![first];
            while group.len() < INTAKE_GROUP {
                match self.queue.try_recv() {
                    Ok(next) => group.push(next),
                    Err(_) => break,
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

    /// One transaction for the group (PostgreSQL: one statement for an order on its own);
    /// returns the ids of the orders stored.
    async fn insert(
        &self,
        group: &[&Placement],
    ) -> Result<std::collections::HashSet<String>, sqlx::Error> {
        let state = &self.state;
        if let [one] = group
            && !ldt_runtime::db::is_sqlite(&state.pool)
        {
            let stored = state
                .insert_in_one_statement(one)
                .instrument(one.span.clone())
                .await?;
            return Ok(if stored {
                std::iter::once(one.id.clone()).collect()
            } else {
                Default::default()
            });
        }
        let mut tx = state.pool.begin().await?;
        let mut sql = ldt_runtime::db::multi_row_insert(
            "INSERT INTO orders (id, username, price, amount, faults, status, created_ms, \
             idempotency_key, request_hash)",
            9,
            group.len(),
        );
        sql.push_str(" ON CONFLICT (idempotency_key) DO NOTHING RETURNING id");
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for p in group {
            query = query
                .bind(&p.id)
                .bind(&p.username)
                .bind(p.price)
                .bind(p.amount)
                .bind(&p.faults)
                .bind(OrderStatus::Pending.as_str())
                .bind(p.created_ms)
                .bind(&p.idempotency_key)
                .bind(&p.request_hash);
        }
        let stored = query
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|row| row.try_get::<String, _>("id"))
            .collect::<Result<std::collections::HashSet<String>, _>>()?;
        let mut outbox = ldt_runtime::outbox::OutboxBatch::default();
        for p in group.iter().filter(|p| stored.contains(&p.id)) {
            outbox.push_row(p.message.clone());
        }
        outbox.write(&mut tx).await?;
        // No recount while the orders commit: each is either in the count or counted as
        // committed after it, never both, never neither.
        let _gate = state.admission.state.gate.read().await;
        state.crash.commit(tx).await?;
        state.signal.committed(outbox);
        for _ in &stored {
            state.admission.committed();
        }
        Ok(stored)
    }
}

/// What `POST /api/v1/orders` accepts.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrder {
    pub username: String,
    /// Price of one token, in credits (≥ 0).
    pub price: i64,
    /// Number of tokens (> 0).
    pub amount: i64,
    /// Per-step fault plan, for testing the failure paths.
    #[serde(default)]
    pub faults: FaultPlan,
    /// Fail before storing the order (the legacy `kill_create`).
    #[serde(default)]
    pub kill_create: bool,
}

enum Created {
    New(Order),
    /// A retry with the same idempotency key and body: the original order.
    Replayed(Order),
}

impl OrderState {
    /// Stores the order and its `OrderPlaced` message in one transaction.
    async fn place(
        &self,
        new: NewOrder,
        idempotency_key: Option<&str>,
    ) -> Result<Created, ApiError> {
        let id = Uuid::now_v7();
        let now = now_ms();
        let fingerprint = new.fingerprint();
        let placed = Envelope::new(
            id,
            now,
            Message::OrderPlaced {
                username: new.username.clone(),
                price: new.price,
                amount: new.amount,
                faults: new.faults,
            },
        );
        let intake = self.intake.as_ref().ok_or_else(|| {
            ApiError::Internal(anyhow::anyhow!("the order intake is not running"))
        })?;
        let inserted = intake
            .place(Placement {
                id: id.to_string(),
                username: new.username.clone(),
                price: new.price,
                amount: new.amount,
                faults: serde_json::to_string(&new.faults).unwrap_or_default(),
                created_ms: now,
                idempotency_key: idempotency_key.map(str::to_owned),
                request_hash: idempotency_key.map(|_| fingerprint.clone()),
                message: ldt_runtime::outbox::OutboxRow::of(&self.queues, &placed),
                span: tracing::Span::current(),
            })
            .await?;
        if !inserted {
            // The key was taken, so its order exists (orders are never deleted).
            let (order, hash) = match idempotency_key {
                Some(key) => find_by_idempotency_key(&self.pool, key).await?,
                None => None,
            }
            .ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!(
                    "an order insert was refused but no order holds its idempotency key"
                ))
            })?;
            if hash.as_deref() != Some(fingerprint.as_str()) {
                return Err(ApiError::Conflict(
                    "this Idempotency-Key was already used with a different request body".into(),
                ));
            }
            return Ok(Created::Replayed(order));
        }
        Ok(Created::New(Order {
            id,
            username: new.username,
            price: new.price,
            amount: new.amount,
            status: OrderStatus::Pending,
            faults: new.faults,
            created_at_ms: now,
            finished_at_ms: None,
        }))
    }

    /// PostgreSQL: the order and its `OrderPlaced` in one statement, which commits by itself
    /// (one round trip instead of four). `false`: the idempotency key was taken.
    async fn insert_in_one_statement(&self, p: &Placement) -> Result<bool, sqlx::Error> {
        // No recount while the order commits: it is either in the count or counted as
        // committed after it, never both, never neither. The connection before the gate, as
        // everywhere the gate is taken: a recount queued at the gate holds a connection and
        // holds back new readers, so a reader must not wait for a connection while it holds
        // the gate.
        let mut conn = self.conns.get().await?;
        let _gate = self.admission.state.gate.read().await;
        self.crash.at(ldt_runtime::crash::Point::BeforeCommit);
        let query = sqlx::query(
            "WITH o AS (INSERT INTO orders (id, username, price, amount, faults, status, created_ms, \
             idempotency_key, request_hash) VALUES ($1, $2, $3, $4, $5, 'PENDING', $6, $7, $8) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id) \
             INSERT INTO outbox (queue, message_id, payload, traceparent, created_ms) \
             SELECT $9, $10, $11, $12, $6 FROM o RETURNING id",
        )
        .bind(&p.id)
        .bind(&p.username)
        .bind(p.price)
        .bind(p.amount)
        .bind(&p.faults)
        .bind(p.created_ms)
        .bind(&p.idempotency_key)
        .bind(&p.request_hash);
        let outbox_id = p
            .message
            .bind_columns(query)
            .fetch_optional(&mut *conn)
            .await?;
        conn.reuse();
        let Some(outbox_id) = outbox_id else {
            return Ok(false);
        };
        self.crash.at(ldt_runtime::crash::Point::AfterCommit);
        self.admission.committed();
        let mut outbox = ldt_runtime::outbox::OutboxBatch::default();
        outbox.push_written(outbox_id.try_get(0)?, p.message.clone());
        self.signal.committed(outbox);
        Ok(true)
    }

    async fn submit(
        &self,
        new: NewOrder,
        idempotency_key: Option<&str>,
    ) -> Result<Created, ApiError> {
        if !self.fault_injection && (new.kill_create || !new.faults.is_empty()) {
            return Err(ApiError::Invalid(
                "fault injection is disabled on this marketplace (LDT_FAULT_INJECTION=false)"
                    .into(),
            ));
        }
        // Held until the order is answered: see `AdmissionState::admitting`.
        let _admitted = match self.admission.admit() {
            Ok(admitted) => admitted,
            Err(overloaded) => {
                // A retry of an order already taken is answered even when full.
                if let Some(key) = idempotency_key
                    && let Some((order, hash)) = find_by_idempotency_key(&self.pool, key).await?
                    && hash.as_deref() == Some(new.fingerprint().as_str())
                {
                    return Ok(Created::Replayed(order));
                }
                return Err(overloaded);
            }
        };
        if new.kill_create {
            tracing::info!(username = %new.username, "injected fault kill_create: the order is not stored");
            return Err(ApiError::Injected(
                "order creation failed (injected fault kill_create); the order was not stored"
                    .into(),
            ));
        }
        self.place(new, idempotency_key)
            .instrument(ldt_runtime::db::span(&self.pool, "orders"))
            .await
    }
}

// The order service's reads of its `orders` table. (Its writes go in with their outbox rows:
// `OrderState::insert_in_one_statement`, `IntakeWriter::insert`, `OrderState::finish_all`.)

fn order_from_row(row: &ldt_runtime::db::DbRow) -> Result<Order, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let status: String = row.try_get("status")?;
    let faults: String = row.try_get("faults")?;
    Ok(Order {
        id: Uuid::parse_str(&id).map_err(|e| sqlx::Error::Decode(e.into()))?,
        username: row.try_get("username")?,
        price: row.try_get("price")?,
        amount: row.try_get("amount")?,
        status: OrderStatus::parse(&status).ok_or_else(|| {
            sqlx::Error::Decode(format!("bad status {status:?} in orders").into())
        })?,
        faults: serde_json::from_str(&faults).unwrap_or_default(),
        created_at_ms: row.try_get("created_ms")?,
        finished_at_ms: row.try_get("finished_ms")?,
    })
}

/// The order holding an idempotency key, with the fingerprint of the request that made it.
async fn find_by_idempotency_key(
    pool: &Pool,
    key: &str,
) -> Result<Option<(Order, Option<String>)>, sqlx::Error> {
    let row = sqlx::query("SELECT * FROM orders WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await?;
    row.map(|row| Ok((order_from_row(&row)?, row.try_get("request_hash")?)))
        .transpose()
}

async fn find_order(pool: &Pool, id: Uuid) -> Result<Option<Order>, sqlx::Error> {
    let row = sqlx::query("SELECT * FROM orders WHERE id = $1")
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(order_from_row).transpose()
}

/// The `limit` most recent orders, oldest first.
async fn recent_orders(pool: &Pool, limit: i64) -> Result<Vec<Order>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT * FROM (SELECT * FROM orders ORDER BY seq DESC LIMIT $1) recent ORDER BY seq",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(order_from_row).collect()
}

/// Which orders a page shows.
struct OrderFilter<'a> {
    /// Only orders after this cursor (`seq`).
    after: i64,
    username: Option<&'a str>,
    status: Option<OrderStatus>,
    limit: i64,
}

/// A page of orders, oldest first, with the cursor of the next page if there is one.
async fn orders_page(pool: &Pool, filter: OrderFilter<'_>) -> Result<OrderPage, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT * FROM orders WHERE seq > $1 AND (CAST($2 AS TEXT) IS NULL OR username = $2) \
         AND (CAST($3 AS TEXT) IS NULL OR status = $3) ORDER BY seq LIMIT $4",
    )
    .bind(filter.after)
    .bind(filter.username)
    .bind(filter.status.map(OrderStatus::as_str))
    .bind(filter.limit.saturating_add(1))
    .fetch_all(pool)
    .await?;
    let page = &rows[..rows.len().min(usize::try_from(filter.limit).unwrap_or(0))];
    let next = if rows.len() > page.len() {
        page.last()
            .map(|r| r.try_get::<i64, _>("seq"))
            .transpose()?
    } else {
        None
    };
    let orders = page.iter().map(order_from_row).collect::<Result<_, _>>()?;
    Ok(OrderPage { orders, next })
}

/// Legacy: place an order (answers at once; the saga runs after).
#[utoipa::path(post, path = "/api/purchase", tag = "legacy",
    request_body = LegacyPurchase,
    responses((status = 200, body = Order), (status = 400, body = ldt_runtime::http::ErrorBody),
              (status = 422, body = ldt_runtime::http::ErrorBody), (status = 500, body = ldt_runtime::http::ErrorBody)))]
async fn legacy_purchase(
    State(state): State<OrderState>,
    ApiJson(body): ApiJson<LegacyPurchase>,
) -> Result<Json<Order>, ApiError> {
    match state.submit(body.into_new_order()?, None).await? {
        Created::New(order) | Created::Replayed(order) => Ok(Json(order)),
    }
}

/// Legacy: the same, with the trailing slash the original clients use.
#[utoipa::path(post, path = "/api/purchase/", tag = "legacy",
    request_body = LegacyPurchase,
    responses((status = 200, body = Order), (status = 400, body = ldt_runtime::http::ErrorBody),
              (status = 422, body = ldt_runtime::http::ErrorBody), (status = 500, body = ldt_runtime::http::ErrorBody)))]
async fn legacy_purchase_slash(
    state: State<OrderState>,
    body: ApiJson<LegacyPurchase>,
) -> Result<Json<Order>, ApiError> {
    legacy_purchase(state, body).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AllTransactionsQuery {
    /// At most this many of the most recent orders (default 1000, at most 10000).
    pub limit: Option<i64>,
}

/// Legacy: the most recent orders, oldest first (the newest is last).
#[utoipa::path(get, path = "/api/all-transaction", tag = "legacy",
    params(AllTransactionsQuery),
    responses((status = 200, body = [Order])))]
async fn legacy_all_transactions(
    State(state): State<OrderState>,
    Query(q): Query<AllTransactionsQuery>,
) -> Result<Json<Vec<Order>>, ApiError> {
    let limit = page_limit(q.limit, 1000)?;
    Ok(Json(recent_orders(&state.pool, limit).await?))
}

/// Place an order. Answers `202` at once with the PENDING order; poll its `Location`.
/// A retry carrying the same `Idempotency-Key` and body returns the original order.
#[utoipa::path(post, path = "/api/v1/orders", tag = "orders",
    request_body = CreateOrder,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: same key and body, same order")),
    responses((status = 202, body = Order, headers(("Location" = String))),
              (status = 200, body = Order, description = "A retry of an earlier request: the original order"),
              (status = 400, body = ldt_runtime::http::ErrorBody), (status = 409, body = ldt_runtime::http::ErrorBody),
              (status = 422, body = ldt_runtime::http::ErrorBody)))]
async fn create_order(
    State(state): State<OrderState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrder>,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = v
                .to_str()
                .map_err(|_| ApiError::Invalid("Idempotency-Key must be visible ASCII".into()))?;
            if key.is_empty() || key.len() > 200 {
                return Err(ApiError::Invalid(
                    "Idempotency-Key must be 1 to 200 characters".into(),
                ));
            }
            Some(key.to_owned())
        }
    };
    let new = NewOrder::validate(
        body.username,
        body.price,
        body.amount,
        body.faults,
        body.kill_create,
    )?;
    let (status, order) = match state.submit(new, key.as_deref()).await? {
        Created::New(order) => (StatusCode::ACCEPTED, order),
        Created::Replayed(order) => (StatusCode::OK, order),
    };
    let location = format!("/api/v1/orders/{}", order.id);
    Ok((status, [(header::LOCATION, location)], Json(order)).into_response())
}

/// One order with its current status.
#[utoipa::path(get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = Uuid, Path, description = "Order id")),
    responses((status = 200, body = Order), (status = 404, body = ldt_runtime::http::ErrorBody)))]
async fn get_order(
    State(state): State<OrderState>,
    Path(id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    let id =
        Uuid::parse_str(&id).map_err(|_| ApiError::NotFound(format!("no order with id {id:?}")))?;
    find_order(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no order with id {id}")))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    pub username: Option<String>,
    /// One of PENDING, SUCCESS, INSUFFICIENT_FUND, INSUFFICIENT_INVENTORY, TIMEOUT, UNKNOWN.
    pub status: Option<String>,
    /// Page size (default 100, at most 10000).
    pub limit: Option<i64>,
    /// Cursor: the `next` of the previous page.
    pub after: Option<i64>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderPage {
    /// Oldest first.
    pub orders: Vec<Order>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<i64>,
}

/// A page of orders, oldest first, filtered by user and status.
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders",
    params(ListQuery),
    responses((status = 200, body = OrderPage), (status = 422, body = ldt_runtime::http::ErrorBody)))]
async fn list_orders(
    State(state): State<OrderState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<OrderPage>, ApiError> {
    let limit = page_limit(q.limit, 100)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(
            OrderStatus::parse(s)
                .ok_or_else(|| ApiError::Invalid(format!("unknown status {s:?}")))?,
        ),
    };
    let filter = OrderFilter {
        after: q.after.unwrap_or(0),
        username: q.username.as_deref(),
        status,
        limit,
    };
    Ok(Json(orders_page(&state.pool, filter).await?))
}

impl OrderState {
    /// The final status an `OrderFinished` delivery carries, or why it is poison.
    fn finished(msg: &Incoming) -> Result<(Uuid, OrderStatus), HandleError> {
        let env = ldt_runtime::consumer::decode(msg)?;
        let Message::OrderFinished { status } = env.body else {
            return Err(HandleError::Poison(format!(
                "the order service does not handle `{}` messages",
                env.body.kind()
            )));
        };
        if !status.is_final() {
            return Err(HandleError::Poison(
                "OrderFinished with status PENDING".into(),
            ));
        }
        Ok((env.order_id, status))
    }

    /// Moves PENDING orders to their final status, all with one statement (which commits by
    /// itself); a duplicate finds its order final and changes nothing. Returns, per entry,
    /// whether the order exists.
    async fn finish_all(&self, finished: &[(Uuid, OrderStatus)]) -> Result<Vec<bool>, HandleError> {
        self.crash.at(Point::BeforeCommit);
        let now = now_ms();
        let mut sql = ldt_runtime::db::multi_row_insert(
            "WITH v (id, status, finished_ms) AS (",
            3,
            finished.len(),
        );
        sql.push_str(
            ") UPDATE orders SET status = v.status, finished_ms = v.finished_ms FROM v \
             WHERE orders.id = v.id AND orders.status = 'PENDING' \
             RETURNING orders.id, orders.status, orders.created_ms",
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (order_id, status) in finished {
            query = query
                .bind(order_id.to_string())
                .bind(status.as_str())
                .bind(now);
        }
        // As with commits: no recount while the statement commits. The connection first,
        // then the gate (as in the recount): a recount queued at the gate holds back new
        // readers, and one of those must not be waiting for the connection this one needs.
        let mut conn = self.conns.get().await?;
        let rows = {
            let _gate = self.admission.state.gate.read().await;
            let rows = query.fetch_all(&mut *conn).await?;
            self.admission.finished(rows.len());
            rows
        };
        conn.reuse();
        drop(conn);
        self.crash.at(Point::AfterCommit);
        let mut updated = std::collections::HashSet::new();
        for row in &rows {
            let id: String = row.try_get("id")?;
            let status: String = row.try_get("status")?;
            let created: i64 = row.try_get("created_ms")?;
            self.metrics.inc(
                "ldt_orders_total",
                "Orders by final status.",
                &[("status", status.as_str())],
                1,
            );
            self.metrics.observe_ms(
                "ldt_saga_duration_ms",
                "Time from an order's creation to its final status.",
                &[("status", status.as_str())],
                now.saturating_sub(created) as f64,
            );
            tracing::info!(order_id = %id, status = %status, "order finished");
            updated.insert(id);
        }
        let mut known = Vec::with_capacity(finished.len());
        for (order_id, _) in finished {
            let id = order_id.to_string();
            // Not moved: a duplicate (the order is final) or an order never placed here.
            let exists = updated.contains(&id)
                || sqlx::query_scalar::<_, String>("SELECT status FROM orders WHERE id = $1")
                    .bind(&id)
                    .fetch_optional(&self.pool)
                    .await?
                    .is_some();
            known.push(exists);
        }
        Ok(known)
    }
}

impl Handler for OrderState {
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let finished = Self::finished(msg)?;
        match self.finish_all(&[finished]).await?.as_slice() {
            [true] => Ok(()),
            _ => Err(HandleError::Poison(format!(
                "OrderFinished for unknown order {}",
                finished.0
            ))),
        }
    }

    /// The batch's final statuses with one statement; if it fails, one message at a time.
    async fn handle_batch(&self, batch: &[Delivery]) -> Vec<Result<(), HandleError>> {
        let parsed: Vec<Result<(Uuid, OrderStatus), HandleError>> =
            batch.iter().map(|d| Self::finished(&d.msg)).collect();
        let valid: Vec<(Uuid, OrderStatus)> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().copied())
            .collect();
        let known = if valid.len() > 1 {
            self.finish_all(&valid).await.ok()
        } else {
            None
        };
        let Some(known) = known else {
            let mut results = Vec::with_capacity(batch.len());
            for d in batch {
                results.push(self.handle(&d.msg).instrument(d.span.clone()).await);
            }
            return results;
        };
        let mut known = known.into_iter();
        parsed
            .into_iter()
            .map(|p| {
                let (order_id, _) = p?;
                if known.next().unwrap_or(false) {
                    Ok(())
                } else {
                    Err(HandleError::Poison(format!(
                        "OrderFinished for unknown order {order_id}"
                    )))
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_admission_limit_follows_the_completion_rate_within_its_bounds() {
        let a = super::Admission::new(2000, std::time::Duration::from_secs(1));
        assert_eq!(a.limit_for(0.0), super::MIN_IN_FLIGHT);
        assert_eq!(a.limit_for(300.0), 300);
        assert_eq!(a.limit_for(1e9), 2000);
        assert_eq!(a.limit_for(f64::NAN), 2000);
        let fixed = super::Admission::new(2000, std::time::Duration::ZERO);
        assert_eq!(fixed.limit_for(300.0), 2000);
        let tiny = super::Admission::new(3, std::time::Duration::from_secs(1));
        assert_eq!(tiny.limit_for(0.0), 3);
    }

    #[test]
    fn the_in_flight_estimate_counts_what_finished_since_the_last_count() {
        let a = super::Admission::new(2, std::time::Duration::ZERO);
        *a.state.snapshot.lock().unwrap() = (1, 0, 0);
        a.committed();
        assert_eq!(a.estimate(), 2);
        assert!(a.admit().is_err(), "two in flight fill a limit of two");
        a.finished(1);
        assert_eq!(a.estimate(), 1);
        assert!(
            a.admit().is_ok(),
            "a finished order makes room before the next count"
        );
        // Finishes of orders another replica took can outrun this one's commits.
        a.finished(5);
        assert_eq!(a.estimate(), 0);
    }

    #[test]
    fn an_admitted_request_holds_its_place_until_it_is_answered() {
        let a = super::Admission::new(2, std::time::Duration::ZERO);
        let first = a.admit().expect("room for two");
        let second = a.admit().expect("room for two");
        assert_eq!(
            a.estimate(),
            2,
            "admitted, not yet committed, still in flight"
        );
        assert!(
            a.admit().is_err(),
            "two admitted requests fill a limit of two before either commits"
        );
        assert_eq!(a.estimate(), 2, "a refused request takes no place");
        drop(first);
        assert_eq!(a.estimate(), 1);
        let third = a.admit().expect("an answered request makes room");
        drop((second, third));
        assert_eq!(a.estimate(), 0);
    }

    use super::*;

    fn validate(username: &str, price: i64, amount: i64) -> Result<NewOrder, ApiError> {
        NewOrder::validate(username.into(), price, amount, FaultPlan::default(), false)
    }

    #[test]
    fn rejects_bad_orders_with_a_reason() {
        assert!(validate("ann", 10, 1).is_ok());
        assert!(validate("ann", 0, 1).is_ok());
        for (name, price, amount, needle) in [
            ("", 1, 1, "empty"),
            ("  ", 1, 1, "empty"),
            (&"x".repeat(65), 1, 1, "at most 64"),
            ("ann", -1, 1, "price"),
            ("ann", 1, 0, "amount"),
            ("ann", 1, -3, "amount"),
            ("ann", i64::MAX, 2, "overflows"),
        ] {
            let err = validate(name, price, amount).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn legacy_flags_become_a_fault_plan() {
        let body: LegacyPurchase = serde_json::from_str(
            r#"{"username":"a","price":1,"amount":1,"kill_inventory":true,"timeout_deliver":true}"#,
        )
        .unwrap();
        let order = body.into_new_order().unwrap();
        assert_eq!(order.faults.payment, None);
        assert_eq!(order.faults.inventory, Some(Fault::Kill));
        assert_eq!(order.faults.delivery, Some(Fault::Timeout));
    }
}
