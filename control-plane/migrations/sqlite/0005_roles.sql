-- Roles: what a key may do (client: traffic; edge: the Worker's lookups and usage
-- reports; admin: key management and the audit log). Keys made before roles existed
-- become 'legacy': they keep every power they had, so an upgrade locks nobody out, until
-- an operator gives each one role (`metlo-control-plane keys set-role NAME ROLE`).
ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'legacy'
    CHECK (role IN ('client', 'edge', 'admin', 'legacy'));
CREATE INDEX api_keys_by_role ON api_keys (role);
