//! The order API: the legacy routes the original clients use, and v1.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ldt_contract::OrderStatus;
use ldt_runtime::http::{ApiError, ApiJson, ApiQuery, page_limit};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::domain::{CreateOrder, Created, LegacyPurchase, NewOrder, Order};
use super::flags::{Flags, StepFlags};
use super::service::OrderState;
use super::store::{self, OrderFilter};

/// Legacy: place an order (answers at once; the saga runs after).
#[utoipa::path(post, path = "/api/purchase", tag = "legacy",
    request_body = LegacyPurchase,
    responses((status = 200, body = Order), (status = 400, body = ldt_runtime::http::ErrorBody),
              (status = 422, body = ldt_runtime::http::ErrorBody), (status = 500, body = ldt_runtime::http::ErrorBody)))]
pub async fn legacy_purchase(
    State(state): State<Arc<OrderState>>,
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
pub async fn legacy_purchase_slash(
    state: State<Arc<OrderState>>,
    body: ApiJson<LegacyPurchase>,
) -> Result<Json<Order>, ApiError> {
    legacy_purchase(state, body).await
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AllTransactionsQuery {
    /// At most this many of the most recent orders.
    #[param(minimum = 1, maximum = 10000, default = 1000)]
    pub limit: Option<i64>,
}

/// Legacy: the most recent orders, oldest first (the newest is last).
#[utoipa::path(get, path = "/api/all-transaction", tag = "legacy",
    params(AllTransactionsQuery),
    responses((status = 200, body = [Order])))]
pub async fn legacy_all_transactions(
    State(state): State<Arc<OrderState>>,
    ApiQuery(q): ApiQuery<AllTransactionsQuery>,
) -> Result<Json<Vec<Order>>, ApiError> {
    let limit = page_limit(q.limit, 1000)?;
    Ok(Json(store::recent_orders(&state.pool, limit).await?))
}

/// Place an order. Answers `202` at once with the PENDING order; poll its `Location`.
/// A retry carrying the same `Idempotency-Key` and body returns the original order.
#[utoipa::path(post, path = "/api/v1/orders", tag = "orders",
    request_body = CreateOrder,
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 200,
            pattern = r"^[!-~]([ -~]*[!-~])?$",
            description = "Makes retries safe: same key and body, same order. 1 to 200 visible ASCII characters, spaces inside only")),
    responses((status = 202, body = Order, headers(("Location" = String))),
              (status = 200, body = Order, description = "A retry of an earlier request: the original order"),
              (status = 400, body = ldt_runtime::http::ErrorBody), (status = 409, body = ldt_runtime::http::ErrorBody),
              (status = 422, body = ldt_runtime::http::ErrorBody)))]
pub async fn create_order(
    State(state): State<Arc<OrderState>>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrder>,
) -> Result<Response, ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let key = std::str::from_utf8(v.as_bytes()).unwrap_or("\u{0}");
            let visible = |b: &u8| (b'!'..=b'~').contains(b);
            let ok = (1..=200).contains(&key.len())
                && key.bytes().all(|b| b == b' ' || visible(&b))
                && key.bytes().next().is_some_and(|b| visible(&b))
                && key.bytes().last().is_some_and(|b| visible(&b));
            if !ok {
                return Err(ApiError::Invalid(
                    "Idempotency-Key must be 1 to 200 visible ASCII characters (spaces only inside)"
                        .into(),
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
pub async fn get_order(
    State(state): State<Arc<OrderState>>,
    Path(id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    let id =
        Uuid::parse_str(&id).map_err(|_| ApiError::NotFound(format!("no order with id {id:?}")))?;
    store::find_order(&state.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no order with id {id}")))
}

/// Cancels a PENDING order: its saga undoes every step it took, the last first, and the
/// order ends `CANCELLED`. Answers `202` at once (poll the order). An order whose saga has
/// already failed ends with that status instead; a final order answers `409`.
#[utoipa::path(post, path = "/api/v1/orders/{id}/cancel", tag = "orders",
    params(("id" = Uuid, Path, description = "Order id")),
    security((), ("admin_token" = [])),
    responses((status = 202, description = "Cancellation requested: the order as it is now", body = Order),
              (status = 401, description = "The admin token is missing or wrong", body = ldt_runtime::http::ErrorBody),
              (status = 404, description = "No such order", body = ldt_runtime::http::ErrorBody),
              (status = 409, description = "The order is final already", body = ldt_runtime::http::ErrorBody)))]
pub async fn cancel_order(
    State(state): State<Arc<OrderState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    ldt_runtime::http::require_admin(state.admin_token.as_deref(), &headers)?;
    let id =
        Uuid::parse_str(&id).map_err(|_| ApiError::NotFound(format!("no order with id {id:?}")))?;
    let order = state.cancel(id).await?;
    Ok((StatusCode::ACCEPTED, Json(order)))
}

/// Which orders to list.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this user's orders.
    #[param(min_length = 1, max_length = 64)]
    pub username: Option<String>,
    /// Only orders with this status.
    #[param(inline)]
    pub status: Option<OrderStatus>,
    /// Page size.
    #[param(minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<i64>,
    /// Newest first (then pass `next` as `before`) instead of oldest first (pass it as `after`).
    #[serde(default)]
    pub newest_first: bool,
    /// Cursor, oldest first: the `next` of the previous page.
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// Cursor, newest first: the `next` of the previous page.
    #[param(minimum = 0)]
    pub before: Option<i64>,
    /// Only orders created at or after this time (ms since the Unix epoch).
    pub since_ms: Option<i64>,
    /// Only orders created before this time (ms since the Unix epoch).
    pub until_ms: Option<i64>,
}

/// A page of orders.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderPage {
    /// Oldest first, or newest first with `newest_first=true`.
    pub orders: Vec<Order>,
    /// The cursor of the next page (`after`, or `before` newest first); absent on the last.
    pub next: Option<i64>,
}

/// A page of orders, filtered by user, status and creation time; oldest first unless
/// `newest_first=true`.
#[utoipa::path(get, path = "/api/v1/orders", tag = "orders",
    params(ListQuery),
    responses((status = 200, description = "A page of orders", body = OrderPage),
              (status = 422, description = "An invalid filter", body = ldt_runtime::http::ErrorBody)))]
pub async fn list_orders(
    State(state): State<Arc<OrderState>>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<OrderPage>, ApiError> {
    let limit = page_limit(q.limit, 100)?;
    if let Some(problem) = q
        .username
        .as_deref()
        .and_then(ldt_contract::username_problem)
    {
        return Err(ApiError::Invalid(problem));
    }
    if q.after.is_some_and(|c| c < 0) || q.before.is_some_and(|c| c < 0) {
        return Err(ApiError::Invalid("a cursor is not negative".into()));
    }
    let filter = OrderFilter {
        after: q.after.unwrap_or(0),
        before: q.before.unwrap_or(i64::MAX),
        newest_first: q.newest_first,
        username: q.username.as_deref(),
        status: q.status,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        limit,
    };
    let (orders, next) = store::orders_page(&state.pool, filter).await?;
    Ok(Json(OrderPage { orders, next }))
}

/// How many orders have each status (statuses without orders are left out).
#[utoipa::path(get, path = "/api/v1/orders/counts", tag = "orders",
    responses((status = 200, description = "Orders by status",
               body = std::collections::BTreeMap<String, i64>,
               example = json!({"PENDING": 2, "SUCCESS": 120, "TIMEOUT": 3}))))]
pub async fn order_counts(
    State(state): State<Arc<OrderState>>,
) -> Result<Json<std::collections::BTreeMap<String, i64>>, ApiError> {
    let counts = store::counts(&state.pool).await?;
    Ok(Json(
        counts
            .into_iter()
            .map(|(status, n)| (status.as_str().to_owned(), n))
            .collect(),
    ))
}

/// How the order stream is delivered.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Gather the changes of this many milliseconds into one `orders` event (a JSON array,
    /// each order once, in its latest state) instead of one `order` event per change: a
    /// reader at a thousand orders a second then gets a few events a second, not thousands.
    #[param(minimum = 1, maximum = 5000)]
    pub coalesce_ms: Option<u64>,
}

/// The longest `coalesce_ms`.
const MAX_COALESCE_MS: u64 = 5_000;

/// A stream of orders as they are created and as they change status (Server-Sent Events:
/// `event: order`, the order as JSON; with `coalesce_ms`, `event: orders`, an array). It
/// carries what this process sees; with several replicas of the order service, read the list
/// again now and then.
#[utoipa::path(get, path = "/api/v1/orders/events", tag = "orders",
    params(EventsQuery),
    responses((status = 200, description = "Server-Sent Events: one `order` event per change, \
                or one `orders` event per `coalesce_ms`",
               content_type = "text/event-stream", body = String),
              (status = 422, description = "An invalid `coalesce_ms`", body = ldt_runtime::http::ErrorBody)))]
pub async fn order_events(
    State(state): State<Arc<OrderState>>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{KeepAlive, Sse};
    use futures_util::StreamExt;
    let rx = state.events.subscribe();
    let stream = match q.coalesce_ms {
        None => per_change(rx).boxed(),
        Some(ms @ 1..=MAX_COALESCE_MS) => {
            coalesced(rx, std::time::Duration::from_millis(ms)).boxed()
        }
        Some(ms) => {
            return Err(ApiError::Invalid(format!(
                "coalesce_ms must be from 1 to {MAX_COALESCE_MS}, not {ms}"
            )));
        }
    };
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The next order of the stream; `None` once the order service stops. A slow reader that
/// missed some goes on with the next (its list catches up when it reads the list again).
async fn next_order(rx: &mut tokio::sync::broadcast::Receiver<Order>) -> Option<Order> {
    loop {
        match rx.recv().await {
            Ok(order) => return Some(order),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
        }
    }
}

fn sse_json(name: &'static str, data: &impl Serialize) -> axum::response::sse::Event {
    axum::response::sse::Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|_| axum::response::sse::Event::default().comment("unserializable"))
}

/// One `order` event per change.
fn per_change(
    rx: tokio::sync::broadcast::Receiver<Order>,
) -> impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
{
    futures_util::stream::unfold(rx, |mut rx| async move {
        let order = next_order(&mut rx).await?;
        Some((Ok(sse_json("order", &order)), rx))
    })
}

/// One `orders` event per `window` that saw a change: each order once, in its latest state
/// (a final one kept over a late PENDING), in the order of their first change.
fn coalesced(
    rx: tokio::sync::broadcast::Receiver<Order>,
    window: std::time::Duration,
) -> impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
{
    futures_util::stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        // The window opens with its first change: nothing is sent while nothing happens.
        let first = next_order(&mut rx).await?;
        let until = tokio::time::Instant::now() + window;
        let mut batch = vec![first];
        let mut at: std::collections::HashMap<Uuid, usize> =
            std::collections::HashMap::from([(batch[0].id, 0)]);
        let mut open = true;
        while let Ok(next) = tokio::time::timeout_at(until, next_order(&mut rx)).await {
            let Some(order) = next else {
                open = false;
                break;
            };
            match at.get(&order.id) {
                // A final status is never taken back by a late PENDING.
                Some(i) => {
                    if order.status != OrderStatus::Pending
                        || batch[*i].status == OrderStatus::Pending
                    {
                        batch[*i] = order;
                    }
                }
                None => {
                    at.insert(order.id, batch.len());
                    batch.push(order);
                }
            }
        }
        Some((Ok(sse_json("orders", &batch)), open.then_some(rx)))
    })
}

/// The runtime fault flags and whether fault injection is on.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FaultFlagsView {
    /// `false` when the marketplace runs with `--fault-injection false`: the flags are all
    /// zero and cannot be set.
    pub enabled: bool,
    pub payment: StepFlags,
    pub inventory: StepFlags,
    pub delivery: StepFlags,
}

impl FaultFlagsView {
    fn of(enabled: bool, flags: Flags) -> FaultFlagsView {
        FaultFlagsView {
            enabled,
            payment: flags.payment,
            inventory: flags.inventory,
            delivery: flags.delivery,
        }
    }
}

/// The runtime fault flags: the share of new orders (those without a fault of their own)
/// whose step fails or stalls.
#[utoipa::path(get, path = "/api/v1/faults", tag = "faults",
    responses((status = 200, description = "The flags", body = FaultFlagsView)))]
pub async fn get_faults(State(state): State<Arc<OrderState>>) -> Json<FaultFlagsView> {
    let flags = if state.fault_injection {
        state.flags.get()
    } else {
        Flags::default()
    };
    Json(FaultFlagsView::of(state.fault_injection, flags))
}

/// Sets the runtime fault flags (every replica takes them within a second).
#[utoipa::path(put, path = "/api/v1/faults", tag = "faults",
    request_body(content = Flags, example = json!({"payment": {"fail_percent": 10, "stall_percent": 0}})),
    security((), ("admin_token" = [])),
    responses((status = 200, description = "The flags now", body = FaultFlagsView),
              (status = 401, description = "The admin token is missing or wrong", body = ldt_runtime::http::ErrorBody),
              (status = 403, description = "Fault injection is disabled on this marketplace", body = ldt_runtime::http::ErrorBody),
              (status = 422, description = "A percentage out of 0–100", body = ldt_runtime::http::ErrorBody)))]
pub async fn put_faults(
    State(state): State<Arc<OrderState>>,
    headers: HeaderMap,
    ApiJson(flags): ApiJson<Flags>,
) -> Result<Json<FaultFlagsView>, ApiError> {
    ldt_runtime::http::require_admin(state.admin_token.as_deref(), &headers)?;
    if !state.fault_injection {
        return Err(ApiError::Forbidden(
            "fault injection is disabled on this marketplace (LDT_FAULT_INJECTION=false)".into(),
        ));
    }
    if let Some(why) = flags.invalid() {
        return Err(ApiError::Invalid(why));
    }
    state.flags.store(&state.pool, flags).await?;
    tracing::info!(flags = %serde_json::to_string(&flags).unwrap_or_default(), "fault flags set");
    Ok(Json(FaultFlagsView::of(true, flags)))
}
