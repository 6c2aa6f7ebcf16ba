//! The public API as the `abe` crate uses it.

mod common;

use std::collections::BTreeSet;

use ark_bls12_381::Fr;
use common::*;
use mabe_policy::{
    Attribute, AuthorityId, Lsss, MAX_DEPTH, MAX_LEAVES, MAX_POLICY_LEN, Policy, PolicyError, parse,
};

#[test]
fn identifiers() {
    let id: AuthorityId = "Hospital-A".parse().unwrap();
    assert_eq!(id.as_str(), "hospital-a");
    assert_eq!(format!("{id}"), "hospital-a");
    let a = Attribute::new("Cardiology", &id).unwrap();
    assert_eq!(a.to_string(), "cardiology@hospital-a");
    assert_eq!(a, "CARDIOLOGY@HOSPITAL-A".parse().unwrap());
    assert_eq!(a.authority(), &id);
    assert_eq!(a.name(), "cardiology");
    assert_eq!(
        "doctor".parse::<Attribute>(),
        Err(PolicyError::InvalidAttribute {
            text: "doctor".into(),
            reason: "must contain exactly one '@'"
        })
    );
    assert_eq!(
        "bad_id".parse::<AuthorityId>().unwrap_err().to_string(),
        "invalid authority id 'bad_id': may contain only letters, digits and '-'"
    );
}

#[test]
fn canonical_example_round_trips() {
    let text = "(doctor@a AND cardiology@a) OR 2 of (emergency@a, emergency@b, emergency@c)";
    let p = parse(text).unwrap();
    assert_eq!(p.to_string(), text);
    assert_eq!(p.leaf_count(), 5);
    assert_eq!(p.depth(), 3);
    let authorities: Vec<String> = p.authorities().iter().map(|a| a.to_string()).collect();
    assert_eq!(authorities, ["a", "b", "c"]);
    assert_eq!(p.attributes().len(), 5);
}

#[test]
fn error_display() {
    let err = parse("a@x AND (b@x OR c@x))").unwrap_err();
    assert_eq!(
        err.to_string(),
        "unexpected ')' at 20\na@x AND (b@x OR c@x))\n                    ^"
    );
    assert_eq!(
        parse("a@x AND doctor").unwrap_err().to_string(),
        "expected an attribute name@authority, found 'doctor' at 8\na@x AND doctor\n        ^"
    );
    let long = "a".repeat(MAX_POLICY_LEN + 1);
    assert_eq!(
        parse(&long).unwrap_err().to_string(),
        "policy text is too long: 65537 bytes (the maximum is 65536)"
    );
    assert_eq!(
        parse(&"(".repeat(100_000)).unwrap_err(),
        PolicyError::TooLong {
            len: 100_000,
            max: MAX_POLICY_LEN
        }
    );
    assert_eq!(
        parse(&"(".repeat(MAX_POLICY_LEN)).unwrap_err().to_string(),
        "policy is nested too deeply (the maximum depth is 64)"
    );
    let leaves = vec!["a@x"; MAX_LEAVES + 1].join(" AND ");
    assert_eq!(
        parse(&leaves).unwrap_err().to_string(),
        "policy has too many attribute leaves (the maximum is 1024)"
    );
    let deep = format!("{}a@x{}", "1 of (".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
    assert_eq!(
        parse(&deep).unwrap_err(),
        PolicyError::TooDeep { max: MAX_DEPTH }
    );
    let missing = PolicyError::Unsatisfied {
        missing: vec![attr("a@x"), attr("b@y")],
    };
    assert_eq!(
        missing.to_string(),
        "policy is not satisfied; missing attributes: a@x, b@y"
    );
}

#[test]
fn more_syntax_errors() {
    let position = |text: &str| match parse(text) {
        Err(PolicyError::Syntax { position, .. }) => position,
        other => panic!("{text:?}: {other:?}"),
    };
    assert_eq!(position(""), 0);
    assert_eq!(position("a@x OR (b@x AND c@x"), 7);
    assert_eq!(position("a@x OR b@x c@x"), 11);
    assert_eq!(position("a@x OR 0 of (b@x)"), 7);
    assert_eq!(position("2 of (b@x)"), 0);
    assert_eq!(position("a@x OR b@x@y"), 7);
    assert_eq!(position("a@x\u{0}"), 3);
}

#[test]
fn satisfaction_and_solve_agree() {
    let p = parse("doctor@a AND (cardiology@a OR 2 of (er@a, er@b, er@c))").unwrap();
    let lsss = Lsss::<Fr>::from_policy(&p).unwrap();
    let held: BTreeSet<Attribute> = [attr("doctor@a"), attr("er@b"), attr("er@c")].into();
    assert!(p.is_satisfied_by(&held));
    let solution = lsss.solve(|_, a| held.contains(a)).unwrap();
    assert_eq!(solution.rows().len(), 3);
    assert_eq!(reconstruct(&lsss, &solution), target(lsss.columns()));

    let held: BTreeSet<Attribute> = [attr("er@b")].into();
    assert!(!p.is_satisfied_by(&held));
    assert_eq!(
        lsss.solve(|_, a| held.contains(a)).unwrap_err(),
        PolicyError::Unsatisfied {
            missing: vec![attr("cardiology@a"), attr("doctor@a")]
        }
    );
}

#[test]
fn minimality() {
    let lsss = Lsss::<Fr>::from_policy(&parse("(a@x AND b@x AND c@x) OR d@x").unwrap()).unwrap();
    let solution = lsss.solve(|_, _| true).unwrap();
    assert_eq!(solution.rows(), &[(3, one())]);
    assert_eq!(lsss.rows()[3].attribute(), &attr("d@x"));
}

#[test]
fn shares_reconstruct_the_secret() {
    // Share a secret with w = (s, r1, r2, ...) and recombine with the solution.
    let p = parse("3 of (a@x, b@x AND c@x, d@x OR e@x, f@x)").unwrap();
    let lsss = Lsss::<Fr>::from_policy(&p).unwrap();
    let w: Vec<Fr> = (0..lsss.columns() as u64)
        .map(|i| Fr::from(1000 + 7 * i))
        .collect();
    let shares: Vec<Fr> = lsss.rows().iter().map(|r| r.dot(&w)).collect();
    for mask in 0u32..(1 << lsss.len()) {
        if let Ok(solution) = lsss.solve(|row, _| mask & (1 << row) != 0) {
            let secret: Fr = solution
                .rows()
                .iter()
                .map(|&(row, c)| c * shares[row])
                .sum();
            assert_eq!(secret, w[0]);
        }
    }
}

#[test]
fn from_policy_checks_limits() {
    let wide = Policy::Or(vec![Policy::leaf("a@x").unwrap(); MAX_LEAVES + 1]);
    assert_eq!(
        Lsss::<Fr>::from_policy(&wide).unwrap_err(),
        PolicyError::TooManyLeaves { max: MAX_LEAVES }
    );
    let bad = Policy::Threshold {
        k: 2,
        children: vec![Policy::leaf("a@x").unwrap()],
    };
    assert_eq!(
        Lsss::<Fr>::from_policy(&bad).unwrap_err(),
        PolicyError::InvalidThreshold { k: 2, n: 1 }
    );
    let max = parse(&vec!["a@x"; MAX_LEAVES].join(" AND ")).unwrap();
    let lsss = Lsss::<Fr>::from_policy(&max).unwrap();
    assert_eq!(lsss.len(), MAX_LEAVES);
    assert_eq!(lsss.columns(), MAX_LEAVES);
    assert!(!lsss.is_empty());
    let solution = lsss.solve(|_, _| true).unwrap();
    assert_eq!(reconstruct(&lsss, &solution), target(lsss.columns()));
}
