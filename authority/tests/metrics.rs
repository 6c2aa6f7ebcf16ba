//! `GET /metrics` on the admin listener, over real TLS on loopback (SQLite):
//! public calls (an answered GetInfo, a refused FetchKeys, a key issued) show
//! up as Prometheus counters; the scrape works over HTTP/1.1 (ALPN
//! `http/1.1`, as a Prometheus server with HTTP/2 disabled sends, or no
//! ALPN at all) and over HTTP/2 (ALPN `h2`, as curl negotiates); the
//! AuthorityAdmin gRPC service still answers on the same port; the public
//! listener does not serve metrics.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{sync::Arc, time::Duration};

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signer, SigningKey};
use mabe_abe::Gid;
use mabe_authority::{
    admin_client::signed,
    node::{Node, NodeConfig, now},
    seal::Kek,
    server::{Listeners, ServeOptions, TlsPem, serve},
    store::sqlite::SqliteStore,
};
use mabe_proto::{
    signing::key_request_message,
    v1::{
        CreateAttributeRequest, EnrollRequest, GetInfoRequest, GrantRequest, KeyRequest,
        ListAttributesRequest, authority_admin_client::AuthorityAdminClient,
        authority_client::AuthorityClient,
    },
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject},
    },
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

const ADMIN: &str = "/mabe.v1.AuthorityAdmin/";

async fn channel(port: u16, cert: &[u8]) -> Channel {
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

/// A TLS client trusting only `cert`, offering `alpn`.
fn tls_client(cert: &[u8], alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A raw `GET path` over HTTP/1.1 and TLS (ALPN `http/1.1` only); returns
/// the status line, the headers and the body.
async fn http1_get(
    port: u16,
    cert: &[u8],
    path: &str,
) -> std::io::Result<(String, String, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = tls_client(cert, &[b"http/1.1"])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    match tls.read_to_end(&mut raw).await {
        Ok(_) => {}
        // A peer that closes without close_notify; the response is complete
        // if it was delimited (checked below through Content-Length).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let headers = headers.to_ascii_lowercase();
    if let Some(len) = headers
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
    {
        assert_eq!(len.trim().parse::<usize>().unwrap(), body.len());
    }
    Ok((status.to_string(), headers, body.to_string()))
}

/// The value of the sample line `series` (exact name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_the_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("a.db")).unwrap());
    let (node, admin_key) = Node::init(
        store,
        "hospital-a",
        Kek::generate(&mut OsRng),
        NodeConfig::default(),
    )
    .await
    .unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ck.cert.pem().into_bytes();
    let tls = TlsPem {
        cert: cert.clone(),
        key: ck.signing_key.serialize_pem().into_bytes(),
    };
    let listeners = Listeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let (p, a) = listeners.addrs().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(serve(
        Arc::new(node),
        listeners,
        ServeOptions {
            tls: Some(tls),
            request_timeout: Duration::from_secs(20),
        },
        async {
            let _ = rx.await;
        },
    ));
    let mut public = AuthorityClient::new(channel(p.port(), &cert).await);
    let mut admin = AuthorityAdminClient::new(channel(a.port(), &cert).await);

    // Before any call: the node is up and every counter is zero.
    let (status, headers, body) = http1_get(a.port(), &cert, "/metrics").await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    assert!(body.contains("\nmabe_authority_up 1\n"), "{body}");
    assert_eq!(sample(&body, "mabe_authority_keys_issued_total"), Some(0.0));

    // Two answered GetInfo calls and a FetchKeys refused for its garbage
    // signature, from an unenrolled GID.
    for _ in 0..2 {
        public.get_info(GetInfoRequest {}).await.unwrap();
    }
    let gid = Gid::derive("big-register", "19012345601").unwrap();
    let err = public
        .fetch_keys(KeyRequest {
            authority_id: "hospital-a".into(),
            gid: gid.as_bytes().to_vec(),
            attributes: vec![],
            nonce: vec![7; 16],
            timestamp: now(),
            signature: vec![0xff; 64],
        })
        .await
        .expect_err("garbage signature");
    assert_eq!(err.code(), Code::Unauthenticated);

    // The admin gRPC service still works on the metrics port: an unsigned
    // call is refused, a signed one answered.
    let err = admin
        .list_attributes(ListAttributesRequest::default())
        .await
        .expect_err("unsigned admin call");
    assert_eq!(err.code(), Code::Unauthenticated);

    // Issue one key: create an attribute, enroll a person, grant, fetch.
    let method = |m: &str| format!("{ADMIN}{m}");
    admin
        .create_attribute(signed(
            CreateAttributeRequest {
                name: "cardiology".into(),
            },
            "hospital-a",
            &method("CreateAttribute"),
            &admin_key,
        ))
        .await
        .unwrap();
    let mut seed = [0u8; 32];
    OsRng.fill_bytes(&mut seed);
    let person = SigningKey::from_bytes(&seed);
    admin
        .enroll(signed(
            EnrollRequest {
                registry: "big-register".into(),
                subject: "19012345601".into(),
                request_key: person.verifying_key().to_bytes().to_vec(),
                roles: vec![],
            },
            "hospital-a",
            &method("Enroll"),
            &admin_key,
        ))
        .await
        .unwrap();
    admin
        .grant(signed(
            GrantRequest {
                gid: gid.as_bytes().to_vec(),
                attribute: "cardiology".into(),
                expires_at: 0,
            },
            "hospital-a",
            &method("Grant"),
            &admin_key,
        ))
        .await
        .unwrap();
    let mut nonce = vec![0u8; 16];
    OsRng.fill_bytes(&mut nonce);
    let ts = now();
    let msg = key_request_message("hospital-a", gid.as_bytes(), &[], &nonce, ts);
    let keys = public
        .fetch_keys(KeyRequest {
            authority_id: "hospital-a".into(),
            gid: gid.as_bytes().to_vec(),
            attributes: vec![],
            nonce,
            timestamp: ts,
            signature: person.sign(&msg).to_bytes().to_vec(),
        })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);

    let (status, _, body) = http1_get(a.port(), &cert, "/metrics").await.unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    let count = |service: &str, method: &str, code: &str| {
        sample(
            &body,
            &format!(
                "mabe_authority_requests_total{{service=\"{service}\",method=\"{method}\",code=\"{code}\"}}"
            ),
        )
    };
    assert!(body.contains("\nmabe_authority_up 1\n"), "{body}");
    assert!(
        body.contains(
            "\nmabe_authority_requests_total{service=\"authority\",method=\"FetchKeys\",code=\"unauthenticated\"} 1\n"
        ),
        "{body}"
    );
    assert_eq!(count("authority", "GetInfo", "ok"), Some(2.0), "{body}");
    assert_eq!(count("authority", "FetchKeys", "ok"), Some(1.0), "{body}");
    assert_eq!(
        count("admin", "ListAttributes", "unauthenticated"),
        Some(1.0)
    );
    assert_eq!(count("admin", "Grant", "ok"), Some(1.0));
    assert_eq!(count("authority", "GetDirectory", "ok"), Some(0.0));
    assert_eq!(sample(&body, "mabe_authority_keys_issued_total"), Some(1.0));
    assert_eq!(
        sample(
            &body,
            "mabe_authority_refusals_total{service=\"authority\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "mabe_authority_refusals_total{service=\"admin\"}"),
        Some(1.0)
    );
    let d = "mabe_authority_request_duration_seconds";
    let l = "service=\"authority\",method=\"GetInfo\"";
    assert_eq!(sample(&body, &format!("{d}_count{{{l}}}")), Some(2.0));
    assert_eq!(
        sample(&body, &format!("{d}_bucket{{{l},le=\"+Inf\"}}")),
        Some(2.0)
    );
    assert!(sample(&body, &format!("{d}_sum{{{l}}}")).unwrap() > 0.0);
    // The person's GID and the attribute never appear.
    assert!(!body.contains(&hex_lower(gid.as_bytes())));
    assert!(!body.contains("cardiology"));
    assert!(!body.contains("19012345601"));

    // Any other path or method on the admin listener is not a metrics page.
    let (status, _, _) = http1_get(a.port(), &cert, "/metrics/x").await.unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http1_get(a.port(), &cert, "/").await.unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found");

    // The public listener offers no metrics: it speaks only HTTP/2 gRPC
    // (an `http/1.1`-only TLS client is refused).
    assert!(http1_get(p.port(), &cert, "/metrics").await.is_err());

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), &mut task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// HTTP/2 scrapes (ALPN `h2`, as curl and Prometheus with HTTP/2 enabled
/// negotiate) and clients offering no ALPN at all reach the same route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_over_h2_and_without_alpn() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("a.db")).unwrap());
    let (node, _) = Node::init(
        store,
        "hospital-a",
        Kek::generate(&mut OsRng),
        NodeConfig::default(),
    )
    .await
    .unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ck.cert.pem().into_bytes();
    let listeners = Listeners::bind(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let (_, a) = listeners.addrs().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let mut task = tokio::spawn(serve(
        Arc::new(node),
        listeners,
        ServeOptions {
            tls: Some(TlsPem {
                cert: cert.clone(),
                key: ck.signing_key.serialize_pem().into_bytes(),
            }),
            request_timeout: Duration::from_secs(20),
        },
        async {
            let _ = rx.await;
        },
    ));

    // HTTP/2: ALPN offers both, the server picks h2.
    let tcp = tokio::net::TcpStream::connect(a).await.unwrap();
    let tls = tls_client(&cert, &[b"h2", b"http/1.1"])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let res = sender
        .send_request(
            http::Request::get(format!("https://localhost:{}/metrics", a.port()))
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), http::StatusCode::OK);
    assert_eq!(
        res.headers()[http::header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = http_body_util::BodyExt::collect(res.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body = String::from_utf8(body.to_vec()).unwrap();
    assert!(body.contains("\nmabe_authority_up 1\n"), "{body}");
    drop(sender);

    // No ALPN at all: plain HTTP/1.1 over TLS.
    let tcp = tokio::net::TcpStream::connect(a).await.unwrap();
    let mut tls = tls_client(&cert, &[])
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8(raw).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("\nmabe_authority_up 1\n"), "{text}");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), &mut task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
