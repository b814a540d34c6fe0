//! The console: a web UI that every process serves at `/` (its assets are in the binary: no
//! CDN, it works offline), the configuration it reads, the metrics of every service it
//! reaches, and — in split mode — the API of the services this process does not run,
//! forwarded to where they answer (`--service-url order=http://…`), so that one address
//! serves the whole console.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ldt_contract::Service;
use ldt_runtime::http::ApiError;
use ldt_runtime::metrics::Metrics;
use serde::Serialize;

const INDEX: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");

/// Largest request body forwarded to another service.
const MAX_FORWARDED_BODY: usize = 1024 * 1024;

/// What the console needs to know of this process.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ConsoleConfig {
    pub version: &'static str,
    /// `embedded` (SQLite and the in-process bus) or `servers` (RabbitMQ or PostgreSQL).
    pub mode: &'static str,
    /// The services this process runs.
    pub services: Vec<&'static str>,
    /// The services this process reaches elsewhere (`--service-url`).
    pub remote_services: Vec<&'static str>,
    pub fault_injection: bool,
    /// Whether admin actions need `Authorization: Bearer <token>`.
    pub admin_token_required: bool,
    /// A link to an order's trace, `{trace_id}` standing for its id.
    pub trace_url_template: Option<String>,
}

#[derive(Clone)]
pub struct Console {
    pub config: ConsoleConfig,
    pub metrics: Metrics,
    /// Where the services this process does not run answer.
    pub remotes: BTreeMap<Service, String>,
    pub client: reqwest::Client,
}

impl Console {
    pub fn new(
        config: ConsoleConfig,
        metrics: Metrics,
        remotes: BTreeMap<Service, String>,
    ) -> Console {
        Console {
            config,
            metrics,
            remotes,
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(3))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The console's own routes.
    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route("/", get(index))
            .route("/console/app.js", get(app_js))
            .route("/console/app.css", get(app_css))
            .route("/console/config.json", get(config))
            .route("/console/metrics", get(metrics))
            .with_state(self)
    }
}

/// The service that answers a path of the API.
pub fn owner(path: &str) -> Option<Service> {
    let prefixes: [(&str, Service); 9] = [
        ("/api/purchase", Service::Order),
        ("/api/all-transaction", Service::Order),
        ("/api/v1/orders", Service::Order),
        ("/api/v1/faults", Service::Order),
        ("/api/v1/sagas", Service::Orchestrator),
        ("/api/v1/users", Service::Payment),
        ("/api/v1/inventory", Service::Inventory),
        ("/api/v1/deliveries", Service::Delivery),
        ("/api/v1/dead-letters", Service::DeadLetter),
    ];
    prefixes.iter().find_map(|(prefix, service)| {
        (path == *prefix || path.starts_with(&format!("{prefix}/"))).then_some(*service)
    })
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

async fn config(State(console): State<Console>) -> axum::Json<ConsoleConfig> {
    axum::Json(console.config)
}

/// This process's metrics and those of every service it reaches elsewhere, one after the
/// other (a service it cannot reach is left out, with a comment saying so).
async fn metrics(State(console): State<Console>) -> Response {
    let mut text = console.metrics.render();
    let mut seen = std::collections::BTreeSet::new();
    for (service, url) in &console.remotes {
        // Several services behind one address: read it once.
        if !seen.insert(url.clone()) {
            continue;
        }
        let got = console
            .client
            .get(format!("{url}/metrics"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match got {
            Ok(resp) if resp.status().is_success() => {
                if let Ok(body) = resp.text().await {
                    text.push_str(&body);
                }
            }
            _ => text.push_str(&format!("# {} unreachable at {url}\n", service.as_str())),
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// What no route took: a path of the API another service answers is forwarded to it; any
/// other is a JSON 404.
pub async fn fallback(State(console): State<Console>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let remote = owner(&path).and_then(|s| console.remotes.get(&s).cloned());
    match remote {
        Some(base) => match forward(&console.client, &base, req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        },
        None => ApiError::NotFound(format!("no route for {path}")).into_response(),
    }
}

/// Forwards a request to `base` and streams the answer back (an event stream included).
async fn forward(client: &reqwest::Client, base: &str, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let body = axum::body::to_bytes(body, MAX_FORWARDED_BODY)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge(format!(
                "a forwarded body is at most {MAX_FORWARDED_BODY} bytes"
            ))
        })?;
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
        .map_err(|_| ApiError::Invalid("unknown method".into()))?;
    let mut out = client.request(method, format!("{base}{path_and_query}"));
    for name in [
        header::CONTENT_TYPE,
        header::AUTHORIZATION,
        header::ACCEPT,
        header::HeaderName::from_static("idempotency-key"),
        header::HeaderName::from_static("traceparent"),
    ] {
        if let Some(value) = parts.headers.get(&name) {
            out = out.header(name.as_str(), value.as_bytes());
        }
    }
    let resp = out.body(body).send().await.map_err(|e| {
        ApiError::Unavailable(format!("the service at {base} does not answer: {e}"))
    })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = axum::http::HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::LOCATION,
        header::RETRY_AFTER,
        header::ALLOW,
        header::CACHE_CONTROL,
    ] {
        if let Some(value) = resp
            .headers()
            .get(name.as_str())
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            headers.insert(name, value);
        }
    }
    let chunks = futures_util::stream::unfold(resp, |mut resp| async move {
        match resp.chunk().await {
            Ok(Some(bytes)) => Some((Ok::<_, std::io::Error>(bytes), resp)),
            Ok(None) => None,
            Err(e) => Some((Err(std::io::Error::other(e)), resp)),
        }
    });
    Ok((status, headers, Body::from_stream(chunks)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_api_path_has_its_service() {
        assert_eq!(owner("/api/purchase/"), Some(Service::Order));
        assert_eq!(owner("/api/v1/orders/x/cancel"), Some(Service::Order));
        assert_eq!(owner("/api/v1/faults"), Some(Service::Order));
        assert_eq!(owner("/api/v1/sagas"), Some(Service::Orchestrator));
        assert_eq!(owner("/api/v1/users/ann"), Some(Service::Payment));
        assert_eq!(owner("/api/v1/inventory/restock"), Some(Service::Inventory));
        assert_eq!(owner("/api/v1/deliveries"), Some(Service::Delivery));
        assert_eq!(
            owner("/api/v1/dead-letters/1/replay"),
            Some(Service::DeadLetter)
        );
        assert_eq!(owner("/api/v1/ordersx"), None);
        assert_eq!(owner("/metrics"), None);
    }
}
