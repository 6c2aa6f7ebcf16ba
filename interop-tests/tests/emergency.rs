//! Scenario: emergency access across hospitals (DESIGN §4), with the real
//! binaries, on SQLite and on PostgreSQL.
//!
//! A record written at hospital A has an emergency clause naming the three
//! hospitals' emergency attributes. An emergency physician at hospital C
//! breaks the glass at C, gets a key at once and decrypts the stored record.
//! After the grant expires, `rotate-expired` and the revocation driver move
//! `emergency@hospital-c` to version 2 at the proxy: the physician's key no
//! longer opens stored records, including ones never opened. Hospital C's
//! audit log has the break-glass entry with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{io::Cursor, time::Duration};

use mabe_abe::PublicKeyRing;
use mabe_interop_tests::{Authority, Backend, Person, Proxy, decrypt, encrypt};

const POLICY: &str = "(doctor@hospital-a AND cardiology@hospital-a) OR \
                      1 of (emergency@hospital-a, emergency@hospital-b, emergency@hospital-c)";

async fn break_glass_across_hospitals(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut hospitals = Vec::new();
    for id in ["hospital-a", "hospital-b", "hospital-c"] {
        let db = backend
            .database_url(&format!("mabe_em_{}", id.replace('-', "_")))
            .await
            .unwrap();
        let h = Authority::init(tmp.path(), id, db).unwrap();
        h.ok(&["attribute", "create", "emergency"]).unwrap();
        hospitals.push(h);
    }
    hospitals[0].ok(&["attribute", "create", "doctor"]).unwrap();
    hospitals[0]
        .ok(&["attribute", "create", "cardiology"])
        .unwrap();
    let mut proxy = Proxy::init(
        tmp.path(),
        "cloud-1",
        backend.database_url("mabe_em_proxy").await.unwrap(),
    )
    .unwrap();
    for h in &hospitals {
        proxy.trust(h).unwrap();
    }
    proxy.serve().unwrap();
    let physician = Person::new("19012345699").unwrap();
    let visitor = Person::new("19012345698").unwrap();
    let c = &mut hospitals[2];
    c.enroll(&physician, &["emergency-staff"]).unwrap();
    c.enroll(&visitor, &[]).unwrap();
    c.serve(&[
        "--break-glass-secs",
        "2",
        "--rotate-expired-every",
        "0",
        "--drive-rotations-every",
        "0",
    ])
    .unwrap();
    proxy.register_at(&hospitals[2]).unwrap();
    for h in hospitals.iter_mut().take(2) {
        h.serve(&[]).unwrap();
    }
    let mut pks = PublicKeyRing::new();
    for h in &hospitals {
        h.directory_into(&mut pks).await.unwrap();
    }

    // Hospital A's record system writes two records.
    let mut store = proxy.records().await.unwrap();
    let (h1, ct1) = encrypt(POLICY, &pks, b"allergies: penicillin").unwrap();
    let (h2, ct2) = encrypt(POLICY, &pks, b"discharge letter").unwrap();
    let id1 = store.put(&h1, Cursor::new(ct1.clone())).await.unwrap();
    let id2 = store.put(&h2, Cursor::new(ct2.clone())).await.unwrap();

    // Someone without the emergency role is refused.
    let c = &hospitals[2];
    let mut none = visitor.ring().unwrap();
    assert!(c.break_glass(&visitor, "curious", &mut none).await.is_err());

    // The physician at C breaks the glass and reads record 1 at once.
    let reason = "unconscious patient from hospital A in our ER";
    let mut keys = physician.ring().unwrap();
    let expires = c.break_glass(&physician, reason, &mut keys).await.unwrap();
    assert!(expires > 0, "an emergency grant expires");
    let (header, _) = store.get(&id1, Vec::new()).await.unwrap();
    assert_eq!(
        decrypt(&header, &ct1, &keys, &pks).unwrap(),
        b"allergies: penicillin"
    );

    // C's audit log has the break-glass entry with its reason, and the refusal.
    let audit = c.ok(&["audit", "list", "--kind", "break-glass"]).unwrap();
    assert!(audit.contains(reason), "{audit}");
    assert!(audit.contains(&physician.gid.to_string()), "{audit}");
    let refusals = c.ok(&["audit", "list", "--kind", "refusal"]).unwrap();
    assert!(
        refusals.contains("break-glass: not enrolled as emergency-staff"),
        "{refusals}"
    );

    // After expiry: rotate-expired, then the driver updates the stored rows.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let rotated = c.ok(&["rotate-expired"]).unwrap();
    assert!(
        rotated.contains("rotated emergency@hospital-c to version 2"),
        "{rotated}"
    );
    let driven = c.ok(&["rotations", "--drive"]).unwrap();
    assert!(driven.contains("rotation #1 done"), "{driven}");
    let mut pks2 = PublicKeyRing::new();
    for h in &hospitals {
        h.directory_into(&mut pks2).await.unwrap();
    }
    for (id, ct) in [(&id1, &ct1), (&id2, &ct2)] {
        let (header, payload) = store.get(id, Vec::new()).await.unwrap();
        assert_eq!(&payload, ct, "payloads are never rewritten");
        assert!(
            decrypt(&header, ct, &keys, &pks2).is_err(),
            "the expired emergency key opens no stored record"
        );
    }
    // Nor does fetching again help: the grant is gone.
    let mut after = physician.ring().unwrap();
    assert_eq!(c.fetch_keys(&physician, &mut after).await.unwrap(), 0);
    assert!(
        c.ok(&["audit", "verify"])
            .unwrap()
            .contains("audit log verifies")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_across_hospitals_sqlite() {
    break_glass_across_hospitals(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_across_hospitals_postgres() {
    break_glass_across_hospitals(Backend::Postgres).await;
}
