//! The end-to-end suite against the mixed modes of `ldt up`: RabbitMQ with SQLite files, and
//! PostgreSQL with the in-process bus.
mod broker_with_sqlite {
    e2e::suite!(e2e::Mode::BrokerWithSqlite, broker);
}

mod postgres_with_embedded_bus {
    e2e::suite!(e2e::Mode::PostgresWithEmbeddedBus);
}
