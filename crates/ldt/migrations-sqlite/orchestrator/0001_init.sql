-- The SQLite twin of migrations/orchestrator (the embedded mode). SQLite turns an integer overflow
-- into a REAL silently: the typeof() checks make it a constraint violation instead.

-- The saga of each order: where it is, what it decided, what it still has to undo.
-- phase: running (step in flight), compensating (pending_comp in flight, head first), done.
CREATE TABLE sagas (
    order_id     TEXT    PRIMARY KEY,
    username     TEXT    NOT NULL,
    price        INTEGER NOT NULL CHECK (typeof(price) = 'integer'),
    amount       INTEGER NOT NULL CHECK (typeof(amount) = 'integer'),
    faults       TEXT    NOT NULL,
    phase        TEXT    NOT NULL,
    step         TEXT    NOT NULL,
    status       TEXT,
    pending_comp TEXT    NOT NULL DEFAULT '',
    attempts     INTEGER NOT NULL DEFAULT 0,
    deadline_ms  INTEGER,
    created_ms   INTEGER NOT NULL,
    updated_ms   INTEGER NOT NULL,
    traceparent  TEXT
);
CREATE INDEX sagas_deadline ON sagas (deadline_ms) WHERE deadline_ms IS NOT NULL;

-- The step log: every command sent and every answer received, in order.
CREATE TABLE saga_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT    NOT NULL,
    step     TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    event    TEXT    NOT NULL,
    at_ms    INTEGER NOT NULL
);
CREATE INDEX saga_log_order ON saga_log (order_id, id);

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
