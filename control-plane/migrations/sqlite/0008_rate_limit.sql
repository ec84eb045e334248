-- A key may carry a rate limit: at most rate_limit_requests per rate_limit_period_seconds,
-- enforced at the edge and on /api/v1/verify. Both NULL: no limit (both set or neither).
ALTER TABLE api_keys ADD COLUMN rate_limit_requests BIGINT;
ALTER TABLE api_keys ADD COLUMN rate_limit_period_seconds BIGINT;
