//! Signed directories of attribute public keys, verified against the pinned
//! identity key, and the public-key rings built from them.
//!
//! - Encryption uses only **current** entries of **unexpired** directories
//!   ([`encryption_ring`]); an attribute whose newest listed version is
//!   superseded is refused.
//! - Decryption may use every listed version, also from an expired directory
//!   ([`decryption_ring`]): rows not yet updated after a revocation need the
//!   older public key, and the record's writer signature, not the directory's
//!   freshness, vouches for the record.

use std::collections::BTreeMap;

use ed25519_dalek::Signature;
use mabe_abe::{AttributePublicKey, PublicKeyRing, Version};
use mabe_policy::{Attribute, AuthorityId, Policy};
use mabe_proto::signing::Directory;

use crate::{
    error::{ClientError, Result},
    trust::TrustedAuthority,
};

/// Magic of a stored signed directory.
pub const SIGNED_DIRECTORY_MAGIC: &[u8] = mabe_proto::bundle::SDIR_MAGIC;

/// A directory body and the identity key's signature over it, as the
/// authority sent it (verify it with [`VerifiedDirectory::verify`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedDirectory {
    /// The body (docs/PROTOCOL.md "directory body").
    pub body: Vec<u8>,
    /// Ed25519 signature by the authority's identity key over `body`.
    pub signature: Vec<u8>,
}

impl SignedDirectory {
    /// `"MABE-SDIR-V1" ‖ lp(body) ‖ lp(signature)` (docs/FORMAT.md §9.3).
    pub fn to_bytes(&self) -> Vec<u8> {
        mabe_proto::bundle::encode_signed_directory(&self.body, &self.signature)
    }

    /// Decode (bounded, no trailing bytes). Does not verify anything.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let (body, signature) = mabe_proto::bundle::decode_signed_directory(b)
            .map_err(|e| ClientError::malformed("signed directory", e.0))?;
        Ok(SignedDirectory { body, signature })
    }
}

/// One verified entry: its public key (decoded with validation) and whether
/// encryptors must use it.
#[derive(Clone, Debug)]
pub struct VerifiedEntry {
    /// The public key.
    pub public_key: AttributePublicKey,
    /// `false`: superseded by a newer version.
    pub current: bool,
}

/// A directory whose signature verified with the pinned identity key, whose
/// authority is the pinned one, and whose every entry decoded and matches
/// its public key.
#[derive(Clone, Debug)]
pub struct VerifiedDirectory {
    authority: AuthorityId,
    issued_at: i64,
    valid_until: i64,
    entries: BTreeMap<Attribute, BTreeMap<mabe_abe::Version, VerifiedEntry>>,
    signed: SignedDirectory,
}

impl VerifiedDirectory {
    /// Verify `signed` against `trust`: the Ed25519 signature (strict) with
    /// the pinned identity key, the authority id, and each entry (public key
    /// decoded with validation, for this authority, matching its attribute
    /// and version, listed once, at most one current version per attribute).
    /// Expiry is checked by the users of the directory, not here.
    pub fn verify(trust: &TrustedAuthority, signed: SignedDirectory) -> Result<Self> {
        let bad = |reason: String| ClientError::BadDirectory {
            authority: trust.id.to_string(),
            reason,
        };
        let sig = Signature::from_slice(&signed.signature)
            .map_err(|_| bad("malformed signature".into()))?;
        trust
            .identity_key
            .verify_strict(&signed.body, &sig)
            .map_err(|_| bad("signature does not verify with the pinned identity key".into()))?;
        let dir = Directory::decode(&signed.body).map_err(|e| bad(e.to_string()))?;
        if dir.authority != trust.id.as_str() {
            return Err(bad(format!("it is the directory of {}", dir.authority)));
        }
        if dir.valid_until < dir.issued_at {
            return Err(bad("its validity ends before it was issued".into()));
        }
        let mut entries: BTreeMap<Attribute, BTreeMap<Version, VerifiedEntry>> = BTreeMap::new();
        for e in &dir.entries {
            let pk = AttributePublicKey::from_bytes(&e.public_key)
                .map_err(|err| bad(format!("entry {}: {err}", e.attribute)))?;
            if pk.attribute().to_string() != e.attribute
                || pk.version().get() != e.version
                || pk.attribute().authority() != &trust.id
            {
                return Err(bad(format!("entry {} does not match its key", e.attribute)));
            }
            let versions = entries.entry(pk.attribute().clone()).or_default();
            if e.current && versions.values().any(|v| v.current) {
                return Err(bad(format!(
                    "{} has more than one current version",
                    e.attribute
                )));
            }
            let version = pk.version();
            if versions
                .insert(
                    version,
                    VerifiedEntry {
                        public_key: pk,
                        current: e.current,
                    },
                )
                .is_some()
            {
                return Err(bad(format!(
                    "{} version {version} is listed twice",
                    e.attribute
                )));
            }
        }
        // A current version older than a superseded one is inconsistent.
        for (attr, versions) in &entries {
            if let (Some((cur, _)), Some((&newest, _))) = (
                versions.iter().find(|(_, e)| e.current),
                versions.iter().next_back(),
            ) {
                if *cur != newest {
                    return Err(bad(format!(
                        "{attr}: version {cur} is marked current but version {newest} exists"
                    )));
                }
            }
        }
        Ok(VerifiedDirectory {
            authority: trust.id.clone(),
            issued_at: dir.issued_at,
            valid_until: dir.valid_until,
            entries,
            signed,
        })
    }

    /// The authority.
    pub fn authority(&self) -> &AuthorityId {
        &self.authority
    }
    /// Unix seconds when the authority signed it.
    pub fn issued_at(&self) -> i64 {
        self.issued_at
    }
    /// Unix seconds after which encryptors must fetch a fresh one.
    pub fn valid_until(&self) -> i64 {
        self.valid_until
    }
    /// Whether it has expired at `now` (Unix seconds).
    pub fn is_expired(&self, now: i64) -> bool {
        now > self.valid_until
    }
    /// The signed form, to store.
    pub fn signed(&self) -> &SignedDirectory {
        &self.signed
    }

    /// The public key of `attribute` at `version`.
    pub fn get(&self, attribute: &Attribute, version: Version) -> Option<&AttributePublicKey> {
        self.entries
            .get(attribute)?
            .get(&version)
            .map(|e| &e.public_key)
    }

    /// Every entry, by attribute and version.
    pub fn entries(&self) -> impl Iterator<Item = (&Attribute, Version, &VerifiedEntry)> {
        self.entries
            .iter()
            .flat_map(|(a, vs)| vs.iter().map(move |(v, e)| (a, *v, e)))
    }

    /// The current public key of `attribute` for encryption at `now`:
    /// refuses an expired directory, an attribute not listed, and an attribute
    /// whose newest listed version is superseded.
    pub fn current_for_encryption(
        &self,
        attribute: &Attribute,
        now: i64,
    ) -> Result<&AttributePublicKey> {
        if self.is_expired(now) {
            return Err(ClientError::DirectoryExpired {
                authority: self.authority.to_string(),
                valid_until: self.valid_until,
            });
        }
        let versions =
            self.entries
                .get(attribute)
                .ok_or_else(|| ClientError::MissingPublicKey {
                    attribute: attribute.clone(),
                    version: None,
                })?;
        match versions.iter().next_back() {
            Some((_, e)) if e.current => Ok(&e.public_key),
            Some((&v, _)) => Err(ClientError::Superseded {
                attribute: attribute.clone(),
                version: v,
            }),
            None => Err(ClientError::MissingPublicKey {
                attribute: attribute.clone(),
                version: None,
            }),
        }
    }
}

/// The public keys to encrypt under `policy`: for each attribute, the
/// current version from its authority's verified, unexpired directory.
///
/// Fails with [`ClientError::NoDirectory`], [`ClientError::DirectoryExpired`],
/// [`ClientError::MissingPublicKey`] or [`ClientError::Superseded`].
pub fn encryption_ring(
    policy: &Policy,
    directories: &BTreeMap<AuthorityId, VerifiedDirectory>,
    now: i64,
) -> Result<PublicKeyRing> {
    let mut ring = PublicKeyRing::new();
    for attr in policy.attributes() {
        let dir = directories
            .get(attr.authority())
            .ok_or_else(|| ClientError::NoDirectory(attr.authority().to_string()))?;
        let pk = dir.current_for_encryption(&attr, now)?;
        ring.insert(pk.clone())?;
    }
    Ok(ring)
}

/// Every public key (all versions) of the given authorities' directories,
/// for decryption.
pub fn decryption_ring<'a>(
    directories: impl IntoIterator<Item = &'a VerifiedDirectory>,
) -> Result<PublicKeyRing> {
    let mut ring = PublicKeyRing::new();
    for d in directories {
        for (_, _, e) in d.entries() {
            ring.insert(e.public_key.clone())?;
        }
    }
    Ok(ring)
}
