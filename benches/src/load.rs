//! Shared machinery of the load generators (`mabe-loadgen` for the
//! authority, `mabe-proxy-load` for the proxy): running a real server binary
//! on loopback as a child process, a throwaway PostgreSQL database, TLS
//! connections, keeping N calls in flight with latency histograms, CPU
//! accounting from /proc, and the Markdown tables.
//!
//! Everything is bounded: traffic goes to 127.0.0.1 only, calls are counted,
//! and every wait is under a deadline.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ark_std::rand::{RngCore, rngs::OsRng};
use clap::ValueEnum;
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdout, Command},
    sync::Semaphore,
    task::JoinSet,
    time::{Instant, timeout_at},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Failed calls whose message is printed (the rest are only counted).
const SHOWN_ERRORS: usize = 5;

/// Print a progress line to stderr, prefixed with the program's name
/// (tables go to stdout).
#[macro_export]
macro_rules! note {
    ($($t:tt)*) => { $crate::load::note_line(::std::format_args!($($t)*)) };
}

/// The line behind [`note!`].
pub fn note_line(msg: std::fmt::Arguments<'_>) {
    let prog = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "load".into());
    eprintln!("{prog}: {msg}");
}

/// Storage backend of the server under load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// The embedded SQLite database in the data directory.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

impl Backend {
    /// The name used in tables.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

/// Raise the soft open-file limit to the hard limit; (soft, hard) after.
/// Servers started afterwards inherit the limit.
pub fn raise_nofile_limit() -> Result<(u64, u64)> {
    rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    rlimit::getrlimit(rlimit::Resource::NOFILE).context("reading RLIMIT_NOFILE")
}

/// Options both load generators share (`#[command(flatten)]` into their own).
#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// Storage backend of the node under load.
    #[arg(long, value_enum)]
    pub backend: Backend,
    /// PostgreSQL URL of an EMPTY database for the node (postgres only).
    /// Without it, a fresh database is created next to the one
    /// MABE_TEST_DATABASE_URL names (as `scripts/with-postgres` exports it)
    /// and dropped afterwards.
    #[arg(long)]
    pub database_url: Option<String>,
    /// Measured calls per phase.
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Calls kept in flight at once (default: all of them).
    #[arg(long, default_value_t = 10_000)]
    pub in_flight: usize,
    /// HTTP/2 connections the measured calls are spread over (round-robin).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Passed to `serve --request-timeout` (default: the server's own, 30 s).
    #[arg(long)]
    pub request_timeout: Option<u64>,
    /// The server's log filter; its log goes to a file that is printed if
    /// the run fails.
    #[arg(long, default_value = "warn")]
    pub server_log: String,
    /// This tool's own log filter (e.g. `h2=debug`), to stderr; off by
    /// default. It shows why the client side of a connection closed.
    #[arg(long)]
    pub client_log: Option<String>,
}

impl LoadArgs {
    /// Refuse zero counts, and install `--client-log` if given.
    pub fn check(&self) -> Result<()> {
        ensure!(self.requests > 0, "--requests must be at least 1");
        ensure!(self.in_flight > 0, "--in-flight must be at least 1");
        ensure!(self.connections > 0, "--connections must be at least 1");
        if let Some(filter) = &self.client_log {
            client_log(filter)?;
        }
        Ok(())
    }

    /// The node's PostgreSQL database (`None` for SQLite): `--database-url`,
    /// or a fresh database named after `prefix`, dropped afterwards.
    pub async fn database(&self, prefix: &str, deadline: Instant) -> Result<Option<PgDb>> {
        Ok(match self.backend {
            Backend::Sqlite => {
                ensure!(
                    self.database_url.is_none(),
                    "--database-url is for --backend postgres"
                );
                None
            }
            Backend::Postgres => Some(match &self.database_url {
                Some(url) => PgDb::existing(url.clone()),
                None => PgDb::fresh(prefix, deadline).await?,
            }),
        })
    }

    /// Print the latency table of `rows`, then their CPU table if any
    /// (`per_request`: with the per-request columns).
    pub fn print_tables(&self, rows: &[Outcome], per_request: bool) {
        println!("{}", table_header());
        for r in rows {
            println!("{}", r.markdown(self.backend));
        }
        let cpu = cpu_table(self.backend, rows, per_request);
        if !cpu.is_empty() {
            println!();
            print!("{cpu}");
        }
    }
}

/// Send this process's own `tracing` output (h2, hyper, tonic) to stderr,
/// filtered by `filter` (`RUST_LOG` syntax, e.g. `h2=debug`).
///
/// ```
/// mabe_benches::load::client_log("warn").unwrap();
/// ```
pub fn client_log(filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("log filter {filter:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| anyhow!("installing the log subscriber: {e}"))
}

/// Raise the open-file limit and check it covers `connections` TLS
/// connections (one socket on each side) with a margin.
pub fn ensure_nofile_for(connections: usize) -> Result<()> {
    let (soft, hard) = raise_nofile_limit()?;
    note!("open-file limit {soft} (hard {hard})");
    let needed = 2 * (2 * connections as u64 + 2) + 64;
    ensure!(
        soft >= needed,
        "the open-file limit ({soft}) is too low for {connections} connections: lower --connections"
    );
    Ok(())
}

/// A workspace binary: `explicit` if given, else `name` next to this
/// executable (both are built into the same target directory).
pub fn sibling_bin(name: &str, explicit: Option<&Path>, package: &str) -> Result<PathBuf> {
    let bin = match explicit {
        Some(b) => b.to_path_buf(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .ok_or_else(|| anyhow!("this executable has no parent directory"))?
            .join(format!("{name}{}", std::env::consts::EXE_SUFFIX)),
    };
    ensure!(
        bin.is_file(),
        "{} does not exist: build it with `cargo build --release -p {package} --bin {name}` or name it explicitly",
        bin.display()
    );
    Ok(bin)
}

/// Print the last lines of a server's log to stderr.
pub fn print_log(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    if !tail.is_empty() {
        note!("last lines of the server's log:\n{}", tail.join("\n"));
    }
}

// ---------------------------------------------------------------- PostgreSQL

/// A PostgreSQL database for the server under load.
#[derive(Debug)]
pub struct PgDb {
    /// Its URL.
    pub url: String,
    /// (admin URL, name) to drop it from afterwards; only for databases this
    /// tool created.
    drop_from: Option<(String, String)>,
}

impl PgDb {
    /// A database the caller provides (never dropped).
    pub fn existing(url: String) -> PgDb {
        PgDb {
            url,
            drop_from: None,
        }
    }

    /// Create an empty database next to the one MABE_TEST_DATABASE_URL
    /// names (as `scripts/with-postgres` exports it); `prefix` starts its name.
    pub async fn fresh(prefix: &str, deadline: Instant) -> Result<PgDb> {
        let url = match std::env::var("MABE_TEST_DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => url,
            _ => bail!(
                "--backend postgres needs --database-url or MABE_TEST_DATABASE_URL \
                 (run the tool through `scripts/with-postgres`)"
            ),
        };
        let name = format!("{prefix}_{:016x}", OsRng.next_u64());
        let created = async {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .with_context(|| format!("connecting to MABE_TEST_DATABASE_URL {url}"))?;
            let conn = tokio::spawn(conn);
            client
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .with_context(|| format!("creating database {name}"))?;
            drop(client);
            let _ = conn.await;
            anyhow::Ok(())
        };
        timeout_at(deadline, created)
            .await
            .map_err(|_| anyhow!("deadline passed while creating the database"))??;
        let Some((base, _)) = url.rsplit_once('/') else {
            bail!("MABE_TEST_DATABASE_URL has no database name: {url}");
        };
        Ok(PgDb {
            url: format!("{base}/{name}"),
            drop_from: Some((url.clone(), name)),
        })
    }

    /// Drop the database if this tool created it (bounded; failures are
    /// reported, not fatal).
    pub async fn drop_database(&self) {
        let Some((admin_url, name)) = &self.drop_from else {
            return;
        };
        let dropped = async {
            let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(conn);
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await?;
            drop(client);
            let _ = conn.await;
            Ok::<(), tokio_postgres::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(30), dropped).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => note!("could not drop database {name}: {e}"),
            Err(_) => note!("could not drop database {name}: timed out"),
        }
    }
}

// -------------------------------------------------------------------- server

/// Run a CLI command that must succeed (before the deadline); its stdout.
pub async fn run_cli(mut cmd: Command, what: &str, deadline: Instant) -> Result<String> {
    let out = timeout_at(deadline, cmd.output())
        .await
        .map_err(|_| anyhow!("deadline passed during `{what}`"))?
        .with_context(|| format!("running `{what}`"))?;
    ensure!(
        out.status.success(),
        "`{what}` failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running `serve` child process; killed if dropped before [`Server::stop`].
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub child: Child,
    /// Kept open so the server never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
    /// Public listener.
    pub public: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
}

impl Server {
    /// Spawn `cmd` (a `serve` command listening on loopback ports chosen by
    /// the system), its stderr into `log`, and wait for the first stdout line
    /// `serving ID on ADDR (admin ADDR)`.
    pub async fn start(mut cmd: Command, log: &Path, deadline: Instant) -> Result<Server> {
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(log).context("creating the server log")?)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the server")?;
        let mut stdout = BufReader::new(
            child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("serve has no stdout"))?,
        );
        let mut line = String::new();
        let read = timeout_at(
            deadline.min(Instant::now() + Duration::from_secs(60)),
            stdout.read_line(&mut line),
        )
        .await;
        let addrs: Vec<SocketAddr> = line
            .split_whitespace()
            .filter_map(|t| t.trim_matches(|c| c == '(' || c == ')').parse().ok())
            .collect();
        match (read, addrs.as_slice()) {
            (Ok(Ok(_)), &[public, admin]) => Ok(Server {
                child,
                _stdout: stdout,
                public,
                admin,
            }),
            _ => {
                let _ = child.kill().await;
                print_log(log);
                bail!("serve did not start (stdout {line:?})");
            }
        }
    }

    /// SIGTERM (a graceful stop), then wait for a clean exit (bounded).
    pub async fn stop(&mut self) -> Result<()> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow!("the server already exited"))?;
        let sent = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .context("running kill")?;
        ensure!(sent.success(), "could not signal the server (pid {pid})");
        // Bounded on its own: the server is stopped even past the deadline.
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => {
                let status = status.context("waiting for the server")?;
                ensure!(status.success(), "the server exited with {status}");
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                bail!("the server did not stop within 60 s of SIGTERM")
            }
        }
    }
}

/// `n` TLS connections to `addr` (each tonic `Channel` is one HTTP/2
/// connection), trusting the PEM certificate `cert` for `localhost`.
pub async fn connect(
    cert: &[u8],
    addr: SocketAddr,
    n: usize,
    deadline: Instant,
) -> Result<Vec<Channel>> {
    ensure!(
        addr.ip().is_loopback(),
        "refusing a non-loopback address {addr}"
    );
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(cert))
                .domain_name("localhost"),
        )?
        .connect_timeout(Duration::from_secs(20));
    let mut set = JoinSet::new();
    for _ in 0..n {
        let e = endpoint.clone();
        set.spawn(async move { e.connect().await });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(c) = timeout_at(deadline, set.join_next())
        .await
        .map_err(|_| anyhow!("deadline passed while connecting to {addr}"))?
    {
        out.push(c?.with_context(|| format!("TLS connection to {addr}"))?);
    }
    Ok(out)
}

/// Run `calls` setup calls (call `i` is built by `call(i)`) with at most
/// `in_flight` outstanding, before `deadline`; their results in order.
pub async fn setup_calls<T, E, F, Fut>(
    what: &str,
    calls: usize,
    in_flight: usize,
    deadline: Instant,
    mut call: F,
) -> Result<Vec<T>>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T, E>> + Send + 'static,
{
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(in_flight.max(1)));
    let mut set = JoinSet::new();
    for i in 0..calls {
        let gate = Arc::clone(&gate);
        let fut = call(i);
        set.spawn(async move {
            let _permit = gate.acquire_owned().await;
            (i, fut.await)
        });
    }
    let mut out: Vec<Option<T>> = (0..calls).map(|_| None).collect();
    loop {
        let next = match timeout_at(deadline, set.join_next()).await {
            Ok(next) => next,
            Err(_) => {
                set.abort_all();
                bail!("deadline passed during setup ({what})");
            }
        };
        let Some(done) = next else { break };
        let (i, r) = done.context("a setup task failed")?;
        let v = r.map_err(|e| anyhow!("{what} #{i}: {e}"))?;
        if let Some(slot) = out.get_mut(i) {
            *slot = Some(v);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    note!(
        "setup: {calls} {what} in {secs:.1} s ({:.0}/s)",
        calls as f64 / secs.max(1e-9)
    );
    out.into_iter()
        .map(|v| v.ok_or_else(|| anyhow!("{what}: a call returned nothing")))
        .collect()
}

/// A gRPC status as `Code: message`.
pub fn why(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

// ----------------------------------------------------------------- measuring

/// One measured phase.
#[derive(Debug)]
pub struct Outcome {
    /// Scenario name (a table column).
    pub scenario: String,
    /// Calls made.
    pub requests: usize,
    /// Calls kept in flight at once.
    pub in_flight: usize,
    /// HTTP/2 connections used.
    pub connections: usize,
    /// Failed calls (and calls cut off by the deadline).
    pub errors: usize,
    /// Whether the deadline passed with calls in flight.
    pub timed_out: bool,
    /// Wall time from opening the gate to the last answer.
    pub wall: Duration,
    /// Latency of the successful calls, in microseconds.
    pub hist: Histogram<u64>,
    /// Failed checks after the phase.
    pub check_failures: Vec<String>,
    /// CPU used during the phase (Linux only).
    pub cpu: Option<CpuUse>,
}

impl Outcome {
    /// No error, no deadline, no failed check.
    pub fn passed(&self) -> bool {
        self.errors == 0 && !self.timed_out && self.check_failures.is_empty()
    }

    /// A row of [`table_header`].
    pub fn markdown(&self, backend: Backend) -> String {
        let ms = |us: f64| format!("{:.1}", us / 1000.0);
        let h = &self.hist;
        let secs = self.wall.as_secs_f64();
        let mut errors = self.errors.to_string();
        if self.timed_out {
            errors.push_str(" (deadline)");
        }
        let mut row = format!(
            "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0} |",
            backend.name(),
            self.scenario,
            self.requests,
            self.in_flight,
            self.connections,
            errors,
            secs,
            h.len() as f64 / secs.max(1e-9),
        );
        if h.is_empty() {
            row.push_str(" – | – | – | – | – |");
        } else {
            for v in [
                h.mean(),
                h.value_at_quantile(0.50) as f64,
                h.value_at_quantile(0.95) as f64,
                h.value_at_quantile(0.99) as f64,
                h.max() as f64,
            ] {
                let _ = write!(row, " {} |", ms(v));
            }
        }
        row
    }
}

/// The header of the latency table.
pub fn table_header() -> &'static str {
    "| backend | scenario | requests | in flight | connections | errors | wall (s) | throughput (req/s) | mean (ms) | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |\n\
     |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
}

/// CPU counters from /proc (Linux): the machine's busy and total time, and
/// the CPU time of this process and of the server process, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    busy: f64,
    total: f64,
    client: f64,
    server: f64,
}

/// CPU used during a phase.
#[derive(Clone, Copy, Debug)]
pub struct CpuUse {
    /// Busy share of all cores, 0..=1 (database and other processes included).
    pub machine_busy: f64,
    /// Busy CPU seconds of the whole machine.
    pub machine_busy_secs: f64,
    /// CPU seconds of the load generator.
    pub client: f64,
    /// CPU seconds of the `serve` process.
    pub server: f64,
}

/// /proc reports times in USER_HZ, which is 100 on Linux.
const USER_HZ: f64 = 100.0;

/// utime + stime of a process, in seconds.
fn process_cpu(stat: &str) -> Option<f64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field 3 (state) comes first after the command name; utime is field 14.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// CPU seconds of each thread group of process `pid` (Linux): threads are
/// grouped by name with trailing digits and dashes removed (`sqlite-reader-3`
/// counts as `sqlite-reader`). Empty if /proc cannot be read.
pub fn thread_cpu(pid: u32) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, rest)| rest.rsplit_once(')'))
            .map(|(name, _)| name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-'))
            .unwrap_or("?")
            .to_owned();
        if let Some(secs) = process_cpu(&stat) {
            *out.entry(name).or_insert(0.0) += secs;
        }
    }
    out
}

/// Sample the counters (`None` off Linux or if the server is gone).
pub fn cpu_sample(server: Option<u32>) -> Option<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let total: f64 = cpu.iter().take(8).sum();
    let idle = cpu.get(3)? + cpu.get(4)?;
    let client = process_cpu(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let server = process_cpu(&std::fs::read_to_string(format!("/proc/{}/stat", server?)).ok()?)?;
    Some(CpuSample {
        busy: (total - idle) / USER_HZ,
        total: total / USER_HZ,
        client,
        server,
    })
}

/// CPU used between two samples.
pub fn cpu_use(before: Option<CpuSample>, after: Option<CpuSample>) -> Option<CpuUse> {
    let (b, a) = (before?, after?);
    let total = a.total - b.total;
    (total > 0.0).then(|| CpuUse {
        machine_busy: (a.busy - b.busy) / total,
        machine_busy_secs: a.busy - b.busy,
        client: a.client - b.client,
        server: a.server - b.server,
    })
}

/// Send `calls` (built beforehand) with at most `in_flight` outstanding:
/// every task is spawned first, then the gate opens. Each call is timed from
/// just before it is sent to its end (the future's completion, which
/// includes whatever checks the future makes); a call that returns `Err`
/// counts as an error. Returns the outcome and the successful results with
/// their call index.
pub async fn measure<T, Fut>(
    scenario: &str,
    calls: Vec<Fut>,
    in_flight: usize,
    connections: usize,
    deadline: Instant,
    server_pid: Option<u32>,
) -> Result<(Outcome, Vec<(usize, T)>)>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, String>> + Send + 'static,
{
    let requests = calls.len();
    let gate = Arc::new(Semaphore::new(0));
    let mut set = JoinSet::new();
    for (i, call) in calls.into_iter().enumerate() {
        let gate = Arc::clone(&gate);
        set.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let t0 = Instant::now();
            let r = call.await;
            (i, t0.elapsed(), r)
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut errors = 0;
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    let mut ok = Vec::with_capacity(requests);
    let cpu_before = cpu_sample(server_pid);
    let threads_before = server_pid.map(thread_cpu).unwrap_or_default();
    let started = Instant::now();
    gate.add_permits(in_flight.clamp(1, Semaphore::MAX_PERMITS));
    let mut timed_out = false;
    loop {
        let next = match timeout_at(deadline, set.join_next()).await {
            Ok(next) => next,
            Err(_) => {
                timed_out = true;
                errors += set.len();
                set.abort_all();
                break;
            }
        };
        let Some(done) = next else { break };
        let (i, took, r) = done.context("a client task failed")?;
        match r {
            Ok(v) => {
                hist.saturating_record(u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1));
                ok.push((i, v));
            }
            Err(e) => {
                errors += 1;
                let n = by_kind.entry(e.clone()).or_default();
                *n += 1;
                if errors <= SHOWN_ERRORS {
                    note!("{scenario} call {i} failed after {took:.1?}: {e}");
                }
            }
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_use(cpu_before, cpu_sample(server_pid));
    let threads_after = server_pid.map(thread_cpu).unwrap_or_default();
    // Threads that exited during the phase are missing from `after`: only
    // report groups that exist in both samples.
    let by_thread: Vec<String> = threads_after
        .iter()
        .filter_map(|(name, after)| {
            let used = after - threads_before.get(name)?;
            (used >= 0.005).then(|| format!("{name} {used:.2} s"))
        })
        .collect();
    if !by_thread.is_empty() {
        note!("{scenario}: server CPU by thread: {}", by_thread.join(", "));
    }
    if let Some(c) = cpu {
        note!(
            "{scenario}: CPU during the phase: machine {:.0}% busy ({} cores), server {:.2} s, load generator {:.2} s",
            c.machine_busy * 100.0,
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            c.server,
            c.client
        );
    }
    if timed_out {
        note!("{scenario}: DEADLINE PASSED with calls still in flight");
    }
    for (e, n) in &by_kind {
        note!("{scenario}: {n} × {e}");
    }
    Ok((
        Outcome {
            scenario: scenario.to_owned(),
            requests,
            in_flight: in_flight.min(requests),
            connections,
            errors,
            timed_out,
            wall,
            hist,
            check_failures: Vec::new(),
            cpu,
        },
        ok,
    ))
}

/// The CPU table of `rows` (those with a measurement): the machine's busy
/// share and the CPU seconds of the server and the load generator; with
/// `per_request`, also the rest of the machine (the database, other
/// processes) and each process's CPU milliseconds per request.
pub fn cpu_table(backend: Backend, rows: &[Outcome], per_request: bool) -> String {
    let mut out = String::new();
    if !rows.iter().any(|r| r.cpu.is_some()) {
        return out;
    }
    if per_request {
        out.push_str(
            "| backend | scenario | machine CPU busy | server CPU (s) | load generator CPU (s) | rest of machine CPU (s) | server CPU / request (ms) | load generator CPU / request (ms) |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n",
        );
    } else {
        out.push_str(
            "| backend | scenario | machine CPU busy | server CPU (s) | load generator CPU (s) |\n\
             |---|---|---:|---:|---:|\n",
        );
    }
    for r in rows {
        let Some(c) = r.cpu else { continue };
        let _ = write!(
            out,
            "| {} | {} | {:.0}% | {:.2} | {:.2} |",
            backend.name(),
            r.scenario,
            c.machine_busy * 100.0,
            c.server,
            c.client
        );
        if per_request {
            let n = r.requests.max(1) as f64;
            let _ = write!(
                out,
                " {:.2} | {:.3} | {:.3} |",
                (c.machine_busy_secs - c.server - c.client).max(0.0),
                c.server * 1000.0 / n,
                c.client * 1000.0 / n
            );
        }
        out.push('\n');
    }
    out
}
