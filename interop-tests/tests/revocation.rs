//! Scenario: a doctor is revoked from `cardiology@hospital-a` (DESIGN §3),
//! with the real `mabe-authority`, `mabe-proxy` and `mabe` processes, on
//! SQLite and on PostgreSQL. Everything a person does goes through the
//! `mabe` command: encrypt, store at the proxy, fetch, decrypt, fetch keys.
//!
//! - The revoked doctor cannot decrypt any stored record that uses the
//!   attribute, including records never opened; every other holder can,
//!   after fetching keys again; records written afterwards are unreadable
//!   to the doctor; records not using the attribute are untouched.
//! - A record with the attribute in two rows is updated in both.
//! - Payload bytes in storage are unchanged by the revocation.
//! - A record encrypted before the revocation but uploaded after it is
//!   refused by the proxy (its version is frozen).
//! - The audit log verifies and shows the token batch.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use mabe_interop_tests::{Authority, Backend, Proxy, User};

const CARDIO: &str = "cardiology@hospital-a";
const ONE_ROW: &str = "cardiology@hospital-a";
const TWO_ROWS: &str = "cardiology@hospital-a OR (cardiology@hospital-a AND doctor@hospital-a)";
const OTHER: &str = "doctor@hospital-a";

/// The container's bytes after its header: signer, payload, signature
/// (what the proxy stores as the record's payload, docs/FORMAT.md §9.6).
fn after_header(record: &[u8]) -> &[u8] {
    let len = u32::from_be_bytes(record[6..10].try_into().unwrap()) as usize;
    &record[10 + len..]
}

/// The versions of the rows of `attribute` in a record file (`mabe inspect`).
fn versions(u: &User, record: &str, attribute: &str) -> Vec<u64> {
    let json = u.ok(&["inspect", "--json", record]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["header"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["attribute"] == attribute)
        .map(|r| r["version"].as_u64().unwrap())
        .collect()
}

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

    let doc = User::new(tmp.path(), "doctor", "19012345601").unwrap();
    let colleague = User::new(tmp.path(), "colleague", "19012345602").unwrap();
    let writer = User::new(tmp.path(), "records-system", "hospital-a-records").unwrap();
    for u in [&doc, &colleague, &writer] {
        a.enroll_user(u, &[]).unwrap();
        u.trust(&a).unwrap();
        u.trust_proxy(&proxy).unwrap();
    }
    for u in [&doc, &colleague] {
        for attr in ["cardiology", "doctor"] {
            a.grant_user(u, attr).unwrap();
        }
        let fetched = u.ok(&["keys", "fetch"]).unwrap();
        assert!(
            fetched.contains("cardiology@hospital-a version 1 verified and stored"),
            "{fetched}"
        );
    }

    // Stored records: 12 with one cardiology row, 4 with two (20 rows), 3
    // without. Each is a signed record container written by `mabe encrypt`.
    let mut stored: BTreeMap<String, (&str, Vec<u8>, Vec<u8>)> = BTreeMap::new();
    for (policy, n) in [(ONE_ROW, 12), (TWO_ROWS, 4), (OTHER, 3)] {
        for i in 0..n {
            let text = format!("{policy} record {i}").into_bytes();
            let file = writer
                .encrypt(policy, &text, &format!("r-{}-{i}.mabe", policy.len()))
                .unwrap();
            let id = writer.put(&file).unwrap();
            assert_eq!(id.len(), 32, "record id: {id}");
            stored.insert(id, (policy, text, std::fs::read(&file).unwrap()));
        }
    }
    // Encrypted now, uploaded only after the revocation: must be refused.
    let late = writer.encrypt(ONE_ROW, b"late", "late.mabe").unwrap();

    // The doctor opened one record before the revocation (and may keep its
    // plaintext; revocation cannot take that back).
    let (first_id, (_, first_text, _)) =
        stored.iter().find(|(_, (p, _, _))| *p == ONE_ROW).unwrap();
    let opened = doc.get_and_decrypt(first_id).unwrap().ok().unwrap();
    assert_eq!(opened.stdout.as_bytes(), first_text.as_slice());

    // Revoke, naming the doctor by registry and subject: the CLI freezes,
    // sends tokens and erases the update secret.
    let out = a
        .ok(&[
            "revoke",
            "--registry",
            "big-register",
            "--subject",
            "19012345601",
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
    let status = a.run(&["revoke", "status"]).unwrap();
    let status_text = format!(
        "{}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(status.status.success(), "{status_text}");
    assert!(
        status_text.contains("rotation #1 done") && status_text.contains("20/20 rows"),
        "{status_text}"
    );

    // The colleague fetches the new version; the doctor gets only `doctor`.
    let fetched = colleague.ok(&["keys", "fetch"]).unwrap();
    assert!(
        fetched.contains("cardiology@hospital-a version 2 verified and stored"),
        "{fetched}"
    );
    let fetched = doc.ok(&["keys", "fetch"]).unwrap();
    assert!(!fetched.contains("cardiology"), "{fetched}");

    for (id, (policy, text, original)) in &stored {
        let file = colleague.path(&format!("check-{id}.mabe"));
        colleague
            .ok(&["record", "get", "--id", id, "--out", &file])
            .unwrap();
        let fetched = std::fs::read(&file).unwrap();
        assert_eq!(
            after_header(&fetched),
            after_header(original),
            "payload bytes (and signature) are unchanged by revocation"
        );
        let v = versions(&colleague, &file, CARDIO);
        match *policy {
            OTHER => {
                assert!(v.is_empty());
                assert_eq!(fetched, *original, "untouched record");
                // Untouched: the doctor still reads it.
                let d = doc.get_and_decrypt(id).unwrap().ok().unwrap();
                assert_eq!(d.stdout.as_bytes(), text.as_slice());
            }
            _ => {
                assert!(
                    !v.is_empty() && v.iter().all(|v| *v == 2),
                    "{policy}: every cardiology row is at version 2: {v:?}"
                );
                // The revoked doctor fails, including on the record opened
                // before; nothing reaches stdout.
                let d = doc
                    .get_and_decrypt(id)
                    .unwrap()
                    .fails_with(3, "cardiology@hospital-a")
                    .unwrap();
                assert!(d.stdout.is_empty());
            }
        }
        // The colleague reads every record; the writer's signature still
        // verifies after the header was updated.
        let c = colleague.get_and_decrypt(id).unwrap().ok().unwrap();
        assert_eq!(c.stdout.as_bytes(), text.as_slice());
        assert!(c.stderr.contains("verified writer"), "{}", c.stderr);
    }

    // A record written after the revocation uses version 2.
    let after = writer.encrypt(ONE_ROW, b"after", "after.mabe").unwrap();
    assert_eq!(versions(&writer, &after, CARDIO), vec![2]);
    let id = writer.put(&after).unwrap();
    doc.get_and_decrypt(&id)
        .unwrap()
        .fails_with(3, "cardiology@hospital-a")
        .unwrap();
    let c = colleague.get_and_decrypt(&id).unwrap().ok().unwrap();
    assert_eq!(c.stdout, "after");
    // The proxy refuses the record encrypted at the frozen version 1.
    writer
        .run(&["record", "put", "--in", &late])
        .unwrap()
        .fails_with(6, "cloud-1")
        .unwrap();

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
