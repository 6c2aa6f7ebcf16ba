//! The authority's domain core, independent of transport: attributes,
//! people, grants, requests, key issuance, the signed directory and the
//! audit log. The gRPC layer is a thin adapter over [`Node`].

use std::{
    collections::HashMap,
    fmt,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use mabe_abe::{
    AbeError, Attribute, AttributePublicKey, AttributeSecretKey, AuthorityId, Gid, HashedGid,
    Version,
};
use mabe_proto::signing::{Directory, DirectoryEntry};
use zeroize::Zeroizing;

use crate::{
    audit::{self, AuditReport, Verifier},
    seal::{Kek, SealError, attribute_ad, identity_ad, update_ad},
    store::{
        AttributeRecord, AuditEntry, AuditEvent, AuthorityMeta, Checkpoint, GrantRecord,
        NewRotation, NonceUse, PersonRecord, RequestFilter, RequestRecord, RequestState,
        RotationRecord, Store, StoreError, VersionState,
    },
};

/// Errors of the authority core. The gRPC layer maps each to one status code.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory or database has no authority yet.
    #[error("this authority is not initialised: run `mabe-authority init` first")]
    NotInitialized,
    /// `init` on an initialised authority.
    #[error("this authority is already initialised")]
    AlreadyInitialized,
    /// A malformed argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The caller could not be authenticated (unknown key, bad signature,
    /// stale timestamp, replayed nonce). Audited.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed (attribute not granted). Audited.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A named thing does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A named thing exists already.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The operation does not apply in the current state.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Store(StoreError),
    /// A sealed secret did not open (wrong key-encryption key or tampering).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// A cryptographic object in storage did not decode.
    #[error("cryptography: {0}")]
    Crypto(#[from] AbeError),
    /// A record-store proxy could not be reached, refused a call, or
    /// answered something the revocation flow cannot accept.
    #[error("proxy {proxy}: {detail}")]
    Proxy {
        /// The proxy's id.
        proxy: String,
        /// What went wrong.
        detail: String,
    },
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(m) => NodeError::AlreadyExists(m),
            StoreError::NotFound(m) => NodeError::NotFound(m),
            StoreError::Conflict(m) => NodeError::Conflict(m),
            StoreError::Replay => {
                NodeError::Unauthenticated("nonce was already used (replay)".into())
            }
            other => NodeError::Store(other),
        }
    }
}

/// Result type of the core.
pub type NodeResult<T> = Result<T, NodeError>;

/// Current Unix time in seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Tunables with sensible defaults.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Largest accepted difference between a request's timestamp and now.
    pub max_clock_skew_secs: i64,
    /// How long a signed directory is valid.
    pub directory_validity_secs: i64,
    /// Name (before `@`) of this authority's emergency attribute, granted on
    /// break-glass (DESIGN §4).
    pub emergency_attribute: String,
    /// Role a person must have been enrolled with to break the glass.
    pub emergency_role: String,
    /// How long a break-glass grant lasts.
    pub break_glass_secs: i64,
    /// This replica's name when it leases a share of a rotation's work
    /// (see `revocation`): stable across restarts of one replica (the CLI
    /// keeps it in the data directory), different between replicas.
    pub instance_id: String,
    /// How long a lease on a share of a rotation's work lasts before another
    /// replica may take it over (it is renewed as the work goes on).
    pub chunk_lease_secs: i64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let mut id = [0u8; 8];
        OsRng.fill_bytes(&mut id);
        NodeConfig {
            max_clock_skew_secs: 300,
            directory_validity_secs: 3600,
            emergency_attribute: "emergency".into(),
            emergency_role: "emergency-staff".into(),
            break_glass_secs: 12 * 3600,
            instance_id: hex::encode(id),
            chunk_lease_secs: 30,
        }
    }
}

/// A signed key fetch, as received.
#[derive(Clone, Debug)]
pub struct KeyFetch {
    /// Authority the request is addressed to.
    pub authority: String,
    /// The requester.
    pub gid: Vec<u8>,
    /// Attributes asked for; empty: every granted one.
    pub attributes: Vec<String>,
    /// Single-use nonce.
    pub nonce: Vec<u8>,
    /// Unix seconds.
    pub timestamp: i64,
    /// Ed25519 signature by the person's request key.
    pub signature: Vec<u8>,
}

/// A signed attribute request, as received.
#[derive(Clone, Debug)]
pub struct SignedAttributeRequest {
    /// Authority the request is addressed to.
    pub authority: String,
    /// The requester.
    pub gid: Vec<u8>,
    /// Attribute wanted.
    pub attribute: String,
    /// Stated reason (shown to the approver, audited).
    pub reason: String,
    /// Single-use nonce.
    pub nonce: Vec<u8>,
    /// Unix seconds.
    pub timestamp: i64,
    /// Ed25519 signature by the person's request key.
    pub signature: Vec<u8>,
}

/// A signed break-glass request, as received.
#[derive(Clone, Debug)]
pub struct SignedBreakGlass {
    /// Authority the request is addressed to.
    pub authority: String,
    /// The requester.
    pub gid: Vec<u8>,
    /// Stated reason (audited).
    pub reason: String,
    /// Single-use nonce.
    pub nonce: Vec<u8>,
    /// Unix seconds.
    pub timestamp: i64,
    /// Ed25519 signature by the person's request key.
    pub signature: Vec<u8>,
}

/// One issued key.
pub struct IssuedKey {
    /// The attribute.
    pub attribute: String,
    /// Its version.
    pub version: u32,
    /// Encoded user key (secret).
    pub key: Zeroizing<Vec<u8>>,
    /// Expiry of the grant, if any.
    pub expires_at: Option<i64>,
}

impl fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedKey")
            .field("attribute", &self.attribute)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Outcome of a revocation (the grant removed, the attribute rotated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revocation {
    /// The attribute.
    pub attribute: String,
    /// Its new version.
    pub new_version: u32,
    /// The pending rotation job (its update secret awaits the proxies' rows).
    pub rotation_id: i64,
    /// Remaining holders, who get the new version on their next fetch.
    pub remaining_holders: usize,
}

/// The parts of a signed request that [`Node::authenticate`] checks.
struct Signed<'a> {
    what: &'a str,
    authority: &'a str,
    gid: &'a [u8],
    nonce: &'a [u8],
    timestamp: i64,
    signature: &'a [u8],
    message: &'a [u8],
}

/// Longest accepted reason text.
pub const MAX_REASON_LEN: usize = 2000;

/// Most bytes of a caller's authority id that a refusal repeats (valid ids
/// have at most 63).
const MAX_ECHOED_ID_BYTES: usize = 80;

/// Largest page of a listing (`ListAttributes`, `ListRequests`), also the
/// size of a page asked for with size 0: 500 requests with the longest
/// reason and note stay well under the 4 MiB message limit.
pub const MAX_PAGE_SIZE: u32 = 500;

/// Most pending requests [`Node::describe_attribute`] lists (it counts all).
pub const DESCRIBE_PENDING_LIMIT: i64 = 100;

/// One page of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in the listing's order.
    pub items: Vec<T>,
    /// Opaque token of the next page; `None` after the last page.
    pub next: Option<String>,
}

/// One attribute as `DescribeAttribute` shows it.
#[derive(Clone, Debug)]
pub struct AttributeDescription {
    /// Canonical attribute text.
    pub attribute: String,
    /// Every version, oldest first (the last one is current).
    pub versions: Vec<AttributeRecord>,
    /// Active grants.
    pub holders: usize,
    /// Requests for it waiting for a decision.
    pub pending_total: i64,
    /// The oldest of them, at most [`DESCRIBE_PENDING_LIMIT`].
    pub pending: Vec<RequestRecord>,
    /// Its rotation jobs, oldest first.
    pub rotations: Vec<RotationRecord>,
}

/// The store's limit for a page of `size` (0: the largest), one more than
/// the page so that a full page knows whether another follows.
fn page_limit(size: u32) -> (usize, i64) {
    let size = match size {
        0 => MAX_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    };
    (size as usize, i64::from(size) + 1)
}

/// Cut `items` to `size` and give the token of the next page, made from the
/// last item kept, if more items followed.
fn paged<T>(mut items: Vec<T>, size: usize, token: impl Fn(&T) -> String) -> Page<T> {
    let next = if items.len() > size {
        items.truncate(size);
        items.last().map(token)
    } else {
        None
    };
    Page { items, next }
}

fn bad_token() -> NodeError {
    NodeError::InvalidArgument("page_token was not issued by this listing".into())
}

/// Audit entries read per page when the whole log is scanned.
const AUDIT_PAGE: i64 = 1000;

/// An authority node's core.
pub struct Node {
    store: Arc<dyn Store>,
    id: AuthorityId,
    identity: SigningKey,
    admin: VerifyingKey,
    kek: Kek,
    config: NodeConfig,
    secrets: Mutex<HashMap<(String, u32), Arc<AttributeSecretKey>>>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("authority", &self.id)
            .field("store", &self.store.backend())
            .finish_non_exhaustive()
    }
}

fn event(kind: &str, actor: &str) -> AuditEvent {
    AuditEvent {
        ts: now(),
        kind: kind.into(),
        actor: actor.into(),
        subject: None,
        attribute: None,
        detail: String::new(),
    }
}

fn gid_of(bytes: &[u8]) -> NodeResult<Gid> {
    let arr: [u8; 32] = bytes
        .try_into()
        .map_err(|_| NodeError::InvalidArgument("a GID is 32 bytes".into()))?;
    Ok(Gid::from_bytes(arr))
}

fn random_signing_key() -> SigningKey {
    let mut seed = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(seed.as_mut());
    SigningKey::from_bytes(&seed)
}

impl Node {
    /// Initialise a new authority in `store`: identity key (sealed under the
    /// KEK) and admin key. Returns the node and the admin signing key, which
    /// the caller stores for the administrator (it is not kept here).
    pub async fn init(
        store: Arc<dyn Store>,
        authority_id: &str,
        kek: Kek,
        config: NodeConfig,
    ) -> NodeResult<(Node, SigningKey)> {
        let admin = random_signing_key();
        let node =
            Self::init_with_admin_key(store, authority_id, kek, config, admin.verifying_key())
                .await?;
        Ok((node, admin))
    }

    /// Like [`Node::init`], with the admin public key of a key pair the
    /// caller made (`mabe-authority init` stores the secret half before the
    /// database is initialised, so that an initialised database always has
    /// its admin key on disk).
    pub async fn init_with_admin_key(
        store: Arc<dyn Store>,
        authority_id: &str,
        kek: Kek,
        config: NodeConfig,
        admin: VerifyingKey,
    ) -> NodeResult<Node> {
        let id: AuthorityId = authority_id
            .parse()
            .map_err(|e| NodeError::InvalidArgument(format!("authority id: {e}")))?;
        if store.meta().await?.is_some() {
            return Err(NodeError::AlreadyInitialized);
        }
        let identity = random_signing_key();
        let sealed = kek.seal(&mut OsRng, &identity_ad(id.as_str()), identity.as_bytes())?;
        let meta = AuthorityMeta {
            authority_id: id.as_str().to_owned(),
            identity_public_key: identity.verifying_key().to_bytes(),
            identity_secret_sealed: sealed,
            admin_public_key: admin.to_bytes(),
            created_at: now(),
        };
        let mut ev = event("init", "admin");
        ev.detail = format!(
            "authority {} initialised; identity key {}",
            id,
            hex::encode(meta.identity_public_key)
        );
        store.init_meta(&meta, ev).await.map_err(|e| match e {
            StoreError::AlreadyExists(_) => NodeError::AlreadyInitialized,
            other => other.into(),
        })?;
        Ok(Node {
            store,
            id,
            identity,
            admin,
            kek,
            config,
            secrets: Mutex::new(HashMap::new()),
        })
    }

    /// Open an initialised authority.
    pub async fn open(store: Arc<dyn Store>, kek: Kek, config: NodeConfig) -> NodeResult<Node> {
        let meta = store.meta().await?.ok_or(NodeError::NotInitialized)?;
        let id: AuthorityId = meta
            .authority_id
            .parse()
            .map_err(|_| NodeError::Store(StoreError::Corrupt("authority id".into())))?;
        let seed = kek.open(&identity_ad(id.as_str()), &meta.identity_secret_sealed)?;
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| NodeError::Store(StoreError::Corrupt("identity key length".into())))?;
        let identity = SigningKey::from_bytes(&seed);
        if identity.verifying_key().to_bytes() != meta.identity_public_key {
            return Err(NodeError::Store(StoreError::Corrupt(
                "identity key does not match its public key".into(),
            )));
        }
        let admin = VerifyingKey::from_bytes(&meta.admin_public_key)
            .map_err(|_| NodeError::Store(StoreError::Corrupt("admin public key".into())))?;
        Ok(Node {
            store,
            id,
            identity,
            admin,
            kek,
            config,
            secrets: Mutex::new(HashMap::new()),
        })
    }

    /// The authority id.
    pub fn authority_id(&self) -> &AuthorityId {
        &self.id
    }

    /// The identity public key (clients pin it).
    pub fn identity_public_key(&self) -> VerifyingKey {
        self.identity.verifying_key()
    }

    /// Sign a call to the record-store proxy `proxy` with the identity key
    /// (`mabe_proto::signing::sign_proxy_request`); the key never leaves
    /// the node.
    pub fn sign_proxy_call<T: prost::Message>(
        &self,
        msg: T,
        proxy: &str,
        method: &str,
    ) -> NodeResult<tonic::Request<T>> {
        mabe_proto::signing::sign_proxy_request(
            msg,
            proxy,
            self.id.as_str(),
            method,
            &self.identity,
        )
        .map_err(|e| NodeError::Proxy {
            proxy: proxy.to_owned(),
            detail: e.to_string(),
        })
    }

    /// The admin public key (admin calls must be signed by its secret half).
    pub fn admin_public_key(&self) -> &VerifyingKey {
        &self.admin
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The tunables.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    fn attribute(&self, name_or_full: &str) -> NodeResult<Attribute> {
        let text = if name_or_full.contains('@') {
            name_or_full.to_owned()
        } else {
            format!("{name_or_full}@{}", self.id)
        };
        let a: Attribute = text
            .parse()
            .map_err(|e| NodeError::InvalidArgument(format!("{e}")))?;
        if a.authority() != &self.id {
            return Err(NodeError::InvalidArgument(format!(
                "{a} belongs to authority {}, not {}",
                a.authority(),
                self.id
            )));
        }
        Ok(a)
    }

    // ------------------------------------------------------------ attributes

    /// Create an attribute (`name` or `name@this-authority`) at version 1.
    pub async fn create_attribute(&self, name: &str) -> NodeResult<AttributeRecord> {
        let attr = self.attribute(name)?;
        let sk = AttributeSecretKey::generate(attr.clone(), Version::FIRST, &mut OsRng);
        let rec = self.record_for(&sk, VersionState::Current)?;
        let mut ev = event("create-attribute", "admin");
        ev.attribute = Some(attr.to_string());
        ev.detail = "version 1".into();
        self.store.create_attribute(&rec, ev).await?;
        Ok(rec)
    }

    fn record_for(
        &self,
        sk: &AttributeSecretKey,
        state: VersionState,
    ) -> NodeResult<AttributeRecord> {
        let attr = sk.attribute().to_string();
        let version = sk.version().get();
        let pk = sk.public_key(&mut OsRng).to_bytes();
        let sealed = self.kek.seal(
            &mut OsRng,
            &attribute_ad(self.id.as_str(), &attr, version),
            &sk.to_bytes(),
        )?;
        Ok(AttributeRecord {
            attribute: attr,
            version,
            public_key: pk,
            secret_sealed: sealed,
            state,
            created_at: now(),
        })
    }

    /// Every attribute version with its number of active holders.
    pub async fn attributes(&self) -> NodeResult<Vec<(AttributeRecord, usize)>> {
        let recs = self.store.attributes().await?;
        let mut out = Vec::with_capacity(recs.len());
        for r in recs {
            let holders = if r.state == VersionState::Current {
                self.store.holders(&r.attribute).await?.len()
            } else {
                0
            };
            out.push((r, holders));
        }
        Ok(out)
    }

    /// One page of [`Node::attributes`], by attribute then version: from
    /// the start (empty `token`) or from a previous page's `next` token.
    pub async fn attributes_page(
        &self,
        token: &str,
        size: u32,
    ) -> NodeResult<Page<(AttributeRecord, usize)>> {
        // Token: "a1." ‖ hex(attribute) ‖ "." ‖ version of the last item.
        let after = match token {
            "" => None,
            t => {
                let (attr_hex, version) = t
                    .strip_prefix("a1.")
                    .and_then(|rest| rest.split_once('.'))
                    .ok_or_else(bad_token)?;
                let attr = hex::decode(attr_hex)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(bad_token)?;
                let version: u32 = version.parse().map_err(|_| bad_token())?;
                Some((attr, version))
            }
        };
        let (size, limit) = page_limit(size);
        let recs = self
            .store
            .attributes_page(after.as_ref().map(|(a, v)| (a.as_str(), *v)), limit)
            .await?;
        let mut items = Vec::with_capacity(recs.len());
        for r in recs {
            let holders = if r.state == VersionState::Current {
                self.store.holders(&r.attribute).await?.len()
            } else {
                0
            };
            items.push((r, holders));
        }
        Ok(paged(items, size, |(r, _)| {
            format!("a1.{}.{}", hex::encode(&r.attribute), r.version)
        }))
    }

    /// One attribute: every version, its holders, the requests waiting for
    /// it and its rotation jobs.
    pub async fn describe_attribute(&self, name: &str) -> NodeResult<AttributeDescription> {
        let attribute = self.attribute(name)?.to_string();
        let versions = self.store.attribute_versions(&attribute).await?;
        if versions.is_empty() {
            return Err(NodeError::NotFound(format!("attribute {attribute}")));
        }
        let holders = self.store.holders(&attribute).await?.len();
        let pending_filter = RequestFilter {
            state: Some(RequestState::Pending),
            attribute: Some(attribute.clone()),
        };
        let pending_total = self.store.count_requests(&pending_filter).await?;
        let pending = self
            .store
            .requests_page(&pending_filter, 0, DESCRIBE_PENDING_LIMIT)
            .await?;
        let rotations = self.store.attribute_rotations(&attribute).await?;
        Ok(AttributeDescription {
            attribute,
            versions,
            holders,
            pending_total,
            pending,
            rotations,
        })
    }

    async fn current(&self, attribute: &str) -> NodeResult<AttributeRecord> {
        self.store
            .attribute_versions(attribute)
            .await?
            .into_iter()
            .find(|r| r.state == VersionState::Current)
            .ok_or_else(|| NodeError::NotFound(format!("attribute {attribute}")))
    }

    fn secret(&self, rec: &AttributeRecord) -> NodeResult<Arc<AttributeSecretKey>> {
        let key = (rec.attribute.clone(), rec.version);
        if let Ok(cache) = self.secrets.lock() {
            if let Some(sk) = cache.get(&key) {
                return Ok(Arc::clone(sk));
            }
        }
        let bytes = self.kek.open(
            &attribute_ad(self.id.as_str(), &rec.attribute, rec.version),
            &rec.secret_sealed,
        )?;
        let sk = Arc::new(AttributeSecretKey::from_bytes(&bytes, &mut OsRng)?);
        if sk.attribute().to_string() != rec.attribute || sk.version().get() != rec.version {
            return Err(NodeError::Store(StoreError::Corrupt(format!(
                "sealed secret of {}#{} is for another attribute",
                rec.attribute, rec.version
            ))));
        }
        if let Ok(mut cache) = self.secrets.lock() {
            cache.insert(key, Arc::clone(&sk));
        }
        Ok(sk)
    }

    /// The directory body and the identity key's signature over it.
    pub async fn signed_directory(&self) -> NodeResult<(Vec<u8>, Vec<u8>)> {
        let issued_at = now();
        let entries = self
            .store
            .attributes()
            .await?
            .into_iter()
            .map(|r| DirectoryEntry {
                attribute: r.attribute,
                version: r.version,
                current: r.state == VersionState::Current,
                public_key: r.public_key,
            })
            .collect();
        let body = Directory {
            authority: self.id.to_string(),
            issued_at,
            valid_until: issued_at + self.config.directory_validity_secs,
            entries,
        }
        .encode();
        let sig = self.identity.sign(&body).to_bytes().to_vec();
        Ok((body, sig))
    }

    // ---------------------------------------------------------------- people

    /// Enroll a person with their Ed25519 request key.
    pub async fn enroll(
        &self,
        registry: &str,
        subject: &str,
        request_key: &[u8],
        roles: &[String],
    ) -> NodeResult<PersonRecord> {
        let gid = Gid::derive(registry, subject)
            .map_err(|e| NodeError::InvalidArgument(e.to_string()))?;
        let key: [u8; 32] = request_key
            .try_into()
            .map_err(|_| NodeError::InvalidArgument("a request key is 32 bytes".into()))?;
        VerifyingKey::from_bytes(&key)
            .map_err(|_| NodeError::InvalidArgument("not a valid Ed25519 public key".into()))?;
        if roles.iter().any(|r| {
            r.is_empty() || r.len() > 64 || r.contains(',') || r.chars().any(char::is_control)
        }) {
            return Err(NodeError::InvalidArgument(
                "roles are non-empty names without commas".into(),
            ));
        }
        let person = PersonRecord {
            gid: *gid.as_bytes(),
            registry: registry.trim().to_lowercase(),
            subject: subject.trim().to_owned(),
            request_key: key,
            roles: roles.join(","),
            enrolled_at: now(),
        };
        let mut ev = event("enroll", "admin");
        ev.subject = Some(gid.to_string());
        ev.detail = format!("roles [{}]", person.roles);
        self.store.enroll(&person, ev).await?;
        Ok(person)
    }

    // ---------------------------------------------------------------- grants

    /// Grant an attribute directly.
    pub async fn grant(
        &self,
        gid: &[u8],
        attribute: &str,
        expires_at: Option<i64>,
        by: &str,
    ) -> NodeResult<GrantRecord> {
        let gid = gid_of(gid)?;
        let attr = self.attribute(attribute)?;
        let g = GrantRecord {
            gid: *gid.as_bytes(),
            attribute: attr.to_string(),
            granted_by: by.into(),
            granted_at: now(),
            expires_at,
        };
        let mut ev = event("grant", by);
        ev.subject = Some(gid.to_string());
        ev.attribute = Some(attr.to_string());
        ev.detail = match expires_at {
            Some(t) => format!("expires at {t}"),
            None => "no expiry".into(),
        };
        self.store.grant(&g, ev).await?;
        Ok(g)
    }

    /// Revoke a grant and rotate the attribute to a new version, so keys the
    /// revoked person holds stop working on new records (and, once the proxy
    /// applied the update tokens, on stored ones). Remaining holders get the
    /// new version on their next fetch. The grant's end, the new version and
    /// the rotation job are one transaction.
    pub async fn revoke(&self, gid: &[u8], attribute: &str) -> NodeResult<Revocation> {
        let gid = gid_of(gid)?;
        let attr = self.attribute(attribute)?;
        self.rotate(&attr, &[gid], &format!("revoke {gid}"), "admin")
            .await
    }

    /// Revoke every expired grant (break-glass grants and any other grant
    /// with an expiry): one rotation per attribute, whatever the number of
    /// expired grants. Safe to run on several replicas at once: a rotation
    /// that lost the race is skipped and its grants are picked up next time.
    pub async fn rotate_expired(&self) -> NodeResult<Vec<Revocation>> {
        let expired = self.store.expired_grants(now()).await?;
        let mut by_attr: std::collections::BTreeMap<String, Vec<Gid>> = Default::default();
        for g in expired {
            by_attr
                .entry(g.attribute.clone())
                .or_default()
                .push(Gid::from_bytes(g.gid));
        }
        let mut done = Vec::new();
        for (attribute, gids) in by_attr {
            let attr = self.attribute(&attribute)?;
            let reason = format!("{} expired grant(s)", gids.len());
            match self.rotate(&attr, &gids, &reason, "scheduler").await {
                Ok(r) => done.push(r),
                Err(NodeError::Conflict(m) | NodeError::NotFound(m)) => {
                    tracing::info!(attribute, reason = %m, "expired grants already handled elsewhere");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    async fn rotate(
        &self,
        attr: &Attribute,
        revoke: &[Gid],
        reason: &str,
        actor: &str,
    ) -> NodeResult<Revocation> {
        let name = attr.to_string();
        let rec = self.current(&name).await?;
        let sk = self.secret(&rec)?;
        let (next, update) = sk.rotate(&mut OsRng)?;
        let new_rec = self.record_for(&next, VersionState::Current)?;
        let rotation = NewRotation {
            reason: reason.to_owned(),
            update_secret_sealed: self.kek.seal(
                &mut OsRng,
                &update_ad(self.id.as_str(), &rec.attribute, rec.version),
                &update.to_bytes(),
            )?,
            revoke: revoke
                .iter()
                .map(|gid| {
                    let mut ev = event("revoke", actor);
                    ev.subject = Some(gid.to_string());
                    ev.attribute = Some(name.clone());
                    (*gid.as_bytes(), ev)
                })
                .collect(),
        };
        let mut ev = event("rotate", actor);
        ev.attribute = Some(name.clone());
        ev.detail = format!("version {} -> {}: {reason}", rec.version, new_rec.version);
        let job = self.store.rotate_attribute(&new_rec, &rotation, ev).await?;
        let remaining_holders = self.store.holders(&name).await?.len();
        Ok(Revocation {
            attribute: name,
            new_version: new_rec.version,
            rotation_id: job.id,
            remaining_holders,
        })
    }

    /// Register a record-store proxy that revocations are driven on. The
    /// id is the proxy's own (`mabe-proxy` prints it); the TLS root is
    /// checked to be PEM.
    pub async fn add_proxy(
        &self,
        id: &str,
        endpoint: &str,
        tls_root: &[u8],
        tls_name: &str,
    ) -> NodeResult<crate::store::ProxyRecord> {
        let valid_id = !id.is_empty()
            && id.len() <= 63
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_id {
            return Err(NodeError::InvalidArgument(
                "a proxy id is 1-63 characters of a-z, 0-9, '.' and '-'".into(),
            ));
        }
        if !endpoint.starts_with("https://") || endpoint.len() > 2048 {
            return Err(NodeError::InvalidArgument(
                "a proxy endpoint is an https:// URL".into(),
            ));
        }
        if tls_root.len() > 64 * 1024
            || !tls_root
                .windows(27)
                .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(NodeError::InvalidArgument(
                "the proxy's TLS root must be a PEM certificate (at most 64 KiB)".into(),
            ));
        }
        if tls_name.is_empty() || tls_name.len() > 253 {
            return Err(NodeError::InvalidArgument("a TLS name is required".into()));
        }
        let p = crate::store::ProxyRecord {
            id: id.to_owned(),
            endpoint: endpoint.to_owned(),
            tls_root: tls_root.to_vec(),
            tls_name: tls_name.to_owned(),
            added_at: now(),
        };
        let mut ev = event("add-proxy", "admin");
        ev.detail = format!("proxy {id} at {endpoint}");
        self.store.add_proxy(&p, ev).await?;
        Ok(p)
    }

    /// Rotation jobs, oldest first (only pending ones if `pending_only`).
    pub async fn rotations(&self, pending_only: bool) -> NodeResult<Vec<RotationRecord>> {
        Ok(self.store.rotations(pending_only).await?)
    }

    /// The update secret of a pending rotation, opened from its seal (for the
    /// token computation of the revocation flow).
    pub fn update_secret(&self, job: &RotationRecord) -> NodeResult<mabe_abe::UpdateSecret> {
        let sealed = job.update_secret_sealed.as_deref().ok_or_else(|| {
            NodeError::Conflict(format!(
                "rotation {} is done: its update secret was erased",
                job.id
            ))
        })?;
        let bytes = self.kek.open(
            &update_ad(self.id.as_str(), &job.attribute, job.from_version),
            sealed,
        )?;
        let us = mabe_abe::UpdateSecret::from_bytes(&bytes)?;
        if us.attribute().to_string() != job.attribute
            || us.from_version().get() != job.from_version
        {
            return Err(NodeError::Store(StoreError::Corrupt(format!(
                "sealed update secret of rotation {} is for another attribute",
                job.id
            ))));
        }
        Ok(us)
    }

    /// Finish a rotation: every stored row was updated, so erase its update secret.
    pub async fn finish_rotation(&self, id: i64) -> NodeResult<RotationRecord> {
        let mut ev = event("rotation-done", "admin");
        ev.detail = format!("rotation {id}: update secret erased");
        Ok(self.store.finish_rotation(id, now(), ev).await?)
    }

    // -------------------------------------------------------------- requests

    /// Check freshness, enrollment, signature and nonce of a signed request,
    /// in that order (the nonce is spent only by a correctly signed request).
    /// Every refusal is audited.
    async fn authenticate(&self, req: Signed<'_>) -> NodeResult<PersonRecord> {
        let Signed {
            what,
            authority,
            gid,
            nonce,
            timestamp,
            signature,
            message,
        } = req;
        let claimed = gid_of(gid)?;
        let refuse = |reason: String| async move {
            let mut ev = event("refusal", &claimed.to_string());
            ev.subject = Some(claimed.to_string());
            ev.detail = format!("{what}: {reason}");
            // The refusal stands even if auditing it fails; the audit error is logged.
            if let Err(e) = self.store.append_audit(ev).await {
                tracing::error!(error = %e, "could not audit a refusal");
            }
            NodeError::Unauthenticated(reason)
        };
        if authority != self.id.as_str() {
            // The caller chose this string (up to the message limit): echo
            // only as much of it as an authority id can be.
            return Err(refuse(format!(
                "request is addressed to authority {:?}, this is {}",
                audit::clip(authority, MAX_ECHOED_ID_BYTES),
                self.id
            ))
            .await);
        }
        let t = now();
        if timestamp.abs_diff(t) > self.config.max_clock_skew_secs.unsigned_abs() {
            return Err(refuse(format!(
                "timestamp {timestamp} is more than {} s from the authority's clock ({t})",
                self.config.max_clock_skew_secs
            ))
            .await);
        }
        if !(16..=64).contains(&nonce.len()) {
            return Err(NodeError::InvalidArgument(
                "a nonce is 16 to 64 bytes".into(),
            ));
        }
        let Some(person) = self.store.person(claimed.as_bytes()).await? else {
            return Err(refuse("GID is not enrolled at this authority".into()).await);
        };
        let key = VerifyingKey::from_bytes(&person.request_key)
            .map_err(|_| NodeError::Store(StoreError::Corrupt("request key".into())))?;
        let sig_ok = Signature::from_slice(signature)
            .map(|s| key.verify_strict(message, &s).is_ok())
            .unwrap_or(false);
        if !sig_ok {
            return Err(
                refuse("signature does not verify with the enrolled request key".into()).await,
            );
        }
        let fresh = self
            .store
            .use_nonce(
                claimed.as_bytes(),
                nonce,
                t,
                t - 2 * self.config.max_clock_skew_secs,
            )
            .await?;
        if !fresh {
            return Err(refuse("nonce was already used (replay)".into()).await);
        }
        Ok(person)
    }

    /// Emergency access (DESIGN §4): a person enrolled with the emergency
    /// role gets this authority's emergency attribute at once, as a grant
    /// that expires after [`NodeConfig::break_glass_secs`], and its key. The
    /// reason is audited as a `break-glass` entry. A still valid emergency
    /// grant is reused (and the use audited again); an expired one is first
    /// revoked by a rotation, so the new key is of a fresh version.
    pub async fn break_glass(&self, req: &SignedBreakGlass) -> NodeResult<Vec<IssuedKey>> {
        if req.reason.trim().is_empty() || req.reason.len() > MAX_REASON_LEN {
            return Err(NodeError::InvalidArgument(format!(
                "a reason is required (at most {MAX_REASON_LEN} bytes)"
            )));
        }
        let msg = mabe_proto::signing::break_glass_message(
            &req.authority,
            &req.gid,
            &req.reason,
            &req.nonce,
            req.timestamp,
        );
        let person = self
            .authenticate(Signed {
                what: "break-glass",
                authority: &req.authority,
                gid: &req.gid,
                nonce: &req.nonce,
                timestamp: req.timestamp,
                signature: &req.signature,
                message: &msg,
            })
            .await?;
        let gid = Gid::from_bytes(person.gid);
        let role = &self.config.emergency_role;
        if !person.roles.split(',').any(|r| r.trim() == role.as_str()) {
            let mut ev = event("refusal", &gid.to_string());
            ev.subject = Some(gid.to_string());
            ev.detail = format!(
                "break-glass: not enrolled as {role}; reason given: {}",
                req.reason
            );
            self.store.append_audit(ev).await?;
            return Err(NodeError::PermissionDenied(format!(
                "break-glass needs the {role} role at {}; this GID was not enrolled with it",
                self.id
            )));
        }
        let attr = self.attribute(&self.config.emergency_attribute)?;
        let name = attr.to_string();
        let t = now();
        let existing = self
            .store
            .grants_for(&person.gid)
            .await?
            .into_iter()
            .find(|g| g.attribute == name);
        if existing
            .as_ref()
            .is_some_and(|g| g.expires_at.is_some_and(|e| e <= t))
        {
            // The last emergency grant expired but was not rotated yet.
            self.rotate_expired().await?;
        }
        let mut ev = event("break-glass", &gid.to_string());
        ev.subject = Some(gid.to_string());
        ev.attribute = Some(name.clone());
        match existing.filter(|g| g.expires_at.is_none_or(|e| e > t)) {
            Some(g) => {
                ev.detail = format!(
                    "reason: {}; existing grant {}",
                    req.reason,
                    g.expires_at
                        .map_or("without expiry".to_owned(), |e| format!("until {e}"))
                );
                self.store.append_audit(ev).await?;
            }
            None => {
                let expires = t.saturating_add(self.config.break_glass_secs);
                ev.detail = format!("reason: {}; grant expires at {expires}", req.reason);
                let g = GrantRecord {
                    gid: person.gid,
                    attribute: name.clone(),
                    granted_by: "break-glass".into(),
                    granted_at: t,
                    expires_at: Some(expires),
                };
                self.store.grant(&g, ev).await?;
            }
        }
        self.issue(&person, std::slice::from_ref(&name), "break-glass")
            .await
    }

    /// A person asks for an attribute with a reason; an admin decides.
    pub async fn request_attribute(
        &self,
        req: &SignedAttributeRequest,
    ) -> NodeResult<RequestRecord> {
        if req.reason.trim().is_empty() || req.reason.len() > MAX_REASON_LEN {
            return Err(NodeError::InvalidArgument(format!(
                "a reason is required (at most {MAX_REASON_LEN} bytes)"
            )));
        }
        let msg = mabe_proto::signing::attribute_request_message(
            &req.authority,
            &req.gid,
            &req.attribute,
            &req.reason,
            &req.nonce,
            req.timestamp,
        );
        let person = self
            .authenticate(Signed {
                what: "attribute request",
                authority: &req.authority,
                gid: &req.gid,
                nonce: &req.nonce,
                timestamp: req.timestamp,
                signature: &req.signature,
                message: &msg,
            })
            .await?;
        let attr = self.attribute(&req.attribute)?.to_string();
        self.current(&attr).await?;
        let gid = Gid::from_bytes(person.gid);
        let mut ev = event("request", &gid.to_string());
        ev.subject = Some(gid.to_string());
        ev.attribute = Some(attr.clone());
        ev.detail = format!("reason: {}", req.reason);
        Ok(self
            .store
            .create_request(&person.gid, &attr, &req.reason, now(), ev)
            .await?)
    }

    /// Requests, optionally only those in one state.
    pub async fn requests(&self, state: Option<RequestState>) -> NodeResult<Vec<RequestRecord>> {
        Ok(self.store.requests(state).await?)
    }

    /// One page of [`Node::requests`], by id: from the start (empty
    /// `token`) or from a previous page's `next` token.
    pub async fn requests_page(
        &self,
        state: Option<RequestState>,
        token: &str,
        size: u32,
    ) -> NodeResult<Page<RequestRecord>> {
        // Token: "r1." ‖ id of the last item.
        let after = match token {
            "" => 0,
            t => t
                .strip_prefix("r1.")
                .and_then(|id| id.parse::<i64>().ok())
                .ok_or_else(bad_token)?,
        };
        let (size, limit) = page_limit(size);
        let filter = RequestFilter {
            state,
            attribute: None,
        };
        let items = self.store.requests_page(&filter, after, limit).await?;
        Ok(paged(items, size, |r| format!("r1.{}", r.id)))
    }

    /// Approve or deny a pending request (approval creates the grant).
    /// `nonce` (the authenticated call's nonce, if the caller did not spend
    /// it yet) is spent in the decision's own transaction.
    pub async fn decide(
        &self,
        id: i64,
        approve: bool,
        note: &str,
        by: &str,
        nonce: Option<NonceUse>,
    ) -> NodeResult<RequestRecord> {
        if note.len() > MAX_REASON_LEN {
            return Err(NodeError::InvalidArgument("note too long".into()));
        }
        let mut ev = event(if approve { "approve" } else { "deny" }, by);
        ev.detail = format!("request {id}: {note}");
        let rec = self
            .store
            .decide_request(id, approve, by, note, now(), ev, nonce)
            .await?;
        Ok(rec)
    }

    // ------------------------------------------------------------ key issue

    /// Issue keys for the attributes granted to the requester (all of them,
    /// or the ones asked for), at their current versions.
    pub async fn fetch_keys(&self, req: &KeyFetch) -> NodeResult<Vec<IssuedKey>> {
        let msg = mabe_proto::signing::key_request_message(
            &req.authority,
            &req.gid,
            &req.attributes,
            &req.nonce,
            req.timestamp,
        );
        let person = self
            .authenticate(Signed {
                what: "key fetch",
                authority: &req.authority,
                gid: &req.gid,
                nonce: &req.nonce,
                timestamp: req.timestamp,
                signature: &req.signature,
                message: &msg,
            })
            .await?;
        self.issue(&person, &req.attributes, "key fetch").await
    }

    /// Issue keys to an enrolled person without a signed request: offline
    /// issuance by the administrator (`mabe-authority issue --out`), e.g. by a
    /// patient's personal authority for a family member. Audited as `issue`.
    pub async fn issue_offline(&self, gid: &[u8]) -> NodeResult<Vec<IssuedKey>> {
        let gid = gid_of(gid)?;
        let person = self
            .store
            .person(gid.as_bytes())
            .await?
            .ok_or_else(|| NodeError::NotFound(format!("GID {gid} is not enrolled")))?;
        self.issue(&person, &[], "offline issuance").await
    }

    async fn issue(
        &self,
        person: &PersonRecord,
        attributes: &[String],
        how: &str,
    ) -> NodeResult<Vec<IssuedKey>> {
        let gid = Gid::from_bytes(person.gid);
        let t = now();
        let grants: Vec<GrantRecord> = self
            .store
            .grants_for(&person.gid)
            .await?
            .into_iter()
            .filter(|g| g.expires_at.is_none_or(|e| e > t))
            .collect();
        let wanted: Vec<&GrantRecord> = if attributes.is_empty() {
            grants.iter().collect()
        } else {
            let mut out = Vec::new();
            for a in attributes {
                let canonical = self.attribute(a)?.to_string();
                match grants.iter().find(|g| g.attribute == canonical) {
                    Some(g) => out.push(g),
                    None => {
                        let mut ev = event("refusal", &gid.to_string());
                        ev.subject = Some(gid.to_string());
                        ev.attribute = Some(canonical.clone());
                        ev.detail = "key fetch: attribute not granted (or grant expired)".into();
                        self.store.append_audit(ev).await?;
                        return Err(NodeError::PermissionDenied(format!(
                            "{canonical} is not granted to this GID"
                        )));
                    }
                }
            }
            out
        };
        let hashed = HashedGid::new(gid)?;
        // While a rotation of an attribute is still being applied at the
        // proxies, stored rows are at its old version until their tokens
        // arrive: a holder of an active grant gets the old version's key
        // too, so no record becomes unreadable to them mid-rollout. (The
        // revoked person has no active grant and gets neither.)
        let rolling: Vec<RotationRecord> = if wanted.is_empty() {
            Vec::new()
        } else {
            self.store.rotations(true).await?
        };
        let mut issued = Vec::with_capacity(wanted.len());
        for g in wanted {
            let versions = self.store.attribute_versions(&g.attribute).await?;
            let rec = versions
                .iter()
                .find(|r| r.state == VersionState::Current)
                .ok_or_else(|| NodeError::NotFound(format!("attribute {}", g.attribute)))?;
            // Oldest first, current last: a consumer that keeps one key per
            // attribute ends up with the current one.
            let mut recs: Vec<&AttributeRecord> = versions
                .iter()
                .filter(|r| {
                    r.version != rec.version
                        && rolling
                            .iter()
                            .any(|j| j.attribute == g.attribute && j.from_version == r.version)
                })
                .collect();
            recs.sort_by_key(|r| r.version);
            recs.push(rec);
            for rec in recs {
                let sk = self.secret(rec)?;
                let key = sk.keygen(&hashed, &mut OsRng);
                issued.push(IssuedKey {
                    attribute: rec.attribute.clone(),
                    version: rec.version,
                    key: key.to_bytes(),
                    expires_at: g.expires_at,
                });
            }
        }
        let mut ev = event("issue", &gid.to_string());
        ev.subject = Some(gid.to_string());
        ev.detail = format!("{how}: ")
            + &issued
                .iter()
                .map(|k| format!("{}#{}", k.attribute, k.version))
                .collect::<Vec<_>>()
                .join(", ");
        self.store.append_audit(ev).await?;
        Ok(issued)
    }

    // ----------------------------------------------------------------- audit

    /// Read the whole audit log in seq order, one page at a time. The next
    /// page starts after the last entry seen, with checked arithmetic: an
    /// entry at `i64::MAX` (only a tampered row can hold it) ends the scan
    /// instead of overflowing, and so does a page that would not move the
    /// scan forward.
    async fn scan_audit(&self, mut each_page: impl FnMut(&[AuditEntry])) -> NodeResult<()> {
        let mut from = 1i64;
        loop {
            let page = self.store.audit_entries(from, AUDIT_PAGE).await?;
            let Some(tail) = page.last().map(|e| e.seq) else {
                return Ok(());
            };
            each_page(&page);
            match tail.checked_add(1) {
                Some(next) if next > from => from = next,
                _ => return Ok(()),
            }
        }
    }

    /// Sign a checkpoint of the audit chain at its current head.
    pub async fn checkpoint(&self) -> NodeResult<Option<Checkpoint>> {
        let mut last = None;
        self.scan_audit(|page| {
            if let Some(tail) = page.last() {
                last = Some((tail.seq, tail.hash));
            }
        })
        .await?;
        let Some((seq, hash)) = last else {
            return Ok(None);
        };
        let ts = now();
        let msg = audit::checkpoint_message(self.id.as_str(), seq, &hash, ts);
        let cp = Checkpoint {
            seq,
            hash,
            ts,
            signature: self.identity.sign(&msg).to_bytes().to_vec(),
        };
        match self.store.add_checkpoint(&cp).await {
            Ok(()) => Ok(Some(cp)),
            // The head is already covered (an idle node, or another replica
            // was first): keep the existing checkpoint if it signs this head.
            Err(StoreError::AlreadyExists(m)) => {
                let existing = self
                    .store
                    .checkpoints()
                    .await?
                    .into_iter()
                    .find(|c| c.seq == seq);
                match existing {
                    Some(c) if c.hash == hash => Ok(Some(c)),
                    _ => Err(NodeError::Conflict(format!(
                        "{m}, for another hash of that entry: run `audit verify`"
                    ))),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Verify the whole audit log and every checkpoint.
    pub async fn verify_audit(&self) -> NodeResult<AuditReport> {
        let mut v = Verifier::default();
        self.scan_audit(|page| {
            for e in page {
                v.entry(e);
            }
        })
        .await?;
        let key = self.identity.verifying_key();
        for cp in self.store.checkpoints().await? {
            v.checkpoint(self.id.as_str(), &key, &cp);
        }
        Ok(v.finish())
    }

    /// Decode a stored public key (for tests and the CLI).
    pub fn public_key_of(rec: &AttributeRecord) -> NodeResult<AttributePublicKey> {
        Ok(AttributePublicKey::from_bytes(&rec.public_key)?)
    }
}
