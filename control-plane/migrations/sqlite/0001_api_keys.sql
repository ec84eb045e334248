-- Keys are stored by hash only; the full key is never written anywhere.
CREATE TABLE api_keys (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL UNIQUE,
    key_hash      TEXT    NOT NULL UNIQUE,
    identifier    TEXT    NOT NULL,
    key_type      TEXT    NOT NULL CHECK (key_type IN ('GENERIC', 'ONBOARDING', 'GCP', 'AWS')),
    created_at_ms BIGINT  NOT NULL
);
CREATE INDEX api_keys_by_type_created ON api_keys (key_type, created_at_ms DESC);

-- One row counting the keys. Creating a key takes this row's lock first, so the
-- MAX_API_KEYS check and the insert are one serialized step (exact under concurrency).
CREATE TABLE key_quota (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    used BIGINT  NOT NULL CHECK (used >= 0)
);
INSERT INTO key_quota (id, used) VALUES (1, 0);
