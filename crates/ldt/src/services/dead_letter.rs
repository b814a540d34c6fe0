//! The dead-letter service: keeps every message some service could not process (poison,
//! unknown type or version, an answer for a saga that does not exist), shows them, and
//! replays one to the queue it came from once the cause is fixed.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use ldt_runtime::db::Pool;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use ldt_contract::{Queues, Service, TRACEPARENT_HEADER};
use ldt_runtime::bus::Incoming;
use ldt_runtime::consumer::{HandleError, Handler, ORIGIN_QUEUE_HEADER, REASON_HEADER};
use ldt_runtime::context::{Context, Started};
use ldt_runtime::crash::{Crash, Point};
use ldt_runtime::db::now_ms;
use ldt_runtime::http::{ApiError, ApiQuery, page_limit};
use ldt_runtime::outbox::OutboxSignal;

/// One dead letter, locked until the transaction ends (SQLite: its single writer does that).
const LOCK_DEAD_LETTER: ldt_runtime::db::Sql = ldt_runtime::db::Sql {
    postgres: "SELECT * FROM dead_letters WHERE id = $1 FOR UPDATE",
    sqlite: "SELECT * FROM dead_letters WHERE id = $1",
};

pub static MIGRATORS: ldt_runtime::db::Migrators = ldt_runtime::db::Migrators {
    postgres: sqlx::migrate!("./migrations/dead_letter"),
    sqlite: sqlx::migrate!("./migrations-sqlite/dead_letter"),
};

#[derive(Clone)]
pub struct DeadLetters {
    pool: Pool,
    queues: Queues,
    signal: OutboxSignal,
    crash: Crash,
    admin_token: Option<String>,
    metrics: ldt_runtime::metrics::Metrics,
}

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::DeadLetter, &MIGRATORS).await?;
    let signal = ctx.spawn_relay(Service::DeadLetter, pool.clone());
    let state = DeadLetters {
        pool: pool.clone(),
        queues: ctx.queues.clone(),
        signal,
        crash: ctx.crash(Service::DeadLetter),
        admin_token: ctx.settings.admin_token.clone(),
        metrics: ctx.metrics.clone(),
    };
    ctx.spawn_consumer(Service::DeadLetter, Arc::new(state.clone()));
    let router = OpenApiRouter::new()
        .routes(routes!(list_dead_letters))
        .routes(routes!(replay_dead_letter))
        .with_state(state);
    Ok(Started { router, pool })
}

impl Handler for DeadLetters {
    /// Stores whatever arrives; it never parks anything itself (there is nowhere further).
    async fn handle(&self, msg: &Incoming) -> Result<(), HandleError> {
        let id = msg
            .message_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let origin = msg
            .headers
            .get(ORIGIN_QUEUE_HEADER)
            .cloned()
            .unwrap_or_else(|| "unknown".into());
        let reason = msg
            .headers
            .get(REASON_HEADER)
            .cloned()
            .unwrap_or_else(|| "no reason given".into());
        self.park(&id, &origin, &reason, msg).await?;
        self.metrics.inc(
            "ldt_dead_letters_total",
            "Messages parked as dead letters, by the queue they came from.",
            &[("origin_queue", &origin)],
            1,
        );
        tracing::warn!(dead_letter = %id, %origin, %reason, "dead letter parked");
        Ok(())
    }
}

// The dead-letter service's storage: its `dead_letters` table, and the outbox a replay goes
// through.

/// What a replay found.
enum Replay {
    Missing,
    /// Parked from this queue, which is not one of this marketplace's.
    Foreign(String),
    /// Put in the outbox for its queue, marked replayed.
    Done(DeadLetter, ldt_runtime::outbox::OutboxBatch),
}

impl DeadLetters {
    /// Stores a dead letter. A message parked again (after a replay, or a redelivery) is
    /// still one dead letter: it counts the times and forgets the replay.
    async fn park(
        &self,
        id: &str,
        origin: &str,
        reason: &str,
        msg: &Incoming,
    ) -> Result<(), sqlx::Error> {
        let headers = serde_json::to_string(&msg.headers).unwrap_or_default();
        self.crash.at(Point::BeforeCommit);
        sqlx::query(
            "INSERT INTO dead_letters (id, origin_queue, reason, payload, headers, parked_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, parked_ms = EXCLUDED.parked_ms, \
             times_parked = dead_letters.times_parked + 1, replayed_ms = NULL",
        )
        .bind(id)
        .bind(origin)
        .bind(reason)
        .bind(&msg.payload)
        .bind(headers)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.crash.at(Point::AfterCommit);
        Ok(())
    }

    /// The `limit` most recently parked, oldest first.
    async fn recent(&self, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT * FROM (SELECT * FROM dead_letters ORDER BY seq DESC LIMIT $1) recent ORDER BY seq",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    /// Puts dead letter `id` back in the outbox for the queue it came from and marks it
    /// replayed, in one transaction (the row is locked meanwhile, so two replays at once
    /// send it once each, one after the other, never half).
    async fn replay(&self, id: &str) -> Result<Replay, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(LOCK_DEAD_LETTER.on(&tx))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(Replay::Missing);
        };
        let origin: String = row.try_get("origin_queue")?;
        // Only replay into this marketplace's own queues.
        if !self.queues.all().contains(&origin) {
            return Ok(Replay::Foreign(origin));
        }
        let payload: Vec<u8> = row.try_get("payload")?;
        let headers: String = row.try_get("headers")?;
        let traceparent =
            serde_json::from_str::<std::collections::BTreeMap<String, String>>(&headers)
                .ok()
                .and_then(|h| h.get(TRACEPARENT_HEADER).cloned());
        let mut outbox = ldt_runtime::outbox::OutboxBatch::default();
        outbox.push_row(ldt_runtime::outbox::OutboxRow {
            queue: origin,
            message_id: id.to_owned(),
            payload,
            traceparent,
        });
        outbox.write(&mut tx).await?;
        let row = sqlx::query("UPDATE dead_letters SET replayed_ms = $2 WHERE id = $1 RETURNING *")
            .bind(id)
            .bind(now_ms())
            .fetch_one(&mut *tx)
            .await?;
        self.crash.commit(tx).await?;
        Ok(Replay::Done(dead_letter_from_row(&row)?, outbox))
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: String,
    /// The queue it was taken from (and is replayed to).
    pub origin_queue: String,
    pub reason: String,
    /// The message as received (lossy UTF-8).
    pub payload: String,
    pub times_parked: i32,
    pub parked_at_ms: i64,
    /// Set once replayed; cleared if it comes back.
    pub replayed_at_ms: Option<i64>,
}

fn dead_letter_from_row(row: &ldt_runtime::db::DbRow) -> Result<DeadLetter, sqlx::Error> {
    let payload: Vec<u8> = row.try_get("payload")?;
    Ok(DeadLetter {
        id: row.try_get("id")?,
        origin_queue: row.try_get("origin_queue")?,
        reason: row.try_get("reason")?,
        payload: String::from_utf8_lossy(&payload).into_owned(),
        times_parked: row.try_get("times_parked")?,
        parked_at_ms: row.try_get("parked_ms")?,
        replayed_at_ms: row.try_get("replayed_ms")?,
    })
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterQuery {
    /// At most this many, the most recent.
    #[param(minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<i64>,
}

/// Parked messages, oldest first.
#[utoipa::path(get, path = "/api/v1/dead-letters", tag = "dead-letter",
    params(DeadLetterQuery),
    responses((status = 200, body = [DeadLetter])))]
async fn list_dead_letters(
    State(state): State<DeadLetters>,
    ApiQuery(q): ApiQuery<DeadLetterQuery>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    let limit = page_limit(q.limit, 100)?;
    Ok(Json(state.recent(limit).await?))
}

/// Sends a parked message back to the queue it came from.
#[utoipa::path(post, path = "/api/v1/dead-letters/{id}/replay", tag = "dead-letter",
    params(("id" = String, Path, description = "Dead letter id")),
    responses((status = 200, body = DeadLetter), (status = 404, body = ldt_runtime::http::ErrorBody),
              (status = 422, body = ldt_runtime::http::ErrorBody)))]
async fn replay_dead_letter(
    State(state): State<DeadLetters>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<DeadLetter>, ApiError> {
    ldt_runtime::http::require_admin(state.admin_token.as_deref(), &headers)?;
    match state.replay(&id).await? {
        Replay::Missing => Err(ApiError::NotFound(format!("no dead letter {id:?}"))),
        Replay::Foreign(origin) => Err(ApiError::Invalid(format!(
            "dead letter {id:?} came from {origin:?}, which is not a queue of this marketplace"
        ))),
        Replay::Done(letter, outbox) => {
            state.signal.committed(outbox);
            tracing::info!(dead_letter = %id, origin = %letter.origin_queue, "dead letter replayed");
            Ok(Json(letter))
        }
    }
}
