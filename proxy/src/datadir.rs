//! The proxy's data directory (embedded default).
//!
//! ```text
//! DATA/proxy-id        the proxy id, one line (the audience of authority signatures)
//! DATA/tls/cert.pem    dev TLS certificate for localhost and 127.0.0.1 (clients pin it)
//! DATA/tls/key.pem     its private key (0600)
//! DATA/proxy.db        SQLite database (when no --database-url is given)
//! ```
//!
//! [`DataDir::init`] is what `mabe-proxy init` runs; [`DataDir::open_node`]
//! opens the node of an initialised directory.
//!
//! ```no_run
//! # async fn demo() -> mabe_proxy::Result<()> {
//! let dir = mabe_proxy::datadir::DataDir::new("cloud");
//! dir.init("cloud-1", None).await?;
//! let node = dir.open_node(None).await?;
//! node.trust("hospital-a", &[0u8; 32]).await?; // the authority's identity key
//! # Ok(()) }
//! ```

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::error::{ProxyError, Result};
use crate::node::{Node, NodeConfig, valid_proxy_id};
use crate::server::TlsPem;
use crate::store::{Store, postgres::PgStore, sqlite::SqliteStore};

/// Paths inside a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> ProxyError {
    ProxyError::DataDir(format!("{what} {}: {e}", path.display()))
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
    let mut f = opts.open(path).map_err(|e| io("creating", path, e))?;
    f.write_all(bytes).map_err(|e| io("writing", path, e))?;
    f.sync_all().map_err(|e| io("syncing", path, e))?;
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
        self.root.join("proxy.db")
    }
    /// Proxy id file.
    pub fn id_file(&self) -> PathBuf {
        self.root.join("proxy-id")
    }
    /// Dev TLS certificate path.
    pub fn tls_cert(&self) -> PathBuf {
        self.root.join("tls").join("cert.pem")
    }
    /// Dev TLS key path.
    pub fn tls_key(&self) -> PathBuf {
        self.root.join("tls").join("key.pem")
    }

    /// Create the directory (0700) for `init`; refuses a non-empty one.
    pub fn create(&self) -> Result<()> {
        if self.root.exists()
            && fs::read_dir(&self.root)
                .map_err(|e| io("reading", &self.root, e))?
                .next()
                .is_some()
        {
            return Err(ProxyError::DataDir(format!(
                "{} is not empty: is this proxy already initialised?",
                self.root.display()
            )));
        }
        let tls = self.root.join("tls");
        fs::create_dir_all(&tls).map_err(|e| io("creating", &tls, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
                .map_err(|e| io("protecting", &self.root, e))?;
        }
        Ok(())
    }

    /// Write the proxy id.
    pub fn write_proxy_id(&self, id: &str) -> Result<()> {
        let path = self.id_file();
        fs::write(&path, format!("{id}\n")).map_err(|e| io("writing", &path, e))
    }

    /// The proxy id written at `init`.
    pub fn proxy_id(&self) -> Result<String> {
        let path = self.id_file();
        let text = fs::read_to_string(&path).map_err(|_| {
            ProxyError::DataDir(format!(
                "{} has no proxy id: run `mabe-proxy init` first",
                self.root.display()
            ))
        })?;
        Ok(text.trim().to_owned())
    }

    /// Generate a self-signed development certificate for localhost/127.0.0.1.
    pub fn write_dev_tls(&self) -> Result<()> {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .map_err(|e| ProxyError::Serve(format!("generating the development certificate: {e}")))?;
        let cert = self.tls_cert();
        fs::write(&cert, ck.cert.pem()).map_err(|e| io("writing", &cert, e))?;
        write_private(&self.tls_key(), ck.signing_key.serialize_pem().as_bytes())
    }

    /// Create a new proxy `proxy_id` in this directory (`mabe-proxy init`):
    /// the directory (refused if not empty), the id, the database (the
    /// PostgreSQL one at `database_url`, else SQLite in the directory) and a
    /// development TLS certificate.
    pub async fn init(&self, proxy_id: &str, database_url: Option<&str>) -> Result<()> {
        if !valid_proxy_id(proxy_id) {
            return Err(ProxyError::InvalidArgument(
                "a proxy id must match [a-z0-9][a-z0-9.-]{0,62}".into(),
            ));
        }
        self.create()?;
        self.write_proxy_id(proxy_id)?;
        self.open_store(database_url).await?;
        self.write_dev_tls()
    }

    /// Open the database: PostgreSQL at `database_url` if given, else the
    /// SQLite database in this directory (created if absent).
    pub async fn open_store(&self, database_url: Option<&str>) -> Result<Arc<dyn Store>> {
        Ok(match database_url {
            Some(url) => Arc::new(PgStore::connect(url).await?),
            None => Arc::new(SqliteStore::open(&self.database())?),
        })
    }

    /// Open the node of an initialised directory. Never creates a database
    /// in a directory that `init` did not set up.
    pub async fn open_node(&self, database_url: Option<&str>) -> Result<Node> {
        let id = self.proxy_id()?;
        let store = self.open_store(database_url).await?;
        Node::new(store, NodeConfig::new(id))
    }

    /// Load a certificate and key (the given paths, or the dev pair).
    pub fn tls(&self, cert: Option<&Path>, key: Option<&Path>) -> Result<TlsPem> {
        let cert = cert
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.tls_cert());
        let key = key.map(Path::to_path_buf).unwrap_or_else(|| self.tls_key());
        Ok(TlsPem {
            cert: fs::read(&cert).map_err(|e| io("reading", &cert, e))?,
            key: fs::read(&key).map_err(|e| io("reading", &key, e))?,
        })
    }
}
