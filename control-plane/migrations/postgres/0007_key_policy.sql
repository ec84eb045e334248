-- Keys can be switched off without losing them, and carry metadata for the origin.
-- disabled_at_ms: when the key was disabled; NULL: enabled (refused everywhere while set,
-- like an unknown key, and back when cleared).
ALTER TABLE api_keys ADD COLUMN disabled_at_ms BIGINT;
-- meta: a JSON object (compact, at most 1 KB), forwarded to the origin by the edge.
ALTER TABLE api_keys ADD COLUMN meta TEXT;
