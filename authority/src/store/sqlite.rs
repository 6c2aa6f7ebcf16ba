//! The SQLite backend: the embedded default, one database file per node.
//!
//! rusqlite is blocking, so every operation runs on
//! [`tokio::task::spawn_blocking`] against one connection behind a mutex.
//! The connection runs with `journal_mode=WAL`, `synchronous=FULL` (an
//! acknowledged write survives a crash or `SIGKILL`), `foreign_keys=ON` and
//! `busy_timeout=5000`. Every mutating operation is one `BEGIN IMMEDIATE`
//! transaction that performs the change and appends its audit entry, so the
//! write lock is held from the moment the chain head is read until the new
//! entry is committed: appends are serialized even across processes that
//! open the same file.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    AttributeRecord, AuditEntry, AuditEvent, AuthorityMeta, Checkpoint, ChunkLease, GrantRecord,
    NewRotation, NonceUse, PersonRecord, ProxyRecord, RequestFilter, RequestRecord, RequestState,
    RotationProgress, RotationRecord, RotationState, Store, StoreError, StoreResult, VersionState,
    check_same_snapshot,
};
use crate::audit::{bounded, entry_hash};

/// Schema migrations, in order: (version, SQL). Each is applied once, in its
/// own transaction together with its `schema_version` row.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/sqlite/0002_rotations.sql"),
    ),
    (3, include_str!("../../migrations/sqlite/0003_proxies.sql")),
    (
        4,
        include_str!("../../migrations/sqlite/0004_rotation_chunks.sql"),
    ),
];

/// How long a writer waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// How long [`SqliteStore::close`] waits for background writes to finish.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// An authority store in one SQLite database file.
///
/// Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct SqliteStore {
    conn: Arc<Mutex<Connection>>,
    /// Writes waiting for the next group commit.
    pending: Arc<Mutex<Vec<Box<dyn PendingWrite>>>>,
    /// Whether a drain task is running (at most one at a time).
    draining: Arc<AtomicBool>,
    location: Arc<str>,
}

/// Most writes committed in one transaction (bounds the latency of the first).
const MAX_GROUP: usize = 512;

/// How a write is answered once the commit's outcome is known
/// (`None`: committed; `Some(reason)`: the commit failed).
type Answer = Box<dyn FnOnce(Option<&str>) + Send>;

/// A queued write: runs inside the group's transaction (in its own
/// savepoint) and is answered only once the group has committed.
trait PendingWrite: Send {
    /// Run in the open transaction; returns how to answer once the commit's
    /// outcome is known (`None`: committed).
    fn run(self: Box<Self>, conn: &Connection) -> Answer;
    /// Answer without running (the connection is unusable).
    fn fail(self: Box<Self>, why: &str);
}

struct WriteJob<T, F> {
    f: F,
    reply: tokio::sync::oneshot::Sender<StoreResult<T>>,
}

impl<T, F> PendingWrite for WriteJob<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
{
    fn run(self: Box<Self>, conn: &Connection) -> Answer {
        let WriteJob { f, reply } = *self;
        let result = in_savepoint(conn, f);
        Box::new(move |commit_error: Option<&str>| {
            let out = match commit_error {
                None => result,
                Some(e) => Err(StoreError::Backend(format!("commit failed: {e}"))),
            };
            let _ = reply.send(out);
        })
    }

    fn fail(self: Box<Self>, why: &str) {
        let _ = self.reply.send(Err(StoreError::Backend(why.to_owned())));
    }
}

/// Run `f` in a savepoint: released if it succeeds, rolled back (leaving the
/// rest of the group intact) if it fails.
fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> StoreResult<T>,
) -> StoreResult<T> {
    conn.execute_batch("SAVEPOINT mabe_write").map_err(db_err)?;
    match f(conn) {
        Ok(v) => {
            conn.execute_batch("RELEASE mabe_write").map_err(db_err)?;
            Ok(v)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO mabe_write; RELEASE mabe_write");
            Err(e)
        }
    }
}

/// Commit every queued write in groups: one `BEGIN IMMEDIATE … COMMIT` (one
/// fsync) per group instead of one per write.
fn drain_groups(conn: &Connection, pending: &Mutex<Vec<Box<dyn PendingWrite>>>) {
    loop {
        let jobs: Vec<Box<dyn PendingWrite>> = match pending.lock() {
            Ok(mut q) => {
                let n = q.len().min(MAX_GROUP);
                q.drain(..n).collect()
            }
            Err(_) => return,
        };
        if jobs.is_empty() {
            return;
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let why = format!("cannot start a transaction: {e}");
            for j in jobs {
                j.fail(&why);
            }
            continue;
        }
        let answers: Vec<_> = jobs.into_iter().map(|j| j.run(conn)).collect();
        match conn.execute_batch("COMMIT") {
            Ok(()) => answers.into_iter().for_each(|a| a(None)),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let why = e.to_string();
                answers.into_iter().for_each(|a| a(Some(&why)));
            }
        }
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Open (creating if needed) the database file at `path`, set the
    /// connection's pragmas and apply any missing migrations.
    ///
    /// Fails with [`StoreError::Corrupt`] if the database was written by a
    /// newer build (its schema version is higher than this code knows).
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path).map_err(|e| {
            StoreError::Backend(format!(
                "cannot open SQLite database {}: {e}",
                path.display()
            ))
        })?;
        Self::setup(conn, path.display().to_string(), true)
    }

    /// A private in-memory database (tests, experiments). Nothing survives
    /// the store being dropped.
    pub fn open_in_memory() -> StoreResult<Self> {
        let conn = Connection::open_in_memory().map_err(|e| {
            StoreError::Backend(format!("cannot open in-memory SQLite database: {e}"))
        })?;
        Self::setup(conn, ":memory:".to_owned(), false)
    }

    fn setup(mut conn: Connection, location: String, file: bool) -> StoreResult<Self> {
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(db_err)?;
        if file && !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Backend(format!(
                "cannot enable WAL journal mode on {location} (the database stays in {mode:?} mode)"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(db_err)?;
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .map_err(db_err)?;
        let foreign_keys: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .map_err(db_err)?;
        // 2 = FULL, 3 = EXTRA (also durable).
        if synchronous < 2 || foreign_keys != 1 {
            return Err(StoreError::Backend(format!(
                "SQLite refused the connection settings (synchronous={synchronous}, foreign_keys={foreign_keys})"
            )));
        }
        migrate(&mut conn)?;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            pending: Arc::new(Mutex::new(Vec::new())),
            draining: Arc::new(AtomicBool::new(false)),
            location: location.into(),
        })
    }

    /// Close the database, so that its files (database and WAL) are
    /// complete and may be moved: waits up to 10 s for background writes to
    /// let go of the connection. Fails if another clone of this store is
    /// still in use after that.
    pub async fn close(self) -> StoreResult<()> {
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        let mut conn = self.conn;
        loop {
            match Arc::try_unwrap(conn) {
                Ok(mutex) => {
                    let c = mutex.into_inner().map_err(|_| {
                        StoreError::Backend(
                            "the SQLite connection is unusable: a previous operation panicked \
                             while holding it"
                                .to_owned(),
                        )
                    })?;
                    return c.close().map_err(|(_, e)| db_err(e));
                }
                Err(shared) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(StoreError::Backend(format!(
                            "cannot close {}: the connection is still in use",
                            self.location
                        )));
                    }
                    conn = shared;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// Run `f` with the connection on the blocking thread pool.
    async fn call<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().map_err(|_| {
                StoreError::Backend(
                    "the SQLite connection is unusable: a previous operation panicked while holding it"
                        .to_owned(),
                )
            })?;
            f(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("SQLite worker task failed: {e}")))?
    }

    /// Make sure a drain task is running: the first write to find none
    /// starts one; it commits groups until the queue is empty. Callers only
    /// wait for their own answer, sent as soon as their group commits.
    fn kick(&self) {
        if self
            .draining
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let conn = Arc::clone(&self.conn);
        let pending = Arc::clone(&self.pending);
        let draining = Arc::clone(&self.draining);
        tokio::task::spawn_blocking(move || {
            loop {
                match conn.lock() {
                    Ok(guard) => drain_groups(&guard, &pending),
                    Err(_) => {
                        if let Ok(mut q) = pending.lock() {
                            for j in q.drain(..) {
                                j.fail("the SQLite connection is unusable: a previous operation panicked while holding it");
                            }
                        }
                    }
                }
                draining.store(false, Ordering::Release);
                // A write queued after the last look at the queue but before
                // the flag was cleared found a drain running: take it too.
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

    /// Run `f` as one atomic write, with group commit: writes that arrive
    /// while a transaction is committing are queued, and the next worker to
    /// get the connection commits all of them in one transaction, each in its
    /// own savepoint (a failing write rolls back alone). Every caller is
    /// answered as soon as the transaction holding its write has committed.
    async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| StoreError::Backend("the SQLite write queue is unusable".to_owned()))?
            .push(Box::new(WriteJob { f, reply }));
        self.kick();
        answer
            .await
            .map_err(|_| StoreError::Backend("the write was dropped before it ran".to_owned()))?
    }
}

/// Apply every migration newer than the database's schema version, refusing
/// a database from a newer build.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER NOT NULL PRIMARY KEY,
             applied_at INTEGER NOT NULL
         ) STRICT",
    )
    .map_err(db_err)?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    if current > latest {
        return Err(StoreError::Corrupt(format!(
            "database schema {current} is newer than this build ({latest})"
        )));
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.execute_batch(sql)
            .map_err(|e| StoreError::Backend(format!("migration {version} failed: {e}")))?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
            params![version, unix_now()],
        )
        .map_err(db_err)?;
    }
    tx.commit().map_err(db_err)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

/// Map a rusqlite error: unique violations to `AlreadyExists`, foreign-key
/// violations to `NotFound`, undecodable values to `Corrupt`.
fn db_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ffi;
    match &e {
        rusqlite::Error::SqliteFailure(f, msg)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            let detail = msg.clone().unwrap_or_else(|| e.to_string());
            match f.extended_code {
                ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                    StoreError::AlreadyExists(detail)
                }
                ffi::SQLITE_CONSTRAINT_FOREIGNKEY => {
                    StoreError::NotFound(format!("a referenced row does not exist ({detail})"))
                }
                _ => StoreError::Backend(detail),
            }
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::Backend(e.to_string()),
    }
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

// ---- row decoding: read raw columns, then validate into records ----

const META_COLS: &str =
    "authority_id, identity_public_key, identity_secret_sealed, admin_public_key, created_at";

type RawMeta = (String, Vec<u8>, Vec<u8>, Vec<u8>, i64);

fn meta_row(r: &Row<'_>) -> rusqlite::Result<RawMeta> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn meta_from(raw: RawMeta) -> StoreResult<AuthorityMeta> {
    let (authority_id, identity_pk, identity_secret_sealed, admin_pk, created_at) = raw;
    Ok(AuthorityMeta {
        authority_id,
        identity_public_key: to32(&identity_pk, "identity public key")?,
        identity_secret_sealed,
        admin_public_key: to32(&admin_pk, "admin public key")?,
        created_at,
    })
}

const ATTR_COLS: &str = "attribute, version, public_key, secret_sealed, state, created_at";

type RawAttr = (String, i64, Vec<u8>, Vec<u8>, String, i64);

fn attr_row(r: &Row<'_>) -> rusqlite::Result<RawAttr> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn attr_from(raw: RawAttr) -> StoreResult<AttributeRecord> {
    let (attribute, version, public_key, secret_sealed, state, created_at) = raw;
    Ok(AttributeRecord {
        version: version_from(&attribute, version)?,
        state: VersionState::parse(&state)?,
        attribute,
        public_key,
        secret_sealed,
        created_at,
    })
}

const PERSON_COLS: &str = "gid, registry, subject, request_key, roles, enrolled_at";

type RawPerson = (Vec<u8>, String, String, Vec<u8>, String, i64);

fn person_row(r: &Row<'_>) -> rusqlite::Result<RawPerson> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn person_from(raw: RawPerson) -> StoreResult<PersonRecord> {
    let (gid, registry, subject, request_key, roles, enrolled_at) = raw;
    Ok(PersonRecord {
        gid: to32(&gid, "person GID")?,
        registry,
        subject,
        request_key: to32(&request_key, "person request key")?,
        roles,
        enrolled_at,
    })
}

const GRANT_COLS: &str = "gid, attribute, granted_by, granted_at, expires_at";

type RawGrant = (Vec<u8>, String, String, i64, Option<i64>);

fn grant_row(r: &Row<'_>) -> rusqlite::Result<RawGrant> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn grant_from(raw: RawGrant) -> StoreResult<GrantRecord> {
    let (gid, attribute, granted_by, granted_at, expires_at) = raw;
    Ok(GrantRecord {
        gid: to32(&gid, "grant GID")?,
        attribute,
        granted_by,
        granted_at,
        expires_at,
    })
}

const REQUEST_COLS: &str =
    "id, gid, attribute, reason, state, created_at, decided_by, decided_at, note";

type RawRequest = (
    i64,
    Vec<u8>,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn request_row(r: &Row<'_>) -> rusqlite::Result<RawRequest> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn request_from(raw: RawRequest) -> StoreResult<RequestRecord> {
    let (id, gid, attribute, reason, state, created_at, decided_by, decided_at, note) = raw;
    Ok(RequestRecord {
        id,
        gid: to32(&gid, "request GID")?,
        attribute,
        reason,
        state: RequestState::parse(&state)?,
        created_at,
        decided_by,
        decided_at,
        note,
    })
}

const ROTATION_COLS: &str = "id, attribute, from_version, to_version, state, reason,
     update_secret_sealed, created_at, finished_at";

type RawRotation = (
    i64,
    String,
    i64,
    i64,
    String,
    String,
    Option<Vec<u8>>,
    i64,
    Option<i64>,
);

fn rotation_row(r: &Row<'_>) -> rusqlite::Result<RawRotation> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn rotation_from(raw: RawRotation) -> StoreResult<RotationRecord> {
    let (id, attribute, from, to, state, reason, sealed, created_at, finished_at) = raw;
    let version = |v: i64| {
        u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("rotation {id} version {v}")))
    };
    Ok(RotationRecord {
        id,
        attribute,
        from_version: version(from)?,
        to_version: version(to)?,
        state: RotationState::parse(&state)?,
        reason,
        update_secret_sealed: sealed,
        created_at,
        finished_at,
    })
}

fn rotation_by_id(conn: &Connection, id: i64) -> StoreResult<RotationRecord> {
    query_all(
        conn,
        &format!("SELECT {ROTATION_COLS} FROM rotations WHERE id = ?1"),
        params![id],
        rotation_row,
        rotation_from,
    )?
    .into_iter()
    .next()
    .ok_or_else(|| StoreError::NotFound(format!("rotation {id}")))
}

const AUDIT_COLS: &str = "seq, ts, kind, actor, subject, attribute, detail, prev_hash, hash";

type RawAudit = (
    i64,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    Vec<u8>,
    Vec<u8>,
);

fn audit_row(r: &Row<'_>) -> rusqlite::Result<RawAudit> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn audit_from(raw: RawAudit) -> StoreResult<AuditEntry> {
    let (seq, ts, kind, actor, subject, attribute, detail, prev_hash, hash) = raw;
    Ok(AuditEntry {
        seq,
        prev_hash: to32(&prev_hash, &format!("audit entry {seq} previous hash"))?,
        hash: to32(&hash, &format!("audit entry {seq} hash"))?,
        event: AuditEvent {
            ts,
            kind,
            actor,
            subject,
            attribute,
            detail,
        },
    })
}

/// Run a query and decode every row.
fn query_all<R, T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    row: fn(&Row<'_>) -> rusqlite::Result<R>,
    decode: fn(R) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let raws = stmt
        .query_map(params, row)
        .map_err(db_err)?
        .collect::<rusqlite::Result<Vec<R>>>()
        .map_err(db_err)?;
    raws.into_iter().map(decode).collect()
}

/// Whether a query returns at least one row.
fn exists(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> StoreResult<bool> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    stmt.exists(params).map_err(db_err)
}

/// Append `ev` (within the audit size limits, [`bounded`]) to the audit
/// chain inside the caller's (immediate) transaction.
fn append(conn: &Connection, ev: &AuditEvent) -> StoreResult<AuditEntry> {
    let within = bounded(ev);
    let ev: &AuditEvent = &within;
    let last: Option<(i64, Vec<u8>)> = conn
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .map_err(db_err)?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(db_err)?;
    let (seq, prev_hash) = match last {
        None => (1, [0u8; 32]),
        Some((seq, hash)) => (
            seq.checked_add(1)
                .ok_or_else(|| StoreError::Corrupt(format!("audit sequence {seq} cannot grow")))?,
            to32(&hash, &format!("audit entry {seq} hash"))?,
        ),
    };
    let hash = entry_hash(seq, &prev_hash, ev);
    conn.prepare_cached(
        "INSERT INTO audit (seq, ts, kind, actor, subject, attribute, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .map_err(db_err)?
    .execute(params![
        seq,
        ev.ts,
        ev.kind,
        ev.actor,
        ev.subject,
        ev.attribute,
        ev.detail,
        &prev_hash[..],
        &hash[..],
    ])
    .map_err(db_err)?;
    Ok(AuditEntry {
        seq,
        event: ev.clone(),
        prev_hash,
        hash,
    })
}

fn person_exists(conn: &Connection, gid: &[u8; 32]) -> StoreResult<()> {
    if exists(
        conn,
        "SELECT 1 FROM people WHERE gid = ?1",
        params![&gid[..]],
    )? {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!(
            "person {} is not enrolled",
            gid_hex(gid)
        )))
    }
}

fn attribute_exists(conn: &Connection, attribute: &str) -> StoreResult<()> {
    if exists(
        conn,
        "SELECT 1 FROM attributes WHERE attribute = ?1",
        params![attribute],
    )? {
        Ok(())
    } else {
        Err(StoreError::NotFound(format!(
            "attribute {attribute} does not exist"
        )))
    }
}

fn active_grant_exists(conn: &Connection, gid: &[u8; 32], attribute: &str) -> StoreResult<bool> {
    exists(
        conn,
        "SELECT 1 FROM grants WHERE gid = ?1 AND attribute = ?2 AND revoked_at IS NULL",
        params![&gid[..], attribute],
    )
}

fn insert_grant(conn: &Connection, g: &GrantRecord) -> StoreResult<()> {
    conn.prepare_cached(
        "INSERT INTO grants (gid, attribute, granted_by, granted_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(db_err)?
    .execute(params![
        &g.gid[..],
        g.attribute,
        g.granted_by,
        g.granted_at,
        g.expires_at
    ])
    .map_err(|e| match db_err(e) {
        StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!(
            "{} already holds an active grant of {}",
            gid_hex(&g.gid),
            g.attribute
        )),
        other => other,
    })?;
    Ok(())
}

/// Progress rows of a rotation (one proxy's, or all, by proxy id).
fn progress_rows(
    conn: &Connection,
    rotation_id: i64,
    proxy: Option<&str>,
) -> StoreResult<Vec<RotationProgress>> {
    type Raw = (i64, String, Vec<u8>, i64, i64, i64, i64, Option<i64>);
    query_all(
        conn,
        "SELECT rotation_id, proxy_id, snapshot_root, rows_total, rows_done, frozen_at,
                updated_at, done_at
         FROM rotation_proxies WHERE rotation_id = ?1 AND (?2 IS NULL OR proxy_id = ?2)
         ORDER BY proxy_id",
        params![rotation_id, proxy],
        |r| -> rusqlite::Result<Raw> {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        },
        |(rotation_id, proxy_id, root, rows_total, rows_done, frozen_at, updated_at, done_at)| {
            Ok(RotationProgress {
                rotation_id,
                proxy_id,
                snapshot_root: to32(&root, "snapshot root")?,
                rows_total,
                rows_done,
                frozen_at,
                updated_at,
                done_at,
            })
        },
    )
}

/// Record a nonce (forgetting old ones); `false` if it was seen before.
fn spend_nonce(conn: &Connection, n: &NonceUse) -> StoreResult<bool> {
    conn.prepare_cached("DELETE FROM nonces WHERE seen_at < ?1")
        .map_err(db_err)?
        .execute(params![n.prune_before])
        .map_err(db_err)?;
    let inserted = conn
        .prepare_cached(
            "INSERT INTO nonces (gid, nonce, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (gid, nonce) DO NOTHING",
        )
        .map_err(db_err)?
        .execute(params![&n.space[..], n.nonce, n.seen_at])
        .map_err(db_err)?;
    Ok(inserted == 1)
}

/// End an active grant and audit it (`NotFound` if there is none).
fn end_grant(
    conn: &Connection,
    gid: &[u8; 32],
    attribute: &str,
    ev: &AuditEvent,
) -> StoreResult<()> {
    let changed = conn
        .prepare_cached(
            "UPDATE grants SET revoked_at = ?1
             WHERE gid = ?2 AND attribute = ?3 AND revoked_at IS NULL",
        )
        .map_err(db_err)?
        .execute(params![ev.ts, &gid[..], attribute])
        .map_err(db_err)?;
    if changed == 0 {
        return Err(StoreError::NotFound(format!(
            "{} holds no active grant of {attribute}",
            gid_hex(gid)
        )));
    }
    append(conn, ev)?;
    Ok(())
}

fn load_request(conn: &Connection, id: i64) -> StoreResult<Option<RequestRecord>> {
    let raw = conn
        .prepare_cached(&format!(
            "SELECT {REQUEST_COLS} FROM requests WHERE id = ?1"
        ))
        .map_err(db_err)?
        .query_row(params![id], request_row)
        .optional()
        .map_err(db_err)?;
    raw.map(request_from).transpose()
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn init_meta(&self, meta: &AuthorityMeta, ev: AuditEvent) -> StoreResult<()> {
        let meta = meta.clone();
        self.write(move |tx| {
            if exists(tx, "SELECT 1 FROM meta", [])? {
                return Err(StoreError::AlreadyExists(
                    "the authority is already initialised".to_owned(),
                ));
            }
            tx.execute(
                &format!("INSERT INTO meta (id, {META_COLS}) VALUES (1, ?1, ?2, ?3, ?4, ?5)"),
                params![
                    meta.authority_id,
                    &meta.identity_public_key[..],
                    meta.identity_secret_sealed,
                    &meta.admin_public_key[..],
                    meta.created_at
                ],
            )
            .map_err(db_err)?;
            append(tx, &ev)?;
            Ok(())
        })
        .await
    }

    async fn meta(&self) -> StoreResult<Option<AuthorityMeta>> {
        self.call(|conn| {
            let raw = conn
                .query_row(
                    &format!("SELECT {META_COLS} FROM meta WHERE id = 1"),
                    [],
                    meta_row,
                )
                .optional()
                .map_err(db_err)?;
            raw.map(meta_from).transpose()
        })
        .await
    }

    async fn create_attribute(&self, rec: &AttributeRecord, ev: AuditEvent) -> StoreResult<()> {
        let rec = rec.clone();
        self.write(move |tx| {
            if rec.version != 1 {
                return Err(StoreError::Conflict(format!(
                    "a new attribute starts at version 1, not {}",
                    rec.version
                )));
            }
            if exists(
                tx,
                "SELECT 1 FROM attributes WHERE attribute = ?1",
                params![rec.attribute],
            )? {
                return Err(StoreError::AlreadyExists(format!(
                    "attribute {} already exists",
                    rec.attribute
                )));
            }
            tx.prepare_cached(&format!(
                "INSERT INTO attributes ({ATTR_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .map_err(db_err)?
            .execute(params![
                rec.attribute,
                i64::from(rec.version),
                rec.public_key,
                rec.secret_sealed,
                VersionState::Current.as_str(),
                rec.created_at
            ])
            .map_err(db_err)?;
            append(tx, &ev)?;
            Ok(())
        })
        .await
    }

    async fn rotate_attribute(
        &self,
        rec: &AttributeRecord,
        rotation: &NewRotation,
        ev: AuditEvent,
    ) -> StoreResult<RotationRecord> {
        let rec = rec.clone();
        let rotation = rotation.clone();
        self.write(move |tx| {
            for (gid, ev) in &rotation.revoke {
                end_grant(tx, gid, &rec.attribute, ev)?;
            }
            let current: Option<i64> = tx
                .prepare_cached("SELECT MAX(version) FROM attributes WHERE attribute = ?1")
                .map_err(db_err)?
                .query_row(params![rec.attribute], |r| r.get(0))
                .map_err(db_err)?;
            let Some(current) = current else {
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
            tx.prepare_cached(
                "UPDATE attributes SET state = ?1 WHERE attribute = ?2 AND state = ?3",
            )
            .map_err(db_err)?
            .execute(params![
                VersionState::Superseded.as_str(),
                rec.attribute,
                VersionState::Current.as_str()
            ])
            .map_err(db_err)?;
            tx.prepare_cached(&format!(
                "INSERT INTO attributes ({ATTR_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .map_err(db_err)?
            .execute(params![
                rec.attribute,
                i64::from(rec.version),
                rec.public_key,
                rec.secret_sealed,
                VersionState::Current.as_str(),
                rec.created_at
            ])
            .map_err(db_err)?;
            tx.prepare_cached(
                "INSERT INTO rotations (attribute, from_version, to_version, state, reason,
                     update_secret_sealed, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(db_err)?
            .execute(params![
                rec.attribute,
                current,
                i64::from(rec.version),
                RotationState::Pending.as_str(),
                rotation.reason,
                rotation.update_secret_sealed,
                rec.created_at
            ])
            .map_err(db_err)?;
            let id = tx.last_insert_rowid();
            append(tx, &ev)?;
            rotation_by_id(tx, id)
        })
        .await
    }

    async fn rotations(&self, pending_only: bool) -> StoreResult<Vec<RotationRecord>> {
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {ROTATION_COLS} FROM rotations
                     WHERE ?1 = 0 OR state = 'pending' ORDER BY id"
                ),
                params![i64::from(pending_only)],
                rotation_row,
                rotation_from,
            )
        })
        .await
    }

    async fn finish_rotation(
        &self,
        id: i64,
        finished_at: i64,
        ev: AuditEvent,
    ) -> StoreResult<RotationRecord> {
        self.write(move |tx| {
            let current = rotation_by_id(tx, id)?;
            if current.state == RotationState::Done {
                return Err(StoreError::Conflict(format!(
                    "rotation {id} is already done"
                )));
            }
            tx.prepare_cached(
                "UPDATE rotations SET state = 'done', update_secret_sealed = NULL,
                     finished_at = ?1 WHERE id = ?2",
            )
            .map_err(db_err)?
            .execute(params![finished_at, id])
            .map_err(db_err)?;
            append(tx, &ev)?;
            rotation_by_id(tx, id)
        })
        .await
    }

    async fn attributes(&self) -> StoreResult<Vec<AttributeRecord>> {
        self.call(|conn| {
            query_all(
                conn,
                &format!("SELECT {ATTR_COLS} FROM attributes ORDER BY attribute, version"),
                [],
                attr_row,
                attr_from,
            )
        })
        .await
    }

    async fn attribute_versions(&self, attribute: &str) -> StoreResult<Vec<AttributeRecord>> {
        let attribute = attribute.to_owned();
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {ATTR_COLS} FROM attributes WHERE attribute = ?1 ORDER BY version"
                ),
                params![attribute],
                attr_row,
                attr_from,
            )
        })
        .await
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
        let (attribute, version) = after.map_or((String::new(), 0), |(a, v)| (a.to_owned(), v));
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {ATTR_COLS} FROM attributes WHERE (attribute, version) > (?1, ?2)
                     ORDER BY attribute, version LIMIT ?3"
                ),
                params![attribute, i64::from(version), limit],
                attr_row,
                attr_from,
            )
        })
        .await
    }

    async fn attribute_rotations(&self, attribute: &str) -> StoreResult<Vec<RotationRecord>> {
        let attribute = attribute.to_owned();
        self.call(move |conn| {
            query_all(
                conn,
                &format!("SELECT {ROTATION_COLS} FROM rotations WHERE attribute = ?1 ORDER BY id"),
                params![attribute],
                rotation_row,
                rotation_from,
            )
        })
        .await
    }

    async fn enroll(&self, person: &PersonRecord, ev: AuditEvent) -> StoreResult<()> {
        let p = person.clone();
        self.write(move |tx| {
            if exists(
                tx,
                "SELECT 1 FROM people WHERE gid = ?1",
                params![&p.gid[..]],
            )? {
                return Err(StoreError::AlreadyExists(format!(
                    "person {} is already enrolled",
                    gid_hex(&p.gid)
                )));
            }
            if exists(
                tx,
                "SELECT 1 FROM people WHERE registry = ?1 AND subject = ?2",
                params![p.registry, p.subject],
            )? {
                return Err(StoreError::AlreadyExists(format!(
                    "subject {:?} of registry {:?} is already enrolled under another GID",
                    p.subject, p.registry
                )));
            }
            tx.prepare_cached(&format!(
                "INSERT INTO people ({PERSON_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .map_err(db_err)?
            .execute(params![
                &p.gid[..],
                p.registry,
                p.subject,
                &p.request_key[..],
                p.roles,
                p.enrolled_at
            ])
            .map_err(db_err)?;
            append(tx, &ev)?;
            Ok(())
        })
        .await
    }

    async fn person(&self, gid: &[u8; 32]) -> StoreResult<Option<PersonRecord>> {
        let gid = *gid;
        self.call(move |conn| {
            let raw = conn
                .prepare_cached(&format!("SELECT {PERSON_COLS} FROM people WHERE gid = ?1"))
                .map_err(db_err)?
                .query_row(params![&gid[..]], person_row)
                .optional()
                .map_err(db_err)?;
            raw.map(person_from).transpose()
        })
        .await
    }

    async fn people(&self) -> StoreResult<Vec<PersonRecord>> {
        self.call(|conn| {
            query_all(
                conn,
                &format!("SELECT {PERSON_COLS} FROM people ORDER BY enrolled_at, gid"),
                [],
                person_row,
                person_from,
            )
        })
        .await
    }

    async fn grant(&self, grant: &GrantRecord, ev: AuditEvent) -> StoreResult<()> {
        let g = grant.clone();
        self.write(move |tx| {
            person_exists(tx, &g.gid)?;
            attribute_exists(tx, &g.attribute)?;
            if active_grant_exists(tx, &g.gid, &g.attribute)? {
                return Err(StoreError::AlreadyExists(format!(
                    "{} already holds an active grant of {}",
                    gid_hex(&g.gid),
                    g.attribute
                )));
            }
            insert_grant(tx, &g)?;
            append(tx, &ev)?;
            Ok(())
        })
        .await
    }

    async fn revoke_grant(
        &self,
        gid: &[u8; 32],
        attribute: &str,
        ev: AuditEvent,
    ) -> StoreResult<()> {
        let gid = *gid;
        let attribute = attribute.to_owned();
        self.write(move |tx| end_grant(tx, &gid, &attribute, &ev))
            .await
    }

    async fn grants_for(&self, gid: &[u8; 32]) -> StoreResult<Vec<GrantRecord>> {
        let gid = *gid;
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE gid = ?1 AND revoked_at IS NULL
                     ORDER BY attribute"
                ),
                params![&gid[..]],
                grant_row,
                grant_from,
            )
        })
        .await
    }

    async fn holders(&self, attribute: &str) -> StoreResult<Vec<GrantRecord>> {
        let attribute = attribute.to_owned();
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {GRANT_COLS} FROM grants WHERE attribute = ?1 AND revoked_at IS NULL
                     ORDER BY granted_at, id"
                ),
                params![attribute],
                grant_row,
                grant_from,
            )
        })
        .await
    }

    async fn add_proxy(&self, proxy: &ProxyRecord, ev: AuditEvent) -> StoreResult<()> {
        let p = proxy.clone();
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO proxies (id, endpoint, tls_root, tls_name, added_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db_err)?
            .execute(params![
                p.id, p.endpoint, p.tls_root, p.tls_name, p.added_at
            ])
            .map_err(|e| match db_err(e) {
                StoreError::AlreadyExists(_) => {
                    StoreError::AlreadyExists(format!("proxy {} is already registered", p.id))
                }
                other => other,
            })?;
            append(tx, &ev)?;
            Ok(())
        })
        .await
    }

    async fn proxies(&self) -> StoreResult<Vec<ProxyRecord>> {
        self.call(move |conn| {
            query_all(
                conn,
                "SELECT id, endpoint, tls_root, tls_name, added_at FROM proxies ORDER BY id",
                [],
                |r| {
                    Ok(ProxyRecord {
                        id: r.get(0)?,
                        endpoint: r.get(1)?,
                        tls_root: r.get(2)?,
                        tls_name: r.get(3)?,
                        added_at: r.get(4)?,
                    })
                },
                Ok,
            )
        })
        .await
    }

    async fn record_freeze(&self, progress: &RotationProgress) -> StoreResult<RotationProgress> {
        let p = progress.clone();
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO rotation_proxies (rotation_id, proxy_id, snapshot_root, rows_total,
                     rows_done, frozen_at, updated_at, done_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, NULL)
                 ON CONFLICT (rotation_id, proxy_id) DO NOTHING",
            )
            .map_err(db_err)?
            .execute(params![
                p.rotation_id,
                p.proxy_id,
                &p.snapshot_root[..],
                p.rows_total,
                p.rows_done,
                p.frozen_at,
                p.updated_at
            ])
            .map_err(db_err)?;
            let stored = progress_rows(tx, p.rotation_id, Some(&p.proxy_id))?
                .into_iter()
                .next()
                .ok_or_else(|| StoreError::Backend("freeze record vanished".into()))?;
            check_same_snapshot(&stored, &p)?;
            Ok(stored)
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
            let changed = tx
                .prepare_cached(
                    "UPDATE rotation_proxies
                     SET rows_done = MAX(rows_done, ?1), updated_at = ?2,
                         done_at = CASE WHEN ?3 THEN COALESCE(done_at, ?2) ELSE done_at END
                     WHERE rotation_id = ?4 AND proxy_id = ?5",
                )
                .map_err(db_err)?
                .execute(params![
                    rows_done,
                    at,
                    done.is_some(),
                    rotation_id,
                    proxy_id
                ])
                .map_err(db_err)?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!(
                    "rotation {rotation_id} was not frozen at proxy {proxy_id}"
                )));
            }
            if let Some(ev) = &done {
                append(tx, ev)?;
            }
            Ok(())
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
        let lease = lease.clone();
        self.write(move |tx| {
            let mut add = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO rotation_chunks (rotation_id, proxy_id, chunk)
                     VALUES (?1, ?2, ?3)",
                )
                .map_err(db_err)?;
            for chunk in 0..chunks {
                add.execute(params![lease.rotation_id, lease.proxy_id, chunk])
                    .map_err(db_err)?;
            }
            let claimed: Option<i64> = tx
                .prepare_cached(
                    "UPDATE rotation_chunks SET owner = ?3, lease_until = ?5
                     WHERE rotation_id = ?1 AND proxy_id = ?2 AND chunk = (
                         SELECT chunk FROM rotation_chunks
                         WHERE rotation_id = ?1 AND proxy_id = ?2 AND done_at IS NULL
                           AND (owner = '' OR owner = ?3 OR lease_until < ?4)
                         ORDER BY chunk LIMIT 1)
                     RETURNING chunk",
                )
                .map_err(db_err)?
                .query_row(
                    params![
                        lease.rotation_id,
                        lease.proxy_id,
                        lease.owner,
                        now,
                        lease_until
                    ],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            claimed
                .map(|c| u32::try_from(c).map_err(|_| StoreError::Corrupt("chunk number".into())))
                .transpose()
        })
        .await
    }

    async fn update_chunk(
        &self,
        lease: &ChunkLease,
        chunk: u32,
        lease_until: i64,
        done_at: Option<i64>,
    ) -> StoreResult<bool> {
        let lease = lease.clone();
        self.write(move |tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE rotation_chunks SET lease_until = ?4, done_at = ?5
                     WHERE rotation_id = ?1 AND proxy_id = ?2 AND chunk = ?3 AND owner = ?6
                       AND done_at IS NULL",
                )
                .map_err(db_err)?
                .execute(params![
                    lease.rotation_id,
                    lease.proxy_id,
                    chunk,
                    lease_until,
                    done_at,
                    lease.owner
                ])
                .map_err(db_err)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn chunk_counts(&self, rotation_id: i64, proxy_id: &str) -> StoreResult<(u32, u32)> {
        let proxy_id = proxy_id.to_owned();
        self.call(move |conn| {
            let (done, all): (i64, i64) = conn
                .prepare_cached(
                    "SELECT COUNT(done_at), COUNT(*) FROM rotation_chunks
                     WHERE rotation_id = ?1 AND proxy_id = ?2",
                )
                .map_err(db_err)?
                .query_row(params![rotation_id, proxy_id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .map_err(db_err)?;
            Ok((
                u32::try_from(done).unwrap_or(u32::MAX),
                u32::try_from(all).unwrap_or(u32::MAX),
            ))
        })
        .await
    }

    async fn rotation_progress(&self, rotation_id: i64) -> StoreResult<Vec<RotationProgress>> {
        self.call(move |conn| progress_rows(conn, rotation_id, None))
            .await
    }

    async fn expired_grants(&self, at: i64) -> StoreResult<Vec<GrantRecord>> {
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {GRANT_COLS} FROM grants
                     WHERE revoked_at IS NULL AND expires_at IS NOT NULL AND expires_at <= ?1
                     ORDER BY expires_at, id"
                ),
                params![at],
                grant_row,
                grant_from,
            )
        })
        .await
    }

    async fn create_request(
        &self,
        gid: &[u8; 32],
        attribute: &str,
        reason: &str,
        created_at: i64,
        ev: AuditEvent,
    ) -> StoreResult<RequestRecord> {
        let gid = *gid;
        let attribute = attribute.to_owned();
        let reason = reason.to_owned();
        self.write(move |tx| {
            person_exists(tx, &gid)?;
            attribute_exists(tx, &attribute)?;
            tx.prepare_cached(
                "INSERT INTO requests (gid, attribute, reason, state, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .map_err(db_err)?
            .execute(params![
                &gid[..],
                attribute,
                reason,
                RequestState::Pending.as_str(),
                created_at
            ])
            .map_err(db_err)?;
            let id = tx.last_insert_rowid();
            append(tx, &ev)?;
            Ok(RequestRecord {
                id,
                gid,
                attribute,
                reason,
                state: RequestState::Pending,
                created_at,
                decided_by: None,
                decided_at: None,
                note: None,
            })
        })
        .await
    }

    async fn requests(&self, state: Option<RequestState>) -> StoreResult<Vec<RequestRecord>> {
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {REQUEST_COLS} FROM requests WHERE ?1 IS NULL OR state = ?1 ORDER BY id"
                ),
                params![state.map(RequestState::as_str)],
                request_row,
                request_from,
            )
        })
        .await
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
        let attribute = filter.attribute.clone();
        self.call(move |conn| {
            query_all(
                conn,
                &format!(
                    "SELECT {REQUEST_COLS} FROM requests
                     WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR attribute = ?2)
                       AND id > ?3
                     ORDER BY id LIMIT ?4"
                ),
                params![state, attribute, after_id, limit],
                request_row,
                request_from,
            )
        })
        .await
    }

    async fn count_requests(&self, filter: &RequestFilter) -> StoreResult<i64> {
        let state = filter.state.map(RequestState::as_str);
        let attribute = filter.attribute.clone();
        self.call(move |conn| {
            conn.prepare_cached(
                "SELECT COUNT(*) FROM requests
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR attribute = ?2)",
            )
            .map_err(db_err)?
            .query_row(params![state, attribute], |r| r.get(0))
            .map_err(db_err)
        })
        .await
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
        let decided_by = decided_by.to_owned();
        let note = note.to_owned();
        // Refusals after the nonce is spent are returned as `Ok(Err(_))`, so
        // the savepoint keeps the nonce (nothing else was written yet).
        self.write(move |tx| {
            if let Some(n) = &nonce {
                if !spend_nonce(tx, n)? {
                    return Err(StoreError::Replay);
                }
            }
            let Some(mut req) = load_request(tx, id)? else {
                return Ok(Err(StoreError::NotFound(format!(
                    "request {id} does not exist"
                ))));
            };
            if req.state != RequestState::Pending {
                return Ok(Err(StoreError::Conflict(format!(
                    "request {id} was already {}",
                    req.state.as_str()
                ))));
            }
            let state = if approve {
                RequestState::Approved
            } else {
                RequestState::Denied
            };
            tx.prepare_cached(
                "UPDATE requests SET state = ?1, decided_by = ?2, decided_at = ?3, note = ?4
                 WHERE id = ?5",
            )
            .map_err(db_err)?
            .execute(params![state.as_str(), decided_by, decided_at, note, id])
            .map_err(db_err)?;
            if approve && !active_grant_exists(tx, &req.gid, &req.attribute)? {
                insert_grant(
                    tx,
                    &GrantRecord {
                        gid: req.gid,
                        attribute: req.attribute.clone(),
                        granted_by: format!("request:{id}"),
                        granted_at: decided_at,
                        expires_at: None,
                    },
                )?;
            }
            // The entry names whose request it was and for what.
            let mut ev = ev.clone();
            ev.subject.get_or_insert_with(|| hex::encode(req.gid));
            ev.attribute.get_or_insert_with(|| req.attribute.clone());
            append(tx, &ev)?;
            req.state = state;
            req.decided_by = Some(decided_by);
            req.decided_at = Some(decided_at);
            req.note = Some(note);
            Ok(Ok(req))
        })
        .await?
    }

    async fn use_nonce(
        &self,
        gid: &[u8; 32],
        nonce: &[u8],
        seen_at: i64,
        prune_before: i64,
    ) -> StoreResult<bool> {
        let n = NonceUse {
            space: *gid,
            nonce: nonce.to_vec(),
            seen_at,
            prune_before,
        };
        self.write(move |tx| spend_nonce(tx, &n)).await
    }

    async fn append_audit(&self, ev: AuditEvent) -> StoreResult<AuditEntry> {
        self.write(move |tx| append(tx, &ev)).await
    }

    async fn audit_entries(&self, from: i64, limit: i64) -> StoreResult<Vec<AuditEntry>> {
        if limit <= 0 {
            return Ok(Vec::new());
        }
        self.call(move |conn| {
            query_all(
                conn,
                &format!("SELECT {AUDIT_COLS} FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT ?2"),
                params![from, limit],
                audit_row,
                audit_from,
            )
        })
        .await
    }

    async fn add_checkpoint(&self, cp: &Checkpoint) -> StoreResult<()> {
        let cp = cp.clone();
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO checkpoints (seq, hash, ts, signature) VALUES (?1, ?2, ?3, ?4)",
            )
            .map_err(db_err)?
            .execute(params![cp.seq, &cp.hash[..], cp.ts, cp.signature])
            .map_err(|e| match db_err(e) {
                StoreError::AlreadyExists(_) => StoreError::AlreadyExists(format!(
                    "a checkpoint at entry {} already exists",
                    cp.seq
                )),
                other => other,
            })?;
            Ok(())
        })
        .await
    }

    async fn checkpoints(&self) -> StoreResult<Vec<Checkpoint>> {
        self.call(|conn| {
            query_all(
                conn,
                "SELECT seq, hash, ts, signature FROM checkpoints ORDER BY seq",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                |(seq, hash, ts, signature): (i64, Vec<u8>, i64, Vec<u8>)| {
                    Ok(Checkpoint {
                        seq,
                        hash: to32(&hash, &format!("checkpoint {seq} hash"))?,
                        ts,
                        signature,
                    })
                },
            )
        })
        .await
    }
}
