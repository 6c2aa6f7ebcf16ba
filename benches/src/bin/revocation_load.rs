//! `mabe-revocation-load`: how fast a revocation updates stored records.
//!
//! Runs the real `mabe-authority` and `mabe-proxy` binaries (built next to
//! this program) on loopback with TLS, over SQLite or PostgreSQL: stores
//! `--records` records of `--payload` bytes, each with one row of the
//! attribute being revoked, then times `mabe-authority revoke` from start to
//! exit (freeze, snapshot, tokens for every row on every core, the proxy's
//! updates, erasing the update secret). Afterwards it checks that a sample of
//! records decrypts for the remaining holder and not for the revoked one,
//! and prints one Markdown table row.
//!
//! ```text
//! cargo build --release -p mabe-benches -p mabe-authority -p mabe-proxy \
//!     --bin mabe-revocation-load --bin mabe-authority --bin mabe-proxy
//! target/release/mabe-revocation-load --records 10000 --payload 1024
//! ```

use std::{io::Cursor, sync::Arc, time::Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, ValueEnum};
use mabe_interop_tests::{Authority, Backend, Person, Proxy, decrypt, encrypt};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Store {
    Sqlite,
    Postgres,
}

#[derive(Parser, Debug)]
#[command(
    name = "mabe-revocation-load",
    about = "Time a revocation over many stored records"
)]
struct Args {
    /// Storage of the authority and the proxy (PostgreSQL needs
    /// MABE_TEST_DATABASE_URL, e.g. through scripts/with-postgres).
    #[arg(long, value_enum, default_value = "sqlite")]
    backend: Store,
    /// Stored records, each with one row of the revoked attribute.
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Uploads in flight.
    #[arg(long, default_value_t = 16)]
    uploads: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let backend = match args.backend {
        Store::Sqlite => Backend::Sqlite,
        Store::Postgres => Backend::Postgres,
    };
    let tmp = tempfile::tempdir()?;
    let mut a = Authority::init(
        tmp.path(),
        "hospital-a",
        backend.database_url("mabe_rl_a").await?,
    )?;
    a.ok(&["attribute", "create", "cardiology"])?;
    let doc = Person::new("19012345601")?;
    let colleague = Person::new("19012345602")?;
    for p in [&doc, &colleague] {
        a.enroll(p, &[])?;
        a.ok(&["grant", "--gid", &p.gid.to_string(), "--attr", "cardiology"])?;
    }
    let mut proxy = Proxy::init(
        tmp.path(),
        "cloud-1",
        backend.database_url("mabe_rl_p").await?,
    )?;
    proxy.trust(&a)?;
    proxy.serve()?;
    a.serve(&["--drive-rotations-every", "0"])?;
    proxy.register_at(&a)?;
    let pks = Arc::new(a.directory().await?);

    eprintln!("storing {} records of {} bytes", args.records, args.payload);
    let t = Instant::now();
    let body = Arc::new(vec![0x5au8; args.payload]);
    let mut tasks = Vec::new();
    let per = args.records.div_ceil(args.uploads.max(1));
    for w in 0..args.uploads.max(1) {
        let n = per.min(args.records.saturating_sub(w * per));
        let (pks, body) = (Arc::clone(&pks), Arc::clone(&body));
        let mut store = proxy.records().await?;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(n);
            for _ in 0..n {
                let (pks, body) = (Arc::clone(&pks), Arc::clone(&body));
                let (header, ct) = tokio::task::spawn_blocking(move || {
                    encrypt("cardiology@hospital-a", &pks, &body)
                })
                .await??;
                ids.push(store.put(&header, Cursor::new(ct)).await?);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await??);
    }
    eprintln!("stored in {:.1} s", t.elapsed().as_secs_f64());

    // The doctor's keys from before the revocation.
    let mut old = doc.ring()?;
    a.fetch_keys(&doc, &mut old).await?;
    let t = Instant::now();
    let out = a.ok(&[
        "revoke",
        "--gid",
        &doc.gid.to_string(),
        "--attr",
        "cardiology",
    ])?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(
        out.contains("rotation #1 done"),
        "revoke did not finish: {out}"
    );

    // Spot checks: the remaining holder reads, the revoked one does not.
    let mut keys = colleague.ring()?;
    a.fetch_keys(&colleague, &mut keys).await?;
    let pks2 = a.directory().await?;
    let mut store = proxy.records().await?;
    for id in ids.iter().step_by((ids.len() / 20).max(1)) {
        let (header, ct) = store.get(id, Vec::new()).await?;
        ensure!(decrypt(&header, &ct, &keys, &pks2).context("remaining holder")? == *body);
        ensure!(decrypt(&header, &ct, &old, &pks2).is_err());
    }
    let backend_name = match args.backend {
        Store::Sqlite => "SQLite",
        Store::Postgres => "PostgreSQL",
    };
    println!("| backend | records | payload (B) | rows | revoke wall (s) | rows/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| {backend_name} | {} | {} | {} | {secs:.2} | {:.0} |",
        ids.len(),
        args.payload,
        ids.len(),
        ids.len() as f64 / secs
    );
    a.served.take().map(|s| s.stop()).transpose()?;
    proxy.served.take().map(|s| s.stop()).transpose()?;
    Ok(())
}
