-- mabe-proxy schema, version 1 (PostgreSQL). See docs/PROXY.md "Storage".

-- Authorities whose calls are accepted, with their pinned identity keys.
CREATE TABLE trusted_authorities (
    authority_id TEXT PRIMARY KEY,
    identity_key BYTEA NOT NULL CHECK (octet_length(identity_key) = 32),
    added_at     BIGINT NOT NULL
);

-- Nonces of authority calls (replay protection), pruned after twice the skew window.
CREATE TABLE nonces (
    authority_id TEXT NOT NULL,
    nonce        BYTEA NOT NULL,
    seen_at      BIGINT NOT NULL,
    PRIMARY KEY (authority_id, nonce)
);
CREATE INDEX nonces_seen_at ON nonces (seen_at);

-- Payloads. A blob is uncommitted (committed = FALSE) while its upload streams
-- in; it becomes a record's payload in the upload's commit transaction.
CREATE TABLE blobs (
    blob_id       BIGSERIAL PRIMARY KEY,
    started_at    BIGINT NOT NULL,
    last_activity BIGINT NOT NULL,
    committed     BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX blobs_uncommitted ON blobs (committed, last_activity);

CREATE TABLE chunks (
    blob_id BIGINT NOT NULL REFERENCES blobs (blob_id) ON DELETE CASCADE,
    seq     BIGINT NOT NULL CHECK (seq >= 0),
    data    BYTEA NOT NULL,
    PRIMARY KEY (blob_id, seq)
);

CREATE TABLE records (
    record_id      BYTEA PRIMARY KEY CHECK (octet_length(record_id) = 16),
    blob_id        BIGINT NOT NULL UNIQUE REFERENCES blobs (blob_id),
    header         BYTEA NOT NULL,
    chunk_count    BIGINT NOT NULL CHECK (chunk_count >= 0),
    payload_size   BIGINT NOT NULL CHECK (payload_size >= 0),
    payload_sha256 BYTEA NOT NULL CHECK (octet_length(payload_sha256) = 32),
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

-- One row per header row: what freezes and token batches look up.
CREATE TABLE record_rows (
    record_id BYTEA NOT NULL REFERENCES records (record_id) ON DELETE CASCADE,
    row_index BIGINT NOT NULL CHECK (row_index >= 0),
    attribute TEXT NOT NULL,
    version   BIGINT NOT NULL CHECK (version >= 1),
    c2        BYTEA NOT NULL CHECK (octet_length(c2) = 48),
    PRIMARY KEY (record_id, row_index)
);
CREATE INDEX record_rows_attribute ON record_rows (attribute, version);

-- Frozen (attribute, version)s and their snapshots (never change once written).
CREATE TABLE freezes (
    attribute   TEXT NOT NULL,
    version     BIGINT NOT NULL CHECK (version >= 1),
    frozen_by   TEXT NOT NULL,
    frozen_at   BIGINT NOT NULL,
    row_count   BIGINT NOT NULL CHECK (row_count >= 0),
    merkle_root BYTEA NOT NULL CHECK (octet_length(merkle_root) = 32),
    PRIMARY KEY (attribute, version)
);

CREATE TABLE snapshot_rows (
    attribute TEXT NOT NULL,
    version   BIGINT NOT NULL,
    record_id BYTEA NOT NULL,
    row_index BIGINT NOT NULL,
    c2        BYTEA NOT NULL CHECK (octet_length(c2) = 48),
    PRIMARY KEY (attribute, version, record_id, row_index),
    FOREIGN KEY (attribute, version) REFERENCES freezes (attribute, version)
);
