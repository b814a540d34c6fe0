//! Late-Day Tokens Marketplace: an order saga over RabbitMQ and PostgreSQL.
//!
//! One binary, many roles: every service lives in [`services`] and is started by
//! [`startup::Application`] in whatever combination the command line asks for. The services
//! stand on `ldt-runtime` and speak `ldt-contract`; none of them knows another.

pub mod console;
pub mod openapi;
pub mod services;
pub mod startup;
