-- mabe-proxy schema, version 1 (SQLite). See docs/PROXY.md "Storage".

-- Authorities whose calls are accepted, with their pinned identity keys.
CREATE TABLE trusted_authorities (
    authority_id TEXT PRIMARY KEY,
    identity_key BLOB NOT NULL CHECK (length(identity_key) = 32),
    added_at     INTEGER NOT NULL
);

-- Nonces of authority calls (replay protection), pruned after twice the skew window.
CREATE TABLE nonces (
    authority_id TEXT NOT NULL,
    nonce        BLOB NOT NULL,
    seen_at      INTEGER NOT NULL,
    PRIMARY KEY (authority_id, nonce)
);
CREATE INDEX nonces_seen_at ON nonces (seen_at);

-- Payloads. A blob is uncommitted (committed = 0) while its upload streams
-- in; it becomes a record's payload in the upload's commit transaction.
CREATE TABLE blobs (
    blob_id       INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at    INTEGER NOT NULL,
    last_activity INTEGER NOT NULL,
    committed     INTEGER NOT NULL DEFAULT 0 CHECK (committed IN (0, 1))
);
CREATE INDEX blobs_uncommitted ON blobs (committed, last_activity);

CREATE TABLE chunks (
    blob_id INTEGER NOT NULL REFERENCES blobs (blob_id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL CHECK (seq >= 0),
    data    BLOB NOT NULL,
    PRIMARY KEY (blob_id, seq)
);

CREATE TABLE records (
    record_id      BLOB PRIMARY KEY CHECK (length(record_id) = 16),
    blob_id        INTEGER NOT NULL UNIQUE REFERENCES blobs (blob_id),
    header         BLOB NOT NULL,
    chunk_count    INTEGER NOT NULL CHECK (chunk_count >= 0),
    payload_size   INTEGER NOT NULL CHECK (payload_size >= 0),
    payload_sha256 BLOB NOT NULL CHECK (length(payload_sha256) = 32),
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

-- One row per header row: what freezes and token batches look up.
CREATE TABLE record_rows (
    record_id BLOB NOT NULL REFERENCES records (record_id) ON DELETE CASCADE,
    row_index INTEGER NOT NULL CHECK (row_index >= 0),
    attribute TEXT NOT NULL,
    version   INTEGER NOT NULL CHECK (version >= 1),
    c2        BLOB NOT NULL CHECK (length(c2) = 48),
    PRIMARY KEY (record_id, row_index)
);
CREATE INDEX record_rows_attribute ON record_rows (attribute, version);

-- Frozen (attribute, version)s and their snapshots (never change once written).
CREATE TABLE freezes (
    attribute   TEXT NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    frozen_by   TEXT NOT NULL,
    frozen_at   INTEGER NOT NULL,
    row_count   INTEGER NOT NULL CHECK (row_count >= 0),
    merkle_root BLOB NOT NULL CHECK (length(merkle_root) = 32),
    PRIMARY KEY (attribute, version)
);

CREATE TABLE snapshot_rows (
    attribute TEXT NOT NULL,
    version   INTEGER NOT NULL,
    record_id BLOB NOT NULL,
    row_index INTEGER NOT NULL,
    c2        BLOB NOT NULL CHECK (length(c2) = 48),
    PRIMARY KEY (attribute, version, record_id, row_index),
    FOREIGN KEY (attribute, version) REFERENCES freezes (attribute, version)
);
