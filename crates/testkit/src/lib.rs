//! What the tests and the tools share to drive a marketplace from outside: its invariants,
//! checked through the services' own APIs.

pub mod check;
