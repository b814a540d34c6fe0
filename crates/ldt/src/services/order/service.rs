//! The order service's state and what it does with a new order: admit it, validate it,
//! store it with its `OrderPlaced`; and what it does when a saga is over.

use std::sync::Arc;

use ldt_contract::{Envelope, Message, OrderStatus, Queues};
use ldt_runtime::consumer::HandleError;
use ldt_runtime::crash::{Crash, Point};
use ldt_runtime::db::{Held, Pool, now_ms};
use ldt_runtime::http::ApiError;
use ldt_runtime::outbox::OutboxSignal;
use tracing::Instrument;
use uuid::Uuid;

use super::admission::Admission;
use super::domain::{Created, FaultSource, NewOrder, Order};
use super::flags::FlagsCache;
use super::intake::Intake;
use super::store::{self, Placement};
use crate::services::plan::{self, Terms};

#[derive(Clone)]
pub struct OrderState {
    pub pool: Pool,
    /// The connections of finishes' statements (see [`Held`]).
    pub conns: Arc<Held>,
    pub queues: Queues,
    pub signal: OutboxSignal,
    pub crash: Crash,
    pub fault_injection: bool,
    /// Whether this service sends each saga's first command (`--order-opens-saga`).
    pub opens_saga: bool,
    /// How long, when it opens sagas, it holds an order's `OrderPlaced` back (half a step
    /// timeout): the orchestrator most often learns of the saga from its answer first, and
    /// the `OrderPlaced` is dropped unsent when the order is final.
    pub hold_placed: std::time::Duration,
    pub admission: Admission,
    /// How long a new order may wait at the door for a place (`--admission-wait-ms`).
    pub admission_wait: std::time::Duration,
    pub metrics: ldt_runtime::metrics::Metrics,
    /// The writers of new orders.
    pub intake: Intake,
    pub admin_token: Option<String>,
    /// The runtime fault flags, as last read.
    pub flags: FlagsCache,
    /// Orders created or finished by this process, for the event stream.
    pub events: tokio::sync::broadcast::Sender<Order>,
}

impl OrderState {
    /// Stores the order with its `OrderPlaced` (and the saga's first command, if this service
    /// opens sagas) in one transaction.
    async fn place(
        &self,
        new: NewOrder,
        idempotency_key: Option<&str>,
    ) -> Result<Created, ApiError> {
        let id = Uuid::now_v7();
        let now = now_ms();
        // A retry matches the request as it was sent, whatever the flags drew.
        let fingerprint = new.fingerprint();
        let (faults, fault_source) = if !new.faults.is_empty() {
            (new.faults, Some(FaultSource::Request))
        } else {
            let flags = self.flags.get();
            let drawn = if flags.is_off() {
                new.faults
            } else {
                let mut bits = Uuid::new_v4().as_u128();
                flags.draw(|| {
                    let pick = (bits % 100) as u8;
                    bits /= 100;
                    pick
                })
            };
            let source = (!drawn.is_empty()).then_some(FaultSource::Flags);
            (drawn, source)
        };
        if fault_source == Some(FaultSource::Flags) {
            tracing::info!(order_id = %id, faults = %serde_json::to_string(&faults).unwrap_or_default(),
                "runtime fault flags drew faults for this order");
        }
        let trace_id = ldt_runtime::telemetry::current_traceparent()
            .and_then(|tp| tp.split('-').nth(1).map(str::to_owned));
        let mut placed = Envelope::new(
            id,
            now,
            Message::OrderPlaced {
                username: new.username.clone(),
                price: new.price,
                amount: new.amount,
                faults,
                slip_sent: self.opens_saga,
            },
        );
        let (mut messages, mut held) = (Vec::new(), None);
        if !self.opens_saga {
            messages.push(ldt_runtime::outbox::OutboxRow::of(&self.queues, &placed));
        } else {
            // Held back, and dropped unsent if the order is final first (found by its id,
            // the order's): the orchestrator learns of the saga from the opening its
            // answer carries. Sent after the hold, it tells the orchestrator of a saga
            // whose slip stalled, well before its deadline.
            placed.id = id;
            held = Some((
                ldt_runtime::outbox::OutboxRow::of(&self.queues, &placed),
                self.hold_placed,
            ));
            // The saga's first command goes with it, so the slip does not wait for the
            // orchestrator's hop (which starts the saga, its deadline and all, meanwhile).
            let terms = Terms {
                username: new.username.clone(),
                price: new.price,
                amount: new.amount,
                faults,
            };
            // The order's own checks came first and are stricter; this one is the
            // orchestrator's, which must never refuse a saga whose debit is on its way.
            if let Some(why) = plan::invalid_terms(&terms) {
                return Err(ApiError::Invalid(why));
            }
            let first = plan::opening(&terms);
            let mut opening = Envelope::new(id, now, first.body);
            opening.then = first.then;
            opening.opened = Some(opened(&terms, now));
            messages.push(ldt_runtime::outbox::OutboxRow::of(&self.queues, &opening));
        }
        let inserted = self
            .intake
            .place(Placement {
                id: id.to_string(),
                username: new.username.clone(),
                price: new.price,
                amount: new.amount,
                faults: serde_json::to_string(&faults).unwrap_or_default(),
                fault_source: fault_source.map(FaultSource::as_str),
                trace_id: trace_id.clone(),
                created_ms: now,
                idempotency_key: idempotency_key.map(str::to_owned),
                request_hash: idempotency_key.map(|_| fingerprint.clone()),
                messages,
                held,
                span: tracing::Span::current(),
            })
            .await?;
        if !inserted {
            // The key was taken, so its order exists (orders are never deleted).
            let (order, hash) = match idempotency_key {
                Some(key) => store::find_by_idempotency_key(&self.pool, key).await?,
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
        let order = Order {
            id,
            username: new.username,
            price: new.price,
            amount: new.amount,
            status: OrderStatus::Pending,
            faults,
            fault_source,
            created_at_ms: now,
            finished_at_ms: None,
            trace_id,
        };
        // Nobody listening is the usual case, and not an error.
        let _ = self.events.send(order.clone());
        Ok(Created::New(order))
    }

    /// Asks the orchestrator to cancel a PENDING order (through the outbox); the order as it
    /// is now.
    pub async fn cancel(&self, id: Uuid) -> Result<Order, ApiError> {
        let now = now_ms();
        // With the saga's opening when this service opened it: its `OrderPlaced` may still
        // be held back, and the orchestrator then starts the saga from the cancellation.
        let row = |order: &Order| {
            let mut cancel = Envelope::new(id, now, Message::CancelOrder);
            if self.opens_saga {
                let terms = Terms {
                    username: order.username.clone(),
                    price: order.price,
                    amount: order.amount,
                    faults: order.faults,
                };
                cancel.opened = Some(opened(&terms, order.created_at_ms));
            }
            ldt_runtime::outbox::OutboxRow::of(&self.queues, &cancel)
        };
        match store::request_cancel(&self.pool, id, row).await? {
            None => Err(ApiError::NotFound(format!("no order with id {id}"))),
            Some((order, None)) => Err(ApiError::Conflict(format!(
                "order {id} is final already ({})",
                order.status.as_str()
            ))),
            Some((order, Some(outbox))) => {
                tracing::info!(order_id = %id, "cancellation requested");
                self.signal.committed(outbox);
                Ok(order)
            }
        }
    }

    pub async fn submit(
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
            Err(_) => {
                // A retry of an order already taken is answered even when full, at once.
                if let Some(key) = idempotency_key
                    && let Some((order, hash)) =
                        store::find_by_idempotency_key(&self.pool, key).await?
                    && hash.as_deref() == Some(new.fingerprint().as_str())
                {
                    return Ok(Created::Replayed(order));
                }
                let admitted = self.admission.admit_within(self.admission_wait).await;
                self.metrics.inc(
                    "ldt_admission_waits_total",
                    "New orders that found the marketplace full, by how their wait at the door \
                     ended: admitted, or refused with 503.",
                    &[(
                        "outcome",
                        if admitted.is_ok() {
                            "admitted"
                        } else {
                            "refused"
                        },
                    )],
                    1,
                );
                admitted?
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

impl OrderState {
    /// The final status an `OrderFinished` delivery carries, or why it is poison.
    pub fn finished(msg: &ldt_runtime::bus::Incoming) -> Result<(Uuid, OrderStatus), HandleError> {
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
    pub async fn finish_all(
        &self,
        finished: &[(Uuid, OrderStatus)],
    ) -> Result<Vec<bool>, HandleError> {
        self.crash.at(Point::BeforeCommit);
        let now = now_ms();
        // As with commits: no recount while the statement commits. The connection first,
        // then the gate (as in the recount): a recount queued at the gate holds back new
        // readers, and one of those must not be waiting for the connection this one needs.
        let mut conn = self.conns.get().await?;
        let rows = {
            let _gate = self.admission.state.gate.read().await;
            let rows = store::finish(&mut conn, finished, now, self.opens_saga).await?;
            self.admission.finished(rows.len());
            rows
        };
        conn.reuse();
        drop(conn);
        self.crash.at(Point::AfterCommit);
        let mut updated = std::collections::HashSet::new();
        for order in rows {
            let status = order.status.as_str();
            self.metrics.inc(
                "ldt_orders_total",
                "Orders by final status.",
                &[("status", status)],
                1,
            );
            self.metrics.observe_ms(
                "ldt_saga_duration_ms",
                "Time from an order's creation to its final status.",
                &[("status", status)],
                now.saturating_sub(order.created_at_ms) as f64,
            );
            tracing::info!(order_id = %order.id, status, "order finished");
            updated.insert(order.id.to_string());
            let _ = self.events.send(order);
        }
        let mut known = Vec::with_capacity(finished.len());
        for (order_id, _) in finished {
            let id = order_id.to_string();
            // Not moved: a duplicate (the order is final) or an order never placed here.
            let exists = updated.contains(&id) || store::exists(&self.pool, &id).await?;
            known.push(exists);
        }
        Ok(known)
    }
}

/// The opening the order service puts on the saga's first command and on a cancellation
/// (see [`ldt_contract::Envelope::opened`]).
fn opened(terms: &Terms, placed_ms: i64) -> ldt_contract::Opened {
    ldt_contract::Opened {
        username: terms.username.clone(),
        price: terms.price,
        amount: terms.amount,
        faults: terms.faults,
        placed_ms,
    }
}
