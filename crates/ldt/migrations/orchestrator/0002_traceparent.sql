-- The trace context of the order, so work the orchestrator starts by itself (a deadline)
-- stays in the order's trace.
ALTER TABLE sagas ADD COLUMN traceparent TEXT;
