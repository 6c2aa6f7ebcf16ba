//! Newtypes for global identifiers, versions and record ids.

use std::fmt;

use sha2::{Digest, Sha256};
use unicode_normalization::UnicodeNormalization;

use crate::AbeError;

/// Maximum length in bytes of a registry or subject, after normalization.
pub const MAX_IDENTITY_LEN: usize = 1024;

/// A person's global identifier: 32 bytes derived from an identity that every
/// authority verifies itself (a professional register number, a national id).
///
/// `GID = SHA-256("MABE-V1-GID" ‖ lp(registry) ‖ lp(subject))`, where `lp` is a
/// 4-byte big-endian length prefix, both inputs are NFC-normalized and trimmed,
/// and the registry is lowercased.
///
/// ```
/// use mabe_abe::Gid;
/// let a = Gid::derive("NL-BIG", " 19012345601 ")?;
/// let b = Gid::derive("nl-big", "19012345601")?;
/// assert_eq!(a, b);
/// assert_eq!(a.to_string().len(), 64);
/// # Ok::<(), mabe_abe::AbeError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gid([u8; 32]);

impl Gid {
    /// Derive the GID of `subject` in `registry`.
    pub fn derive(registry: &str, subject: &str) -> Result<Gid, AbeError> {
        let registry: String = registry.trim().nfc().collect::<String>().to_lowercase();
        let subject: String = subject.trim().nfc().collect();
        if registry.is_empty() {
            return Err(AbeError::InvalidIdentity("registry is empty"));
        }
        if subject.is_empty() {
            return Err(AbeError::InvalidIdentity("subject is empty"));
        }
        if registry.len() > MAX_IDENTITY_LEN || subject.len() > MAX_IDENTITY_LEN {
            return Err(AbeError::InvalidIdentity(
                "registry or subject longer than 1024 bytes",
            ));
        }
        if registry
            .chars()
            .chain(subject.chars())
            .any(char::is_control)
        {
            return Err(AbeError::InvalidIdentity(
                "registry or subject contains control characters",
            ));
        }
        let mut h = Sha256::new();
        h.update(crate::kdf::TAG_GID);
        for part in [registry.as_bytes(), subject.as_bytes()] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part);
        }
        Ok(Gid(h.finalize().into()))
    }

    /// Wrap 32 raw bytes (e.g. read back from storage).
    pub const fn from_bytes(bytes: [u8; 32]) -> Gid {
        Gid(bytes)
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parse the 64-hex-digit form printed by `Display`.
    pub fn from_hex(s: &str) -> Result<Gid, AbeError> {
        Ok(Gid(hex32(s).ok_or(AbeError::InvalidIdentity(
            "a GID is 64 hexadecimal digits",
        ))?))
    }
}

pub(crate) fn hex32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(b.chunks_exact(2)) {
        let hi = (pair.first()).and_then(|c| (*c as char).to_digit(16))?;
        let lo = (pair.get(1)).and_then(|c| (*c as char).to_digit(16))?;
        *o = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

/// The version of an attribute's key pair. Versions start at 1 and move up by
/// one on every rotation; they belong to the directory, never to policy text.
///
/// ```
/// use mabe_abe::Version;
/// assert_eq!(Version::FIRST.next()?, Version::new(2));
/// # Ok::<(), mabe_abe::AbeError>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Version(u32);

impl Version {
    /// The version of a freshly created attribute.
    pub const FIRST: Version = Version(1);

    /// Wrap a raw version number.
    pub const fn new(v: u32) -> Version {
        Version(v)
    }

    /// The raw number.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The version after this one.
    pub fn next(self) -> Result<Version, AbeError> {
        self.0
            .checked_add(1)
            .map(Version)
            .ok_or(AbeError::InvalidParameter("attribute version overflow"))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A record's random 16-byte identifier (`rid`), fixed at encryption.
///
/// ```
/// use mabe_abe::RecordId;
/// let id = RecordId::from_bytes([7u8; 16]);
/// assert_eq!(id.to_string(), "07".repeat(16));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId([u8; 16]);

impl RecordId {
    /// Wrap raw bytes.
    pub const fn from_bytes(b: [u8; 16]) -> RecordId {
        RecordId(b)
    }
    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
