-- 0009 meant lists filtered by type to page on (key_type, created_at_ms, id), but 0001
-- had already made an index of that name without `id`, so its IF NOT EXISTS kept the old
-- one. Made again with the columns 0009 meant.
DROP INDEX IF EXISTS api_keys_by_type_created;
CREATE INDEX api_keys_by_type_created ON api_keys (key_type, created_at_ms, id);
