-- Resync and reconcile walk the keys in the byte order of their hashes, the order Workers
-- KV lists them in: these indexes serve that walk whatever the database's collation.
CREATE INDEX IF NOT EXISTS api_keys_by_hash_bytes ON api_keys (key_hash COLLATE "C");
CREATE INDEX IF NOT EXISTS retired_secrets_by_hash_bytes ON retired_secrets (key_hash COLLATE "C");

-- Where an interrupted `keys kv-resync` resumes: at most one row.
CREATE TABLE kv_resync (
    id            INT    PRIMARY KEY CHECK (id = 1),
    after_hash    TEXT   NOT NULL, -- every KV key up to this one has been written
    done          BIGINT NOT NULL, -- records written so far
    started_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
