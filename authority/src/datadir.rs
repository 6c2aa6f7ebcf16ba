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
//! [`DataDir::init`] (what `mabe-authority init` runs) builds all of it as
//! `.DATA.init-staging` beside `DATA` (the database last) and renames that
//! into place once complete, so `DATA` exists only as a complete authority.
//! [`DataDir::open_node`] opens the node of an initialised directory.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mabe_authority::{datadir::{DataDir, StoreOptions}, node::NodeConfig};
//! let dir = DataDir::new("hospital-a");
//! let opts = StoreOptions::default(); // SQLite in the directory, KEK in kek.hex
//! dir.init(&"hospital-a".parse()?, &opts).await?;
//! let node = dir.open_node(&opts, NodeConfig::default()).await?;
//! println!("identity key {}", hex::encode(node.identity_public_key().to_bytes()));
//! # Ok(()) }
//! ```

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::SigningKey;
use mabe_abe::AuthorityId;
use zeroize::Zeroizing;

use crate::{
    node::{Node, NodeConfig},
    seal::Kek,
    server::TlsPem,
    store::{Store, postgres::PgStore, sqlite::SqliteStore},
};

/// Where an authority's database lives and where its key-encryption key
/// comes from (`mabe-authority --database-url` and `--kek-file`). The
/// default is the SQLite database in the data directory and the KEK in
/// `MABE_KEK` if set, else in the data directory's `kek.hex`.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// PostgreSQL URL; `None` for the SQLite database in the data directory.
    pub database_url: Option<String>,
    /// File holding the KEK (64 hex digits); `MABE_KEK` takes precedence.
    pub kek_file: Option<PathBuf>,
}

/// What [`DataDir::init`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitOutcome {
    /// A new authority was created.
    Created,
    /// An interrupted `init` of this authority had finished everything but
    /// the final rename; it was moved into place.
    FinishedInterrupted,
}

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

impl DataDir {
    /// Open the database: PostgreSQL if `opts` names one, else the SQLite
    /// database in this directory (created if absent: check the directory
    /// with [`DataDir::authority_id`] first unless that is what you want).
    pub async fn open_store(&self, opts: &StoreOptions) -> Result<Arc<dyn Store>> {
        Ok(match &opts.database_url {
            Some(url) => Arc::new(
                PgStore::connect(url)
                    .await
                    .context("connecting to PostgreSQL")?,
            ),
            None => Arc::new(
                SqliteStore::open(&self.database())
                    .with_context(|| format!("opening {}", self.database().display()))?,
            ),
        })
    }

    /// Open the node of an initialised directory with `config`, whose
    /// `instance_id` is replaced by this directory's ([`DataDir::instance_id`]).
    /// Never creates a database in a directory that `init` did not set up.
    pub async fn open_node(&self, opts: &StoreOptions, mut config: NodeConfig) -> Result<Node> {
        self.authority_id()?;
        config.instance_id = self.instance_id()?;
        let store = self.open_store(opts).await?;
        let kek = self.load_kek(opts.kek_file.as_deref())?;
        Ok(Node::open(store, kek, config).await?)
    }

    /// Create a new authority `id` in this directory (`mabe-authority
    /// init`): the id, a KEK (unless `MABE_KEK` or `opts.kek_file` supplies
    /// one), an admin key, a development TLS certificate and the database
    /// with a new identity key. Refuses a directory that is not empty.
    ///
    /// Validates first, then builds the whole directory under a staging name
    /// beside it ([`DataDir::staging`]), initialises the database last, and
    /// moves the directory into place with one rename. A failure or crash at
    /// any point leaves either no data directory (the next `init` removes the
    /// staging leftover and starts over) or a complete one. With PostgreSQL,
    /// a crash between the database commit and the rename leaves a complete
    /// staging directory, which the next `init` moves into place.
    pub async fn init(&self, id: &AuthorityId, opts: &StoreOptions) -> Result<InitOutcome> {
        self.check_vacant()?;
        let staging = self.staging()?;
        if staging.root().exists() {
            if let Some(staged) = staging.staged_authority(opts).await? {
                if staged != id.as_str() {
                    bail!(
                        "{} holds an interrupted init of authority {staged} whose database is \
                         initialised: run init --authority-id {staged} to finish it",
                        staging.root().display()
                    );
                }
                self.install(&staging)?;
                return Ok(InitOutcome::FinishedInterrupted);
            }
            fs::remove_dir_all(staging.root()).with_context(|| {
                format!(
                    "removing {}, left by an interrupted init",
                    staging.root().display()
                )
            })?;
        }
        staging.create()?;
        match staging.init_staged(id, opts).await {
            Ok(()) => {}
            Err(Staged::NothingCommitted(e)) => {
                let _ = fs::remove_dir_all(staging.root());
                return Err(e);
            }
            Err(Staged::Committed(e)) => {
                return Err(e.context(format!(
                    "the authority's database is initialised, its keys are in {}: run init again \
                     to finish",
                    staging.root().display()
                )));
            }
        }
        self.install(&staging).with_context(|| {
            format!(
                "the authority is complete in {}: run init again to finish",
                staging.root().display()
            )
        })?;
        Ok(InitOutcome::Created)
    }

    /// Write the files of a new authority into this (staging) directory,
    /// then initialise the database (the commit point) and close it.
    async fn init_staged(&self, id: &AuthorityId, opts: &StoreOptions) -> Result<(), Staged> {
        let before = |e: anyhow::Error| Staged::NothingCommitted(e);
        write_synced(&self.id_file(), format!("{id}\n").as_bytes()).map_err(before)?;
        let kek = if std::env::var("MABE_KEK").is_ok() || opts.kek_file.is_some() {
            self.load_kek(opts.kek_file.as_deref()).map_err(before)?
        } else {
            let kek = Kek::generate(&mut OsRng);
            write_private(&self.kek_file(), kek.to_hex().as_bytes()).map_err(before)?;
            kek
        };
        let mut seed = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(seed.as_mut());
        let admin = SigningKey::from_bytes(&seed);
        write_private(
            &self.admin_key_file(),
            Zeroizing::new(hex::encode(admin.to_bytes())).as_bytes(),
        )
        .map_err(before)?;
        self.write_dev_tls().map_err(before)?;
        let sqlite = match &opts.database_url {
            Some(_) => None,
            None => Some(
                SqliteStore::open(&self.database())
                    .context("creating the SQLite database")
                    .map_err(before)?,
            ),
        };
        let store: Arc<dyn Store> = match &sqlite {
            Some(s) => Arc::new(s.clone()),
            None => self.open_store(opts).await.map_err(before)?,
        };
        let admin_pk = admin.verifying_key();
        let node = match Node::init_with_admin_key(
            Arc::clone(&store),
            id.as_str(),
            kek,
            NodeConfig::default(),
            admin_pk,
        )
        .await
        {
            Ok(node) => node,
            // Did the commit land anyway (e.g. the connection broke after it)?
            Err(e) => {
                return Err(match store.meta().await {
                    Ok(Some(m)) if m.admin_public_key == admin_pk.to_bytes() => {
                        Staged::Committed(e.into())
                    }
                    Ok(_) => Staged::NothingCommitted(e.into()),
                    Err(_) => Staged::Committed(e.into()),
                });
            }
        };
        drop(node);
        drop(store);
        if let Some(s) = sqlite {
            s.close()
                .await
                .context("closing the new database")
                .map_err(Staged::Committed)?;
        }
        Ok(())
    }

    /// The authority id of a complete staging directory that an interrupted
    /// `init` left behind (files in place, database initialised with its
    /// admin key), or `None` if it is incomplete and may be removed. An error
    /// means it may hold the only keys of an initialised database: keep it.
    async fn staged_authority(&self, opts: &StoreOptions) -> Result<Option<String>> {
        let files =
            self.authority_id().is_ok() && self.tls_cert().is_file() && self.tls_key().is_file();
        let Ok(admin) = self.admin_key() else {
            // The admin key is written before the database is touched.
            return Ok(None);
        };
        let admin = admin.verifying_key();
        match &opts.database_url {
            // Self-contained: whatever is wrong with it, nothing else refers to it.
            None => {
                if !files || !self.database().is_file() {
                    return Ok(None);
                }
                let Ok(sqlite) = SqliteStore::open(&self.database()) else {
                    return Ok(None);
                };
                let opened = match self.load_kek(opts.kek_file.as_deref()) {
                    Ok(kek) => Node::open(Arc::new(sqlite.clone()), kek, NodeConfig::default())
                        .await
                        .ok(),
                    Err(_) => None,
                };
                let staged = opened
                    .filter(|n| n.admin_public_key() == &admin)
                    .map(|n| n.authority_id().as_str().to_owned());
                sqlite.close().await?;
                Ok(staged)
            }
            Some(_) => {
                let store = self.open_store(opts).await?;
                match store.meta().await? {
                    Some(m) if m.admin_public_key == admin.to_bytes() => {}
                    // Not initialised by this init: the leftover may go.
                    _ => return Ok(None),
                }
                if !files {
                    bail!(
                        "{} holds the admin key of an initialised database but not all of its \
                         files: finish it by hand",
                        self.root.display()
                    );
                }
                let kek = self.load_kek(opts.kek_file.as_deref())?;
                let node = Node::open(store, kek, NodeConfig::default())
                    .await
                    .with_context(|| {
                        format!(
                            "{} belongs to an initialised database whose identity key does not \
                             open with this key-encryption key",
                            self.root.display()
                        )
                    })?;
                Ok(Some(node.authority_id().as_str().to_owned()))
            }
        }
    }
}

/// How far a failed [`DataDir::init_staged`] got.
enum Staged {
    /// The database holds nothing of this init: the staging directory may go.
    NothingCommitted(anyhow::Error),
    /// The database may be initialised with the staged keys: keep them.
    Committed(anyhow::Error),
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
