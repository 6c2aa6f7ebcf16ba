-- Rotation jobs (revocations): one per (attribute, from_version), created in
-- the same transaction as the new version. The update secret (Δα, Δy),
-- sealed under the KEK, stays until every stored row is updated; finishing
-- the job erases it.
CREATE TABLE rotations (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    attribute            TEXT    NOT NULL,
    from_version         INTEGER NOT NULL,
    to_version           INTEGER NOT NULL,
    state                TEXT    NOT NULL,
    reason               TEXT    NOT NULL,
    update_secret_sealed BLOB,
    created_at           INTEGER NOT NULL,
    finished_at          INTEGER,
    CONSTRAINT rotations_state CHECK (state IN ('pending', 'done')),
    CONSTRAINT rotations_versions CHECK (to_version = from_version + 1),
    CONSTRAINT rotations_secret CHECK ((state = 'pending') = (update_secret_sealed IS NOT NULL)),
    UNIQUE (attribute, from_version)
) STRICT;
