-- Where an interrupted `keys kv-resync` resumes: at most one row. (SQLite compares text
-- bytewise, the order Workers KV lists keys in, so the key_hash indexes serve as they are.)
CREATE TABLE kv_resync (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    after_hash    TEXT    NOT NULL, -- every KV key up to this one has been written
    done          BIGINT  NOT NULL, -- records written so far
    started_at_ms BIGINT  NOT NULL,
    updated_at_ms BIGINT  NOT NULL
);
