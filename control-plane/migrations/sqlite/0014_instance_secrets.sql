-- Secrets of this instance, made on first start and shared by every replica through the
-- database. `redis_record_key` authenticates the records kept in Redis (an HMAC), so a
-- client that can write to Redis cannot make up a key's record.
CREATE TABLE instance_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
