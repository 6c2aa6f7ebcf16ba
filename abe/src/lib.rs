//! # mabe-abe: multi-authority CP-ABE for mabe
//!
//! The decentralized ciphertext-policy ABE of Lewko and Waters (2011) in its
//! prime-order, type-3 form on BLS12-381, made CCA-secure with a
//! Fujisaki–Okamoto transform and used as a KEM in front of a STREAM
//! AES-256-GCM payload. Every equation is in the project's design reference;
//! the byte layouts are in `docs/FORMAT.md`.
//!
//! - Each authority owns attributes `name@authority`: [`AttributeSecretKey`]
//!   (versioned, rotated on revocation) and its [`AttributePublicKey`].
//! - A person is a [`Gid`]; keys `K = g2^α · H(GID)^y` ([`UserKey`]) bind to it,
//!   so keys of different people never combine.
//! - [`encapsulate`] builds a [`Header`] for a [`Policy`]; [`decapsulate`]
//!   recovers the [`RecordKey`] with one multi-pairing and re-encrypts every
//!   row to check the header (the FO check); the record key then streams the
//!   payload ([`RecordKey::encryptor`], [`RecordKey::decryptor`]).
//! - Revocation: [`AttributeSecretKey::rotate`] gives an [`UpdateSecret`] whose
//!   [`TokenGenerator`] computes per-row [`UpdateToken`]s that a proxy applies
//!   with [`Header::apply_tokens`], never learning a secret.
//!
//! The crate is pure: no I/O of its own (payloads stream through the
//! `Read`/`Write` values you pass), randomness always passed in.
//!
//! ```
//! use mabe_abe::{
//!     AttributeSecretKey, EncryptOptions, Gid, PublicKeyRing, UserKeyRing, Version, decrypt, encrypt,
//! };
//! use ark_std::rand::SeedableRng;
//! // A seeded RNG keeps the example reproducible; real code uses OsRng.
//! let mut rng = ark_std::rand::rngs::StdRng::seed_from_u64(1);
//!
//! // Two hospitals set up one attribute each.
//! let doctor = AttributeSecretKey::generate("doctor@hospital-a".parse()?, Version::FIRST, &mut rng);
//! let er = AttributeSecretKey::generate("emergency@hospital-b".parse()?, Version::FIRST, &mut rng);
//! let mut directory = PublicKeyRing::new();
//! directory.insert(doctor.public_key(&mut rng))?;
//! directory.insert(er.public_key(&mut rng))?;
//!
//! // Dr. Jansen gets a key from hospital A (verified by the pairing check).
//! let mut keys = UserKeyRing::new(Gid::derive("big-register", "19012345601")?)?;
//! let k = doctor.keygen(keys.hashed_gid(), &mut rng);
//! keys.insert(k, directory.current(doctor.attribute()).unwrap())?;
//!
//! // A record for doctors at A or emergency staff at B.
//! let policy = mabe_policy::parse("doctor@hospital-a OR emergency@hospital-b")?;
//! let mut payload = Vec::new();
//! let header = encrypt(&policy, &directory, &EncryptOptions::default(), &mut rng,
//!                      &b"blood type: O-"[..], &mut payload)?;
//!
//! let mut plain = Vec::new();
//! decrypt(&header, &keys, &directory, &payload[..], &mut plain)?;
//! assert_eq!(plain, b"blood type: O-");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod dem;
mod error;
mod group;
mod ids;
pub mod kdf;
mod kem;
mod keys;
mod revocation;
pub mod wire;

use std::io::{Read, Write};

use ark_std::rand::{CryptoRng, RngCore};

pub use dem::{Decryptor, Encryptor, TAG_LEN};
pub use error::AbeError;
pub use group::{G2Prepared, Gt, egg, hash_to_g1, hash_to_g2, warm_up};
pub use ids::{Gid, MAX_IDENTITY_LEN, RecordId, Version};
pub use kem::{
    DEFAULT_SEGMENT_SIZE, EncryptOptions, Header, HeaderRow, MAX_HEADER_LEN, MAX_SEGMENT_SIZE,
    MIN_SEGMENT_SIZE, RecordKey, SUITE_ID, decapsulate, encapsulate,
};
#[cfg(feature = "hazmat")]
pub use kem::{decapsulate_core, decapsulate_forced};
pub use keys::{
    AttributePublicKey, AttributeSecretKey, HashedGid, PublicKeyRing, UserKey, UserKeyRing,
};
pub use mabe_policy::{Attribute, AuthorityId, Policy, PolicyError};
pub use revocation::{Snapshot, SnapshotRow, TokenGenerator, UpdateSecret, UpdateToken};

/// Encrypt a whole payload stream: encapsulate, then stream `input` through
/// the DEM into `output`. Returns the header (stored separately from the
/// payload). Memory use is one segment, whatever the payload size.
pub fn encrypt<R: RngCore + CryptoRng + ?Sized, I: Read, O: Write>(
    policy: &Policy,
    pks: &PublicKeyRing,
    options: &EncryptOptions,
    rng: &mut R,
    mut input: I,
    output: O,
) -> Result<Header, AbeError> {
    let (header, key) = encapsulate(policy, pks, options, rng)?;
    let mut enc = key.encryptor(output)?;
    std::io::copy(&mut input, &mut enc)?;
    enc.finish()?;
    Ok(header)
}

/// Decrypt a whole payload stream into `output`: decapsulate (all checks),
/// then stream. Bytes reach `output` only after their segment verified; on a
/// failure part of the payload may have been written, so write to a temporary
/// place and keep it only on success.
pub fn decrypt<I: Read, O: Write>(
    header: &Header,
    keys: &UserKeyRing,
    pks: &PublicKeyRing,
    input: I,
    mut output: O,
) -> Result<(), AbeError> {
    let key = decapsulate(header, keys, pks)?;
    let mut dec = key.decryptor(input)?;
    std::io::copy(&mut dec, &mut output)?;
    output.flush()?;
    Ok(())
}
