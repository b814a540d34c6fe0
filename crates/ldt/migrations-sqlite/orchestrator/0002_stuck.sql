-- The SQLite twin of migrations/orchestrator/0003_stuck.sql.
ALTER TABLE sagas ADD COLUMN stuck_reason TEXT;
CREATE INDEX sagas_stuck ON sagas (order_id) WHERE stuck_reason IS NOT NULL;
CREATE INDEX sagas_open ON sagas (order_id) WHERE phase <> 'done';
