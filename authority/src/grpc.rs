//! gRPC adapters: the public `Authority` service and the `AuthorityAdmin`
//! service over a [`Node`]. Errors become `tonic::Status` in one place
//! ([`status`]).

use std::sync::Arc;

use ed25519_dalek::{Signature, VerifyingKey};
use mabe_proto::v1::{
    self, AddProxyRequest, AttributeInfo, AttributeRequest, AttributeRequestReceipt,
    AttributeVersionInfo, AuditEntryInfo, AuthorityInfo, BreakGlassRequest, CheckpointRequest,
    CheckpointResponse, CreateAttributeRequest, DecideRequestRequest, DescribeAttributeRequest,
    DescribeAttributeResponse, EnrollRequest, FetchKeysResponse, GetDirectoryRequest,
    GetInfoRequest, GrantInfo, GrantRequest, IssueOfflineRequest, IssueOfflineResponse, IssuedKey,
    IssuedKeyInfo, KeyRequest, ListAttributesRequest, ListAttributesResponse, ListAuditRequest,
    ListAuditResponse, ListProxiesRequest, ListProxiesResponse, ListRequestsRequest,
    ListRequestsResponse, ListRotationsRequest, ListRotationsResponse, PersonInfo, ProxyEntry,
    ProxyProgress, RequestInfo, RevokeRequest, RevokeResponse, RotateExpiredRequest,
    RotateExpiredResponse, RotationInfo, SignedDirectory, VerifyAuditRequest, VerifyAuditResponse,
};
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::{
    node::{KeyFetch, Node, NodeError, SignedAttributeRequest, SignedBreakGlass, now},
    store::{NonceUse, RequestRecord, RequestState, RotationRecord, VersionState},
};

/// Metadata key of the admin call's timestamp.
pub const ADMIN_TIMESTAMP: &str = "x-mabe-admin-timestamp";
/// Metadata key of the admin call's nonce (hex).
pub const ADMIN_NONCE: &str = "x-mabe-admin-nonce";
/// Metadata key of the admin call's signature (hex).
pub const ADMIN_SIGNATURE: &str = "x-mabe-admin-signature";

/// Namespace under which admin nonces are recorded (not a person's GID).
const ADMIN_NONCE_SPACE: [u8; 32] = [0xad; 32];

/// The one mapping from core errors to gRPC statuses.
pub fn status(e: NodeError) -> Status {
    match e {
        NodeError::InvalidArgument(m) => Status::invalid_argument(m),
        NodeError::Unauthenticated(m) => Status::unauthenticated(m),
        NodeError::PermissionDenied(m) => Status::permission_denied(m),
        NodeError::NotFound(m) => Status::not_found(m),
        NodeError::AlreadyExists(m) => Status::already_exists(m),
        NodeError::Conflict(m) => Status::failed_precondition(m),
        NodeError::Proxy { .. } => Status::unavailable(e.to_string()),
        NodeError::NotInitialized | NodeError::AlreadyInitialized => {
            Status::failed_precondition(e.to_string())
        }
        other => {
            tracing::error!(error = %other, "internal error");
            Status::internal("internal error (see the authority's log)")
        }
    }
}

/// The public service.
#[derive(Debug, Clone)]
pub struct PublicService {
    node: Arc<Node>,
}

impl PublicService {
    /// Serve `node`.
    pub fn new(node: Arc<Node>) -> Self {
        PublicService { node }
    }
}

#[tonic::async_trait]
impl v1::authority_server::Authority for PublicService {
    async fn get_info(
        &self,
        _: Request<GetInfoRequest>,
    ) -> Result<Response<AuthorityInfo>, Status> {
        Ok(Response::new(AuthorityInfo {
            authority_id: self.node.authority_id().to_string(),
            identity_public_key: self.node.identity_public_key().to_bytes().to_vec(),
            software_version: env!("CARGO_PKG_VERSION").into(),
        }))
    }

    async fn get_directory(
        &self,
        _: Request<GetDirectoryRequest>,
    ) -> Result<Response<SignedDirectory>, Status> {
        let (body, signature) = self.node.signed_directory().await.map_err(status)?;
        Ok(Response::new(SignedDirectory { body, signature }))
    }

    async fn fetch_keys(
        &self,
        req: Request<KeyRequest>,
    ) -> Result<Response<FetchKeysResponse>, Status> {
        let r = req.into_inner();
        let fetch = KeyFetch {
            authority: r.authority_id,
            gid: r.gid,
            attributes: r.attributes,
            nonce: r.nonce,
            timestamp: r.timestamp,
            signature: r.signature,
        };
        let keys = self.node.fetch_keys(&fetch).await.map_err(status)?;
        let issued = crate::metrics::KeysIssued(keys.len());
        let mut response = Response::new(issued_keys(keys));
        response.extensions_mut().insert(issued);
        Ok(response)
    }

    async fn break_glass(
        &self,
        req: Request<BreakGlassRequest>,
    ) -> Result<Response<FetchKeysResponse>, Status> {
        let r = req.into_inner();
        let signed = SignedBreakGlass {
            authority: r.authority_id,
            gid: r.gid,
            reason: r.reason,
            nonce: r.nonce,
            timestamp: r.timestamp,
            signature: r.signature,
        };
        let keys = self.node.break_glass(&signed).await.map_err(status)?;
        let issued = crate::metrics::KeysIssued(keys.len());
        let mut response = Response::new(issued_keys(keys));
        response.extensions_mut().insert(issued);
        Ok(response)
    }

    async fn request_attribute(
        &self,
        req: Request<AttributeRequest>,
    ) -> Result<Response<AttributeRequestReceipt>, Status> {
        let r = req.into_inner();
        let signed = SignedAttributeRequest {
            authority: r.authority_id,
            gid: r.gid,
            attribute: r.attribute,
            reason: r.reason,
            nonce: r.nonce,
            timestamp: r.timestamp,
            signature: r.signature,
        };
        let rec = self.node.request_attribute(&signed).await.map_err(status)?;
        Ok(Response::new(AttributeRequestReceipt {
            request_id: rec.id,
            state: rec.state.as_str().into(),
        }))
    }
}

/// The admin service: every call must carry a fresh signature by the admin key.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    /// Serve `node`.
    pub fn new(node: Arc<Node>) -> Self {
        AdminService { node }
    }

    /// Check the admin signature and spend its nonce (a write of its own).
    async fn authorize<T: Message>(&self, method: &str, req: &Request<T>) -> Result<(), Status> {
        let n = self.verify_signature(method, req)?;
        let fresh = self
            .node
            .store()
            .use_nonce(&n.space, &n.nonce, n.seen_at, n.prune_before)
            .await
            .map_err(|e| status(e.into()))?;
        if !fresh {
            return Err(Status::unauthenticated(
                "admin nonce was already used (replay)",
            ));
        }
        Ok(())
    }

    /// A rotation job with its progress at every proxy.
    async fn rotation_info(&self, r: RotationRecord) -> Result<RotationInfo, Status> {
        let progress = self
            .node
            .store()
            .rotation_progress(r.id)
            .await
            .map_err(|e| status(e.into()))?;
        Ok(RotationInfo {
            id: r.id,
            attribute: r.attribute,
            from_version: r.from_version,
            to_version: r.to_version,
            state: r.state.as_str().into(),
            reason: r.reason,
            created_at: r.created_at,
            finished_at: r.finished_at.unwrap_or(0),
            progress: progress
                .into_iter()
                .map(|p| ProxyProgress {
                    proxy_id: p.proxy_id,
                    rows_total: p.rows_total,
                    rows_done: p.rows_done,
                    frozen_at: p.frozen_at,
                    updated_at: p.updated_at,
                    done_at: p.done_at.unwrap_or(0),
                })
                .collect(),
        })
    }

    /// Check the admin signature and freshness of a call; the returned nonce
    /// must be spent, by [`Self::authorize`] or inside the call's own write.
    fn verify_signature<T: Message>(
        &self,
        method: &str,
        req: &Request<T>,
    ) -> Result<NonceUse, Status> {
        let md = req.metadata();
        let get = |k: &str| {
            md.get(k)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| Status::unauthenticated(format!("admin call without {k}")))
        };
        let ts: i64 = get(ADMIN_TIMESTAMP)?
            .parse()
            .map_err(|_| Status::unauthenticated("bad admin timestamp"))?;
        let nonce = hex::decode(get(ADMIN_NONCE)?)
            .map_err(|_| Status::unauthenticated("bad admin nonce"))?;
        let sig = hex::decode(get(ADMIN_SIGNATURE)?)
            .map_err(|_| Status::unauthenticated("bad admin signature encoding"))?;
        let t = now();
        let skew = self.node.config().max_clock_skew_secs;
        if ts.abs_diff(t) > skew.unsigned_abs() || !(16..=64).contains(&nonce.len()) {
            return Err(Status::unauthenticated("stale admin call or bad nonce"));
        }
        let digest: [u8; 32] = Sha256::digest(req.get_ref().encode_to_vec()).into();
        let msg = mabe_proto::signing::admin_message(
            self.node.authority_id().as_str(),
            method,
            &nonce,
            ts,
            &digest,
        );
        let ok = Signature::from_slice(&sig)
            .map(|s| verify(self.node.admin_public_key(), &msg, &s))
            .unwrap_or(false);
        if !ok {
            return Err(Status::unauthenticated(
                "admin signature does not verify with this authority's admin key",
            ));
        }
        Ok(NonceUse {
            space: ADMIN_NONCE_SPACE,
            nonce,
            seen_at: t,
            prune_before: t - 2 * skew,
        })
    }
}

fn issued_keys(keys: Vec<crate::node::IssuedKey>) -> FetchKeysResponse {
    FetchKeysResponse {
        keys: keys
            .into_iter()
            .map(|k| IssuedKey {
                attribute: k.attribute,
                version: k.version,
                user_key: k.key.to_vec(),
                expires_at: k.expires_at.unwrap_or(0),
            })
            .collect(),
    }
}

fn verify(key: &VerifyingKey, msg: &[u8], sig: &Signature) -> bool {
    key.verify_strict(msg, sig).is_ok()
}

fn request_info(r: RequestRecord) -> RequestInfo {
    RequestInfo {
        id: r.id,
        gid: r.gid.to_vec(),
        attribute: r.attribute,
        reason: r.reason,
        state: r.state.as_str().into(),
        created_at: r.created_at,
        decided_by: r.decided_by.unwrap_or_default(),
        note: r.note.unwrap_or_default(),
    }
}

const ADMIN: &str = "/mabe.v1.AuthorityAdmin/";

#[tonic::async_trait]
impl v1::authority_admin_server::AuthorityAdmin for AdminService {
    async fn create_attribute(
        &self,
        req: Request<CreateAttributeRequest>,
    ) -> Result<Response<AttributeInfo>, Status> {
        self.authorize(&format!("{ADMIN}CreateAttribute"), &req)
            .await?;
        let rec = self
            .node
            .create_attribute(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(AttributeInfo {
            attribute: rec.attribute,
            version: rec.version,
            state: rec.state.as_str().into(),
            created_at: rec.created_at,
            holders: 0,
        }))
    }

    async fn list_attributes(
        &self,
        req: Request<ListAttributesRequest>,
    ) -> Result<Response<ListAttributesResponse>, Status> {
        self.authorize(&format!("{ADMIN}ListAttributes"), &req)
            .await?;
        let r = req.get_ref();
        let page = self
            .node
            .attributes_page(&r.page_token, r.page_size)
            .await
            .map_err(status)?;
        Ok(Response::new(ListAttributesResponse {
            attributes: page
                .items
                .into_iter()
                .map(|(r, holders)| AttributeInfo {
                    attribute: r.attribute,
                    version: r.version,
                    state: r.state.as_str().into(),
                    created_at: r.created_at,
                    holders: u32::try_from(holders).unwrap_or(u32::MAX),
                })
                .collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn describe_attribute(
        &self,
        req: Request<DescribeAttributeRequest>,
    ) -> Result<Response<DescribeAttributeResponse>, Status> {
        self.authorize(&format!("{ADMIN}DescribeAttribute"), &req)
            .await?;
        let d = self
            .node
            .describe_attribute(&req.get_ref().name)
            .await
            .map_err(status)?;
        let current_version = d
            .versions
            .iter()
            .find(|v| v.state == VersionState::Current)
            .map_or(0, |v| v.version);
        // A version is superseded when the next one is created (same transaction).
        let versions = d
            .versions
            .iter()
            .enumerate()
            .map(|(i, v)| AttributeVersionInfo {
                version: v.version,
                state: v.state.as_str().into(),
                created_at: v.created_at,
                superseded_at: match v.state {
                    VersionState::Current => 0,
                    VersionState::Superseded => {
                        d.versions.get(i + 1).map_or(0, |next| next.created_at)
                    }
                },
            })
            .collect();
        let mut rotations = Vec::with_capacity(d.rotations.len());
        for r in d.rotations {
            rotations.push(self.rotation_info(r).await?);
        }
        Ok(Response::new(DescribeAttributeResponse {
            attribute: d.attribute,
            current_version,
            versions,
            holders: u32::try_from(d.holders).unwrap_or(u32::MAX),
            pending_requests: u32::try_from(d.pending_total).unwrap_or(u32::MAX),
            pending: d.pending.into_iter().map(request_info).collect(),
            rotations,
        }))
    }

    async fn enroll(&self, req: Request<EnrollRequest>) -> Result<Response<PersonInfo>, Status> {
        self.authorize(&format!("{ADMIN}Enroll"), &req).await?;
        let r = req.into_inner();
        let p = self
            .node
            .enroll(&r.registry, &r.subject, &r.request_key, &r.roles)
            .await
            .map_err(status)?;
        Ok(Response::new(PersonInfo {
            gid: p.gid.to_vec(),
            registry: p.registry,
            subject: p.subject,
            roles: p
                .roles
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
            enrolled_at: p.enrolled_at,
        }))
    }

    async fn grant(&self, req: Request<GrantRequest>) -> Result<Response<GrantInfo>, Status> {
        self.authorize(&format!("{ADMIN}Grant"), &req).await?;
        let r = req.into_inner();
        let expires = (r.expires_at != 0).then_some(r.expires_at);
        let g = self
            .node
            .grant(&r.gid, &r.attribute, expires, "admin")
            .await
            .map_err(status)?;
        Ok(Response::new(GrantInfo {
            gid: g.gid.to_vec(),
            attribute: g.attribute,
            granted_by: g.granted_by,
            granted_at: g.granted_at,
            expires_at: g.expires_at.unwrap_or(0),
        }))
    }

    async fn revoke(
        &self,
        req: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        self.authorize(&format!("{ADMIN}Revoke"), &req).await?;
        let r = req.into_inner();
        let rev = self
            .node
            .revoke(&r.gid, &r.attribute)
            .await
            .map_err(status)?;
        Ok(Response::new(RevokeResponse {
            attribute: rev.attribute,
            new_version: rev.new_version,
            reissued_to: rev.remaining_holders as u32,
            rotation_id: rev.rotation_id,
        }))
    }

    async fn list_requests(
        &self,
        req: Request<ListRequestsRequest>,
    ) -> Result<Response<ListRequestsResponse>, Status> {
        self.authorize(&format!("{ADMIN}ListRequests"), &req)
            .await?;
        let state =
            match req.get_ref().state.as_str() {
                "" => None,
                s => Some(RequestState::parse(s).map_err(|_| {
                    Status::invalid_argument("state is pending, approved or denied")
                })?),
            };
        let r = req.get_ref();
        let page = self
            .node
            .requests_page(state, &r.page_token, r.page_size)
            .await
            .map_err(status)?;
        Ok(Response::new(ListRequestsResponse {
            requests: page.items.into_iter().map(request_info).collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn decide_request(
        &self,
        req: Request<DecideRequestRequest>,
    ) -> Result<Response<RequestInfo>, Status> {
        // The nonce is spent in the decision's own transaction: one grouped
        // write per decision instead of two.
        let nonce = self.verify_signature(&format!("{ADMIN}DecideRequest"), &req)?;
        let r = req.into_inner();
        let rec = self
            .node
            .decide(r.id, r.approve, &r.note, "admin", Some(nonce))
            .await
            .map_err(|e| match e {
                NodeError::Unauthenticated(_) => {
                    Status::unauthenticated("admin nonce was already used (replay)")
                }
                other => status(other),
            })?;
        Ok(Response::new(request_info(rec)))
    }

    async fn verify_audit(
        &self,
        req: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        self.authorize(&format!("{ADMIN}VerifyAudit"), &req).await?;
        let report = self.node.verify_audit().await.map_err(status)?;
        Ok(Response::new(VerifyAuditResponse {
            entries: report.entries,
            checkpoints: report.checkpoints as u32,
            problems: report.problems.iter().map(ToString::to_string).collect(),
            head_seq: report.head.unwrap_or(0),
            last_checkpoint_seq: report.last_checkpoint.unwrap_or(0),
            uncovered_entries: report.uncovered,
        }))
    }

    async fn checkpoint(
        &self,
        req: Request<CheckpointRequest>,
    ) -> Result<Response<CheckpointResponse>, Status> {
        self.authorize(&format!("{ADMIN}Checkpoint"), &req).await?;
        let cp = self.node.checkpoint().await.map_err(status)?;
        Ok(Response::new(CheckpointResponse {
            empty: cp.is_none(),
            seq: cp.map(|c| c.seq).unwrap_or(0),
        }))
    }

    async fn list_rotations(
        &self,
        req: Request<ListRotationsRequest>,
    ) -> Result<Response<ListRotationsResponse>, Status> {
        self.authorize(&format!("{ADMIN}ListRotations"), &req)
            .await?;
        let list = self
            .node
            .rotations(req.get_ref().pending_only)
            .await
            .map_err(status)?;
        let mut rotations = Vec::with_capacity(list.len());
        for r in list {
            rotations.push(self.rotation_info(r).await?);
        }
        Ok(Response::new(ListRotationsResponse { rotations }))
    }

    async fn rotate_expired(
        &self,
        req: Request<RotateExpiredRequest>,
    ) -> Result<Response<RotateExpiredResponse>, Status> {
        self.authorize(&format!("{ADMIN}RotateExpired"), &req)
            .await?;
        let done = self.node.rotate_expired().await.map_err(status)?;
        Ok(Response::new(RotateExpiredResponse {
            rotations: done
                .into_iter()
                .map(|r| RevokeResponse {
                    attribute: r.attribute,
                    new_version: r.new_version,
                    reissued_to: r.remaining_holders as u32,
                    rotation_id: r.rotation_id,
                })
                .collect(),
        }))
    }

    async fn add_proxy(
        &self,
        req: Request<AddProxyRequest>,
    ) -> Result<Response<ProxyEntry>, Status> {
        self.authorize(&format!("{ADMIN}AddProxy"), &req).await?;
        let r = req.into_inner();
        let p = self
            .node
            .add_proxy(&r.id, &r.endpoint, &r.tls_root, &r.tls_name)
            .await
            .map_err(status)?;
        Ok(Response::new(ProxyEntry {
            id: p.id,
            endpoint: p.endpoint,
            tls_name: p.tls_name,
            added_at: p.added_at,
        }))
    }

    async fn list_proxies(
        &self,
        req: Request<ListProxiesRequest>,
    ) -> Result<Response<ListProxiesResponse>, Status> {
        self.authorize(&format!("{ADMIN}ListProxies"), &req).await?;
        let list = self
            .node
            .store()
            .proxies()
            .await
            .map_err(|e| status(e.into()))?;
        Ok(Response::new(ListProxiesResponse {
            proxies: list
                .into_iter()
                .map(|p| ProxyEntry {
                    id: p.id,
                    endpoint: p.endpoint,
                    tls_name: p.tls_name,
                    added_at: p.added_at,
                })
                .collect(),
        }))
    }

    async fn list_audit(
        &self,
        req: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.authorize(&format!("{ADMIN}ListAudit"), &req).await?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n @ 1..=1000 => n as usize,
            _ => return Err(Status::invalid_argument("limit is 1..=1000")),
        };
        // Scan the chain in pages, keeping entries of the wanted kind.
        let mut from = r.from_seq.max(1);
        let mut out = Vec::new();
        let mut scanned = 0usize;
        let next_seq = loop {
            let page = self
                .node
                .store()
                .audit_entries(from, 1000)
                .await
                .map_err(|e| status(e.into()))?;
            let Some(last) = page.last().map(|e| e.seq) else {
                break 0;
            };
            let mut stop = None;
            for e in page {
                if out.len() == limit {
                    stop = Some(e.seq);
                    break;
                }
                if r.kind.is_empty() || e.event.kind == r.kind {
                    out.push(AuditEntryInfo {
                        seq: e.seq,
                        ts: e.event.ts,
                        kind: e.event.kind,
                        actor: e.event.actor,
                        subject: e.event.subject.unwrap_or_default(),
                        attribute: e.event.attribute.unwrap_or_default(),
                        detail: e.event.detail,
                        hash: e.hash.to_vec(),
                    });
                }
            }
            scanned += 1000;
            if let Some(s) = stop {
                break s;
            }
            // An entry at i64::MAX (a tampered row) is the last one there can be.
            match last.checked_add(1) {
                Some(next) if next > from => from = next,
                _ => break 0,
            }
            // Bound the work of one call; the caller continues from here.
            if scanned >= 100_000 {
                break from;
            }
        };
        Ok(Response::new(ListAuditResponse {
            entries: out,
            next_seq,
        }))
    }

    async fn issue_offline(
        &self,
        req: Request<IssueOfflineRequest>,
    ) -> Result<Response<IssueOfflineResponse>, Status> {
        self.authorize(&format!("{ADMIN}IssueOffline"), &req)
            .await?;
        let keys = self
            .node
            .issue_offline(&req.get_ref().gid)
            .await
            .map_err(status)?;
        if keys.is_empty() {
            return Err(Status::failed_precondition(
                "nothing to issue: no active grant for this GID",
            ));
        }
        let encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.key.to_vec()).collect();
        // The bundle carries the signed directory, so that it can be imported
        // with nothing but the authority's pinned identity key.
        let (body, signature) = self.node.signed_directory().await.map_err(status)?;
        let directory = mabe_proto::bundle::encode_signed_directory(&body, &signature);
        let bundle =
            mabe_proto::bundle::encode(self.node.authority_id().as_str(), &directory, &encoded);
        Ok(Response::new(IssueOfflineResponse {
            bundle: bundle.to_vec(),
            keys: keys
                .iter()
                .map(|k| IssuedKeyInfo {
                    attribute: k.attribute.clone(),
                    version: k.version,
                })
                .collect(),
        }))
    }
}
