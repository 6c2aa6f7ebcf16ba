-- Record-store proxies and each rotation's progress at each proxy: see the
-- SQLite migration of the same number.
CREATE TABLE proxies (
    id        TEXT   NOT NULL PRIMARY KEY,
    endpoint  TEXT   NOT NULL,
    tls_root  BYTEA  NOT NULL,
    tls_name  TEXT   NOT NULL,
    added_at  BIGINT NOT NULL
);

CREATE TABLE rotation_proxies (
    rotation_id   BIGINT NOT NULL REFERENCES rotations (id),
    proxy_id      TEXT   NOT NULL REFERENCES proxies (id),
    snapshot_root BYTEA  NOT NULL,
    rows_total    BIGINT NOT NULL,
    rows_done     BIGINT NOT NULL,
    frozen_at     BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    done_at       BIGINT,
    PRIMARY KEY (rotation_id, proxy_id),
    CONSTRAINT rotation_proxies_rows CHECK (rows_done >= 0 AND rows_done <= rows_total)
);
