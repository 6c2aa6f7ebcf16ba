//! Serving: the public listener (Authority + gRPC health) and the admin
//! listener (AuthorityAdmin and `GET /metrics`), both over TLS, with explicit
//! message-size limits, a per-request timeout and graceful shutdown
//! (in-flight requests finish; every acknowledged write is already
//! committed).
//!
//! The admin listener also answers `GET /metrics` (Prometheus text format
//! 0.0.4, see [`crate::metrics`]) over HTTP/1.1 or HTTP/2. The scrape needs no
//! admin signature: the metrics hold no GID, attribute or secret, but they do
//! reveal activity, so **the admin listener must never be exposed publicly**
//! (bind it to loopback or a management network, and let only the admin
//! tooling and the Prometheus server reach it). The admin listener does its
//! own TLS handshake so that it can offer both `h2` and `http/1.1` in ALPN
//! (tonic's acceptor offers only `h2`, which makes rustls refuse a client,
//! such as a Prometheus server with HTTP/2 disabled, that offers only
//! `http/1.1`).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use mabe_proto::{
    MAX_MESSAGE_BYTES,
    v1::{authority_admin_server::AuthorityAdminServer, authority_server::AuthorityServer},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
    server::TlsStream,
};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{
    server::NamedService,
    service::Routes,
    transport::{Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use crate::{
    grpc::{AdminService, PublicService},
    metrics::{self, Metrics},
    node::Node,
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
    /// Deadline for one request.
    pub request_timeout: Duration,
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

/// Errors while serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// TLS configuration or transport failure.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The admin listener's certificate chain or key is not valid PEM.
    #[error("admin listener TLS material: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// The admin listener's TLS configuration was refused.
    #[error("admin listener TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Deadline for the admin listener's TLS handshakes.
const ADMIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A server builder; `tls` makes tonic terminate TLS (the public listener).
fn builder(opts: &ServeOptions, tls: Option<&TlsPem>) -> Result<Server, ServeError> {
    let mut b = Server::builder()
        .timeout(opts.request_timeout)
        .concurrency_limit_per_connection(mabe_proto::MAX_STREAMS_PER_CONNECTION as usize)
        .max_concurrent_streams(mabe_proto::MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = tls {
        b =
            b.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key)))?;
    }
    Ok(b)
}

/// The admin listener's TLS configuration: the same certificate as the
/// public listener, ALPN `h2` (gRPC) and `http/1.1` (metrics scrapes).
fn admin_tls(tls: &TlsPem) -> Result<Arc<ServerConfig>, ServeError> {
    let chain = CertificateDer::pem_slice_iter(&tls.cert).collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err(ServeError::Pem(rustls::pki_types::pem::Error::NoItemsFound));
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accept TCP connections on `listener` and complete their TLS handshakes
/// concurrently (each under [`ADMIN_HANDSHAKE_TIMEOUT`]); the stream ends,
/// and the listener closes, once the server drops it.
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
                                tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                            }
                            Err(_) => tracing::debug!(%peer, "admin TLS handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "admin listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Answer for paths no route matches: gRPC `UNIMPLEMENTED` to gRPC clients
/// (as tonic's own fallback), plain `404 Not Found` to anyone else.
async fn not_found(headers: http::HeaderMap) -> http::Response<axum::body::Body> {
    let grpc = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unimplemented("").into_http()
    } else {
        let mut res = http::Response::new(axum::body::Body::from("not found\n"));
        *res.status_mut() = http::StatusCode::NOT_FOUND;
        res
    }
}

/// The admin listener's routes: the AuthorityAdmin gRPC service and
/// `GET /metrics`.
fn admin_routes(admin: AuthorityAdminServer<AdminService>, metrics: Arc<Metrics>) -> Routes {
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
        Routes::new(admin)
            .into_axum_router()
            .route("/metrics", scrape)
            .fallback(not_found),
    )
}

/// Serve until `shutdown` completes, then set the gRPC health status to
/// `NOT_SERVING` (overall and for `mabe.v1.Authority`), stop accepting, let
/// in-flight requests finish, and return. Both listeners count their calls into one
/// fresh [`Metrics`], served as `GET /metrics` on the admin listener.
pub async fn serve(
    node: Arc<Node>,
    listeners: Listeners,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<AuthorityServer<PublicService>>()
        .await;
    let public = AuthorityServer::new(PublicService::new(Arc::clone(&node)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let admin = AuthorityAdminServer::new(AdminService::new(Arc::clone(&node)))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);

    let metrics = Arc::new(Metrics::new());

    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let public_srv = builder(&opts, opts.tls.as_ref())?
        .layer(metrics.layer())
        .add_service(health)
        .add_service(public)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.public), stop(rx.clone()));
    let admin_tls = opts.tls.as_ref().map(admin_tls).transpose()?;
    let mut admin_builder = builder(&opts, None)?
        .accept_http1(true)
        .layer(metrics.layer());
    let admin_router = admin_builder.add_routes(admin_routes(admin, Arc::clone(&metrics)));
    let admin_srv = async move {
        match admin_tls {
            Some(config) => {
                admin_router
                    .serve_with_incoming_shutdown(tls_incoming(listeners.admin, config), stop(rx))
                    .await
            }
            None => {
                admin_router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.admin), stop(rx))
                    .await
            }
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        // Tell health checkers first, then stop accepting and drain.
        let mut reporter = reporter;
        for service in ["", <AuthorityServer<PublicService> as NamedService>::NAME] {
            reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        tracing::info!("shutting down: health NOT_SERVING, finishing in-flight requests");
        let _ = tx.send(true);
        // End open `Health/Watch` streams (after they saw NOT_SERVING), or
        // the drain would wait for them forever.
        for service in ["", <AuthorityServer<PublicService> as NamedService>::NAME] {
            reporter.clear_service_status(service).await;
        }
    });
    let (a, b) = tokio::join!(public_srv, admin_srv);
    a?;
    b?;
    Ok(())
}
