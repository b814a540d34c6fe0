-- The SQLite twin of migrations/order/0002_console.sql.
ALTER TABLE orders ADD COLUMN fault_source TEXT;
ALTER TABLE orders ADD COLUMN trace_id TEXT;

CREATE TABLE fault_flags (
    step          TEXT    PRIMARY KEY,
    fail_percent  INTEGER NOT NULL CHECK (fail_percent BETWEEN 0 AND 100),
    stall_percent INTEGER NOT NULL CHECK (stall_percent BETWEEN 0 AND 100)
);
