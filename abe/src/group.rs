//! Group-level helpers: generators, `egg`, fixed-base tables, the GT membership
//! test, blinded secret-scalar multiplication and hashing to G2.

use std::sync::{
    OnceLock,
    atomic::{AtomicUsize, Ordering},
};

use ark_bls12_381::{Bls12_381, Fq12, Fr, G1Affine, G1Projective, G2Affine, G2Projective};
use ark_ec::{
    AffineRepr, CurveGroup, PrimeGroup,
    hashing::{HashToCurve, curve_maps::wb::WBMap, map_to_curve_hasher::MapToCurveBasedHasher},
    pairing::{Pairing, PairingOutput},
    scalar_mul::{BatchMulPreprocessing, ScalarMul},
};
use ark_ff::{
    BigInteger, CyclotomicMultSubgroup, Field, PrimeField, Zero, field_hashers::DefaultFieldHasher,
};
use ark_std::rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroize;

use crate::AbeError;

/// The pairing target group GT (written additively by arkworks: `+` is the
/// Fq12 product and `g * s` is exponentiation).
pub type Gt = PairingOutput<Bls12_381>;
/// A G2 point prepared for the Miller loop.
pub type G2Prepared = <Bls12_381 as Pairing>::G2Prepared;

/// `e(g1, g2)`, computed once.
pub fn egg() -> Gt {
    static EGG: OnceLock<Gt> = OnceLock::new();
    *EGG.get_or_init(|| Bls12_381::pairing(G1Affine::generator(), G2Affine::generator()))
}

/// Fixed-base multiplication that builds its precomputed table only once the
/// base has been used enough for the table to pay for itself (a one-shot CLI
/// encryption should not spend 40 ms on a table it uses ten times).
pub(crate) struct FixedBase<T: ScalarMul> {
    base: T,
    /// `num_scalars` hint handed to arkworks; it selects the window size.
    window_hint: usize,
    /// Build the table once this many scalars have gone through.
    threshold: usize,
    uses: AtomicUsize,
    table: OnceLock<BatchMulPreprocessing<T>>,
}

impl<T: ScalarMul> std::fmt::Debug for FixedBase<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedBase")
            .field("table_built", &self.table.get().is_some())
            .finish()
    }
}

impl<T: ScalarMul<ScalarField = Fr>> FixedBase<T> {
    pub(crate) fn new(base: T, window_hint: usize, threshold: usize) -> Self {
        FixedBase {
            base,
            window_hint,
            threshold,
            uses: AtomicUsize::new(0),
            table: OnceLock::new(),
        }
    }

    /// `[s_i]·base` for every scalar.
    pub(crate) fn mul_many(&self, scalars: &[Fr]) -> Vec<T::MulBase> {
        if scalars.is_empty() {
            return Vec::new();
        }
        let table = match self.table.get() {
            Some(t) => Some(t),
            None => {
                let used = self.uses.fetch_add(scalars.len(), Ordering::Relaxed) + scalars.len();
                (used >= self.threshold).then(|| {
                    self.table
                        .get_or_init(|| BatchMulPreprocessing::new(self.base, self.window_hint))
                })
            }
        };
        match table {
            Some(t) => t.batch_mul(scalars),
            None => {
                let v: Vec<T> = scalars.iter().map(|s| self.base * s).collect();
                T::batch_convert_to_mul_base(&v)
            }
        }
    }

    /// Force the table to be built now (benchmarks, long-running servers).
    pub(crate) fn warm(&self) {
        let _ = self
            .table
            .get_or_init(|| BatchMulPreprocessing::new(self.base, self.window_hint));
    }
}

/// Fixed-base table for `egg` (window 8 once warm).
pub(crate) fn egg_base() -> &'static FixedBase<Gt> {
    static T: OnceLock<FixedBase<Gt>> = OnceLock::new();
    T.get_or_init(|| FixedBase::new(egg(), 4096, 64))
}

/// Fixed-base table for `g1` (window 8 once warm).
pub(crate) fn g1_base() -> &'static FixedBase<G1Projective> {
    static T: OnceLock<FixedBase<G1Projective>> = OnceLock::new();
    T.get_or_init(|| FixedBase::new(G1Projective::generator(), 4096, 128))
}

/// Build the global `egg` and `g1` tables now instead of on demand.
///
/// Long-running services and benchmarks call this once; one-shot tools do
/// not need to (they run the variable-base path until a table pays off).
pub fn warm_up() {
    egg_base().warm();
    g1_base().warm();
}

/// Is `f` in the order-r subgroup GT of Fq12*?
///
/// Two cheap tests instead of `f^r == 1` (which costs as much as a pairing):
/// `f` is in the cyclotomic subgroup iff `f^(p^4) · f == f^(p^2)`, and a
/// cyclotomic `f` is in GT iff `f^p == f^x` where `x = -0xd201000000010000` is
/// the BLS parameter (p ≡ x mod r). This is the test blst uses
/// (M. Scott, "A note on group membership tests for G1, G2 and GT on BLS
/// pairing-friendly curves", 2021); tests cross-check it against `f^r == 1`.
pub(crate) fn gt_in_subgroup(f: &Fq12) -> bool {
    if f.is_zero() {
        return false;
    }
    let mut p2 = *f;
    p2.frobenius_map_in_place(2);
    let mut p4 = p2;
    p4.frobenius_map_in_place(2);
    p4 *= f;
    if p4 != p2 {
        return false;
    }
    let mut fp = *f;
    fp.frobenius_map_in_place(1);
    let x = <ark_bls12_381::Config as ark_ec::bls12::Bls12Config>::X;
    let fx = f.cyclotomic_exp(x);
    // x is negative: f^x is the cyclotomic inverse (conjugate) of f^|x|.
    match fx.cyclotomic_inverse() {
        Some(inv) => fp == inv,
        None => false,
    }
}

/// `[k]·P` for a secret `k`, computed on the blinded scalar `k + b·r` with a
/// fresh random 64-bit `b` (arkworks is not constant-time; blinding makes the
/// bit pattern used differ on every call, so leaks do not add up over many
/// calls). 4-bit windows over 320 bits; not regular (arkworks skips adding
/// the identity and the table index is secret), see docs/SECURITY.md.
pub(crate) fn blinded_mul<C: CurveGroup<ScalarField = Fr>, R: RngCore + ?Sized>(
    base: &C,
    k: &Fr,
    rng: &mut R,
) -> C {
    let blind = rng.next_u64();
    let mut limbs = blinded_limbs(k, blind);
    // table[j] = j·P for j in 0..16
    let mut table = [C::zero(); 16];
    for j in 1..16 {
        table[j] = table[j - 1] + base;
    }
    let table = C::normalize_batch(&table);
    let mut acc = C::zero();
    for limb in limbs.iter().rev() {
        for nibble in (0..16).rev() {
            for _ in 0..4 {
                acc.double_in_place();
            }
            let idx = ((limb >> (4 * nibble)) & 0xf) as usize;
            if let Some(p) = table.get(idx) {
                acc += p;
            }
        }
    }
    limbs.zeroize();
    acc
}

/// `k + b·r` as five little-endian 64-bit limbs (always fits: < 2^320).
fn blinded_limbs(k: &Fr, b: u64) -> [u64; 5] {
    let r = Fr::MODULUS.0;
    let mut out = [0u64; 5];
    let mut carry: u128 = 0;
    for (o, ri) in out.iter_mut().zip(r.iter()) {
        let t = u128::from(*ri) * u128::from(b) + carry;
        *o = t as u64;
        carry = t >> 64;
    }
    out[4] = carry as u64;
    let mut kb = k.into_bigint();
    let mut c: u128 = 0;
    for (i, o) in out.iter_mut().enumerate() {
        let ki = kb.0.get(i).copied().unwrap_or(0);
        let t = u128::from(*o) + u128::from(ki) + c;
        *o = t as u64;
        c = t >> 64;
    }
    kb.0.zeroize();
    let _ = kb.num_bits();
    out
}

type H2G2 = MapToCurveBasedHasher<
    G2Projective,
    DefaultFieldHasher<Sha256, 128>,
    WBMap<ark_bls12_381::g2::Config>,
>;
type H2G1 = MapToCurveBasedHasher<
    G1Projective,
    DefaultFieldHasher<Sha256, 128>,
    WBMap<ark_bls12_381::g1::Config>,
>;

/// RFC 9380 `BLS12381G2_XMD:SHA-256_SSWU_RO_` with the given DST.
pub fn hash_to_g2(dst: &[u8], msg: &[u8]) -> Result<G2Affine, AbeError> {
    let h = H2G2::new(dst).map_err(|_| AbeError::InvalidParameter("hash-to-curve DST"))?;
    h.hash(msg)
        .map_err(|_| AbeError::InvalidParameter("hash-to-curve input"))
}

/// RFC 9380 `BLS12381G1_XMD:SHA-256_SSWU_RO_` with the given DST (used only
/// in tests, to pin the suite against the RFC's vectors).
pub fn hash_to_g1(dst: &[u8], msg: &[u8]) -> Result<G1Affine, AbeError> {
    let h = H2G1::new(dst).map_err(|_| AbeError::InvalidParameter("hash-to-curve DST"))?;
    h.hash(msg)
        .map_err(|_| AbeError::InvalidParameter("hash-to-curve input"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ark_ff::One;
    use ark_std::{UniformRand, rand::SeedableRng, rand::rngs::StdRng};

    #[test]
    fn blinded_mul_matches_plain_mul() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..8 {
            let k = Fr::rand(&mut rng);
            let p = G1Projective::rand(&mut rng);
            assert_eq!(blinded_mul(&p, &k, &mut rng), p * k);
            let q = G2Projective::rand(&mut rng);
            assert_eq!(blinded_mul(&q, &k, &mut rng), q * k);
        }
        // Edge scalars.
        let p = G1Projective::generator();
        assert!(blinded_mul(&p, &Fr::zero(), &mut rng).is_zero());
        assert_eq!(blinded_mul(&p, &-Fr::from(1u64), &mut rng), -p);
    }

    #[test]
    fn fixed_base_agrees_with_variable_base() {
        let mut rng = StdRng::seed_from_u64(2);
        let scalars: Vec<Fr> = (0..5).map(|_| Fr::rand(&mut rng)).collect();
        let fb = FixedBase::new(egg(), 256, 3);
        let slow = fb.mul_many(&scalars[..2]); // below threshold: variable base
        let fast = fb.mul_many(&scalars[..2]); // table built now
        assert_eq!(slow, fast);
        for (s, v) in scalars.iter().zip(fb.mul_many(&scalars)) {
            assert_eq!(egg() * s, v);
        }
    }

    #[test]
    fn gt_membership_agrees_with_the_slow_test() {
        let mut rng = StdRng::seed_from_u64(3);
        let r = Fr::MODULUS;
        for _ in 0..4 {
            // Members: pairings of random points, and egg powers.
            let g = Bls12_381::pairing(G1Projective::rand(&mut rng), G2Projective::rand(&mut rng));
            assert!(gt_in_subgroup(&g.0));
            assert!(g.0.pow(r).is_one());
            // Random Fq12: neither cyclotomic nor in GT.
            let f = Fq12::rand(&mut rng);
            assert!(!gt_in_subgroup(&f));
            // Cyclotomic but (almost surely) not in GT: the easy part of the
            // final exponentiation, f^((p^6-1)(p^2+1)).
            let mut c = f;
            c.cyclotomic_inverse_in_place(); // conjugate = f^(p^6)
            let inv = f.inverse().expect("non-zero");
            c *= inv;
            let mut c2 = c;
            c2.frobenius_map_in_place(2);
            c *= c2;
            assert!(!c.pow(r).is_one(), "test element unexpectedly in GT");
            assert!(!gt_in_subgroup(&c));
            // Multiplying a member by a non-member gives a non-member.
            assert!(!gt_in_subgroup(&(g.0 * c)));
        }
        assert!(!gt_in_subgroup(&Fq12::zero()));
        assert!(gt_in_subgroup(&Fq12::ONE));
    }
}
