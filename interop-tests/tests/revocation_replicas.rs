//! Scenario: two authority replicas over one PostgreSQL database share the
//! work of one revocation (issue: "several authority replicas over one
//! PostgreSQL database share a job's work").
//!
//! Both replicas run `serve` with the revocation driver on a one-second
//! schedule; each has its own data directory (copies of one, as on two
//! machines) and so its own instance id. The job over 3,000 stored records
//! finishes with every row updated exactly once (every record decrypts for
//! the remaining holder, none for the revoked one), and the database's chunk
//! leases show that both replicas did part of the work.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mabe_interop_tests::{Authority, Backend, Person, Proxy, assert_rotated, store_records};

const RECORDS: usize = 3000;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else if e.file_name() != "instance-id"
            && !e.file_name().to_string_lossy().ends_with(".log")
        {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_revocation_postgres() {
    let tmp = tempfile::tempdir().unwrap();
    let url = Backend::Postgres
        .database_url("mabe_share_auth")
        .await
        .unwrap();
    let mut first = Authority::init(tmp.path(), "hospital-a", url.clone()).unwrap();
    first.ok(&["attribute", "create", "cardiology"]).unwrap();
    let doc = Person::new("19012345601").unwrap();
    let colleague = Person::new("19012345602").unwrap();
    for p in [&doc, &colleague] {
        first.enroll(p, &[]).unwrap();
        first
            .ok(&["grant", "--gid", &p.gid.to_string(), "--attr", "cardiology"])
            .unwrap();
    }
    let mut proxy = Proxy::init(
        tmp.path(),
        "cloud-1",
        Backend::Postgres
            .database_url("mabe_share_proxy")
            .await
            .unwrap(),
    )
    .unwrap();
    proxy.trust(&first).unwrap();
    proxy.serve().unwrap();
    proxy.register_at(&first).unwrap();

    // The second replica: a copy of the data directory (keys, TLS), same
    // database, its own instance id.
    let second_dir = tmp.path().join("hospital-a-replica-2");
    copy_dir(&first.dir, &second_dir);
    let mut second = Authority {
        dir: second_dir,
        id: first.id.clone(),
        database_url: url,
        identity_key: first.identity_key.clone(),
        served: None,
    };

    first.serve(&["--drive-rotations-every", "0"]).unwrap();
    let mut doc_keys = doc.ring().unwrap();
    first.fetch_keys(&doc, &mut doc_keys).await.unwrap();
    let pks = first.directory().await.unwrap();
    let ids = store_records(&proxy, &pks, RECORDS).await.unwrap();
    first.served.take().unwrap().stop().unwrap();

    // Record the revocation, then start both replicas with their drivers.
    let gid = doc.gid.to_string();
    let out = first
        .ok(&["revoke", "--gid", &gid, "--attr", "cardiology", "--no-wait"])
        .unwrap();
    assert!(out.contains("rotation #1 recorded"), "{out}");
    first.serve(&["--drive-rotations-every", "1"]).unwrap();
    second.serve(&["--drive-rotations-every", "1"]).unwrap();
    let mut done = false;
    for _ in 0..600 {
        let out = first.ok(&["rotations"]).unwrap();
        if out
            .lines()
            .any(|l| l.starts_with("#1") && l.contains(" done "))
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(done, "the shared rotation did not finish");

    // Both replicas leased chunks of the work.
    let (client, conn) = tokio_postgres::connect(
        first.database_url.as_deref().unwrap(),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT owner, COUNT(*) FROM rotation_chunks WHERE done_at IS NOT NULL GROUP BY owner",
            &[],
        )
        .await
        .unwrap();
    let owners: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        owners.iter().map(|(_, n)| n).sum::<i64>(),
        16,
        "every chunk done once: {owners:?}"
    );
    assert_eq!(
        owners.len(),
        2,
        "both replicas did part of the work: {owners:?}"
    );
    let instance = |dir: &std::path::Path| {
        std::fs::read_to_string(dir.join("instance-id"))
            .unwrap()
            .trim()
            .to_owned()
    };
    let mut expected = vec![instance(&first.dir), instance(&second.dir)];
    expected.sort();
    let mut seen: Vec<String> = owners.into_iter().map(|(o, _)| o).collect();
    seen.sort();
    assert_eq!(seen, expected);

    // Exactly once: every record decrypts for the remaining holder.
    assert_rotated(&first, &proxy, &colleague, &doc_keys, &ids, 100)
        .await
        .unwrap();
    let audit = first.ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("audit log verifies"), "{audit}");
    first.served.take().unwrap().stop().unwrap();
    second.served.take().unwrap().stop().unwrap();
    proxy.served.take().unwrap().stop().unwrap();
}
