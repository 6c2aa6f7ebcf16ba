//! `mabe-authority`: run and administer one hospital's attribute authority.
//!
//! Exit codes: 0 success, 1 any error (the message says what and what to do),
//! 2 usage error (from the argument parser), 3 `audit verify` found problems.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mabe_authority::{
    datadir::{DataDir, write_private},
    node::{Node, NodeConfig},
    seal::Kek,
    server::{Listeners, ServeOptions, serve},
    store::{RequestState, Store, postgres::PgStore, sqlite::SqliteStore},
};

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
    #[command(subcommand)]
    command: Command,
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
    /// Remove a grant and rotate the attribute to a new version.
    Revoke {
        /// The person's GID.
        #[arg(long)]
        gid: String,
        /// Attribute name.
        #[arg(long)]
        attr: String,
    },
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
    },
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
}

#[derive(Subcommand, Debug)]
enum AuditCmd {
    /// Check the hash chain and every checkpoint; exit 3 if anything is wrong.
    Verify,
    /// Sign a checkpoint of the chain's current head.
    Checkpoint,
}

async fn open_store(cli: &Cli, dir: &DataDir) -> Result<Arc<dyn Store>> {
    Ok(match &cli.database_url {
        Some(url) => Arc::new(
            PgStore::connect(url)
                .await
                .context("connecting to PostgreSQL")?,
        ),
        None => Arc::new(
            SqliteStore::open(&dir.database())
                .with_context(|| format!("opening {}", dir.database().display()))?,
        ),
    })
}

async fn open_node(cli: &Cli, dir: &DataDir) -> Result<Arc<Node>> {
    // Check the directory first: never create a database in a directory
    // that `init` did not set up.
    dir.authority_id()?;
    let store = open_store(cli, dir).await?;
    let kek = dir.load_kek(cli.kek_file.as_deref())?;
    Ok(Arc::new(
        Node::open(store, kek, NodeConfig::default()).await?,
    ))
}

fn gid_bytes(hex_gid: &str) -> Result<Vec<u8>> {
    let b = hex::decode(hex_gid.trim()).context("a GID is 64 hexadecimal digits")?;
    if b.len() != 32 {
        bail!("a GID is 64 hexadecimal digits");
    }
    Ok(b)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

async fn run(cli: Cli) -> Result<i32> {
    let dir = DataDir::new(&cli.data_dir);
    match &cli.command {
        Command::Init { authority_id } => {
            dir.create()?;
            std::fs::write(dir.id_file(), format!("{authority_id}\n"))?;
            let kek = if std::env::var("MABE_KEK").is_ok() || cli.kek_file.is_some() {
                dir.load_kek(cli.kek_file.as_deref())?
            } else {
                let kek = Kek::generate(&mut ark_std::rand::rngs::OsRng);
                write_private(&dir.kek_file(), kek.to_hex().as_bytes())?;
                kek
            };
            let store = open_store(&cli, &dir).await?;
            let (node, admin) = Node::init(store, authority_id, kek, NodeConfig::default()).await?;
            write_private(
                &dir.admin_key_file(),
                hex::encode(admin.to_bytes()).as_bytes(),
            )?;
            dir.write_dev_tls()?;
            println!("initialised authority {}", node.authority_id());
            println!(
                "identity public key: {}",
                hex::encode(node.identity_public_key().to_bytes())
            );
            println!("data directory: {}", dir.root().display());
        }
        Command::Serve {
            listen,
            admin_listen,
            tls_cert,
            tls_key,
            request_timeout,
        } => {
            let node = open_node(&cli, &dir).await?;
            let tls = dir.tls(tls_cert.as_deref(), tls_key.as_deref())?;
            let listeners = Listeners::bind(*listen, *admin_listen)
                .await
                .context("binding the listeners")?;
            let (p, a) = listeners.addrs()?;
            tracing::info!(authority = %node.authority_id(), public = %p, admin = %a, store = node.store().backend(), "serving");
            println!("serving {} on {p} (admin {a})", node.authority_id());
            serve(
                node,
                listeners,
                ServeOptions {
                    tls: Some(tls),
                    request_timeout: Duration::from_secs(*request_timeout),
                },
                shutdown_signal(),
            )
            .await?;
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
            let node = open_node(&cli, &dir).await?;
            let rec = node.create_attribute(name).await?;
            println!("created {} version {}", rec.attribute, rec.version);
        }
        Command::Attribute(AttributeCmd::List) => {
            let node = open_node(&cli, &dir).await?;
            for (r, holders) in node.attributes().await? {
                println!(
                    "{:<40} v{:<4} {:<10} {} holder(s)",
                    r.attribute,
                    r.version,
                    r.state.as_str(),
                    holders
                );
            }
        }
        Command::Enroll {
            registry,
            subject,
            request_key,
            roles,
        } => {
            let node = open_node(&cli, &dir).await?;
            let key = hex::decode(request_key.trim()).context("request key is not hex")?;
            let p = node.enroll(registry, subject, &key, roles).await?;
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
            let node = open_node(&cli, &dir).await?;
            let expires = expires_in.map(|s| mabe_authority::node::now() + s);
            let g = node.grant(&gid_bytes(gid)?, attr, expires, "admin").await?;
            println!("granted {} to {}", g.attribute, hex::encode(g.gid));
        }
        Command::Revoke { gid, attr } => {
            let node = open_node(&cli, &dir).await?;
            let r = node.revoke(&gid_bytes(gid)?, attr).await?;
            println!(
                "revoked; {} is now version {} ({} remaining holder(s) get it on their next fetch)",
                r.attribute, r.new_version, r.remaining_holders
            );
        }
        Command::Requests { state } => {
            let node = open_node(&cli, &dir).await?;
            let state = state
                .as_deref()
                .map(RequestState::parse)
                .transpose()
                .map_err(|_| anyhow::anyhow!("--state is pending, approved or denied"))?;
            for r in node.requests(state).await? {
                println!(
                    "#{:<5} {:<9} {} wants {}: {}",
                    r.id,
                    r.state.as_str(),
                    hex::encode(r.gid),
                    r.attribute,
                    r.reason
                );
            }
        }
        Command::Approve { id, note } | Command::Deny { id, note } => {
            let approve = matches!(cli.command, Command::Approve { .. });
            let node = open_node(&cli, &dir).await?;
            let r = node.decide(*id, approve, note, "admin").await?;
            println!("request #{} {}", r.id, r.state.as_str());
        }
        Command::Issue { gid, out } => {
            let node = open_node(&cli, &dir).await?;
            let keys = node.issue_offline(&gid_bytes(gid)?).await?;
            if keys.is_empty() {
                bail!("nothing to issue: no active grant for this GID");
            }
            let encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.key.to_vec()).collect();
            let bundle = mabe_proto::bundle::encode(node.authority_id().as_str(), &encoded);
            write_private(out, &bundle)?;
            for k in &keys {
                println!("issued {} version {}", k.attribute, k.version);
            }
            println!("wrote {} key(s) to {}", keys.len(), out.display());
        }
        Command::Rotations { pending } => {
            let node = open_node(&cli, &dir).await?;
            for r in node.rotations(*pending).await? {
                println!(
                    "#{:<4} {:<40} v{} -> v{} {:<8} {}",
                    r.id,
                    r.attribute,
                    r.from_version,
                    r.to_version,
                    r.state.as_str(),
                    r.reason
                );
            }
        }
        Command::Audit(AuditCmd::Verify) => {
            let node = open_node(&cli, &dir).await?;
            let report = node.verify_audit().await?;
            println!(
                "{} entries, {} checkpoint(s) checked",
                report.entries, report.checkpoints
            );
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
            let node = open_node(&cli, &dir).await?;
            match node.checkpoint().await? {
                Some(cp) => println!("checkpoint signed at entry {}", cp.seq),
                None => println!("the audit log is empty"),
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
