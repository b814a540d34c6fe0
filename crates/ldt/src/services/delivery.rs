//! The delivery service: records the delivery of the tokens to the user (the saga's last
//! step) and cancels it on revert. Its ledger *is* the delivery record.

use axum::Json;
use axum::extract::State;
use ldt_runtime::db::{Conn, Pool};
use serde::{Deserialize, Serialize};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::services::step::{self, Action, LedgerRow, StepEffect, StepService};
use ldt_contract::{Service, Step};
use ldt_runtime::context::{Context, Started};
use ldt_runtime::http::{ApiError, ApiQuery, page_limit};

pub static MIGRATORS: ldt_runtime::db::Migrators = ldt_runtime::db::Migrators {
    postgres: sqlx::migrate!("./migrations/delivery"),
    sqlite: sqlx::migrate!("./migrations-sqlite/delivery"),
};

/// Delivering has no effect beyond its ledger row; cancelling flips `compensated`.
pub struct Deliveries;

impl StepEffect for Deliveries {
    const STEP: Step = Step::Delivery;
    const INSUFFICIENT: &'static str = "UNDELIVERABLE";

    async fn apply(&self, _: &mut Conn, _: &Action) -> Result<bool, sqlx::Error> {
        Ok(true)
    }

    /// Nothing to apply: the ledger row is the delivery.
    fn one_statement(&self) -> Option<step::OneStatement> {
        Some(step::OneStatement {
            effect: "applied AS (SELECT i FROM a)",
            decided: "TRUE",
        })
    }

    async fn undo(&self, _: &mut Conn, _: &LedgerRow) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::Delivery, &MIGRATORS).await?;
    let signal = ctx.spawn_relay(Service::Delivery, pool.clone());
    let handler = StepService::new(Deliveries, ctx, pool.clone(), signal);
    ctx.spawn_consumer(Service::Delivery, handler);
    let router = OpenApiRouter::new()
        .routes(routes!(list_deliveries))
        .with_state(pool.clone());
    Ok(Started { router, pool })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    pub order_id: String,
    pub username: String,
    pub amount: i64,
    /// `DELIVERED` (active), `CANCELLED` (reverted), `FAILED`, or `REFUSED` (cancelled before
    /// it happened: the late delivery was refused).
    pub status: &'static str,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl From<LedgerRow> for Delivery {
    fn from(row: LedgerRow) -> Self {
        let status = match (row.outcome, row.compensated) {
            (step::Outcome::Success, false) => "DELIVERED",
            (step::Outcome::Success, true) => "CANCELLED",
            (step::Outcome::Timeout, _) => "REFUSED",
            _ => "FAILED",
        };
        Delivery {
            order_id: row.order_id,
            username: row.username.unwrap_or_default(),
            amount: row.quantity,
            status,
            created_at_ms: row.created_ms,
            updated_at_ms: row.updated_ms,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeliveryQuery {
    /// Whose deliveries.
    #[param(min_length = 1, max_length = 64)]
    pub username: String,
    /// At most this many, the most recent.
    #[param(minimum = 1, maximum = 10000, default = 1000)]
    pub limit: Option<i64>,
}

/// A user's deliveries, oldest first.
#[utoipa::path(get, path = "/api/v1/deliveries", tag = "delivery",
    params(DeliveryQuery),
    responses((status = 200, body = [Delivery]), (status = 422, body = ldt_runtime::http::ErrorBody)))]
async fn list_deliveries(
    State(pool): State<Pool>,
    ApiQuery(q): ApiQuery<DeliveryQuery>,
) -> Result<Json<Vec<Delivery>>, ApiError> {
    let limit = page_limit(q.limit, 1000)?;
    if let Some(problem) = ldt_contract::username_problem(&q.username) {
        return Err(ApiError::Invalid(problem));
    }
    Ok(Json(recent_deliveries(&pool, &q.username, limit).await?))
}

/// A user's last `limit` deliveries, oldest first.
async fn recent_deliveries(
    pool: &Pool,
    username: &str,
    limit: i64,
) -> Result<Vec<Delivery>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT * FROM (SELECT * FROM ledger WHERE username = $1 AND outcome <> 'PENDING' \
         ORDER BY created_ms DESC, order_id DESC LIMIT $2) recent ORDER BY created_ms, order_id",
    )
    .bind(username)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| LedgerRow::from_row(row).map(Delivery::from))
        .collect()
}
