//! Storage for an authority node: one trait, two real backends (SQLite, the
//! embedded default, and PostgreSQL), one shared test suite.
//!
//! Every mutating operation takes the [`AuditEvent`] that records it and
//! appends it to the hash-chained audit log **in the same transaction**, so
//! an acknowledged write and its audit entry are never separated by a crash.
//! Sequence numbers, nonces and the audit chain live in the database, so
//! several `serve` processes over one PostgreSQL database work side by side.

use std::fmt;

use async_trait::async_trait;

pub mod postgres;
pub mod sqlite;

/// Errors from a storage backend.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row to create already exists (attribute, person, grant, version).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The row to change does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The operation does not apply in the row's current state (for example
    /// deciding a request that was already decided).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database holds something this code cannot read (corruption, a
    /// newer schema, a tampered row that no longer decodes).
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// The backend failed (connection, I/O, constraint, migration).
    #[error("database error: {0}")]
    Backend(String),
    /// The nonce that came with a write was used before (a replayed call).
    #[error("nonce was already used (replay)")]
    Replay,
}

/// A nonce to spend in the same transaction as a write, so an authenticated
/// call costs one grouped write instead of two. It stays spent even when the
/// write is refused (a replay of a refused call is refused too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonceUse {
    /// Namespace (a GID, or the admin namespace).
    pub space: [u8; 32],
    /// The nonce.
    pub nonce: Vec<u8>,
    /// Unix seconds.
    pub seen_at: i64,
    /// Nonces seen before this may be forgotten.
    pub prune_before: i64,
}

/// Result type of the store.
pub type StoreResult<T> = Result<T, StoreError>;

/// The node's identity, stored once at `init`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorityMeta {
    /// Authority id (`hospital-a`).
    pub authority_id: String,
    /// Ed25519 identity public key (signs the directory and checkpoints).
    pub identity_public_key: [u8; 32],
    /// Ed25519 identity secret key, sealed under the key-encryption key.
    pub identity_secret_sealed: Vec<u8>,
    /// Ed25519 public key that authenticates admin requests.
    pub admin_public_key: [u8; 32],
    /// Unix seconds.
    pub created_at: i64,
}

impl fmt::Debug for AuthorityMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityMeta")
            .field("authority_id", &self.authority_id)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// Lifecycle state of one attribute version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionState {
    /// The version encryptors must use.
    Current,
    /// Replaced by a newer version (kept for decrypting old rows until updated).
    Superseded,
}

impl VersionState {
    /// Stable text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Current => "current",
            VersionState::Superseded => "superseded",
        }
    }
    /// Parse the stored text form.
    pub fn parse(s: &str) -> StoreResult<Self> {
        match s {
            "current" => Ok(VersionState::Current),
            "superseded" => Ok(VersionState::Superseded),
            other => Err(StoreError::Corrupt(format!(
                "unknown version state {other:?}"
            ))),
        }
    }
}

/// One version of one attribute.
#[derive(Clone, PartialEq, Eq)]
pub struct AttributeRecord {
    /// Canonical attribute text, `name@authority`.
    pub attribute: String,
    /// Version (≥ 1).
    pub version: u32,
    /// Encoded `AttributePublicKey` (kind 'P').
    pub public_key: Vec<u8>,
    /// Encoded `AttributeSecretKey` (kind 'S'), sealed under the KEK with AD
    /// binding (authority, attribute, version).
    pub secret_sealed: Vec<u8>,
    /// State.
    pub state: VersionState,
    /// Unix seconds.
    pub created_at: i64,
}

impl fmt::Debug for AttributeRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttributeRecord")
            .field("attribute", &self.attribute)
            .field("version", &self.version)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// An enrolled person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersonRecord {
    /// 32-byte GID.
    pub gid: [u8; 32],
    /// Registry (normalized), e.g. `big-register`.
    pub registry: String,
    /// Subject within the registry.
    pub subject: String,
    /// Ed25519 public key that signs this person's requests.
    pub request_key: [u8; 32],
    /// Free-form roles, comma-separated (e.g. `emergency-staff`).
    pub roles: String,
    /// Unix seconds.
    pub enrolled_at: i64,
}

/// A grant of an attribute to a person.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantRecord {
    /// Holder.
    pub gid: [u8; 32],
    /// Canonical attribute text.
    pub attribute: String,
    /// Who granted it (`admin`, `request:<id>`, `patient`, …).
    pub granted_by: String,
    /// Unix seconds.
    pub granted_at: i64,
    /// Unix seconds after which the grant expires (emergency access), if any.
    pub expires_at: Option<i64>,
}

/// State of an attribute request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestState {
    /// Waiting for a decision.
    Pending,
    /// Approved (a grant was created in the same transaction).
    Approved,
    /// Denied.
    Denied,
}

impl RequestState {
    /// Stable text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
        }
    }
    /// Parse the stored text form.
    pub fn parse(s: &str) -> StoreResult<Self> {
        match s {
            "pending" => Ok(RequestState::Pending),
            "approved" => Ok(RequestState::Approved),
            "denied" => Ok(RequestState::Denied),
            other => Err(StoreError::Corrupt(format!(
                "unknown request state {other:?}"
            ))),
        }
    }
}

/// Which requests a listing returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFilter {
    /// Only requests in this state.
    pub state: Option<RequestState>,
    /// Only requests for this attribute (canonical text).
    pub attribute: Option<String>,
}

/// A person's request for an attribute (researchers, family members).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// Database-assigned id (> 0).
    pub id: i64,
    /// Requester.
    pub gid: [u8; 32],
    /// Canonical attribute text.
    pub attribute: String,
    /// The requester's stated reason.
    pub reason: String,
    /// State.
    pub state: RequestState,
    /// Unix seconds.
    pub created_at: i64,
    /// Who decided, when decided.
    pub decided_by: Option<String>,
    /// Unix seconds, when decided.
    pub decided_at: Option<i64>,
    /// The decider's note.
    pub note: Option<String>,
}

/// State of a rotation job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationState {
    /// Stored rows may still be at the old version; the sealed update secret is kept.
    Pending,
    /// Every stored row was updated; the update secret is erased.
    Done,
}

impl RotationState {
    /// Stable text form stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RotationState::Pending => "pending",
            RotationState::Done => "done",
        }
    }
    /// Parse the stored text form.
    pub fn parse(s: &str) -> StoreResult<Self> {
        match s {
            "pending" => Ok(RotationState::Pending),
            "done" => Ok(RotationState::Done),
            other => Err(StoreError::Corrupt(format!(
                "unknown rotation state {other:?}"
            ))),
        }
    }
}

/// What a rotation stores beside the new attribute version.
#[derive(Clone, PartialEq, Eq)]
pub struct NewRotation {
    /// Why (e.g. `revoke <gid>`, `expired emergency grants`).
    pub reason: String,
    /// Encoded `UpdateSecret` (kind 'U') sealed under the KEK with AD binding
    /// (authority, attribute, from-version).
    pub update_secret_sealed: Vec<u8>,
    /// Grants of this attribute to end in the same transaction (the GIDs
    /// whose removal causes the rotation), each with its `revoke` audit
    /// event. Each must be active, or nothing happens (`NotFound`).
    pub revoke: Vec<([u8; 32], AuditEvent)>,
}

impl fmt::Debug for NewRotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewRotation")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// A rotation job: the state machine the revocation flow drives (freeze and
/// snapshot at each proxy, tokens, re-issue), persisted so it survives crashes.
#[derive(Clone, PartialEq, Eq)]
pub struct RotationRecord {
    /// Database-assigned id.
    pub id: i64,
    /// Canonical attribute text.
    pub attribute: String,
    /// Version rows move away from.
    pub from_version: u32,
    /// Version they move to (`from_version + 1`).
    pub to_version: u32,
    /// State.
    pub state: RotationState,
    /// Why the rotation happened.
    pub reason: String,
    /// The sealed update secret while pending; `None` once erased.
    pub update_secret_sealed: Option<Vec<u8>>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, once done.
    pub finished_at: Option<i64>,
}

impl fmt::Debug for RotationRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotationRecord")
            .field("id", &self.id)
            .field("attribute", &self.attribute)
            .field("from_version", &self.from_version)
            .field("state", &self.state)
            .field("secret_present", &self.update_secret_sealed.is_some())
            .finish_non_exhaustive()
    }
}

/// What an audit entry records. The store assigns `seq`, links the hash chain
/// and stores it in the same transaction as the change it describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix seconds.
    pub ts: i64,
    /// Kind: `enroll`, `grant`, `request`, `approve`, `deny`, `issue`, `refusal`,
    /// `revoke`, `rotate`, `break-glass`, `create-attribute`, `checkpoint`, …
    pub kind: String,
    /// Who acted (`admin`, a GID in hex, `system`).
    pub actor: String,
    /// Person concerned, if any (GID hex).
    pub subject: Option<String>,
    /// Attribute concerned, if any.
    pub attribute: Option<String>,
    /// Free-form detail (JSON text or a sentence), never a secret.
    pub detail: String,
}

/// A stored audit entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    /// Position in the chain, 1, 2, 3, … with no gaps.
    pub seq: i64,
    /// The event.
    pub event: AuditEvent,
    /// Hash of the previous entry (32 zero bytes for seq 1).
    pub prev_hash: [u8; 32],
    /// `crate::audit::entry_hash(seq, prev_hash, event)`.
    pub hash: [u8; 32],
}

/// A signed checkpoint of the audit chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// The last entry covered.
    pub seq: i64,
    /// Its hash.
    pub hash: [u8; 32],
    /// Unix seconds.
    pub ts: i64,
    /// Ed25519 signature by the identity key over `crate::audit::checkpoint_message`.
    pub signature: Vec<u8>,
}

/// A record-store proxy this authority drives revocations on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRecord {
    /// The proxy's id (the audience of the authority's signed calls).
    pub id: String,
    /// `https://host:port` of its listener.
    pub endpoint: String,
    /// TLS root certificate (PEM) to trust for it.
    pub tls_root: Vec<u8>,
    /// Name its certificate must carry.
    pub tls_name: String,
    /// Unix seconds.
    pub added_at: i64,
}

/// A rotation's progress at one proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RotationProgress {
    /// The rotation.
    pub rotation_id: i64,
    /// The proxy.
    pub proxy_id: String,
    /// Merkle root of the rows the proxy froze (fixed at the first freeze).
    pub snapshot_root: [u8; 32],
    /// Rows in the snapshot.
    pub rows_total: i64,
    /// Rows known to be updated.
    pub rows_done: i64,
    /// Unix seconds of the first freeze.
    pub frozen_at: i64,
    /// Unix seconds of the last progress report.
    pub updated_at: i64,
    /// Unix seconds when every row was updated.
    pub done_at: Option<i64>,
}

/// Who leases chunks of which rotation at which proxy (see
/// [`Store::claim_chunk`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkLease {
    /// Rotation job id.
    pub rotation_id: i64,
    /// Proxy id.
    pub proxy_id: String,
    /// The leasing replica's instance id.
    pub owner: String,
}

/// Storage for one authority node.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Which backend (`sqlite`, `postgres`), for logs.
    fn backend(&self) -> &'static str;

    /// Store the node identity; fails with `AlreadyExists` if there is one.
    async fn init_meta(&self, meta: &AuthorityMeta, ev: AuditEvent) -> StoreResult<()>;
    /// The node identity, if initialised.
    async fn meta(&self) -> StoreResult<Option<AuthorityMeta>>;

    /// Create version 1 of a new attribute (`AlreadyExists` if any version exists).
    async fn create_attribute(&self, rec: &AttributeRecord, ev: AuditEvent) -> StoreResult<()>;
    /// End the grants in `rotation.revoke`, add `rec` (version n+1) as
    /// current, mark version n superseded, and create the pending rotation
    /// job holding the sealed update secret, all atomically: a crash leaves
    /// either all of it or none. `Conflict` unless `rec.version` is exactly the current
    /// version + 1.
    async fn rotate_attribute(
        &self,
        rec: &AttributeRecord,
        rotation: &NewRotation,
        ev: AuditEvent,
    ) -> StoreResult<RotationRecord>;
    /// Rotation jobs, oldest first; only pending ones if `pending_only`.
    async fn rotations(&self, pending_only: bool) -> StoreResult<Vec<RotationRecord>>;
    /// Mark a pending rotation done and erase its update secret
    /// (`NotFound` for an unknown id, `Conflict` if already done).
    async fn finish_rotation(
        &self,
        id: i64,
        finished_at: i64,
        ev: AuditEvent,
    ) -> StoreResult<RotationRecord>;
    /// Every version of every attribute, ordered by attribute then version.
    async fn attributes(&self) -> StoreResult<Vec<AttributeRecord>>;
    /// Every version of one attribute, ordered by version.
    async fn attribute_versions(&self, attribute: &str) -> StoreResult<Vec<AttributeRecord>>;
    /// One page of [`Store::attributes`]: the versions that come after
    /// `after` (an attribute and version) in (attribute, version) order, or
    /// from the first without it; at most `limit` (none if `limit <= 0`).
    async fn attributes_page(
        &self,
        after: Option<(&str, u32)>,
        limit: i64,
    ) -> StoreResult<Vec<AttributeRecord>>;
    /// Rotation jobs of one attribute, oldest first.
    async fn attribute_rotations(&self, attribute: &str) -> StoreResult<Vec<RotationRecord>>;

    /// Enroll a person (`AlreadyExists` if the GID is enrolled).
    async fn enroll(&self, person: &PersonRecord, ev: AuditEvent) -> StoreResult<()>;
    /// The enrolled person with this GID.
    async fn person(&self, gid: &[u8; 32]) -> StoreResult<Option<PersonRecord>>;
    /// All enrolled people, ordered by enrollment time.
    async fn people(&self) -> StoreResult<Vec<PersonRecord>>;

    /// Grant an attribute directly (`AlreadyExists` if an active grant exists,
    /// `NotFound` if the person or attribute does not exist).
    async fn grant(&self, grant: &GrantRecord, ev: AuditEvent) -> StoreResult<()>;
    /// Remove an active grant (`NotFound` if there is none).
    async fn revoke_grant(
        &self,
        gid: &[u8; 32],
        attribute: &str,
        ev: AuditEvent,
    ) -> StoreResult<()>;
    /// Active grants of one person (not revoked; expired ones included, the
    /// caller filters by `expires_at`).
    async fn grants_for(&self, gid: &[u8; 32]) -> StoreResult<Vec<GrantRecord>>;
    /// Active grants of one attribute.
    async fn holders(&self, attribute: &str) -> StoreResult<Vec<GrantRecord>>;
    /// Register a proxy (`AlreadyExists` if its id is taken).
    async fn add_proxy(&self, proxy: &ProxyRecord, ev: AuditEvent) -> StoreResult<()>;
    /// Registered proxies, by id.
    async fn proxies(&self) -> StoreResult<Vec<ProxyRecord>>;
    /// Record that `progress.proxy_id` froze the rotation's rows, or return
    /// what was recorded at the first freeze. `Conflict` if the snapshot
    /// root or row count differs from the first freeze's.
    async fn record_freeze(&self, progress: &RotationProgress) -> StoreResult<RotationProgress>;
    /// Update the rows done at a proxy; with `done`, also mark it finished
    /// and append `ev` (the token batch audit entry) in the same transaction.
    async fn record_progress(
        &self,
        rotation_id: i64,
        proxy_id: &str,
        rows_done: i64,
        at: i64,
        done: Option<AuditEvent>,
    ) -> StoreResult<()>;
    /// Progress of a rotation at every proxy that froze it.
    async fn rotation_progress(&self, rotation_id: i64) -> StoreResult<Vec<RotationProgress>>;
    /// Lease one chunk of a rotation's work at a proxy to `owner` until
    /// `lease_until`: the lowest of chunks `0..chunks` (created on first use)
    /// that is not done and is either unleased, leased to `owner`, or whose
    /// lease ran out before `now`. `None` when no chunk is free (every one is
    /// done, or leased to another owner). Safe against concurrent claims by
    /// replicas: a chunk is leased to one owner at a time.
    async fn claim_chunk(
        &self,
        lease: &ChunkLease,
        chunks: u32,
        now: i64,
        lease_until: i64,
    ) -> StoreResult<Option<u32>>;
    /// Extend `owner`'s lease of a chunk, or (with `done_at`) mark it done.
    /// `false` if the chunk is no longer leased to `owner` (its lease ran
    /// out and another replica took it).
    async fn update_chunk(
        &self,
        lease: &ChunkLease,
        chunk: u32,
        lease_until: i64,
        done_at: Option<i64>,
    ) -> StoreResult<bool>;
    /// Chunks of a rotation at a proxy: `(done, created)`.
    async fn chunk_counts(&self, rotation_id: i64, proxy_id: &str) -> StoreResult<(u32, u32)>;
    /// Active grants (not revoked) whose expiry is at or before `at`, oldest
    /// expiry first.
    async fn expired_grants(&self, at: i64) -> StoreResult<Vec<GrantRecord>>;

    /// File a request; returns it with its id.
    async fn create_request(
        &self,
        gid: &[u8; 32],
        attribute: &str,
        reason: &str,
        created_at: i64,
        ev: AuditEvent,
    ) -> StoreResult<RequestRecord>;
    /// Requests, optionally only those in one state, ordered by id.
    async fn requests(&self, state: Option<RequestState>) -> StoreResult<Vec<RequestRecord>>;
    /// One page of requests matching `filter`: those with an id above
    /// `after_id`, ordered by id, at most `limit` (none if `limit <= 0`).
    async fn requests_page(
        &self,
        filter: &RequestFilter,
        after_id: i64,
        limit: i64,
    ) -> StoreResult<Vec<RequestRecord>>;
    /// How many requests match `filter`.
    async fn count_requests(&self, filter: &RequestFilter) -> StoreResult<i64>;
    /// Decide a pending request (`Conflict` if already decided, `NotFound` if no
    /// such id). Approval creates the grant (granted_by `request:<id>`) in the
    /// same transaction; an existing active grant is kept as is. With `nonce`,
    /// it is spent first in the same transaction (`Replay` if it was used).
    #[allow(clippy::too_many_arguments)]
    async fn decide_request(
        &self,
        id: i64,
        approve: bool,
        decided_by: &str,
        note: &str,
        decided_at: i64,
        ev: AuditEvent,
        nonce: Option<NonceUse>,
    ) -> StoreResult<RequestRecord>;

    /// Record a request nonce; `Ok(false)` if this (gid, nonce) was seen before
    /// (a replay). Nonces older than `prune_before` may be deleted.
    async fn use_nonce(
        &self,
        gid: &[u8; 32],
        nonce: &[u8],
        seen_at: i64,
        prune_before: i64,
    ) -> StoreResult<bool>;

    /// Append an audit entry that has no other change attached (issuance,
    /// refusal). Returns the stored entry.
    async fn append_audit(&self, ev: AuditEvent) -> StoreResult<AuditEntry>;
    /// Audit entries with `seq >= from`, ordered by seq, at most `limit`.
    async fn audit_entries(&self, from: i64, limit: i64) -> StoreResult<Vec<AuditEntry>>;
    /// Store a signed checkpoint.
    async fn add_checkpoint(&self, cp: &Checkpoint) -> StoreResult<()>;
    /// All checkpoints, ordered by seq.
    async fn checkpoints(&self) -> StoreResult<Vec<Checkpoint>>;
}

/// `Conflict` unless a repeated freeze reports the snapshot recorded at the
/// first one (same root, same number of rows).
pub fn check_same_snapshot(stored: &RotationProgress, now: &RotationProgress) -> StoreResult<()> {
    if stored.snapshot_root != now.snapshot_root || stored.rows_total != now.rows_total {
        return Err(StoreError::Conflict(format!(
            "proxy {} reports a different snapshot for rotation {} than at its first freeze \
             ({} rows, root {}; first: {} rows, root {})",
            now.proxy_id,
            now.rotation_id,
            now.rows_total,
            hex::encode(now.snapshot_root),
            stored.rows_total,
            hex::encode(stored.snapshot_root)
        )));
    }
    Ok(())
}
