//! Wiring: connect to the broker, start the chosen services (each opens and migrates its own
//! database, starts its outbox relay and its consumer), serve their HTTP routes on one
//! listener, and drain everything on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use ldt_runtime::db::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::console::{Console, ConsoleConfig};
use crate::services;
use ldt_contract::{Queues, Service};
use ldt_runtime::bus::Bus;
use ldt_runtime::configuration::Settings;
use ldt_runtime::context::{Context, with_retry};
use ldt_runtime::metrics::Metrics;
use ldt_runtime::namespace::lock_data_dir;
use ldt_runtime::urls::redact;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Late-Day Tokens Marketplace",
        description = "Orders run as a saga (payment → inventory → delivery) across services \
                       that talk over RabbitMQ; failures are compensated in reverse order."
    ),
    paths(healthz, readyz)
)]
struct ApiDoc;

#[derive(Clone)]
struct Health {
    bus: Bus,
    pools: Vec<(Service, Pool)>,
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200)))]
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: the broker and every database of this process answer.
#[utoipa::path(get, path = "/readyz", tag = "health", responses((status = 200), (status = 503)))]
async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if let Some(problem) = health.bus.problem().await {
        problems.push(problem);
    }
    for (service, pool) in &health.pools {
        if sqlx::query("SELECT 1").execute(pool).await.is_err() {
            problems.push(format!("{} database unreachable", service.as_str()));
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
    } else {
        let message = format!("not ready: {}", problems.join("; "));
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"error": "not_ready", "message": message,
                                    "status": "not ready", "problems": problems})),
        )
    }
}

/// Prometheus text exposition of this process's metrics.
async fn render_metrics(State(metrics): State<Metrics>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

/// A server span per API request (HTTP semantic conventions), continuing the caller's trace
/// when it sends a `traceparent`.
async fn trace_http(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let method = req.method().as_str().to_owned();
    let span = tracing::info_span!(
        "http request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let parent = req
        .headers()
        .get(ldt_contract::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    ldt_runtime::telemetry::adopt(&span, parent.as_deref());
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// A running marketplace (or part of one).
pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    bus: Bus,
    limits: ldt_runtime::server::Limits,
    /// Held while running: two processes on one data directory would corrupt each other.
    _data_lock: Option<std::fs::File>,
}

/// The broker: RabbitMQ when a URL is set, else the in-process bus.
async fn connect_bus(settings: &Settings, queues: &Queues) -> anyhow::Result<Bus> {
    match &settings.amqp_url {
        Some(url) => {
            with_retry(
                &format!("RabbitMQ at {}", redact(url)),
                settings.startup_timeout(),
                || {
                    Bus::amqp_with(
                        url,
                        queues.all(),
                        ldt_runtime::bus::AmqpOptions {
                            expires_ms: settings.queue_expires_ms,
                            queue_type: settings.queue_type,
                            max_length: None,
                            io_loop: settings.amqp_io_loop,
                        },
                    )
                },
            )
            .await
        }
        None => {
            let journal = settings.bus_journal();
            Bus::embedded(journal.as_deref(), queues.all(), settings.bus_capacity)
                .await
                .context("opening the in-process bus")
        }
    }
}

impl Application {
    /// Starts `services` with `settings`, serving HTTP on `listener`.
    pub async fn build(
        services: &[Service],
        settings: Settings,
        listener: TcpListener,
    ) -> anyhow::Result<Application> {
        Self::build_with_metrics(services, settings, listener, Metrics::default()).await
    }

    /// Like [`build`](Self::build), recording into `metrics` (mirrored to OpenTelemetry).
    pub async fn build_with_metrics(
        services: &[Service],
        settings: Settings,
        listener: TcpListener,
        metrics: Metrics,
    ) -> anyhow::Result<Application> {
        let queues = Queues::new(&settings.namespace);
        let data_lock = lock_data_dir(&settings)?;
        let bus = connect_bus(&settings, &queues).await?;
        let ctx = Context {
            settings,
            metrics: metrics.clone(),
            bus: bus.clone(),
            queues,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let mut api = OpenApiRouter::with_openapi(ApiDoc::openapi());
        let mut pools = Vec::new();
        let mut unique: Vec<Service> = services.to_vec();
        unique.sort();
        unique.dedup();
        for &service in &unique {
            let started = match service {
                Service::Order => services::order::start(&ctx).await,
                Service::Orchestrator => services::orchestrator::start(&ctx).await,
                Service::Payment => services::payment::start(&ctx).await,
                Service::Inventory => services::inventory::start(&ctx).await,
                Service::Delivery => services::delivery::start(&ctx).await,
                Service::DeadLetter => services::dead_letter::start(&ctx).await,
            };
            let started = match started {
                Ok(s) => s,
                Err(e) => {
                    ctx.shutdown.cancel();
                    return Err(e.context(format!("starting the {} service", service.as_str())));
                }
            };
            api = api.merge(started.router);
            pools.push((service, started.pool));
            tracing::info!(service = service.as_str(), "service started");
        }
        let (router, openapi) = api.split_for_parts();
        let openapi = crate::openapi::finish(openapi, &ldt_contract::username_pattern());
        let health = Health {
            bus: bus.clone(),
            pools,
        };
        let remotes: std::collections::BTreeMap<Service, String> = ctx
            .settings
            .service_urls
            .iter()
            .filter(|(service, _)| !unique.contains(service))
            .cloned()
            .collect();
        let console = Console::new(
            ConsoleConfig {
                version: env!("CARGO_PKG_VERSION"),
                mode: if ctx.settings.amqp_url.is_some() || ctx.settings.database_url.is_some() {
                    "servers"
                } else {
                    "embedded"
                },
                services: unique.iter().map(|s| s.as_str()).collect(),
                remote_services: remotes.keys().map(|s| s.as_str()).collect(),
                fault_injection: ctx.settings.fault_injection,
                admin_token_required: ctx.settings.admin_token.is_some(),
                trace_url_template: ctx.settings.trace_url_template.clone(),
            },
            metrics.clone(),
            remotes,
        );
        let router = router
            .route_layer(axum::middleware::from_fn(trace_http))
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz).with_state(health))
            .route("/metrics", get(render_metrics).with_state(metrics))
            .merge(console.clone().router())
            .fallback(move |req: axum::extract::Request| {
                let console = console.clone();
                async move { crate::console::fallback(State(console), req).await }
            })
            .layer(axum::Extension(ctx.settings.body_limits()))
            .layer(axum::middleware::from_fn_with_state(
                ctx.settings.http_max_headers as usize,
                ldt_runtime::http::check_headers,
            ))
            .layer(axum::middleware::from_fn(ldt_runtime::http::json_errors));
        let limits = ctx.settings.http_limits();
        Ok(Application {
            listener,
            router,
            shutdown: ctx.shutdown,
            tasks: ctx.tasks,
            bus,
            limits,
            _data_lock: data_lock,
        })
    }

    /// The bus the services talk over (tests drive the services through it).
    pub fn bus(&self) -> Bus {
        self.bus.clone()
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener
            .local_addr()
            .context("reading the listener's address")
    }

    /// Serves until `signal` resolves, then stops taking requests, lets consumers finish
    /// what they hold, flushes the outboxes and returns.
    pub async fn run_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        let served = ldt_runtime::server::serve(
            self.listener,
            self.router,
            self.limits,
            async move {
                signal.await;
                tracing::info!("shutting down: draining in-flight work");
            },
            Duration::from_secs(10),
        )
        .await;
        shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(25), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background work did not finish within 25 s; exiting anyway");
        }
        // The consumers have stopped: their last acks go into the embedded bus's journal
        // before the process ends.
        if tokio::time::timeout(Duration::from_secs(5), self.bus.flush())
            .await
            .is_err()
        {
            tracing::warn!(
                "the bus journal did not take the last acks within 5 s; their messages will be delivered again"
            );
        }
        served.context("HTTP server failed")
    }
}
