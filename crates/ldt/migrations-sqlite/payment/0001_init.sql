-- The SQLite twin of migrations/payment (the embedded mode). SQLite turns an integer overflow
-- into a REAL silently: the typeof() checks make it a constraint violation instead.

CREATE TABLE users (
    username   TEXT    PRIMARY KEY,
    credits    INTEGER NOT NULL CHECK (typeof(credits) = 'integer' AND credits >= 0),
    created_ms INTEGER NOT NULL
);

-- One row per order: what this step did for it (the idempotency key per order and step).
-- outcome: SUCCESS, INSUFFICIENT_*, UNKNOWN (failed), TIMEOUT (compensated before it acted).
-- compensated is 0 or 1 (SQLite has no BOOLEAN the Any driver reads).
CREATE TABLE ledger (
    order_id    TEXT    PRIMARY KEY,
    username    TEXT,
    quantity    INTEGER NOT NULL CHECK (typeof(quantity) = 'integer' AND quantity >= 0),
    outcome     TEXT    NOT NULL,
    compensated INTEGER NOT NULL CHECK (compensated IN (0, 1)),
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE INDEX ledger_username ON ledger (username, created_ms);

-- Messages this service emits, written in the same transaction as the state change that
-- emits them; the relay publishes and deletes them.
CREATE TABLE outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    queue       TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    traceparent TEXT,
    created_ms  INTEGER NOT NULL
);
