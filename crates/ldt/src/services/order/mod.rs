//! The order service: the public order API (legacy and v1). It stores an order as PENDING
//! together with its `OrderPlaced` (and, with `--order-opens-saga`, the saga's first command:
//! the routing slip [`plan::opening`](crate::services::plan::opening) makes) in one
//! transaction, answers at once, and records the final status when the orchestrator says the
//! saga is over.
//!
//! - `domain`: the order, and the checks a request for one passes;
//! - `admission`: shedding new orders at the door under overload;
//! - `intake`: the group-commit writer of new orders;
//! - `store`: its tables;
//! - `service`: placing an order, finishing one;
//! - `handler`: the final statuses from the bus;
//! - `api`: the HTTP routes.

mod admission;
mod api;
mod domain;
mod flags;
mod handler;
mod intake;
mod service;
mod store;

use std::sync::Arc;

use ldt_contract::Service;
use ldt_runtime::context::{Context, Started};
use ldt_runtime::db::Held;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use store::MIGRATORS;

pub async fn start(ctx: &Context) -> anyhow::Result<Started> {
    let pool = ctx.open_db(Service::Order, &MIGRATORS).await?;
    let signal = ctx.spawn_relay(Service::Order, pool.clone());
    let conns = Arc::new(Held::new(&pool, 3));
    let crash = ctx.crash(Service::Order);
    let admission =
        admission::Admission::new(ctx.settings.max_pending, ctx.settings.target_latency())
            .with_shutdown(ctx.shutdown.clone());
    let writers = if ldt_runtime::db::is_sqlite(&pool) {
        1
    } else {
        intake::INTAKE_WRITERS_POSTGRES
    };
    let (intake, writer) = intake::Intake::new(
        intake::GroupWrites {
            pool: pool.clone(),
            conns: conns.clone(),
            crash,
            signal: signal.clone(),
            admission: admission.clone(),
        },
        writers,
        std::time::Duration::from_millis(u64::from(ctx.settings.intake_linger_ms.unwrap_or(
            if ldt_runtime::db::is_sqlite(&pool) {
                ldt_runtime::configuration::DEFAULT_INTAKE_LINGER_MS_SQLITE
            } else {
                ldt_runtime::configuration::DEFAULT_INTAKE_LINGER_MS
            },
        ))),
    );
    ctx.tasks.spawn(writer.run(ctx.shutdown.clone()));
    ctx.tasks.spawn(
        admission
            .clone()
            .refresh(pool.clone(), ctx.shutdown.clone()),
    );
    let flags = flags::FlagsCache::default();
    if ctx.settings.fault_injection {
        ctx.tasks
            .spawn(flags.clone().follow(pool.clone(), ctx.shutdown.clone()));
    }
    let (events, _) = tokio::sync::broadcast::channel(1024);
    let state = service::OrderState {
        conns,
        pool: pool.clone(),
        queues: ctx.queues.clone(),
        signal,
        crash,
        fault_injection: ctx.settings.fault_injection,
        opens_saga: ctx.settings.order_opens_saga,
        hold_placed: ctx.settings.step_timeout() / 2,
        admission,
        admission_wait: ctx.settings.admission_wait(),
        metrics: ctx.metrics.clone(),
        intake,
        admin_token: ctx.settings.admin_token.clone(),
        flags,
        events,
    };
    // Shared, not cloned: axum hands every request its own copy of the router's state, and
    // this one is a dozen fields (1.8 % of `ldt up`'s CPU at its peak went to copying and
    // dropping them).
    let state = Arc::new(state);
    ctx.spawn_consumer(Service::Order, state.clone());
    let router = OpenApiRouter::new()
        .routes(routes!(api::legacy_purchase))
        .routes(routes!(api::legacy_purchase_slash))
        .routes(routes!(api::legacy_all_transactions))
        .routes(routes!(api::create_order, api::list_orders))
        .routes(routes!(api::order_counts))
        .routes(routes!(api::order_events))
        .routes(routes!(api::get_order))
        .routes(routes!(api::get_faults, api::put_faults))
        .routes(routes!(api::cancel_order))
        .with_state(state);
    Ok(Started { router, pool })
}
