//! HTTP plumbing shared by every service: the one API error type with its one status
//! mapping, a JSON extractor whose rejections are JSON errors too, and pagination limits.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Every error an HTTP handler returns.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all.
    #[error("{0}")]
    MalformedBody(String),
    /// The request is well-formed but asks for something invalid.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    /// Too much work in flight: shed at the door; the client should retry after a second.
    #[error("{0}")]
    Overloaded(String),
    /// A failure the request itself asked for (`kill_create`).
    #[error("{0}")]
    Injected(String),
    /// Something on our side failed; details go to the log, never to the client.
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

impl From<crate::consumer::HandleError> for ApiError {
    fn from(e: crate::consumer::HandleError) -> Self {
        match e {
            crate::consumer::HandleError::Transient(e) => ApiError::Internal(e),
            crate::consumer::HandleError::Poison(why) => ApiError::Internal(anyhow::anyhow!(why)),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(e.into())
    }
}

/// The JSON body of every error response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable machine-readable kind, e.g. `invalid_request`.
    pub error: &'static str,
    /// What was wrong, for a human.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind) = match &self {
            ApiError::MalformedBody(_) => (StatusCode::BAD_REQUEST, "malformed_request"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Injected(_) => (StatusCode::INTERNAL_SERVER_ERROR, "injected_fault"),
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::Internal(e) => {
                tracing::error!(error = ?e, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
            }
        };
        let body = ErrorBody {
            error: kind,
            message: self.to_string(),
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// `Json<T>` whose rejections (bad syntax, missing fields, wrong types, wrong content type)
/// are [`ApiError`]s naming the problem.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::Invalid(e.body_text())),
            Err(e) => Err(ApiError::MalformedBody(e.body_text())),
        }
    }
}

/// `Query<T>` whose rejections (a value of the wrong type, an unknown or repeated parameter)
/// are [`ApiError::Invalid`]s naming the problem, as JSON.
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::Invalid(format!(
                "invalid query string: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.body_text())
            ))),
        }
    }
}

/// Checks the admin bearer token when one is configured.
pub fn require_admin(token: Option<&str>, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = token else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare without an early exit so the time taken does not tell how much matched.
    let matches = given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if matches {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "this endpoint needs `Authorization: Bearer <admin token>`".into(),
        ))
    }
}

/// Largest page any list endpoint returns.
pub const MAX_PAGE: i64 = 10_000;

/// Clamps a requested page size.
pub fn page_limit(requested: Option<i64>, default: i64) -> Result<i64, ApiError> {
    match requested {
        None => Ok(default),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::Invalid(format!(
            "limit must be between 1 and {MAX_PAGE}, got {n}"
        ))),
    }
}
