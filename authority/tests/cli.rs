//! The real `mabe-authority` binary: init, admin commands, audit tamper
//! detection on the database file, and SIGKILL in the middle of a burst of
//! approvals (every acknowledged approval survives; the chain verifies).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signer, SigningKey};
use mabe_authority::{admin_client::signed, datadir::DataDir, node::now};
use mabe_proto::{
    signing::attribute_request_message,
    v1::{
        AttributeRequest, DecideRequestRequest, authority_admin_client::AuthorityAdminClient,
        authority_client::AuthorityClient,
    },
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const BIN: &str = env!("CARGO_BIN_EXE_mabe-authority");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("MABE_KEK")
        .env_remove("MABE_DATABASE_URL")
        .output()
        .expect("run mabe-authority")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn new_key() -> SigningKey {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    SigningKey::from_bytes(&seed)
}

fn init(dir: &Path) {
    let out = ok(dir, &["init", "--authority-id", "hospital-a"]);
    assert!(out.contains("initialised authority hospital-a"), "{out}");
}

#[test]
fn init_writes_private_files_and_refuses_a_second_init() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["kek.hex", "admin.key", "tls/key.pem"] {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{f} must be private");
        }
    }
    let again = run(&dir, &["init", "--authority-id", "hospital-a"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("not empty: it already holds authority hospital-a"),
        "{err}"
    );
    // Not even under another id; and the first authority is intact.
    let other = run(&dir, &["init", "--authority-id", "hospital-b"]);
    assert!(!other.status.success());
    assert!(ok(&dir, &["info"]).contains("authority id: hospital-a"));
    // A command on a directory that was never initialised says what to do.
    let none = run(&tmp.path().join("missing"), &["attribute", "list"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("mabe-authority init"));
}

#[test]
fn audit_verify_names_the_edited_deleted_or_reordered_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    ok(&dir, &["attribute", "create", "cardiology"]);
    let key = hex::encode(new_key().verifying_key().to_bytes());
    let enrolled = ok(
        &dir,
        &[
            "enroll",
            "--registry",
            "big",
            "--subject",
            "1",
            "--request-key",
            &key,
        ],
    );
    let gid = enrolled.trim().rsplit(' ').next().unwrap().to_owned();
    ok(&dir, &["grant", "--gid", &gid, "--attr", "cardiology"]);
    ok(&dir, &["attribute", "create", "nurse"]);
    assert!(ok(&dir, &["audit", "verify"]).contains("audit log verifies"));
    let db = dir.join("authority.db");
    let check = |sql: &str, expect: &str| {
        let backup = std::fs::read(&db).unwrap();
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch(sql).unwrap();
        drop(c);
        let out = run(&dir, &["audit", "verify"]);
        assert_eq!(out.status.code(), Some(3), "{sql}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(expect), "{sql}: {text}");
        // Restore for the next case (WAL files are checkpointed on close).
        std::fs::write(&db, backup).unwrap();
    };
    check(
        "UPDATE audit SET detail = 'nothing happened' WHERE seq = 3;",
        "entry 3 was edited",
    );
    check(
        "DELETE FROM audit WHERE seq = 2;",
        "entries after 1 are missing",
    );
    check(
        "UPDATE audit SET seq = 100 WHERE seq = 2; UPDATE audit SET seq = 2 WHERE seq = 3; UPDATE audit SET seq = 3 WHERE seq = 100;",
        "entry 2",
    );
    assert!(ok(&dir, &["audit", "verify"]).contains("audit log verifies"));
}

/// Run the CLI, killing it if it has not finished after `secs` seconds
/// (a hang is a failure, not a stuck test run).
fn run_within(dir: &Path, args: &[&str], secs: u64) -> Output {
    let child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("MABE_KEK")
        .env_remove("MABE_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mabe-authority");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(out) => out.expect("wait for mabe-authority"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("mabe-authority {args:?} did not finish within {secs} s");
        }
    }
}

/// Regression: a tampered row with `seq = i64::MAX` made `audit verify`,
/// `audit list` and `audit checkpoint` step past it with `seq + 1` (a panic
/// in debug builds, an endless loop in release builds) instead of reporting
/// the tampered entry.
#[test]
fn audit_commands_report_an_entry_moved_to_i64_max() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    ok(&dir, &["attribute", "create", "cardiology"]);
    ok(&dir, &["attribute", "create", "nurse"]);
    let c = rusqlite::Connection::open(dir.join("authority.db")).unwrap();
    c.execute_batch("UPDATE audit SET seq = 9223372036854775807 WHERE seq = 2;")
        .unwrap();
    drop(c);
    let out = run_within(&dir, &["audit", "verify"], 60);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("entry 9223372036854775807 was edited"),
        "{text}"
    );
    assert!(
        text.contains("entries after 1 are missing (next entry is 3)"),
        "{text}"
    );
    let out = run_within(&dir, &["audit", "list"], 60);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("#9223372036854775807"), "{listed}");
    assert!(!listed.contains("more from"), "{listed}");
    let out = run_within(&dir, &["audit", "checkpoint"], 60);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_within(&dir, &["audit", "verify"], 60);
    assert_eq!(out.status.code(), Some(3));
}

/// Names in `dir` (sorted), to see what a command left behind.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Regression: `init` wrote `authority-id` (unvalidated) and `kek.hex`
/// before validating the id, so a typo left a directory that every later
/// `init` refused as "not empty".
#[test]
fn init_validates_the_id_before_writing_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    for bad in ["Hospital_A", "", "-x", &"a".repeat(64)] {
        let out = run(&dir, &["init", &format!("--authority-id={bad}")]);
        assert!(!out.status.success(), "{bad:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("invalid authority id"), "{bad:?}: {err}");
        assert!(listing(tmp.path()).is_empty(), "{bad:?} left files behind");
    }
    init(&dir);
}

/// A failure in the middle of `init` (here: the database cannot be reached)
/// leaves nothing behind, and a retry works.
#[test]
fn a_failed_init_leaves_nothing_and_a_retry_works() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let out = run(
        &dir,
        &[
            "--database-url",
            "postgres://mabe@127.0.0.1:1/nowhere",
            "init",
            "--authority-id",
            "hospital-a",
        ],
    );
    assert!(!out.status.success());
    assert!(
        listing(tmp.path()).is_empty(),
        "left {:?}",
        listing(tmp.path())
    );
    // An empty directory (made by the operator) is fine as a target.
    std::fs::create_dir(&dir).unwrap();
    init(&dir);
    assert_eq!(listing(tmp.path()), vec!["a"]);
    assert!(ok(&dir, &["audit", "verify"]).contains("audit log verifies"));
}

/// A crash in the middle of `init` leaves only a hidden staging directory
/// beside the target: the next `init` removes an incomplete one and starts
/// over, and moves a complete one (database initialised, keys written, only
/// the final rename missing) into place.
#[test]
fn init_after_a_crash_starts_over_or_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    let staging = tmp.path().join(".a.init-staging");
    // Crash before the database was initialised: id and KEK only.
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(staging.join("authority-id"), "hospital-a\n").unwrap();
    std::fs::write(staging.join("kek.hex"), "00".repeat(32)).unwrap();
    init(&dir);
    assert_eq!(listing(tmp.path()), vec!["a"]);
    let identity = ok(&dir, &["info"]);

    // Crash after the database commit, before the rename.
    std::fs::rename(&dir, &staging).unwrap();
    let out = ok(&dir, &["init", "--authority-id", "hospital-a"]);
    assert!(out.contains("finished an interrupted init"), "{out}");
    assert_eq!(listing(tmp.path()), vec!["a"]);
    assert_eq!(ok(&dir, &["info"]), identity, "the same authority");
    assert!(ok(&dir, &["audit", "verify"]).contains("audit log verifies"));

    // A complete staging directory of another authority is not discarded.
    std::fs::rename(&dir, &staging).unwrap();
    let out = run(&dir, &["init", "--authority-id", "hospital-b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted init of authority hospital-a"),
        "{err}"
    );
    assert!(staging.join("admin.key").exists());
}

/// Deleting the newest entries that a checkpoint covers is reported as a
/// truncation; `audit verify` shows how many entries no checkpoint covers.
#[test]
fn audit_verify_reports_truncation_and_uncovered_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    ok(&dir, &["attribute", "create", "cardiology"]);
    let text = ok(&dir, &["audit", "verify"]);
    assert!(
        text.contains("2 entries are not covered by any signed checkpoint"),
        "{text}"
    );
    assert!(ok(&dir, &["audit", "checkpoint"]).contains("checkpoint signed at entry 2"));
    // Again at the same head: the existing checkpoint stands.
    assert!(ok(&dir, &["audit", "checkpoint"]).contains("checkpoint signed at entry 2"));
    let text = ok(&dir, &["audit", "verify"]);
    assert!(
        text.contains("every entry is covered by the checkpoint at entry 2"),
        "{text}"
    );
    ok(&dir, &["attribute", "create", "nurse"]);
    let text = ok(&dir, &["audit", "verify"]);
    assert!(
        text.contains("1 entry after the checkpoint at entry 2 is not covered"),
        "{text}"
    );
    ok(&dir, &["attribute", "create", "surgeon"]);
    assert!(ok(&dir, &["audit", "checkpoint"]).contains("checkpoint signed at entry 4"));
    let c = rusqlite::Connection::open(dir.join("authority.db")).unwrap();
    c.execute_batch("DELETE FROM audit WHERE seq > 2;").unwrap();
    drop(c);
    let out = run(&dir, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "PROBLEM: the log ends at entry 2 but a signed checkpoint covers entry 4: the newest \
             entries were deleted"
        ),
        "{text}"
    );
}

/// `attribute describe`, and listings longer than one page (the CLI follows
/// `next_page_token`).
#[test]
fn attribute_describe_and_lists_longer_than_a_page() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    ok(&dir, &["attribute", "create", "cardiology"]);
    let key = hex::encode(new_key().verifying_key().to_bytes());
    let enrolled = ok(
        &dir,
        &[
            "enroll",
            "--registry",
            "big",
            "--subject",
            "1",
            "--request-key",
            &key,
        ],
    );
    let gid = enrolled.trim().rsplit(' ').next().unwrap().to_owned();
    ok(&dir, &["grant", "--gid", &gid, "--attr", "cardiology"]);
    ok(
        &dir,
        &["revoke", "--gid", &gid, "--attr", "cardiology", "--no-wait"],
    );
    ok(&dir, &["grant", "--gid", &gid, "--attr", "cardiology"]);
    // 600 pending requests and 600 more attributes, written behind the CLI's back.
    let c = rusqlite::Connection::open(dir.join("authority.db")).unwrap();
    c.execute_batch(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600)
         INSERT INTO requests (gid, attribute, reason, state, created_at)
             SELECT x'{gid}', 'cardiology@hospital-a', 'study ' || i, 'pending', 1700000000 FROM n;
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 600)
         INSERT INTO attributes (attribute, version, public_key, secret_sealed, state, created_at)
             SELECT printf('bulk%03d@hospital-a', i), 1, x'00', x'00', 'current', 1700000000 FROM n;"
    ))
    .unwrap();
    drop(c);
    let text = ok(&dir, &["attribute", "describe", "cardiology"]);
    for want in [
        "attribute:       cardiology@hospital-a",
        "current version: 2",
        "superseded at",
        "holders:         1",
        "pending requests: 600",
        "#1    ",
        "and 500 more",
        "rotation jobs:   1",
        "v1 -> v2 pending",
    ] {
        assert!(text.contains(want), "{want:?} missing from\n{text}");
    }
    let missing = run(&dir, &["attribute", "describe", "ghost"]);
    assert!(!missing.status.success());
    let requests = ok(&dir, &["requests", "--state", "pending"]);
    assert_eq!(requests.lines().count(), 600);
    assert!(requests.contains("study 600"));
    let attributes = ok(&dir, &["attribute", "list"]);
    assert_eq!(attributes.lines().count(), 602);
    assert!(attributes.contains("bulk600@hospital-a"));
}

struct Served {
    child: Child,
    public: u16,
    admin: u16,
}

fn serve(dir: &Path) -> Served {
    serve_with(dir, &[])
}

fn serve_with(dir: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra)
        .env_remove("MABE_KEK")
        .env_remove("MABE_DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "serving hospital-a on 127.0.0.1:P (admin 127.0.0.1:Q)"
    let addrs: Vec<std::net::SocketAddr> = line
        .split_whitespace()
        .filter_map(|t| t.trim_matches(|c| c == '(' || c == ')').parse().ok())
        .collect();
    assert_eq!(addrs.len(), 2, "unexpected serve output {line:?}");
    Served {
        child,
        public: addrs[0].port(),
        admin: addrs[1].port(),
    }
}

async fn channel(dir: &Path, port: u16) -> Channel {
    let cert = std::fs::read(DataDir::new(dir).tls_cert()).unwrap();
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(cert))
                .domain_name("localhost"),
        )
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_burst_of_approvals_loses_no_acknowledged_write() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    ok(&dir, &["attribute", "create", "researcher"]);
    let admin_key = DataDir::new(&dir).admin_key().unwrap();
    // 120 people, each with a pending request.
    let people: Vec<(String, SigningKey)> =
        (0..120).map(|i| (format!("r{i}"), new_key())).collect();
    for (subject, key) in &people {
        let k = hex::encode(key.verifying_key().to_bytes());
        ok(
            &dir,
            &[
                "enroll",
                "--registry",
                "big",
                "--subject",
                subject,
                "--request-key",
                &k,
            ],
        );
    }
    let mut s = serve(&dir);
    let mut public = AuthorityClient::new(channel(&dir, s.public).await);
    let mut ids = Vec::new();
    for (subject, key) in &people {
        let gid = mabe_abe::Gid::derive("big", subject).unwrap();
        let mut nonce = vec![0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let ts = now();
        let reason = "study 42";
        let msg = attribute_request_message(
            "hospital-a",
            gid.as_bytes(),
            "researcher",
            reason,
            &nonce,
            ts,
        );
        let r = public
            .request_attribute(AttributeRequest {
                authority_id: "hospital-a".into(),
                gid: gid.as_bytes().to_vec(),
                attribute: "researcher".into(),
                reason: reason.into(),
                nonce,
                timestamp: ts,
                signature: key.sign(&msg).to_bytes().to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(r.request_id);
    }
    // Approve concurrently; SIGKILL once 40 approvals are acknowledged.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let admin = AuthorityAdminClient::new(channel(&dir, s.admin).await);
    let mut tasks = Vec::new();
    for chunk in ids.chunks(15) {
        let chunk = chunk.to_vec();
        let mut admin = admin.clone();
        let key = admin_key.clone();
        let acked = Arc::clone(&acked);
        tasks.push(tokio::spawn(async move {
            for id in chunk {
                let req = signed(
                    DecideRequestRequest {
                        id,
                        approve: true,
                        note: "burst".into(),
                    },
                    "hospital-a",
                    "/mabe.v1.AuthorityAdmin/DecideRequest",
                    &key,
                );
                match admin.decide_request(req).await {
                    Ok(_) => acked.lock().unwrap().push(id),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    loop {
        if acked.lock().unwrap().len() >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    s.child.kill().unwrap(); // SIGKILL
    s.child.wait().unwrap();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 40);
    // After the crash: every acknowledged approval is there, and the chain verifies.
    let approved = ok(&dir, &["requests", "--state", "approved"]);
    for id in &acked {
        assert!(
            approved.contains(&format!("#{id} ")),
            "approval {id} was acknowledged but lost"
        );
    }
    assert!(ok(&dir, &["audit", "verify"]).contains("audit log verifies"));
    // And the node serves again.
    let mut s2 = serve(&dir);
    let _ = AuthorityClient::new(channel(&dir, s2.public).await);
    s2.child.kill().unwrap();
    s2.child.wait().unwrap();
}

#[tokio::test]
async fn offline_issuance_writes_a_private_bundle_of_verifiable_keys() {
    use mabe_authority::store::{Store, sqlite::SqliteStore};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    ok(&dir, &["attribute", "create", "family"]);
    let key = hex::encode(new_key().verifying_key().to_bytes());
    let enrolled = ok(
        &dir,
        &[
            "enroll",
            "--registry",
            "national-id",
            "--subject",
            "NL-1",
            "--request-key",
            &key,
        ],
    );
    let gid = enrolled.trim().rsplit(' ').next().unwrap().to_owned();
    let out = tmp.path().join("keys.bundle");
    // Nothing granted yet: a clear refusal, no file.
    let none = run(
        &dir,
        &["issue", "--gid", &gid, "--out", out.to_str().unwrap()],
    );
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no active grant"));
    assert!(!out.exists());
    ok(&dir, &["grant", "--gid", &gid, "--attr", "family"]);
    let text = ok(
        &dir,
        &["issue", "--gid", &gid, "--out", out.to_str().unwrap()],
    );
    assert!(
        text.contains("issued family@hospital-a version 1"),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&out).unwrap().permissions().mode() & 0o077,
            0
        );
    }
    let bundle = mabe_proto::bundle::decode(&std::fs::read(&out).unwrap()).unwrap();
    assert!(
        bundle.directory.is_some(),
        "the bundle carries the signed directory"
    );
    let (authority, keys) = (bundle.authority, bundle.keys);
    assert_eq!((authority.as_str(), keys.len()), ("hospital-a", 1));
    let store = SqliteStore::open(&dir.join("authority.db")).unwrap();
    let pk =
        mabe_abe::AttributePublicKey::from_bytes(&store.attributes().await.unwrap()[0].public_key)
            .unwrap();
    let mut ring = mabe_abe::UserKeyRing::new(mabe_abe::Gid::from_hex(&gid).unwrap()).unwrap();
    ring.insert(mabe_abe::UserKey::from_bytes(&keys[0]).unwrap(), &pk)
        .expect("offline key passes the pairing check");
    // Refuses to overwrite.
    assert!(
        !run(
            &dir,
            &["issue", "--gid", &gid, "--out", out.to_str().unwrap()]
        )
        .status
        .success()
    );
    assert!(ok(&dir, &["audit", "verify"]).contains("audit log verifies"));
}

/// Every admin command against a running node (`--remote`), from a
/// directory that holds only the admin key and the TLS root: nothing opens
/// the database; the node checks, applies and audits each call.
#[test]
fn admin_commands_drive_a_running_node_with_remote() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let mut served = serve(&dir);
    // The operator's machine: admin key and TLS root only, no database.
    let op = tmp.path().join("operator");
    std::fs::create_dir(&op).unwrap();
    std::fs::copy(dir.join("admin.key"), op.join("admin.key")).unwrap();
    std::fs::copy(dir.join("tls/cert.pem"), op.join("root.pem")).unwrap();
    let url = format!("https://localhost:{}", served.admin);
    let remote = |args: &[&str]| -> Output {
        let mut all = vec![
            "--remote",
            url.as_str(),
            "--authority",
            "hospital-a",
            "--admin-key",
            op.join("admin.key").to_str().unwrap(),
            "--tls-root",
            op.join("root.pem").to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&op.join("no-data-dir"), &refs)
    };
    let rok = |args: &[&str]| -> String {
        let out = remote(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(
        rok(&["attribute", "create", "cardiology"]).contains("cardiology@hospital-a version 1")
    );
    let person = new_key();
    let key = hex::encode(person.verifying_key().to_bytes());
    let enrolled = rok(&[
        "enroll",
        "--registry",
        "big",
        "--subject",
        "19012345678",
        "--request-key",
        &key,
    ]);
    let gid = enrolled.trim().rsplit(' ').next().unwrap().to_owned();
    rok(&["grant", "--gid", &gid, "--attr", "cardiology"]);
    assert!(rok(&["attribute", "list"]).contains("1 holder(s)"));
    assert!(rok(&["attribute", "describe", "cardiology"]).contains("holders:         1"));
    // A request filed over the public API, decided remotely.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut public = AuthorityClient::new(channel(&dir, served.public).await);
        let (nonce, ts) = (vec![7u8; 16], now());
        let gid_b = hex::decode(&gid).unwrap();
        let msg = attribute_request_message(
            "hospital-a",
            &gid_b,
            "cardiology@hospital-a",
            "research",
            &nonce,
            ts,
        );
        public
            .request_attribute(AttributeRequest {
                authority_id: "hospital-a".into(),
                gid: gid_b.clone(),
                attribute: "cardiology@hospital-a".into(),
                reason: "research".into(),
                nonce,
                timestamp: ts,
                signature: person.sign(&msg).to_bytes().to_vec(),
            })
            .await
            .unwrap();
    });
    let pending = rok(&["requests", "--state", "pending"]);
    let id = pending
        .split_whitespace()
        .next()
        .unwrap()
        .trim_start_matches('#')
        .to_owned();
    assert!(rok(&["deny", &id, "--note", "already granted"]).contains("denied"));
    let bundle = tmp.path().join("keys.bundle");
    assert!(
        rok(&["issue", "--gid", &gid, "--out", bundle.to_str().unwrap()])
            .contains("issued cardiology@hospital-a version 1")
    );
    let decoded = mabe_proto::bundle::decode(&std::fs::read(&bundle).unwrap()).unwrap();
    let (authority, keys) = (decoded.authority, decoded.keys);
    assert_eq!((authority.as_str(), keys.len()), ("hospital-a", 1));
    let revoked = rok(&["revoke", "--gid", &gid, "--attr", "cardiology", "--no-wait"]);
    assert!(
        revoked.contains("version 2") && revoked.contains("rotation #1 recorded"),
        "{revoked}"
    );
    assert!(rok(&["rotations"]).contains("v1 -> v2"));
    assert!(rok(&["audit", "checkpoint"]).contains("checkpoint signed at entry"));
    assert!(rok(&["audit", "verify"]).contains("audit log verifies"));

    // The wrong admin key is refused by the node, and the refusal says so.
    std::fs::write(
        op.join("admin.key"),
        hex::encode(new_key().to_bytes()).as_bytes(),
    )
    .unwrap();
    let refused = remote(&["attribute", "create", "nurse"]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("Unauthenticated") && err.contains("admin key"),
        "{err}"
    );
    terminate(&mut served.child);
    // Everything the remote session did is in the node's own audit log.
    let audit = ok(&dir, &["audit", "verify"]);
    assert!(audit.contains("audit log verifies"), "{audit}");
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait().unwrap();
}

/// `serve` signs a checkpoint when it stops, so the entries written while
/// it ran are covered (their deletion becomes detectable).
#[test]
fn serve_signs_a_checkpoint_at_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    ok(&dir, &["attribute", "create", "cardiology"]);
    // No scheduled checkpoint: only the one at shutdown.
    let mut served = serve_with(&dir, &["--checkpoint-every", "0"]);
    terminate(&mut served.child);
    let text = ok(&dir, &["audit", "verify"]);
    assert!(text.contains("1 checkpoint(s) checked"), "{text}");
    assert!(
        text.contains("every entry is covered by the checkpoint at entry 2"),
        "{text}"
    );
}
