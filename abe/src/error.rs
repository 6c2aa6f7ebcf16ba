//! The one error type of `mabe-abe`.

use mabe_policy::{Attribute, PolicyError};

use crate::Version;

/// Everything that can go wrong in the scheme.
///
/// Decryption failures are deliberately coarse: every cryptographic reason
/// (a wrong key, a tampered header or payload, a failed re-encryption check, a
/// truncated stream) is [`AbeError::DecryptionFailed`]. Reasons a person can act
/// on (a missing attribute, a stale key version) are reported before any
/// cryptography runs.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum AbeError {
    /// An encoded object (header, key, token, …) is malformed: bad magic, wrong
    /// length, trailing bytes, a point off the curve or outside the subgroup, a
    /// non-canonical encoding, or a size over its limit.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which object or field.
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The policy is invalid (syntax, limits), or a policy-level check failed.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// An identity (registry or subject) cannot be turned into a GID.
    #[error("invalid identity: {0}")]
    InvalidIdentity(&'static str),
    /// The attributes held do not satisfy the policy. Reported before any
    /// cryptography runs; `missing` is a smallest set that would satisfy it.
    #[error("policy not satisfied: missing {}", list(missing))]
    Unsatisfied {
        /// Attributes whose keys would make the policy satisfied.
        missing: Vec<Attribute>,
        /// Attributes the key ring holds.
        held: Vec<Attribute>,
    },
    /// The user's key for an attribute is at another version than the record.
    #[error("key for {attribute} is version {held}, record needs version {needed}")]
    KeyVersionMismatch {
        /// The attribute.
        attribute: Attribute,
        /// Version of the key held.
        held: Version,
        /// Version the record's row is at.
        needed: Version,
    },
    /// No public key is known for an attribute (at the given version, if any).
    #[error("no public key for {attribute}{}", version.map(|v| format!(" version {v}")).unwrap_or_default())]
    MissingPublicKey {
        /// The attribute.
        attribute: Attribute,
        /// The version asked for; `None` means any (current) version.
        version: Option<Version>,
    },
    /// A user key does not pass the pairing check against its public key, or
    /// belongs to another GID than the key ring.
    #[error("invalid key for {attribute}: {reason}")]
    InvalidKey {
        /// The attribute of the key.
        attribute: Attribute,
        /// Why the key was refused.
        reason: &'static str,
    },
    /// Decryption failed for a cryptographic reason (one generic error on purpose).
    #[error("cannot decrypt: the record is corrupted or was not encrypted for these keys")]
    DecryptionFailed,
    /// A revocation update token or snapshot operation was refused.
    #[error("update refused: {0}")]
    UpdateRefused(&'static str),
    /// A parameter is outside its allowed range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(&'static str),
    /// Reading the plaintext or writing the ciphertext (or the reverse) failed.
    #[error("payload I/O failed: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for AbeError {
    fn from(e: std::io::Error) -> Self {
        // A decryption failure travelling through `io::Read` comes back as itself.
        if e.get_ref()
            .and_then(|inner| inner.downcast_ref::<AbeError>())
            .is_some_and(|a| matches!(a, AbeError::DecryptionFailed))
        {
            return AbeError::DecryptionFailed;
        }
        AbeError::Io(e)
    }
}

fn list(attrs: &[Attribute]) -> String {
    attrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<AbeError> for std::io::Error {
    fn from(e: AbeError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}
