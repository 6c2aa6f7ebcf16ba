//! The SQLite backend: the embedded default, one database file in the data
//! directory.
//!
//! rusqlite is blocking, so no operation runs on an async worker thread, and
//! callers wait for a connection asynchronously, never on a blocking thread.
//!
//! - **Writes** go through one read-write connection behind an async mutex
//!   (FIFO), on [`tokio::task::spawn_blocking`] once they hold it. It runs with `journal_mode=WAL`, `synchronous=FULL` (a committed
//!   transaction survives a crash or `SIGKILL`), `foreign_keys=ON` and
//!   `busy_timeout=5000`. Every write is one `BEGIN IMMEDIATE` transaction,
//!   so writes are serialized, also against other processes opening the same
//!   file (the CLI's `trust add` while `serve` runs).
//! - **Reads** (records, payload chunks, listings, freezes, snapshots, trusted
//!   keys) go through [`DEFAULT_READERS`] read-only connections, each owned
//!   by a thread of its own that takes reads from a queue (no blocking-pool
//!   hop per read). Several reads run at once and none waits for a write: in
//!   WAL mode a reader sees the last commit before its statement (or its
//!   read transaction, for reads of several statements) began, while a
//!   writer appends to the log. A read issued after a write returned sees
//!   that write.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use super::{
    C2Bytes, FreezeInfo, FreezeProgress, GroupOutcome, NewRecord, RecordId, RecordRead,
    RecordSummary, SnapRow, Store, StoredRecord, TokenGroup, TrustedAuthority, UpdatePlan, fixed,
    non_negative, plan_update, small, snapshot_root,
};
use crate::error::{ProxyError, Result};

/// Schema migrations, in order: (version, SQL), each applied once.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/sqlite/0001_init.sql"))];

/// How long a writer waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// Read-only connections (each with its own thread) a store opens by
/// default: reads are short, and more of them do not make two cores faster.
pub const DEFAULT_READERS: usize = 4;

/// Bytes of the database file each reader maps into memory (1 GiB of
/// address space; only touched pages use memory, shared with the OS page
/// cache).
const READER_MMAP_BYTES: i64 = 1 << 30;

/// A proxy store in one SQLite database file. Cheap to clone: clones share
/// the connections.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<tokio::sync::Mutex<Connection>>,
    readers: Arc<ReadPool>,
    location: Arc<str>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("location", &self.location)
            .field("readers", &self.readers.readers.len())
            .finish_non_exhaustive()
    }
}

/// A read, run on a reader thread with its connection.
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// One reader thread: it owns a read-only connection and runs the jobs sent
/// to it in order, until every sender is dropped (the store is dropped).
struct Reader {
    jobs: mpsc::Sender<ReadJob>,
    /// Jobs sent and not yet finished.
    pending: Arc<AtomicUsize>,
}

/// Read-only connections, each owned by its own thread. A read goes to the
/// reader with the fewest pending jobs and its result comes back over a
/// oneshot channel: under load a reader takes the next job without
/// sleeping, so a read costs no thread wake-up (unlike `spawn_blocking`
/// per read, which woke a pool thread every time).
struct ReadPool {
    readers: Vec<Reader>,
}

impl ReadPool {
    fn start(path: &Path, n: usize) -> Result<ReadPool> {
        let mut readers = Vec::with_capacity(n);
        for i in 0..n {
            let conn = open_reader(path)?;
            let (jobs, queue) = mpsc::channel::<ReadJob>();
            let pending = Arc::new(AtomicUsize::new(0));
            let left = Arc::clone(&pending);
            std::thread::Builder::new()
                .name(format!("sqlite-reader-{i}"))
                .spawn(move || {
                    while let Ok(job) = queue.recv() {
                        job(&conn);
                        left.fetch_sub(1, Ordering::Relaxed);
                    }
                })
                .map_err(|e| ProxyError::Backend(format!("cannot start a reader thread: {e}")))?;
            readers.push(Reader { jobs, pending });
        }
        Ok(ReadPool { readers })
    }

    /// Queue `job` on the least busy reader.
    fn submit(&self, job: ReadJob) -> Result<()> {
        let reader = self
            .readers
            .iter()
            .min_by_key(|r| r.pending.load(Ordering::Relaxed))
            .ok_or_else(|| ProxyError::Backend("the SQLite store has no readers".into()))?;
        reader.pending.fetch_add(1, Ordering::Relaxed);
        reader.jobs.send(job).map_err(|_| {
            reader.pending.fetch_sub(1, Ordering::Relaxed);
            ProxyError::Backend("a SQLite reader thread has stopped".into())
        })
    }
}

/// A read-only connection to the database at `path` (which the writer has
/// put in WAL mode).
fn open_reader(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| {
        ProxyError::Backend(format!(
            "cannot open SQLite database {} for reading: {e}",
            path.display()
        ))
    })?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    // Read database pages through a memory map instead of read() into each
    // connection's own page cache (2 MiB by default: a store of many records
    // misses it on almost every read). Pages still in the WAL are read from
    // the log as before.
    conn.pragma_update(None, "mmap_size", READER_MMAP_BYTES)
        .map_err(db_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(db_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(ProxyError::Backend(format!(
            "SQLite database {} is in {mode:?} journal mode, not WAL",
            path.display()
        )));
    }
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if needed) the database file at `path`, set the
    /// connection's pragmas and apply any missing migrations; reads use up
    /// to [`DEFAULT_READERS`] read-only connections.
    ///
    /// Fails with [`ProxyError::Corrupt`] if the database was written by a
    /// newer build.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_readers(path, DEFAULT_READERS)
    }

    /// [`SqliteStore::open`] with `readers` (at least 1) read-only
    /// connections, each on its own thread.
    pub fn open_with_readers(path: &Path, readers: usize) -> Result<Self> {
        let conn = Connection::open(path).map_err(|e| {
            ProxyError::Backend(format!(
                "cannot open SQLite database {}: {e}",
                path.display()
            ))
        })?;
        Self::setup(conn, path, readers.max(1))
    }

    fn setup(mut conn: Connection, path: &Path, readers: usize) -> Result<Self> {
        let location = path.display().to_string();
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ProxyError::Backend(format!(
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
        if synchronous < 2 || foreign_keys != 1 {
            return Err(ProxyError::Backend(format!(
                "SQLite refused the connection settings (synchronous={synchronous}, foreign_keys={foreign_keys})"
            )));
        }
        migrate(&mut conn)?;
        // Readers open now: a database they cannot read fails here, not on
        // the first read.
        let readers = ReadPool::start(path, readers)?;
        Ok(SqliteStore {
            writer: Arc::new(tokio::sync::Mutex::new(conn)),
            readers: Arc::new(readers),
            location: location.into(),
        })
    }

    /// Run `f` in one `BEGIN IMMEDIATE` transaction on the write connection,
    /// committed if it succeeds. Waits (asynchronously) for the writer, then
    /// runs on the blocking thread pool.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let mut conn = Arc::clone(&self.writer).lock_owned().await;
        tokio::task::spawn_blocking(move || {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let out = f(&tx)?;
            tx.commit().map_err(db_err)?;
            Ok(out)
        })
        .await
        .map_err(|e| ProxyError::Backend(format!("SQLite writer task failed: {e}")))?
    }

    /// Run `f` on a reader thread with its read-only connection, never
    /// waiting for a writer (WAL). Each statement `f` runs is its own
    /// consistent snapshot; use [`SqliteStore::read_tx`] for several.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.readers.submit(Box::new(move |conn| {
            // A panic must not take the reader thread (and its queue) down.
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| f(conn)))
                .unwrap_or_else(|_| Err(ProxyError::Internal("a SQLite read panicked".into())));
            let _ = tx.send(out);
        }))?;
        rx.await
            .map_err(|_| ProxyError::Backend("a SQLite reader thread has stopped".into()))?
    }

    /// [`SqliteStore::read`] in one read transaction: every statement of `f`
    /// sees the same snapshot.
    async fn read_tx<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.read(move |conn| {
            let tx = conn.unchecked_transaction().map_err(db_err)?;
            let out = f(&tx)?;
            tx.commit().map_err(db_err)?;
            Ok(out)
        })
        .await
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (
             version    INTEGER NOT NULL PRIMARY KEY,
             applied_at INTEGER NOT NULL
         )",
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
        return Err(ProxyError::Corrupt(format!(
            "database schema {current} is newer than this build ({latest})"
        )));
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.execute_batch(sql)
            .map_err(|e| ProxyError::Backend(format!("migration {version} failed: {e}")))?;
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

/// Map a rusqlite error: unique violations to `AlreadyExists`, undecodable
/// values to `Corrupt`, everything else to `Backend`.
fn db_err(e: rusqlite::Error) -> ProxyError {
    match &e {
        rusqlite::Error::SqliteFailure(f, msg)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            let detail = msg.clone().unwrap_or_else(|| e.to_string());
            match f.extended_code {
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY => ProxyError::AlreadyExists(detail),
                _ => ProxyError::Backend(detail),
            }
        }
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => ProxyError::Corrupt(e.to_string()),
        _ => ProxyError::Backend(e.to_string()),
    }
}

fn i64_of(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| ProxyError::LimitExceeded(format!("{what} is too large")))
}

fn freeze_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, i64, String, i64, i64, Vec<u8>)> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
    ))
}

fn freeze_of(t: (String, i64, String, i64, i64, Vec<u8>)) -> Result<FreezeInfo> {
    Ok(FreezeInfo {
        attribute: t.0,
        version: small(t.1, "freeze version")?,
        frozen_by: t.2,
        frozen_at: t.3,
        rows: non_negative(t.4, "snapshot row count")?,
        merkle_root: fixed(&t.5, "merkle root")?,
    })
}

const FREEZE_COLUMNS: &str = "attribute, version, frozen_by, frozen_at, row_count, merkle_root";

fn load_freeze(conn: &Connection, attribute: &str, version: u32) -> Result<Option<FreezeInfo>> {
    conn.query_row(
        &format!("SELECT {FREEZE_COLUMNS} FROM freezes WHERE attribute = ?1 AND version = ?2"),
        params![attribute, version],
        freeze_row,
    )
    .optional()
    .map_err(db_err)?
    .map(freeze_of)
    .transpose()
}

fn count_pending(conn: &Connection, attribute: &str, version: u32) -> Result<u64> {
    let n: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM snapshot_rows s JOIN record_rows r
               ON r.record_id = s.record_id AND r.row_index = s.row_index
             WHERE s.attribute = ?1 AND s.version = ?2 AND r.version = s.version",
            params![attribute, version],
            |r| r.get(0),
        )
        .map_err(db_err)?;
    non_negative(n, "pending count")
}

fn snap_rows(
    conn: &Connection,
    sql: &str,
    attribute: &str,
    version: u32,
    after: Option<(RecordId, u32)>,
    limit: u32,
) -> Result<Vec<SnapRow>> {
    let (rid, row): (Vec<u8>, i64) = match after {
        Some((rid, row)) => (rid.to_vec(), i64::from(row)),
        None => (Vec::new(), -1),
    };
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let rows = stmt
        .query_map(params![attribute, version, rid, row, limit], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })
        .map_err(db_err)?;
    let mut out = Vec::new();
    for r in rows {
        let (rid, row, c2) = r.map_err(db_err)?;
        out.push(SnapRow {
            record_id: fixed(&rid, "record id")?,
            row: small(row, "row index")?,
            c2: fixed(&c2, "C2")?,
        });
    }
    Ok(out)
}

/// Keyset page of a snapshot: rows after (?3, ?4), at most ?5.
const SNAPSHOT_PAGE: &str = "SELECT record_id, row_index, c2 FROM snapshot_rows
     WHERE attribute = ?1 AND version = ?2 AND (record_id > ?3 OR (record_id = ?3 AND row_index > ?4))
     ORDER BY record_id, row_index LIMIT ?5";

/// Keyset page of the rows still at the frozen version.
const PENDING_PAGE: &str = "SELECT s.record_id, s.row_index, s.c2 FROM snapshot_rows s
     JOIN record_rows r ON r.record_id = s.record_id AND r.row_index = s.row_index
     WHERE s.attribute = ?1 AND s.version = ?2 AND r.version = s.version
       AND (s.record_id > ?3 OR (s.record_id = ?3 AND s.row_index > ?4))
     ORDER BY s.record_id, s.row_index LIMIT ?5";

/// A record's metadata, with its first payload chunk if `first_chunk`
/// (one statement: a consistent view).
fn load_record(conn: &Connection, id: &[u8], with_first_chunk: bool) -> Result<Option<RecordRead>> {
    let sql = if with_first_chunk {
        "SELECT r.record_id, r.header, r.blob_id, r.chunk_count, r.payload_size,
                r.payload_sha256, r.created_at, c.data
         FROM records r LEFT JOIN chunks c ON c.blob_id = r.blob_id AND c.seq = 0
         WHERE r.record_id = ?1"
    } else {
        "SELECT record_id, header, blob_id, chunk_count, payload_size, payload_sha256,
                created_at, NULL
         FROM records WHERE record_id = ?1"
    };
    let row = conn
        .prepare_cached(sql)
        .map_err(db_err)?
        .query_row(params![id], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Vec<u8>>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Option<Vec<u8>>>(7)?,
            ))
        })
        .optional()
        .map_err(db_err)?;
    row.map(
        |(rid, header, blob_id, chunks, size, sha, created_at, first_chunk)| {
            if with_first_chunk && chunks > 0 && first_chunk.is_none() {
                return Err(ProxyError::Corrupt(format!(
                    "record {} has {chunks} payload chunks but no chunk 0",
                    hex::encode(&rid)
                )));
            }
            Ok(RecordRead {
                record: StoredRecord {
                    record_id: fixed(&rid, "record id")?,
                    header,
                    blob_id,
                    chunks,
                    payload_size: non_negative(size, "payload size")?,
                    payload_sha256: fixed(&sha, "payload digest")?,
                    created_at,
                },
                first_chunk,
            })
        },
    )
    .transpose()
}

/// One token group inside the open transaction (the caller wraps it in a savepoint).
fn apply_group(conn: &Connection, g: &TokenGroup, now: i64) -> Result<GroupOutcome> {
    if load_freeze(conn, &g.attribute, g.from_version)?.is_none() {
        return Ok(GroupOutcome::Refused(format!(
            "{} version {} is not frozen on this proxy",
            g.attribute, g.from_version
        )));
    }
    let header: Option<Vec<u8>> = conn
        .query_row(
            "SELECT header FROM records WHERE record_id = ?1",
            params![g.record_id.to_vec()],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)?;
    let Some(header) = header else {
        return Ok(GroupOutcome::NotFound);
    };
    let mut snapshot: BTreeMap<u32, C2Bytes> = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT row_index, c2 FROM snapshot_rows
                 WHERE attribute = ?1 AND version = ?2 AND record_id = ?3",
            )
            .map_err(db_err)?;
        let rows = stmt
            .query_map(
                params![g.attribute, g.from_version, g.record_id.to_vec()],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
            )
            .map_err(db_err)?;
        for r in rows {
            let (row, c2) = r.map_err(db_err)?;
            snapshot.insert(small(row, "row index")?, fixed(&c2, "C2")?);
        }
    }
    match plan_update(&header, &snapshot, g)? {
        UpdatePlan::AlreadyApplied => Ok(GroupOutcome::AlreadyApplied),
        UpdatePlan::Refused(why) => Ok(GroupOutcome::Refused(why)),
        UpdatePlan::Apply { header, rows } => {
            conn.execute(
                "UPDATE records SET header = ?1, updated_at = ?2 WHERE record_id = ?3",
                params![header, now, g.record_id.to_vec()],
            )
            .map_err(db_err)?;
            let mut stmt = conn
                .prepare_cached(
                    "UPDATE record_rows SET version = ?1 WHERE record_id = ?2 AND row_index = ?3",
                )
                .map_err(db_err)?;
            for (row, version) in rows {
                stmt.execute(params![version, g.record_id.to_vec(), row])
                    .map_err(db_err)?;
            }
            Ok(GroupOutcome::Applied)
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn add_trusted(&self, a: &TrustedAuthority) -> Result<bool> {
        let a = a.clone();
        self.write(move |tx| {
            let existing: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT identity_key FROM trusted_authorities WHERE authority_id = ?1",
                    params![a.authority_id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            match existing {
                Some(k) if k == a.identity_key => Ok(false),
                Some(_) => Err(ProxyError::AlreadyExists(format!(
                    "authority {} is trusted with another identity key (remove it first)",
                    a.authority_id
                ))),
                None => {
                    tx.execute(
                        "INSERT INTO trusted_authorities (authority_id, identity_key, added_at)
                         VALUES (?1, ?2, ?3)",
                        params![a.authority_id, a.identity_key.to_vec(), a.added_at],
                    )
                    .map_err(db_err)?;
                    Ok(true)
                }
            }
        })
        .await
    }

    async fn remove_trusted(&self, authority_id: &str) -> Result<bool> {
        let id = authority_id.to_owned();
        self.write(move |tx| {
            let n = tx
                .execute(
                    "DELETE FROM trusted_authorities WHERE authority_id = ?1",
                    params![id],
                )
                .map_err(db_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn trusted(&self) -> Result<Vec<TrustedAuthority>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT authority_id, identity_key, added_at FROM trusted_authorities
                     ORDER BY authority_id",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .map_err(db_err)?;
            let mut out = Vec::new();
            for r in rows {
                let (authority_id, key, added_at) = r.map_err(db_err)?;
                out.push(TrustedAuthority {
                    authority_id,
                    identity_key: fixed(&key, "identity key")?,
                    added_at,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn trusted_key(&self, authority_id: &str) -> Result<Option<[u8; 32]>> {
        let id = authority_id.to_owned();
        self.read(move |conn| {
            conn.query_row(
                "SELECT identity_key FROM trusted_authorities WHERE authority_id = ?1",
                params![id],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()
            .map_err(db_err)?
            .map(|k| fixed(&k, "identity key"))
            .transpose()
        })
        .await
    }

    async fn use_nonce(
        &self,
        authority_id: &str,
        nonce: &[u8],
        seen_at: i64,
        prune_before: i64,
    ) -> Result<bool> {
        let (id, nonce) = (authority_id.to_owned(), nonce.to_vec());
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM nonces WHERE seen_at < ?1",
                params![prune_before],
            )
            .map_err(db_err)?;
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO nonces (authority_id, nonce, seen_at) VALUES (?1, ?2, ?3)",
                    params![id, nonce, seen_at],
                )
                .map_err(db_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn begin_upload(&self, started_at: i64) -> Result<i64> {
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO blobs (started_at, last_activity) VALUES (?1, ?1)",
                params![started_at],
            )
            .map_err(db_err)?;
            Ok(tx.last_insert_rowid())
        })
        .await
    }

    async fn put_chunk(&self, blob_id: i64, seq: i64, data: Vec<u8>, now: i64) -> Result<()> {
        self.write(move |tx| {
            let n = tx
                .execute(
                    "UPDATE blobs SET last_activity = ?1 WHERE blob_id = ?2 AND committed = 0",
                    params![now, blob_id],
                )
                .map_err(db_err)?;
            if n != 1 {
                return Err(ProxyError::NotFound(format!(
                    "no upload in progress with blob {blob_id}"
                )));
            }
            tx.execute(
                "INSERT INTO chunks (blob_id, seq, data) VALUES (?1, ?2, ?3)",
                params![blob_id, seq, data],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn commit_upload(&self, blob_id: i64, record: &NewRecord) -> Result<()> {
        let rec = record.clone();
        self.write(move |tx| {
            let (chunks, bytes): (i64, i64) = tx
                .query_row(
                    "SELECT COUNT(*), COALESCE(SUM(length(data)), 0) FROM chunks WHERE blob_id = ?1",
                    params![blob_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(db_err)?;
            if non_negative(bytes, "payload size")? != rec.payload_size {
                return Err(ProxyError::InvalidArgument(format!(
                    "the stored chunks hold {bytes} bytes, the upload claims {}",
                    rec.payload_size
                )));
            }
            for row in &rec.rows {
                let frozen: Option<i64> = tx
                    .query_row(
                        "SELECT MAX(version) FROM freezes WHERE attribute = ?1",
                        params![row.attribute],
                        |r| r.get(0),
                    )
                    .map_err(db_err)?;
                if let Some(f) = frozen.filter(|f| i64::from(row.version) <= *f) {
                    return Err(ProxyError::FailedPrecondition(format!(
                        "{} version {} is frozen or superseded on this proxy (frozen through version {f}): encrypt with the current version",
                        row.attribute, row.version
                    )));
                }
            }
            let n = tx
                .execute(
                    "UPDATE blobs SET committed = 1 WHERE blob_id = ?1 AND committed = 0",
                    params![blob_id],
                )
                .map_err(db_err)?;
            if n != 1 {
                return Err(ProxyError::NotFound(format!(
                    "no upload in progress with blob {blob_id}"
                )));
            }
            let inserted = tx.execute(
                "INSERT INTO records (record_id, blob_id, header, chunk_count, payload_size,
                                      payload_sha256, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
                params![
                    rec.record_id.to_vec(),
                    blob_id,
                    rec.header,
                    chunks,
                    i64_of(rec.payload_size, "payload")?,
                    rec.payload_sha256.to_vec(),
                    rec.created_at
                ],
            );
            match inserted.map_err(db_err) {
                Err(ProxyError::AlreadyExists(_)) => {
                    return Err(ProxyError::AlreadyExists(format!(
                        "record {} is already stored",
                        hex::encode(rec.record_id)
                    )));
                }
                other => {
                    other?;
                }
            }
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO record_rows (record_id, row_index, attribute, version, c2)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(db_err)?;
            for (i, row) in rec.rows.iter().enumerate() {
                stmt.execute(params![
                    rec.record_id.to_vec(),
                    i as i64,
                    row.attribute,
                    row.version,
                    row.c2.to_vec()
                ])
                .map_err(db_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn abort_upload(&self, blob_id: i64) -> Result<()> {
        self.write(move |tx| {
            tx.execute(
                "DELETE FROM blobs WHERE blob_id = ?1 AND committed = 0",
                params![blob_id],
            )
            .map_err(db_err)?;
            Ok(())
        })
        .await
    }

    async fn purge_abandoned_uploads(&self, idle_before: i64) -> Result<u64> {
        self.write(move |tx| {
            let n = tx
                .execute(
                    "DELETE FROM blobs WHERE committed = 0 AND last_activity < ?1",
                    params![idle_before],
                )
                .map_err(db_err)?;
            Ok(n as u64)
        })
        .await
    }

    async fn record(&self, record_id: &RecordId) -> Result<Option<StoredRecord>> {
        let id = record_id.to_vec();
        self.read(move |conn| Ok(load_record(conn, &id, false)?.map(|r| r.record)))
            .await
    }

    async fn read_record(&self, record_id: &RecordId) -> Result<Option<RecordRead>> {
        let id = record_id.to_vec();
        self.read(move |conn| load_record(conn, &id, true)).await
    }

    async fn chunk(&self, blob_id: i64, seq: i64) -> Result<Option<Vec<u8>>> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT c.data FROM chunks c JOIN blobs b ON b.blob_id = c.blob_id
                 WHERE c.blob_id = ?1 AND c.seq = ?2 AND b.committed = 1",
            )
            .map_err(db_err)?
            .query_row(params![blob_id, seq], |r| r.get(0))
            .optional()
            .map_err(db_err)
        })
        .await
    }

    async fn list_records(
        &self,
        after: Option<&RecordId>,
        limit: u32,
    ) -> Result<Vec<RecordSummary>> {
        let after = after.map(|a| a.to_vec()).unwrap_or_default();
        self.read_tx(move |conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT record_id, length(header), payload_size, created_at FROM records
                     WHERE record_id > ?1 ORDER BY record_id LIMIT ?2",
                )
                .map_err(db_err)?;
            let rows = stmt
                .query_map(params![after, limit], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(db_err)?;
            let mut out = Vec::new();
            for r in rows {
                let (rid, hlen, size, created_at) = r.map_err(db_err)?;
                out.push(RecordSummary {
                    record_id: fixed(&rid, "record id")?,
                    header_size: non_negative(hlen, "header size")?,
                    payload_size: non_negative(size, "payload size")?,
                    rows: Vec::new(),
                    created_at,
                });
            }
            let mut stmt = conn
                .prepare_cached(
                    "SELECT attribute, version FROM record_rows WHERE record_id = ?1
                     ORDER BY row_index",
                )
                .map_err(db_err)?;
            for rec in &mut out {
                let rows = stmt
                    .query_map(params![rec.record_id.to_vec()], |r| {
                        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                    })
                    .map_err(db_err)?;
                for r in rows {
                    let (a, v) = r.map_err(db_err)?;
                    rec.rows.push((a, small(v, "version")?));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn delete_record(&self, record_id: &RecordId) -> Result<bool> {
        let id = record_id.to_vec();
        self.write(move |tx| {
            let blob: Option<i64> = tx
                .query_row(
                    "SELECT blob_id FROM records WHERE record_id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db_err)?;
            let Some(blob) = blob else {
                return Ok(false);
            };
            tx.execute("DELETE FROM records WHERE record_id = ?1", params![id])
                .map_err(db_err)?;
            tx.execute("DELETE FROM blobs WHERE blob_id = ?1", params![blob])
                .map_err(db_err)?;
            Ok(true)
        })
        .await
    }

    async fn freeze(
        &self,
        attribute: &str,
        version: u32,
        authority_id: &str,
        frozen_at: i64,
    ) -> Result<FreezeInfo> {
        let (attribute, by) = (attribute.to_owned(), authority_id.to_owned());
        self.write(move |tx| {
            if let Some(f) = load_freeze(tx, &attribute, version)? {
                return Ok(f);
            }
            let older: Vec<i64> = {
                let mut stmt = tx
                    .prepare("SELECT version FROM freezes WHERE attribute = ?1 AND version < ?2")
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![attribute, version], |r| r.get(0))
                    .map_err(db_err)?;
                rows.collect::<rusqlite::Result<_>>().map_err(db_err)?
            };
            for v in older {
                let pending = count_pending(tx, &attribute, small(v, "version")?)?;
                if pending > 0 {
                    return Err(ProxyError::FailedPrecondition(format!(
                        "{attribute} version {v} still has {pending} rows to update: finish that rotation first"
                    )));
                }
            }
            let rows: Vec<SnapRow> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT record_id, row_index, c2 FROM record_rows
                         WHERE attribute = ?1 AND version = ?2 ORDER BY record_id, row_index",
                    )
                    .map_err(db_err)?;
                let rows = stmt
                    .query_map(params![attribute, version], |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                        ))
                    })
                    .map_err(db_err)?;
                let mut out = Vec::new();
                for r in rows {
                    let (rid, row, c2) = r.map_err(db_err)?;
                    out.push(SnapRow {
                        record_id: fixed(&rid, "record id")?,
                        row: small(row, "row index")?,
                        c2: fixed(&c2, "C2")?,
                    });
                }
                out
            };
            let root = snapshot_root(&attribute, version, &rows);
            tx.execute(
                "INSERT INTO freezes (attribute, version, frozen_by, frozen_at, row_count, merkle_root)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![attribute, version, by, frozen_at, rows.len() as i64, root.to_vec()],
            )
            .map_err(db_err)?;
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO snapshot_rows (attribute, version, record_id, row_index, c2)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(db_err)?;
            for r in &rows {
                stmt.execute(params![attribute, version, r.record_id.to_vec(), r.row, r.c2.to_vec()])
                    .map_err(db_err)?;
            }
            Ok(FreezeInfo {
                attribute,
                version,
                frozen_by: by,
                frozen_at,
                rows: rows.len() as u64,
                merkle_root: root,
            })
        })
        .await
    }

    async fn freeze_info(&self, attribute: &str, version: u32) -> Result<Option<FreezeInfo>> {
        let attribute = attribute.to_owned();
        self.read(move |conn| load_freeze(conn, &attribute, version))
            .await
    }

    async fn freezes(&self) -> Result<Vec<FreezeProgress>> {
        self.read_tx(|conn| {
            let list: Vec<FreezeInfo> = {
                let mut stmt = conn
                    .prepare(&format!(
                        "SELECT {FREEZE_COLUMNS} FROM freezes ORDER BY attribute, version"
                    ))
                    .map_err(db_err)?;
                let rows = stmt.query_map([], freeze_row).map_err(db_err)?;
                let mut out = Vec::new();
                for r in rows {
                    out.push(freeze_of(r.map_err(db_err)?)?);
                }
                out
            };
            list.into_iter()
                .map(|f| {
                    let pending = count_pending(conn, &f.attribute, f.version)?;
                    Ok(FreezeProgress { freeze: f, pending })
                })
                .collect()
        })
        .await
    }

    async fn snapshot_page(
        &self,
        attribute: &str,
        version: u32,
        after: Option<(RecordId, u32)>,
        limit: u32,
    ) -> Result<Vec<SnapRow>> {
        let attribute = attribute.to_owned();
        self.read(move |conn| snap_rows(conn, SNAPSHOT_PAGE, &attribute, version, after, limit))
            .await
    }

    async fn pending_count(&self, attribute: &str, version: u32) -> Result<u64> {
        let attribute = attribute.to_owned();
        self.read(move |conn| count_pending(conn, &attribute, version))
            .await
    }

    async fn pending_page(
        &self,
        attribute: &str,
        version: u32,
        after: Option<(RecordId, u32)>,
        limit: u32,
    ) -> Result<Vec<SnapRow>> {
        let attribute = attribute.to_owned();
        self.read(move |conn| snap_rows(conn, PENDING_PAGE, &attribute, version, after, limit))
            .await
    }

    async fn apply_tokens(&self, groups: &[TokenGroup]) -> Result<Vec<GroupOutcome>> {
        let groups = groups.to_vec();
        let now = unix_now();
        self.write(move |tx| {
            let mut out = Vec::with_capacity(groups.len());
            for g in &groups {
                tx.execute_batch("SAVEPOINT mabe_group").map_err(db_err)?;
                match apply_group(tx, g, now) {
                    Ok(outcome) => {
                        tx.execute_batch("RELEASE mabe_group").map_err(db_err)?;
                        out.push(outcome);
                    }
                    Err(e) => {
                        let _ = tx.execute_batch("ROLLBACK TO mabe_group; RELEASE mabe_group");
                        return Err(e);
                    }
                }
            }
            Ok(out)
        })
        .await
    }
}
