//! The FO-transformed KEM and the ciphertext header (DESIGN §2, FORMAT.md §3).

use std::{collections::BTreeMap, fmt, sync::Arc};

use ark_bls12_381::{Bls12_381, Fr, G1Affine, G1Projective};
use ark_ec::{AffineRepr, CurveGroup, pairing::Pairing};
use ark_ff::{One, Zero};
use ark_std::rand::{CryptoRng, RngCore};
use hkdf::Hkdf;
use mabe_policy::{Attribute, Lsss, Policy, PolicyError};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::{
    AbeError, RecordId, UserKeyRing, Version,
    group::{G2Prepared, Gt, egg_base},
    kdf::{TAG_DEM, TAG_FO, TAG_HDR, TAG_MASK, hs},
    keys::{PreparedPublicKey, PublicKeyRing, g1_mul_many},
    wire::{G1_LEN, GT_LEN, Kind, Reader, Writer, g1_bytes, gt_bytes},
};

/// Suite identifier: BLS12-381, Lewko–Waters LSSS, FO KEM, STREAM AES-256-GCM.
pub const SUITE_ID: u16 = 1;
/// Default payload segment size (64 KiB).
pub const DEFAULT_SEGMENT_SIZE: u32 = 64 * 1024;
/// Smallest allowed segment size.
pub const MIN_SEGMENT_SIZE: u32 = 1024;
/// Largest allowed segment size (bounds a decryptor's memory).
pub const MAX_SEGMENT_SIZE: u32 = 16 * 1024 * 1024;
/// Largest encoded header accepted (1024 rows and a 64 KiB policy fit).
pub const MAX_HEADER_LEN: usize = 1 << 20;

const ROW_LEN: usize = 4 + GT_LEN + 2 * G1_LEN;

/// Options for encryption.
///
/// ```
/// use mabe_abe::EncryptOptions;
/// assert_eq!(EncryptOptions::default().segment_size, 65536);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncryptOptions {
    /// Plaintext bytes per payload segment (1 KiB ..= 16 MiB).
    pub segment_size: u32,
}

impl Default for EncryptOptions {
    fn default() -> Self {
        EncryptOptions {
            segment_size: DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// One row of a header: the attribute `ρ(x)`, its version and `(C1, C2, C3)`.
#[derive(Clone, PartialEq, Eq)]
pub struct HeaderRow {
    pub(crate) attribute: Attribute,
    pub(crate) version: Version,
    pub(crate) c1: Gt,
    pub(crate) c2: G1Affine,
    pub(crate) c3: G1Affine,
}

impl fmt::Debug for HeaderRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeaderRow")
            .field("attribute", &self.attribute)
            .field("version", &self.version)
            .field(
                "c2",
                &format_args!("{}…", crate::keys::hex_prefix(&g1_bytes(&self.c2))),
            )
            .finish_non_exhaustive()
    }
}

impl HeaderRow {
    /// The attribute of this row.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }
    /// The attribute version this row is encrypted under.
    pub fn version(&self) -> Version {
        self.version
    }
    /// `C1 ∈ GT`.
    pub fn c1(&self) -> &Gt {
        &self.c1
    }
    /// `C2 ∈ G1` (never changes, even under revocation).
    pub fn c2(&self) -> &G1Affine {
        &self.c2
    }
    /// `C3 ∈ G1`.
    pub fn c3(&self) -> &G1Affine {
        &self.c3
    }
}

/// A record's ciphertext header: the KEM part, stored apart from the payload
/// and updated in place by the revocation proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub(crate) rid: RecordId,
    pub(crate) policy: Policy,
    pub(crate) policy_text: String,
    pub(crate) rows: Vec<HeaderRow>,
    pub(crate) c0: [u8; 32],
    pub(crate) nonce_prefix: [u8; 7],
    pub(crate) segment_size: u32,
    pub(crate) kc: [u8; 32],
}

/// The data-encapsulation key of one record and the parameters of its payload
/// stream. Secret: zeroized on drop, not printed, not `Clone`.
pub struct RecordKey {
    pub(crate) dek: Zeroizing<[u8; 32]>,
    pub(crate) h_auth: [u8; 32],
    pub(crate) nonce_prefix: [u8; 7],
    pub(crate) segment_size: u32,
}

impl fmt::Debug for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordKey")
            .field("segment_size", &self.segment_size)
            .finish_non_exhaustive()
    }
}

/// Leaves of a (validated) policy in left-to-right order, without recursion.
pub(crate) fn leaves(policy: &Policy) -> Vec<Attribute> {
    let mut out = Vec::new();
    let mut stack = vec![policy];
    while let Some(p) = stack.pop() {
        match p {
            Policy::Leaf(a) => out.push(a.clone()),
            Policy::And(c) | Policy::Or(c) | Policy::Threshold { children: c, .. } => {
                stack.extend(c.iter().rev());
            }
        }
    }
    out
}

impl Header {
    /// The record id.
    pub fn rid(&self) -> RecordId {
        self.rid
    }
    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }
    /// The canonical policy text (as stored and hashed).
    pub fn policy_text(&self) -> &str {
        &self.policy_text
    }
    /// The rows, in the policy's leaf order.
    pub fn rows(&self) -> &[HeaderRow] {
        &self.rows
    }
    /// `C0 = m ⊕ mask`.
    pub fn c0(&self) -> &[u8; 32] {
        &self.c0
    }
    /// The 7-byte payload nonce prefix.
    pub fn nonce_prefix(&self) -> &[u8; 7] {
        &self.nonce_prefix
    }
    /// Plaintext bytes per payload segment.
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }
    /// The key commitment `KC`.
    pub fn key_commitment(&self) -> &[u8; 32] {
        &self.kc
    }

    /// `H_imm = SHA-256("MABE-V1-HDR" ‖ suite ‖ rid ‖ lp(policy) ‖ u32(n) ‖ lp(ρ(1)) … lp(ρ(n)))`:
    /// the hash of the fields revocation never changes.
    pub fn h_imm(&self) -> [u8; 32] {
        h_imm(
            &self.rid,
            &self.policy_text,
            self.rows.iter().map(|r| &r.attribute),
        )
    }

    /// `H_auth = SHA-256(H_imm ‖ C0 ‖ C2_1 … C2_n ‖ nonce_prefix ‖ u32(segment_size))`,
    /// the associated data of every payload segment.
    pub fn h_auth(&self) -> [u8; 32] {
        self.h_auth_with(&self.h_imm())
    }

    fn h_auth_with(&self, h_imm: &[u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(h_imm);
        h.update(self.c0);
        for r in &self.rows {
            h.update(g1_bytes(&r.c2));
        }
        h.update(self.nonce_prefix);
        h.update(self.segment_size.to_be_bytes());
        h.finalize().into()
    }

    /// Encode (FORMAT.md §3).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer::new(
            Kind::Header,
            64 + self.policy_text.len() + self.rows.len() * ROW_LEN + 80,
        );
        w.u16(SUITE_ID);
        w.bytes(self.rid.as_bytes());
        w.lp(self.policy_text.as_bytes());
        w.u32(self.rows.len() as u32);
        for r in &self.rows {
            w.u32(r.version.get());
            w.gt(&r.c1);
            w.g1(&r.c2);
            w.g1(&r.c3);
        }
        w.bytes(&self.c0);
        w.bytes(&self.nonce_prefix);
        w.u32(self.segment_size);
        w.bytes(&self.kc);
        w.finish()
    }

    /// Decode with full validation: magic, suite, canonical policy text within
    /// limits, row count equal to the policy's leaves, every point on the curve
    /// and in its prime-order subgroup, GT elements in GT, segment size within
    /// bounds, no trailing bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Header, AbeError> {
        let mut r = Reader::new(bytes, Kind::Header, MAX_HEADER_LEN)?;
        if r.u16()? != SUITE_ID {
            return Err(r.bad("unknown suite"));
        }
        let rid = RecordId::from_bytes(r.array()?);
        let policy_text = r.str(mabe_policy::MAX_POLICY_LEN)?.to_owned();
        let policy = mabe_policy::parse(&policy_text)?;
        if policy.to_string() != policy_text {
            return Err(r.bad("policy text is not in canonical form"));
        }
        let attrs = leaves(&policy);
        let n = r.u32()? as usize;
        if n != attrs.len() {
            return Err(r.bad("row count differs from the policy's leaves"));
        }
        let mut rows = Vec::with_capacity(n);
        for attribute in attrs {
            let version = r.version()?;
            let c1 = r.gt()?;
            let c2 = r.g1()?;
            let c3 = r.g1()?;
            rows.push(HeaderRow {
                attribute,
                version,
                c1,
                c2,
                c3,
            });
        }
        let c0 = r.array()?;
        let nonce_prefix = r.array()?;
        let segment_size = r.u32()?;
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size) {
            return Err(r.bad("segment size out of range"));
        }
        let kc = r.array()?;
        r.finish()?;
        Ok(Header {
            rid,
            policy,
            policy_text,
            rows,
            c0,
            nonce_prefix,
            segment_size,
            kc,
        })
    }
}

fn h_imm<'a>(
    rid: &RecordId,
    policy_text: &str,
    attrs: impl ExactSizeIterator<Item = &'a Attribute>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(TAG_HDR);
    h.update(SUITE_ID.to_be_bytes());
    h.update(rid.as_bytes());
    h.update((policy_text.len() as u32).to_be_bytes());
    h.update(policy_text.as_bytes());
    h.update((attrs.len() as u32).to_be_bytes());
    for a in attrs {
        let s = a.to_string();
        h.update((s.len() as u32).to_be_bytes());
        h.update(s.as_bytes());
    }
    h.finalize().into()
}

/// `mask = HKDF-SHA-256(ikm = ser(Z), salt = "MABE-V1-MASK", info = H_imm, L = 32)`.
fn mask(z: &Gt, h_imm: &[u8; 32]) -> Zeroizing<[u8; 32]> {
    let ser = Zeroizing::new(gt_bytes(z));
    let hk = Hkdf::<Sha256>::new(Some(TAG_MASK), ser.as_ref());
    let mut out = Zeroizing::new([0u8; 32]);
    let _ = hk.expand(h_imm, out.as_mut());
    out
}

/// `DEK ‖ KC = HKDF-SHA-256(ikm = m, salt = H_auth, info = "MABE-V1-DEM", L = 64)`.
fn dem_keys(m: &[u8; 32], h_auth: &[u8; 32]) -> (Zeroizing<[u8; 32]>, [u8; 32]) {
    let hk = Hkdf::<Sha256>::new(Some(h_auth), m);
    let mut okm = Zeroizing::new([0u8; 64]);
    let _ = hk.expand(TAG_DEM, okm.as_mut());
    let mut dek = Zeroizing::new([0u8; 32]);
    let mut kc = [0u8; 32];
    dek.copy_from_slice(&okm[..32]);
    kc.copy_from_slice(&okm[32..]);
    (dek, kc)
}

/// Rows `(C1, C2, C3)` and `Z = egg^s` for the coins derived from `m`.
struct Encrypted {
    rows: Vec<(Gt, G1Affine, G1Affine)>,
    z: Zeroizing<Gt>,
}

fn be32(i: usize) -> [u8; 4] {
    (i as u32).to_be_bytes()
}

/// Derive the coins from `m` and compute every row (DESIGN §2 steps 3–6).
/// Shared by encryption and by the decryptor's re-encryption check.
fn compute_rows(
    lsss: &Lsss<Fr>,
    pks: &[Arc<PreparedPublicKey>],
    m: &[u8; 32],
    h_imm: &[u8; 32],
) -> Encrypted {
    let prk = Hkdf::<Sha256>::new(Some(TAG_FO), m);
    let l = lsss.columns().max(1);
    let n = lsss.len();
    // u = (s, v_2, …, v_ℓ), w = (0, w_2, …, w_ℓ); columns are numbered from 1.
    let mut u: Zeroizing<Vec<Fr>> = Zeroizing::new(Vec::with_capacity(l));
    let mut w: Zeroizing<Vec<Fr>> = Zeroizing::new(Vec::with_capacity(l));
    u.push(hs(&prk, &[h_imm, b"s"]));
    w.push(Fr::zero());
    for k in 2..=l {
        u.push(hs(&prk, &[h_imm, b"v", &be32(k)]));
        w.push(hs(&prk, &[h_imm, b"w", &be32(k)]));
    }
    // Scalars for egg: λ_1..λ_n then s. Scalars for g1: r_1..r_n then ω_1..ω_n.
    let mut egg_scalars: Zeroizing<Vec<Fr>> = Zeroizing::new(Vec::with_capacity(n + 1));
    let mut g1_scalars: Zeroizing<Vec<Fr>> = Zeroizing::new(vec![Fr::zero(); 2 * n]);
    for (x, row) in lsss.rows().iter().enumerate() {
        egg_scalars.push(row.dot(&u));
        g1_scalars[x] = hs(&prk, &[h_imm, b"r", &be32(x + 1)]);
        g1_scalars[n + x] = row.dot(&w);
    }
    egg_scalars.push(u[0]);
    // egg^λ_x are shares of the secret and egg^s is Z: wiped on drop.
    let egg_pows: Zeroizing<Vec<Gt>> = Zeroizing::new(egg_base().mul_many(&egg_scalars));
    let g1_pows = g1_mul_many(&g1_scalars);

    // E^{r_x} and Y^{r_x}, batched per distinct public key.
    let mut by_key: BTreeMap<(Attribute, Version), Vec<usize>> = BTreeMap::new();
    for (x, pk) in pks.iter().enumerate() {
        by_key
            .entry((pk.pk.attribute().clone(), pk.pk.version()))
            .or_default()
            .push(x);
    }
    let mut e_r = vec![Gt::zero(); n];
    let mut y_r = vec![G1Affine::zero(); n];
    for xs in by_key.values() {
        let Some(pk) = xs.first().and_then(|&x| pks.get(x)) else {
            continue;
        };
        let rs: Zeroizing<Vec<Fr>> = Zeroizing::new(xs.iter().map(|&x| g1_scalars[x]).collect());
        for ((&x, e), y) in xs
            .iter()
            .zip(pk.e_base.mul_many(&rs))
            .zip(pk.y_base.mul_many(&rs))
        {
            e_r[x] = e;
            y_r[x] = y;
        }
    }
    let c3: Vec<G1Projective> = (0..n).map(|x| y_r[x] + g1_pows[n + x]).collect();
    let c3 = G1Projective::normalize_batch(&c3);
    let rows = (0..n)
        .map(|x| (egg_pows[x] + e_r[x], g1_pows[x], c3[x]))
        .collect();
    Encrypted {
        rows,
        z: Zeroizing::new(egg_pows[n]),
    }
}

/// Encapsulate: build the header for `policy` under the current version of
/// every attribute in `pks`, and return it with the record's data key.
///
/// Fails with [`AbeError::MissingPublicKey`] if an attribute of the policy has
/// no public key in `pks`.
pub fn encapsulate<R: RngCore + CryptoRng + ?Sized>(
    policy: &Policy,
    pks: &PublicKeyRing,
    options: &EncryptOptions,
    rng: &mut R,
) -> Result<(Header, RecordKey), AbeError> {
    if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&options.segment_size) {
        return Err(AbeError::InvalidParameter(
            "segment size must be between 1 KiB and 16 MiB",
        ));
    }
    let lsss = Lsss::<Fr>::from_policy(policy)?;
    let policy_text = policy.to_string();
    let mut prepared = Vec::with_capacity(lsss.len());
    for row in lsss.rows() {
        let pk =
            pks.current_prepared(row.attribute())
                .ok_or_else(|| AbeError::MissingPublicKey {
                    attribute: row.attribute().clone(),
                    version: None,
                })?;
        prepared.push(Arc::clone(pk));
    }
    let mut m = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(m.as_mut());
    let mut rid = [0u8; 16];
    rng.fill_bytes(&mut rid);
    let rid = RecordId::from_bytes(rid);
    let mut nonce_prefix = [0u8; 7];
    rng.fill_bytes(&mut nonce_prefix);

    let h = h_imm(
        &rid,
        &policy_text,
        lsss.rows().iter().map(|r| r.attribute()),
    );
    let enc = compute_rows(&lsss, &prepared, &m, &h);
    let mk = mask(&enc.z, &h);
    let mut c0 = [0u8; 32];
    for (c, (a, b)) in c0.iter_mut().zip(m.iter().zip(mk.iter())) {
        *c = a ^ b;
    }
    let rows = lsss
        .rows()
        .iter()
        .zip(prepared.iter())
        .zip(enc.rows)
        .map(|((row, pk), (c1, c2, c3))| HeaderRow {
            attribute: row.attribute().clone(),
            version: pk.pk.version(),
            c1,
            c2,
            c3,
        })
        .collect();
    let mut header = Header {
        rid,
        policy: policy.clone(),
        policy_text,
        rows,
        c0,
        nonce_prefix,
        segment_size: options.segment_size,
        kc: [0u8; 32],
    };
    let h_auth = header.h_auth_with(&h);
    let (dek, kc) = dem_keys(&m, &h_auth);
    header.kc = kc;
    Ok((
        header,
        RecordKey {
            dek,
            h_auth,
            nonce_prefix,
            segment_size: options.segment_size,
        },
    ))
}

/// Decapsulate: recover the record key with the keys in `keys`.
///
/// Before any cryptography, reports [`AbeError::Unsatisfied`] (with a smallest
/// set of missing attributes), [`AbeError::KeyVersionMismatch`] or
/// [`AbeError::MissingPublicKey`]. Then computes `Z` as one multi-pairing over
/// the fewest satisfying rows, unmasks `m`, re-encrypts **every** row from the
/// coins derived from `m` and compares, and checks the key commitment. Any
/// cryptographic failure is the single [`AbeError::DecryptionFailed`].
pub fn decapsulate(
    header: &Header,
    keys: &UserKeyRing,
    pks: &PublicKeyRing,
) -> Result<RecordKey, AbeError> {
    let lsss = Lsss::<Fr>::from_policy(&header.policy)?;
    let selection = select_rows(header, &lsss, keys)?;
    decapsulate_rows(header, &lsss, keys, pks, &selection)
}

/// The core of decapsulation without the re-encryption check: row selection
/// and `Z` as one multi-pairing. Only for benchmarks (to compare the core
/// path with the bare multi-pairing); it proves nothing about the header.
/// Available with the `hazmat` feature only.
#[cfg(feature = "hazmat")]
#[doc(hidden)]
pub fn decapsulate_core(header: &Header, keys: &UserKeyRing) -> Result<Gt, AbeError> {
    let lsss = Lsss::<Fr>::from_policy(&header.policy)?;
    let selection = select_rows(header, &lsss, keys)?;
    compute_z(header, keys, &selection)
}

/// Rows and coefficients to use, or the error a person can act on.
fn select_rows(
    header: &Header,
    lsss: &Lsss<Fr>,
    keys: &UserKeyRing,
) -> Result<Vec<(usize, Fr)>, AbeError> {
    if lsss.len() != header.rows.len() {
        return Err(AbeError::DecryptionFailed);
    }
    let rows = &header.rows;
    let usable = |x: usize, a: &Attribute| matches!((keys.get(a), rows.get(x)), (Some(k), Some(r)) if k.version() == r.version);
    match lsss.solve(usable) {
        Ok(s) => Ok(s.rows().to_vec()),
        Err(PolicyError::Unsatisfied { missing }) => {
            // Distinguish "no key at all" from "key at another version".
            Err(match lsss.solve(|_, a: &Attribute| keys.get(a).is_some()) {
                Ok(by_attr) => by_attr
                    .rows()
                    .iter()
                    .find_map(|&(x, _)| {
                        let row = rows.get(x)?;
                        let k = keys.get(&row.attribute)?;
                        (k.version() != row.version).then(|| AbeError::KeyVersionMismatch {
                            attribute: row.attribute.clone(),
                            held: k.version(),
                            needed: row.version,
                        })
                    })
                    .unwrap_or(AbeError::DecryptionFailed),
                Err(_) => AbeError::Unsatisfied {
                    missing,
                    held: keys.attributes(),
                },
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Decapsulate with a caller-chosen row set and coefficients, skipping the
/// satisfiability check. Exists so that tests can show that the *cryptography*
/// refuses non-satisfying key sets; applications use [`decapsulate`].
/// Available with the `hazmat` feature only.
#[cfg(feature = "hazmat")]
#[doc(hidden)]
pub fn decapsulate_forced(
    header: &Header,
    keys: &UserKeyRing,
    pks: &PublicKeyRing,
    selection: &[(usize, Fr)],
) -> Result<RecordKey, AbeError> {
    let lsss = Lsss::<Fr>::from_policy(&header.policy)?;
    decapsulate_rows(header, &lsss, keys, pks, selection)
}

fn decapsulate_rows(
    header: &Header,
    lsss: &Lsss<Fr>,
    keys: &UserKeyRing,
    pks: &PublicKeyRing,
    selection: &[(usize, Fr)],
) -> Result<RecordKey, AbeError> {
    // Public keys of every row at the row's version (needed for the check).
    let mut prepared = Vec::with_capacity(header.rows.len());
    for row in &header.rows {
        let pk = pks.prepared(&row.attribute, row.version).ok_or_else(|| {
            AbeError::MissingPublicKey {
                attribute: row.attribute.clone(),
                version: Some(row.version),
            }
        })?;
        prepared.push(Arc::clone(pk));
    }

    let z = Zeroizing::new(compute_z(header, keys, selection)?);

    let h = header.h_imm();
    let mk = mask(&z, &h);
    let mut m = Zeroizing::new([0u8; 32]);
    for (o, (a, b)) in m.iter_mut().zip(header.c0.iter().zip(mk.iter())) {
        *o = a ^ b;
    }

    // FO check: re-encrypt every row with the claimed versions' keys.
    let enc = compute_rows(lsss, &prepared, &m, &h);
    let mut ok = *enc.z == *z;
    for (row, (c1, c2, c3)) in header.rows.iter().zip(enc.rows.iter()) {
        ok &= row.c1 == *c1 && row.c2 == *c2 && row.c3 == *c3;
    }
    let h_auth = header.h_auth_with(&h);
    let (dek, kc) = dem_keys(&m, &h_auth);
    let kc_ok: bool = kc.ct_eq(&header.kc).into();
    if !(ok && kc_ok) {
        return Err(AbeError::DecryptionFailed);
    }
    Ok(RecordKey {
        dek,
        h_auth,
        nonce_prefix: header.nonce_prefix,
        segment_size: header.segment_size,
    })
}

/// `Z = Π C1_x^{c_x} · e(Σ c_x·C3_x, H(GID)) · Π e(−c_x·C2_x, K_x)` as one
/// multi-pairing (|X|+1 Miller loops, one final exponentiation).
fn compute_z(
    header: &Header,
    keys: &UserKeyRing,
    selection: &[(usize, Fr)],
) -> Result<Gt, AbeError> {
    let mut c1_prod = Gt::zero();
    let mut c3_sum = G1Projective::zero();
    let mut g1s: Vec<G1Projective> = Vec::with_capacity(selection.len() + 1);
    let mut g2s: Vec<G2Prepared> = Vec::with_capacity(selection.len() + 1);
    g1s.push(G1Projective::zero()); // placeholder for Σ c_x·C3_x
    g2s.push(keys.hashed_gid().prepared().clone());
    for &(x, c) in selection {
        let row = header.rows.get(x).ok_or(AbeError::DecryptionFailed)?;
        let (key, kprep) = keys
            .prepared(&row.attribute)
            .ok_or(AbeError::DecryptionFailed)?;
        if key.version() != row.version {
            return Err(AbeError::DecryptionFailed);
        }
        if c.is_one() {
            c1_prod += row.c1;
            c3_sum += row.c3;
            g1s.push(-row.c2.into_group());
        } else {
            c1_prod += row.c1 * c;
            c3_sum += row.c3 * c;
            g1s.push(row.c2 * (-c));
        }
        g2s.push(kprep.clone());
    }
    g1s[0] = c3_sum;
    let g1s = G1Projective::normalize_batch(&g1s);
    Ok(c1_prod + Bls12_381::multi_pairing(g1s, g2s))
}
