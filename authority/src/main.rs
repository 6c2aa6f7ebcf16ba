//! `mabe-authority`: run and administer one hospital's attribute authority.
//!
//! Every admin command runs either against the local data directory (it opens
//! the database itself) or, with `--remote https://host:port`, against a
//! running node's admin listener. Both paths build the same signed admin
//! request and go through the same admin service, so they check and audit
//! alike.
//!
//! Exit codes: 0 success, 1 any error (the message says what and what to do),
//! 2 usage error (from the argument parser), 3 `audit verify` found problems.

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;
use mabe_abe::AuthorityId;
use mabe_authority::{
    admin_client::signed,
    datadir::{DataDir, InitOutcome, StoreOptions, read_admin_key, write_private},
    grpc::AdminService,
    node::{Node, NodeConfig},
    server::{Listeners, ServeOptions, serve},
};
use mabe_proto::v1::{
    AddProxyRequest, CheckpointRequest, CreateAttributeRequest, DecideRequestRequest,
    DescribeAttributeRequest, DescribeAttributeResponse, EnrollRequest, GrantRequest,
    IssueOfflineRequest, ListAttributesRequest, ListAuditRequest, ListProxiesRequest,
    ListRequestsRequest, ListRotationsRequest, ProxyProgress, RevokeRequest, RotateExpiredRequest,
    VerifyAuditRequest, VerifyAuditResponse, authority_admin_client::AuthorityAdminClient,
    authority_admin_server::AuthorityAdmin as _,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

#[derive(Parser, Debug)]
#[command(
    name = "mabe-authority",
    version,
    about = "One hospital's attribute key authority for mabe"
)]
struct Cli {
    /// Data directory (authority id, keys, dev TLS certificate, SQLite database).
    #[arg(
        long,
        global = true,
        env = "MABE_AUTHORITY_DIR",
        default_value = "mabe-authority-data"
    )]
    data_dir: PathBuf,
    /// PostgreSQL URL; without it the embedded SQLite database in the data directory is used.
    #[arg(long, global = true, env = "MABE_DATABASE_URL")]
    database_url: Option<String>,
    /// File holding the key-encryption key (64 hex digits); MABE_KEK (hex) takes precedence.
    #[arg(long, global = true)]
    kek_file: Option<PathBuf>,
    /// Send admin commands to a running node's admin listener
    /// (`https://host:port`) instead of opening the data directory's database.
    #[arg(long, global = true, env = "MABE_AUTHORITY_ADMIN_URL")]
    remote: Option<String>,
    /// Admin signing key file; default: the data directory's `admin.key`.
    #[arg(long, global = true)]
    admin_key: Option<PathBuf>,
    /// With --remote: the authority id; default: the data directory's.
    #[arg(long, global = true)]
    authority: Option<String>,
    /// With --remote: TLS root certificate (PEM) of the admin listener;
    /// default: the data directory's development certificate.
    #[arg(long, global = true)]
    tls_root: Option<PathBuf>,
    /// With --remote: the name the admin listener's certificate must carry.
    #[arg(long, global = true, default_value = "localhost")]
    tls_name: String,
    /// How long a signed directory stays valid, in seconds (what `serve`
    /// hands out, and what `issue --out` and `directory export` write: give
    /// an offline personal authority a longer one, e.g. 604800 for a week).
    #[arg(long, global = true, env = "MABE_DIRECTORY_VALIDITY", default_value_t = 3600,
          value_parser = clap::value_parser!(i64).range(60..=31_536_000))]
    directory_validity: i64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum DirectoryCmd {
    /// Write the signed directory to a file, for people who cannot reach
    /// this authority (e.g. writers encrypting for a patient's personal
    /// authority); they load it with `mabe directory import`. Valid for
    /// --directory-validity seconds.
    Export {
        /// Output file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

/// `revoke`: who loses which attribute, or `revoke status`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct RevokeArgs {
    #[command(subcommand)]
    status: Option<RevokeCmd>,
    /// The person's GID (64 hex digits); or give --registry and --subject.
    #[arg(long, required_unless_present = "subject", conflicts_with = "subject")]
    gid: Option<String>,
    /// Registry of the person's identity (with --subject; the GID is derived).
    #[arg(long, requires = "subject")]
    registry: Option<String>,
    /// The person's identity within the registry (with --registry).
    #[arg(long, requires = "registry")]
    subject: Option<String>,
    /// Attribute name.
    #[arg(long, required = true)]
    attr: Option<String>,
    /// Return once the rotation is recorded; `serve` drives it in the
    /// background (follow it with `revoke status --follow`).
    #[arg(long)]
    no_wait: bool,
}

#[derive(Subcommand, Debug)]
enum RevokeCmd {
    /// Progress of rotations at every proxy: rows done/total, rate, ETA.
    Status {
        /// Only this rotation (default: every pending one, else the latest).
        #[arg(long)]
        id: Option<i64>,
        /// Keep showing progress until the rotation is done.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new authority: identity key, admin key, KEK and dev TLS certificate.
    Init {
        /// Authority id, lowercase `[a-z0-9][a-z0-9-]{0,62}` (e.g. hospital-a).
        #[arg(long)]
        authority_id: String,
    },
    /// Serve the public and admin gRPC APIs until SIGTERM or SIGINT.
    Serve {
        /// Public listener (Authority service and gRPC health).
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Admin listener (AuthorityAdmin service).
        #[arg(long, default_value = "127.0.0.1:7444")]
        admin_listen: SocketAddr,
        /// TLS certificate chain (PEM); default: the data directory's dev certificate.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Per-request deadline in seconds.
        #[arg(long, default_value_t = 30)]
        request_timeout: u64,
        /// Revoke expired grants (one rotation per attribute) every this
        /// many seconds; 0 turns the schedule off.
        #[arg(long, default_value_t = 300)]
        rotate_expired_every: u64,
        /// Sign an audit checkpoint every this many seconds; 0 turns it off.
        #[arg(long, default_value_t = 3600)]
        checkpoint_every: u64,
        /// Drive pending rotations at the registered proxies every this many
        /// seconds (resuming any that a crash interrupted); 0 turns it off.
        #[arg(long, default_value_t = 10)]
        drive_rotations_every: u64,
        /// Name (before `@`) of the emergency attribute granted on break-glass.
        #[arg(long, default_value = "emergency")]
        emergency_attribute: String,
        /// Role a person must be enrolled with to break the glass.
        #[arg(long, default_value = "emergency-staff")]
        emergency_role: String,
        /// Lifetime of a break-glass grant, in seconds (default 12 hours,
        /// at most 7 days).
        #[arg(long, default_value_t = 43_200, value_parser = clap::value_parser!(u32).range(1..=604_800))]
        break_glass_secs: u32,
    },
    /// Print the authority id and identity public key (to pin in trust files).
    Info,
    /// Attributes of this authority.
    #[command(subcommand)]
    Attribute(AttributeCmd),
    /// Enroll a person: registry and subject give the GID; their request key signs key requests.
    Enroll {
        /// Registry that verifies the identity (e.g. big-register, national-id).
        #[arg(long)]
        registry: String,
        /// Identity within the registry.
        #[arg(long)]
        subject: String,
        /// The person's Ed25519 request public key, 64 hex digits.
        #[arg(long)]
        request_key: String,
        /// Roles (repeatable), e.g. emergency-staff.
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Grant an attribute directly.
    Grant {
        /// The person's GID (64 hex digits).
        #[arg(long)]
        gid: String,
        /// Attribute name (with or without @this-authority).
        #[arg(long)]
        attr: String,
        /// Expire the grant after this many seconds.
        #[arg(long)]
        expires_in: Option<i64>,
    },
    /// Remove a grant and rotate the attribute to a new version, then drive
    /// the rotation at every registered proxy (freeze, update tokens, erase
    /// the update secret) with a progress bar (lines when not on a terminal).
    /// `revoke status` shows the progress of rotations.
    Revoke(RevokeArgs),
    /// Record-store proxies that revocations are driven on.
    #[command(subcommand)]
    Proxy(ProxyCmd),
    /// The signed directory of this authority's public keys.
    #[command(subcommand)]
    Directory(DirectoryCmd),
    /// List attribute requests.
    Requests {
        /// Only requests in this state: pending, approved or denied.
        #[arg(long)]
        state: Option<String>,
    },
    /// Approve a pending request (creates the grant).
    Approve {
        /// Request id.
        id: i64,
        /// Note stored with the decision.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Deny a pending request.
    Deny {
        /// Request id.
        id: i64,
        /// Note stored with the decision.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Write every key granted to a person to a file (offline issuance, e.g.
    /// by a patient's personal authority); the file is secret (mode 0600).
    Issue {
        /// The person's GID.
        #[arg(long)]
        gid: String,
        /// Output file (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// List rotation jobs (revocations whose stored records await update tokens).
    Rotations {
        /// Only pending jobs.
        #[arg(long)]
        pending: bool,
        /// Drive every pending job to the end now, at every registered proxy
        /// (resumes jobs a crash interrupted).
        #[arg(long)]
        drive: bool,
    },
    /// Revoke every expired grant now (e.g. break-glass grants): one
    /// rotation per attribute. `serve` also does this on a schedule.
    RotateExpired,
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
}

#[derive(Subcommand, Debug)]
enum AttributeCmd {
    /// Create an attribute at version 1.
    Create {
        /// Name, e.g. cardiology (the authority id is appended).
        name: String,
    },
    /// List every attribute version with its holders.
    List,
    /// Show one attribute: every version with its creation and supersession
    /// times, current holders, pending requests and rotation jobs.
    Describe {
        /// Name, e.g. cardiology (with or without @this-authority).
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ProxyCmd {
    /// Register a proxy (its id, as `mabe-proxy` prints it, and its endpoint).
    Add {
        /// The proxy's id.
        #[arg(long)]
        id: String,
        /// `https://host:port` of the proxy.
        #[arg(long)]
        endpoint: String,
        /// The proxy's TLS root certificate (PEM file).
        #[arg(long = "proxy-tls-root")]
        proxy_tls_root: PathBuf,
        /// Name the proxy's certificate carries.
        #[arg(long = "proxy-tls-name", default_value = "localhost")]
        proxy_tls_name: String,
    },
    /// List registered proxies.
    List,
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Print audit entries in chain order (e.g. `--kind break-glass`).
    List {
        /// Only entries of this kind (enroll, grant, request, approve, deny,
        /// issue, refusal, revoke, rotate, break-glass, token-batch, …).
        #[arg(long)]
        kind: Option<String>,
        /// First entry to consider.
        #[arg(long, default_value_t = 1)]
        from: i64,
        /// At most this many entries.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Check the hash chain and every checkpoint; exit 3 if anything is wrong.
    Verify,
    /// Sign a checkpoint of the chain's current head.
    Checkpoint,
}

/// The database and key-encryption key options given on the command line.
fn store_options(cli: &Cli) -> StoreOptions {
    StoreOptions {
        database_url: cli.database_url.clone(),
        kek_file: cli.kek_file.clone(),
    }
}

async fn open_node(cli: &Cli, dir: &DataDir) -> Result<Arc<Node>> {
    open_node_with(cli, dir, NodeConfig::default()).await
}

async fn open_node_with(cli: &Cli, dir: &DataDir, mut config: NodeConfig) -> Result<Arc<Node>> {
    config.directory_validity_secs = cli.directory_validity;
    Ok(Arc::new(dir.open_node(&store_options(cli), config).await?))
}

/// The background duties of `serve`: drive pending rotations, revoke
/// expired grants and sign audit checkpoints, each on its own schedule and
/// in its own task (a long revocation never delays a checkpoint or the
/// revocation of expired emergency grants). Errors are logged and retried on
/// the next tick; several replicas may run these at once (see
/// `Node::rotate_expired` and the revocation driver's leases).
fn spawn_duties(
    node: &Arc<Node>,
    rotate_every: u64,
    checkpoint_every: u64,
    drive_every: u64,
) -> tokio::task::JoinSet<()> {
    let mut duties = tokio::task::JoinSet::new();
    let mut every = |secs: u64, duty: Box<dyn Fn(Arc<Node>) -> BoxFuture + Send>| {
        if secs == 0 {
            return;
        }
        let node = Arc::clone(node);
        duties.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                duty(Arc::clone(&node)).await;
            }
        });
    };
    every(
        drive_every,
        Box::new(|node| {
            Box::pin(async move {
                for (id, r) in mabe_authority::revocation::drive_pending(&node).await {
                    match r {
                        Ok(job) => {
                            tracing::info!(rotation = id, attribute = %job.attribute, "rotation finished at every proxy")
                        }
                        Err(e) => {
                            tracing::warn!(rotation = id, error = %e, "rotation not finished; retrying on the next tick")
                        }
                    }
                }
            })
        }),
    );
    every(
        rotate_every,
        Box::new(|node| {
            Box::pin(async move {
                match node.rotate_expired().await {
                    Ok(done) => {
                        for r in done {
                            tracing::info!(attribute = %r.attribute, version = r.new_version, "expired grants revoked");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rotate-expired failed; retrying on the next tick")
                    }
                }
            })
        }),
    );
    every(
        checkpoint_every,
        Box::new(|node| {
            Box::pin(async move {
                if let Err(e) = node.checkpoint().await {
                    tracing::warn!(error = %e, "audit checkpoint failed; retrying on the next tick");
                }
            })
        }),
    );
    duties
}

type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Where admin commands go: the admin service in this process over the local
/// data directory, or a running node's admin listener.
enum Target {
    Local(AdminService),
    Remote(AuthorityAdminClient<Channel>),
}

/// A signed admin session: the authority, the admin key and the target.
struct Admin {
    authority: String,
    key: SigningKey,
    target: Target,
    /// The node, when the target is local (the revocation driver runs here).
    node: Option<Arc<Node>>,
}

/// Sign `$req` for `AuthorityAdmin/$name` and send it to the target.
macro_rules! admin_call {
    ($admin:expr, $method:ident, $name:literal, $req:expr) => {{
        let admin: &mut Admin = $admin;
        let req = signed(
            $req,
            &admin.authority,
            concat!("/mabe.v1.AuthorityAdmin/", $name),
            &admin.key,
        );
        let result = match &mut admin.target {
            Target::Local(svc) => svc.$method(req).await,
            Target::Remote(client) => client.$method(req).await,
        };
        result
            .map(tonic::Response::into_inner)
            .map_err(|s| refused(&admin.target, s))
    }};
}

fn refused(target: &Target, s: tonic::Status) -> anyhow::Error {
    match target {
        Target::Local(_) => anyhow::anyhow!("{}", s.message()),
        Target::Remote(_) => {
            anyhow::anyhow!("the authority refused ({:?}): {}", s.code(), s.message())
        }
    }
}

async fn admin(cli: &Cli, dir: &DataDir) -> Result<Admin> {
    let key = || {
        let path = cli
            .admin_key
            .clone()
            .unwrap_or_else(|| dir.admin_key_file());
        read_admin_key(&path).with_context(|| {
            format!(
                "admin commands are signed with the admin key; none at {} (pass --admin-key)",
                path.display()
            )
        })
    };
    match &cli.remote {
        None => {
            let node = open_node(cli, dir).await?;
            let key = key()?;
            Ok(Admin {
                authority: node.authority_id().as_str().to_owned(),
                key,
                target: Target::Local(AdminService::new(Arc::clone(&node))),
                node: Some(node),
            })
        }
        Some(url) => {
            let authority = match &cli.authority {
                Some(a) => a.clone(),
                None => dir
                    .authority_id()
                    .context("with --remote and no data directory, pass --authority")?,
            };
            let key = key()?;
            let root_path = cli.tls_root.clone().unwrap_or_else(|| dir.tls_cert());
            let root = std::fs::read(&root_path).with_context(|| {
                format!(
                    "reading the admin listener's TLS root {} (pass --tls-root)",
                    root_path.display()
                )
            })?;
            let channel = Endpoint::from_shared(url.clone())
                .with_context(|| format!("--remote {url} is not a URL"))?
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(root))
                        .domain_name(cli.tls_name.clone()),
                )?
                .timeout(Duration::from_secs(60))
                .connect()
                .await
                .with_context(|| format!("cannot reach the admin listener at {url}"))?;
            Ok(Admin {
                authority,
                key,
                target: Target::Remote(
                    AuthorityAdminClient::new(channel)
                        .max_decoding_message_size(mabe_proto::MAX_MESSAGE_BYTES),
                ),
                node: None,
            })
        }
    }
}

/// One line of a rotation's progress at a proxy: rows, rate, ETA.
fn progress_line(p: &ProxyProgress) -> String {
    // The values come from a (possibly remote) node: no overflow on any.
    let secs = p.updated_at.saturating_sub(p.frozen_at).max(1) as f64;
    let rate = p.rows_done as f64 / secs;
    let left = p.rows_total.saturating_sub(p.rows_done).max(0);
    let eta = if p.done_at != 0 {
        "done".to_owned()
    } else if rate > 0.0 {
        format!("ETA {:.0} s", left as f64 / rate)
    } else {
        "ETA unknown".to_owned()
    };
    format!(
        "proxy {}: {}/{} rows ({:.0} rows/s, {eta})",
        p.proxy_id, p.rows_done, p.rows_total, rate
    )
}

/// Rotation progress for a person watching: one bar per proxy on a
/// terminal, else a line per proxy whenever its count moves (at most one a
/// second) and when it is done.
struct ProgressView {
    bars: Option<(
        indicatif::MultiProgress,
        Mutex<BTreeMap<String, indicatif::ProgressBar>>,
    )>,
    printed: Mutex<BTreeMap<String, (std::time::Instant, i64, bool)>>,
}

impl ProgressView {
    fn new() -> Self {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| (indicatif::MultiProgress::new(), Mutex::new(BTreeMap::new())));
        ProgressView {
            bars,
            printed: Mutex::new(BTreeMap::new()),
        }
    }

    fn show(&self, p: &ProxyProgress) {
        let done = p.done_at != 0;
        if let Some((multi, bars)) = &self.bars {
            let Ok(mut bars) = bars.lock() else { return };
            let bar = bars.entry(p.proxy_id.clone()).or_insert_with(|| {
                let bar = multi.add(indicatif::ProgressBar::new(0));
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{prefix} [{wide_bar}] {pos}/{len} rows {msg}",
                ) {
                    bar.set_style(style);
                }
                bar.set_prefix(format!("proxy {}", p.proxy_id));
                bar
            });
            bar.set_length(u64::try_from(p.rows_total).unwrap_or(0));
            bar.set_position(u64::try_from(p.rows_done).unwrap_or(0));
            let line = progress_line(p);
            bar.set_message(
                line.rsplit_once('(')
                    .map_or(String::new(), |(_, r)| format!("({r}")),
            );
            if done {
                bar.finish();
            }
            return;
        }
        let Ok(mut printed) = self.printed.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        let show = match printed.get(&p.proxy_id) {
            None => true,
            Some((at, rows, was_done)) => {
                (done && !was_done)
                    || (*rows != p.rows_done && now.duration_since(*at) >= Duration::from_secs(1))
            }
        };
        if show {
            eprintln!("{}", progress_line(p));
            printed.insert(p.proxy_id.clone(), (now, p.rows_done, done));
        }
    }
}

fn proxy_progress(p: &mabe_authority::store::RotationProgress) -> ProxyProgress {
    ProxyProgress {
        proxy_id: p.proxy_id.clone(),
        rows_total: p.rows_total,
        rows_done: p.rows_done,
        frozen_at: p.frozen_at,
        updated_at: p.updated_at,
        done_at: p.done_at.unwrap_or(0),
    }
}

/// Take a rotation to the end: here (local target), with progress on
/// stderr; or, against a running node, by waiting for its driver.
async fn follow_rotation(a: &mut Admin, rotation_id: i64) -> Result<()> {
    let view = ProgressView::new();
    if let Some(node) = a.node.clone() {
        let report = |p: &mabe_authority::store::RotationProgress| view.show(&proxy_progress(p));
        let job = mabe_authority::revocation::drive_rotation(&node, rotation_id, &report)
            .await
            .with_context(|| {
                format!(
                    "rotation #{rotation_id} is not finished; it resumes when `serve` runs \
                     or with `rotations --drive`"
                )
            })?;
        println!(
            "rotation #{} done: every stored row is at version {}; update secret erased",
            job.id, job.to_version
        );
        return Ok(());
    }
    watch_rotations(a, &[rotation_id], true, &view).await
}

/// Show the progress of `ids` (as the node reports it), once or until all
/// are done.
async fn watch_rotations(
    a: &mut Admin,
    ids: &[i64],
    follow: bool,
    view: &ProgressView,
) -> Result<()> {
    loop {
        let list = admin_call!(
            a,
            list_rotations,
            "ListRotations",
            ListRotationsRequest {
                pending_only: false
            }
        )?;
        let mut all_done = true;
        for id in ids {
            let Some(r) = list.rotations.iter().find(|r| r.id == *id) else {
                bail!("rotation #{id} is not known to the node");
            };
            if r.progress.is_empty() && r.state != "done" {
                eprintln!(
                    "rotation #{}: {} v{} -> v{}: no proxy has frozen it yet",
                    r.id, r.attribute, r.from_version, r.to_version
                );
            }
            for p in &r.progress {
                view.show(p);
            }
            if r.state == "done" {
                println!(
                    "rotation #{} done: every stored row is at version {}; update secret erased",
                    r.id, r.to_version
                );
            } else {
                all_done = false;
            }
        }
        if all_done || !follow {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Move `token` to the next page's token; `false` after the last page. A
/// token that does not change would repeat a page forever: refused.
fn next_page(token: &mut String, next: String) -> Result<bool> {
    if next.is_empty() {
        return Ok(false);
    }
    if next == *token {
        bail!("the authority returned the same page token twice; stopping");
    }
    *token = next;
    Ok(true)
}

/// Print what `attribute describe` shows.
fn print_description(d: &DescribeAttributeResponse) {
    println!("attribute:       {}", d.attribute);
    println!("current version: {}", d.current_version);
    println!("versions:");
    for v in &d.versions {
        let until = if v.superseded_at == 0 {
            String::new()
        } else {
            format!(", superseded at {}", v.superseded_at)
        };
        println!(
            "  v{:<4} {:<10} created at {}{until}",
            v.version, v.state, v.created_at
        );
    }
    println!("holders:         {}", d.holders);
    println!("pending requests: {}", d.pending_requests);
    for r in &d.pending {
        println!(
            "  #{:<5} {} at {}: {}",
            r.id,
            hex::encode(&r.gid),
            r.created_at,
            r.reason
        );
    }
    let listed = u32::try_from(d.pending.len()).unwrap_or(u32::MAX);
    if d.pending_requests > listed {
        println!(
            "  … and {} more (`requests --state pending`)",
            d.pending_requests - listed
        );
    }
    println!("rotation jobs:   {}", d.rotations.len());
    for r in &d.rotations {
        println!(
            "  #{:<4} v{} -> v{} {:<8} created at {}{} {}",
            r.id,
            r.from_version,
            r.to_version,
            r.state,
            r.created_at,
            if r.finished_at == 0 {
                String::new()
            } else {
                format!(", finished at {}", r.finished_at)
            },
            r.reason
        );
        for p in &r.progress {
            println!("        {}", progress_line(p));
        }
    }
}

/// How much of the audit log the newest checkpoint covers: deleting the
/// entries after it would go unnoticed, so the operator sees the exposure.
fn coverage_line(report: &VerifyAuditResponse) -> String {
    let n = report.uncovered_entries;
    if n == 0 {
        return if report.last_checkpoint_seq == 0 {
            "the audit log is empty".to_owned()
        } else {
            format!(
                "every entry is covered by the checkpoint at entry {}",
                report.last_checkpoint_seq
            )
        };
    }
    let (entries, verb) = if n == 1 {
        ("entry", "is")
    } else {
        ("entries", "are")
    };
    let which = if report.last_checkpoint_seq == 0 {
        format!("{n} {entries} {verb} not covered by any signed checkpoint")
    } else {
        format!(
            "{n} {entries} after the checkpoint at entry {} {verb} not covered by a signed checkpoint",
            report.last_checkpoint_seq
        )
    };
    format!(
        "{which}: their deletion would go undetected; sign one with `audit checkpoint` and \
         keep a copy elsewhere"
    )
}

fn gid_bytes(hex_gid: &str) -> Result<Vec<u8>> {
    let b = hex::decode(hex_gid.trim()).context("a GID is 64 hexadecimal digits")?;
    if b.len() != 32 {
        bail!("a GID is 64 hexadecimal digits");
    }
    Ok(b)
}

/// `init`: create the authority (see [`DataDir::init`]) and say what it is.
async fn init(cli: &Cli, dir: &DataDir, authority_id: &str) -> Result<()> {
    let id: AuthorityId = authority_id
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid authority id {authority_id:?}: {e}"))?;
    if dir.init(&id, &store_options(cli)).await? == InitOutcome::FinishedInterrupted {
        println!("finished an interrupted init");
    }
    describe_new(cli, dir).await
}

/// Print what `init` made.
async fn describe_new(cli: &Cli, dir: &DataDir) -> Result<()> {
    let node = open_node(cli, dir).await?;
    println!("initialised authority {}", node.authority_id());
    println!(
        "identity public key: {}",
        hex::encode(node.identity_public_key().to_bytes())
    );
    println!("data directory: {}", dir.root().display());
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled: `serve` calls it before it
/// announces its ports, so a signal sent right after the announcement still
/// shuts it down gracefully (instead of killing it).
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    let install = |kind: SignalKind, name: &str| {
        signal(kind)
            .map_err(|e| tracing::warn!(error = %e, "cannot handle {name}"))
            .ok()
    };
    let term = install(SignalKind::terminate(), "SIGTERM");
    let int = install(SignalKind::interrupt(), "SIGINT");
    async move {
        let wait = |s: Option<Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! { _ = wait(term) => {}, _ = wait(int) => {} }
    }
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(cli: Cli) -> Result<i32> {
    let dir = DataDir::new(&cli.data_dir);
    match &cli.command {
        Command::Init { authority_id } => init(&cli, &dir, authority_id).await?,
        Command::Serve {
            listen,
            admin_listen,
            tls_cert,
            tls_key,
            request_timeout,
            rotate_expired_every,
            checkpoint_every,
            drive_rotations_every,
            emergency_attribute,
            emergency_role,
            break_glass_secs,
        } => {
            let config = NodeConfig {
                emergency_attribute: emergency_attribute.clone(),
                emergency_role: emergency_role.clone(),
                break_glass_secs: i64::from(*break_glass_secs),
                ..NodeConfig::default()
            };
            let node = open_node_with(&cli, &dir, config).await?;
            let tls = dir.tls(tls_cert.as_deref(), tls_key.as_deref())?;
            let listeners = Listeners::bind(*listen, *admin_listen)
                .await
                .context("binding the listeners")?;
            let (p, a) = listeners.addrs()?;
            let shutdown = shutdown_signal();
            tracing::info!(authority = %node.authority_id(), public = %p, admin = %a, store = node.store().backend(), "serving");
            println!("serving {} on {p} (admin {a})", node.authority_id());
            let mut duties = spawn_duties(
                &node,
                *rotate_expired_every,
                *checkpoint_every,
                *drive_rotations_every,
            );
            let served = serve(
                Arc::clone(&node),
                listeners,
                ServeOptions {
                    tls: Some(tls),
                    request_timeout: Duration::from_secs(*request_timeout),
                },
                shutdown,
            )
            .await;
            duties.abort_all();
            // Cover the newest entries before going away (a checkpoint is
            // what makes their deletion detectable).
            match node.checkpoint().await {
                Ok(Some(cp)) => tracing::info!(seq = cp.seq, "audit checkpoint signed at shutdown"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "audit checkpoint at shutdown failed"),
            }
            served?;
            tracing::info!("stopped");
        }
        Command::Info => {
            let node = open_node(&cli, &dir).await?;
            println!("authority id: {}", node.authority_id());
            println!(
                "identity public key: {}",
                hex::encode(node.identity_public_key().to_bytes())
            );
            println!("store: {}", node.store().backend());
        }
        Command::Attribute(AttributeCmd::Create { name }) => {
            let mut a = admin(&cli, &dir).await?;
            let req = CreateAttributeRequest { name: name.clone() };
            let rec = admin_call!(&mut a, create_attribute, "CreateAttribute", req)?;
            println!("created {} version {}", rec.attribute, rec.version);
        }
        Command::Attribute(AttributeCmd::List) => {
            let mut a = admin(&cli, &dir).await?;
            let mut page_token = String::new();
            loop {
                let req = ListAttributesRequest {
                    page_token: page_token.clone(),
                    page_size: 0,
                };
                let list = admin_call!(&mut a, list_attributes, "ListAttributes", req)?;
                for r in list.attributes {
                    println!(
                        "{:<40} v{:<4} {:<10} {} holder(s)",
                        r.attribute, r.version, r.state, r.holders
                    );
                }
                if !next_page(&mut page_token, list.next_page_token)? {
                    break;
                }
            }
        }
        Command::Attribute(AttributeCmd::Describe { name }) => {
            let mut a = admin(&cli, &dir).await?;
            let req = DescribeAttributeRequest { name: name.clone() };
            let d = admin_call!(&mut a, describe_attribute, "DescribeAttribute", req)?;
            print_description(&d);
        }
        Command::Enroll {
            registry,
            subject,
            request_key,
            roles,
        } => {
            let key = hex::decode(request_key.trim()).context("request key is not hex")?;
            let mut a = admin(&cli, &dir).await?;
            let req = EnrollRequest {
                registry: registry.clone(),
                subject: subject.clone(),
                request_key: key,
                roles: roles.clone(),
            };
            let p = admin_call!(&mut a, enroll, "Enroll", req)?;
            println!(
                "enrolled {} {} with GID {}",
                p.registry,
                p.subject,
                hex::encode(p.gid)
            );
        }
        Command::Grant {
            gid,
            attr,
            expires_in,
        } => {
            let req = GrantRequest {
                gid: gid_bytes(gid)?,
                attribute: attr.clone(),
                expires_at: expires_in
                    .map(|s| mabe_authority::node::now().saturating_add(s))
                    .unwrap_or(0),
            };
            let mut a = admin(&cli, &dir).await?;
            let g = admin_call!(&mut a, grant, "Grant", req)?;
            println!("granted {} to {}", g.attribute, hex::encode(g.gid));
        }
        Command::Revoke(RevokeArgs {
            status: Some(RevokeCmd::Status { id, follow }),
            ..
        }) => {
            let mut a = admin(&cli, &dir).await?;
            let list = admin_call!(
                &mut a,
                list_rotations,
                "ListRotations",
                ListRotationsRequest {
                    pending_only: false
                }
            )?;
            let ids: Vec<i64> = match id {
                Some(id) => vec![*id],
                None => {
                    let pending: Vec<i64> = list
                        .rotations
                        .iter()
                        .filter(|r| r.state != "done")
                        .map(|r| r.id)
                        .collect();
                    if pending.is_empty() {
                        list.rotations
                            .iter()
                            .map(|r| r.id)
                            .max()
                            .into_iter()
                            .collect()
                    } else {
                        pending
                    }
                }
            };
            if ids.is_empty() {
                println!("no rotation yet");
            } else {
                for r in list.rotations.iter().filter(|r| ids.contains(&r.id)) {
                    println!(
                        "rotation #{}: {} v{} -> v{}, {} ({})",
                        r.id, r.attribute, r.from_version, r.to_version, r.state, r.reason
                    );
                }
                watch_rotations(&mut a, &ids, *follow, &ProgressView::new()).await?;
            }
        }
        Command::Revoke(RevokeArgs {
            gid,
            registry,
            subject,
            attr,
            no_wait,
            ..
        }) => {
            let gid = match (gid, registry, subject) {
                (Some(g), _, _) => gid_bytes(g)?,
                (None, Some(r), Some(s)) => mabe_abe::Gid::derive(r, s)
                    .context("deriving the GID from --registry and --subject")?
                    .as_bytes()
                    .to_vec(),
                _ => bail!("name the person with --gid, or with --registry and --subject"),
            };
            let attr = attr.clone().context("name the attribute with --attr")?;
            let req = RevokeRequest {
                gid,
                attribute: attr,
            };
            let mut a = admin(&cli, &dir).await?;
            let r = admin_call!(&mut a, revoke, "Revoke", req)?;
            println!(
                "revoked; {} is now version {} ({} remaining holder(s) get it on their next fetch)",
                r.attribute, r.new_version, r.reissued_to
            );
            if *no_wait {
                println!(
                    "rotation #{} recorded; `serve` drives it at the proxies (follow with \
                     `revoke status --follow`)",
                    r.rotation_id
                );
            } else {
                follow_rotation(&mut a, r.rotation_id).await?;
            }
        }
        Command::Proxy(ProxyCmd::Add {
            id,
            endpoint,
            proxy_tls_root,
            proxy_tls_name,
        }) => {
            let root = std::fs::read(proxy_tls_root)
                .with_context(|| format!("reading {}", proxy_tls_root.display()))?;
            let req = AddProxyRequest {
                id: id.clone(),
                endpoint: endpoint.clone(),
                tls_root: root,
                tls_name: proxy_tls_name.clone(),
            };
            let mut a = admin(&cli, &dir).await?;
            let p = admin_call!(&mut a, add_proxy, "AddProxy", req)?;
            println!("registered proxy {} at {}", p.id, p.endpoint);
        }
        Command::Directory(DirectoryCmd::Export { out }) => {
            if cli.remote.is_some() {
                bail!(
                    "directory export signs with the local data directory's identity key; \
                     clients of a running node fetch its directory themselves"
                );
            }
            if out.exists() {
                bail!("{} already exists", out.display());
            }
            let node = open_node(&cli, &dir).await?;
            let (body, signature) = node.signed_directory().await?;
            std::fs::write(
                out,
                mabe_proto::bundle::encode_signed_directory(&body, &signature),
            )
            .with_context(|| format!("writing {}", out.display()))?;
            println!(
                "directory of {} written to {} (valid for {} s)",
                node.authority_id(),
                out.display(),
                cli.directory_validity
            );
        }
        Command::Proxy(ProxyCmd::List) => {
            let mut a = admin(&cli, &dir).await?;
            let list = admin_call!(&mut a, list_proxies, "ListProxies", ListProxiesRequest {})?;
            for p in list.proxies {
                println!("{:<24} {} (TLS name {})", p.id, p.endpoint, p.tls_name);
            }
        }
        Command::Requests { state } => {
            let state = match state.as_deref() {
                None => String::new(),
                Some(s @ ("pending" | "approved" | "denied")) => s.to_owned(),
                Some(_) => bail!("--state is pending, approved or denied"),
            };
            let mut a = admin(&cli, &dir).await?;
            let mut page_token = String::new();
            loop {
                let req = ListRequestsRequest {
                    state: state.clone(),
                    page_token: page_token.clone(),
                    page_size: 0,
                };
                let list = admin_call!(&mut a, list_requests, "ListRequests", req)?;
                for r in list.requests {
                    println!(
                        "#{:<5} {:<9} {} wants {}: {}",
                        r.id,
                        r.state,
                        hex::encode(r.gid),
                        r.attribute,
                        r.reason
                    );
                }
                if !next_page(&mut page_token, list.next_page_token)? {
                    break;
                }
            }
        }
        Command::Approve { id, note } | Command::Deny { id, note } => {
            let req = DecideRequestRequest {
                id: *id,
                approve: matches!(cli.command, Command::Approve { .. }),
                note: note.clone(),
            };
            let mut a = admin(&cli, &dir).await?;
            let r = admin_call!(&mut a, decide_request, "DecideRequest", req)?;
            println!("request #{} {}", r.id, r.state);
        }
        Command::Issue { gid, out } => {
            if out.exists() {
                bail!(
                    "{} already exists; keys are never written over a file",
                    out.display()
                );
            }
            let req = IssueOfflineRequest {
                gid: gid_bytes(gid)?,
            };
            let mut a = admin(&cli, &dir).await?;
            let issued = admin_call!(&mut a, issue_offline, "IssueOffline", req)?;
            let bundle = zeroize::Zeroizing::new(issued.bundle);
            write_private(out, &bundle)?;
            for k in &issued.keys {
                println!("issued {} version {}", k.attribute, k.version);
            }
            println!("wrote {} key(s) to {}", issued.keys.len(), out.display());
        }
        Command::Rotations { pending, drive } => {
            let req = ListRotationsRequest {
                pending_only: *pending || *drive,
            };
            let mut a = admin(&cli, &dir).await?;
            if *drive {
                let list = admin_call!(&mut a, list_rotations, "ListRotations", req)?;
                for r in list.rotations {
                    follow_rotation(&mut a, r.id).await?;
                }
            }
            let list = admin_call!(&mut a, list_rotations, "ListRotations", req)?;
            for r in list.rotations {
                println!(
                    "#{:<4} {:<40} v{} -> v{} {:<8} {}",
                    r.id, r.attribute, r.from_version, r.to_version, r.state, r.reason
                );
                for p in &r.progress {
                    println!("      {}", progress_line(p));
                }
            }
        }
        Command::RotateExpired => {
            let mut a = admin(&cli, &dir).await?;
            let done = admin_call!(
                &mut a,
                rotate_expired,
                "RotateExpired",
                RotateExpiredRequest {}
            )?;
            if done.rotations.is_empty() {
                println!("no expired grant");
            }
            for r in done.rotations {
                println!(
                    "rotated {} to version {} ({} remaining holder(s))",
                    r.attribute, r.new_version, r.reissued_to
                );
            }
        }
        Command::Audit(AuditCmd::List { kind, from, limit }) => {
            let mut a = admin(&cli, &dir).await?;
            let req = ListAuditRequest {
                from_seq: *from,
                limit: *limit,
                kind: kind.clone().unwrap_or_default(),
            };
            let list = admin_call!(&mut a, list_audit, "ListAudit", req)?;
            for e in &list.entries {
                println!(
                    "#{:<6} {} {:<14} by {} {}{}{}",
                    e.seq,
                    e.ts,
                    e.kind,
                    e.actor,
                    if e.subject.is_empty() {
                        String::new()
                    } else {
                        format!("subject {} ", e.subject)
                    },
                    if e.attribute.is_empty() {
                        String::new()
                    } else {
                        format!("attribute {} ", e.attribute)
                    },
                    e.detail
                );
            }
            if list.next_seq != 0 {
                println!("(more from --from {})", list.next_seq);
            }
        }
        Command::Audit(AuditCmd::Verify) => {
            let mut a = admin(&cli, &dir).await?;
            let report = admin_call!(&mut a, verify_audit, "VerifyAudit", VerifyAuditRequest {})?;
            println!(
                "{} entries, {} checkpoint(s) checked",
                report.entries, report.checkpoints
            );
            println!("{}", coverage_line(&report));
            if report.problems.is_empty() {
                println!("audit log verifies");
            } else {
                for p in &report.problems {
                    println!("PROBLEM: {p}");
                }
                return Ok(3);
            }
        }
        Command::Audit(AuditCmd::Checkpoint) => {
            let mut a = admin(&cli, &dir).await?;
            let cp = admin_call!(&mut a, checkpoint, "Checkpoint", CheckpointRequest {})?;
            if cp.empty {
                println!("the audit log is empty");
            } else {
                println!("checkpoint signed at entry {}", cp.seq);
            }
        }
    }
    Ok(0)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MABE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `updated_at - frozen_at` and `rows_total - rows_done`
    /// on a remote node's values overflowed (a panic in debug builds).
    #[test]
    fn progress_line_survives_hostile_values() {
        let p = ProxyProgress {
            proxy_id: "p".into(),
            rows_total: i64::MIN,
            rows_done: i64::MAX,
            frozen_at: i64::MAX,
            updated_at: i64::MIN,
            done_at: 0,
        };
        assert!(progress_line(&p).starts_with("proxy p: "));
        let p = ProxyProgress {
            rows_total: i64::MAX,
            rows_done: i64::MIN,
            frozen_at: i64::MIN,
            updated_at: i64::MAX,
            ..p
        };
        assert!(progress_line(&p).contains("rows"));
    }
}
