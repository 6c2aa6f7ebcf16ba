//! The one error type of the client library, and the exit code of each kind.

use std::{io, path::PathBuf};

use mabe_abe::{AbeError, Version};
use mabe_policy::{Attribute, PolicyError};

/// Everything that can go wrong in the client.
///
/// Messages are written for the person at the terminal: each says what
/// happened and, where there is something to do, what to do. Decryption
/// failures for cryptographic reasons are deliberately one coarse
/// [`ClientError::DecryptionFailed`]; the reasons a person can act on (a
/// missing attribute, a stale key) are reported before any cryptography runs.
///
/// [`ClientError::exit_code`] maps each variant to the `mabe` exit codes.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect to an authority (address, TLS).
    #[error("cannot reach authority {authority}: {detail}")]
    Connect {
        /// Authority id.
        authority: String,
        /// What failed.
        detail: String,
    },
    /// The authority refused or failed a call.
    #[error("authority {authority} refused: {message}")]
    Refused {
        /// Authority id.
        authority: String,
        /// gRPC status message.
        message: String,
        /// gRPC code.
        code: tonic::Code,
    },
    /// A record store (`mabe-proxy`) could not be reached, refused a call, or
    /// answered something malformed.
    #[error("record store {proxy}: {detail}")]
    RecordStore {
        /// Proxy id.
        proxy: String,
        /// What failed.
        detail: String,
    },
    /// A directory's signature does not verify with the pinned identity key,
    /// it is for another authority, or one of its entries is malformed or
    /// does not match its public key.
    #[error("directory of {authority} refused: {reason}")]
    BadDirectory {
        /// Authority id.
        authority: String,
        /// Why.
        reason: String,
    },
    /// A received key failed decoding, belongs to another person, or failed
    /// the pairing check against the authority's signed directory.
    #[error("key from {authority} refused: {reason}")]
    BadKey {
        /// Authority id.
        authority: String,
        /// Why.
        reason: String,
    },
    /// An authority is not pinned in the trust file.
    #[error("authority {0} is not in your trust file (add it with `mabe trust add`)")]
    UntrustedAuthority(String),
    /// The trust file is missing, malformed or inconsistent.
    #[error("trust file {path}: {reason}")]
    Trust {
        /// The trust file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A policy uses `EMERGENCY` but the trust file lists no emergency attributes.
    #[error(
        "the policy uses EMERGENCY but your trust file lists no emergency attributes \
         (set them with `mabe trust emergency`)"
    )]
    NoEmergencyList,
    /// The policy text is invalid.
    #[error("invalid policy: {0}")]
    Policy(PolicyError),
    /// The keys held do not satisfy the record's policy (found before any
    /// cryptography runs). `missing` is a smallest set that would satisfy it.
    #[error(
        "cannot decrypt: policy needs {} (you hold {})",
        list(missing),
        held_list(held)
    )]
    NotSatisfied {
        /// Attributes whose keys would satisfy the policy.
        missing: Vec<Attribute>,
        /// Attributes held.
        held: Vec<Attribute>,
    },
    /// The key held is older than the record's row: fetch the new key.
    #[error(
        "key for {attribute} is version {held}, record needs version {needed}: run `mabe keys fetch`"
    )]
    StaleKey {
        /// The attribute.
        attribute: Attribute,
        /// Version held.
        held: Version,
        /// Version the record needs.
        needed: Version,
    },
    /// The key held is newer than the record's row: the record store has not
    /// applied a revocation update to this record yet.
    #[error(
        "key for {attribute} is version {held}, record is still at version {needed}: the record \
         store has not applied the revocation update to this record yet"
    )]
    StaleRecord {
        /// The attribute.
        attribute: Attribute,
        /// Version held.
        held: Version,
        /// Version the record is at.
        needed: Version,
    },
    /// No verified directory lists a public key for an attribute (at a version).
    #[error("no public key for {attribute}{}: run `mabe keys fetch` to refresh the directory of {}",
        version.map(|v| format!(" version {v}")).unwrap_or_default(), attribute.authority())]
    MissingPublicKey {
        /// The attribute.
        attribute: Attribute,
        /// The version asked for (`None`: the current one).
        version: Option<Version>,
    },
    /// The directory lists only superseded versions of an attribute:
    /// encryption never uses a superseded public key.
    #[error(
        "{attribute} version {version} is superseded and the directory of {} lists no current \
         version: refusing to encrypt under it (run `mabe keys fetch`)", attribute.authority()
    )]
    Superseded {
        /// The attribute.
        attribute: Attribute,
        /// Its newest listed (superseded) version.
        version: Version,
    },
    /// The stored directory has expired: encryption needs a fresh one.
    #[error(
        "the directory of {authority} expired at {valid_until} (Unix time): run `mabe keys fetch`"
    )]
    DirectoryExpired {
        /// Authority id.
        authority: String,
        /// End of its validity, Unix seconds.
        valid_until: i64,
    },
    /// No directory of a trusted authority is stored.
    #[error("no directory of {0} is stored: run `mabe keys fetch`")]
    NoDirectory(String),
    /// Decryption failed for a cryptographic reason (one generic error on purpose).
    #[error("cannot decrypt: the record is corrupted or was not encrypted for these keys")]
    DecryptionFailed,
    /// The record carries no writer signature.
    #[error("the record is not signed: refusing it (use --allow-unsigned to read it anyway)")]
    Unsigned,
    /// The record's writer signature does not verify.
    #[error("the record's signature does not verify: {0}")]
    BadSignature(&'static str),
    /// A file or message is malformed (magic, length, trailing bytes, limits).
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// The key store has no identity yet.
    #[error("no identity in {0}: run `mabe identity new`")]
    NoIdentity(PathBuf),
    /// `identity new` would overwrite an existing identity.
    #[error("an identity already exists in {0}: refusing to overwrite it")]
    IdentityExists(PathBuf),
    /// The passphrase is wrong (or the protected file was altered).
    #[error("wrong passphrase for {0}, or the file was altered")]
    WrongPassphrase(PathBuf),
    /// A protected file needs a passphrase and none was given.
    #[error(
        "{0} is protected by a passphrase: set MABE_PASSPHRASE, pass --passphrase-file, or run on a terminal"
    )]
    PassphraseNeeded(PathBuf),
    /// Reading or writing a file or stream failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An invalid argument or input.
    #[error("{0}")]
    Invalid(String),
    /// Any other error of the scheme.
    #[error(transparent)]
    Abe(AbeError),
}

/// Result type of the client library.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

fn list(attrs: &[Attribute]) -> String {
    attrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn held_list(attrs: &[Attribute]) -> String {
    if attrs.is_empty() {
        "no keys".into()
    } else {
        list(attrs)
    }
}

impl ClientError {
    /// The `mabe` exit code for this error:
    ///
    /// | code | meaning |
    /// |---|---|
    /// | 1 | any other error |
    /// | 3 | cannot decrypt: policy not satisfied, key or record at another version, cryptographic failure |
    /// | 4 | signature problem: unsigned or badly signed record |
    /// | 5 | trust problem: untrusted authority, refused directory or key, expired directory, superseded key |
    /// | 6 | an authority or a record store could not be reached or refused the call |
    ///
    /// (2 is a usage error, reported by the argument parser.)
    ///
    /// ```
    /// use mabe_client::ClientError;
    /// assert_eq!(ClientError::DecryptionFailed.exit_code(), 3);
    /// assert_eq!(ClientError::Unsigned.exit_code(), 4);
    /// assert_eq!(ClientError::UntrustedAuthority("hospital-c".into()).exit_code(), 5);
    /// ```
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NotSatisfied { .. }
            | ClientError::StaleKey { .. }
            | ClientError::StaleRecord { .. }
            | ClientError::DecryptionFailed => 3,
            ClientError::Unsigned | ClientError::BadSignature(_) => 4,
            ClientError::UntrustedAuthority(_)
            | ClientError::BadDirectory { .. }
            | ClientError::BadKey { .. }
            | ClientError::DirectoryExpired { .. }
            | ClientError::Superseded { .. }
            | ClientError::Trust { .. } => 5,
            ClientError::Connect { .. }
            | ClientError::Refused { .. }
            | ClientError::RecordStore { .. } => 6,
            _ => 1,
        }
    }

    /// An [`ClientError::Io`] with context.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        // A decryption failure travelling through `io::Read` stays coarse.
        if source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<AbeError>())
            .is_some_and(|a| matches!(a, AbeError::DecryptionFailed))
        {
            return ClientError::DecryptionFailed;
        }
        ClientError::Io {
            context: context.into(),
            source,
        }
    }

    /// A [`ClientError::Malformed`].
    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        ClientError::Malformed {
            what,
            reason: reason.into(),
        }
    }
}

impl From<PolicyError> for ClientError {
    fn from(e: PolicyError) -> Self {
        ClientError::Policy(e)
    }
}

impl From<AbeError> for ClientError {
    fn from(e: AbeError) -> Self {
        match e {
            AbeError::Unsatisfied { missing, held } => ClientError::NotSatisfied { missing, held },
            AbeError::KeyVersionMismatch {
                attribute,
                held,
                needed,
            } => {
                if held < needed {
                    ClientError::StaleKey {
                        attribute,
                        held,
                        needed,
                    }
                } else {
                    ClientError::StaleRecord {
                        attribute,
                        held,
                        needed,
                    }
                }
            }
            AbeError::MissingPublicKey { attribute, version } => {
                ClientError::MissingPublicKey { attribute, version }
            }
            AbeError::DecryptionFailed => ClientError::DecryptionFailed,
            AbeError::Policy(p) => ClientError::Policy(p),
            AbeError::Io(io) => ClientError::io("payload I/O failed", io),
            other => ClientError::Abe(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_a_person_can_act_on() {
        let a = |s: &str| -> Attribute { s.parse().expect("attribute") };
        let e = ClientError::from(AbeError::Unsatisfied {
            missing: vec![a("cardiology@hospital-a")],
            held: vec![a("doctor@hospital-a"), a("nurse@hospital-b")],
        });
        assert_eq!(
            e.to_string(),
            "cannot decrypt: policy needs cardiology@hospital-a (you hold doctor@hospital-a, nurse@hospital-b)"
        );
        let e = ClientError::from(AbeError::KeyVersionMismatch {
            attribute: a("doctor@hospital-a"),
            held: Version::new(3),
            needed: Version::new(4),
        });
        assert_eq!(
            e.to_string(),
            "key for doctor@hospital-a is version 3, record needs version 4: run `mabe keys fetch`"
        );
        assert_eq!(e.exit_code(), 3);
        assert!(
            ClientError::UntrustedAuthority("hospital-c".into())
                .to_string()
                .starts_with("authority hospital-c is not in your trust file")
        );
    }
}
