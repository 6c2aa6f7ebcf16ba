//! Two `serve` processes of the real `mabe-authority` binary over one
//! PostgreSQL database, side by side: key fetches alternate between the
//! replicas, attribute requests filed on one are approved on the other's
//! admin endpoint, a fetch accepted by one is refused as a replay by the
//! other, and afterwards the shared audit chain verifies, has no duplicate
//! or missing `seq`, and holds exactly one `issue` entry per successful fetch.
//!
//! Needs `MABE_TEST_DATABASE_URL` (run through `scripts/with-postgres`);
//! without it the test fails.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use mabe_abe::{AttributePublicKey, Gid, PublicKeyRing, UserKey, UserKeyRing};
use mabe_authority::{admin_client::signed, datadir::DataDir, node::now};
use mabe_proto::{
    signing::{Directory, attribute_request_message, key_request_message},
    v1::{
        AttributeRequest, DecideRequestRequest, GetDirectoryRequest, GetInfoRequest, KeyRequest,
        authority_admin_client::AuthorityAdminClient, authority_client::AuthorityClient,
    },
};
use tokio::{sync::Semaphore, task::JoinSet};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

const BIN: &str = env!("CARGO_BIN_EXE_mabe-authority");
const AUTHORITY: &str = "hospital-a";
const REGISTRY: &str = "big-register";
/// Granted through the CLI before the replicas start.
const GRANTED: &str = "cardiology@hospital-a";
/// Requested on one replica and approved on the other while fetches run.
const REQUESTED: &str = "research@hospital-a";
const PEOPLE: usize = 20;
const FETCHES_PER_PERSON: usize = 5;
/// Calls in flight at once (fetches and request/approve pairs together).
const IN_FLIGHT: usize = 8;
const DECIDE: &str = "/mabe.v1.AuthorityAdmin/DecideRequest";

fn test_database_url() -> String {
    match std::env::var("MABE_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "MABE_TEST_DATABASE_URL is not set: this test needs a PostgreSQL server. \
             Run it as `scripts/with-postgres cargo test -p mabe-authority --test replicas`, \
             or export MABE_TEST_DATABASE_URL=postgres://USER@HOST:PORT/DB \
             (a role allowed to CREATE DATABASE)"
        ),
    }
}

/// Create an empty database next to the one `url` names; its URL.
async fn fresh_database(url: &str) -> String {
    let db = format!("mabe_replicas_{}", OsRng.next_u64());
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to MABE_TEST_DATABASE_URL {url}: {e}"));
    let conn = tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    drop(client);
    let _ = conn.await;
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("MABE_TEST_DATABASE_URL has no database name: {url}"),
    }
}

fn command(dir: &Path, db: &str) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(dir)
        .arg("--database-url")
        .arg(db)
        .env_remove("MABE_KEK")
        .env_remove("MABE_DATABASE_URL")
        .env_remove("MABE_AUTHORITY_DIR")
        .stdin(Stdio::null());
    c
}

fn run(dir: &Path, db: &str, args: &[&str]) -> Output {
    command(dir, db)
        .args(args)
        .output()
        .expect("run mabe-authority")
}

/// Run a CLI command that must succeed; its stdout.
fn ok(dir: &Path, db: &str, args: &[&str]) -> String {
    let out = run(dir, db, args);
    assert!(
        out.status.success(),
        "mabe-authority {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running `serve` process. Dropping it kills the process (so a failed
/// assertion leaks nothing) and, while panicking, prints its log.
struct Replica {
    name: &'static str,
    child: Child,
    /// Kept open so the server never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
    log: PathBuf,
    public: u16,
    admin: u16,
}

impl Replica {
    fn spawn(name: &'static str, dir: &Path, db: &str, logs: &Path) -> Replica {
        let log = logs.join(format!("replica-{name}.log"));
        let mut child = command(dir, db)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("MABE_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn mabe-authority serve");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut r = Replica {
            name,
            child,
            _stdout: stdout,
            log,
            public: 0,
            admin: 0,
        };
        let mut line = String::new();
        r._stdout.read_line(&mut line).unwrap();
        // "serving hospital-a on 127.0.0.1:P (admin 127.0.0.1:Q)"
        let addrs: Vec<std::net::SocketAddr> = line
            .split_whitespace()
            .filter_map(|t| t.trim_matches(|c| c == '(' || c == ')').parse().ok())
            .collect();
        assert_eq!(
            addrs.len(),
            2,
            "replica {name} did not start: stdout {line:?}, log:\n{}",
            std::fs::read_to_string(&r.log).unwrap_or_default()
        );
        r.public = addrs[0].port();
        r.admin = addrs[1].port();
        r
    }

    /// SIGTERM, then wait (bounded) for a clean exit.
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(sent.success(), "could not signal replica {}", self.name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "replica {} exited with {status} after SIGTERM",
                    self.name
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replica {} did not stop within 30 s of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // Ends only this process, by its id; a no-op if it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- log of replica {} ----\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

/// A failed call in one line: status code and message.
fn why(e: &tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

async fn channel(cert: &[u8], port: u16) -> Channel {
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(cert))
                .domain_name("localhost"),
        )
        .unwrap()
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("TLS connection to 127.0.0.1:{port}: {e}"))
}

struct Person {
    subject: String,
    gid: Gid,
    key: SigningKey,
}

fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; 16];
    OsRng.fill_bytes(&mut n);
    n
}

fn key_request(p: &Person, attrs: &[&str]) -> KeyRequest {
    let attributes: Vec<String> = attrs.iter().map(|s| s.to_string()).collect();
    let n = nonce();
    let ts = now();
    let msg = key_request_message(AUTHORITY, p.gid.as_bytes(), &attributes, &n, ts);
    KeyRequest {
        authority_id: AUTHORITY.into(),
        gid: p.gid.as_bytes().to_vec(),
        attributes,
        nonce: n,
        timestamp: ts,
        signature: p.key.sign(&msg).to_bytes().to_vec(),
    }
}

fn attribute_request(p: &Person, attribute: &str) -> AttributeRequest {
    let n = nonce();
    let ts = now();
    let reason = format!("{} joins the study", p.subject);
    let msg = attribute_request_message(AUTHORITY, p.gid.as_bytes(), attribute, &reason, &n, ts);
    AttributeRequest {
        authority_id: AUTHORITY.into(),
        gid: p.gid.as_bytes().to_vec(),
        attribute: attribute.into(),
        reason,
        nonce: n,
        timestamp: ts,
        signature: p.key.sign(&msg).to_bytes().to_vec(),
    }
}

/// Check issued keys: `must` among them, every one passing the pairing check
/// against the directory's public key for its attribute and version.
fn check_keys(
    p: &Person,
    keys: &[mabe_proto::v1::IssuedKey],
    pks: &PublicKeyRing,
    must: &str,
) -> Result<(), String> {
    if !keys.iter().any(|k| k.attribute == must && k.version == 1) {
        let got: Vec<_> = keys.iter().map(|k| (&k.attribute, k.version)).collect();
        return Err(format!("{}: no {must}#1 among {got:?}", p.subject));
    }
    let mut ring = UserKeyRing::new(p.gid).map_err(|e| e.to_string())?;
    for k in keys {
        let uk = UserKey::from_bytes(&k.user_key).map_err(|e| {
            format!(
                "{}: key for {} does not decode: {e}",
                p.subject, k.attribute
            )
        })?;
        let pk = pks
            .get(uk.attribute(), uk.version())
            .ok_or_else(|| format!("{}: {} is not in the directory", p.subject, k.attribute))?
            .clone();
        ring.insert(uk, &pk).map_err(|e| {
            format!(
                "{}: key for {} fails the pairing check: {e}",
                p.subject, k.attribute
            )
        })?;
    }
    Ok(())
}

/// The directory a replica serves, its signature checked against the identity
/// key printed by `init`.
async fn directory(client: &mut AuthorityClient<Channel>, identity: &VerifyingKey) -> Directory {
    let d = client
        .get_directory(GetDirectoryRequest {})
        .await
        .unwrap()
        .into_inner();
    identity
        .verify_strict(&d.body, &Signature::from_slice(&d.signature).unwrap())
        .expect("directory signed by the identity key printed by init");
    Directory::decode(&d.body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_serve_processes_over_one_postgres_database_work_side_by_side() {
    let started = Instant::now();
    let db = fresh_database(&test_database_url()).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");

    // 1. init against PostgreSQL; attributes, people and grants via the CLI.
    let out = ok(&dir, &db, &["init", "--authority-id", AUTHORITY]);
    assert!(out.contains("initialised authority hospital-a"), "{out}");
    let identity_hex = out
        .lines()
        .find_map(|l| l.strip_prefix("identity public key: "))
        .unwrap_or_else(|| panic!("init printed no identity key: {out}"));
    let identity = VerifyingKey::from_bytes(
        &hex::decode(identity_hex.trim())
            .unwrap()
            .try_into()
            .unwrap(),
    )
    .unwrap();
    assert!(
        !dir.join("authority.db").exists(),
        "init with --database-url must not create a SQLite database"
    );
    for a in ["cardiology", "research"] {
        let out = ok(&dir, &db, &["attribute", "create", a]);
        assert!(
            out.contains(&format!("created {a}@hospital-a version 1")),
            "{out}"
        );
    }
    let people: Vec<Arc<Person>> = (0..PEOPLE)
        .map(|i| {
            let mut seed = [0u8; 32];
            OsRng.fill_bytes(&mut seed);
            let subject = format!("1901234{i:04}");
            Arc::new(Person {
                gid: Gid::derive(REGISTRY, &subject).unwrap(),
                subject,
                key: SigningKey::from_bytes(&seed),
            })
        })
        .collect();
    for p in &people {
        let key = hex::encode(p.key.verifying_key().to_bytes());
        let out = ok(
            &dir,
            &db,
            &[
                "enroll",
                "--registry",
                REGISTRY,
                "--subject",
                &p.subject,
                "--request-key",
                &key,
            ],
        );
        let gid = p.gid.to_string();
        assert!(out.trim().ends_with(&gid), "{out} (expected GID {gid})");
        ok(&dir, &db, &["grant", "--gid", &gid, "--attr", "cardiology"]);
    }
    let admin_key = DataDir::new(&dir).admin_key().unwrap();
    let cert = std::fs::read(DataDir::new(&dir).tls_cert()).unwrap();
    let setup = started.elapsed();

    // 2. Two replicas: same data directory, same database, distinct ports.
    let mut replicas = [
        Replica::spawn("A", &dir, &db, tmp.path()),
        Replica::spawn("B", &dir, &db, tmp.path()),
    ];
    assert_ne!(replicas[0].public, replicas[1].public);
    assert_ne!(replicas[0].admin, replicas[1].admin);
    let mut publics = Vec::new();
    let mut admins = Vec::new();
    for r in &replicas {
        publics.push(AuthorityClient::new(channel(&cert, r.public).await));
        admins.push(AuthorityAdminClient::new(channel(&cert, r.admin).await));
    }
    // Both replicas are the same authority and serve the same directory.
    let mut dirs = Vec::new();
    for c in &mut publics {
        let info = c.get_info(GetInfoRequest {}).await.unwrap().into_inner();
        assert_eq!(info.authority_id, AUTHORITY);
        assert_eq!(info.identity_public_key, identity.to_bytes());
        dirs.push(directory(c, &identity).await);
    }
    assert_eq!(dirs[0].entries, dirs[1].entries, "replicas disagree");
    let mut pks = PublicKeyRing::new();
    for e in &dirs[0].entries {
        pks.insert(AttributePublicKey::from_bytes(&e.public_key).unwrap())
            .unwrap();
    }
    let pks = Arc::new(pks);

    // 3. Fetches alternating between the replicas and, in parallel, each
    // person's request filed on one replica and approved on the other.
    let fetched = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let burst = Instant::now();
    for (i, p) in people.iter().enumerate() {
        for k in 0..FETCHES_PER_PERSON {
            let r = (i + k) % 2;
            let mut client = publics[r].clone();
            let (p, pks, gate, fetched) = (
                Arc::clone(p),
                Arc::clone(&pks),
                Arc::clone(&gate),
                Arc::clone(&fetched),
            );
            let name = replicas[r].name;
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                let keys = client
                    .fetch_keys(key_request(&p, &[]))
                    .await
                    .map_err(|e| {
                        format!("fetch {k} of {} on replica {name}: {}", p.subject, why(&e))
                    })?
                    .into_inner()
                    .keys;
                fetched.fetch_add(1, Ordering::SeqCst);
                check_keys(&p, &keys, &pks, GRANTED)
            });
        }
        let (filed_on, approved_on) = (i % 2, (i + 1) % 2);
        let mut public = publics[filed_on].clone();
        let mut admin = admins[approved_on].clone();
        let (p, gate, key) = (Arc::clone(p), Arc::clone(&gate), admin_key.clone());
        let names = (replicas[filed_on].name, replicas[approved_on].name);
        tasks.spawn(async move {
            let receipt = {
                let _permit = gate.acquire().await.unwrap();
                public
                    .request_attribute(attribute_request(&p, REQUESTED))
                    .await
                    .map_err(|e| {
                        format!(
                            "request by {} on replica {}: {}",
                            p.subject,
                            names.0,
                            why(&e)
                        )
                    })?
                    .into_inner()
            };
            if receipt.state != "pending" {
                return Err(format!("{}: request is {}", p.subject, receipt.state));
            }
            let _permit = gate.acquire().await.unwrap();
            let decided = admin
                .decide_request(signed(
                    DecideRequestRequest {
                        id: receipt.request_id,
                        approve: true,
                        note: format!("filed on {}, approved on {}", names.0, names.1),
                    },
                    AUTHORITY,
                    DECIDE,
                    &key,
                ))
                .await
                .map_err(|e| {
                    format!(
                        "approval of request {} ({}) on replica {}: {}",
                        receipt.request_id,
                        p.subject,
                        names.1,
                        why(&e)
                    )
                })?
                .into_inner();
            if decided.state != "approved" {
                return Err(format!("{}: request is {}", p.subject, decided.state));
            }
            Ok(())
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = tasks.join_next().await {
        if let Err(e) = done.expect("a client task panicked") {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} tasks ({} fetches, {} request-then-approve pairs) failed:\n{}",
        failures.len(),
        PEOPLE * (FETCHES_PER_PERSON + 1),
        PEOPLE * FETCHES_PER_PERSON,
        PEOPLE,
        failures.join("\n")
    );
    assert_eq!(fetched.load(Ordering::SeqCst), PEOPLE * FETCHES_PER_PERSON);
    let burst = burst.elapsed();

    // An approval made on one replica is visible to the other: each person
    // fetches the requested attribute on the replica they filed it with.
    for (i, p) in people.iter().enumerate() {
        let keys = publics[i % 2]
            .fetch_keys(key_request(p, &[REQUESTED]))
            .await
            .unwrap_or_else(|e| panic!("{} fetching {REQUESTED}: {}", p.subject, why(&e)))
            .into_inner()
            .keys;
        fetched.fetch_add(1, Ordering::SeqCst);
        assert_eq!(keys.len(), 1);
        check_keys(p, &keys, &pks, REQUESTED).unwrap();
    }

    // 4. A fetch accepted by A and resent verbatim to B is a replay.
    let req = key_request(&people[0], &[GRANTED]);
    publics[0].fetch_keys(req.clone()).await.unwrap();
    fetched.fetch_add(1, Ordering::SeqCst);
    let err = publics[1]
        .fetch_keys(req)
        .await
        .expect_err("a fetch replayed on the other replica must be refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("replay"), "{}", err.message());

    // 5. The shared chain verifies, with no duplicate or missing entry.
    let out = ok(&dir, &db, &["audit", "verify"]);
    assert!(out.contains("audit log verifies"), "{out}");
    let (client, conn) = tokio_postgres::connect(&db, tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*), min(seq), max(seq), count(DISTINCT seq) FROM audit",
            &[],
        )
        .await
        .unwrap();
    let (count, min, max, distinct): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(min, 1, "audit starts at seq {min}");
    assert_eq!(count, max, "audit has {count} entries up to seq {max}");
    assert_eq!(distinct, count, "audit has duplicate seqs");
    let kinds = |kind: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one("SELECT count(*) FROM audit WHERE kind = $1", &[&kind])
                .await
                .unwrap();
            row.get::<_, i64>(0)
        }
    };
    let fetched = fetched.load(Ordering::SeqCst);
    assert_eq!(
        usize::try_from(kinds("issue").await).unwrap(),
        fetched,
        "one issue entry per successful fetch"
    );
    assert_eq!(kinds("request").await, PEOPLE as i64);
    assert_eq!(kinds("approve").await, PEOPLE as i64);
    assert_eq!(kinds("refusal").await, 1, "only the replay was refused");
    let approved: i64 = client
        .query_one(
            "SELECT count(*) FROM requests WHERE state = 'approved' AND attribute = $1",
            &[&REQUESTED],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(approved, PEOPLE as i64);
    drop(client);
    let _ = conn.await;

    // 6. Both replicas stop cleanly on SIGTERM (the guards kill them otherwise).
    drop((publics, admins));
    for r in &mut replicas {
        r.stop();
    }
    eprintln!(
        "replicas: setup {setup:.1?}, {} concurrent calls in {burst:.1?}, {fetched} fetches, \
         {count} audit entries, total {:.1?}",
        PEOPLE * (FETCHES_PER_PERSON + 2),
        started.elapsed()
    );
}
