//! # mabe-proxy: the record store and revocation proxy
//!
//! The proxy stores encrypted records (a header, docs/FORMAT.md 'H', and an
//! opaque STREAM AES-GCM payload) for clients, and applies authorities'
//! update tokens to stored headers when an attribute is revoked (DESIGN §3).
//! It is trusted for availability only: it never sees a plaintext, a data
//! key, a user key or an update secret, and everything it returns is checked
//! by the reader's decryption (docs/PROXY.md).
//!
//! - [`node`]: the domain core (upload validation, authority authentication,
//!   freezes, token batches), independent of transport;
//! - [`cpu`]: the bounded blocking section where CPU-heavy work runs (token
//!   and header validation), off the async workers;
//! - [`store`]: storage behind one trait, SQLite (embedded default) and
//!   PostgreSQL;
//! - [`grpc`] and [`server`]: the `RecordStore` and `ProxyAuthority`
//!   services (`proto/proto/mabe/v1/proxy.proto`) over TLS, health, and
//!   `GET /metrics` on the admin listener ([`metrics`]);
//! - [`client`]: streaming upload and download of records for writers and
//!   readers; authorities sign their calls with
//!   [`mabe_proto::signing::sign_proxy_request`];
//! - [`datadir`]: the data directory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use mabe_proxy::client::RecordClient;
//! let ca = std::fs::read("proxy-data/tls/cert.pem")?;
//! let mut client = RecordClient::connect("https://127.0.0.1:7543", &ca, "localhost").await?;
//! let header: Vec<u8> = std::fs::read("record.header")?;
//! let rid = client.put(&header, std::fs::File::open("record.payload")?).await?;
//! let (header_now, _payload) = client.get(&rid, Vec::new()).await?;
//! # let _ = header_now;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod client;
pub mod cpu;
pub mod datadir;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod node;
pub mod server;
pub mod store;

pub use error::{ProxyError, Result};

/// Largest payload chunk in one `PutRecord` message (1 MiB).
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Size of the chunks the store keeps and `GetRecord` sends (1 MiB; the
/// last chunk of a payload may be shorter).
pub const STORE_CHUNK_BYTES: usize = 1 << 20;

/// Largest number of tokens in one `ApplyTokens` call.
pub const MAX_TOKENS_PER_BATCH: usize = 4096;

/// Largest page of `ListRecords`.
pub const MAX_LIST_PAGE: u32 = 1000;

/// Snapshot rows per `Freeze` stream message, and the largest
/// `FreezeStatus` page.
pub const SNAPSHOT_PAGE_ROWS: u32 = 10_000;

/// Largest gRPC message either side accepts (4 MiB: a header of at most
/// 1 MiB, a chunk of at most 1 MiB, a batch of 4096 tokens of about 700 bytes,
/// a page of 10,000 snapshot rows).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
