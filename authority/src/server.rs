//! Serving: the public listener (Authority + gRPC health) and the admin
//! listener (AuthorityAdmin), both over TLS, with explicit message-size
//! limits, a per-request timeout and graceful shutdown (in-flight requests
//! finish; every acknowledged write is already committed).

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use mabe_proto::{
    MAX_MESSAGE_BYTES,
    v1::{authority_admin_server::AuthorityAdminServer, authority_server::AuthorityServer},
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::{
    grpc::{AdminService, PublicService},
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
}

fn builder(opts: &ServeOptions) -> Result<Server, ServeError> {
    let mut b = Server::builder()
        .timeout(opts.request_timeout)
        .concurrency_limit_per_connection(256)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = &opts.tls {
        b =
            b.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key)))?;
    }
    Ok(b)
}

/// Serve until `shutdown` completes, then stop accepting, let in-flight
/// requests finish, and return.
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

    let (tx, rx) = tokio::sync::watch::channel(false);
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let public_srv = builder(&opts)?
        .add_service(health)
        .add_service(public)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.public), stop(rx.clone()));
    let admin_srv = builder(&opts)?
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.admin), stop(rx));
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = tx.send(true);
    });
    let (a, b) = tokio::join!(public_srv, admin_srv);
    a?;
    b?;
    Ok(())
}
