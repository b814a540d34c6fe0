//! The services, one module each: domain, store (SQL), message handler and HTTP routes.
//! A service depends on the shared plumbing (`step` for the step services, `plan` for the
//! saga's steps and their commands), never on another service.

pub mod dead_letter;
pub mod delivery;
pub mod inventory;
pub mod orchestrator;
pub mod order;
pub mod payment;
pub mod plan;
pub mod step;

use ldt_contract::Service;

/// A service's migrations, for both backends.
pub fn migrators(service: Service) -> &'static ldt_runtime::db::Migrators {
    match service {
        Service::Order => &order::MIGRATORS,
        Service::Orchestrator => &orchestrator::MIGRATORS,
        Service::Payment => &payment::MIGRATORS,
        Service::Inventory => &inventory::MIGRATORS,
        Service::Delivery => &delivery::MIGRATORS,
        Service::DeadLetter => &dead_letter::MIGRATORS,
    }
}
