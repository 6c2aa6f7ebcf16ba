//! Cryptographic negatives: every one of these attempts decryption (bypassing
//! the satisfiability pre-check with `decapsulate_forced` where needed), so
//! they fail only if the *cryptography* refuses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use ark_bls12_381::Fr;
use ark_ff::{One, UniformRand};
use common::{World, attr};
use mabe_abe::{
    AbeError, AttributeSecretKey, Gid, Header, UserKeyRing, Version, decapsulate,
    decapsulate_forced,
};

fn forced_fails(w: &World, header: &Header, ring: &UserKeyRing, sel: &[(usize, Fr)]) {
    match decapsulate_forced(header, ring, &w.directory, sel) {
        Err(AbeError::DecryptionFailed) => {}
        Err(e) => panic!("expected a cryptographic failure, got {e}"),
        Ok(_) => panic!("decryption succeeded with selection {sel:?}"),
    }
}

#[test]
fn and_missing_one_leaf_fails_cryptographically() {
    let mut w = World::new(&["a@x", "b@x", "c@y"], 10);
    let ring = w.person("u", &["a@x", "c@y"]);
    let (header, ct) = w.encrypt("a@x AND b@x AND c@y", b"secret");
    // The API reports the missing attribute before any cryptography…
    match w.decrypt(&header, &ring, &ct) {
        Err(AbeError::Unsatisfied { missing, .. }) => assert_eq!(missing, vec![attr("b@x")]),
        other => panic!("unexpected {other:?}"),
    }
    // …and the cryptography refuses too, for any coefficients on the rows held.
    let mut rng = common::rng(11);
    forced_fails(&w, &header, &ring, &[(0, Fr::one()), (2, Fr::one())]);
    for _ in 0..4 {
        let sel = [(0, Fr::rand(&mut rng)), (2, Fr::rand(&mut rng))];
        forced_fails(&w, &header, &ring, &sel);
    }
}

#[test]
fn no_single_and_leaf_reconstructs_the_secret() {
    // The bug class where one row of an AND equals the target vector and any
    // key decrypts: try every single row, with coefficient 1 and random ones.
    let names = ["a@x", "b@x", "c@y", "d@y", "e@z", "f@z"];
    let mut w = World::new(&names, 12);
    let mut rng = common::rng(13);
    for n in 2..=names.len() {
        let policy = names[..n].join(" AND ");
        let (header, _) = w.encrypt(&policy, b"x");
        let ring = w.person(&format!("holder-of-all-{n}"), &names[..n]);
        for x in 0..n {
            forced_fails(&w, &header, &ring, &[(x, Fr::one())]);
            forced_fails(&w, &header, &ring, &[(x, Fr::rand(&mut rng))]);
        }
        // And every proper subset of the rows with coefficient 1.
        for mask in 1u32..(1 << n) - 1 {
            let sel: Vec<(usize, Fr)> = (0..n)
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| (i, Fr::one()))
                .collect();
            forced_fails(&w, &header, &ring, &sel);
        }
        // Sanity: the full set does decrypt.
        assert!(decapsulate(&header, &ring, &w.directory).is_ok());
    }
}

#[test]
fn two_of_three_with_one_key_fails() {
    let mut w = World::new(&["a@x", "b@y", "c@z"], 14);
    let ring = w.person("u", &["b@y"]);
    let (header, ct) = w.encrypt("2 of (a@x, b@y, c@z)", b"secret");
    assert!(matches!(
        w.decrypt(&header, &ring, &ct),
        Err(AbeError::Unsatisfied { .. })
    ));
    let mut rng = common::rng(15);
    forced_fails(&w, &header, &ring, &[(1, Fr::one())]);
    // The Lagrange coefficients a 2-subset containing row 1 would use.
    for c in [Fr::from(2u64), -Fr::one(), Fr::from(3u64) / Fr::from(2u64)] {
        forced_fails(&w, &header, &ring, &[(1, c)]);
    }
    for _ in 0..4 {
        forced_fails(&w, &header, &ring, &[(1, Fr::rand(&mut rng))]);
    }
}

#[test]
fn colluding_users_cannot_combine_keys() {
    let mut w = World::new(&["doctor@a", "cardiology@a", "nurse@b"], 16);
    let alice = w.person("alice", &["doctor@a"]);
    let bob = w.person("bob", &["cardiology@a", "nurse@b"]);
    let (header, ct) = w.encrypt("doctor@a AND cardiology@a", b"cardiac record");
    assert!(w.decrypt(&header, &alice, &ct).is_err());
    assert!(w.decrypt(&header, &bob, &ct).is_err());
    // Pool Alice's doctor key with Bob's cardiology key, under either GID.
    for (owner, other_subject, other_attr) in [
        ("alice", "bob", "cardiology@a"),
        ("bob", "alice", "doctor@a"),
    ] {
        let mut pooled = w.person(
            owner,
            &[if owner == "alice" {
                "doctor@a"
            } else {
                "cardiology@a"
            }],
        );
        let stranger =
            UserKeyRing::new(Gid::derive("test-register", other_subject).unwrap()).unwrap();
        let sk = &w.secrets[&attr(other_attr)];
        let foreign_key = sk.keygen(stranger.hashed_gid(), &mut w.rng);
        // A verified insert refuses it…
        let pk = w.directory.current(&attr(other_attr)).unwrap().clone();
        assert!(
            pooled
                .insert(sk.keygen(stranger.hashed_gid(), &mut w.rng), &pk)
                .is_err()
        );
        // …and even forced in, decryption fails.
        pooled.insert_unverified(foreign_key);
        match w.decrypt(&header, &pooled, &ct) {
            Err(AbeError::DecryptionFailed) => {}
            other => panic!("collusion must fail cryptographically, got {other:?}"),
        }
    }
}

#[test]
fn a_key_from_another_authority_fails() {
    let mut w = World::new(&["doctor@a"], 17);
    let (header, ct) = w.encrypt("doctor@a", b"x");
    // An impostor authority issues a key for the same attribute name.
    let impostor = AttributeSecretKey::generate(attr("doctor@a"), Version::FIRST, &mut w.rng);
    let mut ring = UserKeyRing::new(Gid::derive("r", "eve").unwrap()).unwrap();
    let key = impostor.keygen(ring.hashed_gid(), &mut w.rng);
    let real_pk = w.directory.current(&attr("doctor@a")).unwrap().clone();
    assert!(matches!(
        ring.insert(impostor.keygen(ring.hashed_gid(), &mut w.rng), &real_pk),
        Err(AbeError::InvalidKey { .. })
    ));
    ring.insert_unverified(key);
    assert!(matches!(
        w.decrypt(&header, &ring, &ct),
        Err(AbeError::DecryptionFailed)
    ));
}

#[test]
fn tampering_any_header_byte_is_refused() {
    let mut w = World::new(&["a@x", "b@y"], 18);
    let ring = w.person("u", &["a@x", "b@y"]);
    let (header, ct) = w.encrypt("a@x OR b@y", b"payload");
    let bytes = header.to_bytes();
    let mut decode_errors = 0;
    let mut crypto_errors = 0;
    for i in 0..bytes.len() {
        let mut t = bytes.clone();
        t[i] ^= 0x01;
        match Header::from_bytes(&t) {
            Err(_) => decode_errors += 1,
            Ok(h) => match w.decrypt(&h, &ring, &ct) {
                Ok(_) => panic!("tampered byte {i} still decrypts"),
                Err(AbeError::DecryptionFailed) => crypto_errors += 1,
                // Version or policy fields changed into other valid values
                // are reported before any cryptography.
                Err(
                    AbeError::MissingPublicKey { .. }
                    | AbeError::Unsatisfied { .. }
                    | AbeError::KeyVersionMismatch { .. },
                ) => {}
                Err(e) => panic!("byte {i}: unexpected error {e}"),
            },
        }
    }
    assert!(decode_errors > 0 && crypto_errors > 0);
    // Every C0, nonce prefix and key-commitment byte reaches the crypto check.
    assert!(crypto_errors >= 32 + 7 + 32, "{crypto_errors}");
}

#[test]
fn tampering_or_truncating_the_payload_is_refused_with_one_error() {
    let mut w = World::new(&["a@x"], 19);
    let ring = w.person("u", &["a@x"]);
    let policy = mabe_policy::parse("a@x").unwrap();
    let opts = mabe_abe::EncryptOptions { segment_size: 1024 };
    let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
    let mut ct = Vec::new();
    let header = mabe_abe::encrypt(
        &policy,
        &w.directory,
        &opts,
        &mut w.rng,
        &payload[..],
        &mut ct,
    )
    .unwrap();
    assert_eq!(w.decrypt(&header, &ring, &ct).unwrap(), payload);
    for i in (0..ct.len()).step_by(7) {
        let mut t = ct.clone();
        t[i] ^= 0x80;
        assert!(matches!(
            w.decrypt(&header, &ring, &t),
            Err(AbeError::DecryptionFailed)
        ));
    }
    // Truncation at a segment boundary, inside a segment, and to nothing.
    for cut in [0, 1024 + 16, 2 * (1024 + 16), ct.len() - 1, 10] {
        assert!(
            matches!(
                w.decrypt(&header, &ring, &ct[..cut]),
                Err(AbeError::DecryptionFailed)
            ),
            "cut {cut}"
        );
    }
    // Appending data, or swapping two segments.
    let mut longer = ct.clone();
    longer.extend_from_slice(&[0u8; 40]);
    assert!(w.decrypt(&header, &ring, &longer).is_err());
    let mut swapped = ct.clone();
    let s = 1024 + 16;
    swapped[..s].copy_from_slice(&ct[s..2 * s]);
    swapped[s..2 * s].copy_from_slice(&ct[..s]);
    assert!(w.decrypt(&header, &ring, &swapped).is_err());
}

#[test]
fn payload_of_one_record_under_another_header_fails() {
    let mut w = World::new(&["a@x"], 20);
    let ring = w.person("u", &["a@x"]);
    let (h1, _c1) = w.encrypt("a@x", b"first");
    let (_h2, c2) = w.encrypt("a@x", b"second");
    assert!(matches!(
        w.decrypt(&h1, &ring, &c2),
        Err(AbeError::DecryptionFailed)
    ));
}

/// Decryption consistency (the FO check's job): a header whose *unused* rows
/// were altered into other valid group elements must be refused even by a
/// reader whose own rows are intact, so that no two readers ever get
/// different plaintexts. The key commitment alone would not catch this.
#[test]
fn altering_a_row_the_reader_does_not_use_is_detected() {
    use ark_bls12_381::G1Affine;
    use ark_ec::{AffineRepr, CurveGroup};
    use ark_serialize::CanonicalSerialize;

    let mut w = World::new(&["a@x", "b@y"], 21);
    let reader = w.person("reader-of-a", &["a@x"]);
    let (header, ct) = w.encrypt("a@x OR b@y", b"consistent");
    assert_eq!(w.decrypt(&header, &reader, &ct).unwrap(), b"consistent");
    let bytes = header.to_bytes();
    let row_len = 4 + 576 + 48 + 48;
    let base = 6 + 2 + 16 + 4 + header.policy_text().len() + 4;
    let row1 = base + row_len;
    // C1 of row 1 times egg (still in GT), or C3 of row 1 plus g1 (still in G1).
    let mut c1 = Vec::new();
    (*header.rows()[1].c1() + mabe_abe::egg())
        .0
        .serialize_compressed(&mut c1)
        .unwrap();
    let mut c3 = Vec::new();
    (*header.rows()[1].c3() + G1Affine::generator())
        .into_affine()
        .serialize_compressed(&mut c3)
        .unwrap();
    for (at, new) in [(row1 + 4, c1), (row1 + 4 + 576 + 48, c3)] {
        let mut t = bytes.clone();
        t[at..at + new.len()].copy_from_slice(&new);
        let h = Header::from_bytes(&t).expect("still a well-formed header");
        assert!(matches!(
            w.decrypt(&h, &reader, &ct),
            Err(AbeError::DecryptionFailed)
        ));
    }
}
