-- A client key's permissions (issue 30), checked against the route policy at the edge and
-- by /api/v1/verify?permission=: space-separated (a permission holds no space), sorted,
-- no duplicates. NULL: none.
ALTER TABLE api_keys ADD COLUMN permissions TEXT;
