//! End to end over real gRPC with TLS on loopback, against both backends:
//! create attribute, enroll, request, approve, fetch keys; the keys pass the
//! pairing check and decrypt a record encrypted from the signed directory.
//! Then every refusal the issue lists, each audited, and `audit verify`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use ark_std::rand::rngs::OsRng;
use ed25519_dalek::{Signer, VerifyingKey};
use mabe_abe::{
    AttributePublicKey, EncryptOptions, PublicKeyRing, UserKey, UserKeyRing, decrypt, encrypt,
};
use mabe_authority::{
    admin_client::signed,
    node::now,
    store::{Store, sqlite::SqliteStore},
};
use mabe_proto::{
    signing::{Directory, attribute_request_message},
    v1::{
        AttributeRequest, CreateAttributeRequest, DecideRequestRequest, EnrollRequest,
        GetDirectoryRequest, KeyRequest, ListRequestsRequest, RevokeRequest, VerifyAuditRequest,
    },
};
use tonic::Code;

mod common;
use common::*;

async fn lifecycle(store: Arc<dyn Store>) {
    let mut r = start(store).await;
    let admin = |m: &str| format!("{ADMIN}{m}");

    // Admin: create an attribute, enroll two people.
    let a = r
        .admin
        .create_attribute(signed(
            CreateAttributeRequest {
                name: "cardiology".into(),
            },
            "hospital-a",
            &admin("CreateAttribute"),
            &r.admin_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (a.attribute.as_str(), a.version),
        ("cardiology@hospital-a", 1)
    );
    let doc = person("19012345601");
    let other = person("19012345602");
    for p in [&doc, &other] {
        r.admin
            .enroll(signed(
                EnrollRequest {
                    registry: "big-register".into(),
                    subject: if p.gid == doc.gid {
                        "19012345601"
                    } else {
                        "19012345602"
                    }
                    .into(),
                    request_key: p.key.verifying_key().to_bytes().to_vec(),
                    roles: vec![],
                },
                "hospital-a",
                &admin("Enroll"),
                &r.admin_key,
            ))
            .await
            .unwrap();
    }

    // The doctor requests the attribute with a reason; the admin approves.
    let n = nonce();
    let ts = now();
    let reason = "joined the cardiology ward";
    let msg = attribute_request_message(
        "hospital-a",
        doc.gid.as_bytes(),
        "cardiology@hospital-a",
        reason,
        &n,
        ts,
    );
    let receipt = r
        .public
        .request_attribute(AttributeRequest {
            authority_id: "hospital-a".into(),
            gid: doc.gid.as_bytes().to_vec(),
            attribute: "cardiology@hospital-a".into(),
            reason: reason.into(),
            nonce: n,
            timestamp: ts,
            signature: doc.key.sign(&msg).to_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.state, "pending");
    let pending = r
        .admin
        .list_requests(signed(
            ListRequestsRequest {
                state: "pending".into(),
                ..Default::default()
            },
            "hospital-a",
            &admin("ListRequests"),
            &r.admin_key,
        ))
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].reason, reason);
    let decision = signed(
        DecideRequestRequest {
            id: receipt.request_id,
            approve: true,
            note: "ok".into(),
        },
        "hospital-a",
        &admin("DecideRequest"),
        &r.admin_key,
    );
    // The same signed call, captured and replayed later.
    let mut replayed = tonic::Request::new(decision.get_ref().clone());
    *replayed.metadata_mut() = decision.metadata().clone();
    r.admin.decide_request(decision).await.unwrap();
    let err = r
        .admin
        .decide_request(replayed)
        .await
        .expect_err("a replayed admin call");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("replay"), "{}", err.message());

    // Fetch keys; verify the directory signature against the pinned identity key.
    let keys = r
        .public
        .fetch_keys(key_request(&doc, &[], now(), &doc.key))
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    let dir = r
        .public
        .get_directory(GetDirectoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let pinned: VerifyingKey = r.node.identity_public_key();
    pinned
        .verify_strict(
            &dir.body,
            &ed25519_dalek::Signature::from_slice(&dir.signature).unwrap(),
        )
        .expect("directory signed by the pinned identity key");
    let directory = Directory::decode(&dir.body).unwrap();
    assert!(directory.valid_until > now());
    let mut pks = PublicKeyRing::new();
    for e in &directory.entries {
        pks.insert(AttributePublicKey::from_bytes(&e.public_key).unwrap())
            .unwrap();
    }
    let mut ring = UserKeyRing::new(doc.gid).unwrap();
    let k = UserKey::from_bytes(&keys[0].user_key).unwrap();
    let pk = pks.get(k.attribute(), k.version()).unwrap().clone();
    ring.insert(k, &pk)
        .expect("issued key passes the pairing check");
    let policy = mabe_policy::parse("cardiology@hospital-a").unwrap();
    let mut ct = Vec::new();
    let header = encrypt(
        &policy,
        &pks,
        &EncryptOptions::default(),
        &mut OsRng,
        &b"ECG"[..],
        &mut ct,
    )
    .unwrap();
    let mut out = Vec::new();
    decrypt(&header, &ring, &pks, &ct[..], &mut out).unwrap();
    assert_eq!(out, b"ECG");

    // Refusals, each audited.
    let before = refusals(&r.node).await;
    let forger = person("nobody");
    let cases: Vec<(&str, KeyRequest, Code)> = vec![
        (
            "forged signature",
            key_request(&doc, &[], now(), &forger.key),
            Code::Unauthenticated,
        ),
        (
            "unknown GID",
            key_request(&forger, &[], now(), &forger.key),
            Code::Unauthenticated,
        ),
        (
            "stale timestamp",
            key_request(&doc, &[], now() - 3600, &doc.key),
            Code::Unauthenticated,
        ),
        (
            "hostile timestamp (i64::MIN)",
            key_request(&doc, &[], i64::MIN, &doc.key),
            Code::Unauthenticated,
        ),
        (
            "hostile timestamp (i64::MAX)",
            key_request(&doc, &[], i64::MAX, &doc.key),
            Code::Unauthenticated,
        ),
        (
            "another person's GID",
            key_request(&other, &[], now(), &doc.key),
            Code::Unauthenticated,
        ),
        (
            "not granted",
            key_request(&other, &["cardiology"], now(), &other.key),
            Code::PermissionDenied,
        ),
    ];
    let n_cases = cases.len();
    for (what, req, code) in cases {
        let err = r.public.fetch_keys(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }
    let replay = key_request(&doc, &[], now(), &doc.key);
    r.public.fetch_keys(replay.clone()).await.unwrap();
    let err = r.public.fetch_keys(replay).await.expect_err("replay");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("replay"), "{}", err.message());
    assert_eq!(refusals(&r.node).await, before + n_cases + 1);

    // Admin API without the admin key.
    let unsigned = r
        .admin
        .list_requests(ListRequestsRequest::default())
        .await
        .expect_err("unsigned");
    assert_eq!(unsigned.code(), Code::Unauthenticated);
    let wrong = r
        .admin
        .list_requests(signed(
            ListRequestsRequest::default(),
            "hospital-a",
            &admin("ListRequests"),
            &doc.key,
        ))
        .await
        .expect_err("wrong admin key");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    // A signature for one method does not authorise another.
    let mut moved = signed(
        ListRequestsRequest::default(),
        "hospital-a",
        &admin("VerifyAudit"),
        &r.admin_key,
    );
    *moved.get_mut() = ListRequestsRequest {
        state: "pending".into(),
        ..Default::default()
    };
    assert_eq!(
        r.admin
            .list_requests(moved)
            .await
            .expect_err("moved")
            .code(),
        Code::Unauthenticated
    );

    // Revocation bumps the version; the next fetch issues it.
    let rev = r
        .admin
        .revoke(signed(
            RevokeRequest {
                gid: other.gid.as_bytes().to_vec(),
                attribute: "cardiology".into(),
            },
            "hospital-a",
            &admin("Revoke"),
            &r.admin_key,
        ))
        .await
        .expect_err("the other person holds no grant");
    assert_eq!(rev.code(), Code::NotFound);
    let rev = r
        .admin
        .revoke(signed(
            RevokeRequest {
                gid: doc.gid.as_bytes().to_vec(),
                attribute: "cardiology".into(),
            },
            "hospital-a",
            &admin("Revoke"),
            &r.admin_key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rev.new_version, 2);
    let err = r
        .public
        .fetch_keys(key_request(&doc, &["cardiology"], now(), &doc.key))
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::PermissionDenied);

    // The audit log verifies, with a signed checkpoint.
    r.node.checkpoint().await.unwrap();
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
    assert!(report.entries > 10 && report.checkpoints == 1);

    let _ = r.stop.take().map(|s| s.send(()));
    tokio::time::timeout(Duration::from_secs(20), &mut r.task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("a.db")).unwrap();
    lifecycle(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_postgres() {
    lifecycle(Arc::new(fresh_pg("mabe_lifecycle").await)).await;
}
