//! Revocation primitives (DESIGN §3): update secrets, snapshots, update
//! tokens `(T1, T3)` and their all-or-nothing application to a header.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use ark_bls12_381::{Bls12_381, Fr, G1Affine, G1Projective, G2Affine, G2Projective};
use ark_ec::{AffineRepr, CurveGroup, PrimeGroup, pairing::Pairing};
use ark_std::rand::RngCore;
use mabe_policy::Attribute;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::{
    AbeError, Header, RecordId, Version,
    group::{G2Prepared, Gt, blinded_mul},
    keys::{read_attribute, wipe_prepared},
    wire::{Kind, Reader, Writer, g1_bytes},
};

/// The update secret `(Δα, Δy)` of one rotation `v → v+1` of an attribute.
///
/// It never leaves the authority; it is erased once every token of the
/// rotation has been applied. Zeroized on drop, not printed, not `Clone`.
pub struct UpdateSecret {
    attribute: Attribute,
    from: Version,
    delta_alpha: Fr,
    delta_y: Fr,
}

impl Drop for UpdateSecret {
    fn drop(&mut self) {
        self.delta_alpha.zeroize();
        self.delta_y.zeroize();
    }
}

impl fmt::Debug for UpdateSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateSecret")
            .field("attribute", &self.attribute)
            .field("from", &self.from)
            .finish_non_exhaustive()
    }
}

impl UpdateSecret {
    pub(crate) fn new(attribute: Attribute, from: Version, delta_alpha: Fr, delta_y: Fr) -> Self {
        UpdateSecret {
            attribute,
            from,
            delta_alpha,
            delta_y,
        }
    }

    /// The attribute being rotated.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }
    /// The version rows are moved away from.
    pub fn from_version(&self) -> Version {
        self.from
    }

    /// Encode for sealed storage: `MABE 'U' 1 ‖ lp(attribute) ‖ from ‖ Δα ‖ Δy`.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let attr = self.attribute.to_string();
        let mut w = Writer::new(Kind::UpdateSecret, attr.len() + 72);
        w.lp(attr.as_bytes());
        w.u32(self.from.get());
        w.fr(&self.delta_alpha);
        w.fr(&self.delta_y);
        Zeroizing::new(w.finish())
    }

    /// Decode what [`UpdateSecret::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AbeError> {
        let mut r = Reader::new(bytes, Kind::UpdateSecret, 512)?;
        let attribute = read_attribute(&mut r)?;
        let from = r.version()?;
        let delta_alpha = r.fr_nonzero()?;
        let delta_y = r.fr_nonzero()?;
        r.finish()?;
        Ok(UpdateSecret {
            attribute,
            from,
            delta_alpha,
            delta_y,
        })
    }

    /// A token generator restricted to the rows of `snapshot`, which must be
    /// a snapshot of this secret's (attribute, version).
    pub fn token_generator<R: RngCore + ?Sized>(
        &self,
        snapshot: Snapshot,
        rng: &mut R,
    ) -> Result<TokenGenerator, AbeError> {
        if snapshot.attribute != self.attribute || snapshot.version != self.from {
            return Err(AbeError::UpdateRefused(
                "snapshot is for another attribute or version",
            ));
        }
        let q: G2Affine =
            blinded_mul(&G2Projective::generator(), &self.delta_alpha, rng).into_affine();
        let mut q = q;
        let prepared = G2Prepared::from(q);
        q.zeroize();
        Ok(TokenGenerator {
            attribute: self.attribute.clone(),
            from: self.from,
            q: prepared,
            delta_y: self.delta_y,
            snapshot,
            issued: BTreeSet::new(),
        })
    }
}

/// One row affected by a rotation: which record, which row, and its `C2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    /// The record.
    pub record: RecordId,
    /// Row index in the record's header (0-based).
    pub row: u32,
    /// The row's `C2` (immutable, so it identifies the row's coins).
    pub c2: G1Affine,
}

impl Header {
    /// The rows of this header at `(attribute, version)`: what a proxy returns
    /// when it freezes that version.
    pub fn snapshot_rows(&self, attribute: &Attribute, version: Version) -> Vec<SnapshotRow> {
        self.rows
            .iter()
            .enumerate()
            .filter(|(_, r)| &r.attribute == attribute && r.version == version)
            .map(|(i, r)| SnapshotRow {
                record: self.rid,
                row: i as u32,
                c2: r.c2,
            })
            .collect()
    }

    /// Apply the update tokens of one rotation to this header: **all** rows of
    /// the attribute at the tokens' version are updated (`C1 ← C1·T1`,
    /// `C3 ← C3·T3`, `v ← v+1`), or none is and an error says why. Tokens for a
    /// different record, a missing or extra row, a repeat, or a `C2` that does
    /// not match are refused.
    pub fn apply_tokens(&mut self, tokens: &[UpdateToken]) -> Result<(), AbeError> {
        let first = tokens.first().ok_or(AbeError::UpdateRefused("no tokens"))?;
        let (attribute, from) = (&first.attribute, first.from);
        if tokens
            .iter()
            .any(|t| &t.attribute != attribute || t.from != from)
        {
            return Err(AbeError::UpdateRefused(
                "tokens of one batch must share attribute and version",
            ));
        }
        if tokens.iter().any(|t| t.record != self.rid) {
            return Err(AbeError::UpdateRefused("token is for another record"));
        }
        let to = from.next()?;
        let affected: BTreeSet<u32> = self
            .snapshot_rows(attribute, from)
            .iter()
            .map(|r| r.row)
            .collect();
        if affected.is_empty() {
            return Err(AbeError::UpdateRefused(
                "no row of this record is at that version (already updated?)",
            ));
        }
        let given: BTreeSet<u32> = tokens.iter().map(|t| t.row).collect();
        if given.len() != tokens.len() {
            return Err(AbeError::UpdateRefused("two tokens for the same row"));
        }
        if given != affected {
            return Err(AbeError::UpdateRefused(
                "tokens must cover exactly the record's rows at that version",
            ));
        }
        for t in tokens {
            let row = self
                .rows
                .get(t.row as usize)
                .ok_or(AbeError::UpdateRefused("row index out of range"))?;
            if row.c2 != t.c2 {
                return Err(AbeError::UpdateRefused(
                    "token was computed for a different C2",
                ));
            }
        }
        // Every check passed: now apply all of them.
        let mut c3s: Vec<G1Projective> = Vec::with_capacity(tokens.len());
        for t in tokens {
            if let Some(row) = self.rows.get(t.row as usize) {
                c3s.push(row.c3 + t.t3);
            }
        }
        let c3s = G1Projective::normalize_batch(&c3s);
        for (t, c3) in tokens.iter().zip(c3s) {
            if let Some(row) = self.rows.get_mut(t.row as usize) {
                row.c1 += t.t1;
                row.c3 = c3;
                row.version = to;
            }
        }
        Ok(())
    }
}

/// The set of rows at `(attribute, version)` that a rotation must update,
/// collected from every proxy when it froze that version.
///
/// ```
/// use mabe_abe::{Snapshot, Version};
/// let s = Snapshot::new("cardiology@hospital-a".parse()?, Version::FIRST);
/// assert_eq!(s.len(), 0);
/// assert_eq!(s.merkle_root(), Snapshot::new("cardiology@hospital-a".parse()?, Version::FIRST).merkle_root());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    attribute: Attribute,
    version: Version,
    rows: BTreeMap<(RecordId, u32), G1Affine>,
}

impl Snapshot {
    /// An empty snapshot of `(attribute, version)`.
    pub fn new(attribute: Attribute, version: Version) -> Self {
        Snapshot {
            attribute,
            version,
            rows: BTreeMap::new(),
        }
    }

    /// Add a row. Adding the same row twice is a no-op; the same
    /// (record, row) with another `C2` is refused.
    pub fn insert(&mut self, row: SnapshotRow) -> Result<(), AbeError> {
        match self.rows.get(&(row.record, row.row)) {
            Some(c2) if *c2 != row.c2 => Err(AbeError::UpdateRefused(
                "conflicting C2 for a row already in the snapshot",
            )),
            Some(_) => Ok(()),
            None => {
                self.rows.insert((row.record, row.row), row.c2);
                Ok(())
            }
        }
    }

    /// The attribute.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }
    /// The version frozen.
    pub fn version(&self) -> Version {
        self.version
    }
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// The rows, ordered by (record, row).
    pub fn rows(&self) -> impl Iterator<Item = SnapshotRow> + '_ {
        self.rows
            .iter()
            .map(|(&(record, row), &c2)| SnapshotRow { record, row, c2 })
    }

    /// Whether `row` (with this exact `C2`) is in the snapshot.
    pub fn contains(&self, row: &SnapshotRow) -> bool {
        self.rows.get(&(row.record, row.row)) == Some(&row.c2)
    }

    /// Merkle root over the rows in (record, row) order (FORMAT.md §6): leaf
    /// `SHA-256(0x00 ‖ lp(attribute) ‖ version ‖ rid ‖ row ‖ C2)`, node
    /// `SHA-256(0x01 ‖ left ‖ right)`, an odd node is carried up unchanged,
    /// the empty snapshot's root is `SHA-256(0x02 ‖ lp(attribute) ‖ version)`.
    pub fn merkle_root(&self) -> [u8; 32] {
        let attr = self.attribute.to_string();
        let mut level: Vec<[u8; 32]> = self
            .rows()
            .map(|r| {
                let mut h = Sha256::new();
                h.update([0u8]);
                h.update((attr.len() as u32).to_be_bytes());
                h.update(attr.as_bytes());
                h.update(self.version.get().to_be_bytes());
                h.update(r.record.as_bytes());
                h.update(r.row.to_be_bytes());
                h.update(g1_bytes(&r.c2));
                h.finalize().into()
            })
            .collect();
        if level.is_empty() {
            let mut h = Sha256::new();
            h.update([2u8]);
            h.update((attr.len() as u32).to_be_bytes());
            h.update(attr.as_bytes());
            h.update(self.version.get().to_be_bytes());
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
}

/// Computes update tokens for the rows of one snapshot, each at most once.
pub struct TokenGenerator {
    attribute: Attribute,
    from: Version,
    /// `g2^{Δα}` prepared: `T1 = e(C2, g2^{Δα}) = e(C2^{Δα}, g2)`.
    q: G2Prepared,
    delta_y: Fr,
    snapshot: Snapshot,
    issued: BTreeSet<(RecordId, u32)>,
}

impl Drop for TokenGenerator {
    fn drop(&mut self) {
        wipe_prepared(&mut self.q);
        self.delta_y.zeroize();
    }
}

impl fmt::Debug for TokenGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenGenerator")
            .field("attribute", &self.attribute)
            .field("from", &self.from)
            .field("rows", &self.snapshot.len())
            .field("issued", &self.issued.len())
            .finish_non_exhaustive()
    }
}

impl TokenGenerator {
    /// Compute the token for `row`, refusing rows outside the snapshot
    /// (including a known row presented with another `C2`) and rows that
    /// already got a token.
    pub fn issue<R: RngCore + ?Sized>(
        &mut self,
        row: &SnapshotRow,
        rng: &mut R,
    ) -> Result<UpdateToken, AbeError> {
        if self.issued.contains(&(row.record, row.row)) {
            return Err(AbeError::UpdateRefused(
                "a token was already issued for this row",
            ));
        }
        let t = self.compute(row, rng)?;
        self.issued.insert((row.record, row.row));
        Ok(t)
    }

    /// Compute the token for `row` without recording it as issued (for
    /// workers that share a generator and record progress elsewhere). Still
    /// refuses rows outside the snapshot.
    pub fn compute<R: RngCore + ?Sized>(
        &self,
        row: &SnapshotRow,
        rng: &mut R,
    ) -> Result<UpdateToken, AbeError> {
        if !self.snapshot.contains(row) {
            return Err(AbeError::UpdateRefused("row is not in the snapshot"));
        }
        let t1: Gt = Bls12_381::multi_pairing([row.c2], [self.q.clone()]);
        let t3 = blinded_mul(&row.c2.into_group(), &self.delta_y, rng).into_affine();
        Ok(UpdateToken {
            attribute: self.attribute.clone(),
            from: self.from,
            record: row.record,
            row: row.row,
            c2: row.c2,
            t1,
            t3,
        })
    }

    /// Mark rows as already done (when resuming a persisted job).
    pub fn mark_issued(&mut self, record: RecordId, row: u32) {
        self.issued.insert((record, row));
    }

    /// Rows of the snapshot that have no token yet.
    pub fn remaining(&self) -> usize {
        self.snapshot.len().saturating_sub(self.issued.len())
    }

    /// The snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

/// The proxy's update for one row: `T1 = e(C2^{Δα}, g2) ∈ GT`,
/// `T3 = C2^{Δy} ∈ G1`, bound to (attribute, version, record, row, C2).
#[derive(Clone, PartialEq, Eq)]
pub struct UpdateToken {
    attribute: Attribute,
    from: Version,
    record: RecordId,
    row: u32,
    c2: G1Affine,
    t1: Gt,
    t3: G1Affine,
}

impl fmt::Debug for UpdateToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateToken")
            .field("attribute", &self.attribute)
            .field("from", &self.from)
            .field("record", &self.record)
            .field("row", &self.row)
            .finish_non_exhaustive()
    }
}

impl UpdateToken {
    /// The attribute.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }
    /// The version the row moves away from.
    pub fn from_version(&self) -> Version {
        self.from
    }
    /// The record.
    pub fn record(&self) -> RecordId {
        self.record
    }
    /// The row index.
    pub fn row(&self) -> u32 {
        self.row
    }

    /// Encode: `MABE 'T' 1 ‖ lp(attribute) ‖ from ‖ rid ‖ row ‖ C2 ‖ T1 ‖ T3`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let attr = self.attribute.to_string();
        let mut w = Writer::new(Kind::Token, attr.len() + 700);
        w.lp(attr.as_bytes());
        w.u32(self.from.get());
        w.bytes(self.record.as_bytes());
        w.u32(self.row);
        w.g1(&self.c2);
        w.gt(&self.t1);
        w.g1(&self.t3);
        w.finish()
    }

    /// Decode with validation (points in their subgroups, no trailing bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AbeError> {
        let mut r = Reader::new(bytes, Kind::Token, 1024)?;
        let attribute = read_attribute(&mut r)?;
        let from = r.version()?;
        let record = RecordId::from_bytes(r.array()?);
        let row = r.u32()?;
        let c2 = r.g1()?;
        let t1 = r.gt()?;
        let t3 = r.g1()?;
        r.finish()?;
        Ok(UpdateToken {
            attribute,
            from,
            record,
            row,
            c2,
            t1,
            t3,
        })
    }
}
