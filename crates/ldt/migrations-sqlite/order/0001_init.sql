-- The SQLite twin of migrations/order (the embedded mode). SQLite turns an integer overflow
-- into a REAL silently: the typeof() checks make it a constraint violation instead.

-- Orders as the public API sees them.
CREATE TABLE orders (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT    NOT NULL UNIQUE,
    username        TEXT    NOT NULL,
    price           INTEGER NOT NULL CHECK (typeof(price) = 'integer' AND price >= 0),
    amount          INTEGER NOT NULL CHECK (typeof(amount) = 'integer' AND amount > 0),
    faults          TEXT    NOT NULL,
    status          TEXT    NOT NULL,
    created_ms      INTEGER NOT NULL,
    finished_ms     INTEGER,
    idempotency_key TEXT    UNIQUE,
    request_hash    TEXT
);
CREATE INDEX orders_username ON orders (username, seq);
CREATE INDEX orders_status ON orders (status, seq);

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
