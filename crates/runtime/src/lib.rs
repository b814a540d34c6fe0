//! What the marketplace's services stand on: their settings and the [`context::Context`]
//! they start with, the bus (RabbitMQ or in process) and the reliable messaging on top of it
//! (outbox, relay, consumer loop), their databases, telemetry, metrics and HTTP errors.
//! Nothing here knows a service; the services know this.

pub mod bus;
pub mod configuration;
pub mod consumer;
pub mod context;
pub mod crash;
pub mod db;
pub mod http;
pub mod metrics;
pub mod namespace;
pub mod outbox;
pub mod relay;
pub mod server;
pub mod signal;
pub mod telemetry;
pub mod urls;
