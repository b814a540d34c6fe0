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
pub struct AllTransactionsQuery {
    /// At most this many of the most recent orders (default 1000, at most 10000).
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
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: same key and body, same order")),
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
pub async fn list_orders(
    State(state): State<OrderState>,
    ApiQuery(q): ApiQuery<ListQuery>,
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
    let (orders, next) = store::orders_page(&state.pool, filter).await?;
    Ok(Json(OrderPage { orders, next }))
}
