//! The revocation driver (DESIGN §3, steps 2–5): takes a pending rotation
//! job to the end at every registered record-store proxy.
//!
//! For each proxy, in order:
//! 1. **Freeze** `(attribute, old version)`: the proxy refuses new uploads at
//!    that version and returns the snapshot of affected rows. The driver
//!    rebuilds the snapshot, checks its Merkle root against the proxy's, and
//!    records root and row count at the first freeze; a later freeze (after
//!    a crash) must report the same snapshot, or the job stops.
//! 2. **Tokens**: for every row still at the old version (the proxy's
//!    `FreezeStatus`), compute `T1 = e(C2, g2^Δα)`, `T3 = C2^Δy` on every
//!    core, only for rows inside the snapshot, and send them whole records at
//!    a time (the proxy updates all rows of a record in one transaction, and
//!    acknowledges repeats without applying them twice). The work is cut
//!    into [`CHUNKS`] chunks of the record-id space; a replica leases one
//!    chunk at a time in the database ([`Store::claim_chunk`]), so replicas
//!    driving the same job share it instead of repeating it, and a chunk
//!    whose replica died is taken over when its lease runs out.
//! 3. When the proxy reports no pending row, record it as done with a
//!    `token-batch` audit entry.
//!
//! When every proxy is done, the update secret is erased
//! ([`Node::finish_rotation`]). While the job runs, holders who fetch keys
//! get both the old and the new version (rows not updated yet still need
//! the old one). Every step is idempotent, so a crash of the authority, the
//! proxy or the database at any point is handled by running the driver
//! again: `serve` does so on a schedule, and the proxy's per-row idempotence
//! keeps every update exactly once even if two replicas send the same token.
//!
//! [`Store::claim_chunk`]: crate::store::Store::claim_chunk

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use ark_std::rand::rngs::OsRng;
use mabe_abe::{RecordId, Snapshot, SnapshotRow, TokenGenerator, UpdateSecret, Version};
use mabe_proto::{
    signing::{METHOD_APPLY_TOKENS, METHOD_FREEZE, METHOD_FREEZE_STATUS},
    v1::{
        ApplyOutcome, ApplyTokensRequest, FreezeRequest, FreezeStatusRequest, FreezeStatusResponse,
        freeze_response, proxy_authority_client::ProxyAuthorityClient,
    },
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::{
    node::{Node, NodeError, NodeResult, now},
    store::{AuditEvent, ChunkLease, ProxyRecord, RotationProgress, RotationRecord, RotationState},
};

/// Tokens per `ApplyTokens` call (each token is about 700 bytes).
pub const TOKENS_PER_CALL: usize = 256;
/// Rows computed per round at most (then sent while the next round computes).
pub const ROWS_PER_ROUND: usize = 1024;
/// Rows in the first round of a chunk. Its tokens are computed before
/// anything can be sent; later rounds double up to [`ROWS_PER_ROUND`], so
/// sending overlaps computing even in a chunk of a few hundred rows.
pub const FIRST_ROUND: usize = 32;
/// Least time between two progress records while tokens are sent (each asks
/// the proxy for its pending count and writes the progress row).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Pending rows asked for per `FreezeStatus` page.
const STATUS_PAGE: u32 = 10_000;

fn proxy_err(proxy: &str, detail: impl std::fmt::Display) -> NodeError {
    NodeError::Proxy {
        proxy: proxy.to_owned(),
        detail: detail.to_string(),
    }
}

/// Connect to a registered proxy over TLS, trusting only its pinned root.
pub async fn connect(p: &ProxyRecord) -> NodeResult<ProxyAuthorityClient<Channel>> {
    let channel = Endpoint::from_shared(p.endpoint.clone())
        .map_err(|e| proxy_err(&p.id, format!("bad endpoint {}: {e}", p.endpoint)))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&p.tls_root))
                .domain_name(p.tls_name.clone()),
        )
        .map_err(|e| proxy_err(&p.id, e))?
        .timeout(Duration::from_secs(120))
        .connect()
        .await
        .map_err(|e| proxy_err(&p.id, format!("cannot connect to {}: {e}", p.endpoint)))?;
    Ok(ProxyAuthorityClient::new(channel)
        .max_decoding_message_size(mabe_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(mabe_proto::MAX_MESSAGE_BYTES))
}

fn decode_row(proxy: &str, r: &mabe_proto::v1::SnapshotRow) -> NodeResult<SnapshotRow> {
    let id: [u8; 16] = r
        .record_id
        .as_slice()
        .try_into()
        .map_err(|_| proxy_err(proxy, "a snapshot row's record id is not 16 bytes"))?;
    Ok(SnapshotRow {
        record: RecordId::from_bytes(id),
        row: r.row,
        c2: mabe_abe::wire::decode_g1(&r.c2, "snapshot C2").map_err(|e| proxy_err(proxy, e))?,
    })
}

/// The frozen snapshot's rows by (record, row), with the encoding of each
/// `C2` as the proxy sent it at the freeze (and the driver validated then).
/// Rows the proxy later lists as pending are matched against it by a byte
/// comparison instead of being decoded and validated a second time; a row
/// that is not in the snapshot, or whose `C2` differs, is refused.
type SnapshotIndex = HashMap<(RecordId, u32), (SnapshotRow, Vec<u8>)>;

fn known_row(
    proxy: &str,
    index: &SnapshotIndex,
    r: &mabe_proto::v1::SnapshotRow,
) -> NodeResult<SnapshotRow> {
    let id: [u8; 16] = r
        .record_id
        .as_slice()
        .try_into()
        .map_err(|_| proxy_err(proxy, "a pending row's record id is not 16 bytes"))?;
    match index.get(&(RecordId::from_bytes(id), r.row)) {
        Some((row, c2)) if *c2 == r.c2 => Ok(*row),
        _ => Err(proxy_err(
            proxy,
            format!(
                "pending row {}#{} is not in the frozen snapshot",
                hex::encode(id),
                r.row
            ),
        )),
    }
}

/// Drive rotation `rotation_id` at every registered proxy, then erase its
/// update secret. `report` is called after every step with the progress at
/// the proxy being driven. Returns the finished job.
pub async fn drive_rotation(
    node: &Arc<Node>,
    rotation_id: i64,
    report: &(dyn Fn(&RotationProgress) + Send + Sync),
) -> NodeResult<RotationRecord> {
    let job = node
        .rotations(false)
        .await?
        .into_iter()
        .find(|r| r.id == rotation_id)
        .ok_or_else(|| NodeError::NotFound(format!("rotation {rotation_id} does not exist")))?;
    if job.state == RotationState::Done {
        return Ok(job);
    }
    let secret = node.update_secret(&job)?;
    for proxy in node.store().proxies().await? {
        drive_proxy(node, &job, &secret, &proxy, report).await?;
    }
    match node.finish_rotation(rotation_id).await {
        Ok(done) => Ok(done),
        // Another replica finished it first.
        Err(NodeError::Conflict(_)) => node
            .rotations(false)
            .await?
            .into_iter()
            .find(|r| r.id == rotation_id)
            .ok_or_else(|| NodeError::NotFound(format!("rotation {rotation_id} vanished"))),
        Err(e) => Err(e),
    }
}

/// Drive every pending rotation (oldest first); errors are returned after
/// trying them all, so one unreachable proxy does not hold up the others.
pub async fn drive_pending(node: &Arc<Node>) -> Vec<(i64, NodeResult<RotationRecord>)> {
    let jobs = match node.rotations(true).await {
        Ok(j) => j,
        Err(e) => return vec![(0, Err(e))],
    };
    let mut out = Vec::new();
    for job in jobs {
        let r = drive_rotation(node, job.id, &|_| {}).await;
        out.push((job.id, r));
    }
    out
}

async fn freeze(
    node: &Node,
    client: &mut ProxyAuthorityClient<Channel>,
    job: &RotationRecord,
    proxy: &ProxyRecord,
    from: Version,
) -> NodeResult<(Snapshot, SnapshotIndex, RotationProgress)> {
    let attribute: mabe_abe::Attribute = job
        .attribute
        .parse()
        .map_err(|e| NodeError::InvalidArgument(format!("rotation attribute: {e}")))?;
    let req = node.sign_proxy_call(
        FreezeRequest {
            attribute: job.attribute.clone(),
            version: job.from_version,
        },
        &proxy.id,
        METHOD_FREEZE,
    )?;
    let mut stream = client
        .freeze(req)
        .await
        .map_err(|s| proxy_err(&proxy.id, format!("freeze refused: {}", s.message())))?
        .into_inner();
    let mut summary = None;
    let mut snapshot = Snapshot::new(attribute, from);
    let mut index = SnapshotIndex::new();
    while let Some(msg) = stream
        .message()
        .await
        .map_err(|s| proxy_err(&proxy.id, format!("freeze stream: {}", s.message())))?
    {
        match msg.part {
            Some(freeze_response::Part::Summary(s)) if summary.is_none() => summary = Some(s),
            Some(freeze_response::Part::Rows(rows)) if summary.is_some() => {
                for r in &rows.rows {
                    let row = decode_row(&proxy.id, r)?;
                    snapshot.insert(row).map_err(|e| proxy_err(&proxy.id, e))?;
                    index.insert((row.record, row.row), (row, r.c2.clone()));
                }
            }
            _ => return Err(proxy_err(&proxy.id, "freeze stream out of order")),
        }
    }
    let summary = summary.ok_or_else(|| proxy_err(&proxy.id, "freeze stream without summary"))?;
    if summary.attribute != job.attribute || summary.version != job.from_version {
        return Err(proxy_err(
            &proxy.id,
            "freeze summary is for another version",
        ));
    }
    let root = snapshot.merkle_root();
    if summary.rows != snapshot.len() as u64 || summary.merkle_root.as_slice() != root {
        return Err(proxy_err(
            &proxy.id,
            "the snapshot rows do not match the proxy's own count and Merkle root",
        ));
    }
    let t = now();
    let progress = node
        .store()
        .record_freeze(&RotationProgress {
            rotation_id: job.id,
            proxy_id: proxy.id.clone(),
            snapshot_root: root,
            rows_total: i64::try_from(snapshot.len()).unwrap_or(i64::MAX),
            rows_done: 0,
            frozen_at: t,
            updated_at: t,
            done_at: None,
        })
        .await?;
    Ok((snapshot, index, progress))
}

async fn status_page(
    node: &Node,
    client: &mut ProxyAuthorityClient<Channel>,
    job: &RotationRecord,
    proxy: &str,
    page_token: Vec<u8>,
    page_size: u32,
) -> NodeResult<FreezeStatusResponse> {
    let req = node.sign_proxy_call(
        FreezeStatusRequest {
            attribute: job.attribute.clone(),
            version: job.from_version,
            page_token,
            page_size,
        },
        proxy,
        METHOD_FREEZE_STATUS,
    )?;
    Ok(client
        .freeze_status(req)
        .await
        .map_err(|s| proxy_err(proxy, format!("status refused: {}", s.message())))?
        .into_inner())
}

/// Rows still pending at the proxy after page token `start` and before
/// record id `end` (`None`: to the end), in (record, row) order, each
/// matched against the frozen snapshot; and the proxy's total pending count.
async fn pending_rows(
    node: &Node,
    client: &mut ProxyAuthorityClient<Channel>,
    job: &RotationRecord,
    proxy: &str,
    index: &SnapshotIndex,
    (start, end): (Vec<u8>, Option<[u8; 16]>),
) -> NodeResult<(u64, Vec<SnapshotRow>)> {
    let mut rows = Vec::new();
    let mut token = start;
    let mut pending = None;
    loop {
        let page = status_page(node, client, job, proxy, token, STATUS_PAGE).await?;
        pending.get_or_insert(page.pending_rows);
        for r in &page.pending {
            if end.is_some_and(|e| r.record_id.as_slice() >= e.as_slice()) {
                return Ok((pending.unwrap_or(0), rows));
            }
            rows.push(known_row(proxy, index, r)?);
        }
        if page.next_page_token.is_empty() {
            return Ok((pending.unwrap_or(0), rows));
        }
        token = page.next_page_token;
    }
}

/// Compute the tokens of `rows` on every core; each is encoded for the wire.
async fn compute(
    tokens_gen: &Arc<TokenGenerator>,
    rows: Vec<SnapshotRow>,
) -> NodeResult<Vec<Vec<u8>>> {
    let tokens_gen = Arc::clone(tokens_gen);
    tokio::task::spawn_blocking(move || {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = rows.len().div_ceil(workers).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = rows
                .chunks(per)
                .map(|chunk| {
                    let tokens_gen = &tokens_gen;
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .map(|r| tokens_gen.compute(r, &mut OsRng).map(|t| t.to_bytes()))
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let mut out = Vec::with_capacity(rows.len());
            for h in handles {
                let part = h
                    .join()
                    .map_err(|_| NodeError::Conflict("a token worker panicked".into()))??;
                out.extend(part);
            }
            Ok(out)
        })
    })
    .await
    .map_err(|_| NodeError::Conflict("the token task was cancelled".into()))?
}

/// Split rows (sorted by record) into rounds that never cut a record: the
/// first of about `first` rows, each next one twice as large, up to `max`.
fn rounds(rows: &[SnapshotRow], first: usize, max: usize) -> Vec<Vec<SnapshotRow>> {
    let mut out: Vec<Vec<SnapshotRow>> = Vec::new();
    let mut cur: Vec<SnapshotRow> = Vec::new();
    let mut size = first.clamp(1, max.max(1));
    for r in rows {
        let same_record = cur.last().is_some_and(|l| l.record == r.record);
        if cur.len() >= size && !same_record {
            out.push(std::mem::take(&mut cur));
            size = size.saturating_mul(2).min(max.max(1));
        }
        cur.push(*r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Send one round's tokens (already in record order), whole records per call.
async fn send(
    node: &Node,
    client: &mut ProxyAuthorityClient<Channel>,
    proxy: &str,
    rows: &[SnapshotRow],
    tokens: Vec<Vec<u8>>,
) -> NodeResult<()> {
    let mut batch: Vec<Vec<u8>> = Vec::new();
    let mut last: Option<RecordId> = None;
    let mut calls = Vec::new();
    for (r, t) in rows.iter().zip(tokens) {
        if batch.len() >= TOKENS_PER_CALL && last != Some(r.record) {
            calls.push(std::mem::take(&mut batch));
        }
        last = Some(r.record);
        batch.push(t);
    }
    if !batch.is_empty() {
        calls.push(batch);
    }
    for tokens in calls {
        let req =
            node.sign_proxy_call(ApplyTokensRequest { tokens }, proxy, METHOD_APPLY_TOKENS)?;
        let results = client
            .apply_tokens(req)
            .await
            .map_err(|s| proxy_err(proxy, format!("tokens refused: {}", s.message())))?
            .into_inner()
            .results;
        for r in results {
            match ApplyOutcome::try_from(r.outcome) {
                Ok(
                    ApplyOutcome::Applied | ApplyOutcome::AlreadyApplied | ApplyOutcome::NotFound,
                ) => {}
                _ => {
                    return Err(proxy_err(
                        proxy,
                        format!(
                            "record {} refused its tokens: {}",
                            hex::encode(&r.record_id),
                            r.reason
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Chunks a proxy's record-id space is cut into, by the top four bits of the
/// record id, so that replicas can share a rotation's work (record ids are
/// random, so chunks are about equal).
pub const CHUNKS: u32 = 16;

/// The `FreezeStatus` page token that starts chunk `k` (rows after it are the
/// chunk's first), and the record id where the next chunk starts (`None`
/// for the last). A page token is the last row's `record id ‖ be32(row)`.
fn chunk_range(k: u32) -> (Vec<u8>, Option<[u8; 16]>) {
    let first = u8::try_from(k.min(CHUNKS - 1) * (256 / CHUNKS)).unwrap_or(u8::MAX);
    let start = match first.checked_sub(1) {
        None => Vec::new(),
        Some(before) => {
            let mut t = vec![0xff; 20];
            t[0] = before;
            t
        }
    };
    let end = (k + 1 < CHUNKS).then(|| {
        let mut e = [0u8; 16];
        e[0] = u8::try_from((k + 1) * (256 / CHUNKS)).unwrap_or(u8::MAX);
        e
    });
    (start, end)
}

/// One proxy's part of a rotation, as this replica drives it.
struct ProxyRun<'a> {
    node: &'a Node,
    client: ProxyAuthorityClient<Channel>,
    job: &'a RotationRecord,
    proxy: &'a ProxyRecord,
    tokens_gen: Arc<TokenGenerator>,
    index: SnapshotIndex,
    progress: RotationProgress,
    report: &'a (dyn Fn(&RotationProgress) + Send + Sync),
}

impl ProxyRun<'_> {
    /// Ask the proxy how many rows are still pending, record and report the
    /// progress (monotonic across replicas); with `finished`, also mark this
    /// proxy done with its `token-batch` audit entry. Returns the count.
    async fn update_progress(&mut self, finish_if_done: bool) -> NodeResult<u64> {
        let status = status_page(
            self.node,
            &mut self.client,
            self.job,
            &self.proxy.id,
            Vec::new(),
            0,
        )
        .await?;
        let pending = status.pending_rows;
        let total = self.progress.rows_total;
        let done_rows = total.saturating_sub(i64::try_from(pending).unwrap_or(i64::MAX));
        let finished = finish_if_done && pending == 0;
        let ev = finished.then(|| AuditEvent {
            ts: now(),
            kind: "token-batch".into(),
            actor: "revocation".into(),
            subject: None,
            attribute: Some(self.job.attribute.clone()),
            detail: format!(
                "rotation {}: proxy {} has all {total} row(s) at version {}",
                self.job.id, self.proxy.id, self.job.to_version
            ),
        });
        let t = now();
        self.node
            .store()
            .record_progress(self.job.id, &self.proxy.id, done_rows, t, ev)
            .await?;
        self.progress.rows_done = done_rows.max(self.progress.rows_done);
        self.progress.updated_at = t;
        if finished {
            self.progress.done_at = Some(t);
        }
        (self.report)(&self.progress);
        Ok(pending)
    }

    /// Compute and send the tokens of `rows` (in record order). The next
    /// round is computed while this one is sent and while the bookkeeping
    /// after it runs, so the cores stay busy with tokens. With a lease, it is
    /// renewed once a third of its time has passed, and the work stops if the
    /// lease was lost (another replica took the chunk over after this one
    /// stalled). Progress is recorded at most every [`PROGRESS_EVERY`].
    async fn send_rows(
        &mut self,
        rows: &[SnapshotRow],
        lease: Option<(&ChunkLease, u32)>,
    ) -> NodeResult<()> {
        let mut rounds = rounds(rows, FIRST_ROUND, ROWS_PER_ROUND).into_iter();
        let generator = Arc::clone(&self.tokens_gen);
        let start = |rows: Vec<SnapshotRow>| {
            let generator = Arc::clone(&generator);
            AbortOnDrop(tokio::spawn(async move {
                let tokens = compute(&generator, rows.clone()).await;
                (rows, tokens)
            }))
        };
        let mut ahead = rounds.next().map(start);
        let renew_every = Duration::from_secs(
            u64::try_from(self.node.config().chunk_lease_secs / 3).unwrap_or(0),
        );
        let mut renewed = Instant::now();
        let mut recorded = Instant::now();
        while let Some(task) = ahead.take() {
            let (rows_now, tokens_now) = task.join().await?;
            let tokens_now = tokens_now?;
            ahead = rounds.next().map(start);
            send(
                self.node,
                &mut self.client,
                &self.proxy.id,
                &rows_now,
                tokens_now,
            )
            .await?;
            if let Some((lease, chunk)) = lease {
                if renewed.elapsed() >= renew_every {
                    let until = now().saturating_add(self.node.config().chunk_lease_secs);
                    if !self
                        .node
                        .store()
                        .update_chunk(lease, chunk, until, None)
                        .await?
                    {
                        tracing::info!(
                            rotation = self.job.id,
                            proxy = %self.proxy.id,
                            chunk,
                            "lease lost to another replica; leaving the chunk to it"
                        );
                        return Ok(());
                    }
                    renewed = Instant::now();
                }
            }
            if recorded.elapsed() >= PROGRESS_EVERY {
                self.update_progress(false).await?;
                recorded = Instant::now();
            }
        }
        Ok(())
    }
}

/// A spawned task that is cancelled if its handle is dropped (a round
/// computed ahead is not wanted once the run has failed or stopped).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    async fn join(mut self) -> NodeResult<T> {
        (&mut self.0)
            .await
            .map_err(|_| NodeError::Conflict("the token task failed".into()))
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn drive_proxy(
    node: &Arc<Node>,
    job: &RotationRecord,
    secret: &UpdateSecret,
    proxy: &ProxyRecord,
    report: &(dyn Fn(&RotationProgress) + Send + Sync),
) -> NodeResult<()> {
    let from = Version::new(job.from_version);
    let mut client = connect(proxy).await?;
    let (snapshot, index, progress) = freeze(node, &mut client, job, proxy, from).await?;
    report(&progress);
    if progress.done_at.is_some() {
        return Ok(());
    }
    let mut run = ProxyRun {
        node,
        client,
        job,
        proxy,
        tokens_gen: Arc::new(secret.token_generator(snapshot, &mut OsRng)?),
        index,
        progress,
        report,
    };
    // 1. Share the work with any other replica driving this job: lease one
    //    chunk of the record-id space at a time, send its tokens, mark it
    //    done. When every chunk is done or leased elsewhere, wait for the
    //    others (a lease that runs out is taken over).
    let lease = ChunkLease {
        rotation_id: job.id,
        proxy_id: proxy.id.clone(),
        owner: node.config().instance_id.clone(),
    };
    loop {
        let t = now();
        let until = t.saturating_add(node.config().chunk_lease_secs);
        match node.store().claim_chunk(&lease, CHUNKS, t, until).await? {
            Some(chunk) => {
                let (_, rows) = pending_rows(
                    node,
                    &mut run.client,
                    job,
                    &proxy.id,
                    &run.index,
                    chunk_range(chunk),
                )
                .await?;
                run.send_rows(&rows, Some((&lease, chunk))).await?;
                node.store()
                    .update_chunk(&lease, chunk, now(), Some(now()))
                    .await?;
            }
            None => {
                let (done, all) = node.store().chunk_counts(job.id, &proxy.id).await?;
                if done >= all {
                    break;
                }
                if run.update_progress(false).await? == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    // 2. Sweep: whatever is still pending (normally nothing), then record
    //    the proxy as done.
    let mut last_pending = u64::MAX;
    loop {
        let (pending, rows) = pending_rows(
            node,
            &mut run.client,
            job,
            &proxy.id,
            &run.index,
            (Vec::new(), None),
        )
        .await?;
        if pending == 0 {
            run.update_progress(true).await?;
            return Ok(());
        }
        if pending >= last_pending {
            return Err(proxy_err(
                &proxy.id,
                format!("{pending} row(s) stay at the old version after their tokens were applied"),
            ));
        }
        last_pending = pending;
        run.send_rows(&rows, None).await?;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(record: u8, row: u32) -> SnapshotRow {
        SnapshotRow {
            record: RecordId::from_bytes([record; 16]),
            row,
            c2: mabe_abe::hash_to_g1(b"MABE-TEST", &[record]).unwrap(),
        }
    }

    #[test]
    fn chunks_cover_the_record_id_space_once() {
        // Every first byte falls in exactly one chunk: after the chunk's
        // start token and before its end.
        for b in 0..=255u8 {
            let mut rid = [0u8; 16];
            rid[0] = b;
            let mut row_token = rid.to_vec();
            row_token.extend_from_slice(&0u32.to_be_bytes());
            let owners: Vec<u32> = (0..CHUNKS)
                .filter(|&k| {
                    let (start, end) = chunk_range(k);
                    let after_start = start.is_empty() || row_token.as_slice() > start.as_slice();
                    let before_end = end.is_none_or(|e| rid < e);
                    after_start && before_end
                })
                .collect();
            assert_eq!(
                owners,
                vec![u32::from(b) / (256 / CHUNKS)],
                "first byte {b}"
            );
        }
        // The extremes: the smallest record id of chunk 1 is its first row.
        let (start, _) = chunk_range(1);
        let mut first = vec![0x10];
        first.extend_from_slice(&[0; 19]);
        assert!(first.as_slice() > start.as_slice());
        assert_eq!(chunk_range(0).0, Vec::<u8>::new());
        assert!(chunk_range(CHUNKS - 1).1.is_none());
    }

    #[test]
    fn rounds_never_cut_a_record() {
        let rows = vec![
            row(1, 0),
            row(1, 3),
            row(2, 0),
            row(3, 1),
            row(3, 2),
            row(4, 0),
        ];
        let r = rounds(&rows, 2, 2);
        let shape: Vec<Vec<(u8, u32)>> = r
            .iter()
            .map(|v| v.iter().map(|x| (x.record.as_bytes()[0], x.row)).collect())
            .collect();
        assert_eq!(
            shape,
            vec![
                vec![(1, 0), (1, 3)],
                vec![(2, 0), (3, 1), (3, 2)],
                vec![(4, 0)]
            ]
        );
        assert!(rounds(&[], 5, 5).is_empty());
    }

    #[test]
    fn rounds_grow_from_the_first_to_the_largest() {
        let rows: Vec<SnapshotRow> = (0..20).map(|i| row(i, 0)).collect();
        let sizes: Vec<usize> = rounds(&rows, 1, 4).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1, 2, 4, 4, 4, 4, 1]);
    }
}
