-- mabe authority store, SQLite dialect, schema version 1.
-- Applied by the migration runner in src/store/sqlite.rs inside one
-- transaction together with its schema_version row. Tables are STRICT so a
-- value of the wrong type cannot be stored; named CHECK constraints mirror
-- the PostgreSQL schema.

-- The node identity: exactly one row (id = 1).
CREATE TABLE meta (
    id                     INTEGER NOT NULL PRIMARY KEY CONSTRAINT meta_single_row CHECK (id = 1),
    authority_id           TEXT    NOT NULL,
    identity_public_key    BLOB    NOT NULL CONSTRAINT meta_identity_public_key_len CHECK (length(identity_public_key) = 32),
    identity_secret_sealed BLOB    NOT NULL,
    admin_public_key       BLOB    NOT NULL CONSTRAINT meta_admin_public_key_len CHECK (length(admin_public_key) = 32),
    created_at             INTEGER NOT NULL
) STRICT;

-- Every version of every attribute; at most one 'current' per attribute.
CREATE TABLE attributes (
    attribute     TEXT    NOT NULL,
    version       INTEGER NOT NULL CONSTRAINT attributes_version_positive CHECK (version >= 1),
    public_key    BLOB    NOT NULL,
    secret_sealed BLOB    NOT NULL,
    state         TEXT    NOT NULL CONSTRAINT attributes_state_known CHECK (state IN ('current', 'superseded')),
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (attribute, version)
) STRICT;
CREATE UNIQUE INDEX attributes_one_current ON attributes (attribute) WHERE state = 'current';

-- Enrolled people.
CREATE TABLE people (
    gid         BLOB    NOT NULL PRIMARY KEY CONSTRAINT people_gid_len CHECK (length(gid) = 32),
    registry    TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    request_key BLOB    NOT NULL CONSTRAINT people_request_key_len CHECK (length(request_key) = 32),
    roles       TEXT    NOT NULL,
    enrolled_at INTEGER NOT NULL,
    CONSTRAINT people_registry_subject_key UNIQUE (registry, subject)
) STRICT;
CREATE INDEX people_by_enrolled_at ON people (enrolled_at, gid);

-- Grants, active while revoked_at IS NULL; at most one active per (gid, attribute).
CREATE TABLE grants (
    id         INTEGER NOT NULL PRIMARY KEY,
    gid        BLOB    NOT NULL REFERENCES people (gid),
    attribute  TEXT    NOT NULL,
    granted_by TEXT    NOT NULL,
    granted_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
) STRICT;
CREATE UNIQUE INDEX grants_one_active ON grants (gid, attribute) WHERE revoked_at IS NULL;
CREATE INDEX grants_active_by_attribute ON grants (attribute) WHERE revoked_at IS NULL;

-- Attribute requests.
CREATE TABLE requests (
    id         INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    gid        BLOB    NOT NULL REFERENCES people (gid),
    attribute  TEXT    NOT NULL,
    reason     TEXT    NOT NULL,
    state      TEXT    NOT NULL CONSTRAINT requests_state_known CHECK (state IN ('pending', 'approved', 'denied')),
    created_at INTEGER NOT NULL,
    decided_by TEXT,
    decided_at INTEGER,
    note       TEXT
) STRICT;
CREATE INDEX requests_by_state ON requests (state, id);

-- Request nonces seen recently (replay protection).
CREATE TABLE nonces (
    gid     BLOB    NOT NULL,
    nonce   BLOB    NOT NULL,
    seen_at INTEGER NOT NULL,
    PRIMARY KEY (gid, nonce)
) STRICT, WITHOUT ROWID;
CREATE INDEX nonces_by_seen_at ON nonces (seen_at);

-- The hash-chained audit log (see src/audit.rs).
CREATE TABLE audit (
    seq       INTEGER NOT NULL PRIMARY KEY CONSTRAINT audit_seq_positive CHECK (seq >= 1),
    ts        INTEGER NOT NULL,
    kind      TEXT    NOT NULL,
    actor     TEXT    NOT NULL,
    subject   TEXT,
    attribute TEXT,
    detail    TEXT    NOT NULL,
    prev_hash BLOB    NOT NULL CONSTRAINT audit_prev_hash_len CHECK (length(prev_hash) = 32),
    hash      BLOB    NOT NULL CONSTRAINT audit_hash_len CHECK (length(hash) = 32)
) STRICT;

-- Signed checkpoints of the audit chain.
CREATE TABLE checkpoints (
    seq       INTEGER NOT NULL PRIMARY KEY,
    hash      BLOB    NOT NULL CONSTRAINT checkpoints_hash_len CHECK (length(hash) = 32),
    ts        INTEGER NOT NULL,
    signature BLOB    NOT NULL
) STRICT;
