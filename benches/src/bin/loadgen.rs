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
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, ensure};
use ark_std::rand::{RngCore, rngs::OsRng};
use clap::{Parser, ValueEnum};
use ed25519_dalek::{Signer, SigningKey};
use mabe_abe::{AttributePublicKey, Gid, UserKey, UserKeyRing};
use mabe_authority::{admin_client::signed, datadir::DataDir, node::now};
use mabe_benches::load::{
    LoadArgs, Outcome, Server, connect, ensure_nofile_for, measure, print_log, run_cli,
    setup_calls, sibling_bin, why,
};
use mabe_benches::note;
use mabe_proto::{
    signing::{Directory, attribute_request_message, key_request_message},
    v1::{
        AttributeRequest, DecideRequestRequest, EnrollRequest, GetDirectoryRequest, GrantRequest,
        KeyRequest, ListRequestsRequest, authority_admin_client::AuthorityAdminClient,
        authority_client::AuthorityClient,
    },
};
use tokio::{
    process::Command,
    time::{Instant, timeout_at},
};
use tonic::transport::Channel;

const AUTHORITY: &str = "hospital-a";
const REGISTRY: &str = "big-register";
/// Granted to every person; fetched in the `fetch` scenario.
const FETCHED: &str = "cardiology";
/// Requested by every person and decided in the `decide` scenario.
const REQUESTED: &str = "research";
const ADMIN: &str = "/mabe.v1.AuthorityAdmin/";

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
    #[command(flatten)]
    load: LoadArgs,
    /// What to measure.
    #[arg(long, value_enum, default_value = "both")]
    scenario: Scenario,
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
    /// Fetched keys checked with the pairing check after the fetch phase.
    #[arg(long, default_value_t = 50)]
    verify_keys: usize,
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

/// Whether the run passed; the table is printed either way.
async fn run(args: &Args) -> Result<bool> {
    args.load.check()?;
    ensure!(
        args.setup_in_flight > 0,
        "--setup-in-flight must be at least 1"
    );
    let people = args
        .people
        .unwrap_or(args.load.requests)
        .clamp(1, args.load.requests);
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    // Each connection is one socket here and one in the server (which
    // inherits this limit); public and admin connections.
    ensure_nofile_for(2 * args.load.connections)?;
    let bin = sibling_bin(
        "mabe-authority",
        args.authority_bin.as_deref(),
        "mabe-authority",
    )?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let db = args.load.database("mabe_load", deadline).await?;
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
    args.load.print_tables(&rows, false);
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
        .serve(
            args.load.request_timeout,
            &args.load.server_log,
            &log,
            deadline,
        )
        .await?;
    note!(
        "{} node serving on {} (admin {}), init {:.1?}",
        args.load.backend.name(),
        server.public,
        server.admin,
        started.elapsed()
    );
    let result = async {
        let publics = connect(&cert, server.public, args.load.connections, deadline).await?;
        let admins = connect(&cert, server.admin, args.load.connections, deadline).await?;
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

// ------------------------------------------------------------------ the node
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
        let mut cmd = self.command();
        cmd.args(args);
        run_cli(cmd, &format!("mabe-authority {}", args.join(" ")), deadline).await
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
        c.env("MABE_LOG", log_filter);
        Server::start(c, log, deadline)
            .await
            .with_context(|| format!("starting {} serve", self.bin.display()))
    }
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
    let enrolled = setup_calls("enrollments", n, ctx.setup_in_flight, ctx.deadline, |i| {
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
        async move { Ok::<_, tonic::Status>(client.enroll(req).await?.into_inner().gid) }
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
        setup_calls("grants", n, ctx.setup_in_flight, ctx.deadline, |i| {
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
    let calls: Vec<_> = (0..args.load.requests)
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
        args.load.requests,
        persons.len(),
        args.load.in_flight.min(args.load.requests),
        ctx.publics.len()
    );
    let (mut outcome, ok) = measure(
        "fetch",
        calls,
        args.load.in_flight,
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
    let ids = setup_calls(
        "attribute requests",
        args.load.requests,
        ctx.setup_in_flight,
        ctx.deadline,
        |i| {
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
        },
    )
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
        args.load.in_flight.min(calls.len()),
        ctx.admins.len()
    );
    let (mut outcome, _) = measure(
        "approve/deny",
        calls,
        args.load.in_flight,
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
