-- Key lifecycle: expiry, last use, secrets kept alive by a roll's overlap, audit log.
ALTER TABLE api_keys ADD COLUMN expires_at_ms BIGINT;   -- whole seconds; NULL: never
ALTER TABLE api_keys ADD COLUMN last_used_ms BIGINT;    -- coalesced, at most once a minute

-- A roll gives the key a new secret; the old one stays valid until retires_at_ms.
CREATE TABLE retired_secrets (
    key_hash      TEXT   PRIMARY KEY,
    key_id        BIGINT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    identifier    TEXT   NOT NULL,
    retires_at_ms BIGINT NOT NULL
);
CREATE INDEX retired_secrets_by_key ON retired_secrets (key_id);

-- Who did what, when, from where. Never a secret.
CREATE TABLE audit_log (
    id     BIGSERIAL PRIMARY KEY,
    at_ms  BIGINT NOT NULL,
    actor  TEXT,            -- the calling key's name; NULL when unauthenticated or local CLI
    action TEXT   NOT NULL, -- key.create, key.delete, key.roll, auth.failed
    target TEXT,            -- the key name acted on
    ip     TEXT,
    detail TEXT   NOT NULL  -- JSON object
);
