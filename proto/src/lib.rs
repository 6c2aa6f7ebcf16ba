//! # mabe-proto: the mabe.v1 gRPC API
//!
//! Generated types and service stubs ([`v1`]), and the exact byte strings
//! that requests' Ed25519 signatures cover ([`signing`]), shared by the
//! authority, the client and the proxy so every side signs and verifies the
//! same bytes. An authority calls a proxy's `ProxyAuthority` service with the
//! generated client and [`signing::sign_proxy_request`].
#![warn(missing_docs)]

/// Generated protobuf types and tonic services of package `mabe.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
pub mod v1 {
    tonic::include_proto!("mabe.v1");
}

pub mod bundle;
pub mod signing;

/// Largest gRPC message either side accepts (4 MiB: a directory of a few
/// thousand attributes, or a key batch, fits easily).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Streams one HTTP/2 connection to a mabe server may have open at once
/// (advertised as `SETTINGS_MAX_CONCURRENT_STREAMS`), and the calls one
/// connection may have in service. A client with more calls queues them on
/// its side. Without the bound, a client's thousands of small request frames
/// wait unread in h2's buffers, exhaust h2's per-connection budget for small
/// DATA frames, and h2 closes the whole connection (GOAWAY
/// `ENHANCE_YOUR_CALM`), failing every call on it.
///
/// ```
/// assert_eq!(mabe_proto::MAX_STREAMS_PER_CONNECTION, 256);
/// ```
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
