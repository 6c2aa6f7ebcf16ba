//! Storage for a proxy: one trait, two real backends (SQLite, the embedded
//! default, and PostgreSQL), one shared test suite (`tests/store_suite.rs`).
//!
//! Layout (the same tables in both dialects, `migrations/`):
//! - `blobs` and `chunks`: payloads, in chunks of at most
//!   [`crate::STORE_CHUNK_BYTES`], written while an upload streams in. A blob
//!   belongs to no record until its upload commits, so a half-uploaded record
//!   is never visible; abandoned blobs are purged.
//! - `records` (header, payload size and digest, the blob) and `record_rows`
//!   (per header row: attribute, version, `C2`), inserted in the upload's
//!   commit transaction together with the checks against duplicates and
//!   freezes.
//! - `freezes` and `snapshot_rows`: one row per frozen (attribute, version),
//!   with the snapshot taken in the freeze's transaction.
//! - `trusted_authorities` and `nonces`: authority identity keys and the
//!   nonces of authority calls (in the database, so proxies sharing one
//!   PostgreSQL database also share replay protection).
//!
//! Atomicity across concurrent writers: SQLite serializes every write
//! transaction (`BEGIN IMMEDIATE`); PostgreSQL transactions that touch an
//! attribute take a transaction-scoped advisory lock derived from it
//! ([`attribute_lock_key`]): shared for uploads and token batches, exclusive
//! for a freeze. So a freeze sees every upload committed before it, and every
//! upload committed after it sees the freeze. A freeze's Merkle root and row
//! count are computed from exactly the rows its snapshot stores, in the same
//! transaction, so a record deleted concurrently is either in both or in
//! neither.
//!
//! CPU-heavy work (decoding and re-encoding headers, hashing a large
//! snapshot) runs in a bounded blocking section ([`crate::cpu`]), never on
//! the async runtime's worker threads.
//!
//! Reads never wait for writes: SQLite reads use read-only connections (WAL)
//! on threads of their own, PostgreSQL reads use the connection pool.

use std::collections::BTreeMap;
use std::fmt;

use ark_serialize::CanonicalSerialize;
use async_trait::async_trait;
use mabe_abe::{Attribute, Header, UpdateToken, Version};
use sha2::{Digest, Sha256};

use crate::error::{ProxyError, Result};

pub mod postgres;
pub mod sqlite;

/// A record id (16 bytes, chosen by the writer, inside the header).
pub type RecordId = [u8; 16];

/// Compressed G1 encoding of a row's `C2` (48 bytes).
pub type C2Bytes = [u8; 48];

/// One header row as indexed by the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowEntry {
    /// Canonical attribute text.
    pub attribute: String,
    /// Attribute version of the row.
    pub version: u32,
    /// The row's `C2` (never changes).
    pub c2: C2Bytes,
}

/// What an upload's commit stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewRecord {
    /// Record id (from the header).
    pub record_id: RecordId,
    /// Encoded header.
    pub header: Vec<u8>,
    /// The header's rows, in order.
    pub rows: Vec<RowEntry>,
    /// Payload size in bytes.
    pub payload_size: u64,
    /// SHA-256 of the payload.
    pub payload_sha256: [u8; 32],
    /// Unix seconds.
    pub created_at: i64,
}

impl NewRecord {
    /// Index a validated header for storage: the record id and every row's
    /// attribute, version and compressed `C2`.
    pub fn from_header(
        header: &Header,
        header_bytes: Vec<u8>,
        payload_size: u64,
        payload_sha256: [u8; 32],
        created_at: i64,
    ) -> Self {
        NewRecord {
            record_id: *header.rid().as_bytes(),
            header: header_bytes,
            rows: header_rows(header),
            payload_size,
            payload_sha256,
            created_at,
        }
    }
}

/// The rows of a header as the store indexes them.
pub fn header_rows(header: &Header) -> Vec<RowEntry> {
    header
        .rows()
        .iter()
        .map(|r| RowEntry {
            attribute: r.attribute().to_string(),
            version: r.version().get(),
            c2: g1_compressed(r.c2()),
        })
        .collect()
}

/// Compressed (ZCash) encoding of a G1 point, as in docs/FORMAT.md.
fn g1_compressed(p: &impl CanonicalSerialize) -> C2Bytes {
    let mut out = [0u8; 48];
    // Writing a G1 point into a slice of exactly its compressed size cannot fail.
    let _ = p.serialize_compressed(&mut out[..]);
    out
}

/// A stored record's metadata (the payload is read chunk by chunk).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Record id.
    pub record_id: RecordId,
    /// Current header (rows may have been updated since the upload).
    pub header: Vec<u8>,
    /// The blob holding the payload.
    pub blob_id: i64,
    /// Number of payload chunks (sequence numbers `0..chunks`).
    pub chunks: i64,
    /// Payload size in bytes.
    pub payload_size: u64,
    /// SHA-256 of the payload.
    pub payload_sha256: [u8; 32],
    /// Unix seconds.
    pub created_at: i64,
}

impl fmt::Debug for StoredRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredRecord")
            .field("record_id", &hex::encode(self.record_id))
            .field("header_len", &self.header.len())
            .field("chunks", &self.chunks)
            .field("payload_size", &self.payload_size)
            .finish_non_exhaustive()
    }
}

/// A record's metadata and its first payload chunk, read together from one
/// consistent view ([`Store::read_record`]): a record of at most one chunk
/// (every payload up to [`crate::STORE_CHUNK_BYTES`]) is read whole.
#[derive(Clone, PartialEq, Eq)]
pub struct RecordRead {
    /// The record's metadata and current header.
    pub record: StoredRecord,
    /// Chunk 0 of the payload; `None` if the payload is empty.
    pub first_chunk: Option<Vec<u8>>,
}

impl fmt::Debug for RecordRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordRead")
            .field("record", &self.record)
            .field("first_chunk_len", &self.first_chunk.as_ref().map(Vec::len))
            .finish()
    }
}

/// One entry of a record listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordSummary {
    /// Record id.
    pub record_id: RecordId,
    /// Header size in bytes.
    pub header_size: u64,
    /// Payload size in bytes.
    pub payload_size: u64,
    /// (attribute, version) of every row, in row order.
    pub rows: Vec<(String, u32)>,
    /// Unix seconds.
    pub created_at: i64,
}

/// A frozen (attribute, version).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreezeInfo {
    /// Canonical attribute text.
    pub attribute: String,
    /// Frozen version.
    pub version: u32,
    /// Authority that froze it.
    pub frozen_by: String,
    /// Unix seconds of the (first) freeze.
    pub frozen_at: i64,
    /// Rows in the snapshot.
    pub rows: u64,
    /// Merkle root of the snapshot ([`snapshot_root`]).
    pub merkle_root: [u8; 32],
}

/// One row of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SnapRow {
    /// Record id.
    pub record_id: RecordId,
    /// Row index in the header.
    pub row: u32,
    /// The row's `C2`.
    pub c2: C2Bytes,
}

/// The decoded tokens for one record at one (attribute, version).
#[derive(Clone, Debug)]
pub struct TokenGroup {
    /// Record id.
    pub record_id: RecordId,
    /// Canonical attribute text.
    pub attribute: String,
    /// Version the rows move away from.
    pub from_version: u32,
    /// The tokens (validated encodings).
    pub tokens: Vec<UpdateToken>,
}

/// What happened to one [`TokenGroup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupOutcome {
    /// Every row of the record at that version was updated.
    Applied,
    /// The rows were already updated; nothing changed.
    AlreadyApplied,
    /// Refused; nothing changed.
    Refused(String),
    /// No such record.
    NotFound,
}

/// An authority the proxy accepts calls from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedAuthority {
    /// Authority id (`hospital-a`).
    pub authority_id: String,
    /// Its pinned Ed25519 identity public key.
    pub identity_key: [u8; 32],
    /// Unix seconds.
    pub added_at: i64,
}

/// A freeze and how many of its rows are still at the frozen version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreezeProgress {
    /// The freeze.
    pub freeze: FreezeInfo,
    /// Snapshot rows whose record still holds them at the frozen version.
    pub pending: u64,
}

/// Storage for one proxy (or several proxies sharing a PostgreSQL database).
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Which backend (`sqlite`, `postgres`), for logs.
    fn backend(&self) -> &'static str;

    /// Pin an authority's identity key. `Ok(true)` if added, `Ok(false)` if
    /// the same key was already pinned, `AlreadyExists` if another key is.
    async fn add_trusted(&self, authority: &TrustedAuthority) -> Result<bool>;
    /// Remove an authority; `Ok(false)` if it was not trusted.
    async fn remove_trusted(&self, authority_id: &str) -> Result<bool>;
    /// Every trusted authority, ordered by id.
    async fn trusted(&self) -> Result<Vec<TrustedAuthority>>;
    /// The pinned key of one authority.
    async fn trusted_key(&self, authority_id: &str) -> Result<Option<[u8; 32]>>;
    /// Record an authority call's nonce; `Ok(false)` if this (authority,
    /// nonce) was seen before (a replay). Nonces seen before `prune_before`
    /// may be deleted.
    async fn use_nonce(
        &self,
        authority_id: &str,
        nonce: &[u8],
        seen_at: i64,
        prune_before: i64,
    ) -> Result<bool>;

    /// Start an upload: a new blob that belongs to no record yet.
    async fn begin_upload(&self, started_at: i64) -> Result<i64>;
    /// Store chunk `seq` (0, 1, 2, … with no gaps) of an uncommitted blob.
    async fn put_chunk(&self, blob_id: i64, seq: i64, data: Vec<u8>, now: i64) -> Result<()>;
    /// Make the upload visible as `record`, atomically with the checks:
    /// `AlreadyExists` if the record id is taken, `FailedPrecondition` if a
    /// row's (attribute, version) is frozen or older than a frozen version,
    /// `InvalidArgument` if the blob's chunks do not add up to the record's
    /// payload size.
    async fn commit_upload(&self, blob_id: i64, record: &NewRecord) -> Result<()>;
    /// Discard an uncommitted blob (no effect on a committed one).
    async fn abort_upload(&self, blob_id: i64) -> Result<()>;
    /// Discard uncommitted blobs with no activity since `idle_before`;
    /// returns how many.
    async fn purge_abandoned_uploads(&self, idle_before: i64) -> Result<u64>;

    /// One record's metadata.
    async fn record(&self, record_id: &RecordId) -> Result<Option<StoredRecord>>;
    /// One record's metadata and its first payload chunk, from one
    /// consistent view (what `GetRecord` starts with: a record of one chunk
    /// costs one read). `Corrupt` if the record has chunks but chunk 0 is
    /// missing.
    ///
    /// The default reads [`Store::record`], then [`Store::chunk`] (two
    /// views: a record deleted in between reads as not found).
    async fn read_record(&self, record_id: &RecordId) -> Result<Option<RecordRead>> {
        let Some(record) = self.record(record_id).await? else {
            return Ok(None);
        };
        let first_chunk = if record.chunks > 0 {
            match self.chunk(record.blob_id, 0).await? {
                Some(c) => Some(c),
                None => return Ok(None),
            }
        } else {
            None
        };
        Ok(Some(RecordRead {
            record,
            first_chunk,
        }))
    }
    /// Chunk `seq` of a committed blob.
    async fn chunk(&self, blob_id: i64, seq: i64) -> Result<Option<Vec<u8>>>;
    /// Records with ids greater than `after`, ordered by id, at most `limit`.
    async fn list_records(
        &self,
        after: Option<&RecordId>,
        limit: u32,
    ) -> Result<Vec<RecordSummary>>;
    /// Delete a record and its payload; `Ok(false)` if there was none.
    async fn delete_record(&self, record_id: &RecordId) -> Result<bool>;

    /// Freeze (attribute, version) for `authority_id`, taking the snapshot of
    /// every stored row at that (attribute, version) in the same transaction.
    /// Idempotent: if already frozen, returns the stored freeze unchanged.
    /// `FailedPrecondition` if an older frozen version of the attribute still
    /// has rows at that older version.
    async fn freeze(
        &self,
        attribute: &str,
        version: u32,
        authority_id: &str,
        frozen_at: i64,
    ) -> Result<FreezeInfo>;
    /// One freeze.
    async fn freeze_info(&self, attribute: &str, version: u32) -> Result<Option<FreezeInfo>>;
    /// Every freeze with its progress, ordered by attribute then version.
    async fn freezes(&self) -> Result<Vec<FreezeProgress>>;
    /// Snapshot rows after `after` (exclusive), ordered by (record, row).
    async fn snapshot_page(
        &self,
        attribute: &str,
        version: u32,
        after: Option<(RecordId, u32)>,
        limit: u32,
    ) -> Result<Vec<SnapRow>>;
    /// Number of snapshot rows still at the frozen version (deleted records
    /// do not count).
    async fn pending_count(&self, attribute: &str, version: u32) -> Result<u64>;
    /// Snapshot rows still at the frozen version, after `after`, ordered.
    async fn pending_page(
        &self,
        attribute: &str,
        version: u32,
        after: Option<(RecordId, u32)>,
        limit: u32,
    ) -> Result<Vec<SnapRow>>;

    /// Apply token groups in one transaction, each group in its own
    /// savepoint (all rows of a record or none, see [`plan_update`]); the
    /// outcomes, in the groups' order, are returned only after the commit.
    async fn apply_tokens(&self, groups: &[TokenGroup]) -> Result<Vec<GroupOutcome>>;
}

/// What applying one group to a stored header amounts to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpdatePlan {
    /// Store this header; these rows move to these versions.
    Apply {
        /// The updated header's encoding.
        header: Vec<u8>,
        /// (row index, new version) of every updated row.
        rows: Vec<(u32, u32)>,
    },
    /// Every token's row is already past the tokens' version.
    AlreadyApplied,
    /// Refused, with the reason.
    Refused(String),
}

/// Decide what `group` does to a stored header, given the record's rows in
/// the frozen snapshot (`snapshot`: row index → `C2`).
///
/// Refused: a token for a row outside the snapshot, a row whose stored `C2`
/// differs from the snapshot's, or anything [`Header::apply_tokens`] refuses
/// (a missing, extra or repeated row, a wrong `C2`). Already applied: every
/// token's row is in the snapshot and already past the tokens' version.
/// Errors: the stored header does not decode (`Corrupt`).
pub fn plan_update(
    header_bytes: &[u8],
    snapshot: &BTreeMap<u32, C2Bytes>,
    group: &TokenGroup,
) -> Result<UpdatePlan> {
    let mut header = Header::from_bytes(header_bytes).map_err(|e| {
        ProxyError::Corrupt(format!(
            "stored header of record {} does not decode: {e}",
            hex::encode(group.record_id)
        ))
    })?;
    let attribute: Attribute = match group.attribute.parse() {
        Ok(a) => a,
        Err(_) => return Ok(UpdatePlan::Refused("invalid attribute".into())),
    };
    let mut already = 0usize;
    for t in &group.tokens {
        let Some(snap_c2) = snapshot.get(&t.row()) else {
            return Ok(UpdatePlan::Refused(format!(
                "row {} is not in the frozen snapshot",
                t.row()
            )));
        };
        let Some(row) = header.rows().get(t.row() as usize) else {
            return Ok(UpdatePlan::Refused(format!(
                "row {} is out of range",
                t.row()
            )));
        };
        if row.attribute() != &attribute || g1_compressed(row.c2()) != *snap_c2 {
            return Ok(UpdatePlan::Refused(format!(
                "row {} is not the row of the snapshot",
                t.row()
            )));
        }
        if row.version().get() > group.from_version {
            already += 1;
        }
    }
    if already == group.tokens.len() && already > 0 {
        return Ok(UpdatePlan::AlreadyApplied);
    }
    if already > 0 {
        return Ok(UpdatePlan::Refused(
            "some of the tokens' rows are already updated and some are not".into(),
        ));
    }
    if let Err(e) = header.apply_tokens(&group.tokens) {
        return Ok(UpdatePlan::Refused(e.to_string()));
    }
    let rows = group
        .tokens
        .iter()
        .filter_map(|t| {
            header
                .rows()
                .get(t.row() as usize)
                .map(|r| (t.row(), r.version().get()))
        })
        .collect();
    Ok(UpdatePlan::Apply {
        header: header.to_bytes(),
        rows,
    })
}

/// The Merkle root of a snapshot, computed over stored bytes: equal to
/// `mabe_abe::Snapshot::merkle_root` of the same rows (FORMAT.md §6; checked
/// by the tests). `rows` must be ordered by (record, row).
pub fn snapshot_root(attribute: &str, version: u32, rows: &[SnapRow]) -> [u8; 32] {
    let leaf_prefix = {
        let mut p = Vec::with_capacity(9 + attribute.len());
        p.push(0u8);
        p.extend_from_slice(&(attribute.len() as u32).to_be_bytes());
        p.extend_from_slice(attribute.as_bytes());
        p.extend_from_slice(&version.to_be_bytes());
        p
    };
    let mut level: Vec<[u8; 32]> = rows
        .iter()
        .map(|r| {
            let mut h = Sha256::new();
            h.update(&leaf_prefix);
            h.update(r.record_id);
            h.update(r.row.to_be_bytes());
            h.update(r.c2);
            h.finalize().into()
        })
        .collect();
    if level.is_empty() {
        let mut h = Sha256::new();
        h.update([2u8]);
        h.update((attribute.len() as u32).to_be_bytes());
        h.update(attribute.as_bytes());
        h.update(version.to_be_bytes());
        return h.finalize().into();
    }
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| match pair {
                [l, r] => {
                    let mut h = Sha256::new();
                    h.update([1u8]);
                    h.update(l);
                    h.update(r);
                    h.finalize().into()
                }
                [one] => *one,
                _ => [0u8; 32],
            })
            .collect();
    }
    level.first().copied().unwrap_or([0u8; 32])
}

/// The PostgreSQL advisory lock key of an attribute: the first 8 bytes of
/// `SHA-256("MABE-V1-PROXY-LOCK" ‖ attribute)`, big-endian.
pub fn attribute_lock_key(attribute: &str) -> i64 {
    let d = Sha256::new()
        .chain_update(b"MABE-V1-PROXY-LOCK")
        .chain_update(attribute.as_bytes())
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// `Version` of a stored `u32`, refusing 0 (stored data is checked on read).
pub fn version_of(v: u32) -> Result<Version> {
    if v == 0 {
        return Err(ProxyError::Corrupt("version 0 in the database".into()));
    }
    Ok(Version::new(v))
}

/// A fixed-length byte array from a database column.
pub(crate) fn fixed<const N: usize>(b: &[u8], what: &str) -> Result<[u8; N]> {
    b.try_into().map_err(|_| {
        ProxyError::Corrupt(format!(
            "{what} is {} bytes in the database, not {N}",
            b.len()
        ))
    })
}

/// A non-negative database integer as `u64`.
pub(crate) fn non_negative(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| ProxyError::Corrupt(format!("negative {what} in the database")))
}

/// A database integer as `u32`.
pub(crate) fn small(v: i64, what: &str) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| ProxyError::Corrupt(format!("{what} out of range in the database")))
}
