-- The SQLite twin of migrations/inventory (the embedded mode). SQLite turns an integer overflow
-- into a REAL silently: the typeof() checks make it a constraint violation instead.

-- The single stock of tokens (id = 1), seeded once by the service with the initial stock.
CREATE TABLE stock (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    initial   INTEGER NOT NULL CHECK (typeof(initial) = 'integer' AND initial >= 0),
    available INTEGER NOT NULL CHECK (typeof(available) = 'integer' AND available >= 0),
    restocked INTEGER NOT NULL DEFAULT 0 CHECK (typeof(restocked) = 'integer' AND restocked >= 0)
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
