//! The node's data directory (embedded default): authority id, KEK, admin
//! key, dev TLS certificate, and the SQLite database.
//!
//! ```text
//! DATA/authority-id      the id, one line
//! DATA/kek.hex           key-encryption key (0600), unless MABE_KEK or --kek-file is used
//! DATA/admin.key         admin signing key seed, hex (0600)
//! DATA/tls/cert.pem      dev TLS certificate for localhost and 127.0.0.1 (clients pin it)
//! DATA/tls/key.pem       its private key (0600)
//! DATA/authority.db      SQLite database (when no --database-url is given)
//! DATA/instance-id       this replica's name for sharing rotation work (created on use)
//! ```
//!
//! `init` builds all of it as `.DATA.init-staging` beside `DATA` (the
//! database last) and renames that into place once complete, so `DATA`
//! exists only as a complete authority.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use zeroize::Zeroizing;

use crate::{seal::Kek, server::TlsPem};

/// Paths inside a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

/// Write `bytes` to a new file readable only by its owner.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Write `bytes` to a new file and flush it to disk before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

impl DataDir {
    /// The directory at `root` (not created).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }
    /// Root path.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// SQLite database path.
    pub fn database(&self) -> PathBuf {
        self.root.join("authority.db")
    }
    /// KEK file path.
    pub fn kek_file(&self) -> PathBuf {
        self.root.join("kek.hex")
    }
    /// Admin key path.
    pub fn admin_key_file(&self) -> PathBuf {
        self.root.join("admin.key")
    }
    /// Dev TLS certificate path.
    pub fn tls_cert(&self) -> PathBuf {
        self.root.join("tls").join("cert.pem")
    }
    /// Dev TLS key path.
    pub fn tls_key(&self) -> PathBuf {
        self.root.join("tls").join("key.pem")
    }
    /// Authority id file.
    pub fn id_file(&self) -> PathBuf {
        self.root.join("authority-id")
    }

    /// Refuse a directory that exists and is not empty: `init` never
    /// writes over an authority (or anything else).
    pub fn check_vacant(&self) -> Result<()> {
        let occupied = self.root.exists()
            && fs::read_dir(&self.root)
                .with_context(|| format!("reading {}", self.root.display()))?
                .next()
                .is_some();
        if !occupied {
            return Ok(());
        }
        match fs::read_to_string(self.id_file()) {
            Ok(id) => bail!(
                "{} is not empty: it already holds authority {}; init never overwrites an authority",
                self.root.display(),
                id.trim()
            ),
            Err(_) => bail!(
                "{} is not empty: init needs a new or empty directory",
                self.root.display()
            ),
        }
    }

    /// Where `init` builds this directory before moving it into place: a
    /// hidden sibling, `.NAME.init-staging`. A leftover one is what an
    /// interrupted `init` left behind.
    pub fn staging(&self) -> Result<DataDir> {
        let name = self
            .root
            .file_name()
            .with_context(|| format!("{} does not name a directory", self.root.display()))?;
        let parent = match self.root.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut staged = std::ffi::OsString::from(".");
        staged.push(name);
        staged.push(".init-staging");
        Ok(DataDir::new(parent.join(staged)))
    }

    /// Move the complete directory `staged` to this path in one rename (this
    /// path must be absent or an empty directory), after making its entries
    /// durable, and make the rename durable.
    pub fn install(&self, staged: &DataDir) -> Result<()> {
        #[cfg(unix)]
        for d in [staged.root.join("tls"), staged.root.clone()] {
            if d.is_dir() {
                fs::File::open(&d)
                    .and_then(|f| f.sync_all())
                    .with_context(|| format!("syncing {}", d.display()))?;
            }
        }
        fs::rename(&staged.root, &self.root).with_context(|| {
            format!(
                "moving {} to {}",
                staged.root.display(),
                self.root.display()
            )
        })?;
        #[cfg(unix)]
        if let Some(parent) = self.root.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", parent.display()))?;
        }
        Ok(())
    }

    /// Create the directory (0700) and its `tls/` for `init`; refuses a
    /// non-empty one.
    pub fn create(&self) -> Result<()> {
        self.check_vacant()?;
        fs::create_dir_all(self.root.join("tls"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// The KEK: `MABE_KEK` (hex) if set, else `kek_file` if given, else the
    /// data directory's `kek.hex`.
    pub fn load_kek(&self, kek_file: Option<&Path>) -> Result<Kek> {
        if let Ok(hex) = std::env::var("MABE_KEK") {
            return Kek::from_hex(&hex).context("MABE_KEK");
        }
        let path = kek_file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.kek_file());
        Kek::from_file(&path).with_context(|| {
            format!(
                "no key-encryption key: set MABE_KEK, pass --kek-file, or keep {}",
                path.display()
            )
        })
    }

    /// The authority id written at `init`.
    pub fn authority_id(&self) -> Result<String> {
        Ok(fs::read_to_string(self.id_file())
            .with_context(|| {
                format!(
                    "{} has no authority: run `mabe-authority init` first",
                    self.root.display()
                )
            })?
            .trim()
            .to_owned())
    }

    /// The admin signing key written at `init`.
    pub fn admin_key(&self) -> Result<SigningKey> {
        read_admin_key(&self.admin_key_file())
    }

    /// This replica's instance id (`DATA/instance-id`, created on first
    /// use): the name under which it leases shares of a rotation's work, so
    /// that after a restart it takes its own unfinished leases straight back.
    pub fn instance_id(&self) -> Result<String> {
        let path = self.root.join("instance-id");
        for _ in 0..2 {
            if let Ok(text) = fs::read_to_string(&path) {
                let id = text.trim();
                if id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Ok(id.to_owned());
                }
                bail!("{} is malformed (16 hex digits expected)", path.display());
            }
            let mut raw = [0u8; 8];
            ark_std::rand::RngCore::fill_bytes(&mut ark_std::rand::rngs::OsRng, &mut raw);
            match write_private(&path, format!("{}\n", hex::encode(raw)).as_bytes()) {
                Ok(()) => return Ok(hex::encode(raw)),
                // Another process created it first: read theirs.
                Err(_) if path.exists() => continue,
                Err(e) => return Err(e),
            }
        }
        bail!("cannot create {}", path.display())
    }

    /// Generate a self-signed development certificate for localhost/127.0.0.1.
    pub fn write_dev_tls(&self) -> Result<()> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .context("generating the development TLS certificate")?;
        write_synced(&self.tls_cert(), ck.cert.pem().as_bytes())?;
        write_private(&self.tls_key(), ck.signing_key.serialize_pem().as_bytes())?;
        Ok(())
    }

    /// Load a certificate and key (the given paths, or the dev pair).
    pub fn tls(&self, cert: Option<&Path>, key: Option<&Path>) -> Result<TlsPem> {
        let cert = cert
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.tls_cert());
        let key = key.map(Path::to_path_buf).unwrap_or_else(|| self.tls_key());
        Ok(TlsPem {
            cert: fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?,
            key: fs::read(&key).with_context(|| format!("reading {}", key.display()))?,
        })
    }
}

/// Read an admin signing key file (64 hex digits, as `init` writes it).
pub fn read_admin_key(path: &Path) -> Result<SigningKey> {
    let text = Zeroizing::new(
        fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    );
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), seed.as_mut()).context("admin key is not 64 hex digits")?;
    Ok(SigningKey::from_bytes(&seed))
}
