-- The revocation feed (issue 29): every change that must stop or change a secret at the
-- edge, numbered in commit order. `seq` comes from the one counter row, locked by each
-- writing transaction until it commits, so numbers follow commit order without gaps and a
-- reader that has seen N has seen everything up to N. Hashes and records only (a record is
-- what the edge already holds in KV: never a secret); rows past the feed's window are
-- deleted.
CREATE TABLE feed_counter (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT  NOT NULL
);
INSERT INTO feed_counter (id, seq) VALUES (1, 0);

CREATE TABLE revocation_feed (
    seq      BIGINT PRIMARY KEY,
    key_hash TEXT   NOT NULL,
    -- The secret's record from now on (a change that narrows or restores it); NULL: the
    -- secret is refused (deleted, disabled, revoked, out of traffic).
    record   TEXT,
    at_ms    BIGINT NOT NULL
);
CREATE INDEX revocation_feed_by_time ON revocation_feed (at_ms);
