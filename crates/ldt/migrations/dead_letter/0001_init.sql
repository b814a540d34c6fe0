-- Messages some service could not process, kept for inspection and replay.
CREATE TABLE dead_letters (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    origin_queue TEXT    NOT NULL,
    reason       TEXT    NOT NULL,
    payload      BYTEA   NOT NULL,
    headers      TEXT    NOT NULL,
    times_parked INTEGER NOT NULL DEFAULT 1,
    parked_ms    BIGINT  NOT NULL,
    replayed_ms  BIGINT
);

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
