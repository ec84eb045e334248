-- The public halves of the keys the edge signs its assertions with (issue 30): published
-- in the JWKS until retired. The private half is shown once, when made, and never stored.
CREATE TABLE assertion_keys (
    kid           TEXT   PRIMARY KEY,
    alg           TEXT   NOT NULL,
    public_jwk    TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    retired_at_ms BIGINT
);
