//! Emergency access (DESIGN §4) over real gRPC with TLS, on both backends:
//! break-glass by a person enrolled as emergency staff gets a key at once
//! that decrypts an `emergency@` record, with the reason in the audit log;
//! anyone else is refused and audited; after expiry, `rotate-expired` moves
//! the attribute to a new version in one rotation, the old key no longer
//! decrypts new records, and the person gets nothing more without breaking
//! the glass again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use ark_std::rand::rngs::OsRng;
use ed25519_dalek::Signer;
use mabe_abe::{
    AttributePublicKey, EncryptOptions, PublicKeyRing, UserKey, UserKeyRing, decrypt, encrypt,
};
use mabe_authority::{
    admin_client::signed,
    node::{NodeConfig, now},
    store::{Store, sqlite::SqliteStore},
};
use mabe_proto::{
    signing::{Directory, break_glass_message},
    v1::{
        BreakGlassRequest, CreateAttributeRequest, EnrollRequest, GetDirectoryRequest,
        RotateExpiredRequest, VerifyAuditRequest,
    },
};
use tonic::Code;

mod common;
use common::*;

fn break_glass(p: &Person, reason: &str) -> BreakGlassRequest {
    let (n, ts) = (nonce(), now());
    let msg = break_glass_message("hospital-a", p.gid.as_bytes(), reason, &n, ts);
    BreakGlassRequest {
        authority_id: "hospital-a".into(),
        gid: p.gid.as_bytes().to_vec(),
        reason: reason.into(),
        nonce: n,
        timestamp: ts,
        signature: p.key.sign(&msg).to_bytes().to_vec(),
    }
}

async fn directory(r: &mut Running) -> PublicKeyRing {
    let dir = r
        .public
        .get_directory(GetDirectoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let directory = Directory::decode(&dir.body).unwrap();
    let mut pks = PublicKeyRing::new();
    for e in &directory.entries {
        pks.insert(AttributePublicKey::from_bytes(&e.public_key).unwrap())
            .unwrap();
    }
    pks
}

fn seal(pks: &PublicKeyRing, text: &[u8]) -> (mabe_abe::Header, Vec<u8>) {
    let policy = mabe_policy::parse("emergency@hospital-a").unwrap();
    let mut ct = Vec::new();
    let header = encrypt(
        &policy,
        pks,
        &EncryptOptions::default(),
        &mut OsRng,
        text,
        &mut ct,
    )
    .unwrap();
    (header, ct)
}

async fn emergency(store: Arc<dyn Store>) {
    let config = NodeConfig {
        break_glass_secs: 1,
        ..NodeConfig::default()
    };
    let mut r = start_with(store, config).await;
    let admin = |m: &str| format!("{ADMIN}{m}");
    r.admin
        .create_attribute(signed(
            CreateAttributeRequest {
                name: "emergency".into(),
            },
            "hospital-a",
            &admin("CreateAttribute"),
            &r.admin_key,
        ))
        .await
        .unwrap();
    let staff = person("19012345611");
    let visitor = person("19012345612");
    for (p, subject, roles) in [
        (&staff, "19012345611", vec!["emergency-staff".to_owned()]),
        (&visitor, "19012345612", vec![]),
    ] {
        r.admin
            .enroll(signed(
                EnrollRequest {
                    registry: "big-register".into(),
                    subject: subject.into(),
                    request_key: p.key.verifying_key().to_bytes().to_vec(),
                    roles,
                },
                "hospital-a",
                &admin("Enroll"),
                &r.admin_key,
            ))
            .await
            .unwrap();
    }
    let pks = directory(&mut r).await;
    let (header, ct) = seal(&pks, b"allergies: penicillin");

    // Not emergency staff: refused, audited, no key.
    let before = refusals(&r.node).await;
    let err = r
        .public
        .break_glass(break_glass(&visitor, "curious"))
        .await
        .expect_err("not emergency staff");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("emergency-staff"),
        "{}",
        err.message()
    );
    assert_eq!(refusals(&r.node).await, before + 1);
    // No reason: refused.
    let err = r
        .public
        .break_glass(break_glass(&staff, "  "))
        .await
        .expect_err("a reason is required");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Emergency staff: a key at once, expiring, that decrypts the record.
    let reason = "patient unconscious in the ER, cardiac history unknown";
    let keys = r
        .public
        .break_glass(break_glass(&staff, reason))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].attribute, "emergency@hospital-a");
    assert!(keys[0].expires_at > 0 && keys[0].expires_at <= now() + 1);
    let old_key = UserKey::from_bytes(&keys[0].user_key).unwrap();
    let mut ring = UserKeyRing::new(staff.gid).unwrap();
    let pk = pks
        .get(old_key.attribute(), old_key.version())
        .unwrap()
        .clone();
    ring.insert(UserKey::from_bytes(&keys[0].user_key).unwrap(), &pk)
        .expect("break-glass key passes the pairing check");
    let mut out = Vec::new();
    decrypt(&header, &ring, &pks, &ct[..], &mut out).unwrap();
    assert_eq!(out, b"allergies: penicillin");
    // The reason is in the audit log, next to the grant it caused.
    let entries = r.node.store().audit_entries(1, 10_000).await.unwrap();
    let bg = entries
        .iter()
        .find(|e| e.event.kind == "break-glass")
        .expect("a break-glass audit entry");
    assert!(bg.event.detail.contains(reason), "{}", bg.event.detail);
    assert_eq!(
        bg.event.subject.as_deref(),
        Some(staff.gid.to_string().as_str())
    );

    // After expiry: no key on fetch, and rotate-expired moves the attribute
    // to version 2 in one rotation.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = r
        .public
        .fetch_keys(key_request(&staff, &["emergency"], now(), &staff.key))
        .await
        .expect_err("expired grant");
    assert_eq!(err.code(), Code::PermissionDenied);
    let rotated = r
        .admin
        .rotate_expired(signed(
            RotateExpiredRequest {},
            "hospital-a",
            &admin("RotateExpired"),
            &r.admin_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .rotations;
    assert_eq!(rotated.len(), 1);
    assert_eq!(
        (rotated[0].attribute.as_str(), rotated[0].new_version),
        ("emergency@hospital-a", 2)
    );
    // Nothing left to do: a second run is a no-op.
    let again = r
        .admin
        .rotate_expired(signed(
            RotateExpiredRequest {},
            "hospital-a",
            &admin("RotateExpired"),
            &r.admin_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(again.rotations.is_empty());

    // A record written now uses version 2: the expired key cannot decrypt it
    // (abe's revocation tests show this holds cryptographically, even for a
    // key relabelled as the new version).
    let pks2 = directory(&mut r).await;
    let (header2, ct2) = seal(&pks2, b"new lab results");
    let mut out = Vec::new();
    assert!(decrypt(&header2, &ring, &pks2, &ct2[..], &mut out).is_err());

    // Breaking the glass again works and yields a version-2 key, and, while
    // the rotation of the expired grants is still pending at the proxies,
    // the version-1 key too (stored rows not updated yet need it); current
    // version last.
    let keys = r
        .public
        .break_glass(break_glass(&staff, "second emergency, same patient"))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(
        keys.iter().map(|k| k.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let k2 = UserKey::from_bytes(&keys[1].user_key).unwrap();
    let mut ring2 = UserKeyRing::new(staff.gid).unwrap();
    let pk2 = pks2.get(k2.attribute(), k2.version()).unwrap().clone();
    ring2.insert(k2, &pk2).unwrap();
    let mut out = Vec::new();
    decrypt(&header2, &ring2, &pks2, &ct2[..], &mut out).unwrap();
    assert_eq!(out, b"new lab results");

    let report = r
        .admin
        .verify_audit(signed(
            VerifyAuditRequest {},
            "hospital-a",
            &admin("VerifyAudit"),
            &r.admin_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("a.db")).unwrap();
    emergency(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emergency_postgres() {
    emergency(Arc::new(fresh_pg("mabe_emergency").await)).await;
}
