-- Transactional outbox: every key create/delete writes its Workers KV update here in the
-- same transaction as the key row; a background drainer sends them and deletes the rows
-- only after KV accepted them, so an update is never lost, even if the process dies.
CREATE TABLE kv_outbox (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kv_key        TEXT    NOT NULL,                     -- the key's SHA-256 hex
    op            TEXT    NOT NULL CHECK (op IN ('put', 'delete')),
    value         TEXT,                                  -- the KV record, for put
    created_at_ms BIGINT  NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT
);
CREATE INDEX kv_outbox_by_key ON kv_outbox (kv_key, id);
