-- Hashes of secrets that were ours and were revoked (their key deleted, or reported as
-- leaked): a leak report naming one again is a true positive, not an unknown token.
-- Hashes only, never a secret.
CREATE TABLE revoked_secrets (
    key_hash      TEXT   PRIMARY KEY,
    revoked_at_ms BIGINT NOT NULL
);
