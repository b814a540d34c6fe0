//! The payment service: users and their credits. A user first seen gets the initial credits;
//! the saga's payment step debits price × amount and its undo refunds it.

use crate::db::{Conn, Pool};
use axum::Json;
use axum::extract::{Path, State};
use serde::Serialize;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::contract::{Service, Step};
use crate::db::now_ms;
use crate::http::ApiError;
use crate::startup::{Context, Started};
use crate::step::{Action, LedgerRow, StepEffect, StepService};

pub static MIGRATORS: crate::db::Migrators = crate::db::Migrators {
    postgres: sqlx::migrate!("./migrations/payment"),
    sqlite: sqlx::migrate!("./migrations-sqlite/payment"),
};

/// Debits and refunds credits.
pub struct Credits {
    pub initial: i64,
}

impl StepEffect for Credits {
    const STEP: Step = Step::Payment;
    const INSUFFICIENT: &'static str = "INSUFFICIENT_FUND";

    async fn apply(&self, conn: &mut Conn, action: &Action) -> Result<bool, sqlx::Error> {
        let username = action.username.as_deref().unwrap_or_default();
        // The conditional update is the overdraft check: under concurrent debits the row lock
        // serialises them and the condition is re-checked against the committed balance.
        // A returning user with the credits costs this one statement.
        if debit(conn, username, action.quantity).await? {
            return Ok(true);
        }
        // A user first seen gets the initial credits; then try again (also when a concurrent
        // debit created the user first: that row is visible to the next statement).
        sqlx::query(
            "INSERT INTO users (username, credits, created_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (username) DO NOTHING",
        )
        .bind(username)
        .bind(self.initial)
        .bind(now_ms())
        .execute(&mut *conn)
        .await?;
        debit(conn, username, action.quantity).await
    }

    async fn undo(&self, conn: &mut Conn, row: &LedgerRow) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE users SET credits = credits + $2 WHERE username = $1")
            .bind(row.username.as_deref().unwrap_or_default())
            .bind(row.quantity)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Debits `total` if the user exists and has it.
async fn debit(conn: &mut Conn, username: &str, total: i64) -> Result<bool, sqlx::Error> {
    let debited = sqlx::query(
        "UPDATE users SET credits = credits - $2 WHERE username = $1 AND credits >= $2",
    )
    .bind(username)
    .bind(total)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(debited == 1)
}

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::Payment, &MIGRATORS).await?;
    let signal = ctx.spawn_relay(Service::Payment, pool.clone());
    let handler = StepService::new(
        Credits {
            initial: ctx.settings.initial_credits,
        },
        ctx,
        pool.clone(),
        signal,
    );
    ctx.spawn_consumer(Service::Payment, handler);
    let router = OpenApiRouter::new()
        .routes(routes!(get_user))
        .with_state(pool.clone());
    Ok(Started { router, pool })
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct User {
    pub username: String,
    pub credits: i64,
}

/// A user's current credits.
#[utoipa::path(get, path = "/api/v1/users/{username}", tag = "payment",
    params(("username" = String, Path, description = "The user")),
    responses((status = 200, body = User), (status = 404, body = crate::http::ErrorBody)))]
async fn get_user(
    State(pool): State<Pool>,
    Path(username): Path<String>,
) -> Result<Json<User>, ApiError> {
    let row = sqlx::query("SELECT username, credits FROM users WHERE username = $1")
        .bind(&username)
        .fetch_optional(&pool)
        .await?;
    match row {
        Some(row) => Ok(Json(User {
            username: row.try_get("username")?,
            credits: row.try_get("credits")?,
        })),
        None => Err(ApiError::NotFound(format!("no user named {username:?}"))),
    }
}
