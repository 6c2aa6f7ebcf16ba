//! Scenario: crashes in the middle of a revocation over 2,000 stored records
//! (DESIGN §3: "a crash at any point resumes without losing or
//! double-applying an update"), on SQLite and on PostgreSQL.
//!
//! The proxy is killed with SIGKILL while tokens are being applied, then the
//! authority's driver is killed with SIGKILL after the restarted proxy took
//! some more; a third run finishes. Every record then decrypts for the
//! remaining holder (a token applied twice, or a row left behind, would make
//! decryption fail) and for nobody holding the revoked key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{io::Cursor, process::Child, time::Duration};

use mabe_interop_tests::{Authority, Backend, Person, Proxy, decrypt, encrypt, free_port};

const RECORDS: usize = 2000;

/// Rows of the proxy's freeze still at version 1, from its CLI.
fn pending(proxy: &Proxy) -> Option<usize> {
    let out = proxy.ok(&["freezes"]).ok()?;
    let line = out
        .lines()
        .find(|l| l.contains("cardiology@hospital-a v1"))?;
    let (_, rest) = line.split_once("row(s), ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Wait until the proxy reports `0 < pending < below`; the count seen.
async fn wait_progress(proxy: &Proxy, below: usize, what: &str, child: &mut Child) -> usize {
    for _ in 0..3000 {
        if let Some(p) = pending(proxy) {
            if p > 0 && p < below {
                return p;
            }
            assert!(p != 0, "{what}: finished before it could be interrupted");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what}: the driver exited early ({status})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: no progress");
}

async fn crash_and_resume(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Authority::init(
        tmp.path(),
        "hospital-a",
        backend.database_url("mabe_crash_auth").await.unwrap(),
    )
    .unwrap();
    a.ok(&["attribute", "create", "cardiology"]).unwrap();
    let doc = Person::new("19012345601").unwrap();
    let colleague = Person::new("19012345602").unwrap();
    for p in [&doc, &colleague] {
        a.enroll(p, &[]).unwrap();
        a.ok(&["grant", "--gid", &p.gid.to_string(), "--attr", "cardiology"])
            .unwrap();
    }
    let mut proxy = Proxy::init(
        tmp.path(),
        "cloud-1",
        backend.database_url("mabe_crash_proxy").await.unwrap(),
    )
    .unwrap();
    proxy.trust(&a).unwrap();
    let port = free_port().unwrap();
    proxy.serve_on(port).unwrap();
    a.serve(&["--drive-rotations-every", "0"]).unwrap();
    proxy.register_at(&a).unwrap();
    let mut doc_keys = doc.ring().unwrap();
    a.fetch_keys(&doc, &mut doc_keys).await.unwrap();
    let pks = a.directory().await.unwrap();

    let mut store = proxy.records().await.unwrap();
    let mut ids = Vec::with_capacity(RECORDS);
    for i in 0..RECORDS {
        let (header, ct) =
            encrypt("cardiology@hospital-a", &pks, format!("r{i}").as_bytes()).unwrap();
        ids.push((
            store.put(&header, Cursor::new(ct.clone())).await.unwrap(),
            ct,
        ));
    }
    drop(store);

    // 1. The proxy crashes while tokens are being applied.
    let gid = doc.gid.to_string();
    let mut revoke = a
        .command()
        .args(["revoke", "--gid", &gid, "--attr", "cardiology"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let seen = wait_progress(&proxy, RECORDS, "first run", &mut revoke).await;
    proxy.served.take().unwrap().kill().unwrap();
    let status = revoke.wait().unwrap();
    assert!(
        !status.success(),
        "the driver must notice the proxy is gone"
    );
    let after_proxy_crash = pending(&proxy).unwrap();
    assert!(after_proxy_crash <= seen && after_proxy_crash > 0);

    // 2. The proxy restarts; the authority's driver crashes mid-way.
    proxy.serve_on(port).unwrap();
    let mut drive = a
        .command()
        .args(["rotations", "--drive"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_progress(&proxy, after_proxy_crash, "second run", &mut drive).await;
    drive.kill().unwrap();
    drive.wait().unwrap();
    assert!(pending(&proxy).unwrap() > 0, "interrupted before the end");

    // 3. A third run finishes.
    let out = a.ok(&["rotations", "--drive"]).unwrap();
    assert!(out.contains("rotation #1 done"), "{out}");
    assert_eq!(pending(&proxy), Some(0));

    // Every row was updated exactly once: the colleague's new key decrypts
    // every record, the doctor's key none.
    let mut colleague_keys = colleague.ring().unwrap();
    a.fetch_keys(&colleague, &mut colleague_keys).await.unwrap();
    let pks2 = a.directory().await.unwrap();
    let mut store = proxy.records().await.unwrap();
    for (i, (id, ct)) in ids.iter().enumerate() {
        let (header, payload) = store.get(id, Vec::new()).await.unwrap();
        assert_eq!(&payload, ct);
        assert_eq!(
            decrypt(&header, ct, &colleague_keys, &pks2).unwrap(),
            format!("r{i}").into_bytes(),
            "record {i}"
        );
        if i % 50 == 0 {
            assert!(decrypt(&header, ct, &doc_keys, &pks2).is_err());
        }
    }
    let audit = a.ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("audit log verifies"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_proxy_then_authority_during_revocation_sqlite() {
    crash_and_resume(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_proxy_then_authority_during_revocation_postgres() {
    crash_and_resume(Backend::Postgres).await;
}
