//! The payment service: users and their credits. A user first seen gets the initial credits;
//! the saga's payment step debits price × amount and its undo refunds it.

use axum::Json;
use axum::extract::{Path, State};
use ldt_runtime::db::{Conn, Pool};
use serde::Serialize;
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::services::step::{Action, LedgerRow, OneStatement, StepEffect, StepService};
use ldt_contract::{Service, Step};
use ldt_runtime::context::{Context, Started};
use ldt_runtime::db::now_ms;
use ldt_runtime::http::ApiError;

pub static MIGRATORS: ldt_runtime::db::Migrators = ldt_runtime::db::Migrators {
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

    /// Reads the batch's users once (locked, in name order), decides each debit in order,
    /// and writes the balances back with one statement, instead of one update per action.
    async fn apply_all(
        &self,
        conn: &mut Conn,
        actions: &[&Action],
    ) -> Result<Vec<bool>, sqlx::Error> {
        // Below three actions, one conditional update each is fewer statements.
        if actions.len() < 3 {
            return crate::services::step::apply_each(self, conn, actions).await;
        }
        let name = |a: &&Action| a.username.clone().unwrap_or_default();
        let mut names: Vec<String> = actions.iter().map(name).collect();
        names.sort_unstable();
        names.dedup();
        let mut credits = lock_users(conn, &names).await?;
        let missing: Vec<&String> = names.iter().filter(|n| !credits.contains_key(*n)).collect();
        if !missing.is_empty() {
            // Users first seen get the initial credits (or were just created by another
            // replica's batch: then theirs stays).
            let now = now_ms();
            let sql = ldt_runtime::db::multi_row_insert(
                "INSERT INTO users (username, credits, created_ms)",
                3,
                missing.len(),
            ) + " ON CONFLICT (username) DO NOTHING";
            let mut insert =
                sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*conn, sql)));
            for username in &missing {
                insert = insert.bind(username.as_str()).bind(self.initial).bind(now);
            }
            insert.execute(&mut *conn).await?;
            let created: Vec<String> = missing.into_iter().cloned().collect();
            credits.extend(lock_users(conn, &created).await?);
        }
        let mut changed = std::collections::BTreeMap::new();
        let applied = actions
            .iter()
            .map(|action| {
                let username = name(action);
                let Some(balance) = credits.get_mut(&username) else {
                    return false;
                };
                match balance.checked_sub(action.quantity) {
                    Some(left) if left >= 0 => {
                        *balance = left;
                        changed.insert(username, left);
                        true
                    }
                    _ => false,
                }
            })
            .collect();
        let changed: Vec<(String, i64)> = changed.into_iter().collect();
        for chunk in changed.chunks(ldt_runtime::outbox::ROWS_PER_INSERT) {
            let sql = ldt_runtime::db::multi_row_insert(
                "WITH v (username, credits) AS (",
                2,
                chunk.len(),
            ) + ") UPDATE users SET credits = v.credits FROM v WHERE users.username = v.username";
            let mut update =
                sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*conn, sql)));
            for (username, left) in chunk {
                update = update.bind(username.as_str()).bind(*left);
            }
            update.execute(&mut *conn).await?;
        }
        Ok(applied)
    }

    /// The debits' conditional update, decided (and applied at all) only when every user is
    /// known and each comes once: each debit then sees only its own user's row, as it would
    /// one after the other, and is refused when the row lacks the credits. A user first seen
    /// (created first) or twice (the second debit sees the first) takes the transaction path.
    fn one_statement(&self) -> Option<OneStatement> {
        Some(OneStatement {
            effect: "r AS (SELECT count(DISTINCT a.username) = count(*) \
                              AND count(u.username) = count(*) AS ready \
                       FROM a LEFT JOIN users u ON u.username = a.username), \
                     applied AS (UPDATE users u SET credits = u.credits - a.quantity FROM a, r \
                                 WHERE r.ready AND u.username = a.username \
                                   AND u.credits >= a.quantity RETURNING a.i)",
            decided: "(SELECT ready FROM r)",
        })
    }

    async fn undo(&self, conn: &mut Conn, row: &LedgerRow) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE users SET credits = credits + $2 WHERE username = $1")
            .bind(row.username.as_deref().unwrap_or_default())
            .bind(row.quantity)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// The refunds of a batch summed per user: one update per user, in name order.
    async fn undo_all(&self, conn: &mut Conn, rows: &[LedgerRow]) -> Result<(), sqlx::Error> {
        let mut per_user: std::collections::BTreeMap<&str, i64> = Default::default();
        for row in rows {
            let sum = per_user
                .entry(row.username.as_deref().unwrap_or_default())
                .or_insert(0);
            match sum.checked_add(row.quantity) {
                Some(total) => *sum = total,
                // Past i64 (the credits' CHECK refuses it anyway): one refund each.
                None => return crate::services::step::undo_each(self, conn, rows).await,
            }
        }
        for (username, total) in per_user {
            sqlx::query("UPDATE users SET credits = credits + $2 WHERE username = $1")
                .bind(username)
                .bind(total)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// The users the batch's debits and refunds write, locked in name order.
    async fn lock_shared(
        &self,
        conn: &mut Conn,
        actions: &[&Action],
        undone: &[LedgerRow],
    ) -> Result<(), sqlx::Error> {
        let mut names: Vec<String> = actions
            .iter()
            .filter_map(|a| a.username.clone())
            .chain(undone.iter().filter_map(|r| r.username.clone()))
            .collect();
        names.sort_unstable();
        names.dedup();
        if !names.is_empty() {
            lock_users(conn, &names).await?;
        }
        Ok(())
    }
}

/// The credits of the users among `names` (sorted) that exist, locked until the transaction
/// ends, in name order so that concurrent batches cannot deadlock (SQLite: its single writer
/// serialises them).
async fn lock_users(
    conn: &mut Conn,
    names: &[String],
) -> Result<std::collections::HashMap<String, i64>, sqlx::Error> {
    let mut credits = std::collections::HashMap::with_capacity(names.len());
    for chunk in names.chunks(ldt_runtime::outbox::ROWS_PER_INSERT) {
        let mut sql = format!(
            "SELECT username, credits FROM users WHERE username IN ({}) ORDER BY username",
            ldt_runtime::db::placeholders(1, chunk.len())
        );
        if !ldt_runtime::db::conn_is_sqlite(conn) {
            sql.push_str(" FOR UPDATE");
        }
        let mut query = sqlx::query(sqlx::AssertSqlSafe(ldt_runtime::db::for_conn(&*conn, sql)));
        for username in chunk {
            query = query.bind(username.as_str());
        }
        for row in query.fetch_all(&mut *conn).await? {
            credits.insert(row.try_get("username")?, row.try_get("credits")?);
        }
    }
    Ok(credits)
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
    responses((status = 200, body = User), (status = 404, body = ldt_runtime::http::ErrorBody),
              (status = 422, description = "Not a username any user can have", body = ldt_runtime::http::ErrorBody)))]
async fn get_user(
    State(pool): State<Pool>,
    Path(username): Path<String>,
) -> Result<Json<User>, ApiError> {
    if let Some(problem) = ldt_contract::username_problem(&username) {
        return Err(ApiError::Invalid(problem));
    }
    find_user(&pool, &username)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no user named {username:?}")))
}

/// A user's row, if the user has one (users are made by their first debit).
async fn find_user(pool: &Pool, username: &str) -> Result<Option<User>, sqlx::Error> {
    let Some(row) = sqlx::query("SELECT username, credits FROM users WHERE username = $1")
        .bind(username)
        .fetch_optional(pool)
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(User {
        username: row.try_get("username")?,
        credits: row.try_get("credits")?,
    }))
}
