//! Serving: the public listener (`RecordStore`, `ProxyAuthority`, gRPC
//! health) and the admin listener (`GET /metrics`), both over TLS, with
//! explicit message-size limits, deadlines and graceful shutdown (in-flight
//! calls finish; an upload is acknowledged only after its commit, so
//! stopping never loses an acknowledged write).
//!
//! The metrics reveal activity (no record ids or attributes): bind the admin
//! listener to loopback or a management network only. It does its own TLS
//! handshake to offer both `h2` and `http/1.1` in ALPN (Prometheus scrapes
//! over HTTP/1.1).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use mabe_proto::v1::{
    proxy_authority_server::ProxyAuthorityServer, record_store_server::RecordStoreServer,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
    server::TlsStream,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{
    service::Routes,
    transport::{Identity, Server, ServerTlsConfig},
};

use crate::{
    MAX_MESSAGE_BYTES,
    error::{ProxyError, Result},
    grpc::{AuthorityService, Deadlines, RecordService},
    metrics::{self, Metrics},
    node::{Node, now},
};

/// PEM certificate chain and private key for the listeners.
#[derive(Clone)]
pub struct TlsPem {
    /// Certificate chain (PEM).
    pub cert: Vec<u8>,
    /// Private key (PEM).
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsPem(<certificate and key>)")
    }
}

/// Listener options.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// TLS material; `None` serves plaintext (only for tests that say so).
    pub tls: Option<TlsPem>,
    /// Deadline of a unary call (and of a freeze before its snapshot streams).
    pub request_timeout: Duration,
    /// Longest pause between two messages of an upload, or before a slow
    /// reader accepts the next message of a download.
    pub idle_timeout: Duration,
    /// Uploads with no activity for this long are purged (checked at start
    /// and every tenth of this period).
    pub abandoned_upload_after: Duration,
}

impl ServeOptions {
    /// TLS with the default deadlines: 30 s per call, 60 s idle, abandoned
    /// uploads purged after an hour.
    pub fn new(tls: Option<TlsPem>) -> Self {
        ServeOptions {
            tls,
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            abandoned_upload_after: Duration::from_secs(3600),
        }
    }
}

/// Bound listeners, ready to serve (bind first, so callers learn the ports).
#[derive(Debug)]
pub struct Listeners {
    /// Public listener.
    pub public: TcpListener,
    /// Admin listener.
    pub admin: TcpListener,
}

impl Listeners {
    /// Bind both addresses (port 0 picks a free port).
    pub async fn bind(public: SocketAddr, admin: SocketAddr) -> std::io::Result<Listeners> {
        Ok(Listeners {
            public: TcpListener::bind(public).await?,
            admin: TcpListener::bind(admin).await?,
        })
    }

    /// The bound addresses (public, admin).
    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr)> {
        Ok((self.public.local_addr()?, self.admin.local_addr()?))
    }
}

const ADMIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The listener's connections with `TCP_NODELAY` set. tonic ignores its own
/// `tcp_nodelay` setting for a caller-supplied listener, and with Nagle's
/// algorithm the last small frames of an answer (a 4 KiB record's chunk,
/// the trailers) can wait for the client's delayed ACK, tens of
/// milliseconds on Linux.
fn nodelay_incoming(listener: TcpListener) -> impl Stream<Item = std::io::Result<TcpStream>> {
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(tcp) = &accepted {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY on a connection");
            }
        }
        accepted
    })
}

fn builder(tls: Option<&TlsPem>) -> Result<Server> {
    let mut b = Server::builder()
        .concurrency_limit_per_connection(mabe_proto::MAX_STREAMS_PER_CONNECTION as usize)
        .max_concurrent_streams(mabe_proto::MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = tls {
        b =
            b.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key)))?;
    }
    Ok(b)
}

fn admin_tls(tls: &TlsPem) -> Result<Arc<ServerConfig>> {
    let pem = |e: tokio_rustls::rustls::pki_types::pem::Error| {
        ProxyError::Serve(format!("admin listener TLS material: {e}"))
    };
    let chain = CertificateDer::pem_slice_iter(&tls.cert)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(pem)?;
    if chain.is_empty() {
        return Err(ProxyError::Serve(
            "admin listener TLS material: no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key).map_err(pem)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let tls_err = |e: tokio_rustls::rustls::Error| ProxyError::Serve(format!("admin TLS: {e}"));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls_err)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        match tokio::time::timeout(ADMIN_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(tls)) => {
                                let _ = tx.send(Ok(tls)).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "admin TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

async fn not_found() -> http::Response<axum::body::Body> {
    let mut res = http::Response::new(axum::body::Body::from("not found\n"));
    *res.status_mut() = http::StatusCode::NOT_FOUND;
    res
}

fn admin_routes(metrics: Arc<Metrics>) -> Routes {
    let scrape = axum::routing::get(move || {
        let metrics = Arc::clone(&metrics);
        async move {
            (
                [(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                metrics.render(),
            )
        }
    });
    Routes::from(
        axum::Router::new()
            .route("/metrics", scrape)
            .fallback(not_found),
    )
}

/// Purge abandoned uploads now and then, until the process ends.
fn spawn_purger(node: Arc<Node>, after: Duration) {
    let period = (after / 10).max(Duration::from_secs(1));
    tokio::spawn(async move {
        loop {
            let cutoff = now() - i64::try_from(after.as_secs()).unwrap_or(i64::MAX);
            match node.store().purge_abandoned_uploads(cutoff).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(uploads = n, "purged abandoned uploads"),
                Err(e) => tracing::warn!(error = %e, "cannot purge abandoned uploads"),
            }
            tokio::time::sleep(period).await;
        }
    });
}

/// Serve until `shutdown` completes, then stop accepting, let in-flight
/// calls finish, and return.
pub async fn serve(
    node: Arc<Node>,
    listeners: Listeners,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let deadlines = Deadlines {
        request: opts.request_timeout,
        idle: opts.idle_timeout,
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<RecordStoreServer<RecordService>>()
        .await;
    reporter
        .set_serving::<ProxyAuthorityServer<AuthorityService>>()
        .await;
    let records = RecordStoreServer::new(RecordService::new(
        Arc::clone(&node),
        Arc::clone(&metrics),
        deadlines,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let authority = ProxyAuthorityServer::new(AuthorityService::new(
        Arc::clone(&node),
        Arc::clone(&metrics),
        deadlines,
    ))
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);

    spawn_purger(Arc::clone(&node), opts.abandoned_upload_after);

    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let public_srv = builder(opts.tls.as_ref())?
        .add_service(health)
        .add_service(records)
        .add_service(authority)
        .serve_with_incoming_shutdown(nodelay_incoming(listeners.public), stop(rx.clone()));
    let admin_tls = opts.tls.as_ref().map(admin_tls).transpose()?;
    let mut admin_builder = builder(None)?.accept_http1(true);
    let admin_router = admin_builder.add_routes(admin_routes(Arc::clone(&metrics)));
    let admin_srv = async move {
        match admin_tls {
            Some(config) => {
                admin_router
                    .serve_with_incoming_shutdown(tls_incoming(listeners.admin, config), stop(rx))
                    .await
            }
            None => {
                admin_router
                    .serve_with_incoming_shutdown(nodelay_incoming(listeners.admin), stop(rx))
                    .await
            }
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight calls");
        let _ = tx.send(true);
    });
    let (a, b) = tokio::join!(public_srv, admin_srv);
    a?;
    b?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(nodelay_incoming(listener));
        let _client = TcpStream::connect(addr).await.unwrap();
        let server_side = incoming.next().await.expect("a connection").unwrap();
        assert!(server_side.nodelay().unwrap());
    }
}
