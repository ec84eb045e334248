-- A row is not sent before this time (ms since the epoch; 0: at once). Used for the
-- second copy of every KV delete, sent a while later, so a put that the KV API applied
-- late (after our request to it timed out) cannot outlive the key's deletion.
ALTER TABLE kv_outbox ADD COLUMN not_before_ms BIGINT NOT NULL DEFAULT 0;
