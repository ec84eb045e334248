-- Lists page newest first by (created_at_ms, id): these indexes serve each page as a
-- range scan, whatever the number of keys.
CREATE INDEX IF NOT EXISTS api_keys_by_created ON api_keys (created_at_ms, id);
CREATE INDEX IF NOT EXISTS api_keys_by_type_created ON api_keys (key_type, created_at_ms, id);
