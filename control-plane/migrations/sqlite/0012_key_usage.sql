-- Requests per key per hour (hours since the epoch), added up by the usage flush: the
-- console's charts and GET /api/v1/keys/{name}/usage. Pruned after USAGE_RETENTION.
CREATE TABLE key_usage (
    key_id   BIGINT NOT NULL,
    hour     BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour)
);
CREATE INDEX key_usage_by_hour ON key_usage (hour);
