//! The PostgreSQL backend: for several proxies over one database.
//!
//! A deadpool-postgres pool (no TLS: run it over loopback or a private
//! network) of at most [`MAX_CONNECTIONS`] connections. Each operation is one
//! transaction (READ COMMITTED). Transactions that depend on an attribute's
//! freezes take transaction-scoped advisory locks keyed by
//! [`super::attribute_lock_key`] (in ascending key order, so they cannot
//! deadlock): shared for an upload's commit and a token batch, exclusive for
//! a freeze. A token batch updates records in ascending record-id order.
//!
//! A freeze stores its snapshot with one `INSERT … SELECT … RETURNING` and
//! computes the Merkle root and row count from the rows that statement
//! returns: under READ COMMITTED every statement sees its own snapshot, so
//! a root computed by an earlier `SELECT` could include a record that a
//! concurrent `DELETE` (which takes no attribute lock) removed before the
//! `INSERT` ran, and the stored root would never match the stored rows.
//! (REPEATABLE READ would not do: its snapshot would be taken before the
//! freeze's advisory lock is granted, and miss uploads committed while it
//! waited.)
//!
//! Reads (`chunk`, `record`) use cached prepared statements: one round trip
//! each. `read_record`, the hot path of `GetRecord`, is gathered: calls
//! queue their record ids, and each of [`READ_WORKERS`] tasks takes every
//! id waiting (up to [`MAX_READ_BATCH`]) and reads them with one statement
//! (`record_id = ANY($1)`). An idle store answers a lone read at once, with
//! no added wait; under a burst, one statement answers many readers, which
//! saves PostgreSQL and the proxy a round trip's work per read.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{Client, NoTls, Row};
use tokio_stream::StreamExt;

use super::{
    C2Bytes, FreezeInfo, FreezeProgress, GroupOutcome, NewRecord, RecordId, RecordRead,
    RecordSummary, SnapRow, Store, StoredRecord, TokenGroup, TrustedAuthority, UpdatePlan,
    attribute_lock_key, fixed, non_negative, plan_update, small, snapshot_root,
};
use crate::error::{ProxyError, Result};

/// Schema migrations, in order: (version, SQL).
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/postgres/0001_init.sql"))];

/// Largest number of pooled connections.
pub const MAX_CONNECTIONS: usize = 16;

/// Tasks that answer `read_record` calls (each uses one pooled connection
/// while it reads).
pub const READ_WORKERS: usize = 4;

/// Most record ids one gathered read asks for.
pub const MAX_READ_BATCH: usize = 128;

/// `read_record` calls waiting for a worker; callers beyond it wait to queue.
const READ_QUEUE: usize = 4096;

/// Advisory lock key held while migrating (spells `mabepxmg`).
pub const MIGRATION_LOCK_KEY: i64 = 0x6d61_6265_7078_6d67;

/// A proxy store in a PostgreSQL database. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    database: String,
    reads: mpsc::Sender<ReadAsk>,
}

/// One queued `read_record`: the id and where its answer goes.
type ReadAsk = (RecordId, oneshot::Sender<Result<Option<RecordRead>>>);

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
    /// Fails with [`ProxyError::Corrupt`] if the database was written by a
    /// newer build.
    pub async fn connect(url: &str) -> Result<Self> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| {
            ProxyError::Backend(format!("invalid PostgreSQL connection string: {e}"))
        })?;
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
            .map_err(|e| ProxyError::Backend(format!("cannot build the connection pool: {e}")))?;
        let mut client = pooled(&pool, &database).await?;
        migrate(&mut client).await?;
        drop(client);
        let (reads, queue) = mpsc::channel(READ_QUEUE);
        let queue = Arc::new(tokio::sync::Mutex::new(queue));
        for _ in 0..READ_WORKERS {
            tokio::spawn(read_worker(
                pool.clone(),
                database.clone(),
                Arc::clone(&queue),
            ));
        }
        Ok(PgStore {
            pool,
            database,
            reads,
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        pooled(&self.pool, &self.database).await
    }
}

/// A connection from `pool` (of `database`, named in the error).
async fn pooled(pool: &Pool, database: &str) -> Result<deadpool_postgres::Object> {
    pool.get().await.map_err(|e| {
        ProxyError::Backend(format!(
            "cannot get a connection to database {database}: {e}"
        ))
    })
}

/// Answers queued `read_record` calls until every [`PgStore`] clone is gone.
async fn read_worker(
    pool: Pool,
    database: String,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<ReadAsk>>>,
) {
    let mut batch = Vec::with_capacity(MAX_READ_BATCH);
    loop {
        {
            let mut q = queue.lock().await;
            if q.recv_many(&mut batch, MAX_READ_BATCH).await == 0 {
                return;
            }
        }
        // A caller that gave up (deadline passed) no longer needs its read.
        batch.retain(|(_, reply)| !reply.is_closed());
        if !batch.is_empty() {
            read_batch(&pool, &database, &mut batch).await;
        }
        batch.clear();
    }
}

/// Read the records `batch` asks for with one statement and answer each
/// caller as its row arrives (rows are streamed, not collected: memory stays
/// what the callers hold anyway). An id asked for twice gets the record
/// twice. If the statement fails, callers not yet answered are read one by
/// one, so a failure reaches only the reads it really concerns.
async fn read_batch(pool: &Pool, database: &str, batch: &mut Vec<ReadAsk>) {
    let mut waiting: BTreeMap<RecordId, Vec<oneshot::Sender<Result<Option<RecordRead>>>>> =
        BTreeMap::new();
    for (id, reply) in batch.drain(..) {
        waiting.entry(id).or_default().push(reply);
    }
    let ids: Vec<RecordId> = waiting.keys().copied().collect();
    let streamed = stream_records(pool, database, &ids, |id, answer| {
        if let Some(replies) = waiting.remove(&id) {
            answer_all(replies, answer.map(Some));
        }
    })
    .await;
    match streamed {
        Ok(()) => {
            for (_, replies) in waiting {
                answer_all(replies, Ok(None));
            }
        }
        Err(e) if ids.len() == 1 => {
            for (_, replies) in waiting {
                answer_all(replies, Err(same_error(&e)));
            }
        }
        Err(_) => {
            for (id, replies) in waiting {
                answer_all(replies, read_one(pool, database, &id).await);
            }
        }
    }
}

/// Send `answer` to every caller in `replies` (copies for all but the last).
fn answer_all(
    replies: Vec<oneshot::Sender<Result<Option<RecordRead>>>>,
    answer: Result<Option<RecordRead>>,
) {
    let mut replies = replies.into_iter().peekable();
    while let Some(reply) = replies.next() {
        if replies.peek().is_some() {
            let copy = match &answer {
                Ok(read) => Ok(read.clone()),
                Err(e) => Err(same_error(e)),
            };
            let _ = reply.send(copy);
        } else {
            let _ = reply.send(answer);
            return;
        }
    }
}

/// One record read on its own (the same statement with one id).
async fn read_one(pool: &Pool, database: &str, id: &RecordId) -> Result<Option<RecordRead>> {
    let mut out = Ok(None);
    stream_records(pool, database, std::slice::from_ref(id), |_, answer| {
        out = answer.map(Some);
    })
    .await?;
    out
}

/// Run the gathered read for `ids` and call `each(id, record)` for every row
/// as it arrives (a row that does not decode gives `Err(Corrupt)` for its id).
async fn stream_records(
    pool: &Pool,
    database: &str,
    ids: &[RecordId],
    mut each: impl FnMut(RecordId, Result<RecordRead>),
) -> Result<()> {
    let client = pooled(pool, database).await?;
    // One snapshot for the record and its first chunk.
    let stmt = client
        .prepare_cached(
            "SELECT r.record_id, r.header, r.blob_id, r.chunk_count, r.payload_size,
                    r.payload_sha256, r.created_at, c.data
             FROM records r LEFT JOIN chunks c ON c.blob_id = r.blob_id AND c.seq = 0
             WHERE r.record_id = ANY($1)",
        )
        .await
        .map_err(pg_err)?;
    let ids: Vec<&[u8]> = ids.iter().map(|id| id.as_slice()).collect();
    let rows = client
        .query_raw(&stmt, [&ids as &(dyn ToSql + Sync)])
        .await
        .map_err(pg_err)?;
    tokio::pin!(rows);
    while let Some(row) = rows.next().await {
        let row = row.map_err(pg_err)?;
        // An id that cannot be read cannot be one that was asked for.
        let Ok(id) = get::<&[u8]>(&row, 0).and_then(|id| fixed(id, "record id")) else {
            continue;
        };
        each(id, record_read(&row));
    }
    Ok(())
}

/// The same error again, for another caller of the same read.
fn same_error(e: &ProxyError) -> ProxyError {
    match e {
        ProxyError::Corrupt(m) => ProxyError::Corrupt(m.clone()),
        ProxyError::Backend(m) => ProxyError::Backend(m.clone()),
        other => ProxyError::Backend(other.to_string()),
    }
}

/// A record and its first chunk from a row of the gathered read.
fn record_read(row: &Row) -> Result<RecordRead> {
    let record = stored_record(row)?;
    let first_chunk: Option<Vec<u8>> = get(row, 7)?;
    if record.chunks > 0 && first_chunk.is_none() {
        return Err(ProxyError::Corrupt(format!(
            "record {} has {} payload chunks but no chunk 0",
            hex::encode(record.record_id),
            record.chunks
        )));
    }
    Ok(RecordRead {
        record,
        first_chunk,
    })
}

async fn migrate(client: &mut Client) -> Result<()> {
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
        return Err(ProxyError::Corrupt(format!(
            "database schema {current} is newer than this build ({latest})"
        )));
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        tx.batch_execute(sql).await.map_err(|e| {
            ProxyError::Backend(format!("migration {version} failed: {}", describe(&e)))
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

/// The error with the server's message and SQLSTATE, if it has them.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Map a driver error: unique violations to `AlreadyExists`, everything else
/// to `Backend`.
fn pg_err(e: tokio_postgres::Error) -> ProxyError {
    let text = describe(&e);
    match e.code() {
        Some(c) if *c == SqlState::UNIQUE_VIOLATION => ProxyError::AlreadyExists(text),
        _ => ProxyError::Backend(text),
    }
}

/// One column of a row; a value of the wrong type is `Corrupt`, never a panic.
fn get<'a, T: FromSql<'a>>(row: &'a Row, idx: usize) -> Result<T> {
    row.try_get(idx)
        .map_err(|e| ProxyError::Corrupt(format!("cannot read column {idx}: {e}")))
}

fn i64_of(v: u64, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| ProxyError::LimitExceeded(format!("{what} is too large")))
}

/// Take the advisory locks of `attributes` (ascending key order).
async fn lock_attributes<C: GenericClient>(
    c: &C,
    attributes: impl IntoIterator<Item = &str>,
    exclusive: bool,
) -> Result<()> {
    let keys: BTreeSet<i64> = attributes.into_iter().map(attribute_lock_key).collect();
    let sql = if exclusive {
        "SELECT pg_advisory_xact_lock($1)"
    } else {
        "SELECT pg_advisory_xact_lock_shared($1)"
    };
    for k in keys {
        c.execute(sql, &[&k]).await.map_err(pg_err)?;
    }
    Ok(())
}

const FREEZE_COLUMNS: &str = "attribute, version, frozen_by, frozen_at, row_count, merkle_root";

fn freeze_of(r: &Row) -> Result<FreezeInfo> {
    Ok(FreezeInfo {
        attribute: get(r, 0)?,
        version: small(get(r, 1)?, "freeze version")?,
        frozen_by: get(r, 2)?,
        frozen_at: get(r, 3)?,
        rows: non_negative(get(r, 4)?, "snapshot row count")?,
        merkle_root: fixed(get::<&[u8]>(r, 5)?, "merkle root")?,
    })
}

async fn load_freeze<C: GenericClient>(
    c: &C,
    attribute: &str,
    version: u32,
) -> Result<Option<FreezeInfo>> {
    c.query_opt(
        &format!("SELECT {FREEZE_COLUMNS} FROM freezes WHERE attribute = $1 AND version = $2"),
        &[&attribute, &i64::from(version)],
    )
    .await
    .map_err(pg_err)?
    .map(|r| freeze_of(&r))
    .transpose()
}

async fn count_pending<C: GenericClient>(c: &C, attribute: &str, version: u32) -> Result<u64> {
    let row = c
        .query_one(
            "SELECT COUNT(*)::BIGINT FROM snapshot_rows s JOIN record_rows r
               ON r.record_id = s.record_id AND r.row_index = s.row_index
             WHERE s.attribute = $1 AND s.version = $2 AND r.version = s.version",
            &[&attribute, &i64::from(version)],
        )
        .await
        .map_err(pg_err)?;
    non_negative(get(&row, 0)?, "pending count")
}

/// A record from the first seven columns of `r` (record_id, header,
/// blob_id, chunk_count, payload_size, payload_sha256, created_at).
fn stored_record(r: &Row) -> Result<StoredRecord> {
    Ok(StoredRecord {
        record_id: fixed(get::<&[u8]>(r, 0)?, "record id")?,
        header: get(r, 1)?,
        blob_id: get(r, 2)?,
        chunks: get(r, 3)?,
        payload_size: non_negative(get(r, 4)?, "payload size")?,
        payload_sha256: fixed(get::<&[u8]>(r, 5)?, "payload digest")?,
        created_at: get(r, 6)?,
    })
}

fn snap_row(r: &Row) -> Result<SnapRow> {
    Ok(SnapRow {
        record_id: fixed(get::<&[u8]>(r, 0)?, "record id")?,
        row: small(get(r, 1)?, "row index")?,
        c2: fixed(get::<&[u8]>(r, 2)?, "C2")?,
    })
}

/// Keyset page of a snapshot: rows after ($3, $4), at most $5.
const SNAPSHOT_PAGE: &str = "SELECT record_id, row_index, c2 FROM snapshot_rows
     WHERE attribute = $1 AND version = $2 AND (record_id > $3 OR (record_id = $3 AND row_index > $4))
     ORDER BY record_id, row_index LIMIT $5";

/// Keyset page of the rows still at the frozen version.
const PENDING_PAGE: &str = "SELECT s.record_id, s.row_index, s.c2 FROM snapshot_rows s
     JOIN record_rows r ON r.record_id = s.record_id AND r.row_index = s.row_index
     WHERE s.attribute = $1 AND s.version = $2 AND r.version = s.version
       AND (s.record_id > $3 OR (s.record_id = $3 AND s.row_index > $4))
     ORDER BY s.record_id, s.row_index LIMIT $5";

async fn page<C: GenericClient>(
    c: &C,
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
    let params: [&(dyn ToSql + Sync); 5] = [
        &attribute,
        &i64::from(version),
        &rid,
        &row,
        &i64::from(limit),
    ];
    c.query(sql, &params)
        .await
        .map_err(pg_err)?
        .iter()
        .map(snap_row)
        .collect()
}

async fn apply_group<C: GenericClient>(c: &C, g: &TokenGroup, now: i64) -> Result<GroupOutcome> {
    if load_freeze(c, &g.attribute, g.from_version)
        .await?
        .is_none()
    {
        return Ok(GroupOutcome::Refused(format!(
            "{} version {} is not frozen on this proxy",
            g.attribute, g.from_version
        )));
    }
    let rid = g.record_id.to_vec();
    let Some(row) = c
        .query_opt(
            "SELECT header FROM records WHERE record_id = $1 FOR UPDATE",
            &[&rid],
        )
        .await
        .map_err(pg_err)?
    else {
        return Ok(GroupOutcome::NotFound);
    };
    let header: Vec<u8> = get(&row, 0)?;
    let mut snapshot: BTreeMap<u32, C2Bytes> = BTreeMap::new();
    for r in c
        .query(
            "SELECT row_index, c2 FROM snapshot_rows
             WHERE attribute = $1 AND version = $2 AND record_id = $3",
            &[&g.attribute, &i64::from(g.from_version), &rid],
        )
        .await
        .map_err(pg_err)?
    {
        snapshot.insert(
            small(get(&r, 0)?, "row index")?,
            fixed(get::<&[u8]>(&r, 1)?, "C2")?,
        );
    }
    // Decoding, updating and re-encoding the header is CPU work (about
    // 0.45 ms per row): off the async workers. Pure computation, so holding
    // the record's row lock while it waits for a permit cannot deadlock.
    let group = g.clone();
    let plan = crate::cpu::run(move || plan_update(&header, &snapshot, &group)).await??;
    match plan {
        UpdatePlan::AlreadyApplied => Ok(GroupOutcome::AlreadyApplied),
        UpdatePlan::Refused(why) => Ok(GroupOutcome::Refused(why)),
        UpdatePlan::Apply { header, rows } => {
            c.execute(
                "UPDATE records SET header = $1, updated_at = $2 WHERE record_id = $3",
                &[&header, &now, &rid],
            )
            .await
            .map_err(pg_err)?;
            for (row, version) in rows {
                c.execute(
                    "UPDATE record_rows SET version = $1 WHERE record_id = $2 AND row_index = $3",
                    &[&i64::from(version), &rid, &i64::from(row)],
                )
                .await
                .map_err(pg_err)?;
            }
            Ok(GroupOutcome::Applied)
        }
    }
}

/// A group to plan: its stored header (`None`: no such record, or its
/// version is not frozen) and the record's snapshot rows.
type PlanInput = (TokenGroup, Option<Vec<u8>>, BTreeMap<u32, C2Bytes>);

/// Apply token groups for distinct records with a fixed number of
/// statements whatever their count (the per-group path costs about seven
/// round trips per record): the freezes, the records (locked, in id order)
/// and their snapshot rows are read in one query each, every header is
/// planned in one CPU section, and the new headers and row versions are
/// written with one statement each. Same outcomes as [`apply_group`].
async fn apply_batch<C: GenericClient>(
    c: &C,
    groups: &[TokenGroup],
    now: i64,
) -> Result<Vec<GroupOutcome>> {
    let mut frozen: BTreeMap<(String, u32), bool> = BTreeMap::new();
    for g in groups {
        let key = (g.attribute.clone(), g.from_version);
        if let std::collections::btree_map::Entry::Vacant(slot) = frozen.entry(key) {
            slot.insert(
                load_freeze(c, &g.attribute, g.from_version)
                    .await?
                    .is_some(),
            );
        }
    }
    let live: Vec<&TokenGroup> = groups
        .iter()
        .filter(|g| frozen.get(&(g.attribute.clone(), g.from_version)) == Some(&true))
        .collect();
    let ids: Vec<Vec<u8>> = live.iter().map(|g| g.record_id.to_vec()).collect();
    let mut headers: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for r in c
        .query(
            "SELECT record_id, header FROM records WHERE record_id = ANY($1)
             ORDER BY record_id FOR UPDATE",
            &[&ids],
        )
        .await
        .map_err(pg_err)?
    {
        headers.insert(get(&r, 0)?, get(&r, 1)?);
    }
    let mut snapshots: BTreeMap<Vec<u8>, BTreeMap<u32, C2Bytes>> = BTreeMap::new();
    for ((attribute, version), is) in &frozen {
        if !is {
            continue;
        }
        let of_key: Vec<Vec<u8>> = live
            .iter()
            .filter(|g| &g.attribute == attribute && g.from_version == *version)
            .map(|g| g.record_id.to_vec())
            .collect();
        for r in c
            .query(
                "SELECT record_id, row_index, c2 FROM snapshot_rows
                 WHERE attribute = $1 AND version = $2 AND record_id = ANY($3)",
                &[attribute, &i64::from(*version), &of_key],
            )
            .await
            .map_err(pg_err)?
        {
            snapshots.entry(get(&r, 0)?).or_default().insert(
                small(get(&r, 1)?, "row index")?,
                fixed(get::<&[u8]>(&r, 2)?, "C2")?,
            );
        }
    }
    // Plan every group in one CPU section (pure computation; the record
    // locks are held, which cannot deadlock: see `crate::cpu`).
    let work: Vec<PlanInput> = groups
        .iter()
        .map(|g| {
            let id = g.record_id.to_vec();
            let header = if frozen.get(&(g.attribute.clone(), g.from_version)) == Some(&true) {
                headers.remove(&id)
            } else {
                None
            };
            let snapshot = snapshots.remove(&id).unwrap_or_default();
            (g.clone(), header, snapshot)
        })
        .collect();
    let planned = crate::cpu::run(move || {
        work.into_iter()
            .map(|(g, header, snapshot)| {
                let plan = match &header {
                    Some(h) => Some(plan_update(h, &snapshot, &g)?),
                    None => None,
                };
                Ok((g, plan))
            })
            .collect::<Result<Vec<_>>>()
    })
    .await??;
    let mut outcomes = Vec::with_capacity(planned.len());
    let (mut upd_ids, mut upd_headers) = (Vec::new(), Vec::new());
    let (mut row_ids, mut row_idx, mut row_versions) = (Vec::new(), Vec::new(), Vec::new());
    for (g, plan) in planned {
        let outcome = match plan {
            None if frozen.get(&(g.attribute.clone(), g.from_version)) != Some(&true) => {
                GroupOutcome::Refused(format!(
                    "{} version {} is not frozen on this proxy",
                    g.attribute, g.from_version
                ))
            }
            None => GroupOutcome::NotFound,
            Some(UpdatePlan::AlreadyApplied) => GroupOutcome::AlreadyApplied,
            Some(UpdatePlan::Refused(why)) => GroupOutcome::Refused(why),
            Some(UpdatePlan::Apply { header, rows }) => {
                let id = g.record_id.to_vec();
                for (row, version) in rows {
                    row_ids.push(id.clone());
                    row_idx.push(i64::from(row));
                    row_versions.push(i64::from(version));
                }
                upd_ids.push(id);
                upd_headers.push(header);
                GroupOutcome::Applied
            }
        };
        outcomes.push(outcome);
    }
    if !upd_ids.is_empty() {
        let updated = c
            .execute(
                "UPDATE records AS r SET header = u.header, updated_at = $3
                 FROM unnest($1::BYTEA[], $2::BYTEA[]) AS u(record_id, header)
                 WHERE r.record_id = u.record_id",
                &[&upd_ids, &upd_headers, &now],
            )
            .await
            .map_err(pg_err)?;
        let moved = c
            .execute(
                "UPDATE record_rows AS r SET version = u.version
                 FROM unnest($1::BYTEA[], $2::BIGINT[], $3::BIGINT[])
                      AS u(record_id, row_index, version)
                 WHERE r.record_id = u.record_id AND r.row_index = u.row_index",
                &[&row_ids, &row_idx, &row_versions],
            )
            .await
            .map_err(pg_err)?;
        if usize::try_from(updated).ok() != Some(upd_ids.len())
            || usize::try_from(moved).ok() != Some(row_ids.len())
        {
            return Err(ProxyError::Backend(format!(
                "updated {updated} of {} headers and {moved} of {} rows",
                upd_ids.len(),
                row_ids.len()
            )));
        }
    }
    Ok(outcomes)
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn add_trusted(&self, a: &TrustedAuthority) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let existing = tx
            .query_opt(
                "SELECT identity_key FROM trusted_authorities WHERE authority_id = $1 FOR UPDATE",
                &[&a.authority_id],
            )
            .await
            .map_err(pg_err)?;
        let added = match existing {
            Some(r) if get::<&[u8]>(&r, 0)? == a.identity_key => false,
            Some(_) => {
                return Err(ProxyError::AlreadyExists(format!(
                    "authority {} is trusted with another identity key (remove it first)",
                    a.authority_id
                )));
            }
            None => {
                tx.execute(
                    "INSERT INTO trusted_authorities (authority_id, identity_key, added_at)
                     VALUES ($1, $2, $3)",
                    &[&a.authority_id, &a.identity_key.as_slice(), &a.added_at],
                )
                .await
                .map_err(pg_err)?;
                true
            }
        };
        tx.commit().await.map_err(pg_err)?;
        Ok(added)
    }

    async fn remove_trusted(&self, authority_id: &str) -> Result<bool> {
        let client = self.client().await?;
        let n = client
            .execute(
                "DELETE FROM trusted_authorities WHERE authority_id = $1",
                &[&authority_id],
            )
            .await
            .map_err(pg_err)?;
        Ok(n > 0)
    }

    async fn trusted(&self) -> Result<Vec<TrustedAuthority>> {
        let client = self.client().await?;
        client
            .query(
                "SELECT authority_id, identity_key, added_at FROM trusted_authorities
                 ORDER BY authority_id",
                &[],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| {
                Ok(TrustedAuthority {
                    authority_id: get(r, 0)?,
                    identity_key: fixed(get::<&[u8]>(r, 1)?, "identity key")?,
                    added_at: get(r, 2)?,
                })
            })
            .collect()
    }

    async fn trusted_key(&self, authority_id: &str) -> Result<Option<[u8; 32]>> {
        let client = self.client().await?;
        client
            .query_opt(
                "SELECT identity_key FROM trusted_authorities WHERE authority_id = $1",
                &[&authority_id],
            )
            .await
            .map_err(pg_err)?
            .map(|r| fixed(get::<&[u8]>(&r, 0)?, "identity key"))
            .transpose()
    }

    async fn use_nonce(
        &self,
        authority_id: &str,
        nonce: &[u8],
        seen_at: i64,
        prune_before: i64,
    ) -> Result<bool> {
        let client = self.client().await?;
        client
            .execute("DELETE FROM nonces WHERE seen_at < $1", &[&prune_before])
            .await
            .map_err(pg_err)?;
        let n = client
            .execute(
                "INSERT INTO nonces (authority_id, nonce, seen_at) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&authority_id, &nonce, &seen_at],
            )
            .await
            .map_err(pg_err)?;
        Ok(n == 1)
    }

    async fn begin_upload(&self, started_at: i64) -> Result<i64> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "INSERT INTO blobs (started_at, last_activity) VALUES ($1, $1) RETURNING blob_id",
                &[&started_at],
            )
            .await
            .map_err(pg_err)?;
        get(&row, 0)
    }

    async fn put_chunk(&self, blob_id: i64, seq: i64, data: Vec<u8>, now: i64) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let n = tx
            .execute(
                "UPDATE blobs SET last_activity = $1 WHERE blob_id = $2 AND NOT committed",
                &[&now, &blob_id],
            )
            .await
            .map_err(pg_err)?;
        if n != 1 {
            return Err(ProxyError::NotFound(format!(
                "no upload in progress with blob {blob_id}"
            )));
        }
        tx.execute(
            "INSERT INTO chunks (blob_id, seq, data) VALUES ($1, $2, $3)",
            &[&blob_id, &seq, &data],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)
    }

    async fn commit_upload(&self, blob_id: i64, rec: &NewRecord) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        lock_attributes(&tx, rec.rows.iter().map(|r| r.attribute.as_str()), false).await?;
        let row = tx
            .query_one(
                "SELECT COUNT(*)::BIGINT, COALESCE(SUM(octet_length(data)), 0)::BIGINT
                 FROM chunks WHERE blob_id = $1",
                &[&blob_id],
            )
            .await
            .map_err(pg_err)?;
        let (chunks, bytes): (i64, i64) = (get(&row, 0)?, get(&row, 1)?);
        if non_negative(bytes, "payload size")? != rec.payload_size {
            return Err(ProxyError::InvalidArgument(format!(
                "the stored chunks hold {bytes} bytes, the upload claims {}",
                rec.payload_size
            )));
        }
        for r in &rec.rows {
            let frozen: Option<i64> = get(
                &tx.query_one(
                    "SELECT MAX(version) FROM freezes WHERE attribute = $1",
                    &[&r.attribute],
                )
                .await
                .map_err(pg_err)?,
                0,
            )?;
            if let Some(f) = frozen.filter(|f| i64::from(r.version) <= *f) {
                return Err(ProxyError::FailedPrecondition(format!(
                    "{} version {} is frozen or superseded on this proxy (frozen through version {f}): encrypt with the current version",
                    r.attribute, r.version
                )));
            }
        }
        let n = tx
            .execute(
                "UPDATE blobs SET committed = TRUE WHERE blob_id = $1 AND NOT committed",
                &[&blob_id],
            )
            .await
            .map_err(pg_err)?;
        if n != 1 {
            return Err(ProxyError::NotFound(format!(
                "no upload in progress with blob {blob_id}"
            )));
        }
        let rid = rec.record_id.to_vec();
        let inserted = tx
            .execute(
                "INSERT INTO records (record_id, blob_id, header, chunk_count, payload_size,
                                      payload_sha256, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                &[
                    &rid,
                    &blob_id,
                    &rec.header,
                    &chunks,
                    &i64_of(rec.payload_size, "payload")?,
                    &rec.payload_sha256.as_slice(),
                    &rec.created_at,
                ],
            )
            .await
            .map_err(pg_err);
        match inserted {
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
        let stmt = tx
            .prepare(
                "INSERT INTO record_rows (record_id, row_index, attribute, version, c2)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .await
            .map_err(pg_err)?;
        for (i, r) in rec.rows.iter().enumerate() {
            tx.execute(
                &stmt,
                &[
                    &rid,
                    &(i as i64),
                    &r.attribute,
                    &i64::from(r.version),
                    &r.c2.as_slice(),
                ],
            )
            .await
            .map_err(pg_err)?;
        }
        tx.commit().await.map_err(pg_err)
    }

    async fn abort_upload(&self, blob_id: i64) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM blobs WHERE blob_id = $1 AND NOT committed",
                &[&blob_id],
            )
            .await
            .map_err(pg_err)?;
        Ok(())
    }

    async fn purge_abandoned_uploads(&self, idle_before: i64) -> Result<u64> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM blobs WHERE NOT committed AND last_activity < $1",
                &[&idle_before],
            )
            .await
            .map_err(pg_err)
    }

    async fn record(&self, record_id: &RecordId) -> Result<Option<StoredRecord>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT record_id, header, blob_id, chunk_count, payload_size, payload_sha256,
                        created_at
                 FROM records WHERE record_id = $1",
            )
            .await
            .map_err(pg_err)?;
        client
            .query_opt(&stmt, &[&record_id.as_slice()])
            .await
            .map_err(pg_err)?
            .map(|r| stored_record(&r))
            .transpose()
    }

    async fn read_record(&self, record_id: &RecordId) -> Result<Option<RecordRead>> {
        let (reply, answer) = oneshot::channel();
        if self.reads.send((*record_id, reply)).await.is_ok() {
            if let Ok(read) = answer.await {
                return read;
            }
        }
        // The workers are gone (a bug, or a runtime shutting down): read
        // directly rather than fail.
        read_one(&self.pool, &self.database, record_id).await
    }

    async fn chunk(&self, blob_id: i64, seq: i64) -> Result<Option<Vec<u8>>> {
        let client = self.client().await?;
        let stmt = client
            .prepare_cached(
                "SELECT c.data FROM chunks c JOIN blobs b ON b.blob_id = c.blob_id
                 WHERE c.blob_id = $1 AND c.seq = $2 AND b.committed",
            )
            .await
            .map_err(pg_err)?;
        client
            .query_opt(&stmt, &[&blob_id, &seq])
            .await
            .map_err(pg_err)?
            .map(|r| get(&r, 0))
            .transpose()
    }

    async fn list_records(
        &self,
        after: Option<&RecordId>,
        limit: u32,
    ) -> Result<Vec<RecordSummary>> {
        let client = self.client().await?;
        let after = after.map(|a| a.to_vec()).unwrap_or_default();
        let mut out: Vec<RecordSummary> = client
            .query(
                "SELECT record_id, octet_length(header)::BIGINT, payload_size, created_at
                 FROM records WHERE record_id > $1 ORDER BY record_id LIMIT $2",
                &[&after, &i64::from(limit)],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(|r| {
                Ok(RecordSummary {
                    record_id: fixed(get::<&[u8]>(r, 0)?, "record id")?,
                    header_size: non_negative(get(r, 1)?, "header size")?,
                    payload_size: non_negative(get(r, 2)?, "payload size")?,
                    rows: Vec::new(),
                    created_at: get(r, 3)?,
                })
            })
            .collect::<Result<_>>()?;
        let ids: Vec<Vec<u8>> = out.iter().map(|r| r.record_id.to_vec()).collect();
        let mut by_id: BTreeMap<RecordId, Vec<(String, u32)>> = BTreeMap::new();
        for r in client
            .query(
                "SELECT record_id, attribute, version FROM record_rows
                 WHERE record_id = ANY($1) ORDER BY record_id, row_index",
                &[&ids],
            )
            .await
            .map_err(pg_err)?
        {
            by_id
                .entry(fixed(get::<&[u8]>(&r, 0)?, "record id")?)
                .or_default()
                .push((get(&r, 1)?, small(get(&r, 2)?, "version")?));
        }
        for rec in &mut out {
            rec.rows = by_id.remove(&rec.record_id).unwrap_or_default();
        }
        Ok(out)
    }

    async fn delete_record(&self, record_id: &RecordId) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        let Some(row) = tx
            .query_opt(
                "DELETE FROM records WHERE record_id = $1 RETURNING blob_id",
                &[&record_id.as_slice()],
            )
            .await
            .map_err(pg_err)?
        else {
            return Ok(false);
        };
        let blob: i64 = get(&row, 0)?;
        tx.execute("DELETE FROM blobs WHERE blob_id = $1", &[&blob])
            .await
            .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(true)
    }

    async fn freeze(
        &self,
        attribute: &str,
        version: u32,
        authority_id: &str,
        frozen_at: i64,
    ) -> Result<FreezeInfo> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(pg_err)?;
        lock_attributes(&tx, [attribute], true).await?;
        if let Some(f) = load_freeze(&tx, attribute, version).await? {
            return Ok(f);
        }
        for r in tx
            .query(
                "SELECT version FROM freezes WHERE attribute = $1 AND version < $2",
                &[&attribute, &i64::from(version)],
            )
            .await
            .map_err(pg_err)?
        {
            let v = small(get(&r, 0)?, "version")?;
            let pending = count_pending(&tx, attribute, v).await?;
            if pending > 0 {
                return Err(ProxyError::FailedPrecondition(format!(
                    "{attribute} version {v} still has {pending} rows to update: finish that rotation first"
                )));
            }
        }
        // The freeze row first (the snapshot rows reference it), with a
        // placeholder root and count that this transaction replaces before
        // it commits; nobody else can see it before then.
        let version_i = i64::from(version);
        tx.execute(
            "INSERT INTO freezes (attribute, version, frozen_by, frozen_at, row_count, merkle_root)
             VALUES ($1, $2, $3, $4, 0, $5)",
            &[
                &attribute,
                &version_i,
                &authority_id,
                &frozen_at,
                &[0u8; 32].as_slice(),
            ],
        )
        .await
        .map_err(pg_err)?;
        // Copy the rows in one statement (100,000 rows must not take 100,000
        // round trips), and compute the root from exactly the rows it stored.
        let mut rows: Vec<SnapRow> = tx
            .query(
                "INSERT INTO snapshot_rows (attribute, version, record_id, row_index, c2)
                 SELECT attribute, version, record_id, row_index, c2 FROM record_rows
                 WHERE attribute = $1 AND version = $2
                 RETURNING record_id, row_index, c2",
                &[&attribute, &version_i],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(snap_row)
            .collect::<Result<_>>()?;
        let owned = attribute.to_owned();
        let (rows, root) = crate::cpu::run(move || {
            rows.sort_unstable();
            let root = snapshot_root(&owned, version, &rows);
            (rows, root)
        })
        .await?;
        tx.execute(
            "UPDATE freezes SET row_count = $3, merkle_root = $4
             WHERE attribute = $1 AND version = $2",
            &[
                &attribute,
                &version_i,
                &(rows.len() as i64),
                &root.as_slice(),
            ],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        Ok(FreezeInfo {
            attribute: attribute.to_owned(),
            version,
            frozen_by: authority_id.to_owned(),
            frozen_at,
            rows: rows.len() as u64,
            merkle_root: root,
        })
    }

    async fn freeze_info(&self, attribute: &str, version: u32) -> Result<Option<FreezeInfo>> {
        let client = self.client().await?;
        load_freeze(&client, attribute, version).await
    }

    async fn freezes(&self) -> Result<Vec<FreezeProgress>> {
        let client = self.client().await?;
        let list: Vec<FreezeInfo> = client
            .query(
                &format!("SELECT {FREEZE_COLUMNS} FROM freezes ORDER BY attribute, version"),
                &[],
            )
            .await
            .map_err(pg_err)?
            .iter()
            .map(freeze_of)
            .collect::<Result<_>>()?;
        let mut out = Vec::with_capacity(list.len());
        for f in list {
            let pending = count_pending(&client, &f.attribute, f.version).await?;
            out.push(FreezeProgress { freeze: f, pending });
        }
        Ok(out)
    }

    async fn snapshot_page(
        &self,
        attribute: &str,
        version: u32,
        after: Option<(RecordId, u32)>,
        limit: u32,
    ) -> Result<Vec<SnapRow>> {
        let client = self.client().await?;
        page(&client, SNAPSHOT_PAGE, attribute, version, after, limit).await
    }

    async fn pending_count(&self, attribute: &str, version: u32) -> Result<u64> {
        let client = self.client().await?;
        count_pending(&client, attribute, version).await
    }

    async fn pending_page(
        &self,
        attribute: &str,
        version: u32,
        after: Option<(RecordId, u32)>,
        limit: u32,
    ) -> Result<Vec<SnapRow>> {
        let client = self.client().await?;
        page(&client, PENDING_PAGE, attribute, version, after, limit).await
    }

    async fn apply_tokens(&self, groups: &[TokenGroup]) -> Result<Vec<GroupOutcome>> {
        let now = unix_now();
        let mut client = self.client().await?;
        let mut tx = client.transaction().await.map_err(pg_err)?;
        lock_attributes(&tx, groups.iter().map(|g| g.attribute.as_str()), false).await?;
        let distinct: BTreeSet<RecordId> = groups.iter().map(|g| g.record_id).collect();
        let outcomes = if distinct.len() == groups.len() {
            apply_batch(&tx, groups, now).await?
        } else {
            // A record named by two groups (two attributes rotated at once):
            // the groups must see each other's updates, so one at a time.
            // Lock records in ascending id order: two batches cannot deadlock.
            let mut order: Vec<usize> = (0..groups.len()).collect();
            order.sort_by(|&a, &b| {
                groups
                    .get(a)
                    .map(|g| g.record_id)
                    .cmp(&groups.get(b).map(|g| g.record_id))
            });
            let mut outcomes: Vec<Option<GroupOutcome>> = vec![None; groups.len()];
            for i in order {
                let Some(g) = groups.get(i) else { continue };
                let sp = tx.savepoint("mabe_group").await.map_err(pg_err)?;
                let outcome = apply_group(&sp, g, now).await?;
                sp.commit().await.map_err(pg_err)?;
                if let Some(slot) = outcomes.get_mut(i) {
                    *slot = Some(outcome);
                }
            }
            outcomes
                .into_iter()
                .map(|o| {
                    o.ok_or_else(|| ProxyError::Backend("a token group was not processed".into()))
                })
                .collect::<Result<Vec<_>>>()?
        };
        tx.commit().await.map_err(pg_err)?;
        Ok(outcomes)
    }
}
