//! Test scaffolding shared by the client's tests: run `mabe` with a
//! temporary key store, run real `mabe-authority` processes on loopback
//! (SQLite, dev TLS), and build offline key stores from a seeded RNG.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_arguments
)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::OnceLock,
};

use ark_std::rand::{RngCore, rngs::StdRng};
use ed25519_dalek::{Signer, SigningKey};
use mabe_abe::{AttributeSecretKey, HashedGid, Version};
use mabe_client::{
    KeyStore, TrustedAuthority,
    directory::{SignedDirectory, VerifiedDirectory},
    trust::TrustStore,
};
use mabe_proto::signing::{Directory, DirectoryEntry};

pub const MABE: &str = env!("CARGO_BIN_EXE_mabe");

/// The `mabe-authority` binary, built once next to `mabe` (same target
/// directory and profile): `cargo test -p mabe-client` does not build it.
pub fn authority_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("mabe-authority"))
}

/// The `mabe-proxy` binary, built once next to `mabe` like
/// [`authority_bin`].
pub fn proxy_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| workspace_bin("mabe-proxy"))
}

/// Build the binary `name` of the workspace package of the same name into
/// the target directory and profile that built `mabe`, and return its path.
fn workspace_bin(name: &str) -> PathBuf {
    let mabe = Path::new(MABE);
    let profile_dir = mabe.parent().expect("profile dir");
    let target_dir = profile_dir.parent().expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_owned());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", name, "--bin", name])
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "building {name} failed");
    let bin = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

/// Output of a command as text, with its exit code.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Ran {
    fn from(out: Output) -> Ran {
        Ran {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Ran {
    pub fn ok(self, what: &str) -> Ran {
        assert_eq!(
            self.code,
            Some(0),
            "{what} failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
    pub fn fails_with(self, code: i32, needle: &str) -> Ran {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains(needle) || self.stdout.contains(needle),
            "expected {needle:?} in:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }
}

/// A person with their own key store.
pub struct Person {
    pub name: String,
    pub home: tempfile::TempDir,
}

impl Person {
    pub fn new(name: &str) -> Person {
        Person {
            name: name.into(),
            home: tempfile::tempdir().unwrap(),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(MABE);
        c.arg("--home")
            .arg(self.home.path())
            .env_remove("MABE_HOME")
            .env_remove("MABE_PASSPHRASE")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Ran {
        Ran::from(self.cmd().args(args).output().unwrap())
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.run(args)
            .ok(&format!("{} mabe {args:?}", self.name))
            .stdout
    }

    /// `identity new`; returns (GID hex, request key hex).
    pub fn identity(&self, registry: &str, subject: &str) -> (String, String) {
        let out = self.ok(&[
            "identity",
            "new",
            "--registry",
            registry,
            "--subject",
            subject,
        ]);
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .trim()
                .to_owned()
        };
        (field("GID:"), field("request key:"))
    }

    pub fn trust(&self, a: &Authority) {
        self.ok(&[
            "trust",
            "add",
            "--id",
            &a.id,
            "--endpoint",
            &format!("https://localhost:{}", a.port.expect("serving")),
            "--identity-key",
            &a.identity_key,
            "--tls-root",
            a.dir.join("tls").join("cert.pem").to_str().unwrap(),
        ]);
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.home.path().join(name)
    }
}

/// A real `mabe-authority` process with its own data directory.
pub struct Authority {
    pub id: String,
    pub dir: PathBuf,
    pub identity_key: String,
    pub port: Option<u16>,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

impl Authority {
    /// `init` with dev TLS, then create `attributes`.
    pub fn init(id: &str, attributes: &[&str]) -> Authority {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(id);
        let mut a = Authority {
            id: id.into(),
            dir,
            identity_key: String::new(),
            port: None,
            child: None,
            _tmp: tmp,
        };
        let out = a.ok(&["init", "--authority-id", id]);
        a.identity_key = out
            .lines()
            .find_map(|l| l.strip_prefix("identity public key:"))
            .unwrap()
            .trim()
            .to_owned();
        for attr in attributes {
            a.ok(&["attribute", "create", attr]);
        }
        a
    }

    pub fn run(&self, args: &[&str]) -> Ran {
        Ran::from(
            Command::new(authority_bin())
                .arg("--data-dir")
                .arg(&self.dir)
                .args(args)
                .env_remove("MABE_KEK")
                .env_remove("MABE_DATABASE_URL")
                .env("MABE_LOG", "warn")
                .output()
                .unwrap(),
        )
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.run(args)
            .ok(&format!("{} mabe-authority {args:?}", self.id))
            .stdout
    }

    pub fn enroll(&self, registry: &str, subject: &str, request_key: &str) {
        self.ok(&[
            "enroll",
            "--registry",
            registry,
            "--subject",
            subject,
            "--request-key",
            request_key,
        ]);
    }

    pub fn grant(&self, gid: &str, attr: &str) {
        self.ok(&["grant", "--gid", gid, "--attr", attr]);
    }

    /// `serve` on free loopback ports; returns once it listens.
    pub fn serve(&mut self) {
        let mut child = Command::new(authority_bin())
            .arg("--data-dir")
            .arg(&self.dir)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env_remove("MABE_KEK")
            .env_remove("MABE_DATABASE_URL")
            .env("MABE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "serving hospital-a on 127.0.0.1:P (admin 127.0.0.1:Q)"
        let addrs: Vec<std::net::SocketAddr> = line
            .split_whitespace()
            .filter_map(|t| t.trim_matches(|c| c == '(' || c == ')').parse().ok())
            .collect();
        assert_eq!(addrs.len(), 2, "unexpected serve output {line:?}");
        self.port = Some(addrs[0].port());
        self.child = Some(child);
    }

    /// Stop with SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Authority {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An offline authority made in-process from a seeded RNG: identity key and
/// attribute secrets.
pub struct OfflineAuthority {
    pub id: String,
    pub identity: SigningKey,
    pub attributes: Vec<AttributeSecretKey>,
}

impl OfflineAuthority {
    pub fn new(id: &str, names: &[&str], rng: &mut StdRng) -> OfflineAuthority {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let attributes = names
            .iter()
            .map(|n| {
                AttributeSecretKey::generate(
                    format!("{n}@{id}").parse().unwrap(),
                    Version::FIRST,
                    rng,
                )
            })
            .collect();
        OfflineAuthority {
            id: id.into(),
            identity: SigningKey::from_bytes(&seed),
            attributes,
        }
    }

    pub fn trusted(&self) -> TrustedAuthority {
        TrustedAuthority {
            id: self.id.parse().unwrap(),
            endpoint: None,
            identity_key: self.identity.verifying_key(),
            tls_root: vec![],
            tls_name: "localhost".into(),
        }
    }

    /// Its signed directory, issued at `issued_at`, valid for `validity` s.
    pub fn directory(&self, issued_at: i64, validity: i64, rng: &mut StdRng) -> SignedDirectory {
        let body = Directory {
            authority: self.id.clone(),
            issued_at,
            valid_until: issued_at + validity,
            entries: self
                .attributes
                .iter()
                .map(|sk| DirectoryEntry {
                    attribute: sk.attribute().to_string(),
                    version: sk.version().get(),
                    current: true,
                    public_key: sk.public_key(rng).to_bytes(),
                })
                .collect(),
        }
        .encode();
        SignedDirectory {
            signature: self.identity.sign(&body).to_bytes().to_vec(),
            body,
        }
    }
}

/// Make a key store at `home` for `(registry, subject)` (request key from
/// `rng`) that pins `authorities`, holds their signed directories and the
/// keys for `grants` (attribute texts).
pub fn offline_home(
    home: &Path,
    registry: &str,
    subject: &str,
    authorities: &[&OfflineAuthority],
    grants: &[&str],
    issued_at: i64,
    validity: i64,
    rng: &mut StdRng,
) {
    let store = KeyStore::open(home);
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let info = store
        .create_identity(registry, subject, Some(seed), rng)
        .unwrap();
    let mut trust = TrustStore::load_or_empty(&store.trust_path()).unwrap();
    for a in authorities {
        trust.add_authority(a.trusted()).unwrap();
    }
    trust.save().unwrap();
    let hashed = HashedGid::new(info.gid).unwrap();
    let mut keys = store.load_keys().unwrap();
    for a in authorities {
        let dir =
            VerifiedDirectory::verify(&a.trusted(), a.directory(issued_at, validity, rng)).unwrap();
        store.save_directory(&dir, &a.trusted()).unwrap();
        for sk in &a.attributes {
            if grants.contains(&sk.attribute().to_string().as_str()) {
                let pk = dir.get(sk.attribute(), sk.version()).unwrap();
                keys.insert_verified(sk.keygen(&hashed, rng), pk, 0)
                    .unwrap();
            }
        }
    }
    store.save_keys(&keys).unwrap();
}
