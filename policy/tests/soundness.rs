//! LSSS soundness and correctness: for small policies and every subset of
//! rows, the target (1, 0, ..., 0) is in the span of the subset's rows iff the
//! subset satisfies the policy, and `solve` agrees.

// Helpers outside `#[test]` functions unwrap and panic too.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use ark_bls12_381::Fr;
use common::*;
use mabe_policy::{Lsss, Policy, PolicyError, parse};

/// Checks every subset of rows of `policy` (at most 8 leaves).
fn check_all_subsets(policy: &Policy) {
    let lsss = Lsss::<Fr>::from_policy(policy).unwrap();
    let n = lsss.len();
    assert!(n <= 8);
    let dense: Vec<Vec<Fr>> = lsss
        .rows()
        .iter()
        .map(|r| r.to_dense(lsss.columns()))
        .collect();
    let t = target(lsss.columns());
    // Minimal number of rows among satisfying subsets of each mask.
    let mut best = vec![usize::MAX; 1 << n];
    for mask in 0u64..(1 << n) {
        let satisfied = eval_leaves(policy, mask);
        let rows: Vec<Vec<Fr>> = (0..n)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| dense[i].clone())
            .collect();
        assert_eq!(
            in_span(&rows, &t),
            satisfied,
            "policy {policy}, rows {mask:b}"
        );
        best[mask as usize] = if satisfied {
            mask.count_ones() as usize
        } else {
            usize::MAX
        };
        for i in 0..n {
            if mask & (1 << i) != 0 {
                let sub = best[(mask & !(1 << i)) as usize];
                best[mask as usize] = best[mask as usize].min(sub);
            }
        }
        match lsss.solve(|row, _| mask & (1 << row) != 0) {
            Ok(solution) => {
                assert!(satisfied, "policy {policy}, rows {mask:b}");
                assert_eq!(reconstruct(&lsss, &solution), t, "policy {policy}");
                assert!(solution.rows().iter().all(|&(r, _)| mask & (1 << r) != 0));
                assert!(solution.rows().windows(2).all(|w| w[0].0 < w[1].0));
                // The DP picks a satisfying set of minimum size.
                assert_eq!(
                    solution.rows().len(),
                    best[mask as usize],
                    "policy {policy}"
                );
            }
            Err(PolicyError::Unsatisfied { missing }) => {
                assert!(!satisfied, "policy {policy}, rows {mask:b}");
                assert!(!missing.is_empty());
                assert!(missing.windows(2).all(|w| w[0] < w[1]));
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

#[test]
fn random_policies_unique_attributes() {
    let mut rng = Rng(0x5eed);
    for _ in 0..150 {
        let leaves = rng.range(1, 7);
        let policy = random_policy(&mut rng, leaves, true);
        // With distinct attributes, leaf-level and attribute-level agree.
        let lsss = Lsss::<Fr>::from_policy(&policy).unwrap();
        for mask in 0u64..(1 << lsss.len()) {
            let held = lsss
                .rows()
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, r)| r.attribute().clone())
                .collect();
            assert_eq!(policy.is_satisfied_by(&held), eval_leaves(&policy, mask));
        }
        check_all_subsets(&policy);
    }
}

#[test]
fn random_policies_duplicate_attributes() {
    let mut rng = Rng(0xd0b1e);
    for _ in 0..100 {
        let leaves = rng.range(2, 7);
        check_all_subsets(&random_policy(&mut rng, leaves, false));
    }
}

#[test]
fn and_of_n_needs_every_row() {
    for n in 2..=8 {
        let text: Vec<String> = (0..n).map(|i| format!("l{i}@t")).collect();
        let policy = parse(&text.join(" AND ")).unwrap();
        let lsss = Lsss::<Fr>::from_policy(&policy).unwrap();
        let dense: Vec<Vec<Fr>> = lsss
            .rows()
            .iter()
            .map(|r| r.to_dense(lsss.columns()))
            .collect();
        let t = target(lsss.columns());
        let full = (1u64 << n) - 1;
        for mask in 0..=full {
            let rows: Vec<Vec<Fr>> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| dense[i].clone())
                .collect();
            assert_eq!(in_span(&rows, &t), mask == full, "n {n}, rows {mask:b}");
        }
        // Entries are in {0, 1, -1} and every coefficient is 1.
        assert!(
            lsss.rows()
                .iter()
                .flat_map(|r| r.entries())
                .all(|&(_, v)| v == one() || v == -one())
        );
        let solution = lsss.solve(|_, _| true).unwrap();
        assert!(solution.rows().iter().all(|&(_, c)| c == one()));
        assert_eq!(solution.rows().len(), n);
        assert_eq!(reconstruct(&lsss, &solution), t);
    }
}

#[test]
fn two_of_n_needs_two_rows() {
    for text in [
        "2 of (a@x, b@x)",
        "2 of (a@x, b@x, c@x)",
        "2 of (a@x, b@x, c@x, d@x, e@x)",
    ] {
        let lsss = Lsss::<Fr>::from_policy(&parse(text).unwrap()).unwrap();
        let t = target(lsss.columns());
        for row in lsss.rows() {
            assert!(!in_span(&[row.to_dense(lsss.columns())], &t), "{text}");
        }
        check_all_subsets(&parse(text).unwrap());
    }
}

#[test]
fn span_checker_sanity() {
    let v = |a: u64, b: u64| vec![Fr::from(a), Fr::from(b)];
    assert!(in_span(&[v(1, 1), v(0, 1)], &v(1, 0)));
    assert!(!in_span(&[v(1, 1), v(2, 2)], &v(1, 0)));
    assert!(!in_span(&[], &v(1, 0)));
    assert!(in_span(&[], &v(0, 0)));
}
