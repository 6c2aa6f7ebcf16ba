//! gRPC adapters: the `RecordStore` service (clients) and the
//! `ProxyAuthority` service (authorities, signed calls) over a [`Node`].
//! Errors become `tonic::Status` in one place ([`status`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mabe_proto::signing::{
    METHOD_APPLY_TOKENS, METHOD_FREEZE, METHOD_FREEZE_STATUS, PROXY_AUTHORITY, PROXY_NONCE,
    PROXY_SIGNATURE, PROXY_TIMESTAMP,
};
use mabe_proto::v1::{
    self, ApplyOutcome, ApplyTokensRequest, ApplyTokensResponse, DeleteRecordRequest,
    DeleteRecordResponse, FreezeRequest, FreezeResponse, FreezeStatusRequest, FreezeStatusResponse,
    FreezeSummary, GetProxyInfoRequest, GetRecordRequest, GetRecordResponse, ListRecordsRequest,
    ListRecordsResponse, ProxyInfo, PutRecordRequest, PutRecordResponse, RecordHead, RecordInfo,
    RecordResult, RowVersion, SnapshotRow, SnapshotRows, freeze_response, get_record_response,
    put_record_request,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{ProxyError, Result};
use crate::metrics::{GroupKind, Method, Metrics};
use crate::node::{CallAuth, Node};
use crate::store::{FreezeInfo, GroupOutcome, RecordId, RecordRead, SnapRow};
use crate::{MAX_LIST_PAGE, SNAPSHOT_PAGE_ROWS};

/// The one mapping from library errors to gRPC statuses. Storage and
/// internal failures are logged and answered without detail.
pub fn status(e: ProxyError) -> Status {
    match e {
        ProxyError::InvalidArgument(m) => Status::invalid_argument(m),
        ProxyError::LimitExceeded(m) => Status::resource_exhausted(m),
        ProxyError::Unauthenticated(m) => Status::unauthenticated(m),
        ProxyError::PermissionDenied(m) => Status::permission_denied(m),
        ProxyError::NotFound(m) => Status::not_found(m),
        ProxyError::AlreadyExists(m) => Status::already_exists(m),
        ProxyError::FailedPrecondition(m) => Status::failed_precondition(m),
        other => {
            tracing::error!(error = %other, "internal error");
            Status::internal("internal error (see the proxy's log)")
        }
    }
}

/// Deadlines of the services' handlers.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// Deadline of a unary call, and of a freeze before its stream starts.
    pub request: Duration,
    /// Longest wait for the next message of an upload, or for a slow reader
    /// to accept the next message of a download or snapshot.
    pub idle: Duration,
}

fn record_id(b: &[u8]) -> Result<RecordId> {
    b.try_into()
        .map_err(|_| ProxyError::InvalidArgument("a record id is 16 bytes".into()))
}

fn snapshot_row(r: &SnapRow) -> SnapshotRow {
    SnapshotRow {
        record_id: r.record_id.to_vec(),
        row: r.row,
        c2: r.c2.to_vec(),
    }
}

fn summary(f: &FreezeInfo) -> FreezeSummary {
    FreezeSummary {
        attribute: f.attribute.clone(),
        version: f.version,
        frozen_at: f.frozen_at,
        rows: f.rows,
        merkle_root: f.merkle_root.to_vec(),
    }
}

/// A page token of snapshot rows: record id (16 bytes) ‖ row (be32).
fn row_token(r: &SnapRow) -> Vec<u8> {
    let mut t = r.record_id.to_vec();
    t.extend_from_slice(&r.row.to_be_bytes());
    t
}

fn parse_row_token(t: &[u8]) -> Result<Option<(RecordId, u32)>> {
    if t.is_empty() {
        return Ok(None);
    }
    if t.len() != 20 {
        return Err(ProxyError::InvalidArgument("malformed page token".into()));
    }
    let (rid, row) = t.split_at(16);
    let rid = record_id(rid)?;
    let row: [u8; 4] = row
        .try_into()
        .map_err(|_| ProxyError::InvalidArgument("malformed page token".into()))?;
    Ok(Some((rid, u32::from_be_bytes(row))))
}

async fn within<T>(d: Duration, f: impl Future<Output = Result<T>>) -> Result<T, Status> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => r.map_err(status),
        Err(_) => Err(Status::deadline_exceeded(
            "the proxy's request deadline passed",
        )),
    }
}

/// The `RecordStore` service.
#[derive(Debug, Clone)]
pub struct RecordService {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    deadlines: Deadlines,
}

impl RecordService {
    /// Serve `node`, counting into `metrics`.
    pub fn new(node: Arc<Node>, metrics: Arc<Metrics>, deadlines: Deadlines) -> Self {
        RecordService {
            node,
            metrics,
            deadlines,
        }
    }

    fn count<T>(&self, m: Method, r: Result<T, Status>) -> Result<T, Status> {
        self.metrics.request(
            m,
            match &r {
                Ok(_) => tonic::Code::Ok,
                Err(s) => s.code(),
            },
        );
        r
    }

    async fn put(
        &self,
        mut stream: Streaming<PutRecordRequest>,
    ) -> Result<PutRecordResponse, Status> {
        let idle = self.deadlines.idle;
        let header = match next_message(&mut stream, idle).await?.and_then(|m| m.part) {
            Some(put_record_request::Part::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of an upload carries the header",
                ));
            }
        };
        let mut upload = self.node.start_upload(header).await.map_err(status)?;
        loop {
            let msg = match next_message(&mut stream, idle).await {
                Ok(m) => m,
                Err(e) => {
                    upload.abort().await;
                    return Err(e);
                }
            };
            match msg.and_then(|m| m.part) {
                Some(put_record_request::Part::Chunk(c)) => {
                    self.metrics.bytes_in(c.len() as u64);
                    if let Err(e) = upload.push(&c).await {
                        upload.abort().await;
                        return Err(status(e));
                    }
                }
                Some(put_record_request::Part::Finish(f)) => {
                    let rid = upload
                        .finish(f.payload_size, &f.payload_sha256)
                        .await
                        .map_err(status)?;
                    tracing::info!(record = %hex::encode(rid), size = f.payload_size, "record stored");
                    return Ok(PutRecordResponse {
                        record_id: rid.to_vec(),
                        payload_size: f.payload_size,
                    });
                }
                Some(put_record_request::Part::Header(_)) => {
                    upload.abort().await;
                    return Err(Status::invalid_argument("a second header in one upload"));
                }
                None => {
                    upload.abort().await;
                    return Err(Status::invalid_argument(
                        "the upload ended without its finish message (nothing was stored)",
                    ));
                }
            }
        }
    }
}

/// The next message of an upload, waiting at most `idle`.
async fn next_message(
    s: &mut Streaming<PutRecordRequest>,
    idle: Duration,
) -> Result<Option<PutRecordRequest>, Status> {
    match tokio::time::timeout(idle, s.message()).await {
        Ok(r) => r,
        Err(_) => Err(Status::deadline_exceeded(
            "no upload message within the idle deadline",
        )),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl v1::record_store_server::RecordStore for RecordService {
    async fn put_record(
        &self,
        req: Request<Streaming<PutRecordRequest>>,
    ) -> Result<Response<PutRecordResponse>, Status> {
        let r = self.put(req.into_inner()).await;
        self.count(Method::PutRecord, r).map(Response::new)
    }

    type GetRecordStream = BoxStream<GetRecordResponse>;

    async fn get_record(
        &self,
        req: Request<GetRecordRequest>,
    ) -> Result<Response<Self::GetRecordStream>, Status> {
        // The record and its first chunk in one read: a payload of one chunk
        // (up to STORE_CHUNK_BYTES) is answered from it, with no task.
        let r = async {
            let rid = record_id(&req.get_ref().record_id).map_err(status)?;
            let read = within(self.deadlines.request, self.node.store().read_record(&rid))
                .await?
                .ok_or_else(|| Status::not_found("no such record"))?;
            Ok::<_, Status>(read)
        }
        .await;
        let RecordRead {
            record: rec,
            first_chunk,
        } = self.count(Method::GetRecord, r)?;
        let head = GetRecordResponse {
            part: Some(get_record_response::Part::Head(RecordHead {
                header: rec.header,
                payload_size: rec.payload_size,
                payload_sha256: rec.payload_sha256.to_vec(),
            })),
        };
        let first = first_chunk.map(|data| {
            self.metrics.bytes_out(data.len() as u64);
            GetRecordResponse {
                part: Some(get_record_response::Part::Chunk(data)),
            }
        });
        if rec.chunks <= 1 {
            let msgs: Vec<Result<GetRecordResponse, Status>> =
                std::iter::once(head).chain(first).map(Ok).collect();
            return Ok(Response::new(Box::pin(tokio_stream::iter(msgs))));
        }
        // Larger payloads stream chunk by chunk (at most two messages
        // buffered), each chunk read when the reader has taken the previous.
        let (tx, rx) = mpsc::channel(2);
        let store = Arc::clone(self.node.store());
        let metrics = Arc::clone(&self.metrics);
        let idle = self.deadlines.idle;
        tokio::spawn(async move {
            let send = |m: Result<GetRecordResponse, Status>| {
                let tx = tx.clone();
                async move { matches!(tokio::time::timeout(idle, tx.send(m)).await, Ok(Ok(()))) }
            };
            for m in std::iter::once(head).chain(first) {
                if !send(Ok(m)).await {
                    return;
                }
            }
            for seq in 1..rec.chunks {
                let msg = match store.chunk(rec.blob_id, seq).await {
                    Ok(Some(data)) => {
                        metrics.bytes_out(data.len() as u64);
                        Ok(GetRecordResponse {
                            part: Some(get_record_response::Part::Chunk(data)),
                        })
                    }
                    Ok(None) => Err(Status::not_found(
                        "the record was deleted while it was being read",
                    )),
                    Err(e) => Err(status(e)),
                };
                let stop = msg.is_err();
                if !send(msg).await || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_records(
        &self,
        req: Request<ListRecordsRequest>,
    ) -> Result<Response<ListRecordsResponse>, Status> {
        let r = async {
            let q = req.into_inner();
            let size = match q.page_size {
                0 => 100,
                n if n > MAX_LIST_PAGE => {
                    return Err(Status::resource_exhausted(format!(
                        "pages hold at most {MAX_LIST_PAGE} records"
                    )));
                }
                n => n,
            };
            let after = if q.page_token.is_empty() {
                None
            } else {
                Some(record_id(&q.page_token).map_err(status)?)
            };
            let list = within(
                self.deadlines.request,
                self.node.store().list_records(after.as_ref(), size),
            )
            .await?;
            let next = if list.len() == size as usize {
                list.last()
                    .map(|r| r.record_id.to_vec())
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            Ok(ListRecordsResponse {
                records: list
                    .into_iter()
                    .map(|r| RecordInfo {
                        record_id: r.record_id.to_vec(),
                        header_size: r.header_size,
                        payload_size: r.payload_size,
                        rows: r
                            .rows
                            .into_iter()
                            .map(|(attribute, version)| RowVersion { attribute, version })
                            .collect(),
                        created_at: r.created_at,
                    })
                    .collect(),
                next_page_token: next,
            })
        }
        .await;
        self.count(Method::ListRecords, r).map(Response::new)
    }

    async fn delete_record(
        &self,
        req: Request<DeleteRecordRequest>,
    ) -> Result<Response<DeleteRecordResponse>, Status> {
        let r = async {
            let rid = record_id(&req.get_ref().record_id).map_err(status)?;
            if within(
                self.deadlines.request,
                self.node.store().delete_record(&rid),
            )
            .await?
            {
                tracing::info!(record = %hex::encode(rid), "record deleted");
                Ok(DeleteRecordResponse {})
            } else {
                Err(Status::not_found("no such record"))
            }
        }
        .await;
        self.count(Method::DeleteRecord, r).map(Response::new)
    }

    async fn get_proxy_info(
        &self,
        _: Request<GetProxyInfoRequest>,
    ) -> Result<Response<ProxyInfo>, Status> {
        let r = Ok(ProxyInfo {
            proxy_id: self.node.config().proxy_id.clone(),
            software_version: env!("CARGO_PKG_VERSION").into(),
        });
        self.count(Method::GetProxyInfo, r).map(Response::new)
    }
}

/// The `ProxyAuthority` service: every call must carry a fresh signature by
/// a trusted authority's identity key.
#[derive(Debug, Clone)]
pub struct AuthorityService {
    node: Arc<Node>,
    metrics: Arc<Metrics>,
    deadlines: Deadlines,
}

fn call_auth<T>(req: &Request<T>) -> CallAuth {
    let md = req.metadata();
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    CallAuth {
        authority: get(PROXY_AUTHORITY),
        timestamp: get(PROXY_TIMESTAMP),
        nonce: get(PROXY_NONCE),
        signature: get(PROXY_SIGNATURE),
    }
}

impl AuthorityService {
    /// Serve `node`, counting into `metrics`.
    pub fn new(node: Arc<Node>, metrics: Arc<Metrics>, deadlines: Deadlines) -> Self {
        AuthorityService {
            node,
            metrics,
            deadlines,
        }
    }

    async fn authenticate<T: Message>(&self, method: &str, req: &Request<T>) -> Result<String> {
        let auth = call_auth(req);
        let body = req.get_ref().encode_to_vec();
        let r = self.node.authenticate(method, &auth, &body).await;
        if let Err(e) = &r {
            tracing::warn!(method, authority = %auth.authority, error = %e, "authority call refused");
        }
        r
    }

    fn count<T>(&self, m: Method, r: Result<T, Status>) -> Result<T, Status> {
        self.metrics.request(
            m,
            match &r {
                Ok(_) => tonic::Code::Ok,
                Err(s) => s.code(),
            },
        );
        r
    }
}

#[tonic::async_trait]
impl v1::proxy_authority_server::ProxyAuthority for AuthorityService {
    type FreezeStream = BoxStream<FreezeResponse>;

    async fn freeze(
        &self,
        req: Request<FreezeRequest>,
    ) -> Result<Response<Self::FreezeStream>, Status> {
        let r = within(self.deadlines.request, async {
            let authority = self.authenticate(METHOD_FREEZE, &req).await?;
            let q = req.get_ref();
            self.node.freeze(&authority, &q.attribute, q.version).await
        })
        .await;
        let info = self.count(Method::Freeze, r)?;
        let (tx, rx) = mpsc::channel(2);
        let store = Arc::clone(self.node.store());
        let idle = self.deadlines.idle;
        tokio::spawn(async move {
            let send = |m: Result<FreezeResponse, Status>| {
                let tx = tx.clone();
                async move { matches!(tokio::time::timeout(idle, tx.send(m)).await, Ok(Ok(()))) }
            };
            let first = FreezeResponse {
                part: Some(freeze_response::Part::Summary(summary(&info))),
            };
            if !send(Ok(first)).await {
                return;
            }
            let mut after = None;
            loop {
                let page = match store
                    .snapshot_page(&info.attribute, info.version, after, SNAPSHOT_PAGE_ROWS)
                    .await
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = send(Err(status(e))).await;
                        return;
                    }
                };
                let Some(last) = page.last() else { return };
                after = Some((last.record_id, last.row));
                let full = page.len() == SNAPSHOT_PAGE_ROWS as usize;
                let msg = FreezeResponse {
                    part: Some(freeze_response::Part::Rows(SnapshotRows {
                        rows: page.iter().map(snapshot_row).collect(),
                    })),
                };
                if !send(Ok(msg)).await || !full {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn apply_tokens(
        &self,
        req: Request<ApplyTokensRequest>,
    ) -> Result<Response<ApplyTokensResponse>, Status> {
        let r = within(self.deadlines.request, async {
            let authority = self.authenticate(METHOD_APPLY_TOKENS, &req).await?;
            self.node
                .apply_tokens(&authority, &req.get_ref().tokens)
                .await
        })
        .await;
        let r = r.map(|results| {
            let results = results
                .into_iter()
                .map(|(g, o)| {
                    let (outcome, reason, kind) = match o {
                        GroupOutcome::Applied => {
                            (ApplyOutcome::Applied, String::new(), GroupKind::Applied)
                        }
                        GroupOutcome::AlreadyApplied => (
                            ApplyOutcome::AlreadyApplied,
                            String::new(),
                            GroupKind::AlreadyApplied,
                        ),
                        GroupOutcome::Refused(why) => {
                            (ApplyOutcome::Refused, why, GroupKind::Refused)
                        }
                        GroupOutcome::NotFound => (
                            ApplyOutcome::NotFound,
                            "no such record".into(),
                            GroupKind::NotFound,
                        ),
                    };
                    self.metrics.token_group(kind);
                    RecordResult {
                        record_id: g.record_id.to_vec(),
                        attribute: g.attribute,
                        from_version: g.from_version,
                        outcome: outcome as i32,
                        reason,
                        rows: g.tokens.len() as u32,
                    }
                })
                .collect();
            ApplyTokensResponse { results }
        });
        self.count(Method::ApplyTokens, r).map(Response::new)
    }

    async fn freeze_status(
        &self,
        req: Request<FreezeStatusRequest>,
    ) -> Result<Response<FreezeStatusResponse>, Status> {
        let r = within(self.deadlines.request, async {
            let authority = self.authenticate(METHOD_FREEZE_STATUS, &req).await?;
            let q = req.get_ref();
            if q.page_size > SNAPSHOT_PAGE_ROWS {
                return Err(ProxyError::LimitExceeded(format!(
                    "pages hold at most {SNAPSHOT_PAGE_ROWS} rows"
                )));
            }
            let info = self
                .node
                .freeze_info(&authority, &q.attribute, q.version)
                .await?;
            let after = parse_row_token(&q.page_token)?;
            let (pending, page) = self
                .node
                .pending(&info.attribute, info.version, after, q.page_size)
                .await?;
            let next = if q.page_size > 0 && page.len() == q.page_size as usize {
                page.last().map(row_token).unwrap_or_default()
            } else {
                Vec::new()
            };
            Ok(FreezeStatusResponse {
                summary: Some(summary(&info)),
                pending_rows: pending,
                pending: page.iter().map(snapshot_row).collect(),
                next_page_token: next,
            })
        })
        .await;
        self.count(Method::FreezeStatus, r).map(Response::new)
    }
}
