-- As SQLite's 0017: no key is ever inserted with the legacy role (every power; only keys
-- made before roles have it). PostgreSQL already dropped 0005's DEFAULT 'legacy', so a
-- row without a role fails NOT NULL; this also refuses one that names it.
CREATE FUNCTION api_keys_insert_needs_a_role() RETURNS trigger AS $$
BEGIN
    IF NEW.role = 'legacy' THEN
        RAISE EXCEPTION 'a new key needs a role (client, edge or admin): legacy is only for keys made before roles';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER api_keys_insert_needs_a_role BEFORE INSERT ON api_keys
FOR EACH ROW EXECUTE FUNCTION api_keys_insert_needs_a_role();
