//! The end-to-end suite against two processes of every service running side by side:
//! competing consumers, deadlines firing once, outbox rows published once, migrations raced.
e2e::suite!(e2e::Mode::Replicas, broker);
