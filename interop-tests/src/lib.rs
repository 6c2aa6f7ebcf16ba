//! # mabe-interop-tests: the real binaries, end to end
//!
//! A harness for scenario tests (one file per scenario in `tests/`) that
//! start the real `mabe-authority` and `mabe-proxy` processes on loopback
//! ports with temporary data directories, over SQLite or a fresh PostgreSQL
//! database, with TLS, and drive them through their CLIs and gRPC APIs.
//!
//! The binaries are the workspace's own: [`bin`] builds them once per test
//! process (a no-op when they are fresh) with the same cargo and profile as
//! the test. PostgreSQL comes from `MABE_TEST_DATABASE_URL`, which
//! `scripts/with-postgres` exports; every scenario gets its own databases.
//!
//! ```no_run
//! use mabe_interop_tests::{Backend, bin};
//! let authority = bin("mabe-authority");
//! assert!(authority.exists());
//! assert_eq!(Backend::all().len(), 2);
//! ```
#![warn(missing_docs)]

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use mabe_abe::{
    AttributePublicKey, EncryptOptions, Gid, Header, PublicKeyRing, UserKey, UserKeyRing,
};
use mabe_proto::{
    signing::{Directory, key_request_message},
    v1::{GetDirectoryRequest, KeyRequest, authority_client::AuthorityClient},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a workspace binary (`mabe-authority`, `mabe-proxy`, `mabe`),
/// built once per test process with the test's own profile.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // target/<profile>/deps/<test> (a test) or target/<profile>/<bin>
        // (a benchmark program) -> target/<profile>
        let mut profile_dir = exe
            .parent()
            .ok_or("cannot locate the target directory")?
            .to_path_buf();
        if profile_dir.file_name().is_some_and(|n| n == "deps") {
            profile_dir = profile_dir
                .parent()
                .ok_or("cannot locate the target directory")?
                .to_path_buf();
        }
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "-p",
            "mabe-authority",
            "-p",
            "mabe-proxy",
            "-p",
            "mabe-client",
            "--bins",
        ]);
        if release {
            cmd.arg("--release");
        }
        // Cargo gives this test process CARGO_MANIFEST_DIR, CARGO_PKG_* and
        // the like. An inner cargo that inherits them sees ring's build
        // script inputs (rerun-if-env-changed=CARGO_MANIFEST_DIR, …) change,
        // rebuilds ring and everything above it, and the next plain `cargo`
        // rebuilds them back: minutes each way on a small machine.
        for (key, _) in std::env::vars_os() {
            let Some(k) = key.to_str() else { continue };
            if matches!(
                k,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
            ) || k.starts_with("CARGO_PKG_")
                || k.starts_with("CARGO_BIN_EXE_")
            {
                cmd.env_remove(k);
            }
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "building the binaries failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(profile_dir)
    });
    match dir {
        Ok(d) => d.join(name),
        Err(e) => PathBuf::from(format!("/nonexistent/{name}: {e}")),
    }
}

/// Storage backend of a scenario's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: a SQLite file in the data directory.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

impl Backend {
    /// Both backends.
    pub fn all() -> [Backend; 2] {
        [Backend::Sqlite, Backend::Postgres]
    }

    /// `--database-url` for a new process: `None` for SQLite, a fresh
    /// database (named after `prefix`) for PostgreSQL.
    pub async fn database_url(self, prefix: &str) -> Result<Option<String>> {
        match self {
            Backend::Sqlite => Ok(None),
            Backend::Postgres => {
                let url = std::env::var("MABE_TEST_DATABASE_URL").context(
                    "MABE_TEST_DATABASE_URL is not set: run through scripts/with-postgres",
                )?;
                let db = format!("{prefix}_{}", OsRng.next_u64());
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("CREATE DATABASE {db}"))
                    .await?;
                let (base, _) = url
                    .rsplit_once('/')
                    .ok_or_else(|| anyhow!("database URL without a database name"))?;
                Ok(Some(format!("{base}/{db}")))
            }
        }
    }
}

/// A running `serve` process: killed when dropped.
#[derive(Debug)]
pub struct Served {
    child: Child,
    /// Public listener port.
    pub public: u16,
    /// Admin listener port.
    pub admin: u16,
}

impl Served {
    /// Stop with SIGTERM (graceful) and wait.
    pub fn stop(mut self) -> Result<()> {
        signal(&self.child, "TERM")?;
        self.child.wait()?;
        Ok(())
    }

    /// Stop with SIGKILL (a crash) and wait.
    pub fn kill(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Send a signal by name to a child.
pub fn signal(child: &Child, sig: &str) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()?;
    ensure!(status.success(), "kill -{sig} failed");
    Ok(())
}

/// Start `program args…` and read its first stdout line, `serving ID on
/// ADDR (admin ADDR)`, for the two ports. Its stderr goes to `log`.
pub fn spawn_server(mut cmd: Command, log: &Path) -> Result<Served> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(fs::File::create(log)?)
        .spawn()
        .context("starting the server")?;
    let mut line = String::new();
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout of the server"))?;
    BufReader::new(stdout).read_line(&mut line)?;
    let addrs: Vec<std::net::SocketAddr> = line
        .split_whitespace()
        .filter_map(|t| t.trim_matches(|c| c == '(' || c == ')').parse().ok())
        .collect();
    if addrs.len() != 2 {
        let _ = child.kill();
        bail!(
            "unexpected serve output {line:?}; log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(Served {
        child,
        public: addrs[0].port(),
        admin: addrs[1].port(),
    })
}

fn checked(out: Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `mabe-authority` data directory (and database).
#[derive(Debug)]
pub struct Authority {
    /// Data directory.
    pub dir: PathBuf,
    /// Authority id.
    pub id: String,
    /// PostgreSQL URL, if not SQLite.
    pub database_url: Option<String>,
    /// Hex identity public key (what proxies and clients pin).
    pub identity_key: String,
    /// The `serve` process, if running.
    pub served: Option<Served>,
}

impl Authority {
    /// `mabe-authority init` in `root/<id>`.
    pub fn init(root: &Path, id: &str, database_url: Option<String>) -> Result<Authority> {
        let mut a = Authority {
            dir: root.join(id),
            id: id.to_owned(),
            database_url,
            identity_key: String::new(),
            served: None,
        };
        let out = a.ok(&["init", "--authority-id", id])?;
        a.identity_key = out
            .lines()
            .find_map(|l| l.strip_prefix("identity public key: "))
            .ok_or_else(|| anyhow!("init printed no identity key: {out}"))?
            .trim()
            .to_owned();
        Ok(a)
    }

    /// The CLI with this data directory and database.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin("mabe-authority"));
        c.arg("--data-dir")
            .arg(&self.dir)
            .env_remove("MABE_KEK")
            .env_remove("MABE_AUTHORITY_ADMIN_URL")
            .env("MABE_LOG", "warn");
        match &self.database_url {
            Some(url) => c.env("MABE_DATABASE_URL", url),
            None => c.env_remove("MABE_DATABASE_URL"),
        };
        c
    }

    /// Run a CLI command; its output.
    pub fn run(&self, args: &[&str]) -> Result<Output> {
        Ok(self.command().args(args).output()?)
    }

    /// Run a CLI command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        checked(self.run(args)?, &format!("mabe-authority {args:?}"))
    }

    /// Start `serve` on free loopback ports with `extra` options.
    pub fn serve(&mut self, extra: &[&str]) -> Result<()> {
        let mut c = self.command();
        c.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(extra);
        self.served = Some(spawn_server(c, &self.dir.join("serve.log"))?);
        Ok(())
    }

    /// The dev TLS certificate (the root clients and proxies pin).
    pub fn tls_root(&self) -> Result<Vec<u8>> {
        Ok(fs::read(self.dir.join("tls/cert.pem"))?)
    }

    /// A TLS channel to the public listener.
    pub async fn public_channel(&self) -> Result<Channel> {
        let port = self
            .served
            .as_ref()
            .ok_or_else(|| anyhow!("authority {} is not serving", self.id))?
            .public;
        channel(port, &self.tls_root()?).await
    }

    /// Enroll `p` (`registry`, `subject`) with the given roles.
    pub fn enroll(&self, p: &Person, roles: &[&str]) -> Result<()> {
        let key = hex::encode(p.key.verifying_key().to_bytes());
        let mut args = vec![
            "enroll",
            "--registry",
            &p.registry,
            "--subject",
            &p.subject,
            "--request-key",
            &key,
        ];
        for r in roles {
            args.extend(["--role", r]);
        }
        let out = self.ok(&args)?;
        ensure!(out.contains(&p.gid.to_string()), "enroll printed {out}");
        Ok(())
    }

    /// The signed directory, checked against the pinned identity key.
    pub async fn directory(&self) -> Result<PublicKeyRing> {
        let mut ring = PublicKeyRing::new();
        self.directory_into(&mut ring).await?;
        Ok(ring)
    }

    /// Add this authority's verified directory to `ring` (records across
    /// authorities need every authority's public keys).
    pub async fn directory_into(&self, ring: &mut PublicKeyRing) -> Result<()> {
        let mut client = AuthorityClient::new(self.public_channel().await?);
        let d = client
            .get_directory(GetDirectoryRequest {})
            .await?
            .into_inner();
        let key_bytes: [u8; 32] = hex::decode(&self.identity_key)?
            .try_into()
            .map_err(|_| anyhow!("identity key length"))?;
        let key = VerifyingKey::from_bytes(&key_bytes)?;
        let sig = ed25519_dalek::Signature::from_slice(&d.signature)?;
        key.verify_strict(&d.body, &sig)
            .context("directory signature")?;
        let directory = Directory::decode(&d.body)?;
        ensure!(
            directory.authority == self.id,
            "directory of another authority"
        );
        for e in &directory.entries {
            ring.insert(AttributePublicKey::from_bytes(&e.public_key)?)?;
        }
        Ok(())
    }

    /// Break the glass as `p` with `reason`; the emergency key is checked by
    /// the pairing check and added to `into`. Returns the grant's expiry.
    pub async fn break_glass(
        &self,
        p: &Person,
        reason: &str,
        into: &mut UserKeyRing,
    ) -> Result<i64> {
        let pks = self.directory().await?;
        let mut client = AuthorityClient::new(self.public_channel().await?);
        let mut nonce = vec![0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let ts = unix_now()?;
        let msg = mabe_proto::signing::break_glass_message(
            &self.id,
            p.gid.as_bytes(),
            reason,
            &nonce,
            ts,
        );
        let keys = client
            .break_glass(mabe_proto::v1::BreakGlassRequest {
                authority_id: self.id.clone(),
                gid: p.gid.as_bytes().to_vec(),
                reason: reason.into(),
                nonce,
                timestamp: ts,
                signature: p.key.sign(&msg).to_bytes().to_vec(),
            })
            .await?
            .into_inner()
            .keys;
        let k = keys
            .first()
            .ok_or_else(|| anyhow!("break-glass returned no key"))?;
        let key = UserKey::from_bytes(&k.user_key)?;
        let pk = pks
            .get(key.attribute(), key.version())
            .ok_or_else(|| anyhow!("no public key for {}", k.attribute))?
            .clone();
        into.insert(key, &pk)?;
        Ok(k.expires_at)
    }

    /// Fetch every key granted to `p`, checked by the pairing check against
    /// the directory, as a key ring.
    pub async fn fetch_keys(&self, p: &Person, into: &mut UserKeyRing) -> Result<usize> {
        let pks = self.directory().await?;
        let mut client = AuthorityClient::new(self.public_channel().await?);
        let mut nonce = vec![0u8; 16];
        OsRng.fill_bytes(&mut nonce);
        let ts = unix_now()?;
        let msg = key_request_message(&self.id, p.gid.as_bytes(), &[], &nonce, ts);
        let keys = client
            .fetch_keys(KeyRequest {
                authority_id: self.id.clone(),
                gid: p.gid.as_bytes().to_vec(),
                attributes: vec![],
                nonce,
                timestamp: ts,
                signature: p.key.sign(&msg).to_bytes().to_vec(),
            })
            .await?
            .into_inner()
            .keys;
        for k in &keys {
            let key = UserKey::from_bytes(&k.user_key)?;
            let pk = pks
                .get(key.attribute(), key.version())
                .ok_or_else(|| anyhow!("no public key for {}", k.attribute))?
                .clone();
            into.insert(key, &pk)?;
        }
        Ok(keys.len())
    }
}

/// One `mabe-proxy` data directory (and database).
#[derive(Debug)]
pub struct Proxy {
    /// Data directory.
    pub dir: PathBuf,
    /// Proxy id.
    pub id: String,
    /// PostgreSQL URL, if not SQLite.
    pub database_url: Option<String>,
    /// The `serve` process, if running.
    pub served: Option<Served>,
}

impl Proxy {
    /// `mabe-proxy init` in `root/<id>`.
    pub fn init(root: &Path, id: &str, database_url: Option<String>) -> Result<Proxy> {
        let p = Proxy {
            dir: root.join(id),
            id: id.to_owned(),
            database_url,
            served: None,
        };
        p.ok(&["init", "--proxy-id", id])?;
        Ok(p)
    }

    /// The CLI with this data directory and database.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin("mabe-proxy"));
        c.arg("--data-dir").arg(&self.dir).env("MABE_LOG", "warn");
        match &self.database_url {
            Some(url) => c.arg("--database-url").arg(url),
            None => &mut c,
        };
        c
    }

    /// Run a CLI command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        checked(
            self.command().args(args).output()?,
            &format!("mabe-proxy {args:?}"),
        )
    }

    /// Pin an authority's identity key.
    pub fn trust(&self, a: &Authority) -> Result<()> {
        self.ok(&[
            "trust",
            "add",
            "--authority",
            &a.id,
            "--identity-key",
            &a.identity_key,
        ])?;
        Ok(())
    }

    /// Start `serve` on free loopback ports.
    pub fn serve(&mut self) -> Result<()> {
        self.serve_on(0)
    }

    /// Start `serve` with its public listener on `port` (0: any free one),
    /// e.g. to restart on the port authorities registered.
    pub fn serve_on(&mut self, port: u16) -> Result<()> {
        let mut c = self.command();
        c.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        self.served = Some(spawn_server(c, &self.dir.join("serve.log"))?);
        Ok(())
    }

    /// `https://localhost:PORT` of the public listener.
    pub fn url(&self) -> Result<String> {
        let port = self
            .served
            .as_ref()
            .ok_or_else(|| anyhow!("proxy {} is not serving", self.id))?
            .public;
        Ok(format!("https://localhost:{port}"))
    }

    /// Its dev TLS certificate file.
    pub fn tls_root_file(&self) -> PathBuf {
        self.dir.join("tls/cert.pem")
    }

    /// A record-store client.
    pub async fn records(&self) -> Result<mabe_proxy::client::RecordClient> {
        let root = fs::read(self.tls_root_file())?;
        Ok(mabe_proxy::client::RecordClient::connect(&self.url()?, &root, "localhost").await?)
    }

    /// Register this proxy at `a` (so `a`'s revocations reach it).
    pub fn register_at(&self, a: &Authority) -> Result<()> {
        let url = self.url()?;
        let root = self.tls_root_file();
        let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
        a.ok(&[
            "proxy",
            "add",
            "--id",
            &self.id,
            "--endpoint",
            &url,
            "--proxy-tls-root",
            root,
        ])?;
        Ok(())
    }
}

fn unix_now() -> Result<i64> {
    Ok(i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    )?)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A TLS channel to `localhost:port` trusting `root`.
pub async fn channel(port: u16, root: &[u8]) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("https://localhost:{port}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name("localhost"),
        )?
        .timeout(Duration::from_secs(60))
        .connect()
        .await?)
}

/// A person: registry, subject, GID and request key.
#[derive(Debug)]
pub struct Person {
    /// Registry.
    pub registry: String,
    /// Subject.
    pub subject: String,
    /// GID.
    pub gid: Gid,
    /// Request signing key.
    pub key: SigningKey,
}

impl Person {
    /// A new person in the `big-register` registry.
    pub fn new(subject: &str) -> Result<Person> {
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        Ok(Person {
            registry: "big-register".into(),
            subject: subject.into(),
            gid: Gid::derive("big-register", subject)?,
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// An empty key ring for this person.
    pub fn ring(&self) -> Result<UserKeyRing> {
        Ok(UserKeyRing::new(self.gid)?)
    }
}

/// A person using the real `mabe` command with a key store of their own.
#[derive(Debug)]
pub struct User {
    /// Key store directory (`mabe --home`).
    pub home: PathBuf,
    /// Registry of their identity.
    pub registry: String,
    /// Subject within the registry.
    pub subject: String,
    /// GID, 64 hex digits (as `mabe identity new` printed it).
    pub gid: String,
    /// Request public key, 64 hex digits (what authorities enroll).
    pub request_key: String,
}

/// A finished `mabe` run: exit code and both outputs as text.
#[derive(Debug)]
pub struct Ran {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Ran {
    /// Require success; the run.
    pub fn ok(self) -> Result<Ran> {
        ensure!(
            self.code == Some(0),
            "expected success, got {:?}:\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
        Ok(self)
    }

    /// Require exit `code` and `needle` in stderr or stdout; the run.
    pub fn fails_with(self, code: i32, needle: &str) -> Result<Ran> {
        ensure!(
            self.code == Some(code),
            "expected exit {code}, got {:?}:\nstdout: {}\nstderr: {}",
            self.code,
            self.stdout,
            self.stderr
        );
        ensure!(
            self.stderr.contains(needle) || self.stdout.contains(needle),
            "expected {needle:?} in:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        Ok(self)
    }
}

impl User {
    /// `mabe identity new` in `root/<name>` (registry `big-register`).
    pub fn new(root: &Path, name: &str, subject: &str) -> Result<User> {
        let mut u = User {
            home: root.join(name),
            registry: "big-register".into(),
            subject: subject.into(),
            gid: String::new(),
            request_key: String::new(),
        };
        let out = u
            .run(&[
                "identity",
                "new",
                "--registry",
                "big-register",
                "--subject",
                subject,
            ])?
            .ok()?
            .stdout;
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .ok_or_else(|| anyhow!("identity new printed no {name}: {out}"))
        };
        u.gid = field("GID: ")?;
        u.request_key = field("request key: ")?;
        Ok(u)
    }

    /// The `mabe` command with this key store.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin("mabe"));
        c.arg("--home")
            .arg(&self.home)
            .env_remove("MABE_HOME")
            .env_remove("MABE_PASSPHRASE");
        c
    }

    /// Run `mabe args…`.
    pub fn run(&self, args: &[&str]) -> Result<Ran> {
        let out = self.command().args(args).output()?;
        Ok(Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Run `mabe args…`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        Ok(self
            .run(args)?
            .ok()
            .with_context(|| format!("mabe {args:?}"))?
            .stdout)
    }

    /// A path inside the key store directory (for this user's files).
    pub fn path(&self, name: &str) -> String {
        self.home.join(name).to_string_lossy().into_owned()
    }

    /// `mabe trust add` for a serving authority (its endpoint and dev TLS
    /// root), or an offline one (identity key only) if it is not serving.
    pub fn trust(&self, a: &Authority) -> Result<()> {
        let mut args = vec![
            "trust".to_owned(),
            "add".into(),
            "--id".into(),
            a.id.clone(),
            "--identity-key".into(),
            a.identity_key.clone(),
        ];
        if let Some(s) = &a.served {
            args.extend([
                "--endpoint".into(),
                format!("https://localhost:{}", s.public),
                "--tls-root".into(),
                a.dir.join("tls/cert.pem").to_string_lossy().into_owned(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ok(&args)?;
        Ok(())
    }

    /// `mabe trust proxy` for a serving record store.
    pub fn trust_proxy(&self, p: &Proxy) -> Result<()> {
        let url = p.url()?;
        let root = p.tls_root_file();
        self.ok(&[
            "trust",
            "proxy",
            "--id",
            &p.id,
            "--endpoint",
            &url,
            "--tls-root",
            &root.to_string_lossy(),
        ])?;
        Ok(())
    }

    /// Encrypt `plain` (written to a file first) under `policy` into the
    /// record file `name` in this user's directory; its path.
    pub fn encrypt(&self, policy: &str, plain: &[u8], name: &str) -> Result<String> {
        let input = self.path(&format!("{name}.plain"));
        fs::write(&input, plain)?;
        let out = self.path(name);
        self.ok(&["encrypt", "--policy", policy, "--in", &input, "--out", &out])?;
        Ok(out)
    }

    /// Store a record file at the (only) record store; its record id.
    pub fn put(&self, record: &str) -> Result<String> {
        Ok(self
            .ok(&["record", "put", "--in", record])?
            .trim()
            .to_owned())
    }

    /// Fetch record `id` from the (only) record store and decrypt it:
    /// the `mabe decrypt` run (plaintext on stdout when it succeeds).
    pub fn get_and_decrypt(&self, id: &str) -> Result<Ran> {
        let file = self.path(&format!("fetched-{id}.mabe"));
        self.ok(&["record", "get", "--id", id, "--out", &file])?;
        self.run(&["decrypt", "--in", &file, "--out", "-"])
    }
}

impl Authority {
    /// Enroll a `mabe` user with the given roles.
    pub fn enroll_user(&self, u: &User, roles: &[&str]) -> Result<()> {
        let mut args = vec![
            "enroll",
            "--registry",
            &u.registry,
            "--subject",
            &u.subject,
            "--request-key",
            &u.request_key,
        ];
        for r in roles {
            args.extend(["--role", r]);
        }
        let out = self.ok(&args)?;
        ensure!(out.contains(&u.gid), "enroll printed {out}");
        Ok(())
    }

    /// Grant `attr` to a `mabe` user directly.
    pub fn grant_user(&self, u: &User, attr: &str) -> Result<()> {
        self.ok(&["grant", "--gid", &u.gid, "--attr", attr])?;
        Ok(())
    }
}

/// Encrypt `payload` under `policy`: (header bytes, payload ciphertext).
pub fn encrypt(policy: &str, pks: &PublicKeyRing, payload: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    let policy = mabe_policy::parse(policy)?;
    let mut ct = Vec::new();
    let header = mabe_abe::encrypt(
        &policy,
        pks,
        &EncryptOptions::default(),
        &mut OsRng,
        payload,
        &mut ct,
    )?;
    Ok((header.to_bytes(), ct))
}

/// Decrypt a record (header bytes, payload ciphertext) with `ring`.
pub fn decrypt(
    header: &[u8],
    ct: &[u8],
    ring: &UserKeyRing,
    pks: &PublicKeyRing,
) -> Result<Vec<u8>> {
    let header = Header::from_bytes(header)?;
    let mut out = Vec::new();
    mabe_abe::decrypt(&header, ring, pks, ct, &mut out)?;
    Ok(out)
}

/// Store `n` records under `cardiology@hospital-a` at `proxy` through the
/// record-store API, record i with plaintext `r{i}`; returns each record's id
/// and stored payload, the input of [`assert_rotated`]. (Thousands of CLI
/// runs would only slow a test down; the revocation itself stays real.)
///
/// ```no_run
/// # async fn f(p: &mabe_interop_tests::Proxy, pks: &mabe_abe::PublicKeyRing) -> anyhow::Result<()> {
/// let ids = mabe_interop_tests::store_records(p, pks, 100).await?;
/// assert_eq!(ids.len(), 100);
/// # Ok(()) }
/// ```
pub async fn store_records(
    proxy: &Proxy,
    pks: &PublicKeyRing,
    n: usize,
) -> Result<Vec<(mabe_proxy::store::RecordId, Vec<u8>)>> {
    let mut store = proxy.records().await?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let (header, ct) = encrypt("cardiology@hospital-a", pks, format!("r{i}").as_bytes())?;
        let id = store.put(&header, std::io::Cursor::new(ct.clone())).await?;
        ids.push((id, ct));
    }
    Ok(ids)
}

/// The end state of a revocation of `cardiology@hospital-a` over records
/// stored as `records[i] = (id, payload)` with plaintext `r{i}`: every
/// payload is byte for byte what was stored, every record decrypts for
/// `holder` with keys fetched now from `a`, and every `sample_every`-th record
/// does not decrypt with `revoked`, the revoked person's old keys.
///
/// ```no_run
/// # async fn f(a: &mabe_interop_tests::Authority, p: &mabe_interop_tests::Proxy,
/// #            h: &mabe_interop_tests::Person, old: &mabe_abe::UserKeyRing,
/// #            ids: &[(mabe_proxy::store::RecordId, Vec<u8>)]) -> anyhow::Result<()> {
/// mabe_interop_tests::assert_rotated(a, p, h, old, ids, 50).await?;
/// # Ok(()) }
/// ```
pub async fn assert_rotated(
    a: &Authority,
    proxy: &Proxy,
    holder: &Person,
    revoked: &UserKeyRing,
    records: &[(mabe_proxy::store::RecordId, Vec<u8>)],
    sample_every: usize,
) -> Result<()> {
    let mut keys = holder.ring()?;
    a.fetch_keys(holder, &mut keys).await?;
    let pks = a.directory().await?;
    let mut store = proxy.records().await?;
    for (i, (id, ct)) in records.iter().enumerate() {
        let (header, payload) = store.get(id, Vec::new()).await?;
        ensure!(&payload == ct, "record {i}: the payload changed");
        let plain = decrypt(&header, ct, &keys, &pks)
            .with_context(|| format!("record {i} for the remaining holder"))?;
        ensure!(
            plain == format!("r{i}").into_bytes(),
            "record {i}: wrong plaintext"
        );
        if i % sample_every.max(1) == 0 {
            ensure!(
                decrypt(&header, ct, revoked, &pks).is_err(),
                "record {i} still decrypts with the revoked keys"
            );
        }
    }
    Ok(())
}
