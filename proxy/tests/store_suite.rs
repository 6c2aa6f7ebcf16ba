//! The shared store test suite: every test runs against SQLite (a temporary
//! file) and PostgreSQL (a fresh database per test on the server named by
//! `MABE_TEST_DATABASE_URL`, as `scripts/with-postgres` exports it).
//!
//! Without `MABE_TEST_DATABASE_URL` the tests start their own throwaway
//! server through `scripts/with-postgres`, and fail if they cannot: none is
//! skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{World, attr};
use mabe_abe::{Header, Snapshot, UpdateToken, Version};
use mabe_proxy::ProxyError;
use mabe_proxy::store::postgres::PgStore;
use mabe_proxy::store::sqlite::SqliteStore;
use mabe_proxy::store::{
    GroupOutcome, NewRecord, RecordId, Store, TokenGroup, TrustedAuthority, header_rows,
    snapshot_root,
};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

enum Kind {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        admin_url: String,
        url: String,
        name: String,
    },
}

struct Harness {
    kind: Kind,
    store: Mutex<Option<Arc<dyn Store>>>,
}

static NEXT_DB: AtomicU64 = AtomicU64::new(0);

/// `url` with its database name replaced by `name` (URL or key=value form).
fn with_dbname(url: &str, name: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (base, query) = match url.find('?') {
            Some(q) => (&url[..q], &url[q..]),
            None => (url, ""),
        };
        let start = scheme_end + 3;
        let host_part = match base[start..].find('/') {
            Some(slash) => &base[..start + slash],
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
        let path = dir.path().join("proxy.db");
        let store = SqliteStore::open(&path).unwrap();
        Harness {
            kind: Kind::Sqlite { _dir: dir, path },
            store: Mutex::new(Some(Arc::new(store))),
        }
    }

    async fn postgres() -> Harness {
        let admin_url = common::test_database_url();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!(
            "mabe_proxy_test_{}_{}_{nanos}",
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

    fn store(&self) -> Arc<dyn Store> {
        self.store.lock().unwrap().clone().expect("store is closed")
    }

    async fn open_again(&self) -> Result<Arc<dyn Store>, ProxyError> {
        Ok(match &self.kind {
            Kind::Sqlite { path, .. } => Arc::new(SqliteStore::open(path)?),
            Kind::Postgres { url, .. } => Arc::new(PgStore::connect(url).await?),
        })
    }

    async fn reopen(&self) -> Arc<dyn Store> {
        self.store.lock().unwrap().take();
        let store = self.open_again().await.unwrap();
        *self.store.lock().unwrap() = Some(store.clone());
        store
    }

    /// Same SQL in both dialects, behind the store's back.
    async fn exec(&self, sql: &str) {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(std::time::Duration::from_secs(5))
                    .unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Kind::Postgres { url, .. } => {
                pg_client(url)
                    .await
                    .batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
            }
        }
    }

    /// Take, behind the store's back, a lock that makes the store's next
    /// write wait: SQLite's write lock (`BEGIN IMMEDIATE` on another
    /// connection), or an exclusive lock on PostgreSQL's `blobs` table.
    async fn hold_write_lock(&self) -> Held {
        match &self.kind {
            Kind::Sqlite { path, .. } => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                Held::Sqlite(conn)
            }
            Kind::Postgres { url, .. } => {
                let client = pg_client(url).await;
                client
                    .batch_execute("BEGIN; LOCK TABLE blobs IN EXCLUSIVE MODE")
                    .await
                    .unwrap();
                Held::Postgres(client)
            }
        }
    }

    /// PostgreSQL: hold an exclusive lock on `snapshot_rows`, so that a
    /// freeze stops just before it copies its snapshot rows (after every
    /// earlier statement of its transaction). `None` on SQLite, whose freeze
    /// is one write transaction nothing else can enter.
    async fn pause_snapshot_copies(&self) -> Option<Held> {
        match &self.kind {
            Kind::Sqlite { .. } => None,
            Kind::Postgres { url, .. } => {
                let client = pg_client(url).await;
                client
                    .batch_execute("BEGIN; LOCK TABLE snapshot_rows IN EXCLUSIVE MODE")
                    .await
                    .unwrap();
                Some(Held::Postgres(client))
            }
        }
    }

    /// PostgreSQL: wait until a session waits for a lock on `table`.
    /// SQLite: wait 200 ms (its lock waits are not observable).
    async fn wait_for_lock_waiter(&self, table: &str) {
        let Kind::Postgres { url, .. } = &self.kind else {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            return;
        };
        let client = pg_client(url).await;
        for _ in 0..500 {
            let row = client
                .query_one(
                    "SELECT COUNT(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                     WHERE c.relname = $1 AND NOT l.granted",
                    &[&table],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) > 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("nobody waited for a lock on {table} within 10 s");
    }

    async fn cleanup(&self) {
        self.store.lock().unwrap().take();
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

/// A lock held by [`Harness::hold_write_lock`] or
/// [`Harness::pause_snapshot_copies`] until [`Held::release`].
enum Held {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

impl Held {
    async fn release(self) {
        match self {
            Held::Sqlite(conn) => conn.execute_batch("ROLLBACK").unwrap(),
            Held::Postgres(client) => client.batch_execute("ROLLBACK").await.unwrap(),
        }
    }
}

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

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Harness::sqlite().await, super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Harness::postgres().await, super::$name).await;
                }
            )*
        }
    };
}

suite!(
    trust_list_pins_one_key_per_authority,
    nonces_detect_replays_per_authority,
    uploads_are_invisible_until_committed,
    commit_checks_size_and_duplicates,
    abandoned_uploads_are_purged,
    list_pages_and_delete,
    freeze_snapshot_matches_the_headers_and_is_idempotent,
    uploads_at_frozen_or_older_versions_are_refused,
    freeze_waits_for_the_previous_rotation,
    tokens_update_all_rows_of_a_record_once,
    tokens_outside_the_snapshot_are_refused,
    snapshot_and_pending_pages,
    concurrent_uploads_and_freeze_agree,
    reopen_keeps_everything,
    newer_schema_is_refused,
    read_record_returns_the_first_chunk_with_the_record,
    reads_proceed_while_a_write_waits,
    many_concurrent_reads,
    concurrent_reads_answer_each_caller_its_own_record,
    freeze_root_matches_its_rows_when_a_delete_races,
    one_batch_mixes_every_outcome,
);

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

const NOW: i64 = 1_700_000_000;

/// Store a real record through the upload path (payload in chunks of `chunk`).
async fn put(store: &dyn Store, header: &Header, payload: &[u8], chunk: usize) -> RecordId {
    let blob = store.begin_upload(NOW).await.unwrap();
    for (i, c) in payload.chunks(chunk.max(1)).enumerate() {
        store
            .put_chunk(blob, i as i64, c.to_vec(), NOW)
            .await
            .unwrap();
    }
    let rec = NewRecord::from_header(
        header,
        header.to_bytes(),
        payload.len() as u64,
        Sha256::digest(payload).into(),
        NOW,
    );
    store.commit_upload(blob, &rec).await.unwrap();
    rec.record_id
}

/// Try to store a record; the commit's result.
async fn try_put(store: &dyn Store, header: &Header) -> Result<(), ProxyError> {
    let blob = store.begin_upload(NOW).await.unwrap();
    store.put_chunk(blob, 0, b"x".to_vec(), NOW).await.unwrap();
    let rec = NewRecord::from_header(
        header,
        header.to_bytes(),
        1,
        Sha256::digest(b"x").into(),
        NOW,
    );
    let r = store.commit_upload(blob, &rec).await;
    if r.is_err() {
        store.abort_upload(blob).await.unwrap();
    }
    r
}

async fn read_payload(store: &dyn Store, rid: &RecordId) -> Vec<u8> {
    let rec = store.record(rid).await.unwrap().unwrap();
    let mut out = Vec::new();
    for seq in 0..rec.chunks {
        out.extend(store.chunk(rec.blob_id, seq).await.unwrap().unwrap());
    }
    out
}

fn group(tokens: &[UpdateToken]) -> TokenGroup {
    let t = &tokens[0];
    TokenGroup {
        record_id: *t.record().as_bytes(),
        attribute: t.attribute().to_string(),
        from_version: t.from_version().get(),
        tokens: tokens.to_vec(),
    }
}

fn rows_of(snapshot: &[mabe_proxy::store::SnapRow]) -> Vec<mabe_abe::SnapshotRow> {
    snapshot
        .iter()
        .map(|r| mabe_abe::SnapshotRow {
            record: mabe_abe::RecordId::from_bytes(r.record_id),
            row: r.row,
            c2: mabe_abe::wire::decode_g1(&r.c2, "C2").unwrap(),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

async fn trust_list_pins_one_key_per_authority(h: Arc<Harness>) {
    let s = h.store();
    let a = TrustedAuthority {
        authority_id: "hospital-a".into(),
        identity_key: [1; 32],
        added_at: NOW,
    };
    assert!(s.add_trusted(&a).await.unwrap());
    assert!(
        !s.add_trusted(&a).await.unwrap(),
        "same key again is a no-op"
    );
    let other = TrustedAuthority {
        identity_key: [2; 32],
        ..a.clone()
    };
    assert!(matches!(
        s.add_trusted(&other).await,
        Err(ProxyError::AlreadyExists(_))
    ));
    assert_eq!(s.trusted_key("hospital-a").await.unwrap(), Some([1; 32]));
    assert_eq!(s.trusted_key("hospital-b").await.unwrap(), None);
    assert_eq!(s.trusted().await.unwrap(), vec![a]);
    assert!(s.remove_trusted("hospital-a").await.unwrap());
    assert!(!s.remove_trusted("hospital-a").await.unwrap());
    assert!(s.trusted().await.unwrap().is_empty());
}

async fn nonces_detect_replays_per_authority(h: Arc<Harness>) {
    let s = h.store();
    assert!(
        s.use_nonce("hospital-a", &[7; 16], NOW, NOW - 600)
            .await
            .unwrap()
    );
    assert!(
        !s.use_nonce("hospital-a", &[7; 16], NOW + 1, NOW - 600)
            .await
            .unwrap()
    );
    assert!(
        s.use_nonce("hospital-b", &[7; 16], NOW, NOW - 600)
            .await
            .unwrap()
    );
    // Pruned once older than the window, by any later call.
    assert!(
        s.use_nonce("hospital-a", &[8; 16], NOW + 1000, NOW + 500)
            .await
            .unwrap()
    );
    assert!(
        s.use_nonce("hospital-a", &[7; 16], NOW + 1000, NOW + 500)
            .await
            .unwrap()
    );
}

async fn uploads_are_invisible_until_committed(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["doctor@hospital-a"], 1);
    let (header, ct) = w.encrypt("doctor@hospital-a", &[9u8; 5000]);
    let rid = *header.rid().as_bytes();
    let blob = s.begin_upload(NOW).await.unwrap();
    s.put_chunk(blob, 0, ct[..3000].to_vec(), NOW)
        .await
        .unwrap();
    s.put_chunk(blob, 1, ct[3000..].to_vec(), NOW)
        .await
        .unwrap();
    assert!(s.record(&rid).await.unwrap().is_none());
    assert!(
        s.chunk(blob, 0).await.unwrap().is_none(),
        "uncommitted chunks are not readable"
    );
    assert!(s.list_records(None, 10).await.unwrap().is_empty());
    let rec = NewRecord::from_header(
        &header,
        header.to_bytes(),
        ct.len() as u64,
        Sha256::digest(&ct).into(),
        NOW,
    );
    s.commit_upload(blob, &rec).await.unwrap();
    let stored = s.record(&rid).await.unwrap().unwrap();
    assert_eq!(stored.header, header.to_bytes());
    assert_eq!(stored.payload_size, ct.len() as u64);
    assert_eq!(stored.chunks, 2);
    assert_eq!(read_payload(&*s, &rid).await, ct);
    // A committed blob takes no more chunks and cannot be aborted.
    assert!(s.put_chunk(blob, 2, vec![1], NOW).await.is_err());
    s.abort_upload(blob).await.unwrap();
    assert_eq!(read_payload(&*s, &rid).await, ct);
    // An empty payload is a record too.
    let (h0, _) = w.encrypt("doctor@hospital-a", b"");
    let r0 = put(&*s, &h0, b"", 10).await;
    assert_eq!(s.record(&r0).await.unwrap().unwrap().chunks, 0);
    assert_eq!(read_payload(&*s, &r0).await, b"");
}

async fn commit_checks_size_and_duplicates(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["doctor@hospital-a"], 2);
    let (header, ct) = w.encrypt("doctor@hospital-a", b"payload");
    // Claimed size differs from the stored chunks.
    let blob = s.begin_upload(NOW).await.unwrap();
    s.put_chunk(blob, 0, ct.clone(), NOW).await.unwrap();
    let mut rec = NewRecord::from_header(
        &header,
        header.to_bytes(),
        ct.len() as u64 + 1,
        [0; 32],
        NOW,
    );
    assert!(matches!(
        s.commit_upload(blob, &rec).await,
        Err(ProxyError::InvalidArgument(_))
    ));
    assert!(s.record(header.rid().as_bytes()).await.unwrap().is_none());
    rec.payload_size = ct.len() as u64;
    s.commit_upload(blob, &rec).await.unwrap();
    // A second record with the same id is refused, the first is unchanged.
    let blob2 = s.begin_upload(NOW).await.unwrap();
    s.put_chunk(blob2, 0, b"other".to_vec(), NOW).await.unwrap();
    let rec2 = NewRecord {
        payload_size: 5,
        ..rec.clone()
    };
    assert!(matches!(
        s.commit_upload(blob2, &rec2).await,
        Err(ProxyError::AlreadyExists(_))
    ));
    assert_eq!(read_payload(&*s, header.rid().as_bytes()).await, ct);
    // The refused upload's blob is still uncommitted: it can be aborted.
    s.abort_upload(blob2).await.unwrap();
    assert_eq!(s.purge_abandoned_uploads(i64::MAX).await.unwrap(), 0);
}

async fn abandoned_uploads_are_purged(h: Arc<Harness>) {
    let s = h.store();
    let old = s.begin_upload(NOW).await.unwrap();
    s.put_chunk(old, 0, vec![1; 100], NOW).await.unwrap();
    let fresh = s.begin_upload(NOW).await.unwrap();
    s.put_chunk(fresh, 0, vec![1; 100], NOW + 100)
        .await
        .unwrap();
    assert_eq!(s.purge_abandoned_uploads(NOW + 50).await.unwrap(), 1);
    assert!(
        s.put_chunk(old, 1, vec![1], NOW + 101).await.is_err(),
        "purged"
    );
    s.put_chunk(fresh, 1, vec![1], NOW + 101).await.unwrap();
}

async fn list_pages_and_delete(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["doctor@hospital-a", "nurse@hospital-b"], 3);
    let mut ids = BTreeSet::new();
    for i in 0..7u8 {
        let (header, ct) = w.encrypt("doctor@hospital-a OR nurse@hospital-b", &[i; 100]);
        ids.insert(put(&*s, &header, &ct, 64).await);
    }
    let mut seen = Vec::new();
    let mut after: Option<RecordId> = None;
    loop {
        let page = s.list_records(after.as_ref(), 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        for r in &page {
            assert_eq!(
                r.rows,
                vec![
                    ("doctor@hospital-a".to_owned(), 1),
                    ("nurse@hospital-b".to_owned(), 1)
                ]
            );
            assert_eq!(r.payload_size, 100 + 16);
        }
        after = page.last().map(|r| r.record_id);
        seen.extend(page.into_iter().map(|r| r.record_id));
    }
    assert_eq!(
        seen,
        ids.iter().copied().collect::<Vec<_>>(),
        "every record once, in id order"
    );
    let victim = *ids.iter().next().unwrap();
    let blob = s.record(&victim).await.unwrap().unwrap().blob_id;
    assert!(s.delete_record(&victim).await.unwrap());
    assert!(!s.delete_record(&victim).await.unwrap());
    assert!(s.record(&victim).await.unwrap().is_none());
    assert!(
        s.chunk(blob, 0).await.unwrap().is_none(),
        "payload deleted too"
    );
    assert_eq!(s.list_records(None, 100).await.unwrap().len(), 6);
}

async fn freeze_snapshot_matches_the_headers_and_is_idempotent(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(
        &[
            "cardiology@hospital-a",
            "doctor@hospital-a",
            "nurse@hospital-b",
        ],
        4,
    );
    let mut headers = Vec::new();
    for policy in [
        "cardiology@hospital-a",
        "doctor@hospital-a AND cardiology@hospital-a",
        "nurse@hospital-b",
        "(cardiology@hospital-a AND doctor@hospital-a) OR (cardiology@hospital-a AND nurse@hospital-b)",
    ] {
        let (header, ct) = w.encrypt(policy, b"x");
        put(&*s, &header, &ct, 1000).await;
        headers.push(header);
    }
    let a = attr("cardiology@hospital-a");
    let mut expected = Snapshot::new(a.clone(), Version::FIRST);
    for h in &headers {
        for r in h.snapshot_rows(&a, Version::FIRST) {
            expected.insert(r).unwrap();
        }
    }
    assert_eq!(expected.len(), 4, "1 + 1 + 0 + 2 rows, two in one record");
    let f = s
        .freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    assert_eq!(f.rows, 4);
    assert_eq!(
        f.merkle_root,
        expected.merkle_root(),
        "the proxy's root is the scheme's"
    );
    let rows = s
        .snapshot_page("cardiology@hospital-a", 1, None, 100)
        .await
        .unwrap();
    assert_eq!(rows_of(&rows), expected.rows().collect::<Vec<_>>());
    assert_eq!(
        snapshot_root("cardiology@hospital-a", 1, &rows),
        f.merkle_root
    );
    // Idempotent: the same snapshot, even after more records arrive at v2.
    let mut later = World::new(&["cardiology@hospital-a"], 40);
    later.rotate("cardiology@hospital-a");
    let (h2, ct2) = later.encrypt("cardiology@hospital-a", b"new");
    put(&*s, &h2, &ct2, 10).await;
    let again = s
        .freeze("cardiology@hospital-a", 1, "hospital-a", NOW + 99)
        .await
        .unwrap();
    assert_eq!(again, f);
    assert_eq!(
        s.snapshot_page("cardiology@hospital-a", 1, None, 100)
            .await
            .unwrap(),
        rows
    );
    assert_eq!(
        s.freeze_info("cardiology@hospital-a", 1).await.unwrap(),
        Some(f.clone())
    );
    assert_eq!(
        s.freeze_info("cardiology@hospital-a", 2).await.unwrap(),
        None
    );
    // An empty snapshot has the scheme's empty root.
    let e = s
        .freeze("doctor@hospital-a", 7, "hospital-a", NOW)
        .await
        .unwrap();
    assert_eq!(e.rows, 0);
    assert_eq!(
        e.merkle_root,
        Snapshot::new(attr("doctor@hospital-a"), Version::new(7)).merkle_root()
    );
    let progress = s.freezes().await.unwrap();
    assert_eq!(progress.len(), 2);
    assert_eq!(progress[0].freeze, f);
    assert_eq!(progress[0].pending, 4);
}

async fn uploads_at_frozen_or_older_versions_are_refused(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["cardiology@hospital-a", "nurse@hospital-b"], 5);
    let (v1_before, ct) = w.encrypt("cardiology@hospital-a", b"x");
    put(&*s, &v1_before, &ct, 10).await;
    s.freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    // A writer with a stale directory still encrypts at v1: refused.
    let (v1_after, _) = w.encrypt("cardiology@hospital-a OR nurse@hospital-b", b"y");
    assert!(matches!(
        try_put(&*s, &v1_after).await,
        Err(ProxyError::FailedPrecondition(_))
    ));
    assert!(s.record(v1_after.rid().as_bytes()).await.unwrap().is_none());
    // Rows of other attributes are unaffected; v2 is accepted.
    let (other, _) = w.encrypt("nurse@hospital-b", b"z");
    try_put(&*s, &other).await.unwrap();
    w.rotate("cardiology@hospital-a");
    let (v2, _) = w.encrypt("cardiology@hospital-a", b"w");
    try_put(&*s, &v2).await.unwrap();
    // Freezing v2 (after v1 is done, see below) makes v1 and v2 both refused:
    // here v1 still has a row pending, so v2 cannot be frozen yet.
    assert!(matches!(
        s.freeze("cardiology@hospital-a", 2, "hospital-a", NOW)
            .await,
        Err(ProxyError::FailedPrecondition(_))
    ));
    // Freezing a later version directly (v5) refuses everything up to it.
    let mut w5 = World::new(&["nurse@hospital-b"], 50);
    s.freeze("nurse@hospital-b", 5, "hospital-b", NOW)
        .await
        .unwrap();
    let (n1, _) = w5.encrypt("nurse@hospital-b", b"q");
    assert!(matches!(
        try_put(&*s, &n1).await,
        Err(ProxyError::FailedPrecondition(_))
    ));
}

async fn freeze_waits_for_the_previous_rotation(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["cardiology@hospital-a"], 6);
    let (header, ct) = w.encrypt("cardiology@hospital-a", b"x");
    let rid = put(&*s, &header, &ct, 10).await;
    s.freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    let us = w.rotate("cardiology@hospital-a");
    assert!(matches!(
        s.freeze("cardiology@hospital-a", 2, "hospital-a", NOW)
            .await,
        Err(ProxyError::FailedPrecondition(_))
    ));
    let rows = rows_of(
        &s.snapshot_page("cardiology@hospital-a", 1, None, 10)
            .await
            .unwrap(),
    );
    let (_, tokens) = w.tokens(&us, &rows);
    assert_eq!(
        s.apply_tokens(&[group(&tokens)]).await.unwrap(),
        vec![GroupOutcome::Applied]
    );
    assert_eq!(
        s.pending_count("cardiology@hospital-a", 1).await.unwrap(),
        0
    );
    let f2 = s
        .freeze("cardiology@hospital-a", 2, "hospital-a", NOW)
        .await
        .unwrap();
    assert_eq!(f2.rows, 1, "the updated row is now in the v2 snapshot");
    assert_eq!(
        s.snapshot_page("cardiology@hospital-a", 2, None, 10)
            .await
            .unwrap()[0]
            .record_id,
        rid
    );
}

async fn tokens_update_all_rows_of_a_record_once(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(
        &[
            "cardiology@hospital-a",
            "doctor@hospital-a",
            "nurse@hospital-b",
        ],
        7,
    );
    let policy = "(cardiology@hospital-a AND doctor@hospital-a) OR (cardiology@hospital-a AND nurse@hospital-b)";
    let (header, ct) = w.encrypt(policy, b"two rows of cardiology");
    let rid = put(&*s, &header, &ct, 7).await;
    s.freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    let us = w.rotate("cardiology@hospital-a");
    let rows = rows_of(
        &s.snapshot_page("cardiology@hospital-a", 1, None, 10)
            .await
            .unwrap(),
    );
    assert_eq!(rows.len(), 2);
    let (_, tokens) = w.tokens(&us, &rows);
    // One token of two: refused, nothing changes (both rows or neither).
    let out = s.apply_tokens(&[group(&tokens[..1])]).await.unwrap();
    assert!(matches!(&out[0], GroupOutcome::Refused(_)), "{out:?}");
    assert_eq!(
        s.record(&rid).await.unwrap().unwrap().header,
        header.to_bytes()
    );
    assert_eq!(
        s.pending_count("cardiology@hospital-a", 1).await.unwrap(),
        2
    );
    // Both: applied.
    assert_eq!(
        s.apply_tokens(&[group(&tokens)]).await.unwrap(),
        vec![GroupOutcome::Applied]
    );
    let updated = Header::from_bytes(&s.record(&rid).await.unwrap().unwrap().header).unwrap();
    let versions: Vec<u32> = header_rows(&updated).iter().map(|r| r.version).collect();
    assert_eq!(versions.iter().filter(|v| **v == 2).count(), 2);
    assert_eq!(
        s.pending_count("cardiology@hospital-a", 1).await.unwrap(),
        0
    );
    // Repeats: acknowledged, not re-applied (the header is byte-identical).
    assert_eq!(
        s.apply_tokens(&[group(&tokens)]).await.unwrap(),
        vec![GroupOutcome::AlreadyApplied]
    );
    assert_eq!(
        s.apply_tokens(&[group(&tokens[1..])]).await.unwrap(),
        vec![GroupOutcome::AlreadyApplied]
    );
    assert_eq!(
        s.record(&rid).await.unwrap().unwrap().header,
        updated.to_bytes()
    );
    // The remaining holder, with the v2 key, reads it; the payload never changed.
    let dr = w.person(
        "dr-stays",
        &[
            "doctor@hospital-a",
            "cardiology@hospital-a",
            "nurse@hospital-b",
        ],
    );
    assert_eq!(read_payload(&*s, &rid).await, ct);
    assert_eq!(
        w.decrypt(&updated, &dr, &ct).unwrap(),
        b"two rows of cardiology"
    );
    // A record that does not exist.
    let mut ghost = group(&tokens);
    ghost.record_id = [0xee; 16];
    assert_eq!(
        s.apply_tokens(&[ghost]).await.unwrap(),
        vec![GroupOutcome::NotFound]
    );
}

/// One `apply_tokens` call whose groups end every way at once (PostgreSQL
/// writes a batch of distinct records with set-based statements): applied,
/// already applied, refused (half of a two-row record), not found, and not
/// frozen, each as it would alone; a record named twice in one call is
/// updated once and then acknowledged.
async fn one_batch_mixes_every_outcome(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["cardiology@hospital-a", "doctor@hospital-a"], 9);
    let two_rows = "(cardiology@hospital-a AND doctor@hospital-a) OR cardiology@hospital-a";
    let mut records = Vec::new();
    for (i, policy) in [
        "cardiology@hospital-a",
        "cardiology@hospital-a",
        two_rows,
        two_rows,
    ]
    .iter()
    .enumerate()
    {
        let (header, ct) = w.encrypt(policy, format!("record {i}").as_bytes());
        records.push((put(&*s, &header, &ct, 16).await, header));
    }
    s.freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    let us = w.rotate("cardiology@hospital-a");
    let rows = rows_of(
        &s.snapshot_page("cardiology@hospital-a", 1, None, 100)
            .await
            .unwrap(),
    );
    assert_eq!(rows.len(), 6);
    let (_, tokens) = w.tokens(&us, &rows);
    let of = |rid: &RecordId| -> Vec<UpdateToken> {
        tokens
            .iter()
            .filter(|t| t.record().as_bytes() == rid)
            .cloned()
            .collect()
    };
    let (r0, r1, r2, r3) = (&records[0].0, &records[1].0, &records[2].0, &records[3].0);
    assert_eq!(
        s.apply_tokens(&[group(&of(r0))]).await.unwrap(),
        vec![GroupOutcome::Applied]
    );
    let mut ghost = group(&of(r1));
    ghost.record_id = [0xee; 16];
    let mut unfrozen = group(&of(r1));
    unfrozen.from_version = 7;
    let out = s
        .apply_tokens(&[
            group(&of(r0)),
            group(&of(r1)),
            group(&of(r2)[..1]),
            ghost,
            unfrozen,
        ])
        .await
        .unwrap();
    assert_eq!(out[0], GroupOutcome::AlreadyApplied);
    assert_eq!(out[1], GroupOutcome::Applied);
    assert!(matches!(&out[2], GroupOutcome::Refused(_)), "{out:?}");
    assert_eq!(out[3], GroupOutcome::NotFound);
    assert!(
        matches!(&out[4], GroupOutcome::Refused(r) if r.contains("not frozen")),
        "{out:?}"
    );
    assert_eq!(
        s.record(r2).await.unwrap().unwrap().header,
        records[2].1.to_bytes(),
        "the refused record is unchanged"
    );
    // The same record twice in one call: updated by the first group only.
    let out = s
        .apply_tokens(&[group(&of(r3)), group(&of(r3)), group(&of(r2))])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            GroupOutcome::Applied,
            GroupOutcome::AlreadyApplied,
            GroupOutcome::Applied
        ]
    );
    assert_eq!(
        s.pending_count("cardiology@hospital-a", 1).await.unwrap(),
        0
    );
    // Every updated record decrypts for a holder of the new keys.
    let dr = w.person("dr-stays", &["cardiology@hospital-a", "doctor@hospital-a"]);
    for (i, (rid, _)) in records.iter().enumerate() {
        let stored = Header::from_bytes(&s.record(rid).await.unwrap().unwrap().header).unwrap();
        let ct = read_payload(&*s, rid).await;
        assert_eq!(
            w.decrypt(&stored, &dr, &ct).unwrap(),
            format!("record {i}").as_bytes()
        );
    }
}

async fn tokens_outside_the_snapshot_are_refused(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["cardiology@hospital-a"], 8);
    let (old, ct) = w.encrypt("cardiology@hospital-a", b"old");
    let rid = put(&*s, &old, &ct, 10).await;
    // Tokens for a version that is not frozen here.
    let us = w.rotate("cardiology@hospital-a");
    let rows_direct = old.snapshot_rows(&attr("cardiology@hospital-a"), Version::FIRST);
    let (_, tokens) = w.tokens(&us, &rows_direct);
    let out = s.apply_tokens(&[group(&tokens)]).await.unwrap();
    assert!(
        matches!(&out[0], GroupOutcome::Refused(r) if r.contains("not frozen")),
        "{out:?}"
    );
    s.freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    // A record stored after the freeze (at v2), with tokens computed as if
    // its row were at v1: its row is not in the snapshot.
    let (new, ct_new) = w.encrypt("cardiology@hospital-a", b"new");
    let new_rid = put(&*s, &new, &ct_new, 10).await;
    let mut mislabelled = mabe_abe::Snapshot::new(attr("cardiology@hospital-a"), Version::FIRST);
    let new_row = new.snapshot_rows(&attr("cardiology@hospital-a"), Version::new(2))[0];
    mislabelled.insert(new_row).unwrap();
    let tg = us.token_generator(mislabelled, &mut w.rng).unwrap();
    let forged = tg.compute(&new_row, &mut w.rng).unwrap();
    let out = s.apply_tokens(&[group(&[forged])]).await.unwrap();
    assert!(
        matches!(&out[0], GroupOutcome::Refused(r) if r.contains("snapshot")),
        "{out:?}"
    );
    assert_eq!(
        s.record(&new_rid).await.unwrap().unwrap().header,
        new.to_bytes()
    );
    // Tokens of a batch: one refused group does not stop the others.
    let out = s
        .apply_tokens(&[
            group(&[tg.compute(&new_row, &mut w.rng).unwrap()]),
            group(&tokens),
        ])
        .await
        .unwrap();
    assert!(matches!(out[0], GroupOutcome::Refused(_)));
    assert_eq!(out[1], GroupOutcome::Applied);
    assert_ne!(
        s.record(&rid).await.unwrap().unwrap().header,
        old.to_bytes()
    );
}

async fn snapshot_and_pending_pages(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["cardiology@hospital-a"], 9);
    let mut headers = Vec::new();
    for i in 0..5u8 {
        let (header, ct) = w.encrypt("cardiology@hospital-a OR cardiology@hospital-a", &[i]);
        put(&*s, &header, &ct, 10).await;
        headers.push(header);
    }
    let f = s
        .freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    assert_eq!(f.rows, 10);
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = s
            .snapshot_page("cardiology@hospital-a", 1, after, 3)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.record_id, last.row));
        all.extend(page);
    }
    assert_eq!(all.len(), 10);
    assert!(all.windows(2).all(|p| p[0] < p[1]), "ordered, no repeats");
    let us = w.rotate("cardiology@hospital-a");
    let (_, tokens) = w.tokens(&us, &rows_of(&all));
    // Update the records of the first two.
    s.apply_tokens(&[group(&tokens[0..2]), group(&tokens[2..4])])
        .await
        .unwrap();
    assert_eq!(
        s.pending_count("cardiology@hospital-a", 1).await.unwrap(),
        6
    );
    let pending = s
        .pending_page("cardiology@hospital-a", 1, None, 100)
        .await
        .unwrap();
    assert_eq!(pending, all[4..].to_vec());
    let p2 = s
        .pending_page(
            "cardiology@hospital-a",
            1,
            Some((all[5].record_id, all[5].row)),
            2,
        )
        .await
        .unwrap();
    assert_eq!(p2, all[6..8].to_vec());
    // A deleted record's rows are no longer pending.
    assert!(s.delete_record(&all[9].record_id).await.unwrap());
    assert_eq!(
        s.pending_count("cardiology@hospital-a", 1).await.unwrap(),
        4
    );
}

async fn concurrent_uploads_and_freeze_agree(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["cardiology@hospital-a"], 10);
    let records: Vec<(Header, Vec<u8>)> = (0..24u8)
        .map(|i| w.encrypt("cardiology@hospital-a", &[i; 10]))
        .collect();
    let mut tasks = Vec::new();
    for (header, ct) in records.clone() {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let blob = s.begin_upload(NOW).await.unwrap();
            s.put_chunk(blob, 0, ct.clone(), NOW).await.unwrap();
            let rec = NewRecord::from_header(
                &header,
                header.to_bytes(),
                ct.len() as u64,
                Sha256::digest(&ct).into(),
                NOW,
            );
            s.commit_upload(blob, &rec).await.is_ok()
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let f = s
        .freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    let mut stored = 0;
    for t in tasks {
        if t.await.unwrap() {
            stored += 1;
        }
    }
    // Every committed record is in the snapshot; every other one was refused.
    assert_eq!(f.rows, stored);
    assert_eq!(
        s.list_records(None, 100).await.unwrap().len() as u64,
        stored
    );
}

async fn reopen_keeps_everything(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["cardiology@hospital-a"], 11);
    let (header, ct) = w.encrypt("cardiology@hospital-a", &[1u8; 3000]);
    let rid = put(&*s, &header, &ct, 1000).await;
    let f = s
        .freeze("cardiology@hospital-a", 1, "hospital-a", NOW)
        .await
        .unwrap();
    s.add_trusted(&TrustedAuthority {
        authority_id: "hospital-a".into(),
        identity_key: [5; 32],
        added_at: NOW,
    })
    .await
    .unwrap();
    drop(s);
    let s = h.reopen().await;
    assert_eq!(read_payload(&*s, &rid).await, ct);
    assert_eq!(
        s.freeze_info("cardiology@hospital-a", 1).await.unwrap(),
        Some(f)
    );
    assert_eq!(s.trusted_key("hospital-a").await.unwrap(), Some([5; 32]));
}

async fn newer_schema_is_refused(h: Arc<Harness>) {
    h.exec("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
        .await;
    match h.open_again().await {
        Err(ProxyError::Corrupt(m)) => assert!(m.contains("newer"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn read_record_returns_the_first_chunk_with_the_record(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["doctor@hospital-a"], 12);
    // Three chunks, one chunk, and an empty payload.
    for (size, chunk) in [(3000usize, 1000usize), (700, 1000), (0, 1000)] {
        let (header, _) = w.encrypt("doctor@hospital-a", b"x");
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let rid = put(&*s, &header, &payload, chunk).await;
        let read = s.read_record(&rid).await.unwrap().unwrap();
        assert_eq!(read.record, s.record(&rid).await.unwrap().unwrap());
        assert_eq!(read.record.header, header.to_bytes());
        assert_eq!(read.record.payload_size, size as u64);
        assert_eq!(read.record.chunks, size.div_ceil(chunk) as i64);
        assert_eq!(
            read.first_chunk,
            payload.chunks(chunk).next().map(<[u8]>::to_vec)
        );
        assert_eq!(read_payload(&*s, &rid).await, payload);
    }
    assert!(s.read_record(&[9; 16]).await.unwrap().is_none());
}

async fn reads_proceed_while_a_write_waits(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["doctor@hospital-a"], 13);
    let (header, ct) = w.encrypt("doctor@hospital-a", &[7u8; 2500]);
    let rid = put(&*s, &header, &ct, 1000).await;
    let held = h.hold_write_lock().await;
    // A write of the store that must wait for the lock (a token batch, an
    // upload's commit or a chunk would wait the same way).
    let writer = {
        let s = s.clone();
        tokio::spawn(async move { s.begin_upload(NOW).await })
    };
    h.wait_for_lock_waiter("blobs").await;
    // Reads are answered while that write waits.
    let reads = async {
        let read = s.read_record(&rid).await.unwrap().unwrap();
        assert_eq!(read.record.header, header.to_bytes());
        assert_eq!(read_payload(&*s, &rid).await, ct);
        assert_eq!(s.list_records(None, 10).await.unwrap().len(), 1);
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), reads)
        .await
        .expect("reads waited for a pending write");
    assert!(!writer.is_finished(), "the write did not wait for the lock");
    held.release().await;
    let blob = writer.await.unwrap().unwrap();
    s.abort_upload(blob).await.unwrap();
}

async fn many_concurrent_reads(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["doctor@hospital-a"], 14);
    let mut stored = Vec::new();
    for i in 0..8u8 {
        let (header, ct) = w.encrypt("doctor@hospital-a", &[i; 300]);
        stored.push((put(&*s, &header, &ct, 1 << 20).await, ct));
    }
    let stored = Arc::new(stored);
    let mut tasks = Vec::new();
    for i in 0..400usize {
        let (s, stored) = (s.clone(), stored.clone());
        tasks.push(tokio::spawn(async move {
            let (rid, ct) = &stored[i % stored.len()];
            let read = s.read_record(rid).await.unwrap().unwrap();
            assert_eq!(read.first_chunk.as_ref(), Some(ct));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Reads at once of many records, each asked for several times, of ids that
/// do not exist, and of one record whose chunk 0 was deleted behind the
/// store's back: every caller gets its own answer (PostgreSQL gathers these
/// reads into shared statements; one bad record must not fail the others).
async fn concurrent_reads_answer_each_caller_its_own_record(h: Arc<Harness>) {
    let s = h.store();
    let mut w = World::new(&["doctor@hospital-a"], 15);
    let mut stored = Vec::new();
    for i in 0..40usize {
        let (header, ct) = w.encrypt("doctor@hospital-a", &vec![i as u8; i * 37]);
        let rid = put(&*s, &header, &ct, 500).await;
        let first = ct.chunks(500).next().map(<[u8]>::to_vec);
        stored.push((rid, header.to_bytes(), first));
    }
    // The last record stored loses its chunk 0.
    h.exec(
        "DELETE FROM chunks WHERE seq = 0
         AND blob_id = (SELECT MAX(blob_id) FROM records)",
    )
    .await;
    let broken = stored.last().unwrap().0;
    let stored = Arc::new(stored);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1200usize {
        let (s, stored) = (s.clone(), stored.clone());
        tasks.spawn(async move {
            if i % 7 == 0 {
                let missing = [
                    0xEE,
                    (i >> 8) as u8,
                    i as u8,
                    1,
                    2,
                    3,
                    4,
                    5,
                    6,
                    7,
                    8,
                    9,
                    10,
                    11,
                    12,
                    13,
                ];
                assert!(s.read_record(&missing).await.unwrap().is_none());
                return;
            }
            let (rid, header, first) = &stored[i % stored.len()];
            match s.read_record(rid).await {
                Ok(Some(read)) => {
                    assert_ne!(*rid, broken, "the broken record was answered");
                    assert_eq!(read.record.record_id, *rid);
                    assert_eq!(&read.record.header, header);
                    assert_eq!(&read.first_chunk, first);
                }
                Err(ProxyError::Corrupt(m)) => {
                    assert_eq!(*rid, broken, "{m}");
                    assert!(m.contains("no chunk 0"), "{m}");
                }
                other => panic!("record {i}: {other:?}"),
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
}

/// A record deleted while a freeze runs is either in both the freeze's root
/// and its stored rows, or in neither (on PostgreSQL the delete is placed
/// between the freeze's statements: the root used to come from a SELECT
/// made before it, the rows from an INSERT made after it).
async fn freeze_root_matches_its_rows_when_a_delete_races(h: Arc<Harness>) {
    let s = h.store();
    let a = "cardiology@hospital-a";
    let mut w = World::new(&[a], 15);
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let (header, ct) = w.encrypt(a, &[i; 50]);
        ids.push(put(&*s, &header, &ct, 1000).await);
    }
    let paused = h.pause_snapshot_copies().await;
    let freeze = {
        let s = s.clone();
        tokio::spawn(async move { s.freeze(a, 1, "hospital-a", NOW).await })
    };
    if paused.is_some() {
        h.wait_for_lock_waiter("snapshot_rows").await;
    }
    assert!(s.delete_record(&ids[0]).await.unwrap());
    if let Some(p) = paused {
        p.release().await;
    }
    let f = freeze.await.unwrap().unwrap();
    let rows = s.snapshot_page(a, 1, None, 100).await.unwrap();
    assert_eq!(f.rows, rows.len() as u64);
    assert_eq!(
        f.merkle_root,
        snapshot_root(a, 1, &rows),
        "root of the stored rows"
    );
    assert_eq!(s.freeze_info(a, 1).await.unwrap(), Some(f.clone()));
    // The authority's own computation over the streamed rows agrees.
    let mut snap = Snapshot::new(attr(a), Version::FIRST);
    for r in rows_of(&rows) {
        snap.insert(r).unwrap();
    }
    assert_eq!(snap.merkle_root(), f.merkle_root);
    if let Kind::Postgres { .. } = h.kind {
        // The delete committed before the copy: the snapshot lacks it.
        assert_eq!(f.rows, 2);
        assert!(rows.iter().all(|r| r.record_id != ids[0]));
    }
    // A repeated freeze returns the same snapshot.
    assert_eq!(s.freeze(a, 1, "hospital-a", NOW).await.unwrap(), f);
}
