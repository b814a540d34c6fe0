//! The order API: the legacy routes the original clients use, and v1.

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
pub async fn legacy_purchase_slash(
    state: State<OrderState>,
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
    State(state): State<OrderState>,
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
    State(state): State<OrderState>,
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
    State(state): State<OrderState>,
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
    State(state): State<OrderState>,
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
    State(state): State<OrderState>,
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
    State(state): State<OrderState>,
) -> Result<Json<std::collections::BTreeMap<String, i64>>, ApiError> {
    let counts = store::counts(&state.pool).await?;
    Ok(Json(
        counts
            .into_iter()
            .map(|(status, n)| (status.as_str().to_owned(), n))
            .collect(),
    ))
}

/// A stream of orders as they are created and as they change status (Server-Sent Events:
/// `event: order`, the order as JSON). It carries what this process sees; with several
/// replicas of the order service, read the list again now and then.
#[utoipa::path(get, path = "/api/v1/orders/events", tag = "orders",
    responses((status = 200, description = "Server-Sent Events, one `order` event per change",
               content_type = "text/event-stream", body = String)))]
pub async fn order_events(
    State(state): State<OrderState>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let rx = state.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(order) => {
                    let event = Event::default()
                        .event("order")
                        .json_data(&order)
                        .unwrap_or_else(|_| Event::default().comment("unserializable order"));
                    return Some((Ok(event), rx));
                }
                // A slow reader missed some: it goes on with the next (the list catches up).
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
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
pub async fn get_faults(State(state): State<OrderState>) -> Json<FaultFlagsView> {
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
    State(state): State<OrderState>,
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
