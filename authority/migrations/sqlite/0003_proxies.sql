-- Record-store proxies this authority drives revocations on (DESIGN §3),
-- and each rotation's progress at each proxy. The snapshot root is the
-- Merkle root of the rows the proxy froze: fixed at the first freeze, so a
-- proxy cannot change the set of rows a rotation updates.
CREATE TABLE proxies (
    id        TEXT    NOT NULL PRIMARY KEY,
    endpoint  TEXT    NOT NULL,
    tls_root  BLOB    NOT NULL,
    tls_name  TEXT    NOT NULL,
    added_at  INTEGER NOT NULL
) STRICT;

CREATE TABLE rotation_proxies (
    rotation_id   INTEGER NOT NULL REFERENCES rotations (id),
    proxy_id      TEXT    NOT NULL REFERENCES proxies (id),
    snapshot_root BLOB    NOT NULL,
    rows_total    INTEGER NOT NULL,
    rows_done     INTEGER NOT NULL,
    frozen_at     INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    done_at       INTEGER,
    PRIMARY KEY (rotation_id, proxy_id),
    CONSTRAINT rotation_proxies_rows CHECK (rows_done >= 0 AND rows_done <= rows_total)
) STRICT;
