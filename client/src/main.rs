//! `mabe`: multi-authority encryption of health records, for the people who
//! read and write them. See `mabe --help` and `docs/CLIENT.md`.

use std::{
    fs,
    io::{self, IsTerminal, Read, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use ark_std::rand::rngs::OsRng;
use clap::{Parser, Subcommand};
use mabe_abe::EncryptOptions;
use mabe_client::{
    Client, ClientError, KeyStore, ProxyEndpoint, TrustStore, TrustedAuthority, inspect,
    json::{SectionPolicies, decrypt_json, encrypt_json},
    record::{SignatureStatus, Writer},
    records,
};
use mabe_policy::{Attribute, AuthorityId};
use zeroize::Zeroizing;

mod demo;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  an error (the message says what and what to do)
  2  usage error
  3  cannot decrypt: the policy is not satisfied by your keys, a key or the
     record is at another version, or the record is corrupted
  4  signature problem: the record is unsigned or its signature does not verify
  5  trust problem: an authority not in your trust file, a directory or key that
     failed verification, an expired directory, a superseded public key
  6  an authority or a record store could not be reached or refused the call

Files: the key store is --home, else $MABE_HOME, else ~/.mabe. A protected key
store reads its passphrase from --passphrase-file, else $MABE_PASSPHRASE, else
a prompt on the terminal.";

#[derive(Parser, Debug)]
#[command(
    name = "mabe",
    version,
    about = "Multi-authority attribute-based encryption for hospitals",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Key store directory (default: $MABE_HOME, else ~/.mabe).
    #[arg(long, global = true)]
    home: Option<PathBuf>,
    /// Read the key store's passphrase from this file.
    #[arg(long, global = true)]
    passphrase_file: Option<PathBuf>,
    /// Never contact an authority: use the stored directories only.
    #[arg(long, global = true)]
    offline: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Your identity: GID and request key.
    #[command(subcommand)]
    Identity(IdentityCmd),
    /// The trust file: pinned authorities, emergency attributes, known writers.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Your attribute keys: request, fetch, list, import.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Encrypt a file (or stdin) under a policy into a signed record.
    Encrypt {
        /// Policy, e.g. "doctor@hospital-a AND cardiology@hospital-a OR EMERGENCY".
        #[arg(long)]
        policy: String,
        /// Input file, or - for stdin.
        #[arg(long = "in", default_value = "-")]
        input: String,
        /// Output record, or - for stdout.
        #[arg(long = "out", default_value = "-")]
        output: String,
        /// Do not sign the record (readers refuse it unless they allow unsigned records).
        #[arg(long)]
        no_sign: bool,
    },
    /// Decrypt a record; prints the verified writer on stderr.
    Decrypt {
        /// Input record, or - for stdin.
        #[arg(long = "in", default_value = "-")]
        input: String,
        /// Output file, or - for stdout.
        #[arg(long = "out", default_value = "-")]
        output: String,
        /// Accept a record that carries no signature.
        #[arg(long)]
        allow_unsigned: bool,
        /// Keep the output even if the signature does not verify (dangerous).
        #[arg(long)]
        allow_bad_signature: bool,
    },
    /// Encrypt each section of a JSON record under its own policy.
    EncryptJson {
        /// TOML file with a [sections] table: section name = policy.
        #[arg(long)]
        policies: PathBuf,
        /// JSON record (an object of sections), or - for stdin.
        #[arg(long = "in", default_value = "-")]
        input: String,
        /// Output, or - for stdout.
        #[arg(long = "out", default_value = "-")]
        output: String,
        /// Do not sign the sections.
        #[arg(long)]
        no_sign: bool,
    },
    /// Decrypt the sections of a JSON record you may see; the others are marked withheld.
    DecryptJson {
        /// Encrypted JSON document, or - for stdin.
        #[arg(long = "in", default_value = "-")]
        input: String,
        /// Output, or - for stdout.
        #[arg(long = "out", default_value = "-")]
        output: String,
        /// Accept sections that carry no signature.
        #[arg(long)]
        allow_unsigned: bool,
    },
    /// Records at a record store (mabe-proxy): store, fetch, list, delete.
    #[command(subcommand)]
    Record(RecordCmd),
    /// Signed directories of the authorities' public keys: list, import.
    #[command(subcommand)]
    Directory(DirectoryCmd),
    /// Policies.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Print every field of a record (or a bare header).
    Inspect {
        /// Record file, or - for stdin.
        file: String,
        /// JSON with every group element in hex, as docs/FORMAT.md encodes it.
        #[arg(long)]
        json: bool,
    },
    /// Run the whole scenario on in-process authorities (a demonstration).
    Demo {
        /// Keep the authorities' data in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum IdentityCmd {
    /// Create your identity: a new Ed25519 request key; prints the GID.
    New {
        /// Registry that verifies your identity (e.g. big-register, national-id).
        #[arg(long)]
        registry: String,
        /// Your identity within the registry.
        #[arg(long)]
        subject: String,
        /// Protect the key store with a passphrase (Argon2id + AES-256-GCM).
        #[arg(long)]
        passphrase: bool,
    },
    /// Print your GID and request public key (for enrollment).
    Show,
}

#[derive(Subcommand, Debug)]
enum TrustCmd {
    /// Pin an authority (replaces an entry with the same id).
    Add {
        /// Authority id, e.g. hospital-a.
        #[arg(long)]
        id: String,
        /// https://host:port of its public listener (omit for an offline authority).
        #[arg(long)]
        endpoint: Option<String>,
        /// Its Ed25519 identity public key, 64 hex digits (from `mabe-authority info`).
        #[arg(long)]
        identity_key: String,
        /// Its TLS root certificate (PEM file); required with --endpoint.
        #[arg(long)]
        tls_root: Option<PathBuf>,
        /// TLS server name to check.
        #[arg(long, default_value = "localhost")]
        tls_name: String,
    },
    /// List pinned authorities and emergency attributes.
    List,
    /// Remove a pinned authority.
    Remove {
        /// Authority id.
        id: String,
    },
    /// Set the consortium's emergency attributes (what EMERGENCY expands to).
    Emergency {
        /// Attributes, e.g. emergency@hospital-a emergency@hospital-b (none: clear).
        attributes: Vec<String>,
    },
    /// Add a record store (mabe-proxy) for `mabe record` (replaces one with the same id).
    Proxy {
        /// Proxy id, e.g. cloud-1 (from `mabe-proxy init`).
        #[arg(long)]
        id: String,
        /// https://host:port of its public listener.
        #[arg(long)]
        endpoint: String,
        /// Its TLS root certificate (PEM file).
        #[arg(long)]
        tls_root: PathBuf,
        /// TLS server name to check.
        #[arg(long, default_value = "localhost")]
        tls_name: String,
    },
    /// Name a writer's Ed25519 key, so decrypt can say who wrote a record.
    Writer {
        /// A name, e.g. "hospital-a records system".
        #[arg(long)]
        name: String,
        /// Their request public key, 64 hex digits.
        #[arg(long)]
        key: String,
    },
}

#[derive(Subcommand, Debug)]
enum KeysCmd {
    /// Ask an authority for an attribute, with a reason.
    Request {
        /// Authority id.
        #[arg(long)]
        authority: String,
        /// Attribute name (with or without @authority).
        #[arg(long)]
        attr: String,
        /// Why you need it (stored in the authority's audit log).
        #[arg(long)]
        reason: String,
    },
    /// Fetch your granted keys from every online authority (or one); each is verified before it is stored.
    Fetch {
        /// Only this authority.
        #[arg(long)]
        authority: Option<String>,
    },
    /// Emergency access: get an authority's emergency key now, with a reason
    /// (emergency staff only; audited by the authority; the key expires).
    BreakGlass {
        /// Authority id.
        #[arg(long)]
        authority: String,
        /// Why (stored in the authority's audit log).
        #[arg(long)]
        reason: String,
    },
    /// List the keys you hold.
    List,
    /// Import an offline key bundle (from `mabe-authority issue --out`).
    Import {
        /// Bundle file.
        file: PathBuf,
    },
    /// Export your keys and the verified public keys as JSON (docs/FORMAT.md
    /// §9.5), e.g. for another implementation. The output holds your SECRET
    /// keys: a file is created with mode 0600.
    Export {
        /// Output file, or - for stdout (no default, on purpose).
        #[arg(long = "out")]
        output: String,
    },
}

#[derive(Subcommand, Debug)]
enum DirectoryCmd {
    /// Import a signed directory file (from `mabe-authority directory export`,
    /// e.g. of a patient's personal authority that has no endpoint); it is
    /// verified against the authority's pinned identity key.
    Import {
        /// Directory file.
        file: PathBuf,
    },
    /// List the stored directories: validity and every attribute version.
    List,
}

#[derive(Subcommand, Debug)]
enum RecordCmd {
    /// Store a record (as `mabe encrypt` wrote it) at a record store; prints its id.
    Put {
        /// Record store id from your trust file (optional if it lists only one).
        #[arg(long)]
        proxy: Option<String>,
        /// Record file, or - for stdin.
        #[arg(long = "in", default_value = "-")]
        input: String,
    },
    /// Fetch a record (with its header as the latest revocation left it).
    Get {
        /// Record store id from your trust file (optional if it lists only one).
        #[arg(long)]
        proxy: Option<String>,
        /// Record id, 32 hex digits (as `mabe record put` printed it).
        #[arg(long)]
        id: String,
        /// Output record, or - for stdout; then `mabe decrypt --in` it.
        #[arg(long = "out", default_value = "-")]
        output: String,
    },
    /// List the records at a record store with the version of each row.
    List {
        /// Record store id from your trust file (optional if it lists only one).
        #[arg(long)]
        proxy: Option<String>,
    },
    /// Delete a record from a record store.
    Delete {
        /// Record store id from your trust file (optional if it lists only one).
        #[arg(long)]
        proxy: Option<String>,
        /// Record id, 32 hex digits.
        #[arg(long)]
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Parse a policy: canonical form, authorities, and whether your keys satisfy it.
    Check {
        /// Policy text.
        policy: String,
    },
}

fn home(cli: &Cli) -> Result<PathBuf> {
    Ok(match &cli.home {
        Some(h) => h.clone(),
        None => KeyStore::default_home()?,
    })
}

fn passphrase(cli: &Cli, new: bool) -> Result<Option<Zeroizing<String>>> {
    if let Some(f) = &cli.passphrase_file {
        let text = Zeroizing::new(
            fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        );
        return Ok(Some(Zeroizing::new(
            text.trim_end_matches(['\r', '\n']).to_owned(),
        )));
    }
    if let Ok(p) = std::env::var("MABE_PASSPHRASE") {
        return Ok(Some(Zeroizing::new(p)));
    }
    // The prompt reads the controlling terminal, not stdin, so piped input
    // (`cat scan | mabe encrypt …`) still gets a prompt when there is one.
    if !has_terminal() {
        return Ok(None);
    }
    let p = Zeroizing::new(rpassword::prompt_password("key store passphrase: ")?);
    if new {
        let again = Zeroizing::new(rpassword::prompt_password("again: ")?);
        if *again != *p {
            bail!("the passphrases differ");
        }
    }
    Ok(Some(p))
}

/// Whether this process has a controlling terminal to prompt on.
fn has_terminal() -> bool {
    if io::stdin().is_terminal() {
        return true;
    }
    cfg!(unix)
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/tty")
            .is_ok()
}

/// The key store, with the passphrase attached when it is protected.
fn store(cli: &Cli) -> Result<KeyStore> {
    let store = KeyStore::open(home(cli)?);
    match store.identity_info() {
        Ok(info) if info.protected => match passphrase(cli, false)? {
            Some(p) => Ok(store.with_passphrase(p)),
            None => Err(ClientError::PassphraseNeeded(store.identity_path()).into()),
        },
        _ => Ok(store),
    }
}

fn client(cli: &Cli) -> Result<Client> {
    Ok(Client::open(store(cli)?)?)
}

fn open_input(path: &str) -> Result<(Box<dyn Read>, Option<u64>)> {
    if path == "-" {
        return Ok((Box::new(io::stdin().lock()), None));
    }
    let f = fs::File::open(path).with_context(|| format!("opening {path}"))?;
    let len = f.metadata().ok().map(|m| m.len());
    Ok((Box::new(io::BufReader::with_capacity(1 << 16, f)), len))
}

/// Output that reaches its final name only on [`Output::commit`].
enum Output {
    Stdout(io::BufWriter<io::Stdout>),
    File {
        tmp: io::BufWriter<tempfile::NamedTempFile>,
        path: PathBuf,
    },
}

impl Output {
    fn create(path: &str) -> Result<Output> {
        if path == "-" {
            return Ok(Output::Stdout(io::BufWriter::with_capacity(
                1 << 16,
                io::stdout(),
            )));
        }
        let path = PathBuf::from(path);
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        Ok(Output::File {
            tmp: io::BufWriter::with_capacity(1 << 16, tmp),
            path,
        })
    }

    fn commit(self) -> Result<()> {
        match self {
            Output::Stdout(mut w) => Ok(w.flush()?),
            Output::File { tmp, path } => {
                let tmp = tmp.into_inner().map_err(|e| e.into_error())?;
                tmp.as_file().sync_all()?;
                tmp.persist(&path)
                    .map_err(|e| e.error)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(())
            }
        }
    }

    fn is_stdout(&self) -> bool {
        matches!(self, Output::Stdout(_))
    }
}

impl Write for Output {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Output::Stdout(w) => w.write(b),
            Output::File { tmp, .. } => tmp.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.flush(),
            Output::File { tmp, .. } => tmp.flush(),
        }
    }
}

/// A progress bar on stderr for large inputs, only when stderr is a terminal.
fn progress(len: Option<u64>) -> Option<indicatif::ProgressBar> {
    if !io::stderr().is_terminal() || len.is_some_and(|l| l < 16 << 20) {
        return None;
    }
    let pb = match len {
        Some(l) => indicatif::ProgressBar::new(l),
        None => indicatif::ProgressBar::new_spinner(),
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {wide_bar}",
    ) {
        pb.set_style(style);
    }
    Some(pb)
}

fn with_progress(
    r: Box<dyn Read>,
    len: Option<u64>,
) -> (Box<dyn Read>, Option<indicatif::ProgressBar>) {
    match progress(len) {
        Some(pb) => (Box::new(pb.wrap_read(r)), Some(pb)),
        None => (r, None),
    }
}

fn describe_writer(trust: &TrustStore, w: &Writer) -> String {
    match trust.writer_name(&w.key) {
        Some(name) => format!(
            "{name} (GID {}, key {})",
            w.gid,
            hex::encode(w.key.as_bytes())
        ),
        None => format!(
            "GID {} with key {} (a key not named in your trust file: the GID is the writer's claim)",
            w.gid,
            hex::encode(w.key.as_bytes())
        ),
    }
}

fn read_all(path: &str, max: usize) -> Result<Vec<u8>> {
    let (r, _) = open_input(path)?;
    let mut out = Vec::new();
    r.take(max as u64 + 1).read_to_end(&mut out)?;
    if out.len() > max {
        bail!("{path} is larger than {max} bytes");
    }
    Ok(out)
}

fn attribute(authority: &str, attr: &str) -> Result<Attribute> {
    let id = AuthorityId::new(authority)?;
    let a: Attribute = if attr.contains('@') {
        attr.parse()?
    } else {
        Attribute::new(attr, &id)?
    };
    if a.authority() != &id {
        bail!("{a} is not an attribute of {id}");
    }
    Ok(a)
}

async fn run(cli: Cli) -> Result<()> {
    let online = !cli.offline;
    match &cli.command {
        Command::Identity(IdentityCmd::New {
            registry,
            subject,
            passphrase: protect,
        }) => {
            let mut store = KeyStore::open(home(&cli)?);
            if *protect {
                let p = passphrase(&cli, true)?.ok_or_else(|| {
                    anyhow!("--passphrase needs a passphrase: --passphrase-file, MABE_PASSPHRASE or a terminal")
                })?;
                if p.len() < 8 {
                    bail!("use a passphrase of at least 8 characters");
                }
                store = store.with_passphrase(p);
            }
            let info = store.create_identity(registry, subject, None, &mut OsRng)?;
            println!("GID: {}", info.gid);
            println!("request key: {}", hex::encode(info.request_key.as_bytes()));
            println!(
                "key store: {}{}",
                store.home().display(),
                if info.protected {
                    " (passphrase-protected)"
                } else {
                    ""
                }
            );
            println!(
                "Give the registry, subject and request key to each authority that enrolls you."
            );
        }
        Command::Identity(IdentityCmd::Show) => {
            let info = KeyStore::open(home(&cli)?).identity_info()?;
            println!("registry: {}", info.registry);
            println!("subject: {}", info.subject);
            println!("GID: {}", info.gid);
            println!("request key: {}", hex::encode(info.request_key.as_bytes()));
            println!("protected: {}", if info.protected { "yes" } else { "no" });
        }
        Command::Trust(cmd) => {
            let path = KeyStore::open(home(&cli)?).trust_path();
            let mut trust = TrustStore::load_or_empty(&path)?;
            match cmd {
                TrustCmd::Add {
                    id,
                    endpoint,
                    identity_key,
                    tls_root,
                    tls_name,
                } => {
                    let key = hex::decode(identity_key.trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| anyhow!("--identity-key is 64 hexadecimal digits"))?;
                    let identity_key = ed25519_dalek::VerifyingKey::from_bytes(&key)
                        .map_err(|_| anyhow!("--identity-key is not an Ed25519 public key"))?;
                    let tls_root = match tls_root {
                        Some(p) => read_all(&p.to_string_lossy(), 256 * 1024)?,
                        None => Vec::new(),
                    };
                    if endpoint.is_some() && tls_root.is_empty() {
                        bail!("--endpoint needs --tls-root (the authority's TLS root certificate)");
                    }
                    if let Some(e) = endpoint {
                        if !e.starts_with("https://") {
                            bail!("--endpoint must start with https://");
                        }
                    }
                    let id = AuthorityId::new(id)?;
                    trust.add_authority(TrustedAuthority {
                        id: id.clone(),
                        endpoint: endpoint.clone(),
                        identity_key,
                        tls_root,
                        tls_name: tls_name.clone(),
                    })?;
                    trust.save()?;
                    println!("pinned {id} in {}", path.display());
                }
                TrustCmd::List => {
                    for a in trust.authorities() {
                        println!(
                            "{:<24} {:<40} identity key {}",
                            a.id.to_string(),
                            a.endpoint.as_deref().unwrap_or("(offline)"),
                            hex::encode(a.identity_key.as_bytes())
                        );
                    }
                    for p in trust.proxies() {
                        println!("{:<24} {:<40} record store", p.id, p.endpoint);
                    }
                    let e: Vec<String> =
                        trust.emergency().iter().map(ToString::to_string).collect();
                    println!(
                        "emergency: {}",
                        if e.is_empty() {
                            "(none)".into()
                        } else {
                            e.join(", ")
                        }
                    );
                }
                TrustCmd::Remove { id } => {
                    if !trust.remove_authority(&AuthorityId::new(id)?) {
                        bail!("{id} is not in the trust file");
                    }
                    trust.save()?;
                    println!("removed {id}");
                }
                TrustCmd::Emergency { attributes } => {
                    let attrs = attributes
                        .iter()
                        .map(|a| a.parse::<Attribute>())
                        .collect::<Result<Vec<_>, _>>()?;
                    trust.set_emergency(attrs)?;
                    trust.save()?;
                    println!("emergency attributes set ({})", trust.emergency().len());
                }
                TrustCmd::Proxy {
                    id,
                    endpoint,
                    tls_root,
                    tls_name,
                } => {
                    trust.add_proxy(ProxyEndpoint {
                        id: id.clone(),
                        endpoint: endpoint.clone(),
                        tls_root: read_all(&tls_root.to_string_lossy(), 256 * 1024)?,
                        tls_name: tls_name.clone(),
                    })?;
                    trust.save()?;
                    println!("record store {id} added to {}", path.display());
                }
                TrustCmd::Writer { name, key } => {
                    let k = hex::decode(key.trim())
                        .ok()
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
                        .ok_or_else(|| anyhow!("--key is an Ed25519 public key, 64 hex digits"))?;
                    trust.add_writer(name, k)?;
                    trust.save()?;
                    println!("writer {name} added");
                }
            }
        }
        Command::Keys(KeysCmd::Request {
            authority,
            attr,
            reason,
        }) => {
            let c = client(&cli)?;
            let a = attribute(authority, attr)?;
            let id = c.request_attribute(&a, reason).await?;
            println!("request #{id} for {a} sent; once it is approved, run `mabe keys fetch`");
        }
        Command::Keys(KeysCmd::Fetch { authority }) => {
            let c = client(&cli)?;
            let only = authority.as_deref().map(AuthorityId::new).transpose()?;
            let targets: Vec<AuthorityId> = match only {
                Some(id) => vec![id],
                None => c
                    .trust()
                    .authorities()
                    .filter(|t| t.endpoint.is_some())
                    .map(|t| t.id.clone())
                    .collect(),
            };
            if targets.is_empty() {
                bail!("no online authority in your trust file: add one with `mabe trust add`");
            }
            let mut first_err = None;
            for id in targets {
                match c.fetch_keys(Some(&id)).await {
                    Ok(fetched) => {
                        for f in fetched {
                            if f.keys.is_empty() {
                                println!("{}: no keys granted", f.authority);
                            }
                            for (a, v, new) in f.keys {
                                println!(
                                    "{}: {a} version {v} verified{}",
                                    f.authority,
                                    if new {
                                        " and stored"
                                    } else {
                                        " (already held)"
                                    }
                                );
                            }
                        }
                    }
                    Err(e) => {
                        eprintln!("error: {id}: {e}");
                        first_err.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e.into());
            }
        }
        Command::Keys(KeysCmd::BreakGlass { authority, reason }) => {
            let c = client(&cli)?;
            let id = AuthorityId::new(authority)?;
            let f = c.break_glass(&id, reason).await?;
            for (a, v, _) in f.keys {
                println!(
                    "{}: emergency key {a} version {v} verified and stored; this access is audited and expires",
                    f.authority
                );
            }
        }
        Command::Keys(KeysCmd::List) => {
            let s = store(&cli)?;
            let keys = s.load_keys()?;
            println!("GID {}", keys.gid());
            let now = mabe_client::unix_now();
            for k in keys.iter() {
                let exp = match k.expires_at {
                    0 => String::new(),
                    t if t < now => format!(" (grant expired at {})", mabe_client::utc_text(t)),
                    t => format!(" (grant expires at {})", mabe_client::utc_text(t)),
                };
                println!("{} version {}{exp}", k.key.attribute(), k.key.version());
            }
        }
        Command::Keys(KeysCmd::Import { file }) => {
            let c = client(&cli)?;
            let bytes = Zeroizing::new(
                fs::read(file).with_context(|| format!("reading {}", file.display()))?,
            );
            for (a, v, new) in c.import_bundle(&bytes, online).await? {
                println!(
                    "{a} version {v} verified{}",
                    if new {
                        " and stored"
                    } else {
                        " (already held)"
                    }
                );
            }
        }
        Command::Keys(KeysCmd::Export { output }) => {
            let c = client(&cli)?;
            let text = c.export_keys()?;
            let mut out = Output::create(output)?;
            out.write_all(text.as_bytes())?;
            out.commit()?;
            if output != "-" {
                eprintln!("exported your keys to {output} (mode 0600): it holds secret keys");
            }
        }
        Command::Encrypt {
            policy,
            input,
            output,
            no_sign,
        } => {
            let c = client(&cli)?;
            let policy = c.policy(policy)?;
            let (pks, notes) = c.encryption_keys(&policy, online).await?;
            for n in notes {
                eprintln!("note: {n}");
            }
            let signer = if *no_sign {
                None
            } else {
                Some(c.store().load_identity()?)
            };
            let (r, len) = open_input(input)?;
            let (r, pb) = with_progress(r, len);
            let mut out = Output::create(output)?;
            let header = c.encrypt(
                &policy,
                &pks,
                signer.as_ref(),
                &EncryptOptions::default(),
                &mut OsRng,
                r,
                &mut out,
            )?;
            out.commit()?;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            let versions: Vec<String> = header
                .rows()
                .iter()
                .map(|r| format!("{}#{}", r.attribute(), r.version()))
                .collect();
            eprintln!(
                "encrypted under {} ({}){}",
                policy,
                versions.join(", "),
                if signer.is_some() {
                    ", signed"
                } else {
                    ", UNSIGNED"
                }
            );
        }
        Command::Decrypt {
            input,
            output,
            allow_unsigned,
            allow_bad_signature,
        } => {
            let c = client(&cli)?;
            let (r, len) = open_input(input)?;
            let (mut r, pb) = with_progress(r, len);
            let opened = c.open_record(&mut r, online).await?;
            if opened.prefix.writer.is_none() && !*allow_unsigned {
                // Known before any payload byte is decrypted: write nothing.
                return Err(ClientError::Unsigned.into());
            }
            let mut out = Output::create(output)?;
            let to_stdout = out.is_stdout();
            let summary = opened.decrypt(r, &mut out);
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            let summary = match summary {
                Ok(s) => s,
                Err(e) => {
                    if to_stdout {
                        eprintln!("error: the output written so far is NOT verified: discard it");
                    }
                    return Err(e.into());
                }
            };
            match summary.signature {
                SignatureStatus::Valid(w) => {
                    out.commit()?;
                    eprintln!("verified writer: {}", describe_writer(c.trust(), &w));
                }
                SignatureStatus::Unsigned if *allow_unsigned => {
                    out.commit()?;
                    eprintln!("warning: the record is not signed: its writer is unknown");
                }
                SignatureStatus::Invalid(w) if *allow_bad_signature => {
                    out.commit()?;
                    eprintln!(
                        "WARNING: the signature does not verify (claimed writer GID {}); output kept as asked",
                        w.gid
                    );
                }
                other => {
                    if to_stdout {
                        eprintln!("error: the output written above is NOT verified: discard it");
                    }
                    // A file output is dropped: nothing reaches its final name.
                    drop(out);
                    other.require_valid()?;
                }
            }
        }
        Command::EncryptJson {
            policies,
            input,
            output,
            no_sign,
        } => {
            let c = client(&cli)?;
            let text = String::from_utf8(read_all(&policies.to_string_lossy(), 1 << 20)?)
                .context("the sections file is not UTF-8")?;
            let policies = SectionPolicies::from_toml(&text)?;
            let record: serde_json::Value =
                serde_json::from_slice(&read_all(input, mabe_client::json::MAX_JSON_BYTES)?)
                    .context("the record is not valid JSON")?;
            let signer = if *no_sign {
                None
            } else {
                Some(c.store().load_identity()?)
            };
            let doc =
                encrypt_json(&c, &policies, &record, signer.as_ref(), online, &mut OsRng).await?;
            let mut out = Output::create(output)?;
            serde_json::to_writer_pretty(&mut out, &doc)?;
            out.write_all(b"\n")?;
            out.commit()?;
        }
        Command::DecryptJson {
            input,
            output,
            allow_unsigned,
        } => {
            let c = client(&cli)?;
            let doc: serde_json::Value =
                serde_json::from_slice(&read_all(input, mabe_client::json::MAX_JSON_BYTES)?)
                    .context("the document is not valid JSON")?;
            let outcome = decrypt_json(&c, &doc, online, *allow_unsigned).await?;
            for (section, sig) in &outcome.signatures {
                match sig {
                    SignatureStatus::Valid(w) => {
                        eprintln!(
                            "{section}: verified writer: {}",
                            describe_writer(c.trust(), w)
                        )
                    }
                    _ => eprintln!("{section}: not signed"),
                }
            }
            if let Some(w) = outcome.value["withheld"].as_object() {
                for (section, why) in w {
                    eprintln!("{section}: withheld: {}", why.as_str().unwrap_or_default());
                }
            }
            let mut out = Output::create(output)?;
            serde_json::to_writer_pretty(&mut out, &outcome.value)?;
            out.write_all(b"\n")?;
            out.commit()?;
        }
        Command::Record(cmd) => record_command(&cli, cmd).await?,
        Command::Directory(DirectoryCmd::Import { file }) => {
            let c = client(&cli)?;
            let bytes = read_all(&file.to_string_lossy(), 8 << 20)?;
            let (dir, stored) = c.import_directory(&bytes)?;
            if stored {
                println!(
                    "directory of {} verified and stored (valid until {})",
                    dir.authority(),
                    dir.valid_until()
                );
            } else {
                println!(
                    "directory of {} verified; a newer one is already stored (valid until {})",
                    dir.authority(),
                    dir.valid_until()
                );
            }
        }
        Command::Directory(DirectoryCmd::List) => {
            let s = store(&cli)?;
            let trust = TrustStore::load_or_empty(&s.trust_path())?;
            let now = mabe_client::unix_now();
            for (id, d) in s.directories(&trust)? {
                println!(
                    "{id}: issued {}, valid until {}{}",
                    d.issued_at(),
                    d.valid_until(),
                    if d.is_expired(now) { " (EXPIRED)" } else { "" }
                );
                for (a, v, e) in d.entries() {
                    println!(
                        "  {a} version {v}{}",
                        if e.current {
                            " (current)"
                        } else {
                            " (superseded)"
                        }
                    );
                }
            }
        }
        Command::Policy(PolicyCmd::Check { policy }) => {
            let store = store(&cli)?;
            let trust = TrustStore::load_or_empty(&store.trust_path())?;
            let c = Client::new(store, trust);
            let report = c.check_policy(policy)?;
            println!("canonical: {}", report.policy);
            for (a, trusted) in &report.authorities {
                println!(
                    "authority: {a}{}",
                    if *trusted {
                        ""
                    } else {
                        " (NOT in your trust file)"
                    }
                );
            }
            let held: Vec<String> = report.held.iter().map(ToString::to_string).collect();
            match &report.missing {
                None => println!(
                    "satisfied by your keys: yes (using {})",
                    report
                        .used
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                Some(missing) => {
                    println!(
                        "satisfied by your keys: no: missing {} (you hold {})",
                        missing
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", "),
                        if held.is_empty() {
                            "no keys".into()
                        } else {
                            held.join(", ")
                        }
                    );
                    std::process::exit(3);
                }
            }
        }
        Command::Inspect { file, json } => {
            let (r, _) = open_input(file)?;
            let v = inspect::inspect(r)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", inspect::to_text(&v));
            }
        }
        Command::Demo { keep } => demo::run(keep.clone()).await?,
    }
    Ok(())
}

async fn record_command(cli: &Cli, cmd: &RecordCmd) -> Result<()> {
    let trust = TrustStore::load_or_empty(&KeyStore::open(home(cli)?).trust_path())?;
    let proxy = match cmd {
        RecordCmd::Put { proxy, .. }
        | RecordCmd::Get { proxy, .. }
        | RecordCmd::List { proxy }
        | RecordCmd::Delete { proxy, .. } => trust.proxy(proxy.as_deref())?,
    };
    let mut conn = records::connect(proxy).await?;
    match cmd {
        RecordCmd::Put { input, .. } => {
            let r: Box<dyn Read + Send> = if input == "-" {
                Box::new(io::stdin())
            } else {
                Box::new(io::BufReader::with_capacity(
                    1 << 16,
                    fs::File::open(input).with_context(|| format!("opening {input}"))?,
                ))
            };
            let id = records::put(&mut conn, &proxy.id, r).await?;
            println!("{}", hex::encode(id));
            eprintln!("stored at {} as record {}", proxy.id, hex::encode(id));
        }
        RecordCmd::Get { id, output, .. } => {
            let id = records::parse_id(id)?;
            let out = records::get(&mut conn, &proxy.id, &id, Output::create(output)?).await?;
            out.commit()?;
        }
        RecordCmd::List { .. } => {
            let mut token = Vec::new();
            loop {
                let page = conn
                    .list(&token, 1000)
                    .await
                    .map_err(|e| ClientError::RecordStore {
                        proxy: proxy.id.clone(),
                        detail: e.to_string(),
                    })?;
                for r in &page.records {
                    let rows: Vec<String> = r
                        .rows
                        .iter()
                        .map(|v| format!("{}#{}", v.attribute, v.version))
                        .collect();
                    println!(
                        "{} {:>10} B  {}",
                        hex::encode(&r.record_id),
                        r.payload_size,
                        rows.join(", ")
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        RecordCmd::Delete { id, .. } => {
            let rid = records::parse_id(id)?;
            conn.delete(&rid)
                .await
                .map_err(|e| ClientError::RecordStore {
                    proxy: proxy.id.clone(),
                    detail: e.to_string(),
                })?;
            println!("deleted record {} from {}", hex::encode(rid), proxy.id);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        let code = e
            .chain()
            .find_map(|c| c.downcast_ref::<ClientError>())
            .map_or(1, ClientError::exit_code);
        std::process::exit(code);
    }
}
