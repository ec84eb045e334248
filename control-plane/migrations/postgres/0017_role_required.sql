-- SQLite's 0017 refuses inserted rows with the legacy role (it cannot drop 0005's
-- DEFAULT 'legacy'). PostgreSQL dropped that default in 0005, so an insert without a role
-- already fails; nothing to do here but keep the two histories in step.
SELECT 1;
