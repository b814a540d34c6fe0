//! The orchestrator: the only service that knows the saga's order. It starts each order on
//! a routing slip — the debit carries the reserve and the deliver after it, and each step
//! that succeeds sends the next command on itself — so a successful order costs the
//! orchestrator two messages (the order placed, the last step's answer), not four. It owns
//! the deadline and the compensations, and an operator can retry a stuck compensation or
//! cancel a running order.
//!
//! - [`saga`]: the saga as a pure function (no I/O): what each event does to it;
//! - `store`: its tables, written in batches, and the deadline claim;
//! - `handler`: messages, deadlines and operators' actions through the saga into the store;
//! - `api`: its HTTP routes.
//!
//! All saga state is in its database (`sagas`, `saga_log`), changed only in transactions that
//! also write the outgoing commands to the outbox, so a restart resumes every saga where it
//! was. Deadlines are rows too (`deadline_ms`): a poller claims due sagas with
//! `FOR UPDATE SKIP LOCKED`, so a deadline fires once even with several replicas, and an
//! answer that races with its deadline is serialised by the row lock.

mod api;
mod handler;
pub mod saga;
mod store;

use std::sync::Arc;

use ldt_contract::Service;
use ldt_runtime::context::{Context, Started};
use ldt_runtime::db::Held;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use handler::Orchestrator;

pub static MIGRATORS: ldt_runtime::db::Migrators = ldt_runtime::db::Migrators {
    postgres: sqlx::migrate!("./migrations/orchestrator"),
    sqlite: sqlx::migrate!("./migrations-sqlite/orchestrator"),
};

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::Orchestrator, &MIGRATORS).await?;
    let signal = ctx.spawn_relay(Service::Orchestrator, pool.clone());
    let step_timeout_ms =
        i64::try_from(ctx.settings.step_timeout().as_millis()).unwrap_or(i64::MAX);
    let orchestrator = Orchestrator {
        conns: Arc::new(Held::new(&pool, 3)),
        pool: pool.clone(),
        queues: ctx.queues.clone(),
        signal,
        policy: saga::Policy::new(step_timeout_ms),
        crash: ctx.crash(Service::Orchestrator),
        metrics: ctx.metrics.clone(),
    };
    ctx.spawn_consumer(Service::Orchestrator, Arc::new(orchestrator.clone()));
    let poller = orchestrator.clone();
    let shutdown = ctx.shutdown.clone();
    ctx.tasks
        .spawn(async move { poller.run_deadlines(shutdown).await });
    let router = OpenApiRouter::new()
        .routes(routes!(api::list_sagas))
        .routes(routes!(api::get_saga))
        .routes(routes!(api::retry_saga))
        .with_state(api::ApiState {
            orchestrator,
            admin_token: ctx.settings.admin_token.clone(),
        });
    Ok(Started { router, pool })
}
