//! Scenario: emergency access across hospitals (DESIGN §4), with the real
//! binaries, on SQLite and on PostgreSQL.
//!
//! A record written at hospital A with `mabe encrypt` has the emergency clause
//! `EMERGENCY`, which the writer's trust file expands to the three
//! hospitals' emergency attributes. An emergency physician at hospital C runs
//! `mabe keys break-glass` at C, gets a key at once and decrypts the stored
//! record.
//! After the grant expires, `rotate-expired` and the revocation driver move
//! `emergency@hospital-c` to version 2 at the proxy: the physician's key no
//! longer opens stored records, including ones never opened. Hospital C's
//! audit log has the break-glass entry with its reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mabe_interop_tests::{Authority, Backend, Proxy, User};

/// Hospital A's records system writes with the consortium's emergency
/// clause: `EMERGENCY` expands to the trust file's emergency attributes.
const POLICY: &str = "(doctor@hospital-a AND cardiology@hospital-a) OR EMERGENCY";
const EXPANDED: &str = "1 of (emergency@hospital-a, emergency@hospital-b, emergency@hospital-c)";

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
    hospitals[2]
        .serve(&[
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

    let writer = User::new(tmp.path(), "records-a", "hospital-a-records").unwrap();
    let physician = User::new(tmp.path(), "physician", "19012345699").unwrap();
    let visitor = User::new(tmp.path(), "visitor", "19012345698").unwrap();
    for u in [&writer, &physician, &visitor] {
        for h in &hospitals {
            u.trust(h).unwrap();
        }
        u.trust_proxy(&proxy).unwrap();
        u.ok(&[
            "trust",
            "emergency",
            "emergency@hospital-a",
            "emergency@hospital-b",
            "emergency@hospital-c",
        ])
        .unwrap();
    }
    let c = &hospitals[2];
    c.enroll_user(&physician, &["emergency-staff"]).unwrap();
    c.enroll_user(&visitor, &[]).unwrap();

    // Hospital A's records system writes two records with the emergency
    // clause, and stores them at the proxy.
    let check = writer.run(&["policy", "check", POLICY]).unwrap();
    assert!(check.stdout.contains(EXPANDED), "{check:?}");
    let r1 = writer
        .encrypt(POLICY, b"allergies: penicillin", "r1.mabe")
        .unwrap();
    let r2 = writer
        .encrypt(POLICY, b"discharge letter", "r2.mabe")
        .unwrap();
    let inspected = writer.ok(&["inspect", "--json", &r1]).unwrap();
    assert!(inspected.contains(EXPANDED), "{inspected}");
    let id1 = writer.put(&r1).unwrap();
    let id2 = writer.put(&r2).unwrap();

    // Without a key, the physician is told what the policy needs.
    physician
        .get_and_decrypt(&id1)
        .unwrap()
        .fails_with(3, "cannot decrypt: policy needs")
        .unwrap();
    // Someone without the emergency role is refused.
    visitor
        .run(&[
            "keys",
            "break-glass",
            "--authority",
            "hospital-c",
            "--reason",
            "curious",
        ])
        .unwrap()
        .fails_with(6, "emergency-staff")
        .unwrap();

    // The physician at C breaks the glass and reads record 1 at once.
    let reason = "unconscious patient from hospital A in our ER";
    let out = physician
        .ok(&[
            "keys",
            "break-glass",
            "--authority",
            "hospital-c",
            "--reason",
            reason,
        ])
        .unwrap();
    assert!(
        out.contains("emergency key emergency@hospital-c version 1 verified and stored")
            && out.contains("expires"),
        "{out}"
    );
    let listed = physician.ok(&["keys", "list"]).unwrap();
    assert!(listed.contains("grant expires at"), "{listed}");
    let read = physician.get_and_decrypt(&id1).unwrap().ok().unwrap();
    assert_eq!(read.stdout, "allergies: penicillin");

    // C's audit log has the break-glass entry with its reason, and the refusal.
    let audit = c.ok(&["audit", "list", "--kind", "break-glass"]).unwrap();
    assert!(audit.contains(reason), "{audit}");
    assert!(audit.contains(&physician.gid), "{audit}");
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
    // The expired emergency key opens no stored record: neither the one read
    // before nor the one never opened. The payloads were never rewritten.
    for (id, original) in [(&id1, &r1), (&id2, &r2)] {
        physician
            .get_and_decrypt(id)
            .unwrap()
            .fails_with(3, "emergency@hospital-c")
            .unwrap();
        let fetched = std::fs::read(physician.path(&format!("fetched-{id}.mabe"))).unwrap();
        let original = std::fs::read(original).unwrap();
        let cut = |r: &[u8]| {
            let len = u32::from_be_bytes(r[6..10].try_into().unwrap()) as usize;
            r[10 + len..].to_vec()
        };
        assert_eq!(
            cut(&fetched),
            cut(&original),
            "payloads are never rewritten"
        );
    }
    // Nor does fetching again help: the grant is gone.
    let fetched = physician
        .ok(&["keys", "fetch", "--authority", "hospital-c"])
        .unwrap();
    assert!(fetched.contains("no keys granted"), "{fetched}");
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
