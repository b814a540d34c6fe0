-- One row per order: what this step did for it (the idempotency key per order and step).
-- outcome: SUCCESS, INSUFFICIENT_*, UNKNOWN (failed), TIMEOUT (compensated before it acted).
CREATE TABLE ledger (
    order_id    TEXT    PRIMARY KEY,
    username    TEXT,
    quantity    BIGINT  NOT NULL CHECK (quantity >= 0),
    outcome     TEXT    NOT NULL,
    compensated BOOLEAN NOT NULL,
    created_ms  BIGINT  NOT NULL,
    updated_ms  BIGINT  NOT NULL
);
CREATE INDEX ledger_username ON ledger (username, created_ms);

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
