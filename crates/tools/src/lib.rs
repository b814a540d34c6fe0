//! The tools that drive a marketplace from outside, over its HTTP API (and the bus, only
//! where a tool must drop raw messages on a queue): `ldt bench`, `ldt chaos`, the operator's
//! commands (`ldt orders`, `ldt sagas`, `ldt dead-letters`) and the machine probe a benchmark
//! reads its host with.

pub mod bench;
pub mod chaos;
pub mod ctl;
pub mod probe;
