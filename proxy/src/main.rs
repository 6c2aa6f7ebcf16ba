//! `mabe-proxy`: run and administer a record store and revocation proxy.
//!
//! Exit codes: 0 success, 1 any error (the message says what and what to
//! do), 2 usage error (from the argument parser).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mabe_proxy::{
    datadir::DataDir,
    node::{Node, valid_proxy_id},
    server::{Listeners, ServeOptions, serve},
};

#[derive(Parser, Debug)]
#[command(
    name = "mabe-proxy",
    version,
    about = "mabe record store and revocation proxy",
    long_about = "Stores encrypted records for clients and applies authorities' update tokens \
                  when an attribute is revoked. It never sees plaintexts, data keys, user keys \
                  or update secrets. See docs/PROXY.md."
)]
struct Cli {
    /// Data directory (proxy id, dev TLS certificate, SQLite database).
    #[arg(
        long,
        global = true,
        env = "MABE_PROXY_DIR",
        default_value = "mabe-proxy-data"
    )]
    data_dir: PathBuf,
    /// PostgreSQL URL; without it the SQLite database in the data directory is used.
    #[arg(long, global = true, env = "MABE_PROXY_DATABASE_URL")]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the data directory: proxy id, database, dev TLS certificate.
    Init {
        /// Proxy id, `[a-z0-9][a-z0-9.-]{0,62}` (authorities sign their calls for it).
        #[arg(long)]
        proxy_id: String,
    },
    /// Serve the public (RecordStore, ProxyAuthority, health) and admin (/metrics)
    /// listeners until SIGTERM or SIGINT.
    Serve {
        /// Public listener.
        #[arg(long, default_value = "127.0.0.1:7543")]
        listen: SocketAddr,
        /// Admin listener (GET /metrics); keep it on loopback or a management network.
        #[arg(long, default_value = "127.0.0.1:7544")]
        admin_listen: SocketAddr,
        /// TLS certificate chain (PEM); default: the data directory's dev certificate.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Deadline of one call, seconds (uploads and downloads use --idle-timeout instead).
        #[arg(long, default_value_t = 30)]
        request_timeout: u64,
        /// Longest pause within an upload or download, seconds.
        #[arg(long, default_value_t = 60)]
        idle_timeout: u64,
    },
    /// Authorities allowed to freeze and update their attributes here.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Stored records.
    #[command(subcommand)]
    Records(RecordsCmd),
    /// Frozen attribute versions and how many of their rows still await tokens.
    Freezes,
}

#[derive(Subcommand, Debug)]
enum TrustCmd {
    /// Pin an authority's Ed25519 identity key (from `mabe-authority info`).
    Add {
        /// Authority id, e.g. hospital-a.
        #[arg(long)]
        authority: String,
        /// Identity public key, 64 hex digits.
        #[arg(long)]
        identity_key: String,
    },
    /// List trusted authorities.
    List,
    /// Stop trusting an authority.
    Remove {
        /// Authority id.
        #[arg(long)]
        authority: String,
    },
}

#[derive(Subcommand, Debug)]
enum RecordsCmd {
    /// List records: id, sizes, and every row's attribute and version.
    List {
        /// Stop after this many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

async fn open_node(cli: &Cli, dir: &DataDir) -> Result<Arc<Node>> {
    Ok(Arc::new(dir.open_node(cli.database_url.as_deref()).await?))
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

async fn run(cli: Cli) -> Result<()> {
    let dir = DataDir::new(&cli.data_dir);
    match &cli.command {
        Command::Init { proxy_id } => {
            if !valid_proxy_id(proxy_id) {
                anyhow::bail!("--proxy-id must match [a-z0-9][a-z0-9.-]{{0,62}}");
            }
            dir.init(proxy_id, cli.database_url.as_deref()).await?;
            println!("initialised proxy {proxy_id}");
            println!("data directory: {}", dir.root().display());
            println!("dev TLS certificate: {}", dir.tls_cert().display());
        }
        Command::Serve {
            listen,
            admin_listen,
            tls_cert,
            tls_key,
            request_timeout,
            idle_timeout,
        } => {
            let node = open_node(&cli, &dir).await?;
            let tls = dir.tls(tls_cert.as_deref(), tls_key.as_deref())?;
            let listeners = Listeners::bind(*listen, *admin_listen)
                .await
                .context("binding the listeners")?;
            let (p, a) = listeners.addrs()?;
            tracing::info!(proxy = %node.config().proxy_id, public = %p, admin = %a, store = node.store().backend(), "serving");
            println!("serving {} on {p} (admin {a})", node.config().proxy_id);
            let mut opts = ServeOptions::new(Some(tls));
            opts.request_timeout = Duration::from_secs(*request_timeout);
            opts.idle_timeout = Duration::from_secs(*idle_timeout);
            serve(node, listeners, opts, shutdown_signal()).await?;
            tracing::info!("stopped");
        }
        Command::Trust(TrustCmd::Add {
            authority,
            identity_key,
        }) => {
            let node = open_node(&cli, &dir).await?;
            let key = hex::decode(identity_key.trim())
                .context("the identity key is 64 hexadecimal digits")?;
            if node.trust(authority, &key).await? {
                println!("trusting {authority}");
            } else {
                println!("{authority} was already trusted with this key");
            }
        }
        Command::Trust(TrustCmd::List) => {
            let node = open_node(&cli, &dir).await?;
            for t in node.store().trusted().await? {
                println!("{:<40} {}", t.authority_id, hex::encode(t.identity_key));
            }
        }
        Command::Trust(TrustCmd::Remove { authority }) => {
            let node = open_node(&cli, &dir).await?;
            if node.store().remove_trusted(authority).await? {
                println!("no longer trusting {authority}");
            } else {
                anyhow::bail!("{authority} was not trusted");
            }
        }
        Command::Records(RecordsCmd::List { limit }) => {
            let node = open_node(&cli, &dir).await?;
            let mut after = None;
            let mut left = *limit;
            while left > 0 {
                let page = node
                    .store()
                    .list_records(after.as_ref(), left.min(mabe_proxy::MAX_LIST_PAGE))
                    .await?;
                let Some(last) = page.last() else { break };
                after = Some(last.record_id);
                left = left.saturating_sub(page.len() as u32);
                for r in &page {
                    let rows: Vec<String> =
                        r.rows.iter().map(|(a, v)| format!("{a} v{v}")).collect();
                    println!(
                        "{} header {:>7} B payload {:>12} B  {}",
                        hex::encode(r.record_id),
                        r.header_size,
                        r.payload_size,
                        rows.join(", ")
                    );
                }
            }
        }
        Command::Freezes => {
            let node = open_node(&cli, &dir).await?;
            for f in node.store().freezes().await? {
                println!(
                    "{} v{} frozen by {} at {}: {} row(s), {} still at v{}, root {}",
                    f.freeze.attribute,
                    f.freeze.version,
                    f.freeze.frozen_by,
                    f.freeze.frozen_at,
                    f.freeze.rows,
                    f.pending,
                    f.freeze.version,
                    hex::encode(f.freeze.merkle_root)
                );
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
