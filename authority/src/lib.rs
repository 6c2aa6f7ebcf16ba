//! # mabe-authority: one hospital's attribute key service
//!
//! - [`node`]: the domain core (attributes, people, grants, requests, key
//!   issuance, signed directory, audit), independent of transport;
//! - [`store`]: storage behind one trait, SQLite (embedded default) and
//!   PostgreSQL, with the audit entry of every change in the same transaction;
//! - [`audit`]: the hash chain and signed checkpoints;
//! - [`seal`]: secrets at rest under the key-encryption key;
//! - [`grpc`] and [`server`]: the public and admin gRPC services over TLS;
//! - [`revocation`]: the driver that takes a rotation to the end at every
//!   registered record-store proxy (freeze, tokens, erase the update secret);
//! - [`metrics`]: Prometheus counters, served as `GET /metrics` on the admin
//!   listener;
//! - [`admin_client`]: signing admin calls; [`datadir`]: the data directory.
#![warn(missing_docs)]

pub mod admin_client;
pub mod audit;
pub mod datadir;
pub mod grpc;
pub mod metrics;
pub mod node;
pub mod revocation;
pub mod seal;
pub mod server;
pub mod store;
