//! `mabe-loadgen`: load generator for one `mabe-authority` node.
//!
//! It sets up a throwaway authority with the real binary (`init`, one
//! attribute per scenario, people enrolled and granted over the signed admin
//! gRPC API), starts `serve` on loopback as a child process, and then keeps
//! N calls in flight against it, spread over several HTTP/2 connections (one
//! tonic `Channel` each). It measures each call from just before it is sent
//! to its response, and prints a markdown table row per scenario: requests,
//! errors, wall time, throughput, mean, p50, p95, p99 and max latency.
//!
//! Scenarios:
//! - `fetch`: `FetchKeys` of one granted attribute, signed by the person's
//!   request key, each with a fresh nonce;
//! - `decide`: `DecideRequest` (approve and deny alternately) on attribute
//!   requests filed beforehand (the filing is setup, not measured).
//!
//! Bounded: traffic goes to 127.0.0.1 only, the number of calls is fixed,
//! and every phase shares one deadline (`--max-seconds`); the tool exits
//! non-zero if any call fails, a check fails or the deadline passes. It
//! raises its open-file limit to the hard limit first (the server, its
//! child, inherits it).
//!
//! ```text
//! cargo build --release -p mabe-benches --bin mabe-loadgen -p mabe-authority
//! target/release/mabe-loadgen --backend sqlite --scenario both
//! scripts/with-postgres target/release/mabe-loadgen --backend postgres --scenario both
//! ```

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ark_std::rand::{RngCore, rngs::OsRng};
use clap::{Parser, ValueEnum};
use ed25519_dalek::{Signer, SigningKey};
use hdrhistogram::Histogram;
use mabe_abe::{AttributePublicKey, Gid, UserKey, UserKeyRing};
use mabe_authority::{admin_client::signed, datadir::DataDir, node::now};
use mabe_proto::{
    signing::{Directory, attribute_request_message, key_request_message},
    v1::{
        AttributeRequest, DecideRequestRequest, EnrollRequest, GetDirectoryRequest, GrantRequest,
        KeyRequest, ListRequestsRequest, authority_admin_client::AuthorityAdminClient,
        authority_client::AuthorityClient,
    },
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, ChildStdout, Command},
    sync::Semaphore,
    task::JoinSet,
    time::{Instant, timeout_at},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const AUTHORITY: &str = "hospital-a";
const REGISTRY: &str = "big-register";
/// Granted to every person; fetched in the `fetch` scenario.
const FETCHED: &str = "cardiology";
/// Requested by every person and decided in the `decide` scenario.
const REQUESTED: &str = "research";
const ADMIN: &str = "/mabe.v1.AuthorityAdmin/";
/// Failed calls whose message is printed (the rest are only counted).
const SHOWN_ERRORS: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Key fetches of one attribute each.
    Fetch,
    /// Approve/deny decisions on filed attribute requests.
    Decide,
    /// `fetch`, then `decide`, against the same node.
    Both,
}

/// Load generator for one mabe authority node (loopback only, bounded).
#[derive(Parser, Debug)]
#[command(name = "mabe-loadgen", version)]
struct Args {
    /// Storage backend of the node under load.
    #[arg(long, value_enum)]
    backend: Backend,
    /// PostgreSQL URL of an EMPTY database for the node (postgres only).
    /// Without it, a fresh database is created next to the one
    /// MABE_TEST_DATABASE_URL names (as `scripts/with-postgres` exports) and
    /// dropped afterwards.
    #[arg(long)]
    database_url: Option<String>,
    /// What to measure.
    #[arg(long, value_enum, default_value = "both")]
    scenario: Scenario,
    /// Measured calls per scenario.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Calls kept in flight at once (default: all of them).
    #[arg(long, default_value_t = 10_000)]
    in_flight: usize,
    /// HTTP/2 connections the measured calls are spread over (round-robin).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// People enrolled (default: one per measured call); each makes
    /// requests/people calls, every fetch with its own nonce.
    #[arg(long)]
    people: Option<usize>,
    /// Calls in flight during setup (enrollment, grants, filing requests).
    #[arg(long, default_value_t = 256)]
    setup_in_flight: usize,
    /// The `mabe-authority` binary (default: the one next to this executable).
    #[arg(long)]
    authority_bin: Option<PathBuf>,
    /// Deadline for the whole run, setup and checks included, in seconds.
    #[arg(long, default_value_t = 300)]
    max_seconds: u64,
    /// Passed to `serve --request-timeout` (default: the server's own, 30 s).
    #[arg(long)]
    request_timeout: Option<u64>,
    /// Fetched keys checked with the pairing check after the fetch phase.
    #[arg(long, default_value_t = 50)]
    verify_keys: usize,
    /// The server's log filter (MABE_LOG); its log goes to a file that is
    /// printed if the run fails.
    #[arg(long, default_value = "warn")]
    server_log: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mabe-loadgen: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Progress and setup timings go to stderr; the table goes to stdout.
macro_rules! note {
    ($($t:tt)*) => { eprintln!("mabe-loadgen: {}", format!($($t)*)) };
}

/// Raise the soft open-file limit to the hard limit; (soft, hard) after.
fn raise_nofile_limit() -> Result<(u64, u64)> {
    rlimit::increase_nofile_limit(u64::MAX).context("raising RLIMIT_NOFILE")?;
    rlimit::getrlimit(rlimit::Resource::NOFILE).context("reading RLIMIT_NOFILE")
}

fn authority_bin(args: &Args) -> Result<PathBuf> {
    let bin = match &args.authority_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .parent()
            .ok_or_else(|| anyhow!("this executable has no parent directory"))?
            .join(format!("mabe-authority{}", std::env::consts::EXE_SUFFIX)),
    };
    ensure!(
        bin.is_file(),
        "{} does not exist: build it with `cargo build --release -p mabe-authority` or pass --authority-bin",
        bin.display()
    );
    Ok(bin)
}

/// Whether the run passed; the table is printed either way.
async fn run(args: &Args) -> Result<bool> {
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(args.in_flight > 0, "--in-flight must be at least 1");
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(
        args.setup_in_flight > 0,
        "--setup-in-flight must be at least 1"
    );
    let people = args.people.unwrap_or(args.requests).clamp(1, args.requests);
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let (soft, hard) = raise_nofile_limit()?;
    note!("open-file limit {soft} (hard {hard})");
    // Each connection is one socket here and one in the server (which
    // inherits this limit); keep a margin for the database and the runtime.
    let needed = 2 * (2 * args.connections as u64 + 2) + 64;
    ensure!(
        soft >= needed,
        "the open-file limit ({soft}) is too low for {} connections: lower --connections",
        args.connections
    );
    let bin = authority_bin(args)?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let db = match args.backend {
        Backend::Sqlite => {
            ensure!(
                args.database_url.is_none(),
                "--database-url is for --backend postgres"
            );
            None
        }
        Backend::Postgres => Some(match &args.database_url {
            Some(url) => PgDb {
                url: url.clone(),
                drop_from: None,
            },
            None => fresh_database(deadline).await?,
        }),
    };
    let node = Authority {
        bin,
        dir: tmp.path().join("data"),
        db: db.as_ref().map(|d| d.url.clone()),
    };
    let result = drive(args, &node, people, tmp.path(), deadline).await;
    if let Some(db) = &db {
        db.drop_database().await;
    }
    let (rows, ok) = result?;
    println!("{}", table_header());
    for r in &rows {
        println!("{}", r.markdown(args.backend));
    }
    if rows.iter().any(|r| r.cpu.is_some()) {
        println!();
        println!(
            "| backend | scenario | machine CPU busy | server CPU (s) | load generator CPU (s) |\n|---|---|---:|---:|---:|"
        );
        for r in &rows {
            if let Some(c) = r.cpu {
                println!(
                    "| {} | {} | {:.0}% | {:.2} | {:.2} |",
                    args.backend.name(),
                    r.scenario,
                    c.machine_busy * 100.0,
                    c.server,
                    c.client
                );
            }
        }
    }
    Ok(ok)
}

/// Setup, the measured phases and the checks, with the server running.
async fn drive(
    args: &Args,
    node: &Authority,
    people: usize,
    tmp: &Path,
    deadline: Instant,
) -> Result<(Vec<Outcome>, bool)> {
    let started = Instant::now();
    let out = node
        .cli(&["init", "--authority-id", AUTHORITY], deadline)
        .await?;
    ensure!(out.contains("initialised authority"), "init said: {out}");
    let scenarios: &[Scenario] = match args.scenario {
        Scenario::Both => &[Scenario::Fetch, Scenario::Decide],
        Scenario::Fetch => &[Scenario::Fetch],
        Scenario::Decide => &[Scenario::Decide],
    };
    for s in scenarios {
        let attr = match s {
            Scenario::Decide => REQUESTED,
            _ => FETCHED,
        };
        node.cli(&["attribute", "create", attr], deadline).await?;
    }
    let data = DataDir::new(&node.dir);
    let admin_key = data.admin_key()?;
    let cert = std::fs::read(data.tls_cert()).context("reading the dev TLS certificate")?;

    let log = tmp.join("server.log");
    let mut server = node
        .serve(args.request_timeout, &args.server_log, &log, deadline)
        .await?;
    note!(
        "{} node serving on {} (admin {}), init {:.1?}",
        args.backend.name(),
        server.public,
        server.admin,
        started.elapsed()
    );
    let result = async {
        let publics = connect(&cert, server.public, args.connections, deadline).await?;
        let admins = connect(&cert, server.admin, args.connections, deadline).await?;
        let ctx = Ctx {
            publics,
            admins,
            admin_key: Arc::new(admin_key),
            server_pid: server.child.id(),
            setup_in_flight: args.setup_in_flight,
            deadline,
        };
        let persons = enroll(&ctx, people, scenarios.contains(&Scenario::Fetch)).await?;
        let mut rows = Vec::new();
        for s in scenarios {
            rows.push(match s {
                Scenario::Fetch => fetch_scenario(&ctx, args, &persons).await?,
                _ => decide_scenario(&ctx, args, &persons).await?,
            });
        }
        anyhow::Ok(rows)
    }
    .await;
    let stopped = server.stop().await;
    let rows = match (result, stopped) {
        (Ok(rows), Ok(())) => rows,
        (Err(e), _) | (Ok(_), Err(e)) => {
            print_log(&log);
            return Err(e);
        }
    };
    // The chain of every write made under load verifies.
    let out = node.cli(&["audit", "verify"], deadline).await;
    let mut ok = rows.iter().all(Outcome::passed);
    match out {
        Ok(out) if out.contains("audit log verifies") => {
            note!("audit verify: {}", out.lines().next().unwrap_or_default());
        }
        Ok(out) => {
            note!("audit verify FAILED:\n{out}");
            ok = false;
        }
        Err(e) => {
            note!("audit verify FAILED: {e:#}");
            ok = false;
        }
    }
    if !ok {
        print_log(&log);
    }
    note!("total {:.1?}", started.elapsed());
    Ok((rows, ok))
}

fn print_log(log: &Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    if !tail.is_empty() {
        note!("last lines of the server's log:\n{}", tail.join("\n"));
    }
}

// ------------------------------------------------------------------ the node

/// A PostgreSQL database for the node; `drop_from`: the URL to drop it from
/// afterwards (only for databases this tool created).
struct PgDb {
    url: String,
    drop_from: Option<(String, String)>,
}

impl PgDb {
    async fn drop_database(&self) {
        let Some((admin_url, name)) = &self.drop_from else {
            return;
        };
        let dropped = async {
            let (client, conn) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
            let conn = tokio::spawn(conn);
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
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

/// Create an empty database next to the one MABE_TEST_DATABASE_URL names.
async fn fresh_database(deadline: Instant) -> Result<PgDb> {
    let url = match std::env::var("MABE_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => bail!(
            "--backend postgres needs --database-url or MABE_TEST_DATABASE_URL \
             (run it as `scripts/with-postgres target/release/mabe-loadgen --backend postgres`)"
        ),
    };
    let name = format!("mabe_load_{:016x}", OsRng.next_u64());
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

/// The `mabe-authority` binary with this run's data directory and database.
struct Authority {
    bin: PathBuf,
    dir: PathBuf,
    db: Option<String>,
}

impl Authority {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--data-dir").arg(&self.dir);
        if let Some(db) = &self.db {
            c.arg("--database-url").arg(db);
        }
        c.env_remove("MABE_KEK")
            .env_remove("MABE_DATABASE_URL")
            .env_remove("MABE_AUTHORITY_DIR")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Run a CLI command that must succeed (before the deadline); its stdout.
    async fn cli(&self, args: &[&str], deadline: Instant) -> Result<String> {
        let out = timeout_at(deadline, self.command().args(args).output())
            .await
            .map_err(|_| anyhow!("deadline passed during `mabe-authority {}`", args.join(" ")))?
            .with_context(|| format!("running {}", self.bin.display()))?;
        ensure!(
            out.status.success(),
            "`mabe-authority {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Start `serve` on loopback ports chosen by the system.
    async fn serve(
        &self,
        request_timeout: Option<u64>,
        log_filter: &str,
        log: &Path,
        deadline: Instant,
    ) -> Result<Server> {
        let mut c = self.command();
        c.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        if let Some(t) = request_timeout {
            c.arg("--request-timeout").arg(t.to_string());
        }
        let mut child = c
            .env("MABE_LOG", log_filter)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).context("creating the server log")?)
            .spawn()
            .with_context(|| format!("starting {} serve", self.bin.display()))?;
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
        // "serving hospital-a on 127.0.0.1:P (admin 127.0.0.1:Q)"
        let addrs: Vec<SocketAddr> = line
            .split_whitespace()
            .filter_map(|t| t.trim_matches(|c| c == '(' || c == ')').parse().ok())
            .collect();
        if !matches!(read, Ok(Ok(_))) || addrs.len() != 2 {
            let _ = child.kill().await;
            print_log(log);
            bail!("serve did not start (stdout {line:?})");
        }
        Ok(Server {
            child,
            _stdout: stdout,
            public: addrs[0],
            admin: addrs[1],
        })
    }
}

/// A running `serve`; killed if dropped before [`Server::stop`].
struct Server {
    child: Child,
    /// Kept open so the server never writes to a closed pipe.
    _stdout: BufReader<ChildStdout>,
    public: SocketAddr,
    admin: SocketAddr,
}

impl Server {
    /// SIGTERM (a graceful stop), then wait for a clean exit (bounded).
    async fn stop(&mut self) -> Result<()> {
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

/// `n` TLS connections to `addr` (each tonic `Channel` is one HTTP/2 connection).
async fn connect(
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

// --------------------------------------------------------------------- setup

struct Ctx {
    publics: Vec<Channel>,
    admins: Vec<Channel>,
    admin_key: Arc<SigningKey>,
    setup_in_flight: usize,
    deadline: Instant,
    server_pid: Option<u32>,
}

impl Ctx {
    fn public(&self, i: usize) -> AuthorityClient<Channel> {
        AuthorityClient::new(self.publics[i % self.publics.len()].clone())
    }
    fn admin(&self, i: usize) -> AuthorityAdminClient<Channel> {
        AuthorityAdminClient::new(self.admins[i % self.admins.len()].clone())
    }
}

struct Person {
    gid: [u8; 32],
    key: SigningKey,
}

fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; 16];
    OsRng.fill_bytes(&mut n);
    n
}

/// Run `calls` setup calls with `ctx.setup_in_flight` in flight; their results.
async fn setup_calls<T, F, Fut>(ctx: &Ctx, what: &str, calls: usize, mut call: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>> + Send + 'static,
{
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(ctx.setup_in_flight));
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
        let next = match timeout_at(ctx.deadline, set.join_next()).await {
            Ok(next) => next,
            Err(_) => {
                set.abort_all();
                bail!("deadline passed during setup ({what})");
            }
        };
        let Some(done) = next else { break };
        let (i, r) = done.context("a setup task failed")?;
        let v = r.map_err(|s| anyhow!("{what} #{i}: {:?}: {}", s.code(), s.message()))?;
        out[i] = Some(v);
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

/// Enroll `n` people over the admin API (and grant them the fetched
/// attribute if `grant`).
async fn enroll(ctx: &Ctx, n: usize, grant: bool) -> Result<Arc<Vec<Person>>> {
    let keys: Vec<SigningKey> = (0..n)
        .map(|_| {
            let mut seed = [0u8; 32];
            OsRng.fill_bytes(&mut seed);
            SigningKey::from_bytes(&seed)
        })
        .collect();
    let admin_key = Arc::clone(&ctx.admin_key);
    let enrolled = setup_calls(ctx, "enrollments", n, |i| {
        let mut client = ctx.admin(i);
        let req = signed(
            EnrollRequest {
                registry: REGISTRY.into(),
                subject: format!("load-{i:06}"),
                request_key: keys[i].verifying_key().to_bytes().to_vec(),
                roles: Vec::new(),
            },
            AUTHORITY,
            &format!("{ADMIN}Enroll"),
            &admin_key,
        );
        async move { Ok(client.enroll(req).await?.into_inner().gid) }
    })
    .await?;
    let mut persons = Vec::with_capacity(n);
    for (i, (gid, key)) in enrolled.into_iter().zip(keys).enumerate() {
        let gid: [u8; 32] = gid
            .try_into()
            .map_err(|_| anyhow!("enrollment {i} returned a GID that is not 32 bytes"))?;
        let expected = Gid::derive(REGISTRY, &format!("load-{i:06}"))?;
        ensure!(
            gid == *expected.as_bytes(),
            "enrollment {i}: unexpected GID"
        );
        persons.push(Person { gid, key });
    }
    if grant {
        setup_calls(ctx, "grants", n, |i| {
            let mut client = ctx.admin(i);
            let req = signed(
                GrantRequest {
                    gid: persons[i].gid.to_vec(),
                    attribute: FETCHED.into(),
                    expires_at: 0,
                },
                AUTHORITY,
                &format!("{ADMIN}Grant"),
                &admin_key,
            );
            async move { client.grant(req).await.map(|_| ()) }
        })
        .await?;
    }
    Ok(Arc::new(persons))
}

// ------------------------------------------------------------------ measuring

/// One measured phase.
struct Outcome {
    scenario: &'static str,
    requests: usize,
    in_flight: usize,
    connections: usize,
    errors: usize,
    timed_out: bool,
    wall: Duration,
    /// Latency of the successful calls, in microseconds.
    hist: Histogram<u64>,
    /// Failed checks after the phase.
    check_failures: Vec<String>,
    /// CPU used during the phase (Linux only).
    cpu: Option<CpuUse>,
}

impl Outcome {
    fn passed(&self) -> bool {
        self.errors == 0 && !self.timed_out && self.check_failures.is_empty()
    }

    fn markdown(&self, backend: Backend) -> String {
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

fn table_header() -> &'static str {
    "| backend | scenario | requests | in flight | connections | errors | wall (s) | throughput (req/s) | mean (ms) | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |\n\
     |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
}

/// CPU counters from /proc (Linux): the machine's busy and total time, and
/// the CPU time of this process and of the server process, in seconds.
#[derive(Clone, Copy, Debug)]
struct CpuSample {
    busy: f64,
    total: f64,
    client: f64,
    server: f64,
}

/// CPU used during a phase.
#[derive(Clone, Copy, Debug)]
struct CpuUse {
    /// Busy share of all cores, 0..=1 (database processes included).
    machine_busy: f64,
    /// CPU seconds of the load generator.
    client: f64,
    /// CPU seconds of the `serve` process.
    server: f64,
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

fn cpu_sample(server: Option<u32>) -> Option<CpuSample> {
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

fn cpu_use(before: Option<CpuSample>, after: Option<CpuSample>) -> Option<CpuUse> {
    let (b, a) = (before?, after?);
    let total = a.total - b.total;
    (total > 0.0).then(|| CpuUse {
        machine_busy: (a.busy - b.busy) / total,
        client: a.client - b.client,
        server: a.server - b.server,
    })
}

/// Send `calls` (built beforehand) with at most `in_flight` outstanding:
/// every task is spawned first, then the gate opens. Each call is timed from
/// just before it is sent to its response; `check` judges the response.
async fn measure<T, Fut>(
    scenario: &'static str,
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
    let started = Instant::now();
    gate.add_permits(in_flight.min(Semaphore::MAX_PERMITS));
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
            scenario,
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

fn why(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// `requests` key fetches of the one granted attribute, spread over the people.
async fn fetch_scenario(ctx: &Ctx, args: &Args, persons: &Arc<Vec<Person>>) -> Result<Outcome> {
    let attribute = format!("{FETCHED}@{AUTHORITY}");
    // The directory's public key, for checking a sample of the keys.
    let dir = ctx
        .public(0)
        .get_directory(GetDirectoryRequest {})
        .await
        .map_err(|s| anyhow!("GetDirectory: {}", why(&s)))?
        .into_inner();
    let dir = Directory::decode(&dir.body)?;
    let entry = dir
        .entries
        .iter()
        .find(|e| e.attribute == attribute && e.current)
        .ok_or_else(|| anyhow!("{attribute} is not in the directory"))?;
    let pk = AttributePublicKey::from_bytes(&entry.public_key)?;

    // Build (and sign) every request before the clock starts.
    let calls: Vec<_> = (0..args.requests)
        .map(|i| {
            let p = &persons[i % persons.len()];
            let attributes = vec![attribute.clone()];
            let n = nonce();
            let ts = now();
            let msg = key_request_message(AUTHORITY, &p.gid, &attributes, &n, ts);
            let req = KeyRequest {
                authority_id: AUTHORITY.into(),
                gid: p.gid.to_vec(),
                attributes,
                nonce: n,
                timestamp: ts,
                signature: p.key.sign(&msg).to_bytes().to_vec(),
            };
            let mut client = ctx.public(i);
            let want = attribute.clone();
            async move {
                let keys = client
                    .fetch_keys(req)
                    .await
                    .map_err(|s| why(&s))?
                    .into_inner()
                    .keys;
                match keys.as_slice() {
                    [k] if k.attribute == want && k.version == 1 => Ok(k.user_key.clone()),
                    _ => Err(format!(
                        "unexpected keys {:?}",
                        keys.iter()
                            .map(|k| (&k.attribute, k.version))
                            .collect::<Vec<_>>()
                    )),
                }
            }
        })
        .collect();
    note!(
        "fetch: {} calls by {} people, {} in flight over {} connections",
        args.requests,
        persons.len(),
        args.in_flight.min(args.requests),
        ctx.publics.len()
    );
    let (mut outcome, ok) = measure(
        "fetch",
        calls,
        args.in_flight,
        ctx.publics.len(),
        ctx.deadline,
        ctx.server_pid,
    )
    .await?;
    // The keys are real: a sample passes the pairing check.
    let step = (ok.len() / args.verify_keys.max(1)).max(1);
    let mut checked = 0;
    for (i, key) in ok.iter().step_by(step).take(args.verify_keys) {
        let p = &persons[i % persons.len()];
        let verified = UserKey::from_bytes(key).and_then(|k| {
            let mut ring = UserKeyRing::new(Gid::from_bytes(p.gid))?;
            ring.insert(k, &pk)
        });
        if let Err(e) = verified {
            outcome
                .check_failures
                .push(format!("fetch {i}: the key fails the pairing check: {e}"));
        }
        checked += 1;
    }
    note!("fetch: {checked} keys passed the pairing check");
    for f in &outcome.check_failures {
        note!("CHECK FAILED: {f}");
    }
    Ok(outcome)
}

/// File `requests` attribute requests (setup), then decide them all at once.
async fn decide_scenario(ctx: &Ctx, args: &Args, persons: &Arc<Vec<Person>>) -> Result<Outcome> {
    let attribute = format!("{REQUESTED}@{AUTHORITY}");
    let ids = setup_calls(ctx, "attribute requests", args.requests, |i| {
        let p = &persons[i % persons.len()];
        let n = nonce();
        let ts = now();
        let reason = format!("load test request {i}");
        let msg = attribute_request_message(AUTHORITY, &p.gid, &attribute, &reason, &n, ts);
        let req = AttributeRequest {
            authority_id: AUTHORITY.into(),
            gid: p.gid.to_vec(),
            attribute: attribute.clone(),
            reason,
            nonce: n,
            timestamp: ts,
            signature: p.key.sign(&msg).to_bytes().to_vec(),
        };
        let mut client = ctx.public(i);
        async move {
            let r = client.request_attribute(req).await?.into_inner();
            if r.state != "pending" {
                return Err(tonic::Status::internal(format!(
                    "request {} is {}",
                    r.request_id, r.state
                )));
            }
            Ok(r.request_id)
        }
    })
    .await?;
    let method = format!("{ADMIN}DecideRequest");
    let calls: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let approve = i % 2 == 0;
            let req = signed(
                DecideRequestRequest {
                    id,
                    approve,
                    note: "load test".into(),
                },
                AUTHORITY,
                &method,
                &ctx.admin_key,
            );
            let mut client = ctx.admin(i);
            let want = if approve { "approved" } else { "denied" };
            async move {
                let r = client
                    .decide_request(req)
                    .await
                    .map_err(|s| why(&s))?
                    .into_inner();
                if r.id == id && r.state == want {
                    Ok(())
                } else {
                    Err(format!(
                        "request {id}: {} {} (wanted {want})",
                        r.id, r.state
                    ))
                }
            }
        })
        .collect();
    note!(
        "decide: {} decisions, {} in flight over {} admin connections",
        calls.len(),
        args.in_flight.min(calls.len()),
        ctx.admins.len()
    );
    let (mut outcome, _) = measure(
        "approve/deny",
        calls,
        args.in_flight,
        ctx.admins.len(),
        ctx.deadline,
        ctx.server_pid,
    )
    .await?;
    // Every acknowledged decision is stored: none is left pending, and
    // exactly the even ones are approved.
    for (state, want) in [
        ("pending", 0),
        ("approved", ids.len().div_ceil(2)),
        ("denied", ids.len() / 2),
    ] {
        // ListRequests is paged: count every page.
        let (mut got, mut page_token) = (0, String::new());
        loop {
            let req = signed(
                ListRequestsRequest {
                    state: state.into(),
                    page_token: page_token.clone(),
                    page_size: 0,
                },
                AUTHORITY,
                &format!("{ADMIN}ListRequests"),
                &ctx.admin_key,
            );
            let page = timeout_at(ctx.deadline, ctx.admin(0).list_requests(req))
                .await
                .map_err(|_| anyhow!("deadline passed while listing requests"))?
                .map_err(|s| anyhow!("ListRequests: {}", why(&s)))?
                .into_inner();
            got += page.requests.len();
            if page.next_page_token.is_empty() || page.next_page_token == page_token {
                break;
            }
            page_token = page.next_page_token;
        }
        if outcome.passed() && got != want {
            outcome
                .check_failures
                .push(format!("{got} requests are {state}, expected {want}"));
        }
        note!("decide: {got} requests {state}");
    }
    for f in &outcome.check_failures {
        note!("CHECK FAILED: {f}");
    }
    Ok(outcome)
}
