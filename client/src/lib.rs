//! # mabe-client: the person's side of mabe
//!
//! The library behind the `mabe` command: a person's key store, their trust
//! file, verified directories and keys, and signed records.
//!
//! - [`keystore`]: the identity (GID and Ed25519 request key; file mode 0600,
//!   optional passphrase) and the attribute keys, each verified by the
//!   pairing check before it is stored.
//! - [`trust`]: the trust file, the only way an authority becomes trusted
//!   (id, endpoint, identity key, TLS root), and the consortium's emergency
//!   attributes that `EMERGENCY` in a policy expands to.
//! - [`directory`]: signed directories verified against the pinned identity
//!   key; encryption uses only current versions from unexpired directories.
//! - [`net`]: [`Connection`] to an authority over TLS gRPC (signed requests).
//! - [`record`]: the signed record container (header, writer, STREAM payload,
//!   Ed25519 signature), streamed in constant memory.
//! - [`json`]: field-level JSON records, one policy per section.
//! - [`inspect`]: every field of a record, as text or JSON.
//! - [`Client`]: all of it together, as the `mabe` command uses it.
//!
//! Every error is a [`ClientError`]; [`ClientError::exit_code`] gives the
//! `mabe` exit code.
//!
//! A whole round, offline (a real deployment fetches directories and keys
//! from the authorities with [`Client::fetch_keys`]):
//!
//! ```
//! use ark_std::rand::SeedableRng;
//! use mabe_abe::{AttributeSecretKey, EncryptOptions, Version};
//! use mabe_client::{Client, KeyStore, directory::{SignedDirectory, VerifiedDirectory}, trust::TrustStore};
//! use mabe_proto::signing::{Directory, DirectoryEntry};
//! use ed25519_dalek::Signer;
//!
//! let mut rng = ark_std::rand::rngs::StdRng::seed_from_u64(7); // OsRng in real code
//! let home = tempfile::tempdir()?;
//! let store = KeyStore::open(home.path());
//! let me = store.create_identity("big-register", "19012345601", None, &mut rng)?;
//!
//! // Hospital A's authority: one attribute, a signed directory, a key for me.
//! let identity = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
//! let doctor = AttributeSecretKey::generate("doctor@hospital-a".parse()?, Version::FIRST, &mut rng);
//! let pk = doctor.public_key(&mut rng);
//! let now = mabe_client::unix_now();
//! let body = Directory { authority: "hospital-a".into(), issued_at: now, valid_until: now + 3600,
//!     entries: vec![DirectoryEntry { attribute: "doctor@hospital-a".into(), version: 1,
//!                                    current: true, public_key: pk.to_bytes() }] }.encode();
//! let signed = SignedDirectory { signature: identity.sign(&body).to_bytes().to_vec(), body };
//!
//! // Pin the authority, store its verified directory and my verified key.
//! let mut trust = TrustStore::load_or_empty(&store.trust_path())?;
//! let pinned = mabe_client::TrustedAuthority { id: "hospital-a".parse()?, endpoint: None,
//!     identity_key: identity.verifying_key(), tls_root: vec![], tls_name: "localhost".into() };
//! trust.add_authority(pinned.clone())?;
//! trust.save()?;
//! let dir = VerifiedDirectory::verify(&pinned, signed)?;
//! store.save_directory(&dir, &pinned)?;
//! let mut keys = store.load_keys()?;
//! let hashed = mabe_abe::HashedGid::new(me.gid)?;
//! keys.insert_verified(doctor.keygen(&hashed, &mut rng), &pk, 0)?;
//! store.save_keys(&keys)?;
//!
//! // Encrypt a signed record, then decrypt it.
//! let client = Client::open(KeyStore::open(home.path()))?;
//! let rt = tokio::runtime::Builder::new_current_thread().build()?;
//! let policy = client.policy("doctor@hospital-a")?;
//! let (pks, _) = rt.block_on(client.encryption_keys(&policy, false))?;
//! let writer = client.store().load_identity()?;
//! let mut record = Vec::new();
//! client.encrypt(&policy, &pks, Some(&writer), &EncryptOptions::default(), &mut rng,
//!                &b"blood type: O-"[..], &mut record)?;
//! let mut input = &record[..];
//! let opened = rt.block_on(client.open_record(&mut input, false))?;
//! let mut plain = Vec::new();
//! let summary = opened.decrypt(input, &mut plain)?;
//! assert_eq!(plain, b"blood type: O-");
//! assert_eq!(summary.signature.require_valid()?.gid, me.gid);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

mod client;
pub mod directory;
mod error;
mod files;
pub mod inspect;
pub mod json;
pub mod keystore;
pub mod net;
pub mod record;
pub mod records;
pub mod trust;

pub use client::{Client, Fetched, OpenedRecord, PolicyReport};
pub use error::{ClientError, Result};
pub use files::{unix_now, utc_text};
pub use keystore::{Identity, IdentityInfo, KeyStore, StoredKeys};
pub use net::Connection;
pub use trust::{ProxyEndpoint, TrustStore, TrustedAuthority};
