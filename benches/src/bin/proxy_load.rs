//! `mabe-proxy-load`: read load on one `mabe-proxy` node.
//!
//! It sets up a throwaway proxy with the real binary (`init` in a temporary
//! directory, SQLite or a fresh PostgreSQL database), starts `serve` on
//! loopback with TLS as a child process, and stores `--records` records over
//! `PutRecord`: a header from the real scheme (an AND of `--rows` attributes
//! of two authorities, encrypted with `mabe_abe`) and the STREAM ciphertext
//! of a `--payload`-byte plaintext (4 KiB by default). Then it keeps
//! `--in-flight` `GetRecord` calls outstanding at once (default: all 10,000),
//! spread round-robin over `--connections` HTTP/2 connections (one tonic
//! `Channel` each), and times each call from just before it is sent until
//! the last message of its answer has arrived (hdrhistogram, µs).
//!
//! Every answer is checked after the phase, outside the timed path: the
//! head's header is the stored header byte for byte and decodes with full
//! validation (`Header::from_bytes`) to the requested record id, and the
//! payload's size and SHA-256 are the stored ones, both as received and as
//! the head announces them.
//!
//! With `--uploads-during K`, K more records (encrypted beforehand) are
//! uploaded over separate connections while the reads run, to show whether
//! reads wait for writes.
//!
//! Bounded: traffic goes to 127.0.0.1 only, the number of calls is fixed,
//! and the whole run shares one deadline (`--max-seconds`); the tool exits
//! non-zero if any call fails, a check fails or the deadline passes. It
//! raises its open-file limit to the hard limit first (the server, its
//! child, inherits it).
//!
//! ```text
//! cargo build --release -p mabe-benches -p mabe-proxy --bin mabe-proxy-load --bin mabe-proxy
//! target/release/mabe-proxy-load --backend sqlite
//! scripts/with-postgres target/release/mabe-proxy-load --backend postgres
//! ```

use std::{
    io::Cursor,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, ensure};
use ark_std::rand::rngs::OsRng;
use clap::Parser;
use mabe_abe::{EncryptOptions, Header, PublicKeyRing};
use mabe_benches::load::{
    LoadArgs, Outcome, Server, connect, ensure_nofile_for, measure, print_log, run_cli,
    setup_calls, sibling_bin, why,
};
use mabe_benches::{attributes, fixture, flat_policy, note};
use mabe_proto::v1::{
    GetRecordRequest, RecordHead, get_record_response, record_store_client::RecordStoreClient,
};
use mabe_proxy::{MAX_MESSAGE_BYTES, client::RecordClient, datadir::DataDir};
use sha2::{Digest, Sha256};
use tokio::{process::Command, time::Instant};
use tonic::transport::Channel;

const PROXY_ID: &str = "load-proxy";

/// Read load generator for one mabe-proxy node (loopback only, bounded).
#[derive(Parser, Debug)]
#[command(name = "mabe-proxy-load", version)]
struct Args {
    #[command(flatten)]
    load: LoadArgs,
    /// Records stored before the reads.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Plaintext bytes per record (the stored payload is its STREAM
    /// ciphertext: 16 bytes longer per 64 KiB segment).
    #[arg(long, default_value_t = 4096)]
    payload: usize,
    /// Rows of each record's header: an AND of this many attributes spread
    /// over two authorities.
    #[arg(long, default_value_t = 2)]
    rows: usize,
    /// Measured runs against the same node and records.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Records uploaded (over their own connections) while each run's reads
    /// are in flight.
    #[arg(long, default_value_t = 0)]
    uploads_during: usize,
    /// Uploads in flight (setup, and during the reads).
    #[arg(long, default_value_t = 32)]
    upload_in_flight: usize,
    /// Text added to the scenario column (e.g. the build measured).
    #[arg(long)]
    label: Option<String>,
    /// The `mabe-proxy` binary (default: the one next to this executable).
    #[arg(long)]
    proxy_bin: Option<PathBuf>,
    /// Deadline for the whole run, setup and checks included, in seconds.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            note!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the run passed; the tables are printed either way.
async fn run(args: &Args) -> Result<bool> {
    ensure!(args.records > 0, "--records must be at least 1");
    args.load.check()?;
    ensure!(args.runs > 0, "--runs must be at least 1");
    ensure!((1..=100).contains(&args.rows), "--rows must be 1 to 100");
    ensure!(
        args.upload_in_flight > 0,
        "--upload-in-flight must be at least 1"
    );
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    ensure_nofile_for(args.load.connections + args.upload_in_flight.min(32))?;
    let bin = sibling_bin("mabe-proxy", args.proxy_bin.as_deref(), "mabe-proxy")?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let db = args.load.database("mabe_proxy_load", deadline).await?;
    let node = ProxyNode {
        bin,
        dir: tmp.path().join("proxy"),
        db: db.as_ref().map(|d| d.url.clone()),
    };
    let result = drive(args, &node, tmp.path(), deadline).await;
    if let Some(db) = &db {
        db.drop_database().await;
    }
    let (rows, ok) = result?;
    args.load.print_tables(&rows, true);
    Ok(ok)
}

/// The `mabe-proxy` binary with this run's data directory and database.
struct ProxyNode {
    bin: PathBuf,
    dir: PathBuf,
    db: Option<String>,
}

impl ProxyNode {
    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--data-dir").arg(&self.dir);
        if let Some(db) = &self.db {
            c.arg("--database-url").arg(db);
        }
        c.env_remove("MABE_PROXY_DIR")
            .env_remove("MABE_PROXY_DATABASE_URL")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn cli(&self, args: &[&str], deadline: Instant) -> Result<String> {
        let mut cmd = self.command();
        cmd.args(args);
        run_cli(cmd, &format!("mabe-proxy {}", args.join(" ")), deadline).await
    }

    async fn serve(&self, args: &Args, log: &Path, deadline: Instant) -> Result<Server> {
        let mut c = self.command();
        c.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        if let Some(t) = args.load.request_timeout {
            c.arg("--request-timeout").arg(t.to_string());
        }
        c.env("RUST_LOG", &args.load.server_log);
        Server::start(c, log, deadline)
            .await
            .with_context(|| format!("starting {} serve", self.bin.display()))
    }
}

/// One stored record as the load generator expects to read it back.
struct Stored {
    record_id: [u8; 16],
    header: Vec<u8>,
    payload_size: u64,
    payload_sha256: [u8; 32],
}

/// A record encrypted for upload.
struct Sealed {
    record_id: [u8; 16],
    header: Vec<u8>,
    payload: Vec<u8>,
}

/// Encrypt `n` records (on every core): headers of `rows` rows, `payload`
/// plaintext bytes each.
async fn seal(n: usize, rows: usize, payload: usize) -> Result<Vec<Sealed>> {
    let attrs = attributes(rows, 2);
    let policy = Arc::new(flat_policy(&attrs, true));
    let directory: Arc<PublicKeyRing> = Arc::new(fixture(&attrs)?.directory);
    let workers = std::thread::available_parallelism().map_or(2, |p| p.get());
    let per = n.div_ceil(workers);
    let mut tasks = Vec::new();
    for w in 0..workers {
        let count = per.min(n.saturating_sub(w * per));
        let (policy, directory) = (Arc::clone(&policy), Arc::clone(&directory));
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                let plain: Vec<u8> = (0..payload).map(|b| (b + i + w) as u8).collect();
                let mut ct = Vec::with_capacity(payload + 64);
                let header = mabe_abe::encrypt(
                    &policy,
                    &directory,
                    &EncryptOptions::default(),
                    &mut OsRng,
                    plain.as_slice(),
                    &mut ct,
                )?;
                out.push(Sealed {
                    record_id: *header.rid().as_bytes(),
                    header: header.to_bytes(),
                    payload: ct,
                });
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.context("an encryption task failed")??);
    }
    Ok(all)
}

/// Upload `records` over `channels`, `in_flight` at a time; what was stored.
async fn upload(
    what: &str,
    records: Vec<Sealed>,
    channels: &[Channel],
    in_flight: usize,
    deadline: Instant,
) -> Result<Vec<Stored>> {
    let mut records: Vec<Option<Sealed>> = records.into_iter().map(Some).collect();
    let channels = channels.to_vec();
    setup_calls(what, records.len(), in_flight, deadline, |i| {
        let rec = records.get_mut(i).and_then(Option::take);
        let channel = channels.get(i % channels.len().max(1)).cloned();
        async move {
            let (Some(rec), Some(channel)) = (rec, channel) else {
                return Err(anyhow!("no record or channel for upload {i}"));
            };
            let stored = Stored {
                record_id: rec.record_id,
                payload_size: rec.payload.len() as u64,
                payload_sha256: Sha256::digest(&rec.payload).into(),
                header: rec.header,
            };
            let rid = RecordClient::from_channel(channel)
                .put(&stored.header, Cursor::new(rec.payload))
                .await?;
            ensure!(
                rid == stored.record_id,
                "the proxy stored the record under another id"
            );
            Ok(stored)
        }
    })
    .await
}

/// Setup, the measured runs and their checks, with the server running.
async fn drive(
    args: &Args,
    node: &ProxyNode,
    tmp: &Path,
    deadline: Instant,
) -> Result<(Vec<Outcome>, bool)> {
    let started = Instant::now();
    let out = node
        .cli(&["init", "--proxy-id", PROXY_ID], deadline)
        .await?;
    ensure!(out.contains("initialised proxy"), "init said: {out}");
    let cert = std::fs::read(DataDir::new(&node.dir).tls_cert())
        .context("reading the dev TLS certificate")?;
    let log = tmp.join("server.log");
    let mut server = node.serve(args, &log, deadline).await?;
    note!(
        "{} proxy serving on {} (admin {}), init {:.1?}",
        args.load.backend.name(),
        server.public,
        server.admin,
        started.elapsed()
    );
    let result = measured_runs(args, &cert, &server, deadline).await;
    let stopped = server.stop().await;
    let (rows, ok) = match (result, stopped) {
        (Ok(r), Ok(())) => r,
        (Err(e), _) | (Ok(_), Err(e)) => {
            print_log(&log);
            return Err(e);
        }
    };
    if !ok {
        print_log(&log);
    }
    note!("total {:.1?}", started.elapsed());
    Ok((rows, ok))
}

async fn measured_runs(
    args: &Args,
    cert: &[u8],
    server: &Server,
    deadline: Instant,
) -> Result<(Vec<Outcome>, bool)> {
    let channels = connect(cert, server.public, args.load.connections, deadline).await?;
    let upload_channels =
        connect(cert, server.public, args.upload_in_flight.min(32), deadline).await?;
    let t = Instant::now();
    let sealed = seal(args.records, args.rows, args.payload).await?;
    note!(
        "setup: {} records of {} rows and {} payload bytes encrypted in {:.1?}",
        sealed.len(),
        args.rows,
        sealed.first().map_or(0, |s| s.payload.len()),
        t.elapsed()
    );
    let stored = Arc::new(
        upload(
            "uploads",
            sealed,
            &upload_channels,
            args.upload_in_flight,
            deadline,
        )
        .await?,
    );
    let mut rows = Vec::new();
    let mut ok = true;
    for run in 1..=args.runs {
        let mut scenario = if args.payload % 1024 == 0 {
            format!("get {} KiB", args.payload / 1024)
        } else {
            format!("get {} B", args.payload)
        };
        if args.uploads_during > 0 {
            scenario.push_str(&format!(" + {} uploads", args.uploads_during));
        }
        if let Some(l) = &args.label {
            scenario.push_str(&format!(" ({l})"));
        }
        if args.runs > 1 {
            scenario.push_str(&format!(" #{run}"));
        }
        let writes = if args.uploads_during > 0 {
            let sealed = seal(args.uploads_during, args.rows, args.payload).await?;
            let channels = upload_channels.clone();
            let in_flight = args.upload_in_flight;
            Some(tokio::spawn(async move {
                upload(
                    "uploads during the reads",
                    sealed,
                    &channels,
                    in_flight,
                    deadline,
                )
                .await
            }))
        } else {
            None
        };
        let outcome = read_phase(args, &scenario, &channels, &stored, server, deadline).await?;
        if let Some(w) = writes {
            let written = w.await.context("the upload task failed")??;
            note!("{scenario}: {} uploads during the reads", written.len());
        }
        ok &= outcome.passed();
        rows.push(outcome);
    }
    Ok((rows, ok))
}

/// A `GetRecord` answer as received: the head and the payload chunks.
type Answer = (RecordHead, Vec<Vec<u8>>);

async fn get(
    mut client: RecordStoreClient<Channel>,
    record_id: [u8; 16],
) -> Result<Answer, String> {
    let mut stream = client
        .get_record(GetRecordRequest {
            record_id: record_id.to_vec(),
        })
        .await
        .map_err(|s| why(&s))?
        .into_inner();
    let head = match stream.message().await.map_err(|s| why(&s))? {
        Some(m) => match m.part {
            Some(get_record_response::Part::Head(h)) => h,
            _ => return Err("the answer does not start with the record head".into()),
        },
        None => return Err("an empty answer".into()),
    };
    let mut chunks = Vec::new();
    while let Some(m) = stream.message().await.map_err(|s| why(&s))? {
        match m.part {
            Some(get_record_response::Part::Chunk(c)) => chunks.push(c),
            _ => return Err("a message that is not a payload chunk".into()),
        }
    }
    Ok((head, chunks))
}

/// One measured run of `args.load.requests` reads, then the checks of every answer.
async fn read_phase(
    args: &Args,
    scenario: &str,
    channels: &[Channel],
    stored: &Arc<Vec<Stored>>,
    server: &Server,
    deadline: Instant,
) -> Result<Outcome> {
    let calls: Vec<_> = (0..args.load.requests)
        .map(|i| {
            let channel = channels[i % channels.len()].clone();
            let client =
                RecordStoreClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
            let rid = stored[i % stored.len()].record_id;
            get(client, rid)
        })
        .collect();
    note!(
        "{scenario}: {} calls over {} records, {} in flight over {} connections",
        args.load.requests,
        stored.len(),
        args.load.in_flight.min(args.load.requests),
        channels.len()
    );
    let (mut outcome, answers) = measure(
        scenario,
        calls,
        args.load.in_flight,
        channels.len(),
        deadline,
        server.child.id(),
    )
    .await?;
    let t = Instant::now();
    let failures = check_answers(answers, stored).await?;
    note!(
        "{scenario}: {} answers checked in {:.1?}",
        outcome.hist.len(),
        t.elapsed()
    );
    for f in failures.iter().take(5) {
        note!("CHECK FAILED: {f}");
    }
    if failures.len() > 5 {
        note!("... and {} more failed checks", failures.len() - 5);
    }
    outcome.check_failures = failures;
    Ok(outcome)
}

/// Check every answer against what was stored (on every core); the failures.
async fn check_answers(
    answers: Vec<(usize, Answer)>,
    stored: &Arc<Vec<Stored>>,
) -> Result<Vec<String>> {
    let workers = std::thread::available_parallelism().map_or(2, |p| p.get());
    let per = answers.len().div_ceil(workers).max(1);
    let mut answers = answers;
    let mut tasks = Vec::new();
    while !answers.is_empty() {
        let rest = answers.split_off(per.min(answers.len()));
        let part = std::mem::replace(&mut answers, rest);
        let stored = Arc::clone(stored);
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut failures = Vec::new();
            let mut decoded = std::collections::BTreeSet::new();
            for (i, (head, chunks)) in part {
                let Some(want) = stored.get(i % stored.len().max(1)) else {
                    failures.push(format!("call {i}: no such record"));
                    continue;
                };
                if let Err(e) = check_one(&head, &chunks, want, &mut decoded) {
                    failures.push(format!("call {i}: {e}"));
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for t in tasks {
        failures.extend(t.await.context("a check task failed")?);
    }
    Ok(failures)
}

/// One answer: header bytes, payload size and digest; the header decodes
/// with full validation to the requested id (once per distinct header).
fn check_one(
    head: &RecordHead,
    chunks: &[Vec<u8>],
    want: &Stored,
    decoded: &mut std::collections::BTreeSet<[u8; 16]>,
) -> Result<(), String> {
    let size: u64 = chunks.iter().map(|c| c.len() as u64).sum();
    let mut sha = Sha256::new();
    for c in chunks {
        sha.update(c);
    }
    let sha: [u8; 32] = sha.finalize().into();
    if size != want.payload_size || head.payload_size != want.payload_size {
        return Err(format!(
            "payload of {size} bytes (head says {}), stored {}",
            head.payload_size, want.payload_size
        ));
    }
    if sha != want.payload_sha256 || head.payload_sha256.as_slice() != want.payload_sha256 {
        return Err("the payload's SHA-256 differs from the stored payload's".into());
    }
    if head.header != want.header {
        return Err("the header differs from the stored header".into());
    }
    if decoded.insert(want.record_id) {
        let h = Header::from_bytes(&head.header).map_err(|e| format!("header: {e}"))?;
        if *h.rid().as_bytes() != want.record_id {
            return Err("the header belongs to another record".into());
        }
    }
    Ok(())
}
