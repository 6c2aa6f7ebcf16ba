//! A revocation leaves a pending rotation whose sealed update secret computes
//! the proxy's tokens: after applying them to a stored header, the remaining
//! holder's new key decrypts it and the revoked person's old key does not;
//! finishing the rotation erases the secret.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signer, SigningKey};
use mabe_abe::{
    AttributePublicKey, EncryptOptions, Gid, PublicKeyRing, Snapshot, UserKey, UserKeyRing,
    Version, decrypt, encrypt,
};
use mabe_authority::{
    node::{KeyFetch, Node, NodeConfig, NodeError, now},
    seal::Kek,
    store::{RotationState, sqlite::SqliteStore},
};

struct Person {
    gid: Gid,
    key: SigningKey,
}

async fn enroll(node: &Node, subject: &str) -> Person {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    let p = node
        .enroll(
            "big-register",
            subject,
            &key.verifying_key().to_bytes(),
            &[],
        )
        .await
        .unwrap();
    node.grant(&p.gid, "cardiology", None, "admin")
        .await
        .unwrap();
    Person {
        gid: Gid::from_bytes(p.gid),
        key,
    }
}

async fn fetch(node: &Node, p: &Person, pks: &PublicKeyRing) -> UserKeyRing {
    let mut nonce = vec![0u8; 16];
    OsRng.fill_bytes(&mut nonce);
    let ts = now();
    let msg =
        mabe_proto::signing::key_request_message("hospital-a", p.gid.as_bytes(), &[], &nonce, ts);
    let keys = node
        .fetch_keys(&KeyFetch {
            authority: "hospital-a".into(),
            gid: p.gid.as_bytes().to_vec(),
            attributes: vec![],
            nonce,
            timestamp: ts,
            signature: p.key.sign(&msg).to_bytes().to_vec(),
        })
        .await
        .unwrap();
    let mut ring = UserKeyRing::new(p.gid).unwrap();
    for k in keys {
        let k = UserKey::from_bytes(&k.key).unwrap();
        let pk = pks.get(k.attribute(), k.version()).unwrap().clone();
        ring.insert(k, &pk).unwrap();
    }
    ring
}

/// The (attribute, version) pairs a fetch of every granted key returns.
async fn fetched_versions(node: &Node, p: &Person) -> Vec<(String, u32)> {
    let mut nonce = vec![0u8; 16];
    OsRng.fill_bytes(&mut nonce);
    let ts = now();
    let msg =
        mabe_proto::signing::key_request_message("hospital-a", p.gid.as_bytes(), &[], &nonce, ts);
    let mut v: Vec<(String, u32)> = node
        .fetch_keys(&KeyFetch {
            authority: "hospital-a".into(),
            gid: p.gid.as_bytes().to_vec(),
            attributes: vec![],
            nonce,
            timestamp: ts,
            signature: p.key.sign(&msg).to_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.attribute, k.version))
        .collect();
    v.sort();
    v
}

async fn directory(node: &Node) -> PublicKeyRing {
    let mut pks = PublicKeyRing::new();
    for (rec, _) in node.attributes().await.unwrap() {
        pks.insert(AttributePublicKey::from_bytes(&rec.public_key).unwrap())
            .unwrap();
    }
    pks
}

#[tokio::test]
async fn revocation_leaves_a_rotation_whose_tokens_update_stored_records() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&tmp.path().join("a.db")).unwrap());
    let (node, _admin) = Node::init(
        store,
        "hospital-a",
        Kek::generate(&mut OsRng),
        NodeConfig::default(),
    )
    .await
    .unwrap();
    node.create_attribute("cardiology").await.unwrap();
    let leaving = enroll(&node, "leaving").await;
    let staying = enroll(&node, "staying").await;
    let pks = directory(&node).await;
    let old_ring = fetch(&node, &leaving, &pks).await;

    // A stored record under version 1.
    let policy = mabe_policy::parse("cardiology@hospital-a").unwrap();
    let mut payload = Vec::new();
    let mut header = encrypt(
        &policy,
        &pks,
        &EncryptOptions::default(),
        &mut OsRng,
        &b"echo"[..],
        &mut payload,
    )
    .unwrap();

    let rev = node
        .revoke(leaving.gid.as_bytes(), "cardiology")
        .await
        .unwrap();
    assert_eq!((rev.new_version, rev.remaining_holders), (2, 1));
    let jobs = node.rotations(true).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(
        (job.id, job.from_version, job.state),
        (rev.rotation_id, 1, RotationState::Pending)
    );

    // The proxy side: snapshot, tokens from the unsealed update secret, apply.
    let attr: mabe_abe::Attribute = "cardiology@hospital-a".parse().unwrap();
    let mut snap = Snapshot::new(attr.clone(), Version::FIRST);
    let rows = header.snapshot_rows(&attr, Version::FIRST);
    for r in &rows {
        snap.insert(*r).unwrap();
    }
    let us = node.update_secret(job).unwrap();
    let mut tg = us.token_generator(snap, &mut OsRng).unwrap();
    let tokens: Vec<_> = rows
        .iter()
        .map(|r| tg.issue(r, &mut OsRng).unwrap())
        .collect();
    header.apply_tokens(&tokens).unwrap();

    // While the rotation is pending, the remaining holder gets both
    // versions (stored rows not updated yet need the old one); the revoked
    // person gets nothing.
    let cardio = "cardiology@hospital-a".to_owned();
    assert_eq!(
        fetched_versions(&node, &staying).await,
        vec![(cardio.clone(), 1), (cardio.clone(), 2)]
    );
    assert!(fetched_versions(&node, &leaving).await.is_empty());
    let pks = directory(&node).await;
    let new_ring = fetch(&node, &staying, &pks).await;
    let mut out = Vec::new();
    decrypt(&header, &new_ring, &pks, &payload[..], &mut out).unwrap();
    assert_eq!(out, b"echo");
    assert!(decrypt(&header, &old_ring, &pks, &payload[..], &mut Vec::new()).is_err());

    // Finishing erases the secret; it cannot be used again.
    let done = node.finish_rotation(job.id).await.unwrap();
    assert_eq!(done.state, RotationState::Done);
    assert!(matches!(
        node.update_secret(&done),
        Err(NodeError::Conflict(_))
    ));
    assert!(node.rotations(true).await.unwrap().is_empty());
    // Once the rotation is done, only the current version is issued.
    assert_eq!(
        fetched_versions(&node, &staying).await,
        vec![(cardio.clone(), 2)]
    );
    assert!(node.verify_audit().await.unwrap().problems.is_empty());
}
