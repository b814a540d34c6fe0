-- An order's held-back `OrderPlaced` (`--order-opens-saga`) is found by its message id, the
-- order's, and dropped unsent when the order is final first.
CREATE INDEX outbox_message_id ON outbox (message_id);
