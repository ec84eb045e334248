-- Requests of a key the edge refused, per hour and why (issue 31): rateLimited,
-- creditsExhausted, forbidden, disabled, expired. Admitted ones are key_usage's. Pruned
-- with it (USAGE_RETENTION_DAYS).
CREATE TABLE key_outcomes (
    key_id   BIGINT NOT NULL,
    hour     BIGINT NOT NULL,
    outcome  TEXT   NOT NULL,
    requests BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour, outcome)
);
CREATE INDEX key_outcomes_by_hour ON key_outcomes (hour);
