-- A client key's credits (issue 31), as granted: the value last set (`credits_to`; NULL:
-- the key is unmetered), the set's sequence number (grows with every set, also across
-- removals, so the edge's Durable Object never mistakes a new set for an old one), the
-- credits added since that set (only grows: a top-up is one atomic addition) and the
-- refill rule (JSON; NULL: none). What was spent is the edge's: the key's Durable Object.
ALTER TABLE api_keys ADD COLUMN credits_set BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN credits_to BIGINT;
ALTER TABLE api_keys ADD COLUMN credits_added BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN credits_refill TEXT;
