//! Attribute key pairs, user keys and key rings (DESIGN §2).

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, OnceLock},
};

use ark_bls12_381::{Bls12_381, Fr, G1Affine, G1Projective, G2Affine, G2Projective};
use ark_ec::{AffineRepr, CurveGroup, PrimeGroup, pairing::Pairing};
use ark_ff::{UniformRand, Zero};
use ark_std::rand::{CryptoRng, RngCore};
use mabe_policy::Attribute;
use zeroize::{Zeroize, Zeroizing};

use crate::{
    AbeError, Gid, Version,
    group::{FixedBase, G2Prepared, Gt, blinded_mul, g1_base},
    kdf::DST_GID,
    revocation::UpdateSecret,
    wire::{Kind, Reader, Writer},
};

/// Longest attribute text (`name@authority`): 128 + 1 + 63 bytes.
pub(crate) const MAX_ATTRIBUTE_LEN: usize = 192;

pub(crate) fn random_nonzero<R: RngCore + CryptoRng + ?Sized>(rng: &mut R) -> Fr {
    loop {
        let s = Fr::rand(rng);
        if !s.is_zero() {
            return s;
        }
    }
}

pub(crate) fn read_attribute(r: &mut Reader<'_>) -> Result<Attribute, AbeError> {
    let text = r.str(MAX_ATTRIBUTE_LEN)?;
    let a: Attribute = text.parse().map_err(|_| r.bad("invalid attribute name"))?;
    if a.to_string() != text {
        return Err(r.bad("attribute not in canonical form"));
    }
    Ok(a)
}

/// Zeroize the line coefficients of a prepared G2 point derived from a secret.
pub(crate) fn wipe_prepared(p: &mut G2Prepared) {
    for (a, b, c) in p.ell_coeffs.iter_mut() {
        a.zeroize();
        b.zeroize();
        c.zeroize();
    }
}

/// An authority's secret for one attribute at one version: `(α, y)`.
///
/// Zeroized on drop; `Debug` prints no secret; not `Clone`.
///
/// ```
/// use mabe_abe::{AttributeSecretKey, Version};
/// # use ark_std::rand::SeedableRng;
/// let mut rng = ark_std::rand::rngs::StdRng::seed_from_u64(1); // OsRng in real code
/// let sk = AttributeSecretKey::generate("doctor@hospital-a".parse()?, Version::FIRST, &mut rng);
/// let pk = sk.public_key(&mut rng);
/// assert_eq!(pk.version(), Version::FIRST);
/// assert!(!format!("{sk:?}").contains("alpha"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AttributeSecretKey {
    attribute: Attribute,
    version: Version,
    alpha: Fr,
    y: Fr,
    /// `g2^α`, derived once so key generation pays one secret multiplication.
    g2_alpha: G2Affine,
}

impl Drop for AttributeSecretKey {
    fn drop(&mut self) {
        self.alpha.zeroize();
        self.y.zeroize();
        self.g2_alpha.zeroize();
    }
}

impl fmt::Debug for AttributeSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttributeSecretKey")
            .field("attribute", &self.attribute)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl AttributeSecretKey {
    /// Draw fresh `α, y ←$ Fr \ {0}` for `attribute` at `version`.
    pub fn generate<R: RngCore + CryptoRng + ?Sized>(
        attribute: Attribute,
        version: Version,
        rng: &mut R,
    ) -> Self {
        let alpha = random_nonzero(rng);
        let y = random_nonzero(rng);
        Self::from_parts(attribute, version, alpha, y, rng)
    }

    fn from_parts<R: RngCore + ?Sized>(
        attribute: Attribute,
        version: Version,
        alpha: Fr,
        y: Fr,
        rng: &mut R,
    ) -> Self {
        let g2_alpha = blinded_mul(&G2Projective::generator(), &alpha, rng).into_affine();
        AttributeSecretKey {
            attribute,
            version,
            alpha,
            y,
            g2_alpha,
        }
    }

    /// The attribute.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }

    /// The version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The public key `(E = e(g1, g2)^α, Y = g1^y)`.
    pub fn public_key<R: RngCore + ?Sized>(&self, rng: &mut R) -> AttributePublicKey {
        // e(g1, g2^α) = egg^α without a secret-dependent GT exponentiation.
        let e = Bls12_381::pairing(G1Affine::generator(), self.g2_alpha);
        let y = blinded_mul(&G1Projective::generator(), &self.y, rng).into_affine();
        AttributePublicKey {
            attribute: self.attribute.clone(),
            version: self.version,
            e,
            y,
        }
    }

    /// Issue the key `K = g2^α · H(GID)^y` for one person.
    ///
    /// `H(GID)` is hashed once per person ([`HashedGid`]); the secret
    /// multiplication runs on a blinded scalar.
    pub fn keygen<R: RngCore + CryptoRng + ?Sized>(&self, gid: &HashedGid, rng: &mut R) -> UserKey {
        let hy = blinded_mul(&gid.point.into_group(), &self.y, rng);
        let k = (hy + self.g2_alpha).into_affine();
        UserKey {
            attribute: self.attribute.clone(),
            version: self.version,
            gid: gid.gid,
            k,
        }
    }

    /// Rotate to the next version: `α' = α + Δα`, `y' = y + Δy` with fresh,
    /// uniform, non-zero `Δα, Δy`. Returns the new key and the update secret
    /// that computes the proxy's re-encryption tokens (DESIGN §3).
    pub fn rotate<R: RngCore + CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
    ) -> Result<(AttributeSecretKey, UpdateSecret), AbeError> {
        let next = self.version.next()?;
        loop {
            let mut da = random_nonzero(rng);
            let mut dy = random_nonzero(rng);
            let mut alpha = self.alpha + da;
            let mut y = self.y + dy;
            if alpha.is_zero() || y.is_zero() {
                continue; // negligible; keeps the new secret non-zero
            }
            let sk = Self::from_parts(self.attribute.clone(), next, alpha, y, rng);
            let us = UpdateSecret::new(self.attribute.clone(), self.version, da, dy);
            for s in [&mut da, &mut dy, &mut alpha, &mut y] {
                s.zeroize();
            }
            return Ok((sk, us));
        }
    }

    /// Encode for sealed storage: `MABE 'S' 1 ‖ lp(attribute) ‖ version ‖ α ‖ y`.
    /// The bytes are secret; they are wiped when the returned buffer drops.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let attr = self.attribute.to_string();
        let mut w = Writer::new(Kind::SecretKey, attr.len() + 72);
        w.lp(attr.as_bytes());
        w.u32(self.version.get());
        w.fr(&self.alpha);
        w.fr(&self.y);
        Zeroizing::new(w.finish())
    }

    /// Decode what [`AttributeSecretKey::to_bytes`] wrote.
    pub fn from_bytes<R: RngCore + ?Sized>(bytes: &[u8], rng: &mut R) -> Result<Self, AbeError> {
        let mut r = Reader::new(bytes, Kind::SecretKey, 512)?;
        let attribute = read_attribute(&mut r)?;
        let version = r.version()?;
        let mut alpha = r.fr_nonzero()?;
        let mut y = r.fr_nonzero()?;
        r.finish()?;
        let sk = Self::from_parts(attribute, version, alpha, y, rng);
        alpha.zeroize();
        y.zeroize();
        Ok(sk)
    }
}

/// The public key of one attribute at one version: `E = e(g1,g2)^α ∈ GT`,
/// `Y = g1^y ∈ G1`.
#[derive(Clone, PartialEq, Eq)]
pub struct AttributePublicKey {
    attribute: Attribute,
    version: Version,
    e: Gt,
    y: G1Affine,
}

impl fmt::Debug for AttributePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let y = crate::wire::g1_bytes(&self.y);
        f.debug_struct("AttributePublicKey")
            .field("attribute", &self.attribute)
            .field("version", &self.version)
            .field("y", &format_args!("{}…", hex_prefix(&y)))
            .finish_non_exhaustive()
    }
}

pub(crate) fn hex_prefix(b: &[u8]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

impl AttributePublicKey {
    /// The attribute.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }
    /// The version.
    pub fn version(&self) -> Version {
        self.version
    }
    /// `E = e(g1, g2)^α`.
    pub fn e(&self) -> &Gt {
        &self.e
    }
    /// `Y = g1^y`.
    pub fn y(&self) -> &G1Affine {
        &self.y
    }

    /// Encode: `MABE 'P' 1 ‖ lp(attribute) ‖ version ‖ E (576) ‖ Y (48)`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let attr = self.attribute.to_string();
        let mut w = Writer::new(Kind::PublicKey, attr.len() + 632);
        w.lp(attr.as_bytes());
        w.u32(self.version.get());
        w.gt(&self.e);
        w.g1(&self.y);
        w.finish()
    }

    /// Decode and validate (E in GT and not 1, Y in G1 and not the identity).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AbeError> {
        let mut r = Reader::new(bytes, Kind::PublicKey, 1024)?;
        let attribute = read_attribute(&mut r)?;
        let version = r.version()?;
        let e = r.gt()?;
        if e.is_zero() {
            return Err(r.bad("E is the identity of GT"));
        }
        let y = r.g1()?;
        r.finish()?;
        Ok(AttributePublicKey {
            attribute,
            version,
            e,
            y,
        })
    }
}

/// A public key with lazily built fixed-base tables for `E` and `Y`.
pub(crate) struct PreparedPublicKey {
    pub(crate) pk: AttributePublicKey,
    pub(crate) e_base: FixedBase<Gt>,
    pub(crate) y_base: FixedBase<G1Projective>,
}

impl fmt::Debug for PreparedPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.pk.fmt(f)
    }
}

impl PreparedPublicKey {
    fn new(pk: AttributePublicKey) -> Self {
        // Window 5 for E (≈0.9 MB table, built after 32 uses), window 6 for Y.
        let e_base = FixedBase::new(pk.e, 256, 32);
        let y_base = FixedBase::new(pk.y.into_group(), 1024, 32);
        PreparedPublicKey { pk, e_base, y_base }
    }
}

/// The public keys an encryptor or decryptor knows, by attribute and version.
///
/// The highest version of an attribute is its *current* one: encryption
/// always uses it. Older versions stay for decrypting rows not yet updated.
///
/// ```
/// use mabe_abe::{AttributeSecretKey, PublicKeyRing, Version};
/// # use ark_std::rand::SeedableRng;
/// let mut rng = ark_std::rand::rngs::StdRng::seed_from_u64(1); // OsRng in real code
/// let sk = AttributeSecretKey::generate("nurse@hospital-b".parse()?, Version::FIRST, &mut rng);
/// let mut ring = PublicKeyRing::new();
/// ring.insert(sk.public_key(&mut rng))?;
/// assert_eq!(ring.current(sk.attribute()).map(|pk| pk.version()), Some(Version::FIRST));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Default, Clone)]
pub struct PublicKeyRing {
    keys: BTreeMap<Attribute, BTreeMap<Version, Arc<PreparedPublicKey>>>,
}

impl PublicKeyRing {
    /// An empty ring.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a public key. Adding the same key again is a no-op; a *different*
    /// key for an (attribute, version) already present is refused.
    pub fn insert(&mut self, pk: AttributePublicKey) -> Result<(), AbeError> {
        let versions = self.keys.entry(pk.attribute.clone()).or_default();
        if let Some(existing) = versions.get(&pk.version) {
            if existing.pk == pk {
                return Ok(());
            }
            return Err(AbeError::InvalidKey {
                attribute: pk.attribute,
                reason: "a different public key is already known for this version",
            });
        }
        versions.insert(pk.version, Arc::new(PreparedPublicKey::new(pk)));
        Ok(())
    }

    /// The key for `attribute` at `version`.
    pub fn get(&self, attribute: &Attribute, version: Version) -> Option<&AttributePublicKey> {
        self.prepared(attribute, version).map(|p| &p.pk)
    }

    /// The current (highest) version of `attribute`.
    pub fn current(&self, attribute: &Attribute) -> Option<&AttributePublicKey> {
        self.current_prepared(attribute).map(|p| &p.pk)
    }

    pub(crate) fn prepared(
        &self,
        attribute: &Attribute,
        version: Version,
    ) -> Option<&Arc<PreparedPublicKey>> {
        self.keys.get(attribute)?.get(&version)
    }

    pub(crate) fn current_prepared(
        &self,
        attribute: &Attribute,
    ) -> Option<&Arc<PreparedPublicKey>> {
        self.keys.get(attribute)?.values().next_back()
    }

    /// Number of (attribute, version) keys held.
    pub fn len(&self) -> usize {
        self.keys.values().map(BTreeMap::len).sum()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Build every fixed-base table now (servers, benchmarks).
    pub fn warm_up(&self) {
        crate::group::warm_up();
        for p in self.keys.values().flat_map(BTreeMap::values) {
            p.e_base.warm();
            p.y_base.warm();
        }
    }
}

/// `H(GID) ∈ G2` (RFC 9380 hash-to-curve), computed once per person and kept
/// with its Miller-loop preparation, made on first use: decryption and key
/// verification need it, an authority issuing keys does not (preparing the
/// point costs about as much as the blinded multiplication of `keygen`).
///
/// ```
/// use mabe_abe::{Gid, HashedGid};
/// let h = HashedGid::new(Gid::derive("reg", "alice")?)?;
/// assert_eq!(h.gid(), Gid::derive("reg", "alice")?);
/// # Ok::<(), mabe_abe::AbeError>(())
/// ```
#[derive(Clone)]
pub struct HashedGid {
    gid: Gid,
    point: G2Affine,
    prepared: OnceLock<G2Prepared>,
}

impl fmt::Debug for HashedGid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HashedGid").field(&self.gid).finish()
    }
}

impl HashedGid {
    /// Hash `gid` to G2 with the DST `MABE-V01-CS01-with-BLS12381G2_XMD:SHA-256_SSWU_RO_GID_`.
    pub fn new(gid: Gid) -> Result<Self, AbeError> {
        let point = crate::group::hash_to_g2(DST_GID, gid.as_bytes())?;
        Ok(HashedGid {
            gid,
            point,
            prepared: OnceLock::new(),
        })
    }
    /// The GID.
    pub fn gid(&self) -> Gid {
        self.gid
    }
    /// The point `H(GID)`.
    pub fn point(&self) -> &G2Affine {
        &self.point
    }
    pub(crate) fn prepared(&self) -> &G2Prepared {
        self.prepared.get_or_init(|| G2Prepared::from(self.point))
    }
}

/// One person's key for one attribute at one version: `K = g2^α · H(GID)^y`.
///
/// Secret: zeroized on drop, `Debug` prints no key material, not `Clone`.
pub struct UserKey {
    attribute: Attribute,
    version: Version,
    gid: Gid,
    k: G2Affine,
}

impl Drop for UserKey {
    fn drop(&mut self) {
        self.k.zeroize();
    }
}

impl fmt::Debug for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserKey")
            .field("attribute", &self.attribute)
            .field("version", &self.version)
            .field("gid", &self.gid)
            .finish_non_exhaustive()
    }
}

impl UserKey {
    /// The attribute.
    pub fn attribute(&self) -> &Attribute {
        &self.attribute
    }
    /// The version.
    pub fn version(&self) -> Version {
        self.version
    }
    /// The GID the key is bound to.
    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// Check the key against its public key: `e(g1, K) == E · e(Y, H(GID))`,
    /// evaluated as one multi-pairing `e(g1, K) · e(−Y, H(GID)) == E`.
    pub fn verify(&self, gid: &HashedGid, pk: &AttributePublicKey) -> Result<(), AbeError> {
        let fail = |reason| AbeError::InvalidKey {
            attribute: self.attribute.clone(),
            reason,
        };
        if self.attribute != pk.attribute || self.version != pk.version {
            return Err(fail("public key is for another attribute or version"));
        }
        if self.gid != gid.gid {
            return Err(fail("key was issued to another GID"));
        }
        let lhs = Bls12_381::multi_pairing(
            [G1Affine::generator(), (-pk.y.into_group()).into_affine()],
            [G2Prepared::from(self.k), gid.prepared().clone()],
        );
        if lhs != pk.e {
            return Err(fail("pairing check failed (not issued by this authority)"));
        }
        Ok(())
    }

    /// Encode: `MABE 'K' 1 ‖ GID (32) ‖ lp(attribute) ‖ version ‖ K (96)`.
    /// The bytes are secret; they are wiped when the returned buffer drops.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let attr = self.attribute.to_string();
        let mut w = Writer::new(Kind::UserKey, attr.len() + 140);
        w.bytes(self.gid.as_bytes());
        w.lp(attr.as_bytes());
        w.u32(self.version.get());
        w.g2(&self.k);
        Zeroizing::new(w.finish())
    }

    /// Decode and validate (K in G2, not the identity). Does not run the
    /// pairing check: use [`UserKey::verify`] or [`UserKeyRing::insert`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, AbeError> {
        let mut r = Reader::new(bytes, Kind::UserKey, 512)?;
        let gid = Gid::from_bytes(r.array()?);
        let attribute = read_attribute(&mut r)?;
        let version = r.version()?;
        let k = r.g2()?;
        r.finish()?;
        Ok(UserKey {
            attribute,
            version,
            gid,
            k,
        })
    }
}

struct HeldKey {
    key: UserKey,
    prepared: G2Prepared,
}

impl Drop for HeldKey {
    fn drop(&mut self) {
        wipe_prepared(&mut self.prepared);
    }
}

/// One person's verified keys, at most one version per attribute.
///
/// ```
/// use mabe_abe::{AttributeSecretKey, Gid, PublicKeyRing, UserKeyRing, Version};
/// # use ark_std::rand::SeedableRng;
/// let mut rng = ark_std::rand::rngs::StdRng::seed_from_u64(1); // OsRng in real code
/// let sk = AttributeSecretKey::generate("doctor@hospital-a".parse()?, Version::FIRST, &mut rng);
/// let pk = sk.public_key(&mut rng);
/// let mut ring = UserKeyRing::new(Gid::derive("reg", "dr-jansen")?)?;
/// let key = sk.keygen(ring.hashed_gid(), &mut rng);
/// ring.insert(key, &pk)?; // runs the pairing check
/// assert_eq!(ring.attributes().len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct UserKeyRing {
    gid: HashedGid,
    keys: BTreeMap<Attribute, HeldKey>,
}

impl fmt::Debug for UserKeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserKeyRing")
            .field("gid", &self.gid.gid)
            .field(
                "keys",
                &self
                    .keys
                    .values()
                    .map(|h| format!("{}#{}", h.key.attribute, h.key.version))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl UserKeyRing {
    /// An empty ring for `gid` (hashes `H(GID)` once).
    pub fn new(gid: Gid) -> Result<Self, AbeError> {
        Ok(UserKeyRing {
            gid: HashedGid::new(gid)?,
            keys: BTreeMap::new(),
        })
    }

    /// The GID.
    pub fn gid(&self) -> Gid {
        self.gid.gid
    }

    /// `H(GID)`, for key issuance.
    pub fn hashed_gid(&self) -> &HashedGid {
        &self.gid
    }

    /// Verify `key` against `pk` (pairing check, same GID) and store it,
    /// replacing an older version of the same attribute. A key older than the
    /// one held is refused.
    pub fn insert(&mut self, key: UserKey, pk: &AttributePublicKey) -> Result<(), AbeError> {
        key.verify(&self.gid, pk)?;
        if let Some(held) = self.keys.get(&key.attribute) {
            if held.key.version > key.version {
                return Err(AbeError::InvalidKey {
                    attribute: key.attribute.clone(),
                    reason: "a newer version of this key is already held",
                });
            }
        }
        let prepared = G2Prepared::from(key.k);
        self.keys
            .insert(key.attribute.clone(), HeldKey { key, prepared });
        Ok(())
    }

    /// Store a key without verifying it. Only for tests of the scheme's own
    /// defences (a collusion attempt, a forged key); never use it otherwise.
    /// Available with the `hazmat` feature only.
    #[cfg(feature = "hazmat")]
    #[doc(hidden)]
    pub fn insert_unverified(&mut self, key: UserKey) {
        let prepared = G2Prepared::from(key.k);
        self.keys
            .insert(key.attribute.clone(), HeldKey { key, prepared });
    }

    /// Drop the key for `attribute`.
    pub fn remove(&mut self, attribute: &Attribute) -> Option<Version> {
        self.keys.remove(attribute).map(|h| h.key.version)
    }

    /// The key held for `attribute`.
    pub fn get(&self, attribute: &Attribute) -> Option<&UserKey> {
        self.keys.get(attribute).map(|h| &h.key)
    }

    /// Attributes held, sorted.
    pub fn attributes(&self) -> Vec<Attribute> {
        self.keys.keys().cloned().collect()
    }

    pub(crate) fn prepared(&self, attribute: &Attribute) -> Option<(&UserKey, &G2Prepared)> {
        self.keys.get(attribute).map(|h| (&h.key, &h.prepared))
    }
}

pub(crate) fn g1_mul_many(s: &[Fr]) -> Vec<G1Affine> {
    g1_base().mul_many(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ark_std::rand::{SeedableRng, rngs::StdRng};

    fn attr(s: &str) -> Attribute {
        s.parse().expect("attribute")
    }

    #[test]
    fn keys_verify_and_wrong_keys_do_not() {
        let mut rng = StdRng::seed_from_u64(7);
        let sk = AttributeSecretKey::generate(attr("doctor@a"), Version::FIRST, &mut rng);
        let pk = sk.public_key(&mut rng);
        let alice = HashedGid::new(Gid::derive("r", "alice").expect("gid")).expect("h");
        let bob = HashedGid::new(Gid::derive("r", "bob").expect("gid")).expect("h");
        let k = sk.keygen(&alice, &mut rng);
        k.verify(&alice, &pk).expect("valid key");
        assert!(k.verify(&bob, &pk).is_err());
        // Another authority's key for the same attribute name fails the pairing.
        let other = AttributeSecretKey::generate(attr("doctor@a"), Version::FIRST, &mut rng);
        let forged = other.keygen(&alice, &mut rng);
        assert!(matches!(
            forged.verify(&alice, &pk),
            Err(AbeError::InvalidKey { .. })
        ));
    }

    #[test]
    fn encodings_round_trip_and_refuse_trailing_bytes() {
        let mut rng = StdRng::seed_from_u64(8);
        let sk = AttributeSecretKey::generate(attr("nurse@b"), Version::new(3), &mut rng);
        let pk = sk.public_key(&mut rng);
        let pk2 = AttributePublicKey::from_bytes(&pk.to_bytes()).expect("decode");
        assert_eq!(pk, pk2);
        let sk2 = AttributeSecretKey::from_bytes(&sk.to_bytes(), &mut rng).expect("decode");
        assert_eq!(sk2.public_key(&mut rng), pk);
        let h = HashedGid::new(Gid::derive("r", "x").expect("gid")).expect("h");
        let k = sk.keygen(&h, &mut rng);
        let k2 = UserKey::from_bytes(&k.to_bytes()).expect("decode");
        k2.verify(&h, &pk).expect("verifies");
        for bytes in [pk.to_bytes(), sk.to_bytes().to_vec(), k.to_bytes().to_vec()] {
            let mut long = bytes.clone();
            long.push(0);
            assert!(AttributePublicKey::from_bytes(&long).is_err());
            assert!(UserKey::from_bytes(&long).is_err());
            assert!(AttributeSecretKey::from_bytes(&long, &mut rng).is_err());
            let short = &bytes[..bytes.len() - 1];
            assert!(AttributePublicKey::from_bytes(short).is_err());
            assert!(UserKey::from_bytes(short).is_err());
        }
    }
}
