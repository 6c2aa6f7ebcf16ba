//! The proxy's domain core, independent of transport: upload validation,
//! authority authentication, freezes and token batches over a [`Store`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signature, VerifyingKey};
use mabe_abe::{Attribute, AuthorityId, Header, MAX_HEADER_LEN, UpdateToken};
use sha2::{Digest, Sha256};

use crate::error::{ProxyError, Result};
use crate::store::{
    FreezeInfo, GroupOutcome, NewRecord, RecordId, SnapRow, Store, TokenGroup, TrustedAuthority,
};
use crate::{MAX_CHUNK_BYTES, MAX_TOKENS_PER_BATCH, STORE_CHUNK_BYTES};

/// Unix seconds now (0 if the clock is before 1970).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .unwrap_or(0)
}

/// Settings of a proxy node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This proxy's id: the audience authorities sign for (several proxies
    /// sharing one database may share the id).
    pub proxy_id: String,
    /// Largest accepted timestamp difference of an authority call, seconds.
    pub max_clock_skew_secs: i64,
    /// Largest payload accepted by one upload, bytes.
    pub max_payload_bytes: u64,
}

impl NodeConfig {
    /// Defaults: 300 s skew, 64 GiB payloads.
    pub fn new(proxy_id: impl Into<String>) -> Self {
        NodeConfig {
            proxy_id: proxy_id.into(),
            max_clock_skew_secs: 300,
            max_payload_bytes: 64 << 30,
        }
    }
}

/// The metadata of an authority call, as received.
#[derive(Clone, Debug, Default)]
pub struct CallAuth {
    /// Claimed authority id.
    pub authority: String,
    /// Unix seconds (decimal text).
    pub timestamp: String,
    /// Nonce, hex.
    pub nonce: String,
    /// Ed25519 signature, hex.
    pub signature: String,
}

/// A proxy node: the store and its settings.
#[derive(Debug)]
pub struct Node {
    store: Arc<dyn Store>,
    config: NodeConfig,
}

/// Validate a proxy id: `[a-z0-9][a-z0-9.-]{0,62}`.
pub fn valid_proxy_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() <= 63
        && b.first()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
}

impl Node {
    /// A node over `store`.
    pub fn new(store: Arc<dyn Store>, config: NodeConfig) -> Result<Self> {
        if !valid_proxy_id(&config.proxy_id) {
            return Err(ProxyError::InvalidArgument(format!(
                "proxy id {:?} is not [a-z0-9][a-z0-9.-]{{0,62}}",
                config.proxy_id
            )));
        }
        Ok(Node { store, config })
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The settings.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Pin `authority`'s identity key (`trust add`).
    pub async fn trust(&self, authority: &str, identity_key: &[u8]) -> Result<bool> {
        let id: AuthorityId = authority
            .parse()
            .map_err(|e| ProxyError::InvalidArgument(format!("authority id: {e}")))?;
        let key: [u8; 32] = identity_key.try_into().map_err(|_| {
            ProxyError::InvalidArgument("an identity key is 32 bytes (64 hex digits)".into())
        })?;
        VerifyingKey::from_bytes(&key).map_err(|_| {
            ProxyError::InvalidArgument("the identity key is not an Ed25519 public key".into())
        })?;
        self.store
            .add_trusted(&TrustedAuthority {
                authority_id: id.to_string(),
                identity_key: key,
                added_at: now(),
            })
            .await
    }

    /// Check an authority call: a trusted authority, a timestamp within the
    /// skew window, a fresh nonce, and a valid signature over
    /// [`mabe_proto::signing::proxy_message`] for this proxy, `method` and
    /// `body` (the request's protobuf encoding). Returns the authority id.
    pub async fn authenticate(&self, method: &str, auth: &CallAuth, body: &[u8]) -> Result<String> {
        let unauth = |m: &str| ProxyError::Unauthenticated(m.to_owned());
        if auth.authority.is_empty() || auth.authority.len() > 64 {
            return Err(unauth("missing or oversized authority id"));
        }
        let ts: i64 = auth
            .timestamp
            .parse()
            .map_err(|_| unauth("missing or malformed timestamp"))?;
        if auth.nonce.len() > 128 || auth.signature.len() != 128 {
            return Err(unauth("malformed nonce or signature"));
        }
        let nonce = hex::decode(&auth.nonce).map_err(|_| unauth("nonce is not hex"))?;
        if !(16..=64).contains(&nonce.len()) {
            return Err(unauth("the nonce must be 16 to 64 bytes"));
        }
        let sig = hex::decode(&auth.signature).map_err(|_| unauth("signature is not hex"))?;
        let sig = Signature::from_slice(&sig).map_err(|_| unauth("malformed signature"))?;
        let t = now();
        let skew = self.config.max_clock_skew_secs;
        // abs_diff: a hostile timestamp (i64::MIN) must not overflow.
        if ts.abs_diff(t) > skew.unsigned_abs() {
            return Err(unauth("stale or future timestamp (check the clocks)"));
        }
        let key = self
            .store
            .trusted_key(&auth.authority)
            .await?
            .ok_or_else(|| unauth("this authority is not trusted by this proxy"))?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| ProxyError::Corrupt("a pinned identity key does not decode".into()))?;
        let digest: [u8; 32] = Sha256::digest(body).into();
        let msg = mabe_proto::signing::proxy_message(
            &self.config.proxy_id,
            &auth.authority,
            method,
            &nonce,
            ts,
            &digest,
        );
        if key.verify_strict(&msg, &sig).is_err() {
            return Err(unauth(
                "the signature does not verify with the authority's pinned identity key",
            ));
        }
        if !self
            .store
            .use_nonce(&auth.authority, &nonce, t, t - 2 * skew)
            .await?
        {
            return Err(unauth("the nonce was already used (replay)"));
        }
        Ok(auth.authority.clone())
    }

    /// Parse an attribute of `authority`'s own domain.
    fn own_attribute(authority: &str, attribute: &str) -> Result<Attribute> {
        let a: Attribute = attribute
            .parse()
            .map_err(|e| ProxyError::InvalidArgument(format!("attribute: {e}")))?;
        if a.to_string() != attribute {
            return Err(ProxyError::InvalidArgument(
                "the attribute is not in canonical form".into(),
            ));
        }
        if a.authority().as_str() != authority {
            return Err(ProxyError::PermissionDenied(format!(
                "authority {authority} cannot act on {a}, which belongs to {}",
                a.authority()
            )));
        }
        Ok(a)
    }

    /// Freeze `(attribute, version)` for an authenticated `authority`.
    pub async fn freeze(
        &self,
        authority: &str,
        attribute: &str,
        version: u32,
    ) -> Result<FreezeInfo> {
        let a = Self::own_attribute(authority, attribute)?;
        if version == 0 {
            return Err(ProxyError::InvalidArgument("versions start at 1".into()));
        }
        let info = self
            .store
            .freeze(&a.to_string(), version, authority, now())
            .await?;
        tracing::info!(attribute = %a, version, rows = info.rows, "frozen");
        Ok(info)
    }

    /// A frozen version of `authority`'s attribute (`NotFound` if not frozen).
    pub async fn freeze_info(
        &self,
        authority: &str,
        attribute: &str,
        version: u32,
    ) -> Result<FreezeInfo> {
        let a = Self::own_attribute(authority, attribute)?;
        self.store
            .freeze_info(&a.to_string(), version)
            .await?
            .ok_or_else(|| {
                ProxyError::NotFound(format!("{a} version {version} is not frozen here"))
            })
    }

    /// Decode a batch of tokens, check they all belong to `authority`'s
    /// domain, group them by (record, attribute, version) in first-seen
    /// order, and apply them. Decoding (a validated GT element per token,
    /// about 0.5 ms) runs in the bounded blocking section ([`crate::cpu`]).
    pub async fn apply_tokens(
        &self,
        authority: &str,
        tokens: &[Vec<u8>],
    ) -> Result<Vec<(TokenGroup, GroupOutcome)>> {
        if tokens.is_empty() {
            return Err(ProxyError::InvalidArgument("no tokens".into()));
        }
        if tokens.len() > MAX_TOKENS_PER_BATCH {
            return Err(ProxyError::LimitExceeded(format!(
                "at most {MAX_TOKENS_PER_BATCH} tokens per batch"
            )));
        }
        let (who, batch) = (authority.to_owned(), tokens.to_vec());
        let groups = crate::cpu::run(move || group_tokens(&who, &batch)).await??;
        let outcomes = self.store.apply_tokens(&groups).await?;
        if outcomes.len() != groups.len() {
            return Err(ProxyError::Backend(
                "the store answered a different number of groups".into(),
            ));
        }
        Ok(groups.into_iter().zip(outcomes).collect())
    }

    /// Pending rows of a freeze (count and a page after `after`).
    pub async fn pending(
        &self,
        attribute: &str,
        version: u32,
        after: Option<(RecordId, u32)>,
        limit: u32,
    ) -> Result<(u64, Vec<SnapRow>)> {
        let count = self.store.pending_count(attribute, version).await?;
        let page = if limit == 0 {
            Vec::new()
        } else {
            self.store
                .pending_page(attribute, version, after, limit)
                .await?
        };
        Ok((count, page))
    }

    /// Start an upload of a record with this header (validated with
    /// [`Header::from_bytes`] in the bounded blocking section; an id already
    /// stored is refused now rather than after the payload).
    pub async fn start_upload(&self, header_bytes: Vec<u8>) -> Result<Upload> {
        if header_bytes.len() > MAX_HEADER_LEN {
            return Err(ProxyError::LimitExceeded(format!(
                "the header is larger than {MAX_HEADER_LEN} bytes"
            )));
        }
        // Validation checks subgroups of every row (about 0.45 ms per row):
        // the bounded blocking section, not an async worker.
        let (header, header_bytes) =
            crate::cpu::run(move || Header::from_bytes(&header_bytes).map(|h| (h, header_bytes)))
                .await?
                .map_err(|e| ProxyError::InvalidArgument(format!("header: {e}")))?;
        let rid = *header.rid().as_bytes();
        if self.store.record(&rid).await?.is_some() {
            return Err(ProxyError::AlreadyExists(format!(
                "record {} is already stored",
                hex::encode(rid)
            )));
        }
        let blob = self.store.begin_upload(now()).await?;
        Ok(Upload {
            store: Arc::clone(&self.store),
            header,
            header_bytes,
            blob,
            buffer: Vec::with_capacity(STORE_CHUNK_BYTES),
            next_seq: 0,
            size: 0,
            sha: Sha256::new(),
            max: self.config.max_payload_bytes,
        })
    }
}

/// Decode `tokens` with validation, check they are all of `authority`'s
/// attributes, and group them by (record, attribute, from-version) in
/// first-seen order.
fn group_tokens(authority: &str, tokens: &[Vec<u8>]) -> Result<Vec<TokenGroup>> {
    let mut groups: Vec<TokenGroup> = Vec::new();
    let mut index: BTreeMap<(RecordId, String, u32), usize> = BTreeMap::new();
    for (i, b) in tokens.iter().enumerate() {
        let t = UpdateToken::from_bytes(b)
            .map_err(|e| ProxyError::InvalidArgument(format!("token {i} does not decode: {e}")))?;
        if t.attribute().authority().as_str() != authority {
            return Err(ProxyError::PermissionDenied(format!(
                "token {i} is for {}, not an attribute of {authority}",
                t.attribute()
            )));
        }
        let key = (
            *t.record().as_bytes(),
            t.attribute().to_string(),
            t.from_version().get(),
        );
        let at = match index.get(&key) {
            Some(&at) => at,
            None => {
                groups.push(TokenGroup {
                    record_id: key.0,
                    attribute: key.1.clone(),
                    from_version: key.2,
                    tokens: Vec::new(),
                });
                index.insert(key, groups.len() - 1);
                groups.len() - 1
            }
        };
        if let Some(g) = groups.get_mut(at) {
            g.tokens.push(t);
        }
    }
    Ok(groups)
}

/// An upload in progress: payload bytes are stored in chunks of
/// [`STORE_CHUNK_BYTES`] as they arrive; nothing is visible until
/// [`Upload::finish`] commits. Call [`Upload::abort`] on failure (abandoned
/// uploads are also purged later).
pub struct Upload {
    store: Arc<dyn Store>,
    header: Header,
    header_bytes: Vec<u8>,
    blob: i64,
    buffer: Vec<u8>,
    next_seq: i64,
    size: u64,
    sha: Sha256,
    max: u64,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("record", &self.header.rid())
            .field("blob", &self.blob)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// The record id.
    pub fn record_id(&self) -> RecordId {
        *self.header.rid().as_bytes()
    }

    /// Append payload bytes (1 byte to [`MAX_CHUNK_BYTES`]).
    pub async fn push(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() || data.len() > MAX_CHUNK_BYTES {
            return Err(ProxyError::LimitExceeded(format!(
                "a payload chunk is 1 to {MAX_CHUNK_BYTES} bytes"
            )));
        }
        self.size = self
            .size
            .checked_add(data.len() as u64)
            .filter(|s| *s <= self.max)
            .ok_or_else(|| {
                ProxyError::LimitExceeded(format!("payloads are at most {} bytes", self.max))
            })?;
        self.sha.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let room = STORE_CHUNK_BYTES - self.buffer.len();
            let (now_part, later) = rest.split_at(room.min(rest.len()));
            self.buffer.extend_from_slice(now_part);
            rest = later;
            if self.buffer.len() == STORE_CHUNK_BYTES {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(STORE_CHUNK_BYTES));
        self.store
            .put_chunk(self.blob, self.next_seq, data, now())
            .await?;
        self.next_seq += 1;
        Ok(())
    }

    /// Check the client's size and digest, then commit: the record becomes
    /// visible, durably, or an error says why nothing was stored.
    pub async fn finish(mut self, payload_size: u64, payload_sha256: &[u8]) -> Result<RecordId> {
        let result = self.commit(payload_size, payload_sha256).await;
        if result.is_err() {
            // Nothing became visible; drop the stored chunks now.
            if let Err(e) = self.store.abort_upload(self.blob).await {
                tracing::warn!(error = %e, blob = self.blob, "could not discard a refused upload (it will be purged later)");
            }
        }
        result
    }

    async fn commit(&mut self, payload_size: u64, payload_sha256: &[u8]) -> Result<RecordId> {
        if payload_size != self.size {
            return Err(ProxyError::InvalidArgument(format!(
                "received {} payload bytes, the client says {payload_size}",
                self.size
            )));
        }
        let sha: [u8; 32] = std::mem::take(&mut self.sha).finalize().into();
        if payload_sha256 != sha {
            return Err(ProxyError::InvalidArgument(
                "the payload's SHA-256 does not match what the client sent".into(),
            ));
        }
        self.flush().await?;
        let rec = NewRecord::from_header(
            &self.header,
            std::mem::take(&mut self.header_bytes),
            self.size,
            sha,
            now(),
        );
        self.store.commit_upload(self.blob, &rec).await?;
        Ok(rec.record_id)
    }

    /// Discard the upload's stored chunks.
    pub async fn abort(self) {
        if let Err(e) = self.store.abort_upload(self.blob).await {
            tracing::warn!(error = %e, blob = self.blob, "could not discard an aborted upload (it will be purged later)");
        }
    }
}
