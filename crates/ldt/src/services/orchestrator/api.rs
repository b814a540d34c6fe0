//! The orchestrator's HTTP API: a saga with its log, the sagas by phase and age (what is
//! stuck, what has been compensating for long), and an operator's retry of a stuck
//! compensation.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use ldt_runtime::http::{ApiError, ErrorBody, page_limit, require_admin};
use serde::{Deserialize, Serialize};
use utoipa::IntoParams;
use uuid::Uuid;

use super::handler::Orchestrator;
use super::saga::{Event, Phase};
use super::store::{self, SagaFilter, SagaView};

#[derive(Clone)]
pub struct ApiState {
    pub orchestrator: Orchestrator,
    pub admin_token: Option<String>,
}

fn order_id(text: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(text).map_err(|_| ApiError::NotFound(format!("no saga for order {text:?}")))
}

/// The saga of an order: its phase, what it still has to undo, why it is stuck if it is,
/// and its log of every command, answer, deadline and compensation.
#[utoipa::path(get, path = "/api/v1/sagas/{order_id}", tag = "orchestrator",
    params(("order_id" = Uuid, Path, description = "The order's id")),
    responses((status = 200, description = "The saga and its log", body = SagaView),
              (status = 404, description = "No saga for this order (yet)", body = ErrorBody)))]
pub async fn get_saga(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<SagaView>, ApiError> {
    let id = order_id(&id)?;
    store::saga_view(&state.orchestrator.pool, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no saga for order {id}")))
}

/// Which sagas to list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SagaQuery {
    /// Only sagas in this phase.
    #[param(inline)]
    pub phase: Option<PhaseParam>,
    /// `stuck`: only sagas whose compensation cannot succeed until an operator retries it.
    #[param(inline)]
    pub state: Option<StateParam>,
    /// Only sagas that have not changed for at least this many milliseconds.
    #[param(minimum = 0)]
    pub older_than_ms: Option<i64>,
    /// Page size.
    #[param(minimum = 1, maximum = 10000, default = 100)]
    pub limit: Option<i64>,
    /// Cursor: the `next` of the previous page.
    pub after: Option<Uuid>,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PhaseParam {
    Running,
    Compensating,
    Done,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateParam {
    Stuck,
}

/// A page of sagas, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SagaPage {
    pub sagas: Vec<SagaView>,
    /// Pass as `after` for the next page; absent on the last page.
    pub next: Option<Uuid>,
}

/// Sagas, oldest first, by phase, stuck or not, and how long they have been unchanged:
/// `?state=stuck` lists what waits for an operator, `?phase=compensating&older_than_ms=10000`
/// what has been compensating for longer than ten seconds.
#[utoipa::path(get, path = "/api/v1/sagas", tag = "orchestrator",
    params(SagaQuery),
    responses((status = 200, description = "A page of sagas", body = SagaPage),
              (status = 422, description = "An invalid filter", body = ErrorBody)))]
pub async fn list_sagas(
    State(state): State<ApiState>,
    query: ldt_runtime::http::ApiQuery<SagaQuery>,
) -> Result<Json<SagaPage>, ApiError> {
    let q = query.0;
    let limit = page_limit(q.limit, 100)?;
    if q.older_than_ms.is_some_and(|ms| ms < 0) {
        return Err(ApiError::Invalid(
            "older_than_ms must not be negative".into(),
        ));
    }
    let phase = q.phase.map(|p| match p {
        PhaseParam::Running => Phase::Running,
        PhaseParam::Compensating => Phase::Compensating,
        PhaseParam::Done => Phase::Done,
    });
    let filter = SagaFilter {
        phase,
        stuck: q.state.map(|StateParam::Stuck| true),
        unchanged_since_ms: q
            .older_than_ms
            .map(|ms| ldt_runtime::db::now_ms().saturating_sub(ms)),
        after: q.after,
        limit,
    };
    let (sagas, next) = store::list(&state.orchestrator.pool, filter).await?;
    Ok(Json(SagaPage { sagas, next }))
}

/// Tries the compensation in flight again now: for a saga that is stuck (its step gave up on
/// the compensation: mend the cause first) or whose compensation has gone unanswered.
/// `409` for a saga with nothing to retry.
#[utoipa::path(post, path = "/api/v1/sagas/{order_id}/retry", tag = "orchestrator",
    params(("order_id" = Uuid, Path, description = "The order's id")),
    security((), ("admin_token" = [])),
    responses((status = 202, description = "The compensation is sent again", body = SagaView),
              (status = 401, description = "The admin token is missing or wrong", body = ErrorBody),
              (status = 404, description = "No saga for this order", body = ErrorBody),
              (status = 409, description = "The saga has nothing to retry", body = ErrorBody)))]
pub async fn retry_saga(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(axum::http::StatusCode, Json<SagaView>), ApiError> {
    require_admin(state.admin_token.as_deref(), &headers)?;
    let id = order_id(&id)?;
    let orchestrator = &state.orchestrator;
    let Some(view) = store::saga_view(&orchestrator.pool, id).await? else {
        return Err(ApiError::NotFound(format!("no saga for order {id}")));
    };
    if view.phase != Phase::Compensating.as_str()
        || (view.stuck_reason.is_none() && view.attempts == 0)
    {
        return Err(ApiError::Conflict(format!(
            "the saga of order {id} has nothing to retry (phase {}, not stuck)",
            view.phase
        )));
    }
    match orchestrator.operator(id, Event::Retry).await? {
        Some(saga) if saga.stuck.is_none() => {}
        _ => {
            return Err(ApiError::Conflict(format!(
                "the saga of order {id} changed meanwhile; look again"
            )));
        }
    }
    let view = store::saga_view(&orchestrator.pool, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no saga for order {id}")))?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(view)))
}
