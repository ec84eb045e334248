-- Identities (issue 31): a customer, named by an externalId the user chooses, owning any
-- number of keys, with meta and optionally credits and named rate limits that all its keys
-- share (columns as on api_keys; rate_limits as "name=requests/period,…").
CREATE TABLE identities (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id       TEXT   NOT NULL UNIQUE,
    meta              TEXT,
    created_at_ms     BIGINT NOT NULL,
    rate_limits       TEXT   NOT NULL DEFAULT '',
    credits_set       BIGINT NOT NULL DEFAULT 0,
    credits_to        BIGINT,
    credits_added     BIGINT NOT NULL DEFAULT 0,
    credits_refill    TEXT
);
CREATE INDEX identities_by_created ON identities (created_at_ms, id);

-- The identity a key belongs to, and what of it the key's edge record carries (JSON: the
-- record's identity, identityCredits and identityLimits fields), kept in step with the
-- identity by the same transaction that changes it, so a key's record needs no join.
ALTER TABLE api_keys ADD COLUMN identity_id BIGINT REFERENCES identities (id);
ALTER TABLE api_keys ADD COLUMN identity_record TEXT;
CREATE INDEX api_keys_by_identity ON api_keys (identity_id);
