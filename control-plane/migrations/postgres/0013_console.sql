-- Console sessions: the cookie's token is stored only as its SHA-256; the session acts as
-- the admin key it was opened with (looked up by that key's hash on every request, so a
-- deleted, disabled, expired or rolled key ends it). Ended by sign-out, the idle timeout
-- or the absolute lifetime.
CREATE TABLE console_sessions (
    token_hash   TEXT PRIMARY KEY,
    key_hash     TEXT NOT NULL,
    csrf_token   TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);
CREATE INDEX console_sessions_by_last_seen ON console_sessions (last_seen_ms);
-- The console's audit page filters by action and by actor, newest first.
CREATE INDEX audit_log_by_action ON audit_log (action, id);
CREATE INDEX audit_log_by_actor ON audit_log (actor, id);
