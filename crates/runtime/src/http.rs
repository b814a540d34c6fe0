//! HTTP plumbing shared by every service: the one API error type with its one status
//! mapping, a JSON extractor whose rejections are JSON errors too, and pagination limits.

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
    /// The marketplace is configured not to allow this.
    #[error("{0}")]
    Forbidden(String),
    /// The body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// The request carries more headers than this server takes.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The method is not one the path takes; the value is the `Allow` header.
    #[error("{message}")]
    MethodNotAllowed { message: String, allow: String },
    /// The body is larger than this server takes.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A service this one relies on does not answer; the client may retry.
    #[error("{0}")]
    Unavailable(String),
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
        // A database out of reach for a while (a restart, a failover) is the client's cue to
        // come back, not a bug: 503 with Retry-After, and nothing was done.
        if crate::db::is_transient(&e) {
            tracing::warn!(error = %e, "database unavailable; answering 503");
            ApiError::Unavailable("the database is unavailable for now; try again".into())
        } else {
            ApiError::Internal(e.into())
        }
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
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Injected(_) => (StatusCode::INTERNAL_SERVER_ERROR, "injected_fault"),
            ApiError::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::HeadersTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers_too_large",
            ),
            ApiError::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            }
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
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
        if let ApiError::MethodNotAllowed { allow, .. } = &self
            && let Ok(value) = axum::http::HeaderValue::from_str(allow)
        {
            response
                .headers_mut()
                .insert(axum::http::header::ALLOW, value);
        }
        if status == StatusCode::REQUEST_TIMEOUT {
            // What is left of the body is not read: the connection cannot carry another
            // request.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

/// How much of a request body the server reads, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: std::time::Duration,
}

impl Default for BodyLimits {
    fn default() -> BodyLimits {
        BodyLimits {
            max_bytes: 64 * 1024,
            timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// A JSON object body, read within the [`BodyLimits`] the server put in the request's
/// extensions. Unparseable JSON is `400`; valid JSON of the wrong shape or value (an array,
/// a string where a number goes, a number out of range, an unknown field) is `422`; a body
/// too large `413`; one that does not arrive in time `408`. (The content type is not
/// checked: the body is JSON or it is refused.)
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limits = req
            .extensions()
            .get::<BodyLimits>()
            .copied()
            .unwrap_or_default();
        // A body announced too large is refused before a byte of it is read.
        let announced = req
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limits.max_bytes as u64) {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request body is larger than {} bytes",
                limits.max_bytes
            )));
        }
        let read = axum::body::to_bytes(req.into_body(), limits.max_bytes);
        let bytes = match tokio::time::timeout(limits.timeout, read).await {
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {:?}",
                    limits.timeout
                )));
            }
            Ok(Err(_)) => {
                return Err(ApiError::PayloadTooLarge(format!(
                    "the request body is larger than {} bytes",
                    limits.max_bytes
                )));
            }
            Ok(Ok(bytes)) => bytes,
        };
        parse_json_object(&bytes).map(ApiJson)
    }
}

/// A JSON object body as `T`: see [`ApiJson`] for which error is which.
pub fn parse_json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    // Syntax first, then shape: serde reports some wrong values (an enum given a number) as
    // syntax errors when it reads straight into `T`.
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        if e.to_string().contains("number out of range") {
            // Valid JSON whose number no 64-bit value holds (`1e400`).
            ApiError::Invalid(format!("invalid body: {e}"))
        } else {
            ApiError::MalformedBody(format!("the body is not JSON: {e}"))
        }
    })?;
    // serde reads a struct from an array too (`["bob", 1, 1]`): not ours.
    if !value.is_object() {
        return Err(ApiError::Invalid("the body must be a JSON object".into()));
    }
    // The error names the field it is about (`price: invalid type: string "1", …`).
    serde_path_to_error::deserialize(value)
        .map_err(|e| ApiError::Invalid(format!("invalid body: {e}")))
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

/// Largest request head, all its headers together.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Refuses, with the JSON `431`, a request with more than `max` headers or a head larger than
/// [`MAX_HEADER_BYTES`].
pub async fn check_headers(
    axum::extract::State(max): axum::extract::State<usize>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let headers = req.headers();
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > max || size > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge(format!(
            "{} headers of {size} bytes; at most {max} headers of {MAX_HEADER_BYTES} bytes in all",
            headers.len()
        ))
        .into_response();
    }
    next.run(req).await
}

/// Gives every error response the one error shape: a `4xx`/`5xx` that is not JSON already
/// (a route that does not exist, a method a path does not take, a path or query the
/// extractors refused) becomes `{"error", "message"}` with the same status and headers.
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
        .unwrap_or_default();
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "headers_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        s if s.is_server_error() => "internal_error",
        _ => "malformed_request",
    };
    let message = if text.is_empty() || status.is_server_error() {
        status.canonical_reason().unwrap_or("error").to_lowercase()
    } else {
        text
    };
    let body = serde_json::to_vec(&ErrorBody {
        error: kind,
        message,
    })
    .unwrap_or_default();
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// JSON numbers for integer fields: an integer, or a number with no fractional part
/// (`538.0` is the integer 538 to JSON, whatever serde thinks); anything else, or out of
/// the field's range, is an error. Use with `#[serde(deserialize_with = "…")]`.
pub mod integer {
    /// A whole number, whether JSON wrote it `2` or `2.0`.
    struct Whole;

    impl serde::de::Visitor<'_> for Whole {
        type Value = i128;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<i128, E> {
            Ok(i128::from(n))
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<i128, E> {
            Ok(i128::from(n))
        }
        fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<i128, E> {
            if f.fract() == 0.0 && f.abs() < 1e20 {
                Ok(f as i128)
            } else {
                Err(E::custom(format!("expected an integer, got {f}")))
            }
        }
    }

    fn whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i128, D::Error> {
        d.deserialize_any(Whole)
    }

    pub fn i64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let n = whole(d)?;
        i64::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is out of range")))
    }

    pub fn u8<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
        let n = whole(d)?;
        u8::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} is out of range 0–255")))
    }
}

/// A field that must be a JSON object (serde would read a struct from an array too). Use
/// with `#[serde(deserialize_with = "ldt_runtime::http::object")]`.
pub fn object<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::Deserialize;
    let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
    serde_json::from_value(serde_json::Value::Object(map)).map_err(serde::de::Error::custom)
}
