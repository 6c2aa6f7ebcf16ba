//! # mabe-client: talk to mabe authorities
//!
//! A first slice of the client library: pin an authority ([`TrustedAuthority`]),
//! fetch and verify its signed directory ([`Connection::directory`]), and
//! fetch a person's keys with a signed request ([`Connection::fetch_keys`]),
//! each key verified by the pairing check before it is accepted.
#![warn(missing_docs)]

use std::time::Duration;

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use mabe_abe::{AttributePublicKey, Gid, PublicKeyRing, UserKey, UserKeyRing};
use mabe_proto::{
    signing::{Directory, attribute_request_message, key_request_message},
    v1::{AttributeRequest, GetDirectoryRequest, KeyRequest, authority_client::AuthorityClient},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Everything that can go wrong talking to an authority.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect (address, TLS).
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
    /// The directory's signature does not verify with the pinned identity key,
    /// it is for another authority, expired, or malformed.
    #[error("directory of {authority} refused: {reason}")]
    BadDirectory {
        /// Authority id.
        authority: String,
        /// Why.
        reason: String,
    },
    /// An issued key failed decoding or the pairing check.
    #[error("key from {authority} refused: {reason}")]
    BadKey {
        /// Authority id.
        authority: String,
        /// Why.
        reason: String,
    },
}

/// An authority the user trusts: the only way an authority becomes trusted.
#[derive(Clone, Debug)]
pub struct TrustedAuthority {
    /// Authority id.
    pub id: String,
    /// `https://host:port` of its public listener.
    pub endpoint: String,
    /// Pinned Ed25519 identity key.
    pub identity_key: VerifyingKey,
    /// TLS root certificate (PEM) for its listener.
    pub tls_root: Vec<u8>,
    /// TLS server name to check (e.g. `localhost`).
    pub tls_name: String,
}

/// A person's identity: GID and Ed25519 request key.
pub struct Identity {
    /// GID.
    pub gid: Gid,
    /// Request signing key (secret).
    pub key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("gid", &self.gid)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A new identity for `subject` in `registry`, with a fresh request key.
    pub fn new(registry: &str, subject: &str) -> Result<Identity, mabe_abe::AbeError> {
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(seed.as_mut());
        Ok(Identity {
            gid: Gid::derive(registry, subject)?,
            key: SigningKey::from_bytes(&seed),
        })
    }
}

/// A connection to one trusted authority.
#[derive(Debug, Clone)]
pub struct Connection {
    trust: TrustedAuthority,
    client: AuthorityClient<Channel>,
}

fn nonce() -> Vec<u8> {
    let mut n = vec![0u8; 16];
    OsRng.fill_bytes(&mut n);
    n
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Connection {
    /// Connect over TLS, trusting only the pinned root.
    pub async fn connect(trust: TrustedAuthority) -> Result<Connection, ClientError> {
        let err = |detail: String| ClientError::Connect {
            authority: trust.id.clone(),
            detail,
        };
        let channel = Endpoint::from_shared(trust.endpoint.clone())
            .map_err(|e| err(e.to_string()))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&trust.tls_root))
                    .domain_name(trust.tls_name.clone()),
            )
            .map_err(|e| err(e.to_string()))?
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|e| err(e.to_string()))?;
        Ok(Connection {
            client: AuthorityClient::new(channel)
                .max_decoding_message_size(mabe_proto::MAX_MESSAGE_BYTES),
            trust,
        })
    }

    fn refused(&self, s: tonic::Status) -> ClientError {
        ClientError::Refused {
            authority: self.trust.id.clone(),
            message: s.message().to_owned(),
            code: s.code(),
        }
    }

    /// Fetch the signed directory, verify it against the pinned identity key
    /// (authority, validity, every public key decoded with validation and
    /// matching its entry), and add its keys to `ring`.
    pub async fn directory(&mut self, ring: &mut PublicKeyRing) -> Result<Directory, ClientError> {
        let bad = |reason: String| ClientError::BadDirectory {
            authority: self.trust.id.clone(),
            reason,
        };
        let signed = self
            .client
            .get_directory(GetDirectoryRequest {})
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        let sig = Signature::from_slice(&signed.signature)
            .map_err(|_| bad("malformed signature".into()))?;
        self.trust
            .identity_key
            .verify_strict(&signed.body, &sig)
            .map_err(|_| bad("signature does not verify with the pinned identity key".into()))?;
        let dir = Directory::decode(&signed.body).map_err(|e| bad(e.to_string()))?;
        if dir.authority != self.trust.id {
            return Err(bad(format!("it is the directory of {}", dir.authority)));
        }
        if dir.valid_until < unix_now() {
            return Err(bad("it has expired".into()));
        }
        for e in &dir.entries {
            let pk =
                AttributePublicKey::from_bytes(&e.public_key).map_err(|e| bad(e.to_string()))?;
            if pk.attribute().to_string() != e.attribute
                || pk.version().get() != e.version
                || pk.attribute().authority().as_str() != self.trust.id
            {
                return Err(bad(format!("entry {} does not match its key", e.attribute)));
            }
            ring.insert(pk).map_err(|e| bad(e.to_string()))?;
        }
        Ok(dir)
    }

    /// Fetch every key granted to `who` (signed request), verify each by the
    /// pairing check against `pks`, and store it in `keys`. Returns the
    /// attributes received.
    pub async fn fetch_keys(
        &mut self,
        who: &Identity,
        pks: &PublicKeyRing,
        keys: &mut UserKeyRing,
    ) -> Result<Vec<String>, ClientError> {
        let n = nonce();
        let ts = unix_now();
        let msg = key_request_message(&self.trust.id, who.gid.as_bytes(), &[], &n, ts);
        let resp = self
            .client
            .fetch_keys(KeyRequest {
                authority_id: self.trust.id.clone(),
                gid: who.gid.as_bytes().to_vec(),
                attributes: vec![],
                nonce: n,
                timestamp: ts,
                signature: who.key.sign(&msg).to_bytes().to_vec(),
            })
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        let mut got = Vec::new();
        for k in resp.keys {
            let bad = |reason: String| ClientError::BadKey {
                authority: self.trust.id.clone(),
                reason,
            };
            let key = UserKey::from_bytes(&k.user_key).map_err(|e| bad(e.to_string()))?;
            let pk = pks
                .get(key.attribute(), key.version())
                .ok_or_else(|| {
                    bad(format!(
                        "no public key for {} v{}",
                        key.attribute(),
                        key.version()
                    ))
                })?
                .clone();
            let label = format!("{}#{}", key.attribute(), key.version());
            keys.insert(key, &pk).map_err(|e| bad(e.to_string()))?;
            got.push(label);
        }
        Ok(got)
    }

    /// Ask for an attribute with a reason (signed); returns the request id.
    pub async fn request_attribute(
        &mut self,
        who: &Identity,
        attribute: &str,
        reason: &str,
    ) -> Result<i64, ClientError> {
        let n = nonce();
        let ts = unix_now();
        let msg = attribute_request_message(
            &self.trust.id,
            who.gid.as_bytes(),
            attribute,
            reason,
            &n,
            ts,
        );
        let r = self
            .client
            .request_attribute(AttributeRequest {
                authority_id: self.trust.id.clone(),
                gid: who.gid.as_bytes().to_vec(),
                attribute: attribute.into(),
                reason: reason.into(),
                nonce: n,
                timestamp: ts,
                signature: who.key.sign(&msg).to_bytes().to_vec(),
            })
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        Ok(r.request_id)
    }
}
