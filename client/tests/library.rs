//! The library's refusals, without authority processes: keys split across
//! two GIDs do not decrypt (the cryptography is attempted), directories that
//! are tampered with, signed by another key, expired or superseded are
//! refused, and a tampered or truncated record never decrypts as valid.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;

use ark_std::rand::{SeedableRng, rngs::StdRng};
use common::OfflineAuthority;
use ed25519_dalek::{Signer, SigningKey};
use mabe_abe::{
    AbeError, AttributePublicKey, EncryptOptions, Gid, PublicKeyRing, UserKeyRing, Version,
    decapsulate,
};
use mabe_client::{
    ClientError, Identity,
    directory::{SignedDirectory, VerifiedDirectory, encryption_ring},
    record::{SignatureStatus, decrypt_payload, read_prefix, write_record},
};
use mabe_proto::signing::{Directory, DirectoryEntry};

fn three(rng: &mut StdRng) -> [OfflineAuthority; 3] {
    [
        OfflineAuthority::new("hospital-a", &["cardiology"], rng),
        OfflineAuthority::new("hospital-b", &["consultant"], rng),
        OfflineAuthority::new("hospital-c", &["genetics"], rng),
    ]
}

const POLICY: &str = "cardiology@hospital-a AND consultant@hospital-b AND genetics@hospital-c";

fn record(
    rng: &mut StdRng,
    auths: &[OfflineAuthority; 3],
    plain: &[u8],
) -> (Vec<u8>, PublicKeyRing) {
    let mut pks = PublicKeyRing::new();
    for a in auths {
        pks.insert(a.attributes[0].public_key(rng)).unwrap();
    }
    let writer = Identity::generate("big-register", "writer", rng).unwrap();
    let mut out = Vec::new();
    write_record(
        &mabe_policy::parse(POLICY).unwrap(),
        &pks,
        &EncryptOptions { segment_size: 1024 },
        Some(&writer),
        rng,
        plain,
        &mut out,
    )
    .unwrap();
    (out, pks)
}

fn ring(
    gid: Gid,
    auths: &[&OfflineAuthority],
    pks: &PublicKeyRing,
    rng: &mut StdRng,
) -> UserKeyRing {
    let mut r = UserKeyRing::new(gid).unwrap();
    for a in auths {
        let sk = &a.attributes[0];
        let k = sk.keygen(r.hashed_gid(), rng);
        r.insert(k, pks.get(sk.attribute(), sk.version()).unwrap())
            .unwrap();
    }
    r
}

/// Full read path: prefix, decapsulation, payload, signature.
fn read(record: &[u8], keys: &UserKeyRing, pks: &PublicKeyRing) -> Result<Vec<u8>, String> {
    let mut input = record;
    let prefix = read_prefix(&mut input).map_err(|e| e.to_string())?;
    let key = decapsulate(&prefix.header, keys, pks).map_err(|e| e.to_string())?;
    let mut plain = Vec::new();
    let s = decrypt_payload(&prefix, &key, input, &mut plain).map_err(|e| e.to_string())?;
    s.signature.require_valid().map_err(|e| e.to_string())?;
    Ok(plain)
}

#[test]
fn keys_of_three_authorities_decrypt_for_one_gid_and_fail_split_across_two() {
    let mut rng = StdRng::seed_from_u64(11);
    let auths = three(&mut rng);
    let plain = vec![42u8; 5000];
    let (rec, pks) = record(&mut rng, &auths, &plain);

    let alice = Gid::derive("big-register", "alice").unwrap();
    let all = ring(alice, &[&auths[0], &auths[1], &auths[2]], &pks, &mut rng);
    assert_eq!(read(&rec, &all, &pks).unwrap(), plain);

    // Bob holds A's and B's attributes, Carol holds C's: each alone is refused
    // before any cryptography...
    let bob = Gid::derive("big-register", "bob").unwrap();
    let carol = Gid::derive("big-register", "carol").unwrap();
    let mut bobs = ring(bob, &[&auths[0], &auths[1]], &pks, &mut rng);
    let carols = ring(carol, &[&auths[2]], &pks, &mut rng);
    let header = read_prefix(&mut &rec[..]).unwrap().header;
    assert!(matches!(
        decapsulate(&header, &bobs, &pks),
        Err(AbeError::Unsatisfied { .. })
    ));
    // ...and pooling their keys in one ring (skipping the GID check on
    // purpose) runs the cryptography, which fails: keys bound to different
    // GIDs do not combine.
    let carols_key = mabe_abe::UserKey::from_bytes(
        &carols
            .get(&"genetics@hospital-c".parse().unwrap())
            .unwrap()
            .to_bytes(),
    )
    .unwrap();
    bobs.insert_unverified(carols_key);
    assert!(matches!(
        decapsulate(&header, &bobs, &pks),
        Err(AbeError::DecryptionFailed)
    ));
    // The client's own key store refuses such a key outright.
    let mut store = mabe_client::StoredKeys::new(bob).unwrap();
    let sk = &auths[2].attributes[0];
    let foreign = sk.keygen(carols.hashed_gid(), &mut rng);
    let err = store
        .insert_verified(foreign, pks.get(sk.attribute(), sk.version()).unwrap(), 0)
        .unwrap_err();
    assert!(err.to_string().contains("another GID"), "{err}");
}

#[test]
fn tampered_or_truncated_records_never_decrypt_as_valid() {
    let mut rng = StdRng::seed_from_u64(12);
    let auths = three(&mut rng);
    let plain: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let (rec, pks) = record(&mut rng, &auths, &plain);
    let keys = ring(
        Gid::derive("big-register", "alice").unwrap(),
        &[&auths[0], &auths[1], &auths[2]],
        &pks,
        &mut rng,
    );
    assert_eq!(read(&rec, &keys, &pks).unwrap(), plain);
    let len = rec.len();
    // Every region: magic, length, header, signer, payload, signature.
    let mut positions: Vec<usize> = (0..len).step_by(53).collect();
    positions.extend([0, 5, 9, 10, len - 1, len - 64, len - 65, len - 80]);
    for pos in positions {
        let mut bad = rec.clone();
        bad[pos] ^= 0x01;
        assert!(
            read(&bad, &keys, &pks).is_err(),
            "flip at {pos} of {len} accepted"
        );
    }
    for cut in [0, 6, 100, len - 200, len - 65, len - 64, len - 1] {
        assert!(
            read(&rec[..cut], &keys, &pks).is_err(),
            "cut at {cut} accepted"
        );
    }
    let mut long = rec.clone();
    long.push(0);
    assert!(read(&long, &keys, &pks).is_err());

    // A record re-signed by someone else is reported as such.
    let mut input = &rec[..];
    let prefix = read_prefix(&mut input).unwrap();
    let key = decapsulate(&prefix.header, &keys, &pks).unwrap();
    let mut forged = rec.clone();
    let n = forged.len();
    forged[n - 64..].copy_from_slice(&SigningKey::from_bytes(&[9; 32]).sign(b"x").to_bytes());
    let mut input = &forged[..];
    let prefix2 = read_prefix(&mut input).unwrap();
    let s = decrypt_payload(&prefix2, &key, input, &mut Vec::new()).unwrap();
    assert!(matches!(s.signature, SignatureStatus::Invalid(_)));
    assert!(matches!(
        s.signature.require_valid(),
        Err(ClientError::BadSignature(_))
    ));
    drop(prefix);
}

fn signed_dir(
    key: &SigningKey,
    authority: &str,
    entries: Vec<(&AttributePublicKey, bool)>,
    issued_at: i64,
) -> SignedDirectory {
    let body = Directory {
        authority: authority.into(),
        issued_at,
        valid_until: issued_at + 3600,
        entries: entries
            .into_iter()
            .map(|(pk, current)| DirectoryEntry {
                attribute: pk.attribute().to_string(),
                version: pk.version().get(),
                current,
                public_key: pk.to_bytes(),
            })
            .collect(),
    }
    .encode();
    SignedDirectory {
        signature: key.sign(&body).to_bytes().to_vec(),
        body,
    }
}

#[test]
fn directories_tampered_foreign_expired_or_superseded_are_refused() {
    let mut rng = StdRng::seed_from_u64(13);
    let a = OfflineAuthority::new("hospital-a", &["doctor"], &mut rng);
    let trusted = a.trusted();
    let v1 = &a.attributes[0];
    let pk1 = v1.public_key(&mut rng);
    let (v2, _) = v1.rotate(&mut rng).unwrap();
    let pk2 = v2.public_key(&mut rng);
    let now = mabe_client::unix_now();
    let doctor = "doctor@hospital-a".parse().unwrap();
    let policy = mabe_policy::parse("doctor@hospital-a").unwrap();
    let ring_of = |d: VerifiedDirectory, at: i64| {
        encryption_ring(&policy, &BTreeMap::from([(d.authority().clone(), d)]), at)
    };

    // After a rotation: v1 superseded, v2 current: encryption uses v2.
    let d = signed_dir(
        &a.identity,
        "hospital-a",
        vec![(&pk1, false), (&pk2, true)],
        now,
    );
    let d = VerifiedDirectory::verify(&trusted, d).unwrap();
    let ring = ring_of(d, now).unwrap();
    assert_eq!(ring.current(&doctor).unwrap().version(), Version::new(2));

    // Only a superseded version listed: refused, never used.
    let d = signed_dir(&a.identity, "hospital-a", vec![(&pk1, false)], now);
    let err = ring_of(VerifiedDirectory::verify(&trusted, d).unwrap(), now).unwrap_err();
    assert!(matches!(err, ClientError::Superseded { .. }), "{err}");
    assert!(err.to_string().contains("superseded"), "{err}");

    // An older version marked current next to a newer one: inconsistent.
    let d = signed_dir(
        &a.identity,
        "hospital-a",
        vec![(&pk1, true), (&pk2, false)],
        now,
    );
    let err = VerifiedDirectory::verify(&trusted, d).unwrap_err();
    assert!(err.to_string().contains("marked current"), "{err}");

    // Expired: fine to decrypt with, refused for encryption.
    let d = signed_dir(&a.identity, "hospital-a", vec![(&pk2, true)], now - 7200);
    let err = ring_of(VerifiedDirectory::verify(&trusted, d).unwrap(), now).unwrap_err();
    assert!(matches!(err, ClientError::DirectoryExpired { .. }), "{err}");

    // A tampered entry (any byte of the body), a signature by another key,
    // another authority's directory: refused with the reason.
    let good = signed_dir(&a.identity, "hospital-a", vec![(&pk2, true)], now);
    for pos in (0..good.body.len()).step_by(41) {
        let mut bad = good.clone();
        bad.body[pos] ^= 0x04;
        let err = VerifiedDirectory::verify(&trusted, bad).unwrap_err();
        assert!(
            err.to_string()
                .contains("signature does not verify with the pinned identity key"),
            "{err}"
        );
    }
    let other = SigningKey::from_bytes(&[5; 32]);
    let foreign = signed_dir(&other, "hospital-a", vec![(&pk2, true)], now);
    assert!(matches!(
        VerifiedDirectory::verify(&trusted, foreign),
        Err(ClientError::BadDirectory { .. })
    ));
    let wrong_id = signed_dir(&a.identity, "hospital-b", vec![(&pk2, true)], now);
    let err = VerifiedDirectory::verify(&trusted, wrong_id).unwrap_err();
    assert!(err.to_string().contains("directory of hospital-b"), "{err}");
    // The stored form round-trips and refuses trailing bytes.
    let bytes = good.to_bytes();
    assert_eq!(SignedDirectory::from_bytes(&bytes).unwrap(), good);
    let mut long = bytes.clone();
    long.push(0);
    assert!(SignedDirectory::from_bytes(&long).is_err());
}
