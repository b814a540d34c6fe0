-- The SQLite twin of migrations/dead_letter (the embedded mode). SQLite turns an integer overflow
-- into a REAL silently: the typeof() checks make it a constraint violation instead.

-- Messages some service could not process, kept for inspection and replay.
CREATE TABLE dead_letters (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    origin_queue TEXT    NOT NULL,
    reason       TEXT    NOT NULL,
    payload      BLOB    NOT NULL,
    headers      TEXT    NOT NULL,
    times_parked INTEGER NOT NULL DEFAULT 1,
    parked_ms    INTEGER NOT NULL,
    replayed_ms  INTEGER
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
