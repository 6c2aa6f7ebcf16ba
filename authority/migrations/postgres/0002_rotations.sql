-- Rotation jobs (revocations): see the SQLite migration of the same number.
CREATE TABLE rotations (
    id                   BIGSERIAL PRIMARY KEY,
    attribute            TEXT   NOT NULL,
    from_version         BIGINT NOT NULL,
    to_version           BIGINT NOT NULL,
    state                TEXT   NOT NULL,
    reason               TEXT   NOT NULL,
    update_secret_sealed BYTEA,
    created_at           BIGINT NOT NULL,
    finished_at          BIGINT,
    CONSTRAINT rotations_state CHECK (state IN ('pending', 'done')),
    CONSTRAINT rotations_versions CHECK (to_version = from_version + 1),
    CONSTRAINT rotations_secret CHECK ((state = 'pending') = (update_secret_sealed IS NOT NULL)),
    UNIQUE (attribute, from_version)
);
