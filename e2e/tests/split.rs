//! The end-to-end suite against one `ldt serve <service>` process per service.
e2e::suite!(e2e::Mode::Split, broker);
