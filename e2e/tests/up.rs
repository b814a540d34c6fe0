//! The end-to-end suite against `ldt up` (every service in one process).
e2e::suite!(e2e::Mode::Up, broker);
