//! Property tests: print/parse round trip, and `solve` against
//! `is_satisfied_by` with reconstruction of the target vector.

mod common;

use std::collections::BTreeSet;

use ark_bls12_381::Fr;
use common::*;
use mabe_policy::{Attribute, Lsss, Policy, PolicyError, parse};
use proptest::prelude::*;

const NAMES: [&str; 4] = ["a", "doctor", "er.1", "x:y-z"];
const AUTHORITIES: [&str; 3] = ["h1", "hospital-b", "c"];

fn universe() -> Vec<Attribute> {
    NAMES
        .iter()
        .flat_map(|n| AUTHORITIES.iter().map(move |a| attr(&format!("{n}@{a}"))))
        .collect()
}

fn arb_attribute() -> impl Strategy<Value = Attribute> {
    (0..NAMES.len(), 0..AUTHORITIES.len())
        .prop_map(|(n, a)| attr(&format!("{}@{}", NAMES[n], AUTHORITIES[a])))
}

/// Random trees of depth <= 5 with valid arities.
fn arb_policy() -> impl Strategy<Value = Policy> {
    arb_attribute()
        .prop_map(Policy::Leaf)
        .prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..=4).prop_map(Policy::And),
                prop::collection::vec(inner.clone(), 2..=4).prop_map(Policy::Or),
                prop::collection::vec(inner, 1..=4)
                    .prop_flat_map(|children| (1..=children.len(), Just(children)))
                    .prop_map(|(k, children)| Policy::Threshold { k, children }),
            ]
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn display_parse_round_trip(p in arb_policy()) {
        prop_assert!(p.depth() <= 5);
        prop_assert_eq!(p.validate(), Ok(()));
        let text = p.to_string();
        prop_assert_eq!(parse(&text), Ok(p.clone()));
        prop_assert_eq!(text.parse::<Policy>(), Ok(p));
    }

    #[test]
    fn solve_iff_satisfied(p in arb_policy(), held_mask in any::<u16>()) {
        let held: BTreeSet<Attribute> = universe()
            .into_iter()
            .enumerate()
            .filter(|(i, _)| held_mask & (1 << i) != 0)
            .map(|(_, a)| a)
            .collect();
        let lsss = Lsss::<Fr>::from_policy(&p).unwrap();
        prop_assert_eq!(lsss.len(), p.leaf_count());
        match lsss.solve(|_, a| held.contains(a)) {
            Ok(solution) => {
                prop_assert!(p.is_satisfied_by(&held));
                prop_assert_eq!(reconstruct(&lsss, &solution), target(lsss.columns()));
                for &(row, _) in solution.rows() {
                    prop_assert!(held.contains(lsss.rows()[row].attribute()));
                }
            }
            Err(PolicyError::Unsatisfied { missing }) => {
                prop_assert!(!p.is_satisfied_by(&held));
                // Adding the missing attributes satisfies the policy.
                let mut more = held.clone();
                more.extend(missing.iter().cloned());
                prop_assert!(p.is_satisfied_by(&more));
                prop_assert!(missing.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(missing.iter().all(|a| !held.contains(a)));
            }
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }

    #[test]
    fn parse_never_panics(text in "[a-dA-D0-3@ (),.:_-]{0,48}|(AND|OR|of|[(),]| |a@x|2|b@y){0,24}") {
        if let Ok(p) = parse(&text) {
            prop_assert_eq!(p.validate(), Ok(()));
            prop_assert_eq!(parse(&p.to_string()), Ok(p));
        }
    }

    #[test]
    fn arbitrary_unicode_never_panics(text in "\\PC{0,64}") {
        match parse(&text) {
            Ok(p) => prop_assert_eq!(parse(&p.to_string()), Ok(p)),
            Err(PolicyError::Syntax { position, snippet, .. }) => {
                prop_assert!(position <= text.len());
                prop_assert!(snippet.contains('\n'));
                prop_assert!(snippet.ends_with('^'));
            }
            Err(_) => {}
        }
    }
}
