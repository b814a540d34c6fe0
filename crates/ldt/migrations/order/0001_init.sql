-- Orders as the public API sees them.
CREATE TABLE orders (
    seq             BIGSERIAL PRIMARY KEY,
    id              TEXT   NOT NULL UNIQUE,
    username        TEXT   NOT NULL,
    price           BIGINT NOT NULL CHECK (price >= 0),
    amount          BIGINT NOT NULL CHECK (amount > 0),
    faults          TEXT   NOT NULL,
    status          TEXT   NOT NULL,
    created_ms      BIGINT NOT NULL,
    finished_ms     BIGINT,
    idempotency_key TEXT   UNIQUE,
    request_hash    TEXT
);
CREATE INDEX orders_username ON orders (username, seq);
CREATE INDEX orders_status ON orders (status, seq);

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
