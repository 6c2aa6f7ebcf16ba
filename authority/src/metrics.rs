//! Prometheus metrics for one authority node, rendered in the text
//! exposition format 0.0.4 and served as `GET /metrics` on the admin
//! listener (see [`crate::server`]).
//!
//! The registry is a fixed set of atomic counters owned by one [`Metrics`]
//! value per served node (no global recorder, so several nodes in one
//! process, as in the tests, keep separate counts). Every gRPC call on both
//! listeners passes through a [`MetricsLayer`], which reads the call's
//! service and method from the request path and its status code from the
//! response (`grpc-status` in the headers of a trailers-only response, or in
//! the trailers), so calls refused before reaching a handler (undecodable or
//! oversized messages, unknown methods) are counted too. A call that is
//! dropped before it completes (deadline or client gone) counts as
//! `cancelled`.
//!
//! Label values come only from fixed tables (service, method, gRPC code): no
//! GID, attribute, subject or secret ever appears in a label, and a client
//! cannot create new series by calling made-up paths (they all count as
//! `service="unknown",method="unknown"`).
//!
//! Series:
//! - `mabe_authority_up` (gauge, always 1 when scraped);
//! - `mabe_authority_requests_total{service,method,code}` (counter);
//! - `mabe_authority_request_duration_seconds{service,method}` (histogram);
//! - `mabe_authority_keys_issued_total` (counter, user keys handed out by
//!   `FetchKeys`);
//! - `mabe_authority_refusals_total{service}` (counter, calls answered
//!   `unauthenticated` or `permission_denied`).

use std::{
    fmt::{self, Write as _},
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use mabe_proto::v1::{authority_admin_server, authority_server};
use tonic::Code;

/// The `Content-Type` of the rendered metrics (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Response extension a handler sets to report how many user keys it issued
/// (read by [`MetricsLayer`] into `mabe_authority_keys_issued_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeysIssued(pub usize);

/// gRPC services and methods with their own series: (gRPC service name,
/// `service` label, methods). Must list every RPC of `authority.proto`
/// (checked by a unit test); anything else counts as `unknown`.
const SERVICES: [(&str, &str, &[&str]); 3] = [
    (
        authority_server::SERVICE_NAME,
        "authority",
        &[
            "GetInfo",
            "GetDirectory",
            "FetchKeys",
            "RequestAttribute",
            "BreakGlass",
        ],
    ),
    (
        authority_admin_server::SERVICE_NAME,
        "admin",
        &[
            "CreateAttribute",
            "ListAttributes",
            "Enroll",
            "Grant",
            "Revoke",
            "ListRequests",
            "DecideRequest",
            "VerifyAudit",
            "Checkpoint",
            "ListRotations",
            "IssueOffline",
            "RotateExpired",
            "AddProxy",
            "ListProxies",
            "ListAudit",
            "DescribeAttribute",
        ],
    ),
    ("grpc.health.v1.Health", "health", &["Check", "Watch"]),
];

/// Label of gRPC calls to any other path.
const UNKNOWN: &str = "unknown";

/// gRPC status code names, indexed by code number (0..=16).
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

/// Histogram bucket upper bounds: (nanoseconds, `le` label). One more
/// bucket, `+Inf`, follows.
const BUCKETS: [(u64, &str); 12] = [
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (10_000_000_000, "10"),
];

/// Counters of one (service, method) pair.
struct Series {
    service: &'static str,
    method: &'static str,
    /// Finished calls per gRPC code.
    codes: [AtomicU64; CODES.len()],
    /// Calls per duration bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Total duration in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Series {
    fn new(service: &'static str, method: &'static str) -> Self {
        Series {
            service,
            method,
            codes: std::array::from_fn(|_| AtomicU64::new(0)),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

/// One node's metrics registry: fixed series of atomic counters.
pub struct Metrics {
    /// One entry per known method, then the `unknown` series last.
    series: Vec<Series>,
    keys_issued: AtomicU64,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("series", &self.series.len())
            .field("keys_issued", &self.keys_issued.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every counter at zero.
    pub fn new() -> Self {
        let mut series: Vec<Series> = SERVICES
            .iter()
            .flat_map(|(_, label, methods)| methods.iter().map(|m| Series::new(label, m)))
            .collect();
        series.push(Series::new(UNKNOWN, UNKNOWN));
        Metrics {
            series,
            keys_issued: AtomicU64::new(0),
        }
    }

    /// A tower layer that counts every gRPC call through the wrapped service.
    pub fn layer(self: &Arc<Self>) -> MetricsLayer {
        MetricsLayer {
            metrics: Arc::clone(self),
        }
    }

    /// The series index of a request, or `None` if it is not a gRPC call
    /// (e.g. `GET /metrics` itself).
    fn classify<B>(&self, req: &Request<B>) -> Option<usize> {
        let path = req.uri().path();
        let known = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .and_then(|(service, method)| {
                let mut index = 0;
                for (name, _, methods) in SERVICES {
                    if name == service {
                        return methods.iter().position(|m| *m == method).map(|i| index + i);
                    }
                    index += methods.len();
                }
                None
            });
        let grpc = req
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        known.or_else(|| grpc.then(|| self.series.len() - 1))
    }

    /// Record one finished call.
    fn observe(&self, series: usize, code: Code, nanos: u64) {
        let Some(s) = self.series.get(series) else {
            return;
        };
        let code = usize::try_from(i32::from(code)).unwrap_or(2);
        if let Some(c) = s.codes.get(code).or(s.codes.get(2)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let bucket = BUCKETS
            .iter()
            .position(|(le, _)| nanos <= *le)
            .unwrap_or(BUCKETS.len());
        if let Some(b) = s.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        s.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Count user keys handed out.
    pub fn add_keys_issued(&self, n: u64) {
        self.keys_issued.fetch_add(n, Ordering::Relaxed);
    }

    /// Render every series in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = self.render_into(&mut out);
        out
    }

    fn render_into(&self, out: &mut String) -> fmt::Result {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);

        writeln!(
            out,
            "# HELP mabe_authority_up Whether the authority node is serving (1 whenever it answers a scrape)."
        )?;
        writeln!(out, "# TYPE mabe_authority_up gauge")?;
        writeln!(out, "mabe_authority_up 1")?;

        writeln!(
            out,
            "# HELP mabe_authority_requests_total gRPC calls finished, by service, method and gRPC status code."
        )?;
        writeln!(out, "# TYPE mabe_authority_requests_total counter")?;
        for s in &self.series {
            for (code, (name, n)) in CODES.iter().zip(&s.codes).enumerate() {
                let n = load(n);
                // Always show `ok` so every known method has a series; other
                // codes once they occur.
                if code == 0 || n > 0 {
                    writeln!(
                        out,
                        "mabe_authority_requests_total{{service=\"{}\",method=\"{}\",code=\"{name}\"}} {n}",
                        s.service, s.method
                    )?;
                }
            }
        }

        writeln!(
            out,
            "# HELP mabe_authority_request_duration_seconds Time from receiving a gRPC call to its final status."
        )?;
        writeln!(
            out,
            "# TYPE mabe_authority_request_duration_seconds histogram"
        )?;
        for s in &self.series {
            let labels = format!("service=\"{}\",method=\"{}\"", s.service, s.method);
            let mut cumulative = 0u64;
            for ((_, le), n) in BUCKETS.iter().zip(&s.buckets) {
                cumulative += load(n);
                writeln!(
                    out,
                    "mabe_authority_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                )?;
            }
            if let Some(inf) = s.buckets.last() {
                cumulative += load(inf);
            }
            writeln!(
                out,
                "mabe_authority_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
            )?;
            let secs = load(&s.sum_nanos) as f64 / 1e9;
            writeln!(
                out,
                "mabe_authority_request_duration_seconds_sum{{{labels}}} {secs}"
            )?;
            writeln!(
                out,
                "mabe_authority_request_duration_seconds_count{{{labels}}} {cumulative}"
            )?;
        }

        writeln!(
            out,
            "# HELP mabe_authority_keys_issued_total User attribute keys handed out by FetchKeys."
        )?;
        writeln!(out, "# TYPE mabe_authority_keys_issued_total counter")?;
        writeln!(
            out,
            "mabe_authority_keys_issued_total {}",
            load(&self.keys_issued)
        )?;

        writeln!(
            out,
            "# HELP mabe_authority_refusals_total gRPC calls refused as unauthenticated or permission denied."
        )?;
        writeln!(out, "# TYPE mabe_authority_refusals_total counter")?;
        let refused = [
            i32::from(Code::Unauthenticated),
            i32::from(Code::PermissionDenied),
        ];
        let services = SERVICES.iter().map(|(_, label, _)| *label);
        for service in services.chain([UNKNOWN]) {
            let n: u64 = self
                .series
                .iter()
                .filter(|s| s.service == service)
                .flat_map(|s| {
                    refused
                        .iter()
                        .filter_map(|c| usize::try_from(*c).ok())
                        .filter_map(|c| s.codes.get(c))
                })
                .map(load)
                .sum();
            writeln!(
                out,
                "mabe_authority_refusals_total{{service=\"{service}\"}} {n}"
            )?;
        }
        Ok(())
    }
}

/// The gRPC status code in `grpc-status`, if present.
fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i32>().ok())
        .map(Code::from)
}

/// One gRPC call in flight; records itself exactly once, as `cancelled` if
/// dropped before [`Call::finish`].
struct Call {
    metrics: Arc<Metrics>,
    series: usize,
    start: Instant,
    done: bool,
}

impl Call {
    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        if !self.done {
            self.done = true;
            let nanos = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.metrics.observe(self.series, code, nanos);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.record(Code::Cancelled);
    }
}

/// Tower layer counting gRPC calls into a [`Metrics`] (see [`Metrics::layer`]).
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service made by [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> tower::Service<Request<ReqBody>> for MetricsService<S>
where
    S: tower::Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let call = self.metrics.classify(&req).map(|series| Call {
            metrics: Arc::clone(&self.metrics),
            series,
            start: Instant::now(),
            done: false,
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            let Some(call) = call else {
                return Ok(res.map(|inner| MeteredBody { inner, call: None }));
            };
            if let Some(KeysIssued(n)) = res.extensions().get::<KeysIssued>() {
                call.metrics
                    .add_keys_issued(u64::try_from(*n).unwrap_or(u64::MAX));
            }
            // A trailers-only response (every error a handler returns)
            // carries its status in the headers; otherwise it comes in the
            // trailers at the end of the body.
            if let Some(code) = grpc_status(res.headers()) {
                call.finish(code);
                return Ok(res.map(|inner| MeteredBody { inner, call: None }));
            }
            Ok(res.map(|inner| MeteredBody {
                inner,
                call: Some(call),
            }))
        })
    }
}

/// A response body that records its call's status when the trailers pass.
pub struct MeteredBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredBody")
            .field("metered", &self.call.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> MeteredBody<B> {
    fn finish(&mut self, code: Code) {
        if let Some(call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    this.finish(grpc_status(trailers).unwrap_or(Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Code::Unknown),
            // The body ended without a status: not a well-formed gRPC answer.
            Poll::Ready(None) => this.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn request(path: &str, grpc: bool) -> Request<()> {
        let mut b = Request::builder().uri(path);
        if grpc {
            b = b.header("content-type", "application/grpc");
        }
        b.body(()).unwrap()
    }

    fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(prefix))
    }

    #[test]
    fn every_rpc_of_the_proto_has_a_series() {
        let proto = include_str!("../../proto/proto/mabe/v1/authority.proto");
        let mut service = "";
        let mut rpcs = 0;
        for l in proto.lines().map(str::trim) {
            if let Some(rest) = l.strip_prefix("service ") {
                service = rest.trim_end_matches('{').trim();
            } else if let Some(rest) = l.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim();
                let m = Metrics::new();
                let i = m
                    .classify(&request(&format!("/mabe.v1.{service}/{method}"), true))
                    .unwrap();
                assert_eq!(m.series[i].method, method, "{service}/{method}");
                assert_ne!(m.series[i].service, UNKNOWN, "{service}/{method}");
                rpcs += 1;
            }
        }
        assert_eq!(rpcs, 21);
    }

    #[test]
    fn classification_is_bounded() {
        let m = Metrics::new();
        let unknown = m.series.len() - 1;
        let fetch = m
            .classify(&request("/mabe.v1.Authority/FetchKeys", true))
            .unwrap();
        assert_eq!(
            (m.series[fetch].service, m.series[fetch].method),
            ("authority", "FetchKeys")
        );
        // Made-up paths cannot mint new series.
        for p in [
            "/mabe.v1.Authority/Nope",
            "/x.Y/Z",
            "/mabe.v1.Authority",
            "/",
            "/mabe.v1.Authority/FetchKeys/extra",
        ] {
            assert_eq!(m.classify(&request(p, true)), Some(unknown), "{p}");
        }
        // Plain HTTP (the scrape itself) is not a gRPC call.
        assert_eq!(m.classify(&request("/metrics", false)), None);
    }

    #[test]
    fn render_counts_codes_durations_and_refusals() {
        let m = Metrics::new();
        let fetch = m
            .classify(&request("/mabe.v1.Authority/FetchKeys", true))
            .unwrap();
        let grant = m
            .classify(&request("/mabe.v1.AuthorityAdmin/Grant", true))
            .unwrap();
        m.observe(fetch, Code::Ok, 3_000_000);
        m.observe(fetch, Code::Unauthenticated, 20_000_000_000);
        m.observe(grant, Code::PermissionDenied, 1);
        m.add_keys_issued(2);
        let text = m.render();

        assert!(text.contains("\nmabe_authority_up 1\n"));
        assert!(text.contains(
            "\nmabe_authority_requests_total{service=\"authority\",method=\"FetchKeys\",code=\"ok\"} 1\n"
        ));
        assert!(text.contains(
            "\nmabe_authority_requests_total{service=\"authority\",method=\"FetchKeys\",code=\"unauthenticated\"} 1\n"
        ));
        assert!(text.contains(
            "\nmabe_authority_requests_total{service=\"authority\",method=\"GetInfo\",code=\"ok\"} 0\n"
        ));
        assert!(!text.contains("method=\"GetInfo\",code=\"internal\""));
        let b = "mabe_authority_request_duration_seconds_bucket{service=\"authority\",method=\"FetchKeys\",";
        assert_eq!(
            line(&text, &format!("{b}le=\"0.0025\"}}")).unwrap(),
            format!("{b}le=\"0.0025\"}} 0")
        );
        assert_eq!(
            line(&text, &format!("{b}le=\"0.005\"}}")).unwrap(),
            format!("{b}le=\"0.005\"}} 1")
        );
        assert_eq!(
            line(&text, &format!("{b}le=\"10\"}}")).unwrap(),
            format!("{b}le=\"10\"}} 1")
        );
        assert_eq!(
            line(&text, &format!("{b}le=\"+Inf\"}}")).unwrap(),
            format!("{b}le=\"+Inf\"}} 2")
        );
        assert!(text.contains(
            "\nmabe_authority_request_duration_seconds_sum{service=\"authority\",method=\"FetchKeys\"} 20.003\n"
        ));
        assert!(text.contains(
            "\nmabe_authority_request_duration_seconds_count{service=\"authority\",method=\"FetchKeys\"} 2\n"
        ));
        assert!(text.contains("\nmabe_authority_keys_issued_total 2\n"));
        assert!(text.contains("\nmabe_authority_refusals_total{service=\"authority\"} 1\n"));
        assert!(text.contains("\nmabe_authority_refusals_total{service=\"admin\"} 1\n"));
        assert!(text.contains("\nmabe_authority_refusals_total{service=\"health\"} 0\n"));

        // Text format 0.0.4: every sample line is `name{labels} value`, each
        // family has HELP and TYPE, and the output ends with a newline.
        assert!(text.ends_with('\n'));
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = l.rsplit_once(' ').unwrap();
            value.parse::<f64>().unwrap();
        }
        for family in [
            "mabe_authority_up",
            "mabe_authority_requests_total",
            "mabe_authority_request_duration_seconds",
            "mabe_authority_keys_issued_total",
            "mabe_authority_refusals_total",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{family}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
    }

    #[test]
    fn a_dropped_call_counts_as_cancelled() {
        let m = Arc::new(Metrics::new());
        let series = m
            .classify(&request("/mabe.v1.Authority/GetInfo", true))
            .unwrap();
        drop(Call {
            metrics: Arc::clone(&m),
            series,
            start: Instant::now(),
            done: false,
        });
        let finished = Call {
            metrics: Arc::clone(&m),
            series,
            start: Instant::now(),
            done: false,
        };
        finished.finish(Code::Ok);
        let s = &m.series[series];
        assert_eq!(s.codes[1].load(Ordering::Relaxed), 1);
        assert_eq!(s.codes[0].load(Ordering::Relaxed), 1);
    }
}
