-- Why the compensation in flight cannot succeed (as its step service reported), while the
-- saga waits for an operator to retry it; NULL otherwise.
ALTER TABLE sagas ADD COLUMN stuck_reason TEXT;
CREATE INDEX sagas_stuck ON sagas (order_id) WHERE stuck_reason IS NOT NULL;
-- The sagas not yet done, for listing what is running or compensating.
CREATE INDEX sagas_open ON sagas (order_id) WHERE phase <> 'done';
