//! Late-Day Tokens Marketplace: an order saga over RabbitMQ and PostgreSQL.
//!
//! One binary, many roles: every service lives in [`services`] and is started by
//! [`startup::Application`] in whatever combination the command line asks for.

pub mod bench;
pub mod bus;
pub mod chaos;
pub mod check;
pub mod configuration;
pub mod contract;
pub mod crash;
pub mod db;
pub mod embedded_bus;
pub mod http;
pub mod messaging;
pub mod metrics;
pub mod probe;
pub mod rabbitmq;
pub mod services;
pub mod startup;
pub mod step;
pub mod telemetry;
