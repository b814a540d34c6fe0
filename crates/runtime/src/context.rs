//! What a service is given to start: the settings, the bus, the queue names, metrics, the
//! shutdown signal and a tracker for its tasks, with the helpers every service uses to open
//! its database, start its outbox relay and consume its queue.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldt_contract::{Queues, Service};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use utoipa_axum::router::OpenApiRouter;

use crate::bus::Bus;
use crate::configuration::Settings;
use crate::consumer::Handler;
use crate::crash::Crash;
use crate::db::Pool;
use crate::metrics::Metrics;
use crate::outbox::OutboxSignal;
use crate::relay::Relay;

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
pub async fn with_retry<T, E, F, Fut>(
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
    let deadline = started + timeout;
    let mut delay = Duration::from_millis(200);
    loop {
        match attempt().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                // Up to the whole timeout: the last wait is cut to what is left of it.
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    anyhow::bail!("{what}: {e} (gave up after {:.1?})", started.elapsed());
                }
                let wait = delay.min(left);
                tracing::warn!(error = %e, retry_in = ?wait, "{what} not available yet");
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
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
        let backend = self.settings.backend_for(service);
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
        } else if let Some(file) = crate::db::sqlite_file(&backend, &name) {
            self.tasks.spawn(crate::db::checkpoint_sqlite(
                file,
                what,
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
        self.tasks.spawn(crate::consumer::consume(
            crate::consumer::Consumer {
                bus: self.bus.clone(),
                queues: self.queues.clone(),
                queue: self.queues.of(service),
                service: service.as_str(),
                prefetch: self.settings.prefetch,
                batches_in_flight: usize::from(self.settings.batches_in_flight),
                linger: Duration::from_millis(u64::from(self.settings.linger_ms)),
                max_attempts: self.settings.max_attempts,
                metrics: self.metrics.clone(),
                attempts: Default::default(),
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
