//! What the tests and the tools share to drive a marketplace from outside: its invariants,
//! checked through the services' own APIs, and a TCP proxy that injects network faults.

pub mod check;
pub mod client;
pub mod proxy;
