//! `mabe`: the mabe command-line tool.
//!
//! Exit codes: 0 success; 1 an error or a failed expectation (the message
//! says which); 2 usage error.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod demo;

#[derive(Parser, Debug)]
#[command(
    name = "mabe",
    version,
    about = "Multi-authority attribute-based encryption for hospitals"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole scenario on the embedded default: hospitals' authorities,
    /// people, a multi-authority record, requests, revocation, audit.
    Demo {
        /// Keep the authorities' data in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo { keep } => demo::run(keep).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
