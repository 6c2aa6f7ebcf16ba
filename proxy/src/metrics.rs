//! Prometheus metrics of one proxy, rendered in the text exposition format
//! 0.0.4 and served as `GET /metrics` on the admin listener.
//!
//! A fixed set of atomic counters owned by one [`Metrics`] value per served
//! node (no global recorder). Labels come only from fixed tables (method,
//! outcome): no record id, attribute or authority appears in a label.
//!
//! Series:
//! - `mabe_proxy_up` (gauge, 1);
//! - `mabe_proxy_requests_total{method,code}` (counter; `code` is the gRPC
//!   status name the handler answered with);
//! - `mabe_proxy_payload_bytes_total{direction="in"|"out"}` (counter);
//! - `mabe_proxy_token_groups_total{outcome}` (counter: applied,
//!   already_applied, refused, not_found);
//! - `mabe_proxy_auth_refusals_total` (counter: authority calls refused as
//!   unauthenticated or permission denied).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::Code;

/// The `Content-Type` of the rendered metrics.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// RPCs with their own series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Method {
    /// `RecordStore/PutRecord`.
    PutRecord,
    /// `RecordStore/GetRecord`.
    GetRecord,
    /// `RecordStore/ListRecords`.
    ListRecords,
    /// `RecordStore/DeleteRecord`.
    DeleteRecord,
    /// `RecordStore/GetProxyInfo`.
    GetProxyInfo,
    /// `ProxyAuthority/Freeze`.
    Freeze,
    /// `ProxyAuthority/ApplyTokens`.
    ApplyTokens,
    /// `ProxyAuthority/FreezeStatus`.
    FreezeStatus,
}

const METHODS: [&str; 8] = [
    "PutRecord",
    "GetRecord",
    "ListRecords",
    "DeleteRecord",
    "GetProxyInfo",
    "Freeze",
    "ApplyTokens",
    "FreezeStatus",
];

const CODES: [&str; 17] = [
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
];

const OUTCOMES: [&str; 4] = ["applied", "already_applied", "refused", "not_found"];

/// Outcome of one token group, for [`Metrics::token_group`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum GroupKind {
    /// Applied.
    Applied,
    /// Already applied.
    AlreadyApplied,
    /// Refused.
    Refused,
    /// Record not found.
    NotFound,
}

/// The counters.
#[derive(Debug)]
pub struct Metrics {
    requests: [[AtomicU64; 17]; 8],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    groups: [AtomicU64; 4],
    auth_refusals: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Metrics {
            requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            groups: std::array::from_fn(|_| AtomicU64::new(0)),
            auth_refusals: AtomicU64::new(0),
        }
    }

    /// Count one call of `method` answered with `code`.
    pub fn request(&self, method: Method, code: Code) {
        let c = (code as usize).min(CODES.len() - 1);
        if let Some(counter) = self
            .requests
            .get(method as usize)
            .and_then(|row| row.get(c))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if matches!(
            method,
            Method::Freeze | Method::ApplyTokens | Method::FreezeStatus
        ) && matches!(code, Code::Unauthenticated | Code::PermissionDenied)
        {
            self.auth_refusals.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count payload bytes received.
    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Count payload bytes sent.
    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Count one token group's outcome.
    pub fn token_group(&self, kind: GroupKind) {
        if let Some(c) = self.groups.get(kind as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The text exposition.
    ///
    /// ```
    /// let m = mabe_proxy::metrics::Metrics::new();
    /// m.request(mabe_proxy::metrics::Method::PutRecord, tonic::Code::Ok);
    /// assert!(m.render().contains("mabe_proxy_requests_total{method=\"PutRecord\",code=\"ok\"} 1"));
    /// ```
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP mabe_proxy_up Whether the proxy is serving.");
        let _ = writeln!(out, "# TYPE mabe_proxy_up gauge\nmabe_proxy_up 1");
        let _ = writeln!(
            out,
            "# HELP mabe_proxy_requests_total gRPC calls by method and status code."
        );
        let _ = writeln!(out, "# TYPE mabe_proxy_requests_total counter");
        for (m, row) in METHODS.iter().zip(&self.requests) {
            for (c, n) in CODES.iter().zip(row) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "mabe_proxy_requests_total{{method=\"{m}\",code=\"{c}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP mabe_proxy_payload_bytes_total Payload bytes received and sent."
        );
        let _ = writeln!(out, "# TYPE mabe_proxy_payload_bytes_total counter");
        let _ = writeln!(
            out,
            "mabe_proxy_payload_bytes_total{{direction=\"in\"}} {}",
            self.bytes_in.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "mabe_proxy_payload_bytes_total{{direction=\"out\"}} {}",
            self.bytes_out.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP mabe_proxy_token_groups_total Token groups (one record at one version) by outcome."
        );
        let _ = writeln!(out, "# TYPE mabe_proxy_token_groups_total counter");
        for (o, n) in OUTCOMES.iter().zip(&self.groups) {
            let _ = writeln!(
                out,
                "mabe_proxy_token_groups_total{{outcome=\"{o}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP mabe_proxy_auth_refusals_total Authority calls refused as unauthenticated or not permitted."
        );
        let _ = writeln!(out, "# TYPE mabe_proxy_auth_refusals_total counter");
        let _ = writeln!(
            out,
            "mabe_proxy_auth_refusals_total {}",
            self.auth_refusals.load(Ordering::Relaxed)
        );
        out
    }
}
