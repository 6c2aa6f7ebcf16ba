//! [`Client`]: a person's key store and trust file together, with the
//! operations of the `mabe` command (fetch and import keys, encrypt, decrypt,
//! check a policy).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
};

use ark_bls12_381::Fr;
use ark_std::rand::{CryptoRng, RngCore};
use mabe_abe::{EncryptOptions, Header, PublicKeyRing, RecordKey, UserKey, Version};
use mabe_policy::{Attribute, AuthorityId, Lsss, Policy, PolicyError};
use zeroize::Zeroizing;

use crate::{
    directory::{VerifiedDirectory, decryption_ring, encryption_ring},
    error::{ClientError, Result},
    files::unix_now,
    keystore::{Identity, KeyStore, StoredKeys},
    net::Connection,
    record::{PayloadSummary, RecordPrefix, decrypt_payload, read_prefix, write_record},
    trust::{TrustStore, expand_emergency},
};

/// A person's client: their key store and trust file.
#[derive(Debug)]
pub struct Client {
    store: KeyStore,
    trust: TrustStore,
}

/// The keys received from one authority by [`Client::fetch_keys`].
#[derive(Debug)]
pub struct Fetched {
    /// The authority.
    pub authority: AuthorityId,
    /// Keys verified and stored (attribute, version, whether new).
    pub keys: Vec<(Attribute, Version, bool)>,
}

/// What [`Client::check_policy`] found.
#[derive(Debug, Clone)]
pub struct PolicyReport {
    /// The parsed policy (after `EMERGENCY` expansion).
    pub policy: Policy,
    /// Each authority the policy names, and whether it is pinned.
    pub authorities: Vec<(AuthorityId, bool)>,
    /// Attributes held (any version).
    pub held: Vec<Attribute>,
    /// `None` if the keys held satisfy the policy, else a smallest set of
    /// attributes that would.
    pub missing: Option<Vec<Attribute>>,
    /// The attributes a decryption would use, if satisfied.
    pub used: Vec<Attribute>,
}

/// A record ready to decrypt: its prefix and its data key (all checks of the
/// header done).
#[derive(Debug)]
pub struct OpenedRecord {
    /// The record's prefix (header, writer).
    pub prefix: RecordPrefix,
    key: RecordKey,
}

impl OpenedRecord {
    /// Decrypt the rest of the record (the payload that follows the prefix
    /// in `input`) into `output`, and check the writer's signature. See
    /// [`decrypt_payload`] for what to do with the output on failure.
    pub fn decrypt<R: Read, W: Write>(&self, input: R, output: W) -> Result<PayloadSummary> {
        decrypt_payload(&self.prefix, &self.key, input, output)
    }
}

impl Client {
    /// A client over `store` and `trust`.
    pub fn new(store: KeyStore, trust: TrustStore) -> Client {
        Client { store, trust }
    }

    /// Open the key store's trust file.
    pub fn open(store: KeyStore) -> Result<Client> {
        let trust = store.trust()?;
        Ok(Client { store, trust })
    }

    /// The key store.
    pub fn store(&self) -> &KeyStore {
        &self.store
    }

    /// The trust file.
    pub fn trust(&self) -> &TrustStore {
        &self.trust
    }

    /// Parse a policy, expanding `EMERGENCY`; every authority must be pinned.
    pub fn policy(&self, text: &str) -> Result<Policy> {
        self.trust.expand_policy(text)
    }

    /// Fetch, verify and store the directory of a pinned, online authority.
    pub async fn refresh_directory(&self, id: &AuthorityId) -> Result<VerifiedDirectory> {
        let t = self.trust.authority(id)?;
        let mut conn = Connection::connect(t.clone()).await?;
        let dir = conn.verified_directory().await?;
        if !self.store.save_directory(&dir, t)? {
            // The stored directory is newer: never roll back to an older one.
            if let Some(stored) = self.store.load_directory(t)? {
                return Ok(stored);
            }
        }
        Ok(dir)
    }

    /// The verified directories of `ids`: fetched fresh from online
    /// authorities when `online`, else (or if that fails) the stored ones.
    /// Returns them with a note for each fallback to a stored directory.
    pub async fn directories(
        &self,
        ids: &BTreeSet<AuthorityId>,
        online: bool,
    ) -> Result<(BTreeMap<AuthorityId, VerifiedDirectory>, Vec<String>)> {
        let mut out = BTreeMap::new();
        let mut notes = Vec::new();
        for id in ids {
            let t = self.trust.authority(id)?;
            if online && t.endpoint.is_some() {
                match self.refresh_directory(id).await {
                    Ok(d) => {
                        out.insert(id.clone(), d);
                        continue;
                    }
                    // A directory that fails verification is never papered over.
                    Err(e @ ClientError::BadDirectory { .. }) => return Err(e),
                    Err(e) => notes.push(format!("{e}; using the stored directory")),
                }
            }
            match self.store.load_directory(t)? {
                Some(d) => {
                    out.insert(id.clone(), d);
                }
                None => return Err(ClientError::NoDirectory(id.to_string())),
            }
        }
        Ok((out, notes))
    }

    /// For every pinned authority with an endpoint (or only `only`): fetch
    /// and verify its directory, fetch the keys granted to this person
    /// (signed request), verify **each** by the pairing check against the
    /// directory, and store them. If any key of an authority fails, none of
    /// that authority's keys is stored and the error says why.
    pub async fn fetch_keys(&self, only: Option<&AuthorityId>) -> Result<Vec<Fetched>> {
        let identity = self.store.load_identity()?;
        let mut keys = self.store.load_keys()?;
        let targets: Vec<_> = match only {
            Some(id) => vec![self.trust.authority(id)?.clone()],
            None => self
                .trust
                .authorities()
                .filter(|t| t.endpoint.is_some())
                .cloned()
                .collect(),
        };
        let mut out = Vec::new();
        for t in targets {
            let mut conn = Connection::connect(t.clone()).await?;
            let dir = conn.verified_directory().await?;
            self.store.save_directory(&dir, &t)?;
            let issued = conn.fetch_issued_keys(&identity).await?;
            let mut staged = StoredKeys::new(identity.gid)?;
            for k in issued {
                verify_received(&t.id, &k.user_key, &dir, &mut staged, k.expires_at)?;
            }
            out.push(Fetched {
                authority: t.id.clone(),
                keys: staged_into(staged, &dir, &mut keys)?,
            });
        }
        self.store.save_keys(&keys)?;
        Ok(out)
    }

    /// Break the glass at `authority` (emergency staff only): the emergency
    /// key is verified by the pairing check against the authority's signed
    /// directory and stored; it expires (the returned `Fetched` lists it).
    pub async fn break_glass(&self, authority: &AuthorityId, reason: &str) -> Result<Fetched> {
        let identity = self.store.load_identity()?;
        let mut keys = self.store.load_keys()?;
        let t = self.trust.authority(authority)?.clone();
        let mut conn = Connection::connect(t.clone()).await?;
        let dir = conn.verified_directory().await?;
        self.store.save_directory(&dir, &t)?;
        let issued = conn.break_glass(&identity, reason).await?;
        let mut staged = StoredKeys::new(identity.gid)?;
        for k in issued {
            verify_received(&t.id, &k.user_key, &dir, &mut staged, k.expires_at)?;
        }
        let fetched = Fetched {
            authority: t.id.clone(),
            keys: staged_into(staged, &dir, &mut keys)?,
        };
        self.store.save_keys(&keys)?;
        Ok(fetched)
    }

    /// Ask `attribute`'s authority for it, with a reason (signed). Returns
    /// the request id; an administrator (or the patient, for a personal
    /// authority) decides, then `fetch_keys` brings the key.
    pub async fn request_attribute(&self, attribute: &Attribute, reason: &str) -> Result<i64> {
        let identity = self.store.load_identity()?;
        let t = self.trust.authority(attribute.authority())?;
        let mut conn = Connection::connect(t.clone()).await?;
        conn.request_attribute(&identity, &attribute.to_string(), reason)
            .await
    }

    /// Import an offline key bundle (`mabe-authority issue --out`): its
    /// authority must be pinned. The signed directory the bundle carries (if
    /// any) is verified against the pinned identity key and stored unless a
    /// newer one is; each key is then verified by the pairing check against
    /// the newest verified directory (fetched fresh when `online` and the
    /// authority has an endpoint, else stored) before any is stored.
    pub async fn import_bundle(
        &self,
        bundle: &[u8],
        online: bool,
    ) -> Result<Vec<(Attribute, Version, bool)>> {
        let bundle = mabe_proto::bundle::decode(bundle)
            .map_err(|e| ClientError::malformed("key bundle", e.0))?;
        let id = AuthorityId::new(&bundle.authority)?;
        let t = self.trust.authority(&id)?.clone();
        if let Some(file) = &bundle.directory {
            self.import_directory(file)?;
        }
        let ids = BTreeSet::from([id.clone()]);
        let (dirs, _) = self.directories(&ids, online).await?;
        let dir = dirs
            .get(&id)
            .ok_or_else(|| ClientError::NoDirectory(id.to_string()))?;
        let mut keys = self.store.load_keys()?;
        let mut staged = StoredKeys::new(keys.gid())?;
        for k in &bundle.keys {
            verify_received(&t.id, k, dir, &mut staged, 0)?;
        }
        let got = staged_into(staged, dir, &mut keys)?;
        self.store.save_keys(&keys)?;
        Ok(got)
    }

    /// Import a signed directory file (`mabe-authority directory export`,
    /// docs/FORMAT.md §9.3): its authority must be pinned and its signature
    /// must verify with the pinned identity key. It is stored unless the
    /// stored one is newer (a directory is never rolled back). Returns the
    /// directory now in force and whether the imported one was stored.
    pub fn import_directory(&self, file: &[u8]) -> Result<(VerifiedDirectory, bool)> {
        let signed = crate::directory::SignedDirectory::from_bytes(file)?;
        let body = mabe_proto::signing::Directory::decode(&signed.body)
            .map_err(|e| ClientError::malformed("signed directory", e.to_string()))?;
        let id = AuthorityId::new(&body.authority)?;
        let t = self.trust.authority(&id)?;
        let dir = VerifiedDirectory::verify(t, signed)?;
        if self.store.save_directory(&dir, t)? {
            Ok((dir, true))
        } else {
            let stored = self
                .store
                .load_directory(t)?
                .ok_or_else(|| ClientError::NoDirectory(id.to_string()))?;
            Ok((stored, false))
        }
    }

    /// The public keys to encrypt under `policy` (current versions from
    /// verified, unexpired directories), with notes on fallbacks.
    pub async fn encryption_keys(
        &self,
        policy: &Policy,
        online: bool,
    ) -> Result<(PublicKeyRing, Vec<String>)> {
        let (dirs, notes) = self.directories(&policy.authorities(), online).await?;
        Ok((encryption_ring(policy, &dirs, unix_now())?, notes))
    }

    /// Encrypt `input` under `policy` into a record on `output`, signed by
    /// `signer`. See [`crate::record`].
    #[allow(clippy::too_many_arguments)]
    pub fn encrypt<R, I, O>(
        &self,
        policy: &Policy,
        pks: &PublicKeyRing,
        signer: Option<&Identity>,
        options: &EncryptOptions,
        rng: &mut R,
        input: I,
        output: O,
    ) -> Result<Header>
    where
        R: RngCore + CryptoRng + ?Sized,
        I: Read,
        O: Write,
    {
        write_record(policy, pks, options, signer, rng, input, output)
    }

    /// Read a record's prefix from `input` and recover its data key, after
    /// every check a person can act on: each authority pinned, public keys
    /// known (fetched when `online` and missing), keys held at the right
    /// versions. Only then does the cryptography run (one coarse error).
    pub async fn open_record<R: Read>(&self, input: &mut R, online: bool) -> Result<OpenedRecord> {
        let prefix = read_prefix(input)?;
        let key = self.record_key(&prefix.header, online).await?;
        Ok(OpenedRecord { prefix, key })
    }

    /// Recover the data key of `header` (see [`Client::open_record`]).
    pub async fn record_key(&self, header: &Header, online: bool) -> Result<RecordKey> {
        let ids = header.policy().authorities();
        for id in &ids {
            self.trust.authority(id)?;
        }
        let keys = self.store.load_keys()?;
        let (dirs, _) = self.directories(&ids, false).await.or_else(|e| match e {
            ClientError::NoDirectory(_) if online => Ok((BTreeMap::new(), vec![])),
            e => Err(e),
        })?;
        match self.try_record_key(header, &keys, &dirs) {
            Err(ClientError::MissingPublicKey { .. }) | Err(ClientError::NoDirectory(_))
                if online =>
            {
                let (dirs, _) = self.directories(&ids, true).await?;
                self.try_record_key(header, &keys, &dirs)
            }
            other => other,
        }
    }

    fn try_record_key(
        &self,
        header: &Header,
        keys: &StoredKeys,
        dirs: &BTreeMap<AuthorityId, VerifiedDirectory>,
    ) -> Result<RecordKey> {
        let pks = decryption_ring(dirs.values())?;
        let ring = keys.ring_for(header, &pks)?;
        let held = keys.attributes();
        // A key held whose public key is not known: say so, not "missing".
        for row in header.rows() {
            if held.contains(row.attribute()) && ring.get(row.attribute()).is_none() {
                if !dirs.contains_key(row.attribute().authority()) {
                    return Err(ClientError::NoDirectory(
                        row.attribute().authority().to_string(),
                    ));
                }
                return Err(ClientError::MissingPublicKey {
                    attribute: row.attribute().clone(),
                    version: Some(row.version()),
                });
            }
        }
        mabe_abe::decapsulate(header, &ring, &pks).map_err(|e| match ClientError::from(e) {
            ClientError::NotSatisfied { missing, .. } => ClientError::NotSatisfied {
                missing,
                held: held.clone(),
            },
            other => other,
        })
    }

    /// Export the keys held and the public keys of every stored, verified
    /// directory as JSON text (`docs/FORMAT.md` §9.5), so that another
    /// implementation can decrypt our records. The text holds secret keys:
    /// it is wiped on drop, and belongs only in a private file.
    pub fn export_keys(&self) -> Result<Zeroizing<String>> {
        let keys = self.store.load_keys()?;
        let dirs = self.store.directories(&self.trust)?;
        let mut out = Zeroizing::new(String::with_capacity(4096));
        out.push_str("{\n  \"format\": \"mabe-key-export-v1\",\n");
        out.push_str(&format!("  \"gid\": \"{}\",\n  \"keys\": [", keys.gid()));
        for (i, k) in keys.iter().enumerate() {
            let object = Zeroizing::new(hex::encode(k.key.to_bytes().as_slice()));
            out.push_str(if i == 0 { "\n" } else { ",\n" });
            // Attribute texts are canonical ([a-z0-9_.:@-]): no escaping needed.
            out.push_str(&format!(
                "    {{\"attribute\": \"{}\", \"version\": {}, \"expires_at\": {}, \"object\": \"",
                k.key.attribute(),
                k.key.version(),
                k.expires_at
            ));
            out.push_str(&object);
            out.push_str("\"}");
        }
        out.push_str("\n  ],\n  \"public_keys\": [");
        let mut first = true;
        for d in dirs.values() {
            for (a, v, e) in d.entries() {
                out.push_str(if first { "\n" } else { ",\n" });
                first = false;
                out.push_str(&format!(
                    "    {{\"attribute\": \"{a}\", \"version\": {v}, \"current\": {}, \"object\": \"{}\"}}",
                    e.current,
                    hex::encode(e.public_key.to_bytes())
                ));
            }
        }
        out.push_str("\n  ]\n}\n");
        Ok(out)
    }

    /// Parse `text` (expanding `EMERGENCY`) and report its canonical form,
    /// authorities (pinned or not) and whether the keys held satisfy it.
    pub fn check_policy(&self, text: &str) -> Result<PolicyReport> {
        let policy = mabe_policy::parse(&expand_emergency(text, self.trust.emergency())?)?;
        let authorities = policy
            .authorities()
            .into_iter()
            .map(|a| {
                let trusted = self.trust.authority(&a).is_ok();
                (a, trusted)
            })
            .collect();
        let held = match self.store.identity_info() {
            Ok(_) => self.store.load_keys()?.attributes(),
            Err(ClientError::NoIdentity(_)) => Vec::new(),
            Err(e) => return Err(e),
        };
        let lsss = Lsss::<Fr>::from_policy(&policy)?;
        let set: BTreeSet<&Attribute> = held.iter().collect();
        let (missing, used) = match lsss.solve(|_, a| set.contains(a)) {
            Ok(sol) => {
                let mut used: Vec<Attribute> = sol
                    .rows()
                    .iter()
                    .filter_map(|&(x, _)| lsss.rows().get(x).map(|r| r.attribute().clone()))
                    .collect();
                used.sort();
                used.dedup();
                (None, used)
            }
            Err(PolicyError::Unsatisfied { missing }) => (Some(missing), Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(PolicyReport {
            policy,
            authorities,
            held,
            missing,
            used,
        })
    }
}

/// Decode a received key, check it is for `authority` and listed in `dir`,
/// and verify it (pairing check) into `staged`.
fn verify_received(
    authority: &AuthorityId,
    encoded: &[u8],
    dir: &VerifiedDirectory,
    staged: &mut StoredKeys,
    expires_at: i64,
) -> Result<()> {
    let bad = |reason: String| ClientError::BadKey {
        authority: authority.to_string(),
        reason,
    };
    let key = UserKey::from_bytes(encoded).map_err(|e| bad(e.to_string()))?;
    if key.attribute().authority() != authority {
        return Err(bad(format!(
            "{} belongs to another authority",
            key.attribute()
        )));
    }
    let (a, v) = (key.attribute().clone(), key.version());
    let pk = dir.get(&a, v).ok_or_else(|| {
        bad(format!(
            "the directory of {authority} lists no public key for {a} version {v}"
        ))
    })?;
    if key.gid() != staged.gid() {
        return Err(bad(format!(
            "the key for {a} was issued to another person (GID {})",
            key.gid()
        )));
    }
    staged.insert_verified(key, pk, expires_at)?;
    Ok(())
}

/// Move verified keys into `keys` (verifying again there, which is cheap
/// next to a network round trip). Returns what was stored and whether new.
fn staged_into(
    staged: StoredKeys,
    dir: &VerifiedDirectory,
    keys: &mut StoredKeys,
) -> Result<Vec<(Attribute, Version, bool)>> {
    let mut out = Vec::new();
    for k in staged.iter() {
        let (a, v) = (k.key.attribute().clone(), k.key.version());
        let Some(pk) = dir.get(&a, v) else { continue };
        let copy = UserKey::from_bytes(&k.key.to_bytes())?;
        let new = keys.insert_verified(copy, pk, k.expires_at)?;
        out.push((a, v, new));
    }
    Ok(out)
}
