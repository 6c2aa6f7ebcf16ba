-- Sharing a rotation's work at a proxy between replicas: see the SQLite
-- migration of the same number.
CREATE TABLE rotation_chunks (
    rotation_id BIGINT NOT NULL REFERENCES rotations (id),
    proxy_id    TEXT   NOT NULL REFERENCES proxies (id),
    chunk       INTEGER NOT NULL,
    owner       TEXT   NOT NULL DEFAULT '',
    lease_until BIGINT NOT NULL DEFAULT 0,
    done_at     BIGINT,
    PRIMARY KEY (rotation_id, proxy_id, chunk),
    CONSTRAINT rotation_chunks_chunk CHECK (chunk >= 0)
);
