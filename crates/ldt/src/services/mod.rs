//! The services, one module each: domain, store (SQL), message handler and HTTP routes.
//! A service depends on the shared plumbing, never on another service.

pub mod dead_letter;
pub mod delivery;
pub mod inventory;
pub mod orchestrator;
pub mod order;
pub mod payment;
