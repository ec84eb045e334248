-- 0005 gave `role` a DEFAULT of 'legacy' (every power) so that the keys of the time kept
-- working; PostgreSQL dropped that default at once, SQLite cannot drop a column default
-- without rebuilding the table (and its foreign keys). Instead: no key is ever inserted
-- with the legacy role (a row written without a role, by hand or by an older binary,
-- is refused rather than given every power).
CREATE TRIGGER api_keys_insert_needs_a_role BEFORE INSERT ON api_keys
WHEN NEW.role = 'legacy'
BEGIN
    SELECT RAISE(ABORT, 'a new key needs a role (client, edge or admin): legacy is only for keys made before roles');
END;
