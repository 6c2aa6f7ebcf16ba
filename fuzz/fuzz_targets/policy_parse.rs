//! Policy parser, canonical printer and LSSS on arbitrary text.
//!
//! - parsing never panics (any length: over `MAX_POLICY_LEN` is an error);
//! - the canonical text of a parsed policy parses back to the same tree;
//! - every parsed policy has an LSSS with one row per leaf;
//! - `solve` never panics, and when it succeeds its coefficients really
//!   reconstruct the target vector `(1, 0, ..., 0)` from held rows only;
//! - `solve` succeeds exactly when `Policy::is_satisfied_by` says so.
#![no_main]

use std::collections::BTreeSet;

use ark_bls12_381::Fr;
use libfuzzer_sys::fuzz_target;
use mabe_policy::{Attribute, Lsss, Solution};

/// Checks `sum c_x * A_x == (1, 0, ..., 0)` over rows that `held` allows.
fn check_solution(lsss: &Lsss<Fr>, solution: &Solution<Fr>, held: impl Fn(usize) -> bool) {
    assert!(!solution.is_empty(), "a successful solve uses some row");
    let mut sum = vec![Fr::from(0u64); lsss.columns()];
    for &(row, c) in solution.rows() {
        assert!(held(row), "solution uses row {row}, which is not held");
        for &(column, value) in lsss.rows()[row].entries() {
            assert!(column < lsss.columns(), "entry beyond the last column");
            sum[column] += c * value;
        }
    }
    let mut target = vec![Fr::from(0u64); lsss.columns()];
    target[0] = Fr::from(1u64);
    assert_eq!(sum, target, "coefficients do not reconstruct the secret");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = mabe_policy::parse(text) else {
        return;
    };

    let canonical = policy.to_string();
    assert_eq!(
        mabe_policy::parse(&canonical),
        Ok(policy.clone()),
        "canonical text {canonical:?} does not parse back to the same policy"
    );

    let lsss = Lsss::<Fr>::from_policy(&policy).expect("a parsed policy has an LSSS");
    assert_eq!(lsss.len(), policy.leaf_count());

    // By row index (every other leaf held).
    let even = |i: usize| i.is_multiple_of(2);
    if let Ok(solution) = lsss.solve(|i, _| even(i)) {
        check_solution(&lsss, &solution, even);
    }

    // By attribute (every other distinct attribute held), against the
    // boolean semantics of the policy.
    let held: BTreeSet<Attribute> = policy
        .attributes()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i.is_multiple_of(2))
        .map(|(_, a)| a)
        .collect();
    let result = lsss.solve(|_, a| held.contains(a));
    assert_eq!(
        result.is_ok(),
        policy.is_satisfied_by(&held),
        "solve and is_satisfied_by disagree"
    );
    if let Ok(solution) = result {
        let rows = lsss.rows();
        check_solution(&lsss, &solution, |i| held.contains(rows[i].attribute()));
    }
});
