-- Sharing a rotation's work at a proxy between replicas: the record-id space
-- is cut into chunks (by the top bits of the record id); a replica leases a
-- chunk, sends the tokens of its pending rows, and marks it done. A lease
-- that runs out (its replica crashed) is taken over by another replica; a
-- replica takes its own unexpired leases back after a restart.
CREATE TABLE rotation_chunks (
    rotation_id INTEGER NOT NULL REFERENCES rotations (id),
    proxy_id    TEXT    NOT NULL REFERENCES proxies (id),
    chunk       INTEGER NOT NULL,
    owner       TEXT    NOT NULL DEFAULT '',
    lease_until INTEGER NOT NULL DEFAULT 0,
    done_at     INTEGER,
    PRIMARY KEY (rotation_id, proxy_id, chunk),
    CONSTRAINT rotation_chunks_chunk CHECK (chunk >= 0)
) STRICT;
