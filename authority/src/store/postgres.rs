//! The PostgreSQL backend: for several `serve` replicas over one database.
//!
//! A deadpool-postgres pool (no TLS: run it over loopback or a private
//! network) of at most [`MAX_CONNECTIONS`] connections. Every mutating
//! operation is one transaction that performs the change and appends its
//! audit entry; before reading the chain head it takes a transaction-scoped
//! advisory lock ([`AUDIT_LOCK_KEY`]), so appends are serialized across the
//! pool's connections and across processes sharing the database: no two
//! entries get the same `seq` and the chain never forks. `audit.seq` is also
//! the primary key, as a second line of defence.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, NoTls, Row, Transaction};

use super::{
    AttributeRecord, AuditEntry, AuditEvent, AuthorityMeta, Checkpoint, ChunkLease, GrantRecord,
    NewRotation, NonceUse, PersonRecord, ProxyRecord, RequestFilter, RequestRecord, RequestState,
    RotationProgress, RotationRecord, RotationState, Store, StoreError, StoreResult, VersionState,
    check_same_snapshot,
};
use crate::audit::{bounded, entry_hash};

/// Schema migrations, in order: (version, SQL). Missing ones are applied in
/// one transaction together with their `schema_version` rows.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_rotations.sql"),
    ),
    (
        3,
        include_str!("../../migrations/postgres/0003_proxies.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_rotation_chunks.sql"),
    ),
];

/// Largest number of pooled connections.
pub const MAX_CONNECTIONS: usize = 16;

/// Advisory lock key (`pg_advisory_xact_lock`) held by every transaction that
/// appends to the audit log. The bytes spell `mabeaudt`.
pub const AUDIT_LOCK_KEY: i64 = 0x6d61_6265_6175_6474;

/// Advisory lock key held while migrating, so that replicas starting
/// together do not race to create the schema. The bytes spell `mabemigr`.
pub const MIGRATION_LOCK_KEY: i64 = 0x6d61_6265_6d69_6772;

/// An authority store in a PostgreSQL database.
///
/// Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    database: String,
    /// Writes waiting for the next group commit.
    pending: Arc<std::sync::Mutex<Vec<Queued>>>,
    /// Whether a drain task is running (one per process; the advisory lock
    /// orders processes).
    draining: Arc<AtomicBool>,
}

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 512;

/// A write's body: runs on the group's transaction (in its own savepoint).
type PgFuture<'a, T> = Pin<Box<dyn Future<Output = StoreResult<T>> + Send + 'a>>;

/// How a write is answered once its group's commit outcome is known.
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

/// A queued write.
trait PgPendingWrite: Send {
    /// Run in the open transaction, in a savepoint.
    fn run<'a>(
        self: Box<Self>,
        tx: &'a Transaction<'a>,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;
    /// Answer without running.
    fn fail(self: Box<Self>, why: &str);
}

/// A queued entry of the group writer. Decisions on attribute requests are
/// kept apart so that a run of them can be written with a handful of
/// set-based statements instead of about ten round trips each.
enum Queued {
    /// Any write, run in its own savepoint.
    Write(Box<dyn PgPendingWrite>),
    /// An approve/deny decision.
    Decide(Box<DecideJob>),
}

impl Queued {
    fn fail(self, why: &str) {
        match self {
            Queued::Write(w) => w.fail(why),
            Queued::Decide(d) => {
                let _ = d.reply.send(Err(StoreError::Backend(why.to_owned())));
            }
        }
    }
}

/// What a decision writes: the arguments of [`Store::decide_request`].
struct Decision {
    id: i64,
    approve: bool,
    decided_by: String,
    note: String,
    decided_at: i64,
    ev: AuditEvent,
    nonce: Option<NonceUse>,
}

/// A decision's outcome. The outer error undoes the whole decision (a
/// replayed nonce); the inner one is a refusal that keeps the spent nonce.
type DecideOutcome = StoreResult<StoreResult<RequestRecord>>;

/// A queued decision and where its outcome goes.
struct DecideJob {
    decision: Decision,
    reply: tokio::sync::oneshot::Sender<DecideOutcome>,
}

impl DecideJob {
    /// The same decision as an ordinary write in its own savepoint (used when
    /// a set-based run fails as a whole and is retried one by one).
    fn into_write(self) -> Box<dyn PgPendingWrite> {
        let DecideJob { decision, reply } = self;
        Box::new(pg_job(move |tx| Box::pin(decide_one(tx, decision)), reply))
    }
}

/// A [`PgWriteJob`], with the bound that makes `f`'s lifetimes general.
fn pg_job<T, F>(f: F, reply: tokio::sync::oneshot::Sender<StoreResult<T>>) -> PgWriteJob<T, F>
where
    F: for<'a> FnOnce(&'a Transaction<'a>) -> PgFuture<'a, T> + Send + 'static,
{
    PgWriteJob { f, reply }
}

struct PgWriteJob<T, F> {
    f: F,
    reply: tokio::sync::oneshot::Sender<StoreResult<T>>,
}

impl<T, F> PgPendingWrite for PgWriteJob<T, F>
where
    T: Send + 'static,
    F: for<'a> FnOnce(&'a Transaction<'a>) -> PgFuture<'a, T> + Send + 'static,
{
    fn run<'a>(
        self: Box<Self>,
        tx: &'a Transaction<'a>,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + 'a>> {
        let PgWriteJob { f, reply } = *self;
        Box::pin(async move {
            let result = in_savepoint(tx, "mabe_write", f(tx)).await;
            answer_once_committed(reply, result)
        })
    }

    fn fail(self: Box<Self>, why: &str) {
        let _ = self.reply.send(Err(StoreError::Backend(why.to_owned())));
    }
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("database", &self.database)
            .field("max_connections", &MAX_CONNECTIONS)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connect to `url` (`postgres://user@host:port/db` or the `key=value`
    /// form) and apply any missing migrations.
    ///
    /// Fails with [`StoreError::Corrupt`] if the database was written by a
    /// newer build (its schema version is higher than this code knows).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Backend(format!("invalid PostgreSQL connection string: {e}"))
        })?;
        Self::connect_with_config(config).await
    }

    /// Like [`PgStore::connect`], from an already parsed configuration.
    pub async fn connect_with_config(config: tokio_postgres::Config) -> StoreResult<Self> {
        let database = config.get_dbname().unwrap_or("(default)").to_owned();
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(MAX_CONNECTIONS)
            .build()
            .map_err(|e| StoreError::Backend(format!("cannot build the connection pool: {e}")))?;
        let store = PgStore {
            pool,
            database,
            pending: Arc::new(std::sync::Mutex::new(Vec::new())),
            draining: Arc::new(AtomicBool::new(false)),
        };
        let mut client = store.client().await?;
        migrate(&mut client).await?;
        Ok(store)
    }

    /// Run `f` as one atomic audited write, with group commit: writes that
    /// arrive while a group is committing are queued and the next leader
    /// commits up to 512 of them in one transaction (one advisory lock, one
    /// WAL flush), each in its own savepoint so a failing write rolls back
    /// alone. Callers are answered only after their group committed.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> PgFuture<'a, T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.enqueue(Queued::Write(Box::new(PgWriteJob { f, reply })))?;
        answer
            .await
            .map_err(|_| StoreError::Backend("the write was dropped before it ran".to_owned()))?
    }

    /// Queue `job` for the group writer and make sure a drain task runs.
    fn enqueue(&self, job: Queued) -> StoreResult<()> {
        self.pending
            .lock()
            .map_err(|_| StoreError::Backend("the write queue is unusable".to_owned()))?
            .push(job);
        self.kick();
        Ok(())
    }

    /// Make sure a drain task is running (see the SQLite store's `kick`).
    fn kick(&self) {
        if self
            .draining
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let pool = self.pool.clone();
        let database = self.database.clone();
        let pending = Arc::clone(&self.pending);
        let draining = Arc::clone(&self.draining);
        tokio::spawn(async move {
            loop {
                drain_groups(&pool, &database, &pending).await;
                draining.store(false, Ordering::Release);
                let more = pending.lock().map(|q| !q.is_empty()).unwrap_or(false);
                if !more
                    || draining
                        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                {
                    return;
                }
            }
        });
    }

    async fn client(&self) -> StoreResult<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| {
            StoreError::Backend(format!(
                "cannot get a connection to database {}: {e}",
                self.database
            ))
        })
    }
}

/// Run `body` (a future over `tx`, not started yet) inside savepoint
/// `name`: released if it succeeds, rolled back if it fails, so that the
/// rest of the group's transaction is unaffected.
async fn in_savepoint<T>(
    tx: &Transaction<'_>,
    name: &str,
    body: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    tx.batch_execute(&format!("SAVEPOINT {name}"))
        .await
        .map_err(pg_err)?;
    match body.await {
        Ok(v) => tx
            .batch_execute(&format!("RELEASE SAVEPOINT {name}"))
            .await
            .map(|()| v)
            .map_err(pg_err),
        Err(e) => {
            let _ = tx
                .batch_execute(&format!(
                    "ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"
                ))
                .await;
            Err(e)
        }
    }
}

/// How to answer a write's caller once its group's commit outcome is known:
/// its own result if the group committed, the commit's error otherwise.
fn answer_once_committed<T: Send + 'static>(
    reply: tokio::sync::oneshot::Sender<StoreResult<T>>,
    result: StoreResult<T>,
) -> Answer {
    Box::new(move |commit_error: Option<&str>| {
        let out = match commit_error {
            None => result,
            Some(e) => Err(StoreError::Backend(format!("commit failed: {e}"))),
        };
        let _ = reply.send(out);
    })
}

/// Commit queued writes in groups until the queue is empty.
async fn drain_groups(pool: &Pool, database: &str, pending: &std::sync::Mutex<Vec<Queued>>) {
    loop {
        let jobs: Vec<Queued> = match pending.lock() {
            Ok(mut q) => {
                let n = q.len().min(MAX_GROUP);
                q.drain(..n).collect()
            }
            Err(_) => return,
        };
        if jobs.is_empty() {
            return;
        }
        let mut client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let why = format!("cannot get a connection to database {database}: {e}");
                jobs.into_iter().for_each(|j| j.fail(&why));
                continue;
            }
        };
        let tx = match begin_audited(&mut client).await {
            Ok(tx) => tx,
            Err(e) => {
                let why = e.to_string();
                jobs.into_iter().for_each(|j| j.fail(&why));
                continue;
            }
        };
        let mut answers = Vec::with_capacity(jobs.len());
        let mut decisions = Vec::new();
        for j in jobs {
            match j {
                Queued::Decide(d) => decisions.push(*d),
                Queued::Write(w) => {
                    // Keep the queue's order: earlier decisions go first.
                    if !decisions.is_empty() {
                        answers.extend(decide_run(&tx, std::mem::take(&mut decisions)).await);
                    }
                    answers.push(w.run(&tx).await);
                }
            }
        }
        if !decisions.is_empty() {
            answers.extend(decide_run(&tx, decisions).await);
        }
        match tx.commit().await {
            Ok(()) => answers.into_iter().for_each(|a| a(None)),
            Err(e) => {
                let why = e.to_string();
                answers.into_iter().for_each(|a| a(Some(&why)));
            }
        }
    }
}

/// Write a run of consecutive decisions inside the group's transaction.
///
/// First as one set-based batch ([`decide_batch`]) in a savepoint. If any of
/// its statements fails, the savepoint is rolled back and every decision is
/// run again alone ([`decide_one`], its own savepoint), so one bad decision
/// cannot take the others down with it.
async fn decide_run(tx: &Transaction<'_>, jobs: Vec<DecideJob>) -> Vec<Answer> {
    match in_savepoint(tx, "mabe_decide", decide_batch(tx, &jobs)).await {
        Ok(outcomes) => jobs
            .into_iter()
            .zip(outcomes)
            .map(|(j, out)| answer_once_committed(j.reply, out))
            .collect(),
        Err(e) => {
            tracing::warn!(
                decisions = jobs.len(),
                error = %e,
                "a batch of decisions failed as a whole; writing them one by one"
            );
            let mut answers = Vec::with_capacity(jobs.len());
            for j in jobs {
                answers.push(j.into_write().run(tx).await);
            }
            answers
        }
    }
}

/// Apply every migration newer than the database's schema version, refusing
/// a database from a newer build.
async fn migrate(client: &mut Client) -> StoreResult<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY});
         CREATE TABLE IF NOT EXISTS schema_version (
             version    BIGINT NOT NULL PRIMARY KEY,
             applied_at BIGINT NOT NULL
         );"
    ))
    .await
    .map_err(pg_err)?;
    let row = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version",
            &[],
        )
        .await
        .map_err(pg_err)?;
    let current: i64 = get(&row, 0)?;
    if current > latest {
        return Err(StoreError::Corrupt(format!(
            "database schema {current} is newer than this build ({latest})"
        )));
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await.map_err(|e| {
            StoreError::Backend(format!("migration {version} failed: {}", describe(&e)))
        })?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
            &[&version, &unix_now()],
        )
        .await
        .map_err(pg_err)?;
    }
    tx.commit().await.map_err(pg_err)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

/// The error with the server's message, detail and SQLSTATE, if it has them.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                s.push_str(": ");
                s.push_str(detail);
            }
            s
        }
        None => e.to_string(),
    }
}

/// Map a tokio-postgres error: unique violations to `AlreadyExists`,
/// foreign-key violations to `NotFound`, the rest to `Backend`.
fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let code = e.code().cloned();
    let text = describe(&e);
    match code {
        Some(c) if c == SqlState::UNIQUE_VIOLATION => StoreError::AlreadyExists(text),
        Some(c) if c == SqlState::FOREIGN_KEY_VIOLATION => {
            StoreError::NotFound(format!("a referenced row does not exist ({text})"))
        }
        _ => StoreError::Backend(text),
    }
}

/// One column of a row; a value of the wrong type is `Corrupt`, never a panic.
fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> StoreResult<T> {
    row.try_get(idx)
        .map_err(|e| StoreError::Corrupt(format!("cannot read column {idx}: {e}")))
}

fn to32(v: &[u8], what: &str) -> StoreResult<[u8; 32]> {
    <[u8; 32]>::try_from(v)
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, expected 32", v.len())))
}

fn version_from(attribute: &str, v: i64) -> StoreResult<u32> {
    u32::try_from(v).ok().filter(|v| *v >= 1).ok_or_else(|| {
        StoreError::Corrupt(format!("attribute {attribute} has invalid version {v}"))
    })
}

fn gid_hex(gid: &[u8; 32]) -> String {
    hex::encode(gid)
}

// ---- row decoding ----

const META_COLS: &str =
    "authority_id, identity_public_key, identity_secret_sealed, admin_public_key, created_at";

fn meta_from(r: &Row) -> StoreResult<AuthorityMeta> {
    Ok(AuthorityMeta {
        authority_id: get(r, 0)?,
        identity_public_key: to32(get(r, 1)?, "identity public key")?,
        identity_secret_sealed: get(r, 2)?,
        admin_public_key: to32(get(r, 3)?, "admin public key")?,
        created_at: get(r, 4)?,
    })
}

const ATTR_COLS: &str = "attribute, version, public_key, secret_sealed, state, created_at";

fn attr_from(r: &Row) -> StoreResult<AttributeRecord> {
    let attribute: String = get(r, 0)?;
    Ok(AttributeRecord {
        version: version_from(&attribute, get(r, 1)?)?,
        public_key: get(r, 2)?,
        secret_sealed: get(r, 3)?,
        state: VersionState::parse(get(r, 4)?)?,
        created_at: get(r, 5)?,
        attribute,
    })
}

const PERSON_COLS: &str = "gid, registry, subject, request_key, roles, enrolled_at";

fn person_from(r: &Row) -> StoreResult<PersonRecord> {
    Ok(PersonRecord {
        gid: to32(get(r, 0)?, "person GID")?,
        registry: get(r, 1)?,
        subject: get(r, 2)?,
        request_key: to32(get(r, 3)?, "person request key")?,
        roles: get(r, 4)?,
        enrolled_at: get(r, 5)?,
    })
}

const GRANT_COLS: &str = "gid, attribute, granted_by, granted_at, expires_at";

fn grant_from(r: &Row) -> StoreResult<GrantRecord> {
    Ok(GrantRecord {
        gid: to32(get(r, 0)?, "grant GID")?,
        attribute: get(r, 1)?,
        granted_by: get(r, 2)?,
        granted_at: get(r, 3)?,
        expires_at: get(r, 4)?,
    })
}

const REQUEST_COLS: &str =
    "id, gid, attribute, reason, state, created_at, decided_by, decided_at, note";

fn request_from(r: &Row) -> StoreResult<RequestRecord> {
    Ok(RequestRecord {
        id: get(r, 0)?,
        gid: to32(get(r, 1)?, "request GID")?,
        attribute: get(r, 2)?,
        reason: get(r, 3)?,
        state: RequestState::parse(get(r, 4)?)?,
        created_at: get(r, 5)?,
        decided_by: get(r, 6)?,
        decided_at: get(r, 7)?,
        note: get(r, 8)?,
    })
}

const ROTATION_COLS: &str = "id, attribute, from_version, to_version, state, reason,
     update_secret_sealed, created_at, finished_at";

fn rotation_from(r: &Row) -> StoreResult<RotationRecord> {
    let id: i64 = get(r, 0)?;
    let version = |v: i64| {
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("rotation {id} version {v}")))
    };
    Ok(RotationRecord {
        id,
        attribute: get(r, 1)?,
        from_version: version(get(r, 2)?)?,
        to_version: version(get(r, 3)?)?,
        state: RotationState::parse(get(r, 4)?)?,
        reason: get(r, 5)?,
        update_secret_sealed: get(r, 6)?,
        created_at: get(r, 7)?,
        finished_at: get(r, 8)?,
    })
}

const AUDIT_COLS: &str = "seq, ts, kind, actor, subject, attribute, detail, prev_hash, hash";

fn audit_from(r: &Row) -> StoreResult<AuditEntry> {
    let seq: i64 = get(r, 0)?;
    Ok(AuditEntry {
        seq,
        event: AuditEvent {
            ts: get(r, 1)?,
            kind: get(r, 2)?,
            actor: get(r, 3)?,
            subject: get(r, 4)?,
            attribute: get(r, 5)?,
            detail: get(r, 6)?,
        },
        prev_hash: to32(get(r, 7)?, &format!("audit entry {seq} previous hash"))?,
        hash: to32(get(r, 8)?, &format!("audit entry {seq} hash"))?,
    })
}

fn checkpoint_from(r: &Row) -> StoreResult<Checkpoint> {
    let seq: i64 = get(r, 0)?;
    Ok(Checkpoint {
        seq,
        hash: to32(get(r, 1)?, &format!("checkpoint {seq} hash"))?,
        ts: get(r, 2)?,
        signature: get(r, 3)?,
    })
}

/// Begin a transaction that will append to the audit log: the advisory lock
/// is taken first, so every read after it sees the latest committed chain
/// head and no other appender can run until this transaction ends.
async fn begin_audited(client: &mut Client) -> StoreResult<Transaction<'_>> {
    let tx = client.transaction().await.map_err(pg_err)?;
    tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})"))
        .await
        .map_err(pg_err)?;
    Ok(tx)
}

/// Progress rows of a rotation (one proxy's, or all, by proxy id).
async fn progress_rows(
    tx: &Transaction<'_>,
    rotation_id: i64,
    proxy: Option<&str>,
) -> StoreResult<Vec<RotationProgress>> {
    let rows = tx
        .query(
            "SELECT rotation_id, proxy_id, snapshot_root, rows_total, rows_done, frozen_at,
                    updated_at, done_at
             FROM rotation_proxies
             WHERE rotation_id = $1 AND ($2::TEXT IS NULL OR proxy_id = $2)
             ORDER BY proxy_id",
            &[&rotation_id, &proxy],
        )
        .await
        .map_err(pg_err)?;
    rows.iter()
        .map(|r| {
            let root: Vec<u8> = get(r, 2)?;
            Ok(RotationProgress {
                rotation_id: get(r, 0)?,
                proxy_id: get(r, 1)?,
                snapshot_root: to32(&root, "snapshot root")?,
                rows_total: get(r, 3)?,
                rows_done: get(r, 4)?,
                frozen_at: get(r, 5)?,
                updated_at: get(r, 6)?,
                done_at: get(r, 7)?,
            })
        })
        .collect()
}

/// Prune nonces older than $1. SKIP LOCKED: concurrent callers prune
/// disjoint rows instead of waiting for (or deadlocking with) each other.
const PRUNE_NONCES: &str = "DELETE FROM nonces WHERE (gid, nonce) IN (
     SELECT gid, nonce FROM nonces WHERE seen_at < $1 FOR UPDATE SKIP LOCKED)";

/// Record nonce ($1, $2) seen at $3; no row is inserted if it was seen.
const INSERT_NONCE: &str = "INSERT INTO nonces (gid, nonce, seen_at) VALUES ($1, $2, $3)
     ON CONFLICT (gid, nonce) DO NOTHING";

/// Record a nonce (forgetting old ones); `false` if it was seen before.
async fn spend_nonce(tx: &Transaction<'_>, n: &NonceUse) -> StoreResult<bool> {
    tx.execute(PRUNE_NONCES, &[&n.prune_before])
        .await
        .map_err(pg_err)?;
    let inserted = tx
        .execute(INSERT_NONCE, &[&n.space.as_slice(), &n.nonce, &n.seen_at])
        .await
        .map_err(pg_err)?;
    Ok(inserted == 1)
}

/// End an active grant and audit it (`NotFound` if there is none).
async fn end_grant(
    tx: &Transaction<'_>,
    gid: &[u8; 32],
    attribute: &str,
    ev: &AuditEvent,
) -> StoreResult<()> {
    let changed = tx
        .execute(
            "UPDATE grants SET revoked_at = $1
             WHERE gid = $2 AND attribute = $3 AND revoked_at IS NULL",
            &[&ev.ts, &gid.as_slice(), &attribute],
        )
        .await
        .map_err(pg_err)?;
    if changed == 0 {
        return Err(StoreError::NotFound(format!(
            "{} holds no active grant of {attribute}",
            gid_hex(gid)
        )));
    }
    append(tx, ev).await?;
    Ok(())
}

/// Append `ev` (within the audit size limits, [`bounded`]) to the audit
/// chain inside a transaction from [`begin_audited`].
async fn append(tx: &Transaction<'_>, ev: &AuditEvent) -> StoreResult<AuditEntry> {
    let within = bounded(ev);
    let ev: &AuditEvent = &within;
    let last = tx
        .query_opt("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])
        .await
        .map_err(pg_err)?;
    let (seq, prev_hash) = match last {
        None => (1i64, [0u8; 32]),
        Some(row) => {
            let seq: i64 = get(&row, 0)?;
            let hash: &[u8] = get(&row, 1)?;
            (
                seq.checked_add(1).ok_or_else(|| {
                    StoreError::Corrupt(format!("audit sequence {seq} cannot grow"))
                })?,
                to32(hash, &format!("audit entry {seq} hash"))?,
            )
        }
    };
    let hash = entry_hash(seq, &prev_hash, ev);
    tx.execute(
        "INSERT INTO audit (seq, ts, kind, actor, subject, attribute, detail, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &seq,
            &ev.ts,
            &ev.kind,
            &ev.actor,
            &ev.subject,
            &ev.attribute,
            &ev.detail,
            &prev_hash.as_slice(),
            &hash.as_slice(),
        ],
    )
    .await
    .map_err(pg_err)?;
    Ok(AuditEntry {
        seq,
        event: ev.clone(),
        prev_hash,
        hash,
    })
}

async fn person_known(tx: &Transaction<'_>, gid: &[u8; 32]) -> StoreResult<bool> {
    let row = tx
        .query_opt("SELECT 1 FROM people WHERE gid = $1", &[&gid.as_slice()])
        .await
        .map_err(pg_err)?;
    Ok(row.is_some())
}

async fn person_exists(tx: &Transaction<'_>, gid: &[u8; 32]) -> StoreResult<()> {
    if person_known(tx, gid).await? {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!(
            "person {} is not enrolled",
            gid_hex(gid)
        )))
    }
}

async fn attribute_known(tx: &Transaction<'_>, attribute: &str) -> StoreResult<bool> {
    let row = tx
        .query_opt(
            "SELECT 1 FROM attributes WHERE attribute = $1 LIMIT 1",
            &[&attribute],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.is_some())
}

async fn attribute_exists(tx: &Transaction<'_>, attribute: &str) -> StoreResult<()> {
    if attribute_known(tx, attribute).await? {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!(
            "attribute {attribute} does not exist"
        )))
    }
}

async fn active_grant_exists(
    tx: &Transaction<'_>,
    gid: &[u8; 32],
    attribute: &str,
) -> StoreResult<bool> {
    let row = tx
        .query_opt(
            "SELECT 1 FROM grants WHERE gid = $1 AND attribute = $2 AND revoked_at IS NULL",
            &[&gid.as_slice(), &attribute],
        )
        .await
        .map_err(pg_err)?;
    Ok(row.is_some())
}

async fn insert_grant(tx: &Transaction<'_>, g: &GrantRecord) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO grants (gid, attribute, granted_by, granted_at, expires_at)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &g.gid.as_slice(),
            &g.attribute,
            &g.granted_by,
            &g.granted_at,
            &g.expires_at,
        ],
    )
    .await
    .map_err(|e| match pg_err(e) {
        StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!(
            "{} already holds an active grant of {}",
            gid_hex(&g.gid),
            g.attribute
        )),
        other => other,
    })?;
    Ok(())
}

/// One decision on an attribute request, in the caller's savepoint.
///
/// Refusals after the nonce is spent come back as `Ok(Err(_))`, so the
/// savepoint keeps the nonce (nothing else was written yet).
async fn decide_one(tx: &Transaction<'_>, d: Decision) -> DecideOutcome {
    let Decision {
        id,
        approve,
        decided_by,
        note,
        decided_at,
        mut ev,
        nonce,
    } = d;
    if let Some(n) = &nonce {
        if !spend_nonce(tx, n).await? {
            return Err(StoreError::Replay);
        }
    }
    let row = tx
        .query_opt(
            &format!("SELECT {REQUEST_COLS} FROM requests WHERE id = $1 FOR UPDATE"),
            &[&id],
        )
        .await
        .map_err(pg_err)?;
    let Some(row) = row else {
        return Ok(Err(StoreError::NotFound(format!(
            "request {id} does not exist"
        ))));
    };
    let mut req = request_from(&row)?;
    if req.state != RequestState::Pending {
        return Ok(Err(StoreError::Conflict(format!(
            "request {id} was already {}",
            req.state.as_str()
        ))));
    }
    let state = decided_state(approve);
    tx.execute(
        "UPDATE requests SET state = $1, decided_by = $2, decided_at = $3, note = $4
         WHERE id = $5",
        &[&state.as_str(), &decided_by, &decided_at, &note, &id],
    )
    .await
    .map_err(pg_err)?;
    if approve && !active_grant_exists(tx, &req.gid, &req.attribute).await? {
        insert_grant(
            tx,
            &GrantRecord {
                gid: req.gid,
                attribute: req.attribute.clone(),
                granted_by: format!("request:{id}"),
                granted_at: decided_at,
                expires_at: None,
            },
        )
        .await?;
    }
    name_request(&mut ev, &req);
    append(tx, &ev).await?;
    req.state = state;
    req.decided_by = Some(decided_by);
    req.decided_at = Some(decided_at);
    req.note = Some(note);
    Ok(Ok(req))
}

fn decided_state(approve: bool) -> RequestState {
    if approve {
        RequestState::Approved
    } else {
        RequestState::Denied
    }
}

/// A decision's audit entry names whose request it was and for what.
fn name_request(ev: &mut AuditEvent, req: &RequestRecord) {
    ev.subject.get_or_insert_with(|| hex::encode(req.gid));
    ev.attribute.get_or_insert_with(|| req.attribute.clone());
}

/// Write a run of decisions with set-based statements, with the same outcome
/// as [`decide_one`] for each in queue order: about eight round trips for
/// the whole run instead of about ten per decision.
///
/// Any statement error fails the whole run (the caller rolls it back and
/// falls back to [`decide_one`]); per-decision refusals are in the returned
/// outcomes, one per job.
async fn decide_batch(tx: &Transaction<'_>, jobs: &[DecideJob]) -> StoreResult<Vec<DecideOutcome>> {
    let mut outcomes: Vec<Option<DecideOutcome>> = jobs.iter().map(|_| None).collect();

    // 1. Nonces: a nonce seen earlier in this run, or already stored, is a
    //    replay; the rest are stored in one statement.
    let mut seen = std::collections::HashSet::new();
    let mut fresh_idx = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if let Some(n) = &j.decision.nonce {
            if seen.insert((n.space, n.nonce.as_slice())) {
                fresh_idx.push(i);
            } else {
                outcomes[i] = Some(Err(StoreError::Replay));
            }
        }
    }
    if !fresh_idx.is_empty() {
        let nonces: Vec<&NonceUse> = fresh_idx
            .iter()
            .filter_map(|&i| jobs[i].decision.nonce.as_ref())
            .collect();
        let prune_before = nonces.iter().map(|n| n.prune_before).min().unwrap_or(0);
        let spaces: Vec<&[u8]> = nonces.iter().map(|n| n.space.as_slice()).collect();
        let values: Vec<&[u8]> = nonces.iter().map(|n| n.nonce.as_slice()).collect();
        let seen_at: Vec<i64> = nonces.iter().map(|n| n.seen_at).collect();
        let prune_params: [&(dyn ToSql + Sync); 1] = [&prune_before];
        let insert_params: [&(dyn ToSql + Sync); 3] = [&spaces, &values, &seen_at];
        let prune = tx.execute(
            "DELETE FROM nonces WHERE (gid, nonce) IN (
                 SELECT gid, nonce FROM nonces WHERE seen_at < $1 FOR UPDATE SKIP LOCKED)",
            &prune_params,
        );
        let insert = tx.query(
            "INSERT INTO nonces (gid, nonce, seen_at)
             SELECT * FROM unnest($1::BYTEA[], $2::BYTEA[], $3::BIGINT[])
             ON CONFLICT (gid, nonce) DO NOTHING
             RETURNING gid, nonce",
            &insert_params,
        );
        let (_, stored) = tokio::try_join!(prune, insert).map_err(pg_err)?;
        let stored: std::collections::HashSet<(Vec<u8>, Vec<u8>)> = stored
            .iter()
            .map(|r| Ok((get::<Vec<u8>>(r, 0)?, get::<Vec<u8>>(r, 1)?)))
            .collect::<StoreResult<_>>()?;
        for &i in &fresh_idx {
            if let Some(n) = &jobs[i].decision.nonce {
                if !stored.contains(&(n.space.to_vec(), n.nonce.clone())) {
                    outcomes[i] = Some(Err(StoreError::Replay));
                }
            }
        }
    }

    // 2. The requests still to be decided, locked.
    let ids: Vec<i64> = jobs
        .iter()
        .zip(&outcomes)
        .filter(|(_, o)| o.is_none())
        .map(|(j, _)| j.decision.id)
        .collect();
    let rows = tx
        .query(
            &format!(
                "SELECT {REQUEST_COLS} FROM requests WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            ),
            &[&ids],
        )
        .await
        .map_err(pg_err)?;
    let mut requests = std::collections::HashMap::with_capacity(rows.len());
    for r in &rows {
        let req = request_from(r)?;
        requests.insert(req.id, req);
    }

    // 3. Decide in queue order, as one-by-one writes would.
    let mut upd_ids = Vec::new();
    let mut upd_states = Vec::new();
    let mut upd_by = Vec::new();
    let mut upd_at = Vec::new();
    let mut upd_note = Vec::new();
    let mut grant_gids: Vec<Vec<u8>> = Vec::new();
    let mut grant_attrs = Vec::new();
    let mut grant_by = Vec::new();
    let mut grant_at = Vec::new();
    let mut events = Vec::new();
    for (i, j) in jobs.iter().enumerate() {
        if outcomes[i].is_some() {
            continue;
        }
        let d = &j.decision;
        let Some(req) = requests.get_mut(&d.id) else {
            outcomes[i] = Some(Ok(Err(StoreError::NotFound(format!(
                "request {} does not exist",
                d.id
            )))));
            continue;
        };
        if req.state != RequestState::Pending {
            outcomes[i] = Some(Ok(Err(StoreError::Conflict(format!(
                "request {} was already {}",
                d.id,
                req.state.as_str()
            )))));
            continue;
        }
        let state = decided_state(d.approve);
        req.state = state;
        req.decided_by = Some(d.decided_by.clone());
        req.decided_at = Some(d.decided_at);
        req.note = Some(d.note.clone());
        upd_ids.push(d.id);
        upd_states.push(state.as_str());
        upd_by.push(d.decided_by.as_str());
        upd_at.push(d.decided_at);
        upd_note.push(d.note.as_str());
        if d.approve {
            grant_gids.push(req.gid.to_vec());
            grant_attrs.push(req.attribute.clone());
            grant_by.push(format!("request:{}", d.id));
            grant_at.push(d.decided_at);
        }
        let mut ev = d.ev.clone();
        name_request(&mut ev, req);
        events.push((i, ev));
        outcomes[i] = Some(Ok(Ok(req.clone())));
    }

    // 4. The decisions, the new grants (none where one is already active:
    //    the partial unique index says which) and the audit chain head.
    let update_params: [&(dyn ToSql + Sync); 5] =
        [&upd_ids, &upd_states, &upd_by, &upd_at, &upd_note];
    let grant_params: [&(dyn ToSql + Sync); 4] = [&grant_gids, &grant_attrs, &grant_by, &grant_at];
    let update = tx.execute(
        "UPDATE requests AS r
         SET state = u.state, decided_by = u.decided_by, decided_at = u.decided_at, note = u.note
         FROM unnest($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[], $5::TEXT[])
              AS u(id, state, decided_by, decided_at, note)
         WHERE r.id = u.id",
        &update_params,
    );
    let grants = tx.execute(
        "INSERT INTO grants (gid, attribute, granted_by, granted_at)
         SELECT * FROM unnest($1::BYTEA[], $2::TEXT[], $3::TEXT[], $4::BIGINT[])
         ON CONFLICT (gid, attribute) WHERE revoked_at IS NULL DO NOTHING",
        &grant_params,
    );
    let head = tx.query_opt("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[]);
    let (updated, _, head) = tokio::try_join!(update, grants, head).map_err(pg_err)?;
    if usize::try_from(updated).ok() != Some(upd_ids.len()) {
        return Err(StoreError::Backend(format!(
            "{updated} of {} decided requests were updated",
            upd_ids.len()
        )));
    }

    // 5. The audit entries, chained here and stored in one statement.
    let (mut seq, mut prev) = match head {
        None => (0i64, [0u8; 32]),
        Some(row) => {
            let seq: i64 = get(&row, 0)?;
            let hash: &[u8] = get(&row, 1)?;
            (seq, to32(hash, &format!("audit entry {seq} hash"))?)
        }
    };
    let mut a_seq = Vec::with_capacity(events.len());
    let mut a_ts = Vec::with_capacity(events.len());
    let mut a_kind = Vec::with_capacity(events.len());
    let mut a_actor = Vec::with_capacity(events.len());
    let mut a_subject = Vec::with_capacity(events.len());
    let mut a_attribute = Vec::with_capacity(events.len());
    let mut a_detail = Vec::with_capacity(events.len());
    let mut a_prev = Vec::with_capacity(events.len());
    let mut a_hash = Vec::with_capacity(events.len());
    for (_, ev) in &events {
        let ev = bounded(ev);
        seq = seq
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt(format!("audit sequence {seq} cannot grow")))?;
        let hash = entry_hash(seq, &prev, &ev);
        a_seq.push(seq);
        a_ts.push(ev.ts);
        a_kind.push(ev.kind.clone());
        a_actor.push(ev.actor.clone());
        a_subject.push(ev.subject.clone());
        a_attribute.push(ev.attribute.clone());
        a_detail.push(ev.detail.clone());
        a_prev.push(prev.to_vec());
        a_hash.push(hash.to_vec());
        prev = hash;
    }
    tx.execute(
        "INSERT INTO audit (seq, ts, kind, actor, subject, attribute, detail, prev_hash, hash)
         SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], $5::TEXT[],
                              $6::TEXT[], $7::TEXT[], $8::BYTEA[], $9::BYTEA[])",
        &[
            &a_seq,
            &a_ts,
            &a_kind,
            &a_actor,
            &a_subject,
            &a_attribute,
            &a_detail,
            &a_prev,
            &a_hash,
        ],
    )
    .await
    .map_err(pg_err)?;

    outcomes
        .into_iter()
        .map(|o| {
            o.ok_or_else(|| StoreError::Backend("a decision was left without an outcome".into()))
        })
        .collect()
}

async fn insert_attribute_version(tx: &Transaction<'_>, rec: &AttributeRecord) -> StoreResult<()> {
    tx.execute(
        &format!("INSERT INTO attributes ({ATTR_COLS}) VALUES ($1, $2, $3, $4, $5, $6)"),
        &[
            &rec.attribute,
            &i64::from(rec.version),
            &rec.public_key,
            &rec.secret_sealed,
            &VersionState::Current.as_str(),
            &rec.created_at,
        ],
    )
    .await
    .map_err(pg_err)?;
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn init_meta(&self, meta: &AuthorityMeta, ev: AuditEvent) -> StoreResult<()> {
        let meta_owned: AuthorityMeta = meta.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let meta: &AuthorityMeta = &meta_owned;

                if tx
                    .query_opt("SELECT 1 FROM meta", &[])
                    .await
                    .map_err(pg_err)?
                    .is_some()
                {
                    return Err(StoreError::AlreadyExists(
                        "the authority is already initialised".to_owned(),
                    ));
                }
                tx.execute(
                    &format!("INSERT INTO meta (id, {META_COLS}) VALUES (1, $1, $2, $3, $4, $5)"),
                    &[
                        &meta.authority_id,
                        &meta.identity_public_key.as_slice(),
                        &meta.identity_secret_sealed,
                        &meta.admin_public_key.as_slice(),
                        &meta.created_at,
                    ],
                )
                .await
                .map_err(pg_err)?;
                append(tx, &ev).await?;
                Ok(())
            })
        })
        .await
    }

    async fn meta(&self) -> StoreResult<Option<AuthorityMeta>> {
        let client = self.client().await?;
        let row = client
            .query_opt(&format!("SELECT {META_COLS} FROM meta WHERE id = 1"), &[])
            .await
            .map_err(pg_err)?;
        row.as_ref().map(meta_from).transpose()
    }

    async fn create_attribute(&self, rec: &AttributeRecord, ev: AuditEvent) -> StoreResult<()> {
        if rec.version != 1 {
            return Err(StoreError::Conflict(format!(
                "a new attribute starts at version 1, not {}",
                rec.version
            )));
        }
        let rec_owned: AttributeRecord = rec.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let rec: &AttributeRecord = &rec_owned;

                if attribute_known(tx, &rec.attribute).await? {
                    return Err(StoreError::AlreadyExists(format!(
                        "attribute {} already exists",
                        rec.attribute
                    )));
                }
                insert_attribute_version(tx, rec).await?;
                append(tx, &ev).await?;
                Ok(())
            })
        })
        .await
    }

    async fn rotate_attribute(
        &self,
        rec: &AttributeRecord,
        rotation: &NewRotation,
        ev: AuditEvent,
    ) -> StoreResult<RotationRecord> {
        let rec_owned: AttributeRecord = rec.clone();
        let rotation_owned: NewRotation = rotation.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let rec: &AttributeRecord = &rec_owned;
                let rotation: &NewRotation = &rotation_owned;
                for (gid, ev) in &rotation.revoke {
                    end_grant(tx, gid, &rec.attribute, ev).await?;
                }

                let row = tx
                    .query_one(
                        "SELECT MAX(version) FROM attributes WHERE attribute = $1",
                        &[&rec.attribute],
                    )
                    .await
                    .map_err(pg_err)?;
                let Some(current): Option<i64> = get(&row, 0)? else {
                    return Err(StoreError::NotFound(format!(
                        "attribute {} does not exist",
                        rec.attribute
                    )));
                };
                if current.checked_add(1) != Some(i64::from(rec.version)) {
                    return Err(StoreError::Conflict(format!(
                        "attribute {} is at version {current}; the next version is {}, not {}",
                        rec.attribute,
                        current.saturating_add(1),
                        rec.version
                    )));
                }
                tx.execute(
                    "UPDATE attributes SET state = $1 WHERE attribute = $2 AND state = $3",
                    &[
                        &VersionState::Superseded.as_str(),
                        &rec.attribute,
                        &VersionState::Current.as_str(),
                    ],
                )
                .await
                .map_err(pg_err)?;
                insert_attribute_version(tx, rec).await?;
                let row = tx
                    .query_one(
                        &format!(
                    "INSERT INTO rotations (attribute, from_version, to_version, state, reason,
                         update_secret_sealed, created_at)
                     VALUES ($1, $2, $3, 'pending', $4, $5, $6) RETURNING {ROTATION_COLS}"
                ),
                        &[
                            &rec.attribute,
                            &current,
                            &i64::from(rec.version),
                            &rotation.reason,
                            &rotation.update_secret_sealed,
                            &rec.created_at,
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                let out = rotation_from(&row)?;
                append(tx, &ev).await?;
                Ok(out)
            })
        })
        .await
    }

    async fn rotations(&self, pending_only: bool) -> StoreResult<Vec<RotationRecord>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {ROTATION_COLS} FROM rotations
                 WHERE NOT $1 OR state = 'pending' ORDER BY id"
            ))
            .await
            .map_err(pg_err)?;
        let rows = client
            .query(&stmt, &[&pending_only])
            .await
            .map_err(pg_err)?;
        rows.iter().map(rotation_from).collect()
    }

    async fn finish_rotation(
        &self,
        id: i64,
        finished_at: i64,
        ev: AuditEvent,
    ) -> StoreResult<RotationRecord> {
        self.write(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!("SELECT {ROTATION_COLS} FROM rotations WHERE id = $1 FOR UPDATE"),
                        &[&id],
                    )
                    .await
                    .map_err(pg_err)?
                    .ok_or_else(|| StoreError::NotFound(format!("rotation {id}")))?;
                if rotation_from(&row)?.state == RotationState::Done {
                    return Err(StoreError::Conflict(format!(
                        "rotation {id} is already done"
                    )));
                }
                let row = tx
                    .query_one(
                        &format!(
                            "UPDATE rotations SET state = 'done', update_secret_sealed = NULL,
                         finished_at = $1 WHERE id = $2 RETURNING {ROTATION_COLS}"
                        ),
                        &[&finished_at, &id],
                    )
                    .await
                    .map_err(pg_err)?;
                let out = rotation_from(&row)?;
                append(tx, &ev).await?;
                Ok(out)
            })
        })
        .await
    }

    async fn attributes(&self) -> StoreResult<Vec<AttributeRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {ATTR_COLS} FROM attributes ORDER BY attribute, version"),
                &[],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(attr_from).collect()
    }

    async fn attribute_versions(&self, attribute: &str) -> StoreResult<Vec<AttributeRecord>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {ATTR_COLS} FROM attributes WHERE attribute = $1 ORDER BY version"
            ))
            .await
            .map_err(pg_err)?;
        let rows = client.query(&stmt, &[&attribute]).await.map_err(pg_err)?;
        rows.iter().map(attr_from).collect()
    }

    async fn attributes_page(
        &self,
        after: Option<(&str, u32)>,
        limit: i64,
    ) -> StoreResult<Vec<AttributeRecord>> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        // ('', 0) sorts before every attribute: names are never empty.
        let (attribute, version) = after.unwrap_or(("", 0));
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {ATTR_COLS} FROM attributes WHERE (attribute, version) > ($1, $2)
                     ORDER BY attribute, version LIMIT $3"
                ),
                &[&attribute, &i64::from(version), &limit],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(attr_from).collect()
    }

    async fn attribute_rotations(&self, attribute: &str) -> StoreResult<Vec<RotationRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {ROTATION_COLS} FROM rotations WHERE attribute = $1 ORDER BY id"),
                &[&attribute],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(rotation_from).collect()
    }

    async fn enroll(&self, p: &PersonRecord, ev: AuditEvent) -> StoreResult<()> {
        let p_owned: PersonRecord = p.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let p: &PersonRecord = &p_owned;

                if person_known(tx, &p.gid).await? {
                    return Err(StoreError::AlreadyExists(format!(
                        "person {} is already enrolled",
                        gid_hex(&p.gid)
                    )));
                }
                let taken = tx
                    .query_opt(
                        "SELECT 1 FROM people WHERE registry = $1 AND subject = $2",
                        &[&p.registry, &p.subject],
                    )
                    .await
                    .map_err(pg_err)?;
                if taken.is_some() {
                    return Err(StoreError::AlreadyExists(format!(
                        "subject {:?} of registry {:?} is already enrolled under another GID",
                        p.subject, p.registry
                    )));
                }
                tx.execute(
                    &format!("INSERT INTO people ({PERSON_COLS}) VALUES ($1, $2, $3, $4, $5, $6)"),
                    &[
                        &p.gid.as_slice(),
                        &p.registry,
                        &p.subject,
                        &p.request_key.as_slice(),
                        &p.roles,
                        &p.enrolled_at,
                    ],
                )
                .await
                .map_err(pg_err)?;
                append(tx, &ev).await?;
                Ok(())
            })
        })
        .await
    }

    async fn person(&self, gid: &[u8; 32]) -> StoreResult<Option<PersonRecord>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {PERSON_COLS} FROM people WHERE gid = $1"))
            .await
            .map_err(pg_err)?;
        let row = client
            .query_opt(&stmt, &[&gid.as_slice()])
            .await
            .map_err(pg_err)?;
        row.as_ref().map(person_from).transpose()
    }

    async fn people(&self) -> StoreResult<Vec<PersonRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {PERSON_COLS} FROM people ORDER BY enrolled_at, gid"),
                &[],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(person_from).collect()
    }

    async fn grant(&self, g: &GrantRecord, ev: AuditEvent) -> StoreResult<()> {
        let g_owned: GrantRecord = g.clone();
        self.write(move |tx| {
            Box::pin(async move {
                let g: &GrantRecord = &g_owned;

                person_exists(tx, &g.gid).await?;
                attribute_exists(tx, &g.attribute).await?;
                if active_grant_exists(tx, &g.gid, &g.attribute).await? {
                    return Err(StoreError::AlreadyExists(format!(
                        "{} already holds an active grant of {}",
                        gid_hex(&g.gid),
                        g.attribute
                    )));
                }
                insert_grant(tx, g).await?;
                append(tx, &ev).await?;
                Ok(())
            })
        })
        .await
    }

    async fn revoke_grant(
        &self,
        gid: &[u8; 32],
        attribute: &str,
        ev: AuditEvent,
    ) -> StoreResult<()> {
        let gid_owned: [u8; 32] = *gid;
        let attribute_owned: String = attribute.to_owned();
        self.write(move |tx| {
            Box::pin(async move { end_grant(tx, &gid_owned, &attribute_owned, &ev).await })
        })
        .await
    }

    async fn grants_for(&self, gid: &[u8; 32]) -> StoreResult<Vec<GrantRecord>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(&format!(
                "SELECT {GRANT_COLS} FROM grants WHERE gid = $1 AND revoked_at IS NULL
                 ORDER BY attribute"
            ))
            .await
            .map_err(pg_err)?;
        let rows = client
            .query(&stmt, &[&gid.as_slice()])
            .await
            .map_err(pg_err)?;
        rows.iter().map(grant_from).collect()
    }

    async fn holders(&self, attribute: &str) -> StoreResult<Vec<GrantRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE attribute = $1 AND revoked_at IS NULL
                     ORDER BY granted_at, id"
                ),
                &[&attribute],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(grant_from).collect()
    }

    async fn add_proxy(&self, proxy: &ProxyRecord, ev: AuditEvent) -> StoreResult<()> {
        let p = proxy.clone();
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO proxies (id, endpoint, tls_root, tls_name, added_at)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[&p.id, &p.endpoint, &p.tls_root, &p.tls_name, &p.added_at],
                )
                .await
                .map_err(|e| match pg_err(e) {
                    StoreError::AlreadyExists(_) => {
                        StoreError::AlreadyExists(format!("proxy {} is already registered", p.id))
                    }
                    other => other,
                })?;
                append(tx, &ev).await?;
                Ok(())
            })
        })
        .await
    }

    async fn proxies(&self) -> StoreResult<Vec<ProxyRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, endpoint, tls_root, tls_name, added_at FROM proxies ORDER BY id",
                &[],
            )
            .await
            .map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                Ok(ProxyRecord {
                    id: get(r, 0)?,
                    endpoint: get(r, 1)?,
                    tls_root: get(r, 2)?,
                    tls_name: get(r, 3)?,
                    added_at: get(r, 4)?,
                })
            })
            .collect()
    }

    async fn record_freeze(&self, progress: &RotationProgress) -> StoreResult<RotationProgress> {
        let p = progress.clone();
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO rotation_proxies (rotation_id, proxy_id, snapshot_root, rows_total,
                         rows_done, frozen_at, updated_at, done_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, NULL)
                     ON CONFLICT (rotation_id, proxy_id) DO NOTHING",
                    &[
                        &p.rotation_id,
                        &p.proxy_id,
                        &p.snapshot_root.as_slice(),
                        &p.rows_total,
                        &p.rows_done,
                        &p.frozen_at,
                        &p.updated_at,
                    ],
                )
                .await
                .map_err(pg_err)?;
                let stored = progress_rows(tx, p.rotation_id, Some(&p.proxy_id))
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| StoreError::Backend("freeze record vanished".into()))?;
                check_same_snapshot(&stored, &p)?;
                Ok(stored)
            })
        })
        .await
    }

    async fn record_progress(
        &self,
        rotation_id: i64,
        proxy_id: &str,
        rows_done: i64,
        at: i64,
        done: Option<AuditEvent>,
    ) -> StoreResult<()> {
        let proxy_id = proxy_id.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let changed = tx
                    .execute(
                        "UPDATE rotation_proxies
                         SET rows_done = GREATEST(rows_done, $1), updated_at = $2,
                             done_at = CASE WHEN $3 THEN COALESCE(done_at, $2) ELSE done_at END
                         WHERE rotation_id = $4 AND proxy_id = $5",
                        &[&rows_done, &at, &done.is_some(), &rotation_id, &proxy_id],
                    )
                    .await
                    .map_err(pg_err)?;
                if changed == 0 {
                    return Err(StoreError::NotFound(format!(
                        "rotation {rotation_id} was not frozen at proxy {proxy_id}"
                    )));
                }
                if let Some(ev) = &done {
                    append(tx, ev).await?;
                }
                Ok(())
            })
        })
        .await
    }

    async fn claim_chunk(
        &self,
        lease: &ChunkLease,
        chunks: u32,
        now: i64,
        lease_until: i64,
    ) -> StoreResult<Option<u32>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let all: Vec<i32> = (0..i32::try_from(chunks).unwrap_or(i32::MAX)).collect();
        tx.execute(
            "INSERT INTO rotation_chunks (rotation_id, proxy_id, chunk)
             SELECT $1, $2, c FROM unnest($3::int[]) AS c
             ON CONFLICT DO NOTHING",
            &[&lease.rotation_id, &lease.proxy_id, &all],
        )
        .await
        .map_err(pg_err)?;
        // SKIP LOCKED: replicas claiming at the same moment get different chunks.
        let row = tx
            .query_opt(
                "SELECT chunk FROM rotation_chunks
                 WHERE rotation_id = $1 AND proxy_id = $2 AND done_at IS NULL
                   AND (owner = '' OR owner = $3 OR lease_until < $4)
                 ORDER BY chunk LIMIT 1
                 FOR UPDATE SKIP LOCKED",
                &[&lease.rotation_id, &lease.proxy_id, &lease.owner, &now],
            )
            .await
            .map_err(pg_err)?;
        let claimed = match row {
            Some(r) => {
                let chunk: i32 = r.try_get(0).map_err(pg_err)?;
                tx.execute(
                    "UPDATE rotation_chunks SET owner = $4, lease_until = $5
                     WHERE rotation_id = $1 AND proxy_id = $2 AND chunk = $3",
                    &[
                        &lease.rotation_id,
                        &lease.proxy_id,
                        &chunk,
                        &lease.owner,
                        &lease_until,
                    ],
                )
                .await
                .map_err(pg_err)?;
                Some(u32::try_from(chunk).map_err(|_| StoreError::Corrupt("chunk number".into()))?)
            }
            None => None,
        };
        tx.commit().await.map_err(pg_err)?;
        Ok(claimed)
    }

    async fn update_chunk(
        &self,
        lease: &ChunkLease,
        chunk: u32,
        lease_until: i64,
        done_at: Option<i64>,
    ) -> StoreResult<bool> {
        let client = self.client().await?;
        let chunk = i32::try_from(chunk).map_err(|_| StoreError::Corrupt("chunk number".into()))?;
        let changed = client
            .execute(
                "UPDATE rotation_chunks SET lease_until = $4, done_at = $5
                 WHERE rotation_id = $1 AND proxy_id = $2 AND chunk = $3 AND owner = $6
                   AND done_at IS NULL",
                &[
                    &lease.rotation_id,
                    &lease.proxy_id,
                    &chunk,
                    &lease_until,
                    &done_at,
                    &lease.owner,
                ],
            )
            .await
            .map_err(pg_err)?;
        Ok(changed == 1)
    }

    async fn chunk_counts(&self, rotation_id: i64, proxy_id: &str) -> StoreResult<(u32, u32)> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(done_at), COUNT(*) FROM rotation_chunks
                 WHERE rotation_id = $1 AND proxy_id = $2",
                &[&rotation_id, &proxy_id],
            )
            .await
            .map_err(pg_err)?;
        let done: i64 = row.try_get(0).map_err(pg_err)?;
        let all: i64 = row.try_get(1).map_err(pg_err)?;
        Ok((
            u32::try_from(done).unwrap_or(u32::MAX),
            u32::try_from(all).unwrap_or(u32::MAX),
        ))
    }

    async fn rotation_progress(&self, rotation_id: i64) -> StoreResult<Vec<RotationProgress>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let out = progress_rows(&tx, rotation_id, None).await?;
        tx.commit().await.map_err(pg_err)?;
        Ok(out)
    }

    async fn expired_grants(&self, at: i64) -> StoreResult<Vec<GrantRecord>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {GRANT_COLS} FROM grants
                     WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= $1
                     ORDER BY expires_at, id"
                ),
                &[&at],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(grant_from).collect()
    }

    async fn create_request(
        &self,
        gid: &[u8; 32],
        attribute: &str,
        reason: &str,
        created_at: i64,
        ev: AuditEvent,
    ) -> StoreResult<RequestRecord> {
        let gid_owned: [u8; 32] = *gid;
        let attribute_owned: String = attribute.to_owned();
        let reason_owned: String = reason.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let gid: &[u8; 32] = &gid_owned;
                let attribute: &str = &attribute_owned;
                let reason: &str = &reason_owned;

                person_exists(tx, gid).await?;
                attribute_exists(tx, attribute).await?;
                let row = tx
                    .query_one(
                        "INSERT INTO requests (gid, attribute, reason, state, created_at)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                        &[
                            &gid.as_slice(),
                            &attribute,
                            &reason,
                            &RequestState::Pending.as_str(),
                            &created_at,
                        ],
                    )
                    .await
                    .map_err(pg_err)?;
                let id: i64 = get(&row, 0)?;
                append(tx, &ev).await?;
                Ok(RequestRecord {
                    id,
                    gid: *gid,
                    attribute: attribute.to_owned(),
                    reason: reason.to_owned(),
                    state: RequestState::Pending,
                    created_at,
                    decided_by: None,
                    decided_at: None,
                    note: None,
                })
            })
        })
        .await
    }

    async fn requests(&self, state: Option<RequestState>) -> StoreResult<Vec<RequestRecord>> {
        let client = self.client().await?;
        let state = state.map(RequestState::as_str);
        let rows = client
            .query(
                &format!(
                    "SELECT {REQUEST_COLS} FROM requests
                     WHERE $1::TEXT IS NULL OR state = $1::TEXT ORDER BY id"
                ),
                &[&state],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(request_from).collect()
    }

    async fn requests_page(
        &self,
        filter: &RequestFilter,
        after_id: i64,
        limit: i64,
    ) -> StoreResult<Vec<RequestRecord>> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let state = filter.state.map(RequestState::as_str);
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT {REQUEST_COLS} FROM requests
                     WHERE ($1::TEXT IS NULL OR state = $1::TEXT)
                       AND ($2::TEXT IS NULL OR attribute = $2::TEXT)
                       AND id > $3
                     ORDER BY id LIMIT $4"
                ),
                &[&state, &filter.attribute, &after_id, &limit],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(request_from).collect()
    }

    async fn count_requests(&self, filter: &RequestFilter) -> StoreResult<i64> {
        let state = filter.state.map(RequestState::as_str);
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) FROM requests
                 WHERE ($1::TEXT IS NULL OR state = $1::TEXT)
                   AND ($2::TEXT IS NULL OR attribute = $2::TEXT)",
                &[&state, &filter.attribute],
            )
            .await
            .map_err(pg_err)?;
        get(&row, 0)
    }

    async fn decide_request(
        &self,
        id: i64,
        approve: bool,
        decided_by: &str,
        note: &str,
        decided_at: i64,
        ev: AuditEvent,
        nonce: Option<NonceUse>,
    ) -> StoreResult<RequestRecord> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let decision = Decision {
            id,
            approve,
            decided_by: decided_by.to_owned(),
            note: note.to_owned(),
            decided_at,
            ev,
            nonce,
        };
        self.enqueue(Queued::Decide(Box::new(DecideJob { decision, reply })))?;
        answer
            .await
            .map_err(|_| StoreError::Backend("the write was dropped before it ran".to_owned()))??
    }

    async fn use_nonce(
        &self,
        gid: &[u8; 32],
        nonce: &[u8],
        seen_at: i64,
        prune_before: i64,
    ) -> StoreResult<bool> {
        // Every signed key request spends one: the same statements as
        // `spend_nonce`, prepared once per pooled connection.
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let prune = tx.prepare_cached(PRUNE_NONCES).await.map_err(pg_err)?;
        let insert = tx.prepare_cached(INSERT_NONCE).await.map_err(pg_err)?;
        tx.execute(&prune, &[&prune_before]).await.map_err(pg_err)?;
        let inserted = tx
            .execute(&insert, &[&gid.as_slice(), &nonce, &seen_at])
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(inserted == 1)
    }

    async fn append_audit(&self, ev: AuditEvent) -> StoreResult<AuditEntry> {
        self.write(move |tx| {
            Box::pin(async move {
                let entry = append(tx, &ev).await?;
                Ok(entry)
            })
        })
        .await
    }

    async fn audit_entries(&self, from: i64, limit: i64) -> StoreResult<Vec<AuditEntry>> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {AUDIT_COLS} FROM audit WHERE seq >= $1 ORDER BY seq LIMIT $2"),
                &[&from, &limit],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(audit_from).collect()
    }

    async fn add_checkpoint(&self, cp: &Checkpoint) -> StoreResult<()> {
        let client = self.client().await?;
        client
            .execute(
                "INSERT INTO checkpoints (seq, hash, ts, signature) VALUES ($1, $2, $3, $4)",
                &[&cp.seq, &cp.hash.as_slice(), &cp.ts, &cp.signature],
            )
            .await
            .map_err(|e| match pg_err(e) {
                StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!(
                    "a checkpoint at entry {} already exists",
                    cp.seq
                )),
                other => other,
            })?;
        Ok(())
    }

    async fn checkpoints(&self) -> StoreResult<Vec<Checkpoint>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT seq, hash, ts, signature FROM checkpoints ORDER BY seq",
                &[],
            )
            .await
            .map_err(pg_err)?;
        rows.iter().map(checkpoint_from).collect()
    }
}
