//! Shared scaffolding of the authority's integration tests: a node served
//! over real gRPC with TLS on loopback, people, signed requests, and a fresh
//! PostgreSQL database per test.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signer, SigningKey};
use mabe_abe::Gid;
use mabe_authority::{
    node::{Node, NodeConfig},
    seal::Kek,
    server::{Listeners, ServeOptions, TlsPem, serve},
    store::{Store, postgres::PgStore},
};
use mabe_proto::{
    signing::key_request_message,
    v1::{
        KeyRequest, authority_admin_client::AuthorityAdminClient, authority_client::AuthorityClient,
    },
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

pub const ADMIN: &str = "/mabe.v1.AuthorityAdmin/";

pub struct Running {
    pub node: Arc<Node>,
    pub admin_key: SigningKey,
    pub public: AuthorityClient<Channel>,
    /// The public listener's channel (for other services on it, e.g. health).
    pub public_channel: Channel,
    pub admin: AuthorityAdminClient<Channel>,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

pub async fn channel(port: u16, cert: &[u8]) -> Channel {
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(cert))
                .domain_name("localhost"),
        )
        .unwrap()
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("TLS connection to the authority")
}

pub async fn start(store: Arc<dyn Store>) -> Running {
    start_with(store, NodeConfig::default()).await
}

/// A node `hospital-a` with `config`, served on loopback ports.
pub async fn start_with(store: Arc<dyn Store>, config: NodeConfig) -> Running {
    let kek = Kek::generate(&mut OsRng);
    let (node, admin_key) = Node::init(store, "hospital-a", kek, config).await.unwrap();
    let node = Arc::new(node);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let tls = TlsPem {
        cert: ck.cert.pem().into_bytes(),
        key: ck.signing_key.serialize_pem().into_bytes(),
    };
    let listeners = Listeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let (p, a) = listeners.addrs().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let n2 = Arc::clone(&node);
    let task = tokio::spawn(async move {
        serve(
            n2,
            listeners,
            ServeOptions {
                tls: Some(tls),
                request_timeout: Duration::from_secs(20),
            },
            async {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
    });
    let cert = ck.cert.pem().into_bytes();
    let public_channel = channel(p.port(), &cert).await;
    Running {
        public: AuthorityClient::new(public_channel.clone()),
        public_channel,
        admin: AuthorityAdminClient::new(channel(a.port(), &cert).await),
        node,
        admin_key,
        stop: Some(tx),
        task,
    }
}

pub struct Person {
    pub gid: Gid,
    pub key: SigningKey,
}

pub fn person(subject: &str) -> Person {
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    Person {
        gid: Gid::derive("big-register", subject).unwrap(),
        key: SigningKey::from_bytes(&seed),
    }
}

pub fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; 16];
    OsRng.fill_bytes(&mut n);
    n
}

pub fn key_request(p: &Person, attrs: &[&str], ts: i64, signer: &SigningKey) -> KeyRequest {
    let attributes: Vec<String> = attrs.iter().map(|s| s.to_string()).collect();
    let n = nonce();
    let msg = key_request_message("hospital-a", p.gid.as_bytes(), &attributes, &n, ts);
    KeyRequest {
        authority_id: "hospital-a".into(),
        gid: p.gid.as_bytes().to_vec(),
        attributes,
        nonce: n,
        timestamp: ts,
        signature: signer.sign(&msg).to_bytes().to_vec(),
    }
}

pub async fn refusals(node: &Node) -> usize {
    node.store()
        .audit_entries(1, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.event.kind == "refusal")
        .count()
}

impl Running {
    /// Stop serving and wait for the server task.
    pub async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(20), &mut self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A fresh, empty database on the test server (`MABE_TEST_DATABASE_URL`,
/// which `scripts/with-postgres` exports), as a connected store.
pub async fn fresh_pg(prefix: &str) -> PgStore {
    PgStore::connect(&fresh_pg_url(prefix).await).await.unwrap()
}

/// Like [`fresh_pg`], but the URL of the new database (for raw access too).
pub async fn fresh_pg_url(prefix: &str) -> String {
    let url = std::env::var("MABE_TEST_DATABASE_URL")
        .expect("set MABE_TEST_DATABASE_URL, or run through scripts/with-postgres");
    let db = format!("{prefix}_{}", OsRng.next_u64());
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("database URL without a database name"),
    }
}
