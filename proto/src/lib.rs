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
