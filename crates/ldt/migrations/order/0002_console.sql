-- Where an order's faults came from: the request ('request') or the runtime fault flags
-- ('flags'); NULL for an order without faults. And its trace, for the console's link.
ALTER TABLE orders ADD COLUMN fault_source TEXT;
ALTER TABLE orders ADD COLUMN trace_id TEXT;

-- The runtime fault flags: the share of new orders (without a fault of their own) whose
-- step fails or stalls, per step. Kept here so that every replica of the order service
-- applies the same.
CREATE TABLE fault_flags (
    step          TEXT    PRIMARY KEY,
    fail_percent  INTEGER NOT NULL CHECK (fail_percent BETWEEN 0 AND 100),
    stall_percent INTEGER NOT NULL CHECK (stall_percent BETWEEN 0 AND 100)
);
