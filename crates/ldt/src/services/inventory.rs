//! The inventory service: the stock of tokens. The saga's inventory step reserves tokens and
//! its undo releases them; an admin can restock.

use axum::Json;
use axum::extract::State;
use ldt_runtime::db::{Conn, Pool};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::services::step::{Action, LedgerRow, OneStatement, StepEffect, StepService};
use ldt_contract::{MAX_QUANTITY, Service, Step};
use ldt_runtime::context::{Context, Started};
use ldt_runtime::http::{ApiError, ApiJson};

pub static MIGRATORS: ldt_runtime::db::Migrators = ldt_runtime::db::Migrators {
    postgres: sqlx::migrate!("./migrations/inventory"),
    sqlite: sqlx::migrate!("./migrations-sqlite/inventory"),
};

/// Reserves and releases stock.
pub struct Stock;

/// The stock row, locked until the transaction ends (SQLite: its single writer does that).
const LOCK_STOCK: ldt_runtime::db::Sql = ldt_runtime::db::Sql {
    postgres: "SELECT available FROM stock WHERE id = 1 FOR UPDATE",
    sqlite: "SELECT available FROM stock WHERE id = 1",
};

impl StepEffect for Stock {
    const STEP: Step = Step::Inventory;
    const INSUFFICIENT: &'static str = "INSUFFICIENT_INVENTORY";

    async fn apply(&self, conn: &mut Conn, action: &Action) -> Result<bool, sqlx::Error> {
        let reserved = sqlx::query(
            "UPDATE stock SET available = available - $1 WHERE id = 1 AND available >= $1",
        )
        .bind(action.quantity)
        .execute(conn)
        .await?
        .rows_affected();
        Ok(reserved == 1)
    }

    /// Every action of a batch reserves from the one stock row: read it once (locked), decide
    /// in order, write it once, instead of one conditional update per action.
    async fn apply_all(
        &self,
        conn: &mut Conn,
        actions: &[&Action],
    ) -> Result<Vec<bool>, sqlx::Error> {
        if actions.len() < 2 {
            return crate::services::step::apply_each(self, conn, actions).await;
        }
        let mut available: i64 = sqlx::query_scalar(LOCK_STOCK.on(conn))
            .fetch_one(&mut *conn)
            .await?;
        let before = available;
        let applied: Vec<bool> = actions
            .iter()
            .map(|action| match available.checked_sub(action.quantity) {
                Some(left) if left >= 0 => {
                    available = left;
                    true
                }
                _ => false,
            })
            .collect();
        if available != before {
            sqlx::query("UPDATE stock SET available = $1 WHERE id = 1")
                .bind(available)
                .execute(&mut *conn)
                .await?;
        }
        Ok(applied)
    }

    /// The whole batch's reservation in one update, when the stock covers it: then every
    /// action is applied, as one after the other would be. When it does not, nothing is
    /// reserved and a batch of several takes the transaction path, which refuses only those
    /// the stock left over cannot cover; a batch of one is refused.
    fn one_statement(&self) -> Option<OneStatement> {
        Some(OneStatement {
            effect: "reserved AS (UPDATE stock SET available = stock.available - t.total \
                                  FROM (SELECT sum(quantity) AS total FROM a) t \
                                  WHERE stock.id = 1 AND stock.available >= t.total RETURNING 1), \
                     applied AS (SELECT a.i FROM a WHERE EXISTS (SELECT 1 FROM reserved))",
            decided: "EXISTS (SELECT 1 FROM reserved) OR (SELECT count(*) FROM a) = 1",
        })
    }

    async fn undo(&self, conn: &mut Conn, row: &LedgerRow) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE stock SET available = available + $1 WHERE id = 1")
            .bind(row.quantity)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Every release of a batch goes to the one stock row: one update for them all.
    async fn undo_all(&self, conn: &mut Conn, rows: &[LedgerRow]) -> Result<(), sqlx::Error> {
        let total = rows
            .iter()
            .try_fold(0i64, |sum, row| sum.checked_add(row.quantity));
        match total {
            Some(total) if rows.len() > 1 => {
                self.undo(
                    conn,
                    &LedgerRow {
                        quantity: total,
                        ..rows[0].clone()
                    },
                )
                .await
            }
            // One row, or a sum past i64 (the stock's CHECK refuses it anyway): one each.
            _ => crate::services::step::undo_each(self, conn, rows).await,
        }
    }

    /// Reservations and releases all write the stock row: lock it first.
    async fn lock_shared(
        &self,
        conn: &mut Conn,
        actions: &[&Action],
        undone: &[LedgerRow],
    ) -> Result<(), sqlx::Error> {
        if !actions.is_empty() || !undone.is_empty() {
            sqlx::query(LOCK_STOCK.on(conn)).execute(&mut *conn).await?;
        }
        Ok(())
    }
}

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::Inventory, &MIGRATORS).await?;
    seed(&pool, ctx.settings.initial_stock).await?;
    let signal = ctx.spawn_relay(Service::Inventory, pool.clone());
    let handler = StepService::new(Stock, ctx, pool.clone(), signal);
    ctx.spawn_consumer(Service::Inventory, handler);
    let router = OpenApiRouter::new()
        .routes(routes!(get_inventory))
        .routes(routes!(restock))
        .with_state(InventoryState {
            pool: pool.clone(),
            admin_token: ctx.settings.admin_token.clone(),
        });
    Ok(Started { router, pool })
}

#[derive(Clone)]
pub struct InventoryState {
    pool: Pool,
    admin_token: Option<String>,
}

/// The stock, with what is needed to check it: `initial + restocked − available` is the
/// number of tokens currently reserved by orders.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Inventory {
    pub available: i64,
    pub initial: i64,
    pub restocked: i64,
}

/// Seeds the stock once: a restart (or a second replica) finds the row and leaves it alone.
async fn seed(pool: &Pool, initial: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stock (id, initial, available) VALUES (1, $1, $1) ON CONFLICT (id) DO NOTHING",
    )
    .bind(initial)
    .execute(pool)
    .await?;
    Ok(())
}

async fn read(pool: &Pool) -> Result<Inventory, sqlx::Error> {
    let row = sqlx::query("SELECT available, initial, restocked FROM stock WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(Inventory {
        available: row.try_get("available")?,
        initial: row.try_get("initial")?,
        restocked: row.try_get("restocked")?,
    })
}

/// Tokens in stock.
#[utoipa::path(get, path = "/api/v1/inventory", tag = "inventory",
    responses((status = 200, body = Inventory)))]
async fn get_inventory(State(state): State<InventoryState>) -> Result<Json<Inventory>, ApiError> {
    Ok(Json(read(&state.pool).await?))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Restock {
    /// Tokens to add.
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_i64, example = 100)]
    #[serde(deserialize_with = "ldt_runtime::http::integer::i64")]
    pub amount: i64,
}

/// Adds tokens to the stock.
#[utoipa::path(post, path = "/api/v1/inventory/restock", tag = "inventory",
    request_body = Restock,
    security((), ("admin_token" = [])),
    responses((status = 200, description = "The stock after the restock", body = Inventory),
              (status = 401, description = "The admin token is missing or wrong", body = ldt_runtime::http::ErrorBody),
              (status = 409, description = "The stock has no room for that many more tokens (its maximum is 10^15, every token ever stocked counted)", body = ldt_runtime::http::ErrorBody),
              (status = 422, description = "An amount out of 1–10^15", body = ldt_runtime::http::ErrorBody)))]
async fn restock(
    State(InventoryState { pool, admin_token }): State<InventoryState>,
    headers: axum::http::HeaderMap,
    ApiJson(body): ApiJson<Restock>,
) -> Result<Json<Inventory>, ApiError> {
    ldt_runtime::http::require_admin(admin_token.as_deref(), &headers)?;
    if body.amount <= 0 {
        return Err(ApiError::Invalid(format!(
            "amount must be positive, got {}",
            body.amount
        )));
    }
    if body.amount > MAX_QUANTITY {
        return Err(ApiError::Invalid(format!(
            "amount must be at most {MAX_QUANTITY} tokens, got {}",
            body.amount
        )));
    }
    // Within the maximum, but more than the stock has room for: it depends on the stock now.
    let too_much = || {
        ApiError::Conflict(format!(
            "restocking {} tokens would take the stock past its maximum of {MAX_QUANTITY} tokens \
             (every token ever stocked counts, those reserved included)",
            body.amount
        ))
    };
    match add(&pool, body.amount).await {
        Ok(true) => Ok(Json(read(&pool).await?)),
        Ok(false) => Err(too_much()),
        Err(e) if ldt_runtime::db::is_out_of_range(&e) => Err(too_much()),
        Err(e) => Err(e.into()),
    }
}

/// Adds `amount` tokens unless every token ever stocked (those reserved included) would then
/// pass [`MAX_QUANTITY`]; `false` when it would (nothing changed). Below that maximum no
/// release can overflow the counter.
async fn add(pool: &Pool, amount: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE stock SET available = available + $1, restocked = restocked + $1 \
         WHERE id = 1 AND initial + restocked + $1 <= $2",
    )
    .bind(amount)
    .bind(MAX_QUANTITY)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}
