//! Wiring: connect to the broker, start the chosen services (each opens and migrates its own
//! database, starts its outbox relay and its consumer), serve their HTTP routes on one
//! listener, and drain everything on shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::db::Pool;
use anyhow::Context as _;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::bus::Bus;
use crate::configuration::Settings;
use crate::contract::{Queues, Service};
use crate::crash::Crash;
use crate::messaging::{self, Handler, OutboxSignal, Relay};
use crate::metrics::Metrics;
use crate::services;

/// What a service hands back once running: its routes and its database (for readiness).
pub struct Started {
    pub router: OpenApiRouter,
    pub pool: Pool,
}

/// Everything a service needs to start.
pub struct Context {
    pub settings: Settings,
    pub metrics: Metrics,
    pub bus: Bus,
    pub queues: Queues,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

/// Retries `attempt` with backoff until it succeeds or `timeout` has passed, logging each
/// failure, so that services started before their broker or database still come up.
async fn with_retry<T, E, F, Fut>(
    what: &str,
    timeout: Duration,
    mut attempt: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() + delay < timeout => {
                tracing::warn!(error = %e, retry_in = ?delay, "{what} not available yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => anyhow::bail!("{what}: {e} (gave up after {:.0?})", started.elapsed()),
        }
    }
}

impl Context {
    /// Opens (creating and migrating if needed) the service's own database.
    pub async fn open_db(
        &self,
        service: Service,
        migrators: &crate::db::Migrators,
    ) -> anyhow::Result<Pool> {
        let name = self.settings.database_name(service);
        let backend = self.settings.backend();
        let what = backend.describe(&name);
        let pool = with_retry(&what, self.settings.startup_timeout(), || {
            crate::db::open(&backend, &name, migrators, self.settings.db_pool_size)
        })
        .await?;
        if !crate::db::is_sqlite(&pool) {
            self.tasks.spawn(crate::db::vacuum_if_autovacuum_is_off(
                pool.clone(),
                service.as_str(),
                self.shutdown.clone(),
            ));
        }
        Ok(pool)
    }

    /// Starts the service's outbox relay; the returned signal hands it committed rows.
    pub fn spawn_relay(&self, service: Service, pool: Pool) -> OutboxSignal {
        let (signal, committed) = OutboxSignal::new();
        let relay = Relay {
            conns: crate::db::Held::new(&pool, 1),
            pool,
            bus: self.bus.clone(),
            service: service.as_str(),
            crash: self.crash(service),
            duplicate_every: self.settings.chaos_duplicate_every,
            bundle_max: usize::from(self.settings.bundle_max),
            published: Default::default(),
            metrics: self.metrics.clone(),
        };
        self.tasks
            .spawn(relay.run(committed, self.shutdown.clone()));
        signal
    }

    /// The crash point armed for `service`, if any.
    pub fn crash(&self, service: Service) -> Crash {
        Crash::for_service(self.settings.crash_point, service)
    }

    /// Starts consuming the service's queue.
    pub fn spawn_consumer<H: Handler>(&self, service: Service, handler: Arc<H>) {
        self.tasks.spawn(messaging::consume(
            messaging::Consumer {
                bus: self.bus.clone(),
                queues: self.queues.clone(),
                queue: self.queues.of(service),
                service: service.as_str(),
                prefetch: self.settings.prefetch,
                batches_in_flight: usize::from(self.settings.batches_in_flight),
                metrics: self.metrics.clone(),
            },
            handler,
            self.shutdown.clone(),
        ));
        // Consumer lag: how many messages wait in the queue.
        let (bus, queue, metrics, shutdown) = (
            self.bus.clone(),
            self.queues.of(service),
            self.metrics.clone(),
            self.shutdown.clone(),
        );
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = shutdown.cancelled() => return,
                }
                if let Ok(depth) = bus.queue_depth(&queue).await {
                    metrics.set(
                        "ldt_consumer_lag_messages",
                        "Messages waiting in a service's queue.",
                        &[("queue", &queue)],
                        i64::from(depth),
                    );
                }
            }
        });
    }
}

/// Hides the password of a URL before it goes into a message.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

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
    if !health.bus.ping().await {
        problems.push("broker unreachable".to_owned());
    }
    for (service, pool) in &health.pools {
        if sqlx::query("SELECT 1").execute(pool).await.is_err() {
            problems.push(format!("{} database unreachable", service.as_str()));
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "problems": problems})),
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
        .get(crate::contract::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    crate::telemetry::adopt(&span, parent.as_deref());
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
                        crate::bus::QueueOptions {
                            expires_ms: settings.queue_expires_ms,
                            queue_type: Some(settings.queue_type.clone()),
                            max_length: None,
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

/// Takes the data directory's lock for the namespace, when the settings keep files there.
fn lock_data_dir(settings: &Settings) -> anyhow::Result<Option<std::fs::File>> {
    if !settings.uses_data_dir() {
        return Ok(None);
    }
    let dir = &settings.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let path = dir.join(format!("{}.lock", settings.namespace));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another ldt process is using the data directory {} (namespace {:?}); stop it, \
             or give this one another --data-dir or --namespace",
            dir.display(),
            settings.namespace
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow::Error::new(e).context(format!("locking {}", path.display())))
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
        let health = Health {
            bus: bus.clone(),
            pools,
        };
        let router = router
            .route_layer(axum::middleware::from_fn(trace_http))
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz).with_state(health))
            .route("/metrics", get(render_metrics).with_state(metrics));
        Ok(Application {
            listener,
            router,
            shutdown: ctx.shutdown,
            tasks: ctx.tasks,
            bus,
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
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move {
                signal.await;
                tracing::info!("shutting down: draining in-flight work");
            })
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

/// Drops every database and deletes every queue of the settings' namespace (the embedded
/// mode's files in the data directory included).
pub async fn purge(settings: &Settings) -> anyhow::Result<()> {
    let _lock = lock_data_dir(settings)?;
    let backend = settings.backend();
    for service in Service::ALL {
        let name = settings.database_name(service);
        crate::db::drop_database(&backend, &name)
            .await
            .with_context(|| format!("dropping {}", backend.describe(&name)))?;
    }
    match &settings.amqp_url {
        Some(url) => {
            let queues = Queues::new(&settings.namespace);
            // Declare nothing: a declaration with other arguments than the queue's would fail.
            let bus = Bus::amqp(url, Vec::new(), None)
                .await
                .context("connecting to RabbitMQ")?;
            bus.delete_queues(&queues.all())
                .await
                .context("deleting queues")?;
        }
        None => {
            if let Some(journal) = settings.bus_journal() {
                for suffix in ["", "-wal", "-shm"] {
                    let mut path = journal.clone().into_os_string();
                    path.push(suffix);
                    match std::fs::remove_file(&path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            return Err(anyhow::Error::new(e).context(format!(
                                "deleting {}",
                                std::path::Path::new(&path).display()
                            )));
                        }
                    }
                }
            }
        }
    }
    if settings.uses_data_dir() {
        let _ = std::fs::remove_file(
            settings
                .data_dir
                .join(format!("{}.lock", settings.namespace)),
        );
    }
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("amqp://guest:guest@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(
            super::redact("postgres://postgres@h:5432"),
            "postgres://postgres@h:5432"
        );
    }
}
