//! The person's key store: a directory (default `$MABE_HOME`, else `~/.mabe`)
//! holding
//!
//! ```text
//! HOME/identity              the identity: registry, subject, GID, Ed25519 request key (0600)
//! HOME/keys                  attribute keys, each verified before it was stored (0600)
//! HOME/trust.toml            the trust file (crate::trust)
//! HOME/directories/ID.sdir   the last verified signed directory of each authority
//! ```
//!
//! Secret files are written atomically with mode 0600 in a 0700 directory.
//! With a passphrase, the request key and the attribute keys are sealed with
//! AES-256-GCM under a key derived by Argon2id (m = 19 MiB, t = 2, p = 1, a
//! random 16-byte salt per key store); the public parts (registry, subject,
//! GID, request public key) stay readable and are bound to the ciphertext as
//! associated data. The passphrase protects the keys against someone who
//! obtains a copy of the files (a backup, a lost disk) and must guess it, each
//! guess costing one Argon2id evaluation; it does not protect against malware
//! running as the user while the store is unlocked, and without a passphrase
//! the files are protected only by their permissions. File formats:
//! `docs/CLIENT.md`.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{AeadInOut, array::Array},
};
use ark_std::rand::{CryptoRng, RngCore};
use ed25519_dalek::{SigningKey, VerifyingKey};
use mabe_abe::{
    AttributePublicKey, Gid, HashedGid, Header, PublicKeyRing, UserKey, UserKeyRing, Version,
};
use mabe_policy::{Attribute, AuthorityId};
use zeroize::Zeroizing;

use crate::{
    directory::{SignedDirectory, VerifiedDirectory},
    error::{ClientError, Result},
    files::{Cursor, create_private_dir, put_lp, read_limited, write_private},
    trust::{TrustStore, TrustedAuthority},
};

/// Magic of the identity file.
pub const IDENTITY_MAGIC: &[u8; 16] = b"MABE-IDENTITY-V1";
/// Magic of the keys file.
pub const KEYS_MAGIC: &[u8; 16] = b"MABE-KEYSTORE-V1";
/// Most attribute keys in one key store.
pub const MAX_STORED_KEYS: usize = 4096;
/// Largest keys file accepted.
pub const MAX_KEYS_FILE: u64 = 4 << 20;

const NONE: u8 = 0;
const ARGON2ID_AES256GCM: u8 = 1;
/// Argon2id parameters for new stores: OWASP's m = 19 MiB, t = 2, p = 1.
const KDF_M_KIB: u32 = 19 * 1024;
const KDF_T: u32 = 2;
const KDF_P: u32 = 1;
/// Bounds accepted when reading (a hostile file must not exhaust memory).
const KDF_MAX_M_KIB: u32 = 1 << 20;
const KDF_MAX_T: u32 = 16;
const KDF_MAX_P: u32 = 8;

/// A person's identity: GID and Ed25519 request key.
pub struct Identity {
    /// GID.
    pub gid: Gid,
    /// Request signing key (secret): signs key requests and records.
    pub key: SigningKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("gid", &self.gid)
            .field(
                "request_key",
                &hex::encode(self.key.verifying_key().to_bytes()),
            )
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A new identity for `subject` in `registry`, with a fresh request key
    /// from the operating system's generator.
    pub fn new(registry: &str, subject: &str) -> Result<Identity, mabe_abe::AbeError> {
        Self::generate(registry, subject, &mut ark_std::rand::rngs::OsRng)
    }

    /// A new identity with a request key drawn from `rng`.
    ///
    /// ```
    /// use ark_std::rand::SeedableRng;
    /// let mut rng = ark_std::rand::rngs::StdRng::seed_from_u64(1); // OsRng in real code
    /// let id = mabe_client::Identity::generate("big-register", "19012345601", &mut rng)?;
    /// assert_eq!(id.gid, mabe_abe::Gid::derive("big-register", "19012345601")?);
    /// # Ok::<(), mabe_abe::AbeError>(())
    /// ```
    pub fn generate<R: RngCore + CryptoRng + ?Sized>(
        registry: &str,
        subject: &str,
        rng: &mut R,
    ) -> Result<Identity, mabe_abe::AbeError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        Ok(Identity {
            gid: Gid::derive(registry, subject)?,
            key: SigningKey::from_bytes(&seed),
        })
    }
}

/// The public part of a stored identity (readable without the passphrase).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Registry, as given.
    pub registry: String,
    /// Subject, as given.
    pub subject: String,
    /// GID.
    pub gid: Gid,
    /// Ed25519 request public key (authorities enroll it).
    pub request_key: VerifyingKey,
    /// Whether the secret parts are sealed under a passphrase.
    pub protected: bool,
}

/// One stored attribute key and when its grant expires (0: never).
#[derive(Debug)]
pub struct StoredKey {
    /// The key (verified before it was stored).
    pub key: UserKey,
    /// Unix seconds when the grant expires; 0 for no expiry.
    pub expires_at: i64,
}

/// A person's attribute keys, by attribute and version. Older versions are
/// kept: rows that the record store has not updated yet still need them.
pub struct StoredKeys {
    gid: HashedGid,
    keys: BTreeMap<(Attribute, Version), StoredKey>,
}

impl fmt::Debug for StoredKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredKeys")
            .field("gid", &self.gid.gid())
            .field(
                "keys",
                &self
                    .keys
                    .keys()
                    .map(|(a, v)| format!("{a}#{v}"))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn copy_key(k: &UserKey) -> Result<UserKey> {
    Ok(UserKey::from_bytes(&k.to_bytes())?)
}

impl StoredKeys {
    /// An empty set for `gid`.
    pub fn new(gid: Gid) -> Result<Self> {
        Ok(StoredKeys {
            gid: HashedGid::new(gid)?,
            keys: BTreeMap::new(),
        })
    }

    /// The GID.
    pub fn gid(&self) -> Gid {
        self.gid.gid()
    }

    /// Verify `key` against `pk` (same attribute and version, issued to this
    /// GID, pairing check `e(g1, K) == E · e(Y, H(GID))`) and store it.
    /// Returns whether it was new.
    pub fn insert_verified(
        &mut self,
        key: UserKey,
        pk: &AttributePublicKey,
        expires_at: i64,
    ) -> Result<bool> {
        let authority = key.attribute().authority().to_string();
        key.verify(&self.gid, pk).map_err(|e| ClientError::BadKey {
            authority,
            reason: e.to_string(),
        })?;
        if self.keys.len() >= MAX_STORED_KEYS {
            return Err(ClientError::Invalid("the key store is full".into()));
        }
        let id = (key.attribute().clone(), key.version());
        Ok(self
            .keys
            .insert(id, StoredKey { key, expires_at })
            .is_none())
    }

    /// Every stored key, by attribute then version.
    pub fn iter(&self) -> impl Iterator<Item = &StoredKey> {
        self.keys.values()
    }

    /// The distinct attributes held (any version).
    pub fn attributes(&self) -> Vec<Attribute> {
        let mut v: Vec<Attribute> = self.keys.keys().map(|(a, _)| a.clone()).collect();
        v.dedup();
        v
    }

    /// The key ring to decrypt `header`: for each attribute of its policy,
    /// the key at the row's version if held, else the newest held; each key
    /// is checked again (pairing check) against `pks` while the ring is built.
    /// Keys without a public key in `pks` are left out.
    pub fn ring_for(&self, header: &Header, pks: &PublicKeyRing) -> Result<UserKeyRing> {
        let mut ring = UserKeyRing::new(self.gid())?;
        for row in header.rows() {
            let a = row.attribute();
            if ring.get(a).is_some() {
                continue;
            }
            let chosen = self.keys.get(&(a.clone(), row.version())).or_else(|| {
                self.keys
                    .range((a.clone(), Version::new(0))..=(a.clone(), Version::new(u32::MAX)))
                    .next_back()
                    .map(|(_, k)| k)
            });
            if let Some(k) = chosen {
                if let Some(pk) = pks.get(a, k.key.version()) {
                    ring.insert(copy_key(&k.key)?, pk)?;
                }
            }
        }
        Ok(ring)
    }

    fn encode_body(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(16 + self.keys.len() * 256));
        out.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
        for k in self.keys.values() {
            put_lp(&mut out, &k.key.to_bytes());
            out.extend_from_slice(&k.expires_at.to_be_bytes());
        }
        out
    }

    fn decode_body(gid: Gid, body: &[u8]) -> Result<Self> {
        let mut c = Cursor::new(body, "keys file");
        let n = c.u32()? as usize;
        if n > MAX_STORED_KEYS {
            return Err(c.bad("too many keys"));
        }
        let mut keys = StoredKeys::new(gid)?;
        for _ in 0..n {
            let key = UserKey::from_bytes(c.lp(1024)?)?;
            let expires_at = c.i64()?;
            if key.gid() != gid {
                return Err(c.bad("a key belongs to another GID"));
            }
            keys.keys.insert(
                (key.attribute().clone(), key.version()),
                StoredKey { key, expires_at },
            );
        }
        c.finish()?;
        Ok(keys)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct KdfParams {
    salt: [u8; 16],
    m_kib: u32,
    t: u32,
    p: u32,
}

impl KdfParams {
    /// Read the parameters from a protected file, refusing any outside the
    /// accepted range (an edited file must not make Argon2 allocate
    /// terabytes or run for hours).
    fn read(c: &mut Cursor<'_>) -> Result<KdfParams> {
        let params = KdfParams {
            salt: c.array()?,
            m_kib: c.u32()?,
            t: c.u32()?,
            p: c.u32()?,
        };
        if params.m_kib > KDF_MAX_M_KIB
            || params.t > KDF_MAX_T
            || params.p > KDF_MAX_P
            || params.p == 0
        {
            return Err(c.bad("passphrase parameters out of range"));
        }
        Ok(params)
    }
}

/// The key store in a home directory. Open it with [`KeyStore::open`];
/// give the passphrase with [`KeyStore::with_passphrase`] when the identity
/// is protected ([`IdentityInfo::protected`]).
pub struct KeyStore {
    home: PathBuf,
    passphrase: Option<Zeroizing<String>>,
    derived: Mutex<Option<(KdfParams, Zeroizing<[u8; 32]>)>>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("home", &self.home)
            .field("passphrase", &self.passphrase.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// The default home: `$MABE_HOME`, else `~/.mabe`.
    pub fn default_home() -> Result<PathBuf> {
        if let Some(h) = std::env::var_os("MABE_HOME").filter(|h| !h.is_empty()) {
            return Ok(PathBuf::from(h));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".mabe"))
            .ok_or_else(|| {
                ClientError::Invalid("neither MABE_HOME nor HOME is set: pass --home".into())
            })
    }

    /// The key store at `home` (nothing is read or created yet).
    ///
    /// ```
    /// use ark_std::rand::SeedableRng;
    /// let dir = tempfile::tempdir()?;
    /// let store = mabe_client::KeyStore::open(dir.path());
    /// let mut rng = ark_std::rand::rngs::StdRng::seed_from_u64(1); // OsRng in real code
    /// let info = store.create_identity("big-register", "19012345601", None, &mut rng)?;
    /// assert_eq!(store.identity_info()?, info);
    /// assert_eq!(store.load_identity()?.gid, info.gid);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(home: impl Into<PathBuf>) -> KeyStore {
        KeyStore {
            home: home.into(),
            passphrase: None,
            derived: Mutex::new(None),
        }
    }

    /// Use `passphrase` to open (and to create) protected files.
    pub fn with_passphrase(mut self, passphrase: Zeroizing<String>) -> KeyStore {
        self.passphrase = Some(passphrase);
        self
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        &self.home
    }
    /// The identity file.
    pub fn identity_path(&self) -> PathBuf {
        self.home.join("identity")
    }
    /// The keys file.
    pub fn keys_path(&self) -> PathBuf {
        self.home.join("keys")
    }
    /// The trust file.
    pub fn trust_path(&self) -> PathBuf {
        self.home.join("trust.toml")
    }
    fn directory_path(&self, id: &AuthorityId) -> PathBuf {
        self.home.join("directories").join(format!("{id}.sdir"))
    }

    /// Load the trust file.
    pub fn trust(&self) -> Result<TrustStore> {
        TrustStore::load(&self.trust_path())
    }

    fn kek(&self, params: KdfParams, path: &Path) -> Result<Zeroizing<[u8; 32]>> {
        if let Ok(cache) = self.derived.lock() {
            if let Some((p, k)) = cache.as_ref() {
                if *p == params {
                    return Ok(k.clone());
                }
            }
        }
        let pass = self
            .passphrase
            .as_ref()
            .ok_or_else(|| ClientError::PassphraseNeeded(path.to_owned()))?;
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon2::Params::new(params.m_kib, params.t, params.p, Some(32))
                .map_err(|e| ClientError::malformed("passphrase parameters", e.to_string()))?,
        );
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(pass.as_bytes(), &params.salt, key.as_mut())
            .map_err(|e| ClientError::malformed("passphrase parameters", e.to_string()))?;
        if let Ok(mut cache) = self.derived.lock() {
            *cache = Some((params, key.clone()));
        }
        Ok(key)
    }

    /// `public ‖ protection ‖ …` for a secret `body`: plain, or sealed under
    /// the passphrase with `public ‖ protection ‖ params` as associated data.
    fn seal<R: RngCore + CryptoRng + ?Sized>(
        &self,
        public: &[u8],
        body: &[u8],
        params: Option<KdfParams>,
        path: &Path,
        rng: &mut R,
    ) -> Result<Zeroizing<Vec<u8>>> {
        let mut out = Zeroizing::new(public.to_vec());
        let Some(params) = params else {
            out.push(NONE);
            out.extend_from_slice(body);
            return Ok(out);
        };
        out.push(ARGON2ID_AES256GCM);
        out.extend_from_slice(&params.salt);
        out.extend_from_slice(&params.m_kib.to_be_bytes());
        out.extend_from_slice(&params.t.to_be_bytes());
        out.extend_from_slice(&params.p.to_be_bytes());
        let kek = self.kek(params, path)?;
        let cipher = Aes256Gcm::new_from_slice(kek.as_ref())
            .map_err(|_| ClientError::Invalid("key length".into()))?;
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let ad = out.to_vec();
        let mut buf = Zeroizing::new(body.to_vec());
        let tag = cipher
            .encrypt_inout_detached(&Array::from(nonce), &ad, buf.as_mut_slice().into())
            .map_err(|_| ClientError::Invalid("sealing failed".into()))?;
        out.extend_from_slice(&nonce);
        put_lp(&mut out, &buf);
        out.extend_from_slice(tag.as_slice());
        Ok(out)
    }

    /// Read what follows `public` in a file written by [`KeyStore::seal`].
    fn open_sealed(
        &self,
        c: &mut Cursor<'_>,
        path: &Path,
        max_body: usize,
    ) -> Result<(Zeroizing<Vec<u8>>, Option<KdfParams>)> {
        match c.u8()? {
            NONE => {
                let rest = c.take(c.remaining())?;
                if rest.len() > max_body {
                    return Err(c.bad("over its size limit"));
                }
                Ok((Zeroizing::new(rest.to_vec()), None))
            }
            ARGON2ID_AES256GCM => {
                let params = KdfParams::read(c)?;
                let ad = c.consumed().to_vec();
                let nonce: [u8; 12] = c.array()?;
                let mut buf = Zeroizing::new(c.lp(max_body)?.to_vec());
                let tag: [u8; 16] = c.array()?;
                c.finish()?;
                let kek = self.kek(params, path)?;
                let cipher = Aes256Gcm::new_from_slice(kek.as_ref())
                    .map_err(|_| ClientError::Invalid("key length".into()))?;
                cipher
                    .decrypt_inout_detached(
                        &Array::from(nonce),
                        &ad,
                        buf.as_mut_slice().into(),
                        &Array::from(tag),
                    )
                    .map_err(|_| {
                        if let Ok(mut cache) = self.derived.lock() {
                            *cache = None;
                        }
                        ClientError::WrongPassphrase(path.to_owned())
                    })?;
                Ok((buf, Some(params)))
            }
            _ => Err(c.bad("unknown protection")),
        }
    }

    /// Create the identity (refuses to overwrite one) and an empty keys file.
    /// With a passphrase set, both are sealed under it.
    pub fn create_identity<R: RngCore + CryptoRng + ?Sized>(
        &self,
        registry: &str,
        subject: &str,
        seed: Option<[u8; 32]>,
        rng: &mut R,
    ) -> Result<IdentityInfo> {
        let path = self.identity_path();
        if path.exists() {
            return Err(ClientError::IdentityExists(self.home.clone()));
        }
        create_private_dir(&self.home)?;
        let gid = Gid::derive(registry, subject)?;
        let seed = Zeroizing::new(seed.unwrap_or_else(|| {
            let mut s = [0u8; 32];
            rng.fill_bytes(&mut s);
            s
        }));
        let key = SigningKey::from_bytes(&seed);
        let info = IdentityInfo {
            registry: registry.to_owned(),
            subject: subject.to_owned(),
            gid,
            request_key: key.verifying_key(),
            protected: self.passphrase.is_some(),
        };
        let params = self.passphrase.as_ref().map(|_| {
            let mut salt = [0u8; 16];
            rng.fill_bytes(&mut salt);
            KdfParams {
                salt,
                m_kib: KDF_M_KIB,
                t: KDF_T,
                p: KDF_P,
            }
        });
        let mut public = IDENTITY_MAGIC.to_vec();
        put_lp(&mut public, registry.as_bytes());
        put_lp(&mut public, subject.as_bytes());
        public.extend_from_slice(gid.as_bytes());
        public.extend_from_slice(info.request_key.as_bytes());
        let file = self.seal(&public, seed.as_ref(), params, &path, rng)?;
        // The keys file first: an identity without one is never left behind.
        self.write_keys_with(&StoredKeys::new(gid)?, params, rng)?;
        write_private(&path, &file)?;
        Ok(info)
    }

    /// The identity file's bytes, its public part, and that part's length.
    fn read_identity(&self) -> Result<(IdentityInfo, Vec<u8>, usize)> {
        let path = self.identity_path();
        if !path.exists() {
            return Err(ClientError::NoIdentity(self.home.clone()));
        }
        let bytes = read_limited(&path, 8192)?;
        let mut c = Cursor::new(&bytes, "identity file");
        if c.take(IDENTITY_MAGIC.len())? != IDENTITY_MAGIC {
            return Err(c.bad("not a mabe identity file"));
        }
        let registry = c.string(mabe_abe::MAX_IDENTITY_LEN)?;
        let subject = c.string(mabe_abe::MAX_IDENTITY_LEN)?;
        let gid = Gid::from_bytes(c.array()?);
        let request_key = VerifyingKey::from_bytes(&c.array()?)
            .map_err(|_| c.bad("invalid request public key"))?;
        if Gid::derive(&registry, &subject)? != gid {
            return Err(c.bad("the GID does not match the registry and subject"));
        }
        let public_len = c.consumed().len();
        let protected = bytes.get(public_len) == Some(&ARGON2ID_AES256GCM);
        let info = IdentityInfo {
            registry,
            subject,
            gid,
            request_key,
            protected,
        };
        Ok((info, bytes, public_len))
    }

    /// The public part of the identity (no passphrase needed).
    pub fn identity_info(&self) -> Result<IdentityInfo> {
        Ok(self.read_identity()?.0)
    }

    /// Load the identity with its secret request key (needs the passphrase
    /// if the identity is protected). Checks that the secret key matches the
    /// stored public key.
    pub fn load_identity(&self) -> Result<Identity> {
        let (info, bytes, public_len) = self.read_identity()?;
        let bytes = Zeroizing::new(bytes);
        let mut c = Cursor::new(&bytes, "identity file");
        c.take(public_len)?;
        let (seed, _) = self.open_sealed(&mut c, &self.identity_path(), 32)?;
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
            seed.as_slice()
                .try_into()
                .map_err(|_| ClientError::malformed("identity file", "bad key length"))?,
        );
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key() != info.request_key {
            return Err(ClientError::malformed(
                "identity file",
                "the secret key does not match the public key",
            ));
        }
        Ok(Identity { gid: info.gid, key })
    }

    fn identity_params(&self) -> Result<Option<KdfParams>> {
        let (_, bytes, public_len) = self.read_identity()?;
        let mut c = Cursor::new(&bytes, "identity file");
        c.take(public_len)?;
        if c.u8()? != ARGON2ID_AES256GCM {
            return Ok(None);
        }
        Ok(Some(KdfParams::read(&mut c)?))
    }

    /// Load the attribute keys (needs the passphrase if protected).
    pub fn load_keys(&self) -> Result<StoredKeys> {
        let info = self.identity_info()?;
        let path = self.keys_path();
        if !path.exists() {
            return StoredKeys::new(info.gid);
        }
        let bytes = read_limited(&path, MAX_KEYS_FILE)?;
        let mut c = Cursor::new(&bytes, "keys file");
        if c.take(KEYS_MAGIC.len())? != KEYS_MAGIC {
            return Err(c.bad("not a mabe keys file"));
        }
        let gid = Gid::from_bytes(c.array()?);
        if gid != info.gid {
            return Err(c.bad("it belongs to another GID than the identity"));
        }
        let (body, _) = self.open_sealed(&mut c, &path, MAX_KEYS_FILE as usize)?;
        StoredKeys::decode_body(gid, &body)
    }

    /// Write the attribute keys back (atomically, sealed like the identity).
    pub fn save_keys(&self, keys: &StoredKeys) -> Result<()> {
        let info = self.identity_info()?;
        if keys.gid() != info.gid {
            return Err(ClientError::Invalid(
                "these keys belong to another GID than the identity".into(),
            ));
        }
        let params = self.identity_params()?;
        self.write_keys_with(keys, params, &mut ark_std::rand::rngs::OsRng)
    }

    fn write_keys_with<R: RngCore + CryptoRng + ?Sized>(
        &self,
        keys: &StoredKeys,
        params: Option<KdfParams>,
        rng: &mut R,
    ) -> Result<()> {
        let path = self.keys_path();
        let mut public = KEYS_MAGIC.to_vec();
        public.extend_from_slice(keys.gid().as_bytes());
        let body = keys.encode_body();
        let file = self.seal(&public, &body, params, &path, rng)?;
        write_private(&path, &file)
    }

    /// The stored directory of `trust`, verified again against the pinned
    /// key (`None` if none is stored).
    pub fn load_directory(&self, trust: &TrustedAuthority) -> Result<Option<VerifiedDirectory>> {
        let path = self.directory_path(&trust.id);
        if !path.exists() {
            return Ok(None);
        }
        let bytes = read_limited(&path, mabe_proto::signing::MAX_DIRECTORY_BYTES as u64 + 256)?;
        let signed = SignedDirectory::from_bytes(&bytes)?;
        VerifiedDirectory::verify(trust, signed).map(Some)
    }

    /// Store a verified directory unless the stored one is newer (a directory
    /// never rolls back). Returns whether it was stored.
    pub fn save_directory(
        &self,
        dir: &VerifiedDirectory,
        trust: &TrustedAuthority,
    ) -> Result<bool> {
        if let Ok(Some(old)) = self.load_directory(trust) {
            if old.issued_at() > dir.issued_at() {
                return Ok(false);
            }
        }
        write_private(
            &self.directory_path(dir.authority()),
            &dir.signed().to_bytes(),
        )?;
        Ok(true)
    }

    /// Every stored directory of the pinned authorities, verified. A stored
    /// directory that no longer verifies is an error (it was tampered with).
    pub fn directories(
        &self,
        trust: &TrustStore,
    ) -> Result<BTreeMap<AuthorityId, VerifiedDirectory>> {
        let mut out = BTreeMap::new();
        for t in trust.authorities() {
            if let Some(d) = self.load_directory(t)? {
                out.insert(t.id.clone(), d);
            }
        }
        Ok(out)
    }
}
