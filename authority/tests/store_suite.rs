//! The shared store test suite: every test below runs against SQLite (a
//! temporary file) and PostgreSQL (a fresh database per test on the server
//! named by `MABE_TEST_DATABASE_URL`; run through `scripts/with-postgres`).
//!
//! Without `MABE_TEST_DATABASE_URL` the PostgreSQL tests fail: none is
//! skipped silently.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer, SigningKey};
use mabe_authority::audit::{
    AuditProblem, MAX_AUDIT_DETAIL_BYTES, MAX_AUDIT_FIELD_BYTES, Verifier, checkpoint_message,
    entry_hash,
};
use mabe_authority::store::postgres::PgStore;
use mabe_authority::store::sqlite::SqliteStore;
use mabe_authority::store::{
    AttributeRecord, AuditEntry, AuditEvent, AuthorityMeta, Checkpoint, ChunkLease, GrantRecord,
    NewRotation, NonceUse, PersonRecord, ProxyRecord, RequestFilter, RequestState, RotationState,
    Store, StoreError, StoreResult, VersionState,
};

// ---------------------------------------------------------------------------
// Harness: one backend, one fresh database, raw SQL access for tampering.
// ---------------------------------------------------------------------------

enum Kind {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        /// The maintenance database (from MABE_TEST_DATABASE_URL).
        admin_url: String,
        /// This test's own database.
        url: String,
        name: String,
    },
}

struct Harness {
    kind: Kind,
    store: Mutex<Option<Arc<dyn Store>>>,
}

const PG_MISSING: &str = "MABE_TEST_DATABASE_URL is not set: set MABE_TEST_DATABASE_URL, or run through scripts/with-postgres";

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// `url` with its database name replaced by `name` (URL or key=value form).
fn with_dbname(url: &str, name: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (base, query) = match url.find('?') {
            Some(q) => (&url[..q], &url[q..]),
            None => (url, ""),
        };
        let authority_start = scheme_end + 3;
        let host_part = match base[authority_start..].find('/') {
            Some(slash) => &base[..authority_start + slash],
            None => base,
        };
        format!("{host_part}/{name}{query}")
    } else {
        format!("{url} dbname={name}")
    }
}

async fn pg_client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

impl Harness {
    async fn sqlite() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authority.sqlite");
        let store = SqliteStore::open(&path).unwrap();
        Harness {
            kind: Kind::Sqlite { _dir: dir, path },
            store: Mutex::new(Some(Arc::new(store))),
        }
    }

    async fn postgres() -> Harness {
        let admin_url =
            std::env::var("MABE_TEST_DATABASE_URL").unwrap_or_else(|_| panic!("{PG_MISSING}"));
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "mabe_test_{}_{}_{nanos}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        pg_client(&admin_url)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e:?}"));
        let url = with_dbname(&admin_url, &name);
        let store = PgStore::connect(&url).await.unwrap();
        Harness {
            kind: Kind::Postgres {
                admin_url,
                url,
                name,
            },
            store: Mutex::new(Some(Arc::new(store))),
        }
    }

    fn backend(&self) -> &'static str {
        match self.kind {
            Kind::Sqlite { .. } => "sqlite",
            Kind::Postgres { .. } => "postgres",
        }
    }

    /// The current store.
    fn store(&self) -> Arc<dyn Store> {
        self.store.lock().unwrap().clone().expect("store is closed")
    }

    /// Drop the harness's handle on the store (the caller must drop its own).
    fn close(&self) {
        self.store.lock().unwrap().take();
    }

    /// Open the same database again, as a restarted node would.
    async fn open_again(&self) -> StoreResult<Arc<dyn Store>> {
        Ok(match &self.kind {
            Kind::Sqlite { path, .. } => Arc::new(SqliteStore::open(path)?),
            Kind::Postgres { url, .. } => Arc::new(PgStore::connect(url).await?),
        })
    }

    /// Close and reopen: the new store replaces the old one.
    async fn reopen(&self) -> Arc<dyn Store> {
        self.close();
        let store = self.open_again().await.unwrap();
        *self.store.lock().unwrap() = Some(store.clone());
        store
    }

    /// Run raw SQL behind the store's back (the tamperer's view).
    async fn exec(&self, sqlite_sql: &str, postgres_sql: &str) {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(std::time::Duration::from_secs(5))
                    .unwrap();
                conn.execute_batch(sqlite_sql).unwrap();
            }
            Kind::Postgres { url, .. } => {
                pg_client(url)
                    .await
                    .batch_execute(postgres_sql)
                    .await
                    .unwrap_or_else(|e| panic!("{postgres_sql}: {e:?}"));
            }
        }
    }

    /// One integer from a raw query (same SQL in both dialects).
    async fn query_i64(&self, sql: &str) -> i64 {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.query_row(sql, [], |r| r.get(0)).unwrap()
            }
            Kind::Postgres { url, .. } => pg_client(url)
                .await
                .query_one(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
                .get(0),
        }
    }

    /// Same SQL in both dialects.
    async fn exec_both(&self, sql: &str) {
        self.exec(sql, sql).await;
    }

    async fn cleanup(&self) {
        self.close();
        if let Kind::Postgres {
            admin_url, name, ..
        } = &self.kind
        {
            pg_client(admin_url)
                .await
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await
                .unwrap_or_else(|e| panic!("cannot drop test database {name}: {e:?}"));
        }
    }
}

/// Run one test body on a harness, then clean up (also after a failure).
async fn run<F, Fut>(h: Harness, body: F)
where
    F: FnOnce(Arc<Harness>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let h = Arc::new(h);
    let outcome = tokio::spawn(body(h.clone())).await;
    h.cleanup().await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("test task failed: {e}"),
        }
    }
}

/// Declare every test once; each runs on both backends.
macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::run(super::Harness::sqlite().await, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::run(super::Harness::postgres().await, super::$name).await;
                }
            )*
        }
    };
}

suite!(
    meta_is_initialised_once,
    attributes_create_rotate_and_list,
    enroll_and_duplicates,
    grant_revoke_and_regrant,
    requests_lifecycle,
    nonce_replay_is_detected,
    audit_chain_links_and_verifies,
    failed_operations_append_nothing,
    concurrent_appends_are_serialized,
    two_stores_over_one_database_share_one_chain,
    reopen_keeps_data_and_schema,
    newer_schema_is_refused,
    checkpoints_round_trip_and_verify,
    tamper_edit_is_reported,
    tamper_delete_is_reported,
    tamper_swap_is_reported,
    undecodable_rows_are_corrupt,
    rotations_keep_the_sealed_secret_until_finished,
    concurrent_writes_with_failures_are_isolated,
    rotation_ends_its_grants_atomically,
    decision_spends_its_nonce_in_the_same_transaction,
    audit_entries_are_bounded,
    attributes_and_requests_come_in_pages,
    chunk_leases_are_exclusive_and_expire,
    concurrent_decisions_decide_each_request_once,
);

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn rot() -> NewRotation {
    NewRotation {
        reason: "revoke test".into(),
        update_secret_sealed: vec![0x55; 90],
        revoke: vec![],
    }
}

fn ev(kind: &str) -> AuditEvent {
    AuditEvent {
        ts: 1_700_000_000,
        kind: kind.to_owned(),
        actor: "admin".to_owned(),
        subject: None,
        attribute: None,
        detail: format!("{kind} for the test suite"),
    }
}

fn ev_about(kind: &str, gid: &[u8; 32], attribute: &str) -> AuditEvent {
    AuditEvent {
        subject: Some(hex::encode(gid)),
        attribute: Some(attribute.to_owned()),
        ..ev(kind)
    }
}

fn meta() -> AuthorityMeta {
    AuthorityMeta {
        authority_id: "hospital-a".to_owned(),
        identity_public_key: [1; 32],
        identity_secret_sealed: vec![2; 72],
        admin_public_key: [3; 32],
        created_at: 1_700_000_000,
    }
}

fn attr(name: &str, version: u32) -> AttributeRecord {
    AttributeRecord {
        attribute: name.to_owned(),
        version,
        public_key: vec![0x50, version as u8, 7, 7],
        secret_sealed: vec![0x53, version as u8, 9, 9, 9],
        state: VersionState::Current,
        created_at: 1_700_000_000 + i64::from(version),
    }
}

fn person(n: u8) -> PersonRecord {
    PersonRecord {
        gid: [n; 32],
        registry: "big-register".to_owned(),
        subject: format!("subject-{n}"),
        request_key: [n.wrapping_add(100); 32],
        roles: if n % 2 == 0 {
            "emergency-staff".to_owned()
        } else {
            String::new()
        },
        enrolled_at: 1_700_000_000 + i64::from(n),
    }
}

fn grant_of(gid: [u8; 32], attribute: &str, expires_at: Option<i64>) -> GrantRecord {
    GrantRecord {
        gid,
        attribute: attribute.to_owned(),
        granted_by: "admin".to_owned(),
        granted_at: 1_700_000_100,
        expires_at,
    }
}

const DOCTOR: &str = "doctor@hospital-a";
const NURSE: &str = "nurse@hospital-a";

async fn all_entries(store: &dyn Store) -> Vec<AuditEntry> {
    store.audit_entries(1, 1_000_000).await.unwrap()
}

fn verify(entries: &[AuditEntry]) -> Vec<AuditProblem> {
    let mut v = Verifier::default();
    for e in entries {
        v.entry(e);
    }
    v.finish().problems
}

/// Entries are 1..=n, linked, correctly hashed, and the verifier agrees.
fn assert_chain(entries: &[AuditEntry], n: usize) {
    assert_eq!(entries.len(), n, "audit entry count");
    let mut prev = [0u8; 32];
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1, "seq of entry {i}");
        assert_eq!(e.prev_hash, prev, "prev_hash of entry {}", e.seq);
        assert_eq!(
            e.hash,
            entry_hash(e.seq, &e.prev_hash, &e.event),
            "hash of entry {}",
            e.seq
        );
        prev = e.hash;
    }
    assert_eq!(verify(entries), vec![], "verifier problems");
}

fn assert_already_exists<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) {
    match r {
        Err(StoreError::AlreadyExists(msg)) => assert!(!msg.is_empty()),
        other => panic!("{what}: expected AlreadyExists, got {other:?}"),
    }
}

fn assert_not_found<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) {
    match r {
        Err(StoreError::NotFound(msg)) => assert!(!msg.is_empty()),
        other => panic!("{what}: expected NotFound, got {other:?}"),
    }
}

fn assert_conflict<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) {
    match r {
        Err(StoreError::Conflict(msg)) => assert!(!msg.is_empty()),
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

fn assert_corrupt<T: std::fmt::Debug>(r: StoreResult<T>, what: &str) -> String {
    match r {
        Err(StoreError::Corrupt(msg)) => msg,
        other => panic!("{what}: expected Corrupt, got {other:?}"),
    }
}

/// A small populated node: meta, two attributes, two people, one grant.
async fn populate(store: &dyn Store) {
    store.init_meta(&meta(), ev("init")).await.unwrap();
    store
        .create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap();
    store
        .create_attribute(&attr(NURSE, 1), ev("create-attribute"))
        .await
        .unwrap();
    store.enroll(&person(1), ev("enroll")).await.unwrap();
    store.enroll(&person(2), ev("enroll")).await.unwrap();
    store
        .grant(
            &grant_of([1; 32], DOCTOR, None),
            ev_about("grant", &[1; 32], DOCTOR),
        )
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

async fn meta_is_initialised_once(h: Arc<Harness>) {
    let s = h.store();
    assert_eq!(s.backend(), h.backend());
    assert_eq!(s.meta().await.unwrap(), None);
    s.init_meta(&meta(), ev("init")).await.unwrap();
    assert_eq!(s.meta().await.unwrap(), Some(meta()));

    let other = AuthorityMeta {
        authority_id: "hospital-b".to_owned(),
        ..meta()
    };
    assert_already_exists(s.init_meta(&other, ev("init")).await, "second init");
    assert_eq!(s.meta().await.unwrap(), Some(meta()), "first identity kept");
    assert_chain(&all_entries(&*s).await, 1);
}

async fn attributes_create_rotate_and_list(h: Arc<Harness>) {
    let s = h.store();
    s.create_attribute(&attr(NURSE, 1), ev("create-attribute"))
        .await
        .unwrap();
    s.create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap();
    assert_already_exists(
        s.create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
            .await,
        "duplicate attribute",
    );
    assert_conflict(
        s.create_attribute(&attr("cardiologist@hospital-a", 2), ev("create-attribute"))
            .await,
        "new attribute at version 2",
    );

    // Rotation must go to exactly current + 1.
    assert_conflict(
        s.rotate_attribute(&attr(DOCTOR, 3), &rot(), ev("rotate"))
            .await,
        "skip a version",
    );
    assert_conflict(
        s.rotate_attribute(&attr(DOCTOR, 1), &rot(), ev("rotate"))
            .await,
        "same version",
    );
    assert_not_found(
        s.rotate_attribute(&attr("ghost@hospital-a", 2), &rot(), ev("rotate"))
            .await,
        "rotate unknown attribute",
    );
    s.rotate_attribute(&attr(DOCTOR, 2), &rot(), ev("rotate"))
        .await
        .unwrap();
    assert_conflict(
        s.rotate_attribute(&attr(DOCTOR, 2), &rot(), ev("rotate"))
            .await,
        "rotate twice to 2",
    );
    s.rotate_attribute(&attr(DOCTOR, 3), &rot(), ev("rotate"))
        .await
        .unwrap();

    let versions = s.attribute_versions(DOCTOR).await.unwrap();
    let summary: Vec<(u32, VersionState)> = versions.iter().map(|r| (r.version, r.state)).collect();
    assert_eq!(
        summary,
        vec![
            (1, VersionState::Superseded),
            (2, VersionState::Superseded),
            (3, VersionState::Current)
        ]
    );
    let mut expected = attr(DOCTOR, 3);
    expected.state = VersionState::Current;
    assert_eq!(versions[2], expected, "stored record round-trips");
    assert_eq!(versions[0].public_key, attr(DOCTOR, 1).public_key);
    assert_eq!(versions[0].secret_sealed, attr(DOCTOR, 1).secret_sealed);

    let all = s.attributes().await.unwrap();
    let order: Vec<(&str, u32)> = all
        .iter()
        .map(|r| (r.attribute.as_str(), r.version))
        .collect();
    assert_eq!(
        order,
        vec![(DOCTOR, 1), (DOCTOR, 2), (DOCTOR, 3), (NURSE, 1)]
    );
    assert!(
        s.attribute_versions("ghost@hospital-a")
            .await
            .unwrap()
            .is_empty()
    );

    // Only the successful operations were audited: 2 creates + 2 rotations.
    assert_chain(&all_entries(&*s).await, 4);
}

async fn enroll_and_duplicates(h: Arc<Harness>) {
    let s = h.store();
    // Enroll out of time order: people() orders by enrollment time.
    s.enroll(&person(3), ev("enroll")).await.unwrap();
    s.enroll(&person(1), ev("enroll")).await.unwrap();
    assert_eq!(s.person(&[1; 32]).await.unwrap(), Some(person(1)));
    assert_eq!(s.person(&[9; 32]).await.unwrap(), None);

    assert_already_exists(s.enroll(&person(1), ev("enroll")).await, "same GID");
    let same_subject = PersonRecord {
        gid: [42; 32],
        ..person(3)
    };
    assert_already_exists(
        s.enroll(&same_subject, ev("enroll")).await,
        "same registry/subject",
    );
    let other_registry = PersonRecord {
        gid: [43; 32],
        registry: "other-register".to_owned(),
        ..person(3)
    };
    s.enroll(&other_registry, ev("enroll")).await.unwrap();

    let people = s.people().await.unwrap();
    let gids: Vec<u8> = people.iter().map(|p| p.gid[0]).collect();
    assert_eq!(gids, vec![1, 3, 43]);
    assert_chain(&all_entries(&*s).await, 3);
}

async fn grant_revoke_and_regrant(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await; // 6 entries; person 1 holds DOCTOR
    let p2 = [2u8; 32];

    assert_not_found(
        s.grant(&grant_of([9; 32], DOCTOR, None), ev("grant")).await,
        "grant to unknown person",
    );
    assert_not_found(
        s.grant(&grant_of(p2, "ghost@hospital-a", None), ev("grant"))
            .await,
        "grant of unknown attribute",
    );
    assert_already_exists(
        s.grant(&grant_of([1; 32], DOCTOR, None), ev("grant")).await,
        "duplicate active grant",
    );

    s.grant(
        &grant_of(p2, NURSE, Some(1_700_003_600)),
        ev_about("break-glass", &p2, NURSE),
    )
    .await
    .unwrap();
    s.grant(&grant_of(p2, DOCTOR, None), ev_about("grant", &p2, DOCTOR))
        .await
        .unwrap();
    let held = s.grants_for(&p2).await.unwrap();
    assert_eq!(
        held,
        vec![
            grant_of(p2, DOCTOR, None),
            grant_of(p2, NURSE, Some(1_700_003_600))
        ]
    );
    let holders: Vec<u8> = s
        .holders(DOCTOR)
        .await
        .unwrap()
        .iter()
        .map(|g| g.gid[0])
        .collect();
    assert_eq!(holders.len(), 2);
    assert!(holders.contains(&1) && holders.contains(&2));

    s.revoke_grant(&p2, DOCTOR, ev_about("revoke", &p2, DOCTOR))
        .await
        .unwrap();
    assert_not_found(
        s.revoke_grant(&p2, DOCTOR, ev("revoke")).await,
        "revoke twice",
    );
    assert_not_found(
        s.revoke_grant(&[9; 32], DOCTOR, ev("revoke")).await,
        "revoke unknown",
    );
    assert_eq!(
        s.grants_for(&p2).await.unwrap(),
        vec![grant_of(p2, NURSE, Some(1_700_003_600))]
    );
    let holders: Vec<u8> = s
        .holders(DOCTOR)
        .await
        .unwrap()
        .iter()
        .map(|g| g.gid[0])
        .collect();
    assert_eq!(holders, vec![1]);

    // Re-grant after revocation.
    let again = GrantRecord {
        granted_by: "patient".to_owned(),
        granted_at: 1_700_000_500,
        ..grant_of(p2, DOCTOR, None)
    };
    s.grant(&again, ev_about("grant", &p2, DOCTOR))
        .await
        .unwrap();
    assert_eq!(
        s.grants_for(&p2).await.unwrap(),
        vec![again, grant_of(p2, NURSE, Some(1_700_003_600))]
    );
    assert!(s.holders("ghost@hospital-a").await.unwrap().is_empty());
    assert!(s.grants_for(&[9; 32]).await.unwrap().is_empty());
    // populate (6) + 2 grants + revoke + re-grant
    assert_chain(&all_entries(&*s).await, 10);
}

async fn requests_lifecycle(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await; // 6 entries; person 1 holds DOCTOR
    let p1 = [1u8; 32];
    let p2 = [2u8; 32];

    assert_not_found(
        s.create_request(&[9; 32], NURSE, "I work here", 10, ev("request"))
            .await,
        "request by unknown person",
    );
    assert_not_found(
        s.create_request(&p2, "ghost@hospital-a", "why not", 10, ev("request"))
            .await,
        "request for unknown attribute",
    );

    let r1 = s
        .create_request(&p2, NURSE, "night shift", 100, ev("request"))
        .await
        .unwrap();
    let r2 = s
        .create_request(&p2, DOCTOR, "curious", 101, ev("request"))
        .await
        .unwrap();
    let r3 = s
        .create_request(&p1, DOCTOR, "already have it", 102, ev("request"))
        .await
        .unwrap();
    assert!(r1.id > 0 && r1.id < r2.id && r2.id < r3.id, "ids increase");
    assert_eq!(r1.state, RequestState::Pending);
    assert_eq!(
        (r1.decided_by.clone(), r1.decided_at, r1.note.clone()),
        (None, None, None)
    );

    let all = s.requests(None).await.unwrap();
    assert_eq!(all, vec![r1.clone(), r2.clone(), r3.clone()]);
    assert_eq!(
        s.requests(Some(RequestState::Pending)).await.unwrap().len(),
        3
    );

    // Approve: the grant appears in the same transaction.
    let d1 = s
        .decide_request(
            r1.id,
            true,
            "admin",
            "ok for nights",
            200,
            ev("approve"),
            None,
        )
        .await
        .unwrap();
    assert_eq!(d1.state, RequestState::Approved);
    assert_eq!(d1.decided_by.as_deref(), Some("admin"));
    assert_eq!(d1.decided_at, Some(200));
    assert_eq!(d1.note.as_deref(), Some("ok for nights"));
    let granted = s.grants_for(&p2).await.unwrap();
    assert_eq!(
        granted,
        vec![GrantRecord {
            gid: p2,
            attribute: NURSE.to_owned(),
            granted_by: format!("request:{}", r1.id),
            granted_at: 200,
            expires_at: None,
        }]
    );

    // Deny: no grant.
    let d2 = s
        .decide_request(r2.id, false, "admin", "no", 201, ev("deny"), None)
        .await
        .unwrap();
    assert_eq!(d2.state, RequestState::Denied);
    assert_eq!(s.grants_for(&p2).await.unwrap().len(), 1);

    // Approving when an active grant exists keeps the existing grant.
    s.decide_request(r3.id, true, "admin", "fine", 202, ev("approve"), None)
        .await
        .unwrap();
    assert_eq!(
        s.grants_for(&p1).await.unwrap(),
        vec![grant_of(p1, DOCTOR, None)]
    );

    // Deciding twice, or an unknown id.
    assert_conflict(
        s.decide_request(
            r1.id,
            false,
            "admin",
            "changed my mind",
            300,
            ev("deny"),
            None,
        )
        .await,
        "decide twice",
    );
    assert_conflict(
        s.decide_request(
            r2.id,
            true,
            "admin",
            "changed my mind",
            300,
            ev("approve"),
            None,
        )
        .await,
        "approve a denied request",
    );
    assert_not_found(
        s.decide_request(r3.id + 1000, true, "admin", "", 300, ev("approve"), None)
            .await,
        "decide unknown request",
    );

    assert_eq!(
        s.requests(Some(RequestState::Pending)).await.unwrap(),
        vec![]
    );
    let approved = s.requests(Some(RequestState::Approved)).await.unwrap();
    assert_eq!(
        approved.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![r1.id, r3.id]
    );
    assert_eq!(
        s.requests(Some(RequestState::Denied)).await.unwrap(),
        vec![d2]
    );
    assert_eq!(s.requests(None).await.unwrap()[0], d1);
    // populate (6) + 3 requests + 3 decisions
    assert_chain(&all_entries(&*s).await, 12);
}

async fn nonce_replay_is_detected(h: Arc<Harness>) {
    let s = h.store();
    let (a, b) = ([1u8; 32], [2u8; 32]);
    assert!(s.use_nonce(&a, b"nonce-1", 100, 0).await.unwrap());
    assert!(
        !s.use_nonce(&a, b"nonce-1", 101, 0).await.unwrap(),
        "replay"
    );
    assert!(s.use_nonce(&a, b"nonce-2", 102, 0).await.unwrap());
    assert!(
        s.use_nonce(&b, b"nonce-1", 103, 0).await.unwrap(),
        "nonces are per GID"
    );
    assert!(
        !s.use_nonce(&b, b"nonce-1", 104, 0).await.unwrap(),
        "replay"
    );
    // Pruning forgets nonces older than prune_before (the caller rejects
    // requests that old by their timestamp).
    assert!(s.use_nonce(&a, b"nonce-3", 200, 150).await.unwrap());
    assert!(
        s.use_nonce(&a, b"nonce-1", 201, 150).await.unwrap(),
        "pruned nonce"
    );
    assert!(
        !s.use_nonce(&a, b"nonce-3", 202, 150).await.unwrap(),
        "recent nonce kept"
    );
    // Nonces are not audited.
    assert!(all_entries(&*s).await.is_empty());
}

async fn audit_chain_links_and_verifies(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    s.rotate_attribute(&attr(DOCTOR, 2), &rot(), ev("rotate"))
        .await
        .unwrap();
    s.revoke_grant(&[1; 32], DOCTOR, ev_about("revoke", &[1; 32], DOCTOR))
        .await
        .unwrap();
    let r = s
        .create_request(&[2; 32], NURSE, "please", 5, ev("request"))
        .await
        .unwrap();
    s.decide_request(r.id, true, "admin", "", 6, ev("approve"), None)
        .await
        .unwrap();
    let appended = s
        .append_audit(ev_about("issue", &[2; 32], NURSE))
        .await
        .unwrap();
    assert_eq!(appended.seq, 11);

    let entries = all_entries(&*s).await;
    assert_chain(&entries, 11);
    assert_eq!(
        entries[10], appended,
        "append_audit returns the stored entry"
    );
    let kinds: Vec<&str> = entries.iter().map(|e| e.event.kind.as_str()).collect();
    assert_eq!(
        kinds,
        vec![
            "init",
            "create-attribute",
            "create-attribute",
            "enroll",
            "enroll",
            "grant",
            "rotate",
            "revoke",
            "request",
            "approve",
            "issue"
        ]
    );
    assert_eq!(
        entries[5].event,
        ev_about("grant", &[1; 32], DOCTOR),
        "event round-trips"
    );

    // Paging.
    let page = s.audit_entries(4, 3).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    assert_eq!(page, entries[3..6].to_vec());
    assert!(s.audit_entries(12, 10).await.unwrap().is_empty());
    assert!(s.audit_entries(1, 0).await.unwrap().is_empty());
    assert!(s.audit_entries(1, -1).await.unwrap().is_empty());
}

async fn failed_operations_append_nothing(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    let before = all_entries(&*s).await;
    let _ = s.init_meta(&meta(), ev("init")).await.unwrap_err();
    let _ = s
        .create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap_err();
    let _ = s
        .rotate_attribute(&attr(DOCTOR, 5), &rot(), ev("rotate"))
        .await
        .unwrap_err();
    let _ = s.enroll(&person(1), ev("enroll")).await.unwrap_err();
    let _ = s
        .grant(&grant_of([1; 32], DOCTOR, None), ev("grant"))
        .await
        .unwrap_err();
    let _ = s
        .revoke_grant(&[2; 32], DOCTOR, ev("revoke"))
        .await
        .unwrap_err();
    let _ = s
        .create_request(&[9; 32], DOCTOR, "", 0, ev("request"))
        .await
        .unwrap_err();
    let _ = s
        .decide_request(999, true, "admin", "", 0, ev("approve"), None)
        .await
        .unwrap_err();
    assert_eq!(
        all_entries(&*s).await,
        before,
        "failed operations left no audit entry"
    );
    // And nothing else changed either.
    assert_eq!(s.attribute_versions(DOCTOR).await.unwrap().len(), 1);
    assert_eq!(s.people().await.unwrap().len(), 2);
    assert!(s.requests(None).await.unwrap().is_empty());
}

async fn concurrent_appends_are_serialized(h: Arc<Harness>) {
    let s = h.store();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..25 {
                let mut e = ev("issue");
                e.detail = format!("task {t} entry {i}");
                seqs.push(s.append_audit(e).await.unwrap().seq);
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "a task's own entries are ordered"
        );
        seqs.extend(mine);
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<i64>>(),
        "no gaps, no duplicates"
    );
    assert_chain(&all_entries(&*s).await, 200);
}

async fn two_stores_over_one_database_share_one_chain(h: Arc<Harness>) {
    // Two independent stores over one database, as two `serve` replicas (two
    // PostgreSQL pools; two SQLite connections to one file).
    let first = h.store();
    let second = h.open_again().await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..6 {
        let s = if t % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let mut e = ev("issue");
                e.detail = format!("replica {} task {t} entry {i}", t % 2);
                s.append_audit(e).await.unwrap();
            }
        }));
    }
    // Mutations with side effects interleave with the appends.
    first.enroll(&person(1), ev("enroll")).await.unwrap();
    assert_already_exists(
        second.enroll(&person(1), ev("enroll")).await,
        "enrolled by the other",
    );
    for t in tasks {
        t.await.unwrap();
    }
    let entries = all_entries(&*second).await;
    assert_chain(&entries, 121);
    assert_eq!(entries, all_entries(&*first).await);
}

async fn reopen_keeps_data_and_schema(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    let r = s
        .create_request(&[2; 32], NURSE, "please", 5, ev("request"))
        .await
        .unwrap();
    assert!(s.use_nonce(&[2; 32], b"n", 10, 0).await.unwrap());
    let entries = all_entries(&*s).await;
    let attributes = s.attributes().await.unwrap();
    let people = s.people().await.unwrap();
    drop(s);

    let s = h.reopen().await;
    assert_eq!(s.meta().await.unwrap(), Some(meta()));
    assert_eq!(s.attributes().await.unwrap(), attributes);
    assert_eq!(s.people().await.unwrap(), people);
    assert_eq!(
        s.grants_for(&[1; 32]).await.unwrap(),
        vec![grant_of([1; 32], DOCTOR, None)]
    );
    assert_eq!(s.requests(None).await.unwrap(), vec![r.clone()]);
    assert!(
        !s.use_nonce(&[2; 32], b"n", 11, 0).await.unwrap(),
        "nonce survived"
    );
    assert_eq!(all_entries(&*s).await, entries);

    // The chain continues where it left off, and ids keep growing.
    let next = s.append_audit(ev("issue")).await.unwrap();
    assert_eq!(next.seq, entries.len() as i64 + 1);
    assert_eq!(next.prev_hash, entries[entries.len() - 1].hash);
    let r2 = s
        .create_request(&[2; 32], DOCTOR, "again", 6, ev("request"))
        .await
        .unwrap();
    assert!(r2.id > r.id);
    assert_chain(&all_entries(&*s).await, entries.len() + 2);
    drop(s);

    // A third open applies nothing twice: one schema_version row per migration.
    let s = h.reopen().await;
    assert_eq!(s.meta().await.unwrap(), Some(meta()));
    assert_eq!(h.query_i64("SELECT COUNT(*) FROM schema_version").await, 4);
    assert_eq!(
        h.query_i64("SELECT MAX(version) FROM schema_version").await,
        4
    );
}

async fn newer_schema_is_refused(h: Arc<Harness>) {
    h.close();
    h.exec_both("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
        .await;
    let err = h.open_again().await.map(|_| ()).unwrap_err();
    let msg = assert_corrupt(Err::<(), _>(err), "open a newer database");
    assert!(
        msg.starts_with("database schema 99 is newer than this build ("),
        "message: {msg}"
    );
}

async fn checkpoints_round_trip_and_verify(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let entries = all_entries(&*s).await;
    let mut cps = Vec::new();
    for seq in [3i64, 6] {
        let hash = entries[seq as usize - 1].hash;
        let ts = 1_700_000_900 + seq;
        let signature = key
            .sign(&checkpoint_message("hospital-a", seq, &hash, ts))
            .to_bytes()
            .to_vec();
        let cp = Checkpoint {
            seq,
            hash,
            ts,
            signature,
        };
        s.add_checkpoint(&cp).await.unwrap();
        cps.push(cp);
    }
    assert_already_exists(s.add_checkpoint(&cps[0]).await, "duplicate checkpoint");
    assert_eq!(s.checkpoints().await.unwrap(), cps);

    let mut v = Verifier::default();
    for e in &entries {
        v.entry(e);
    }
    for cp in &cps {
        v.checkpoint("hospital-a", &key.verifying_key(), cp);
    }
    let report = v.finish();
    assert_eq!((report.entries, report.checkpoints), (6, 2));
    assert_eq!(report.problems, vec![]);
}

async fn tamper_edit_is_reported(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    assert_eq!(verify(&all_entries(&*s).await), vec![]);
    h.exec_both("UPDATE audit SET detail = 'nothing happened' WHERE seq = 3")
        .await;
    let entries = all_entries(&*s).await;
    assert_eq!(entries[2].event.detail, "nothing happened");
    assert_eq!(verify(&entries), vec![AuditProblem::Edited { seq: 3 }]);
}

async fn tamper_delete_is_reported(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    h.exec_both("DELETE FROM audit WHERE seq = 3").await;
    assert_eq!(
        verify(&all_entries(&*s).await),
        vec![AuditProblem::Missing { after: 2, next: 4 }]
    );
}

async fn tamper_swap_is_reported(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    // Swap the positions of entries 2 and 4.
    h.exec_both(
        "UPDATE audit SET seq = 1000000 WHERE seq = 2;
         UPDATE audit SET seq = 2 WHERE seq = 4;
         UPDATE audit SET seq = 4 WHERE seq = 1000000;",
    )
    .await;
    let problems = verify(&all_entries(&*s).await);
    println!("{} swap of entries 2 and 4: {problems:?}", h.backend());
    // Each moved entry no longer hashes to its stored hash (seq is hashed),
    // and no longer links to its new predecessor; the entries after each
    // moved one no longer link either.
    assert_eq!(
        problems,
        vec![
            AuditProblem::Edited { seq: 2 },
            AuditProblem::BrokenLink { seq: 2 },
            AuditProblem::BrokenLink { seq: 3 },
            AuditProblem::Edited { seq: 4 },
            AuditProblem::BrokenLink { seq: 4 },
            AuditProblem::BrokenLink { seq: 5 },
        ]
    );
}

async fn undecodable_rows_are_corrupt(h: Arc<Harness>) {
    let s = h.store();
    populate(&*s).await;
    // Bypass the CHECK constraints, as a tamperer with raw access could.
    h.exec(
        "PRAGMA ignore_check_constraints = ON;
         UPDATE audit SET hash = x'0102' WHERE seq = 2;
         UPDATE attributes SET state = 'retired' WHERE attribute = 'nurse@hospital-a';
         UPDATE people SET request_key = x'00' WHERE subject = 'subject-2';",
        "ALTER TABLE audit DROP CONSTRAINT audit_hash_len;
         ALTER TABLE attributes DROP CONSTRAINT attributes_state_known;
         ALTER TABLE people DROP CONSTRAINT people_request_key_len;
         UPDATE audit SET hash = decode('0102', 'hex') WHERE seq = 2;
         UPDATE attributes SET state = 'retired' WHERE attribute = 'nurse@hospital-a';
         UPDATE people SET request_key = decode('00', 'hex') WHERE subject = 'subject-2';",
    )
    .await;
    let msg = assert_corrupt(s.audit_entries(1, 100).await, "short audit hash");
    assert!(msg.contains("audit entry 2 hash is 2 bytes"), "{msg}");
    // Entries before the bad one still read.
    assert_eq!(s.audit_entries(1, 1).await.unwrap().len(), 1);
    let msg = assert_corrupt(s.attributes().await, "unknown version state");
    assert!(msg.contains("retired"), "{msg}");
    assert_eq!(s.attribute_versions(DOCTOR).await.unwrap().len(), 1);
    assert_corrupt(s.people().await, "short request key");
    assert_corrupt(s.person(&[2; 32]).await, "short request key");
    assert_eq!(s.person(&[1; 32]).await.unwrap(), Some(person(1)));
    // Appending after a corrupt chain head is refused too, not guessed at.
    h.exec_both("DELETE FROM audit WHERE seq > 2").await;
    assert_corrupt(
        s.append_audit(ev("issue")).await,
        "append after a short hash",
    );
}

async fn rotations_keep_the_sealed_secret_until_finished(h: Arc<Harness>) {
    let s = h.store();
    s.create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap();
    let job = s
        .rotate_attribute(&attr(DOCTOR, 2), &rot(), ev("rotate"))
        .await
        .unwrap();
    assert_eq!((job.from_version, job.to_version), (1, 2));
    assert_eq!(job.state, RotationState::Pending);
    assert_eq!(job.update_secret_sealed, Some(vec![0x55; 90]));
    assert_eq!(job.reason, "revoke test");
    // A failed rotation creates no job.
    assert_conflict(
        s.rotate_attribute(&attr(DOCTOR, 2), &rot(), ev("rotate"))
            .await,
        "rotate twice to 2",
    );
    assert_eq!(s.rotations(true).await.unwrap(), vec![job.clone()]);
    let before = all_entries(&*s).await.len();
    let done = s
        .finish_rotation(job.id, 99, ev("rotation-done"))
        .await
        .unwrap();
    assert_eq!(done.state, RotationState::Done);
    assert_eq!(
        done.update_secret_sealed, None,
        "the update secret is erased"
    );
    assert_eq!(done.finished_at, Some(99));
    assert_eq!(all_entries(&*s).await.len(), before + 1);
    assert_conflict(
        s.finish_rotation(job.id, 100, ev("rotation-done")).await,
        "finish twice",
    );
    assert_not_found(
        s.finish_rotation(job.id + 1000, 100, ev("rotation-done"))
            .await,
        "unknown rotation",
    );
    assert!(s.rotations(true).await.unwrap().is_empty());
    assert_eq!(s.rotations(false).await.unwrap(), vec![done]);
    // The erased secret is gone from the database, not just hidden.
    assert_eq!(
        h.query_i64("SELECT COUNT(*) FROM rotations WHERE update_secret_sealed IS NOT NULL")
            .await,
        0
    );
}

/// Shares of a rotation's work: a chunk is leased to one replica at a time,
/// its owner takes it back after a restart, a lease that ran out is taken
/// over (and its old owner can no longer renew it), done chunks stay done,
/// and concurrent claims never hand one chunk to two owners.
async fn chunk_leases_are_exclusive_and_expire(h: Arc<Harness>) {
    let s = h.store();
    s.create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap();
    let job = s
        .rotate_attribute(&attr(DOCTOR, 2), &rot(), ev("rotate"))
        .await
        .unwrap();
    for id in ["cloud-1", "cloud-2"] {
        s.add_proxy(
            &ProxyRecord {
                id: id.into(),
                endpoint: format!("https://{id}.example:7543"),
                tls_root: b"-----BEGIN CERTIFICATE-----".to_vec(),
                tls_name: "localhost".into(),
                added_at: 1,
            },
            ev("proxy-add"),
        )
        .await
        .unwrap();
    }
    let lease = |owner: &str, proxy: &str| ChunkLease {
        rotation_id: job.id,
        proxy_id: proxy.into(),
        owner: owner.into(),
    };
    let (a, b) = (lease("replica-a", "cloud-1"), lease("replica-b", "cloud-1"));
    assert_eq!(s.claim_chunk(&a, 4, 100, 130).await.unwrap(), Some(0));
    assert_eq!(s.claim_chunk(&b, 4, 100, 130).await.unwrap(), Some(1));
    // A replica takes its own unexpired lease back (after a restart).
    assert_eq!(s.claim_chunk(&a, 4, 101, 131).await.unwrap(), Some(0));
    assert!(s.update_chunk(&a, 0, 140, None).await.unwrap());
    assert!(
        !s.update_chunk(&b, 0, 140, None).await.unwrap(),
        "only the owner renews"
    );
    assert!(s.update_chunk(&a, 0, 110, Some(110)).await.unwrap());
    assert!(
        !s.update_chunk(&a, 0, 150, None).await.unwrap(),
        "a done chunk stays done"
    );
    assert_eq!(s.chunk_counts(job.id, "cloud-1").await.unwrap(), (1, 4));
    assert_eq!(s.claim_chunk(&a, 4, 111, 141).await.unwrap(), Some(2));
    assert_eq!(s.claim_chunk(&b, 4, 111, 141).await.unwrap(), Some(1));
    assert_eq!(s.claim_chunk(&b, 4, 112, 142).await.unwrap(), Some(1));
    // b stalls: once its lease ran out, a takes chunk 1 over, and b can no
    // longer renew or finish it.
    assert_eq!(s.claim_chunk(&a, 4, 200, 230).await.unwrap(), Some(1));
    assert!(!s.update_chunk(&b, 1, 250, None).await.unwrap());
    assert!(!s.update_chunk(&b, 1, 250, Some(250)).await.unwrap());
    assert!(s.update_chunk(&a, 1, 250, Some(250)).await.unwrap());
    // Nothing free for a third replica while a's chunks 2 and 3 are leased.
    let c = lease("replica-c", "cloud-1");
    assert_eq!(s.claim_chunk(&a, 4, 201, 231).await.unwrap(), Some(2));
    assert_eq!(s.claim_chunk(&b, 4, 201, 231).await.unwrap(), Some(3));
    assert_eq!(s.claim_chunk(&c, 4, 202, 232).await.unwrap(), None);
    for (l, k) in [(&a, 2), (&b, 3)] {
        assert!(s.update_chunk(l, k, 240, Some(240)).await.unwrap());
    }
    assert_eq!(s.chunk_counts(job.id, "cloud-1").await.unwrap(), (4, 4));
    assert_eq!(s.claim_chunk(&c, 4, 300, 330).await.unwrap(), None);

    // Concurrent claims at another proxy: 16 replicas, 8 chunks, each chunk
    // to exactly one of them.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = Arc::clone(&s);
        let l = lease(&format!("replica-{i}"), "cloud-2");
        tasks.push(tokio::spawn(
            async move { s.claim_chunk(&l, 8, 500, 530).await },
        ));
    }
    let mut got = Vec::new();
    for t in tasks {
        if let Some(k) = t.await.unwrap().unwrap() {
            got.push(k);
        }
    }
    got.sort_unstable();
    assert_eq!(got, (0..8).collect::<Vec<u32>>(), "one owner per chunk");
    assert_eq!(s.chunk_counts(job.id, "cloud-2").await.unwrap(), (0, 8));
}

/// Many writes at once, a fifth of them failing (duplicates): each caller gets
/// its own outcome, failures leave nothing behind, and the chain verifies.
/// On SQLite this exercises group commit (many writes per transaction, one
/// savepoint each).
async fn concurrent_writes_with_failures_are_isolated(h: Arc<Harness>) {
    let s = h.store();
    for n in 0..10u8 {
        s.enroll(&person(n), ev("enroll")).await.unwrap();
    }
    let base = all_entries(&*s).await.len();
    let mut tasks = Vec::new();
    for i in 0..100u8 {
        let s = Arc::clone(&s);
        tasks.push(tokio::spawn(async move {
            // Every fifth write re-enrolls an existing person: AlreadyExists.
            let p = if i % 5 == 0 {
                person(i % 10)
            } else {
                person(100 + i)
            };
            (i, s.enroll(&p, ev("enroll")).await)
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let (i, r) = t.await.unwrap();
        if i % 5 == 0 {
            assert_already_exists(r, "duplicate in a concurrent group");
        } else {
            r.unwrap();
            ok += 1;
        }
    }
    assert_eq!(ok, 80);
    assert_eq!(s.people().await.unwrap().len(), 90);
    let entries = all_entries(&*s).await;
    assert_eq!(entries.len(), base + 80, "failed writes appended nothing");
    let mut v = Verifier::default();
    for e in &entries {
        v.entry(e);
    }
    assert!(v.finish().problems.is_empty());
}

/// Many decisions at once (PostgreSQL writes runs of them with set-based
/// statements) give the outcomes one-by-one writes would: a second decision
/// on a request conflicts, a nonce used by two calls is a replay for exactly
/// one, an unknown request is not found, approving both of a person's
/// requests for one attribute leaves one grant, interleaved writes land, and
/// the chain has one entry per accepted write. A note PostgreSQL cannot
/// store (a NUL byte) may fail, but alone, not with the rest of its batch.
async fn concurrent_decisions_decide_each_request_once(h: Arc<Harness>) {
    let s = h.store();
    s.create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap();
    let mut reqs = Vec::new();
    for n in 0..40u8 {
        s.enroll(&person(n), ev("enroll")).await.unwrap();
        for why in ["nights", "weekends"] {
            let r = s
                .create_request(&[n; 32], DOCTOR, why, 100, ev("request"))
                .await
                .unwrap();
            reqs.push((n, r.id));
        }
    }
    let base = all_entries(&*s).await.len();
    let nonce = |k: usize| NonceUse {
        space: [0xad; 32],
        nonce: u32::try_from(k).unwrap().to_be_bytes().to_vec(),
        seen_at: 1_000,
        prune_before: 400,
    };
    let decide = |id: i64, approve: bool, note: &'static str, k: usize| {
        let s = Arc::clone(&s);
        tokio::spawn(async move {
            s.decide_request(
                id,
                approve,
                "admin",
                note,
                200,
                ev("decide"),
                Some(nonce(k)),
            )
            .await
        })
    };
    // (k, first decision, the extra call made for some k)
    let mut calls = Vec::new();
    let mut enrolls = Vec::new();
    for (k, &(n, id)) in reqs.iter().enumerate() {
        let approve = n % 2 == 0;
        let note = if k == 7 { "bad\0note" } else { "ok" };
        let first = decide(id, approve, note, k);
        let extra = match k % 10 {
            // The same request again with its own nonce.
            3 => Some(decide(id, !approve, "", 1000 + k)),
            // An unknown request, reusing nonce k.
            5 => Some(decide(id + 100_000, true, "", k)),
            _ => None,
        };
        if k % 10 == 9 {
            let s = Arc::clone(&s);
            let p = person(100 + u8::try_from(k / 10).unwrap());
            enrolls.push(tokio::spawn(
                async move { s.enroll(&p, ev("enroll")).await },
            ));
        }
        calls.push((k, id, first, extra));
    }
    let mut accepted = 0;
    let mut decided = std::collections::HashMap::new();
    for (k, id, first, extra) in calls {
        let first = first.await.unwrap();
        let extra = match extra {
            Some(t) => Some(t.await.unwrap()),
            None => None,
        };
        match (k % 10, &first, &extra) {
            (3, _, Some(again)) => {
                let oks = [&first, again].iter().filter(|r| r.is_ok()).count();
                assert_eq!(oks, 1, "request {id}: {first:?} / {again:?}");
                let refused = if first.is_ok() { again } else { &first };
                assert!(
                    matches!(refused, Err(StoreError::Conflict(_))),
                    "request {id}: {refused:?}"
                );
            }
            (5, Ok(_), Some(Err(StoreError::Replay))) => {}
            (5, Err(StoreError::Replay), Some(Err(StoreError::NotFound(_)))) => {}
            (5, _, Some(other)) => panic!("nonce reused: {first:?} / {other:?}"),
            _ if k == 7 => assert!(
                matches!(first, Ok(_) | Err(StoreError::Backend(_))),
                "{first:?}"
            ),
            _ => assert!(first.is_ok(), "request {id}: {first:?}"),
        }
        for rec in [Some(first), extra].into_iter().flatten().flatten() {
            assert_eq!(rec.id, id);
            accepted += 1;
            decided.insert(id, rec.state);
        }
    }
    for e in enrolls {
        e.await.unwrap().unwrap();
        accepted += 1;
    }

    // What is stored agrees with the answers.
    let mut holders_expected = std::collections::BTreeSet::new();
    for r in s.requests(None).await.unwrap() {
        let want = decided.get(&r.id).copied().unwrap_or(RequestState::Pending);
        assert_eq!(r.state, want, "request {}", r.id);
        if r.state == RequestState::Approved {
            holders_expected.insert(r.gid);
        }
    }
    let holders: std::collections::BTreeSet<[u8; 32]> = s
        .holders(DOCTOR)
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.gid)
        .collect();
    assert_eq!(holders, holders_expected);
    assert!(holders.len() >= 15, "most even people were approved");
    let entries = all_entries(&*s).await;
    assert_eq!(
        entries.len(),
        base + accepted,
        "one entry per accepted write"
    );
    let mut v = Verifier::default();
    for e in &entries {
        v.entry(e);
    }
    assert!(v.finish().problems.is_empty());
}

/// A rotation ends the grants that caused it in the same transaction: all of
/// them with the new version, or (if one is not active) none and no version.
/// `expired_grants` lists active grants past their expiry, oldest first.
async fn rotation_ends_its_grants_atomically(h: Arc<Harness>) {
    let s = h.store();
    s.create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap();
    for n in 1..=3u8 {
        s.enroll(&person(n), ev("enroll")).await.unwrap();
    }
    s.grant(&grant_of([1; 32], DOCTOR, Some(50)), ev("grant"))
        .await
        .unwrap();
    s.grant(&grant_of([2; 32], DOCTOR, Some(40)), ev("grant"))
        .await
        .unwrap();
    s.grant(&grant_of([3; 32], DOCTOR, Some(500)), ev("grant"))
        .await
        .unwrap();
    let expired: Vec<[u8; 32]> = s
        .expired_grants(100)
        .await
        .unwrap()
        .iter()
        .map(|g| g.gid)
        .collect();
    assert_eq!(expired, vec![[2; 32], [1; 32]], "oldest expiry first");
    let with = |gids: &[[u8; 32]]| NewRotation {
        revoke: gids.iter().map(|g| (*g, ev("revoke"))).collect(),
        ..rot()
    };
    // One GID holds no grant of DOCTOR ([9; 32]): nothing happens at all.
    let before = all_entries(&*s).await.len();
    assert_not_found(
        s.rotate_attribute(&attr(DOCTOR, 2), &with(&[[2; 32], [9; 32]]), ev("rotate"))
            .await,
        "rotation revoking a grant that does not exist",
    );
    assert_eq!(all_entries(&*s).await.len(), before);
    assert_eq!(s.holders(DOCTOR).await.unwrap().len(), 3);
    assert_eq!(s.attribute_versions(DOCTOR).await.unwrap().len(), 1);
    assert!(s.rotations(true).await.unwrap().is_empty());
    // Both expired grants end with one rotation.
    let job = s
        .rotate_attribute(&attr(DOCTOR, 2), &with(&expired), ev("rotate"))
        .await
        .unwrap();
    assert_eq!((job.from_version, job.to_version), (1, 2));
    let holders: Vec<[u8; 32]> = s
        .holders(DOCTOR)
        .await
        .unwrap()
        .iter()
        .map(|g| g.gid)
        .collect();
    assert_eq!(holders, vec![[3; 32]]);
    assert!(s.expired_grants(100).await.unwrap().is_empty());
    let entries = all_entries(&*s).await;
    let kinds: Vec<&str> = entries[before..]
        .iter()
        .map(|e| e.event.kind.as_str())
        .collect();
    assert_eq!(kinds, vec!["revoke", "revoke", "rotate"]);
    assert_chain(&entries, entries.len());
}

/// A decision can carry the admin call's nonce: spent in the same
/// transaction, refused as `Replay` the second time, and still spent when the
/// decision itself is refused (so a replay of a refused call stays refused).
async fn decision_spends_its_nonce_in_the_same_transaction(h: Arc<Harness>) {
    let s = h.store();
    s.create_attribute(&attr(DOCTOR, 1), ev("create-attribute"))
        .await
        .unwrap();
    s.enroll(&person(1), ev("enroll")).await.unwrap();
    let r = s
        .create_request(&[1; 32], DOCTOR, "nights", 100, ev("request"))
        .await
        .unwrap();
    let n = |b: u8| NonceUse {
        space: [0xad; 32],
        nonce: vec![b; 16],
        seen_at: 1_000,
        prune_before: 400,
    };
    // Refused decision (no such request): the nonce is spent anyway.
    assert_not_found(
        s.decide_request(r.id + 50, true, "admin", "", 200, ev("approve"), Some(n(1)))
            .await,
        "decide a missing request",
    );
    assert!(
        !s.use_nonce(&[0xad; 32], &[1; 16], 1_000, 400)
            .await
            .unwrap()
    );
    let before = all_entries(&*s).await.len();
    // A replayed nonce decides nothing.
    assert!(matches!(
        s.decide_request(r.id, true, "admin", "", 200, ev("approve"), Some(n(1)))
            .await,
        Err(StoreError::Replay)
    ));
    assert_eq!(all_entries(&*s).await.len(), before);
    assert_eq!(
        s.requests(Some(RequestState::Pending)).await.unwrap().len(),
        1
    );
    // A fresh nonce: decided, and the nonce is now spent.
    let d = s
        .decide_request(r.id, true, "admin", "", 200, ev("approve"), Some(n(2)))
        .await
        .unwrap();
    assert_eq!(d.state, RequestState::Approved);
    assert!(
        !s.use_nonce(&[0xad; 32], &[2; 16], 1_000, 400)
            .await
            .unwrap()
    );
    assert_eq!(s.holders(DOCTOR).await.unwrap().len(), 1);
}

/// No caller can make an audit entry large: the store cuts every field to
/// its limit (with a marker) before hashing, so the chain still verifies and
/// the returned entry is the stored one.
async fn audit_entries_are_bounded(h: Arc<Harness>) {
    let s = h.store();
    let huge = AuditEvent {
        actor: "a".repeat(100_000),
        subject: Some("s".repeat(5_000)),
        attribute: Some("x@y".repeat(1_000)),
        detail: "é".repeat(2 << 20), // 4 MiB
        ..ev("refusal")
    };
    let stored = s.append_audit(huge.clone()).await.unwrap();
    let e = &stored.event;
    assert!(
        e.detail.len() <= MAX_AUDIT_DETAIL_BYTES,
        "{}",
        e.detail.len()
    );
    assert!(e.detail.ends_with("...[truncated, 4194304 bytes]"));
    assert!(e.actor.len() <= MAX_AUDIT_FIELD_BYTES);
    assert!(e.actor.ends_with("...[truncated, 100000 bytes]"));
    assert!(e.subject.as_deref().unwrap().len() <= MAX_AUDIT_FIELD_BYTES);
    assert!(e.attribute.as_deref().unwrap().len() <= MAX_AUDIT_FIELD_BYTES);
    assert_eq!((e.kind.as_str(), e.ts), ("refusal", huge.ts));
    // A small event is stored as given.
    let small = s.append_audit(ev("issue")).await.unwrap();
    assert_eq!(small.event, ev("issue"));
    let entries = all_entries(&*s).await;
    assert_eq!(entries, vec![stored, small]);
    assert_chain(&entries, 2);
}

/// Attribute versions and requests are listed in pages (keyset paging: a
/// page starts after the last item of the one before), with filters.
async fn attributes_and_requests_come_in_pages(h: Arc<Harness>) {
    let s = h.store();
    for a in [NURSE, DOCTOR, "admin@hospital-a"] {
        s.create_attribute(&attr(a, 1), ev("create-attribute"))
            .await
            .unwrap();
    }
    s.rotate_attribute(&attr(DOCTOR, 2), &rot(), ev("rotate"))
        .await
        .unwrap();
    let key = |r: &AttributeRecord| (r.attribute.clone(), r.version);
    let all: Vec<(String, u32)> = s.attributes().await.unwrap().iter().map(key).collect();
    assert_eq!(all.len(), 4);
    let mut paged = Vec::new();
    let mut after: Option<(String, u32)> = None;
    loop {
        let page = s
            .attributes_page(after.as_ref().map(|(a, v)| (a.as_str(), *v)), 3)
            .await
            .unwrap();
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some(key(last));
        paged.extend(page.iter().map(key));
    }
    assert_eq!(paged, all, "pages are the whole listing, in order");
    assert_eq!(
        s.attributes_page(Some((DOCTOR, 1)), 1).await.unwrap()[0].version,
        2
    );
    assert!(s.attributes_page(None, 0).await.unwrap().is_empty());
    let rotations = s.attribute_rotations(DOCTOR).await.unwrap();
    assert_eq!(
        rotations
            .iter()
            .map(|r| (r.from_version, r.to_version))
            .collect::<Vec<_>>(),
        vec![(1, 2)]
    );
    assert!(s.attribute_rotations(NURSE).await.unwrap().is_empty());

    for n in 1..=3 {
        s.enroll(&person(n), ev("enroll")).await.unwrap();
    }
    let mut ids = Vec::new();
    for (n, a) in [
        (1, DOCTOR),
        (2, NURSE),
        (3, DOCTOR),
        (1, NURSE),
        (2, DOCTOR),
    ] {
        let r = s
            .create_request(&[n; 32], a, "work", 100, ev("request"))
            .await
            .unwrap();
        ids.push(r.id);
    }
    s.decide_request(ids[0], true, "admin", "", 200, ev("approve"), None)
        .await
        .unwrap();
    let all = RequestFilter::default();
    let pending = RequestFilter {
        state: Some(RequestState::Pending),
        attribute: None,
    };
    let pending_doctor = RequestFilter {
        state: Some(RequestState::Pending),
        attribute: Some(DOCTOR.to_owned()),
    };
    let page_ids = |p: Vec<mabe_authority::store::RequestRecord>| -> Vec<i64> {
        p.iter().map(|r| r.id).collect()
    };
    assert_eq!(
        page_ids(s.requests_page(&all, 0, 2).await.unwrap()),
        ids[..2]
    );
    assert_eq!(
        page_ids(s.requests_page(&all, ids[1], 2).await.unwrap()),
        ids[2..4]
    );
    assert_eq!(
        page_ids(s.requests_page(&all, ids[3], 2).await.unwrap()),
        ids[4..]
    );
    assert!(s.requests_page(&all, ids[4], 2).await.unwrap().is_empty());
    assert!(s.requests_page(&all, 0, 0).await.unwrap().is_empty());
    assert_eq!(
        page_ids(s.requests_page(&pending, 0, 10).await.unwrap()),
        ids[1..]
    );
    assert_eq!(
        page_ids(s.requests_page(&pending_doctor, 0, 10).await.unwrap()),
        vec![ids[2], ids[4]]
    );
    assert_eq!(
        page_ids(s.requests_page(&pending_doctor, ids[2], 10).await.unwrap()),
        vec![ids[4]]
    );
    assert_eq!(s.count_requests(&all).await.unwrap(), 5);
    assert_eq!(s.count_requests(&pending).await.unwrap(), 4);
    assert_eq!(s.count_requests(&pending_doctor).await.unwrap(), 2);
    assert_eq!(
        s.count_requests(&RequestFilter {
            state: Some(RequestState::Denied),
            attribute: None
        })
        .await
        .unwrap(),
        0
    );
}
