-- The saga of each order: where it is, what it decided, what it still has to undo.
-- phase: running (step in flight), compensating (pending_comp in flight, head first), done.
CREATE TABLE sagas (
    order_id     TEXT    PRIMARY KEY,
    username     TEXT    NOT NULL,
    price        BIGINT  NOT NULL,
    amount       BIGINT  NOT NULL,
    faults       TEXT    NOT NULL,
    phase        TEXT    NOT NULL,
    step         TEXT    NOT NULL,
    status       TEXT,
    pending_comp TEXT    NOT NULL DEFAULT '',
    attempts     INTEGER NOT NULL DEFAULT 0,
    deadline_ms  BIGINT,
    created_ms   BIGINT  NOT NULL,
    updated_ms   BIGINT  NOT NULL
);
CREATE INDEX sagas_deadline ON sagas (deadline_ms) WHERE deadline_ms IS NOT NULL;

-- The step log: every command sent and every answer received, in order.
CREATE TABLE saga_log (
    id       BIGSERIAL PRIMARY KEY,
    order_id TEXT   NOT NULL,
    step     TEXT   NOT NULL,
    kind     TEXT   NOT NULL,
    event    TEXT   NOT NULL,
    at_ms    BIGINT NOT NULL
);
CREATE INDEX saga_log_order ON saga_log (order_id, id);

-- Messages this service emits, written in the same transaction as the state change that
-- emits them; the relay publishes and deletes them.
CREATE TABLE outbox (
    id          BIGSERIAL PRIMARY KEY,
    queue       TEXT   NOT NULL,
    message_id  TEXT   NOT NULL,
    payload     BYTEA  NOT NULL,
    traceparent TEXT,
    created_ms  BIGINT NOT NULL
);
