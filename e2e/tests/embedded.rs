//! The end-to-end suite against `ldt up` with nothing configured: every service in one
//! process on SQLite files and the in-process bus (what a newcomer's first command runs).
//! The poison-message case needs a broker to drop a raw message on; the in-process bus's
//! dead-lettering is checked by the crate's transport and step suites.
e2e::suite!(e2e::Mode::Embedded);
