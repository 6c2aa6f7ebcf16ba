//! Scenario: crashes in the middle of a revocation over 2,000 stored records
//! (DESIGN §3: "a crash at any point resumes without losing or
//! double-applying an update"), on SQLite and on PostgreSQL.
//!
//! The authority's `serve` drives the rotation (every second). While tokens
//! are being applied: the proxy is killed with SIGKILL and restarted; then
//! the authority is killed with SIGKILL and restarted; on PostgreSQL, the
//! database server is then crash-restarted under both of them. The job
//! finishes on its own. Every record then decrypts for the remaining holder
//! (a token applied twice, or a row left behind, would make decryption
//! fail) and for nobody holding the revoked key, and the audit log verifies.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use mabe_interop_tests::{
    Authority, Backend, Person, Proxy, assert_rotated, free_port, store_records,
};

const RECORDS: usize = 2000;

/// Rows of the proxy's freeze still at version 1, from its CLI (`None`
/// before the freeze, or while the database is unreachable).
fn pending(proxy: &Proxy) -> Option<usize> {
    let out = proxy.ok(&["freezes"]).ok()?;
    let line = out
        .lines()
        .find(|l| l.contains("cardiology@hospital-a v1"))?;
    let (_, rest) = line.split_once("row(s), ")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Wait until the proxy reports `0 < pending < below`; the count seen.
async fn wait_progress(proxy: &Proxy, below: usize, what: &str) -> usize {
    for _ in 0..6000 {
        if let Some(p) = pending(proxy) {
            if p > 0 && p < below {
                return p;
            }
            assert!(p != 0, "{what}: finished before it could be interrupted");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: no progress");
}

/// Wait until the authority reports rotation #1 done.
async fn wait_done(a: &Authority) {
    for _ in 0..600 {
        if let Ok(out) = a.ok(&["rotations"]) {
            if out
                .lines()
                .any(|l| l.starts_with("#1") && l.contains(" done "))
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!(
        "the rotation did not finish; serve log:\n{}",
        std::fs::read_to_string(a.dir.join("serve.log")).unwrap_or_default()
    );
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
    let serve_args = ["--drive-rotations-every", "1"];
    a.serve(&serve_args).unwrap();
    proxy.register_at(&a).unwrap();
    let mut doc_keys = doc.ring().unwrap();
    a.fetch_keys(&doc, &mut doc_keys).await.unwrap();
    let pks = a.directory().await.unwrap();

    // Bulk setup through the record-store API (2,000 CLI runs would only
    // slow the test down; the revocation itself is all real processes).
    let ids = store_records(&proxy, &pks, RECORDS).await.unwrap();

    // Record the revocation; the running `serve` drives it.
    let gid = doc.gid.to_string();
    let out = a
        .ok(&["revoke", "--gid", &gid, "--attr", "cardiology", "--no-wait"])
        .unwrap();
    assert!(out.contains("rotation #1 recorded"), "{out}");

    // 1. The proxy crashes while tokens are being applied, and restarts.
    let seen = wait_progress(&proxy, RECORDS, "before the proxy crash").await;
    proxy.served.take().unwrap().kill().unwrap();
    let after_proxy_crash = pending(&proxy).unwrap();
    assert!(after_proxy_crash <= seen && after_proxy_crash > 0);
    proxy.serve_on(port).unwrap();

    // 2. The authority crashes mid-way, and restarts.
    let before = wait_progress(&proxy, after_proxy_crash, "before the authority crash").await;
    a.served.take().unwrap().kill().unwrap();
    assert!(pending(&proxy).unwrap() > 0, "interrupted before the end");
    a.serve(&serve_args).unwrap();

    // 3. PostgreSQL: the database server crashes under both, and restarts.
    if backend == Backend::Postgres {
        wait_progress(&proxy, before, "before the database crash").await;
        let restart = std::env::var("MABE_TEST_PG_RESTART")
            .expect("MABE_TEST_PG_RESTART is not set: run through scripts/with-postgres");
        let status = std::process::Command::new(&restart).status().unwrap();
        assert!(status.success(), "restarting PostgreSQL failed");
        assert!(
            pending(&proxy).is_some_and(|p| p > 0),
            "interrupted before the end"
        );
    }

    wait_done(&a).await;
    assert_eq!(pending(&proxy), Some(0));

    // Every row was updated exactly once: the colleague's new key decrypts
    // every record, the doctor's key none.
    assert_rotated(&a, &proxy, &colleague, &doc_keys, &ids, 50)
        .await
        .unwrap();
    let audit = a.ok(&["audit", "verify"]).unwrap();
    assert!(audit.contains("audit log verifies"), "{audit}");
    a.served.take().unwrap().stop().unwrap();
    proxy.served.take().unwrap().stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_proxy_then_authority_during_revocation_sqlite() {
    crash_and_resume(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_proxy_authority_and_database_during_revocation_postgres() {
    crash_and_resume(Backend::Postgres).await;
}
