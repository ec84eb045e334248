-- The route policy the edge enforces (issue 30): every version ever set, the current one
-- the highest. `document` is the canonical JSON an administrator reads back; `lines` the
-- compact text the edge reads (`shared::policy::RoutePolicy::to_lines`). `feed_seq` is the
-- revocation-feed event that carried the change to the edge.
CREATE TABLE route_policy (
    version       BIGINT PRIMARY KEY,
    document      TEXT   NOT NULL,
    lines         TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    actor         TEXT,
    feed_seq      BIGINT NOT NULL
);
