//! The real `mabe-proxy` binary: init, trust, listings, graceful shutdown on
//! SIGTERM, and SIGKILL in the middle of token batches (restart, re-send
//! everything: every row updated exactly once).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use common::{AuthorityCaller, World, attr, channel, identity};
use mabe_abe::{Header, UpdateToken, Version};
use mabe_proto::v1::{ApplyOutcome, proxy_authority_client::ProxyAuthorityClient};
use mabe_proxy::client::RecordClient;

const BIN: &str = env!("CARGO_BIN_EXE_mabe-proxy");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("MABE_PROXY_DATABASE_URL")
        .env_remove("MABE_PROXY_DIR")
        .output()
        .expect("run mabe-proxy")
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

/// A running `mabe-proxy serve`.
struct Server {
    child: Child,
    url: String,
    ca: Vec<u8>,
}

fn serve(dir: &Path) -> Server {
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
        .env_remove("MABE_PROXY_DATABASE_URL")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "serving ID on ADDR (admin ADDR)"
    let addr = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    Server {
        child,
        url: format!("https://{addr}"),
        ca: std::fs::read(dir.join("tls/cert.pem")).unwrap(),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn caller(s: &Server) -> AuthorityCaller {
    AuthorityCaller {
        client: ProxyAuthorityClient::new(channel(&s.url, &s.ca).await)
            .max_decoding_message_size(mabe_proxy::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(mabe_proxy::MAX_MESSAGE_BYTES),
        id: "hospital-a".into(),
        key: identity("hospital-a"),
        proxy: "cloud-1".into(),
    }
}

fn init(dir: &Path) {
    let out = ok(dir, &["init", "--proxy-id", "cloud-1"]);
    assert!(out.contains("initialised proxy cloud-1"), "{out}");
    let key = hex::encode(identity("hospital-a").verifying_key().to_bytes());
    let out = ok(
        dir,
        &[
            "trust",
            "add",
            "--authority",
            "hospital-a",
            "--identity-key",
            &key,
        ],
    );
    assert!(out.contains("trusting hospital-a"), "{out}");
}

#[test]
fn init_trust_and_listings() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    init(&dir);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the TLS key is private");
    }
    let again = run(&dir, &["init", "--proxy-id", "cloud-1"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));
    let key = hex::encode(identity("hospital-a").verifying_key().to_bytes());
    assert!(ok(&dir, &["trust", "list"]).contains("hospital-a"));
    assert!(ok(&dir, &["trust", "list"]).contains(&key));
    // Another key for the same authority is refused; bad input says why.
    let other = hex::encode(identity("mallory").verifying_key().to_bytes());
    let out = run(
        &dir,
        &[
            "trust",
            "add",
            "--authority",
            "hospital-a",
            "--identity-key",
            &other,
        ],
    );
    assert!(!out.status.success());
    let out = run(
        &dir,
        &[
            "trust",
            "add",
            "--authority",
            "Hospital A",
            "--identity-key",
            &key,
        ],
    );
    assert!(!out.status.success());
    let out = run(
        &dir,
        &[
            "trust",
            "add",
            "--authority",
            "hospital-b",
            "--identity-key",
            "abcd",
        ],
    );
    assert!(!out.status.success());
    assert!(ok(&dir, &["records", "list"]).is_empty());
    assert!(ok(&dir, &["freezes"]).is_empty());
    // A directory that was never initialised says what to do.
    let none = run(&tmp.path().join("missing"), &["records", "list"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("mabe-proxy init"));
    assert!(ok(&dir, &["--help"]).contains("trust"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_and_keeps_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    init(&dir);
    let mut s = serve(&dir);
    let mut c = RecordClient::connect(&s.url, &s.ca, "localhost")
        .await
        .unwrap();
    let mut w = World::new(&["doctor@hospital-a"], 20);
    let (h, ct) = w.encrypt("doctor@hospital-a", &[1u8; 300_000]);
    c.put(&h.to_bytes(), std::io::Cursor::new(ct))
        .await
        .unwrap();
    let st = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut waited = 0;
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(waited < 100, "did not stop within 10 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += 1;
    };
    assert!(status.success(), "{status:?}");
    let list = ok(&dir, &["records", "list"]);
    assert!(list.contains(&hex::encode(h.rid().as_bytes())), "{list}");
    assert!(list.contains("doctor@hospital-a v1"), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_token_batches_then_resend_updates_every_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    init(&dir);
    let s = serve(&dir);
    let mut c = RecordClient::connect(&s.url, &s.ca, "localhost")
        .await
        .unwrap();
    let mut w = World::new(&["cardiology@hospital-a", "doctor@hospital-a"], 21);
    let mut stored = Vec::new();
    for i in 0..80u32 {
        // Every third record has the attribute in two rows.
        let policy = if i % 3 == 0 {
            "(cardiology@hospital-a AND doctor@hospital-a) OR cardiology@hospital-a"
        } else {
            "cardiology@hospital-a AND doctor@hospital-a"
        };
        let plain = format!("record {i}").into_bytes();
        let (h, ct) = w.encrypt(policy, &plain);
        c.put(&h.to_bytes(), std::io::Cursor::new(ct.clone()))
            .await
            .unwrap();
        stored.push((h, ct, plain));
    }
    let mut a = caller(&s).await;
    let frozen = a.freeze("cardiology@hospital-a", 1).await.unwrap();
    assert_eq!(frozen.rows.len(), 80 + 27);
    let us = w.rotate("cardiology@hospital-a");
    let (_, tokens) = w.tokens(&us, &frozen.rows);
    // Batches of about 5 records; the rows of one record stay in one batch.
    let mut batches: Vec<Vec<UpdateToken>> = Vec::new();
    let mut current: Vec<UpdateToken> = Vec::new();
    let mut records_in = 0;
    for t in &tokens {
        if current
            .last()
            .is_some_and(|l: &UpdateToken| l.record() != t.record())
        {
            records_in += 1;
            if records_in == 5 {
                batches.push(std::mem::take(&mut current));
                records_in = 0;
            }
        }
        current.push(t.clone());
    }
    batches.push(current);
    assert!(batches.len() >= 15);

    // Send batches one after another from a task; kill the server while a
    // batch is in flight, after a few were acknowledged.
    let sender_batches = batches.clone();
    let mut sender = caller(&s).await;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let task = tokio::spawn(async move {
        for (i, b) in sender_batches.iter().enumerate() {
            match sender.apply(b).await {
                Ok(resp) => {
                    assert!(
                        resp.results
                            .iter()
                            .all(|r| r.outcome == ApplyOutcome::Applied as i32)
                    );
                    let _ = acked_tx.send(i);
                }
                Err(_) => return,
            }
        }
    });
    let mut acked = Vec::new();
    while acked.len() < 4 {
        acked.push(acked_rx.recv().await.unwrap());
    }
    let mut s = s;
    s.child.kill().unwrap(); // SIGKILL, mid-batch
    s.child.wait().unwrap();
    task.await.unwrap();
    while let Ok(i) = acked_rx.try_recv() {
        acked.push(i);
    }
    assert!(
        acked.len() < batches.len(),
        "the kill must interrupt the sequence"
    );

    // Restart on the same data directory.
    let s2 = serve(&dir);
    let mut c = RecordClient::connect(&s2.url, &s2.ca, "localhost")
        .await
        .unwrap();
    let mut a = caller(&s2).await;
    // Every acknowledged batch survived the crash.
    for &i in &acked {
        let resp = a.apply(&batches[i]).await.unwrap();
        assert!(
            resp.results
                .iter()
                .all(|r| r.outcome == ApplyOutcome::AlreadyApplied as i32),
            "batch {i} was acknowledged before the crash: {resp:?}"
        );
    }
    // The driver re-sends everything; the rest is applied, nothing twice.
    let status = a.status("cardiology@hospital-a", 1, &[], 0).await.unwrap();
    assert!(status.pending_rows > 0);
    for b in &batches {
        let resp = a.apply(b).await.unwrap();
        for r in &resp.results {
            assert!(
                r.outcome == ApplyOutcome::Applied as i32
                    || r.outcome == ApplyOutcome::AlreadyApplied as i32,
                "{r:?}"
            );
        }
    }
    assert_eq!(
        a.status("cardiology@hospital-a", 1, &[], 0)
            .await
            .unwrap()
            .pending_rows,
        0
    );
    let reader = w.person(
        "dr-staying",
        &["cardiology@hospital-a", "doctor@hospital-a"],
    );
    for (h, ct, plain) in &stored {
        let (now, payload) = c.get(h.rid().as_bytes(), Vec::new()).await.unwrap();
        assert_eq!(&payload, ct);
        let now = Header::from_bytes(&now).unwrap();
        assert!(
            now.rows()
                .iter()
                .filter(|r| r.attribute() == &attr("cardiology@hospital-a"))
                .all(|r| r.version() == Version::new(2))
        );
        // A token applied twice would break C1/C3: decryption proves exactly once.
        assert_eq!(&w.decrypt(&now, &reader, &payload).unwrap(), plain);
    }
    let out = ok(&dir, &["freezes"]);
    assert!(
        out.contains("cardiology@hospital-a v1") && out.contains("0 still at v1"),
        "{out}"
    );
    drop(s2);
}
