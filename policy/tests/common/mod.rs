//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used)]

use ark_bls12_381::Fr;
use ark_ff::Field;
use mabe_policy::{Attribute, Lsss, Policy, Solution};

pub fn zero() -> Fr {
    Fr::from(0u64)
}

pub fn one() -> Fr {
    Fr::from(1u64)
}

pub fn target(columns: usize) -> Vec<Fr> {
    let mut t = vec![zero(); columns];
    t[0] = one();
    t
}

/// sum c_x * A_x over the solution.
pub fn reconstruct(lsss: &Lsss<Fr>, solution: &Solution<Fr>) -> Vec<Fr> {
    let mut sum = vec![zero(); lsss.columns()];
    for &(row, c) in solution.rows() {
        for &(col, v) in lsss.rows()[row].entries() {
            sum[col] += c * v;
        }
    }
    sum
}

/// Whether `target` is in the span of `rows`, by Gaussian elimination over Fr.
pub fn in_span(rows: &[Vec<Fr>], target: &[Fr]) -> bool {
    // Basis vectors with a pivot; each has zeros at the pivots of earlier ones
    // and 1 at its own pivot.
    let mut basis: Vec<(usize, Vec<Fr>)> = Vec::new();
    let reduce = |basis: &[(usize, Vec<Fr>)], mut v: Vec<Fr>| {
        for (pivot, b) in basis {
            let factor = v[*pivot];
            if factor != zero() {
                for (x, y) in v.iter_mut().zip(b) {
                    *x -= factor * y;
                }
            }
        }
        v
    };
    for row in rows {
        let v = reduce(&basis, row.clone());
        if let Some(pivot) = v.iter().position(|x| *x != zero()) {
            let inv = v[pivot].inverse().unwrap();
            basis.push((pivot, v.iter().map(|x| *x * inv).collect()));
        }
    }
    reduce(&basis, target.to_vec()).iter().all(|x| *x == zero())
}

/// Evaluates the policy with leaf `i` (left-to-right) true iff bit `i` of
/// `mask` is set.
pub fn eval_leaves(policy: &Policy, mask: u64) -> bool {
    fn go(p: &Policy, mask: u64, next: &mut usize) -> bool {
        match p {
            Policy::Leaf(_) => {
                let i = *next;
                *next += 1;
                mask & (1 << i) != 0
            }
            Policy::And(c) => c.iter().map(|c| go(c, mask, next)).fold(true, |a, b| a & b),
            Policy::Or(c) => c
                .iter()
                .map(|c| go(c, mask, next))
                .fold(false, |a, b| a | b),
            Policy::Threshold { k, children } => {
                children.iter().filter(|c| go(c, mask, next)).count() >= *k
                // `filter` short-circuits nothing: every child is visited.
            }
        }
    }
    let mut next = 0;
    go(policy, mask, &mut next)
}

pub fn attr(s: &str) -> Attribute {
    s.parse().unwrap()
}

/// Small deterministic PRNG (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
}

/// A random policy with exactly `leaves` leaves. With `unique`, leaf `i` is
/// `l{i}@t`; otherwise attributes come from {a, b, c}@x (duplicates likely).
pub fn random_policy(rng: &mut Rng, leaves: usize, unique: bool) -> Policy {
    fn go(rng: &mut Rng, n: usize, unique: bool, next: &mut usize) -> Policy {
        if n == 1 {
            let name = if unique {
                format!("l{}@t", *next)
            } else {
                format!("{}@x", ["a", "b", "c"][rng.range(0, 2)])
            };
            *next += 1;
            let leaf = Policy::Leaf(name.parse().unwrap());
            return if rng.range(0, 9) == 0 {
                Policy::Threshold {
                    k: 1,
                    children: vec![leaf],
                }
            } else {
                leaf
            };
        }
        let m = rng.range(2, n.min(4));
        // Split n leaves into m positive parts.
        let mut parts = vec![1; m];
        for _ in 0..n - m {
            let i = rng.range(0, m - 1);
            parts[i] += 1;
        }
        let children: Vec<Policy> = parts.iter().map(|&p| go(rng, p, unique, next)).collect();
        match rng.range(0, 2) {
            0 => Policy::And(children),
            1 => Policy::Or(children),
            _ => Policy::Threshold {
                k: rng.range(1, m),
                children,
            },
        }
    }
    let mut next = 0;
    go(rng, leaves, unique, &mut next)
}
