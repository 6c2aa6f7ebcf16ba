//! Scenario: a doctor is revoked from `cardiology@hospital-a` (DESIGN §3),
//! with the real `mabe-authority` and `mabe-proxy` processes, on SQLite and
//! on PostgreSQL.
//!
//! - The revoked doctor cannot decrypt any stored record that uses the
//!   attribute, including records never opened; every other holder can,
//!   after fetching keys again; records written afterwards are unreadable
//!   to the doctor; records not using the attribute are untouched.
//! - A record with the attribute in two rows is updated in both.
//! - Payload bytes in storage are unchanged by the revocation.
//! - The audit log verifies and shows the token batch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{collections::BTreeMap, io::Cursor};

use mabe_abe::Header;
use mabe_interop_tests::{Authority, Backend, Person, Proxy, decrypt, encrypt};

const CARDIO: &str = "cardiology@hospital-a";
const ONE_ROW: &str = "cardiology@hospital-a";
const TWO_ROWS: &str = "cardiology@hospital-a OR (cardiology@hospital-a AND doctor@hospital-a)";
const OTHER: &str = "doctor@hospital-a";

/// A stored record: its policy, plaintext and payload ciphertext.
type Stored = (&'static str, Vec<u8>, Vec<u8>);

async fn doctor_revoked(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Authority::init(
        tmp.path(),
        "hospital-a",
        backend.database_url("mabe_it_auth").await.unwrap(),
    )
    .unwrap();
    a.ok(&["attribute", "create", "cardiology"]).unwrap();
    a.ok(&["attribute", "create", "doctor"]).unwrap();
    let doc = Person::new("19012345601").unwrap();
    let colleague = Person::new("19012345602").unwrap();
    for p in [&doc, &colleague] {
        a.enroll(p, &[]).unwrap();
        for attr in ["cardiology", "doctor"] {
            a.ok(&["grant", "--gid", &p.gid.to_string(), "--attr", attr])
                .unwrap();
        }
    }
    let mut proxy = Proxy::init(
        tmp.path(),
        "cloud-1",
        backend.database_url("mabe_it_proxy").await.unwrap(),
    )
    .unwrap();
    proxy.trust(&a).unwrap();
    proxy.serve().unwrap();
    // The CLI drives the rotation in the foreground; serve does not.
    a.serve(&["--drive-rotations-every", "0"]).unwrap();
    proxy.register_at(&a).unwrap();

    let mut doc_keys = doc.ring().unwrap();
    let mut colleague_keys = colleague.ring().unwrap();
    assert_eq!(a.fetch_keys(&doc, &mut doc_keys).await.unwrap(), 2);
    assert_eq!(
        a.fetch_keys(&colleague, &mut colleague_keys).await.unwrap(),
        2
    );
    let pks = a.directory().await.unwrap();

    // Stored records: 12 with one cardiology row, 4 with two (20 rows), 3
    // without.
    let mut store = proxy.records().await.unwrap();
    let mut stored: BTreeMap<[u8; 16], Stored> = BTreeMap::new();
    for (policy, n) in [(ONE_ROW, 12), (TWO_ROWS, 4), (OTHER, 3)] {
        for i in 0..n {
            let text = format!("{policy} record {i}").into_bytes();
            let (header, ct) = encrypt(policy, &pks, &text).unwrap();
            let id = store.put(&header, Cursor::new(ct.clone())).await.unwrap();
            stored.insert(id, (policy, text, ct));
        }
    }
    // The doctor opened one record before the revocation (and may keep its
    // plaintext; revocation cannot take that back).
    let (first_id, (_, first_text, _)) = stored.iter().next().unwrap();
    let (h, _) = store.get(first_id, Vec::new()).await.unwrap();
    let ct = &stored[first_id].2;
    assert_eq!(&decrypt(&h, ct, &doc_keys, &pks).unwrap(), first_text);

    // Revoke: the CLI freezes, sends tokens and erases the update secret.
    let out = a
        .ok(&[
            "revoke",
            "--gid",
            &doc.gid.to_string(),
            "--attr",
            "cardiology",
        ])
        .unwrap();
    assert!(
        out.contains("cardiology@hospital-a is now version 2"),
        "{out}"
    );
    assert!(out.contains("rotation #1 done"), "{out}");
    let rotations = a.ok(&["rotations"]).unwrap();
    assert!(rotations.contains("done"), "{rotations}");
    assert!(
        rotations.contains("proxy cloud-1: 20/20 rows"),
        "{rotations}"
    );

    let pks2 = a.directory().await.unwrap();
    let mut colleague_v2 = colleague.ring().unwrap();
    assert_eq!(
        a.fetch_keys(&colleague, &mut colleague_v2).await.unwrap(),
        2
    );
    // The doctor now gets only `doctor`.
    let mut doc_after = doc.ring().unwrap();
    assert_eq!(a.fetch_keys(&doc, &mut doc_after).await.unwrap(), 1);

    for (id, (policy, text, ct)) in &stored {
        let (header, payload) = store.get(id, Vec::new()).await.unwrap();
        assert_eq!(&payload, ct, "payload bytes are unchanged by revocation");
        let parsed = Header::from_bytes(&header).unwrap();
        let versions: Vec<u32> = parsed
            .rows()
            .iter()
            .filter(|r| r.attribute().to_string() == CARDIO)
            .map(|r| r.version().get())
            .collect();
        match *policy {
            OTHER => {
                assert!(versions.is_empty());
                // Untouched: the doctor's keys still read it.
                assert_eq!(&decrypt(&header, ct, &doc_keys, &pks2).unwrap(), text);
            }
            _ => {
                assert!(
                    !versions.is_empty() && versions.iter().all(|v| *v == 2),
                    "{policy}: every cardiology row is at version 2: {versions:?}"
                );
                // The revoked doctor: old keys and newly fetched keys fail,
                // including on the record opened before.
                assert!(decrypt(&header, ct, &doc_keys, &pks2).is_err());
                assert!(decrypt(&header, ct, &doc_after, &pks2).is_err());
                // The colleague's old key fails too; the new one works.
                assert!(decrypt(&header, ct, &colleague_keys, &pks2).is_err());
                assert_eq!(&decrypt(&header, ct, &colleague_v2, &pks2).unwrap(), text);
            }
        }
    }

    // A record written after the revocation uses version 2.
    let (header, ct) = encrypt(ONE_ROW, &pks2, b"after").unwrap();
    assert!(decrypt(&header, &ct, &doc_keys, &pks2).is_err());
    assert_eq!(
        decrypt(&header, &ct, &colleague_v2, &pks2).unwrap(),
        b"after"
    );
    // The proxy refuses new uploads at the frozen version 1.
    let (old_header, old_ct) = encrypt(ONE_ROW, &pks, b"stale").unwrap();
    let refused = store.put(&old_header, Cursor::new(old_ct)).await;
    assert!(
        refused.is_err(),
        "upload at a frozen version must be refused"
    );

    let audit = a.ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("audit log verifies"), "{audit}");
    let freezes = proxy.ok(&["freezes"]).unwrap();
    assert!(freezes.contains("0 still at v1"), "{freezes}");
    a.served.take().unwrap().stop().unwrap();
    proxy.served.take().unwrap().stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_revoked_sqlite() {
    doctor_revoked(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_revoked_postgres() {
    doctor_revoked(Backend::Postgres).await;
}
