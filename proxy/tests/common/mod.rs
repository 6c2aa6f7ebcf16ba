//! Shared fixtures: real records encrypted with `mabe_abe`, real rotations
//! and tokens, and a proxy served over TLS on loopback.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use ark_std::rand::{SeedableRng, rngs::StdRng};
use ed25519_dalek::SigningKey;
use mabe_abe::{
    AbeError, Attribute, AttributeSecretKey, EncryptOptions, Gid, Header, PublicKeyRing, Snapshot,
    SnapshotRow, TokenGenerator, UpdateSecret, UpdateToken, UserKey, UserKeyRing, Version, decrypt,
    encrypt,
};
use mabe_proto::signing::{self, METHOD_APPLY_TOKENS, METHOD_FREEZE, METHOD_FREEZE_STATUS};
use mabe_proto::v1::{
    ApplyTokensRequest, ApplyTokensResponse, FreezeRequest, FreezeStatusRequest,
    FreezeStatusResponse, FreezeSummary, freeze_response,
    proxy_authority_client::ProxyAuthorityClient,
};
use mabe_proxy::client::RecordClient;
use mabe_proxy::datadir::DataDir;
use mabe_proxy::node::{Node, NodeConfig};
use mabe_proxy::server::{Listeners, ServeOptions, serve};
use mabe_proxy::store::Store;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub const PROXY_ID: &str = "cloud-test";

pub fn attr(s: &str) -> Attribute {
    s.parse().unwrap()
}

/// Authorities' attribute secrets, the public directory, and a seeded RNG.
pub struct World {
    pub secrets: BTreeMap<Attribute, AttributeSecretKey>,
    pub directory: PublicKeyRing,
    pub rng: StdRng,
}

impl World {
    pub fn new(attrs: &[&str], seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut secrets = BTreeMap::new();
        let mut directory = PublicKeyRing::new();
        for a in attrs {
            let sk = AttributeSecretKey::generate(attr(a), Version::FIRST, &mut rng);
            directory.insert(sk.public_key(&mut rng)).unwrap();
            secrets.insert(attr(a), sk);
        }
        World {
            secrets,
            directory,
            rng,
        }
    }

    /// A person holding verified keys for `attrs` at their current versions.
    pub fn person(&mut self, subject: &str, attrs: &[&str]) -> UserKeyRing {
        let mut ring = UserKeyRing::new(Gid::derive("test-register", subject).unwrap()).unwrap();
        for a in attrs {
            let sk = &self.secrets[&attr(a)];
            let key = sk.keygen(ring.hashed_gid(), &mut self.rng);
            let pk = self
                .directory
                .get(sk.attribute(), sk.version())
                .unwrap()
                .clone();
            ring.insert(key, &pk).unwrap();
        }
        ring
    }

    /// Encrypt `payload` under `policy`: (header, encrypted payload).
    pub fn encrypt(&mut self, policy: &str, payload: &[u8]) -> (Header, Vec<u8>) {
        let policy = mabe_policy::parse(policy).unwrap();
        let mut ct = Vec::new();
        let header = encrypt(
            &policy,
            &self.directory,
            &EncryptOptions::default(),
            &mut self.rng,
            payload,
            &mut ct,
        )
        .unwrap();
        (header, ct)
    }

    pub fn decrypt(
        &self,
        header: &Header,
        ring: &UserKeyRing,
        ct: &[u8],
    ) -> Result<Vec<u8>, AbeError> {
        let mut out = Vec::new();
        decrypt(header, ring, &self.directory, ct, &mut out)?;
        Ok(out)
    }

    /// Rotate `a` to its next version; the new public key joins the directory.
    pub fn rotate(&mut self, a: &str) -> UpdateSecret {
        let old = self.secrets.remove(&attr(a)).unwrap();
        let (new, us) = old.rotate(&mut self.rng).unwrap();
        self.directory
            .insert(new.public_key(&mut self.rng))
            .unwrap();
        self.secrets.insert(attr(a), new);
        us
    }

    /// Tokens for every row of `rows` (a snapshot as the proxy returned it).
    pub fn tokens(
        &mut self,
        us: &UpdateSecret,
        rows: &[SnapshotRow],
    ) -> (TokenGenerator, Vec<UpdateToken>) {
        let mut s = Snapshot::new(us.attribute().clone(), us.from_version());
        for r in rows {
            s.insert(*r).unwrap();
        }
        let tg = us.token_generator(s, &mut self.rng).unwrap();
        let tokens = rows
            .iter()
            .map(|r| tg.compute(r, &mut self.rng).unwrap())
            .collect();
        (tg, tokens)
    }
}

/// What a revoked user would try: the old key relabelled as the new version
/// (same key material), inserted without verification.
pub fn relabelled(ring: &UserKeyRing, gid: Gid, a: &str, v: Version) -> UserKeyRing {
    let key = ring.get(&attr(a)).unwrap();
    let mut b = key.to_bytes().to_vec();
    let at = b.len() - 96 - 4;
    b[at..at + 4].copy_from_slice(&v.get().to_be_bytes());
    let mut forged = UserKeyRing::new(gid).unwrap();
    for other in ring.attributes() {
        if other != attr(a) {
            forged.insert_unverified(
                UserKey::from_bytes(&ring.get(&other).unwrap().to_bytes()).unwrap(),
            );
        }
    }
    forged.insert_unverified(UserKey::from_bytes(&b).unwrap());
    forged
}

/// A proxy served in this process over TLS on loopback.
pub struct Served {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub ca: Vec<u8>,
    pub node: Arc<Node>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    pub async fn start(store: Arc<dyn Store>) -> Served {
        Self::start_with(store, NodeConfig::new(PROXY_ID)).await
    }

    pub async fn start_with(store: Arc<dyn Store>, config: NodeConfig) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let dd = DataDir::new(dir.path().join("proxy"));
        dd.create().unwrap();
        dd.write_dev_tls().unwrap();
        let tls = dd.tls(None, None).unwrap();
        let ca = tls.cert.clone();
        let node = Arc::new(Node::new(store, config).unwrap());
        let listeners = Listeners::bind(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .await
        .unwrap();
        let (addr, admin) = listeners.addrs().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let n = Arc::clone(&node);
        let task = tokio::spawn(async move {
            serve(n, listeners, ServeOptions::new(Some(tls)), async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Served {
            dir,
            addr,
            admin,
            ca,
            node,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        channel(&self.url(), &self.ca).await
    }

    pub async fn records(&self) -> RecordClient {
        RecordClient::connect(&self.url(), &self.ca, "localhost")
            .await
            .unwrap()
    }

    pub async fn authority(&self, id: &str, key: SigningKey) -> AuthorityCaller {
        AuthorityCaller {
            client: ProxyAuthorityClient::new(self.channel().await)
                .max_decoding_message_size(mabe_proxy::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(mabe_proxy::MAX_MESSAGE_BYTES),
            id: id.to_owned(),
            key,
            proxy: PROXY_ID.to_owned(),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

pub async fn channel(url: &str, ca: &[u8]) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    Endpoint::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// A fixed identity key per authority name.
pub fn identity(name: &str) -> SigningKey {
    let mut seed = [0u8; 32];
    for (i, b) in name.bytes().enumerate() {
        seed[i % 32] ^= b;
    }
    seed[31] ^= 0x5a;
    SigningKey::from_bytes(&seed)
}

/// An authority calling the proxy the way the authority's driver does:
/// the generated client and `mabe_proto::signing::sign_proxy_request`.
pub struct AuthorityCaller {
    pub client: ProxyAuthorityClient<Channel>,
    pub id: String,
    pub key: SigningKey,
    pub proxy: String,
}

/// A snapshot as received: summary and rows (decoded to `SnapshotRow`s).
pub struct Frozen {
    pub summary: FreezeSummary,
    pub rows: Vec<SnapshotRow>,
}

impl AuthorityCaller {
    pub async fn freeze(&mut self, attribute: &str, version: u32) -> Result<Frozen, tonic::Status> {
        let req = signing::sign_proxy_request(
            FreezeRequest {
                attribute: attribute.into(),
                version,
            },
            &self.proxy,
            &self.id,
            METHOD_FREEZE,
            &self.key,
        )
        .unwrap();
        let mut stream = self.client.freeze(req).await?.into_inner();
        let summary = match stream.message().await?.and_then(|m| m.part) {
            Some(freeze_response::Part::Summary(s)) => s,
            other => panic!("first message is not the summary: {other:?}"),
        };
        let mut rows = Vec::new();
        while let Some(m) = stream.message().await? {
            match m.part {
                Some(freeze_response::Part::Rows(r)) => {
                    for row in r.rows {
                        rows.push(SnapshotRow {
                            record: mabe_abe::RecordId::from_bytes(
                                row.record_id.try_into().unwrap(),
                            ),
                            row: row.row,
                            c2: mabe_abe::wire::decode_g1(&row.c2, "C2").unwrap(),
                        });
                    }
                }
                other => panic!("unexpected message: {other:?}"),
            }
        }
        Ok(Frozen { summary, rows })
    }

    pub async fn apply(
        &mut self,
        tokens: &[UpdateToken],
    ) -> Result<ApplyTokensResponse, tonic::Status> {
        let req = signing::sign_proxy_request(
            ApplyTokensRequest {
                tokens: tokens.iter().map(UpdateToken::to_bytes).collect(),
            },
            &self.proxy,
            &self.id,
            METHOD_APPLY_TOKENS,
            &self.key,
        )
        .unwrap();
        Ok(self.client.apply_tokens(req).await?.into_inner())
    }

    pub async fn status(
        &mut self,
        attribute: &str,
        version: u32,
        page: &[u8],
        size: u32,
    ) -> Result<FreezeStatusResponse, tonic::Status> {
        let req = signing::sign_proxy_request(
            FreezeStatusRequest {
                attribute: attribute.into(),
                version,
                page_token: page.to_vec(),
                page_size: size,
            },
            &self.proxy,
            &self.id,
            METHOD_FREEZE_STATUS,
            &self.key,
        )
        .unwrap();
        Ok(self.client.freeze_status(req).await?.into_inner())
    }
}

/// The PostgreSQL server for the PostgreSQL-backed tests: the one named by
/// `MABE_TEST_DATABASE_URL` (as `scripts/with-postgres` exports it), else a
/// throwaway server this test process starts once through
/// `scripts/with-postgres` and that stops when the process exits (its
/// stdin closes). Never skipped: if no server can be started, the tests fail.
pub fn test_database_url() -> String {
    use std::io::BufRead;
    use std::sync::Mutex;
    if let Ok(url) = std::env::var("MABE_TEST_DATABASE_URL") {
        return url;
    }
    static SERVER: Mutex<Option<(std::process::Child, String)>> = Mutex::new(None);
    let mut guard = SERVER.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, url)) = guard.as_ref() {
        return url.clone();
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/with-postgres");
    let mut child = std::process::Command::new(script)
        .args([
            "sh",
            "-c",
            "echo \"$MABE_TEST_DATABASE_URL\"; exec cat >/dev/null",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("MABE_TEST_DATABASE_URL is not set and {script} cannot start: {e}")
        });
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line.trim().to_owned();
    assert!(
        url.starts_with("postgres://"),
        "MABE_TEST_DATABASE_URL is not set and {script} did not start a server: set it, or run through scripts/with-postgres"
    );
    *guard = Some((child, url.clone()));
    url
}
