//! Property: decryption succeeds if and only if the key set satisfies the
//! policy, and when it does not, forcing decryption with every held row fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{collections::BTreeSet, sync::OnceLock};

use ark_bls12_381::Fr;
use ark_ff::One;
use common::{World, attr};
use mabe_abe::{AbeError, EncryptOptions, Gid, Policy, UserKeyRing, decapsulate_forced, encrypt};
use proptest::prelude::*;

const NAMES: &[&str] = &["a@x", "b@x", "c@y", "d@y", "e@z", "f@z"];

struct Fixture {
    world: World,
    /// One person holding every attribute; rings are built from subsets.
    keys: Vec<mabe_abe::UserKey>,
    gid: Gid,
}

fn fixture() -> &'static std::sync::Mutex<Fixture> {
    static F: OnceLock<std::sync::Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        let mut world = World::new(NAMES, 50);
        let gid = Gid::derive("test-register", "prop").unwrap();
        let h = mabe_abe::HashedGid::new(gid).unwrap();
        let keys = NAMES
            .iter()
            .map(|n| world.secrets[&attr(n)].keygen(&h, &mut world.rng))
            .collect();
        std::sync::Mutex::new(Fixture { world, keys, gid })
    })
}

fn leaf() -> impl Strategy<Value = Policy> {
    prop::sample::select(NAMES).prop_map(|n| Policy::Leaf(attr(n)))
}

fn policy() -> impl Strategy<Value = Policy> {
    leaf().prop_recursive(4, 10, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..=3).prop_map(Policy::And),
            prop::collection::vec(inner.clone(), 2..=3).prop_map(Policy::Or),
            prop::collection::vec(inner, 1..=3)
                .prop_flat_map(|c| {
                    let n = c.len();
                    (1..=n, Just(c))
                })
                .prop_map(|(k, children)| Policy::Threshold { k, children }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn decrypts_iff_satisfied(p in policy(), held_mask in 0u32..64) {
        let mut f = fixture().lock().unwrap();
        let held: Vec<usize> = (0..NAMES.len()).filter(|i| held_mask & (1 << i) != 0).collect();
        let mut ring = UserKeyRing::new(f.gid).unwrap();
        for &i in &held {
            let k = mabe_abe::UserKey::from_bytes(&f.keys[i].to_bytes()).unwrap();
            ring.insert_unverified(k);
        }
        let held_set: BTreeSet<_> = held.iter().map(|&i| attr(NAMES[i])).collect();
        let satisfied = p.is_satisfied_by(&held_set);
        let payload = p.to_string().into_bytes();
        let mut ct = Vec::new();
        let Fixture { world, .. } = &mut *f;
        let header = encrypt(&p, &world.directory, &EncryptOptions::default(), &mut world.rng, &payload[..], &mut ct).unwrap();
        let got = world.decrypt(&header, &ring, &ct);
        if satisfied {
            prop_assert_eq!(got.unwrap(), payload);
        } else {
            let unsatisfied = matches!(got, Err(AbeError::Unsatisfied { .. }));
            prop_assert!(unsatisfied);
            // Cryptographic check: all held rows, coefficient 1.
            let sel: Vec<(usize, Fr)> = header.rows().iter().enumerate()
                .filter(|(_, r)| held_set.contains(r.attribute()))
                .map(|(x, _)| (x, Fr::one()))
                .collect();
            let forced = decapsulate_forced(&header, &ring, &world.directory, &sel);
            prop_assert!(matches!(forced, Err(AbeError::DecryptionFailed)));
        }
    }
}
