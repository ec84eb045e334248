-- Secrets reported as leaked while LEAK_REVOCATION=notify (so not revoked): the first
-- report is audited, later ones (GitHub's retries, a replayed report) only counted here,
-- so reports cannot add audit rows without bound. Hashes only, never a secret.
CREATE TABLE leak_notices (
    key_hash       TEXT   PRIMARY KEY,
    first_at_ms    BIGINT NOT NULL,
    last_at_ms     BIGINT NOT NULL,
    reports        BIGINT NOT NULL
);
