//! Talking to an authority over gRPC with TLS: the signed directory, signed
//! key fetches and attribute requests.

use std::time::Duration;

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::Signer;
use mabe_abe::{PublicKeyRing, UserKey, UserKeyRing};
use mabe_proto::{
    signing::{attribute_request_message, break_glass_message, key_request_message},
    v1::{
        AttributeRequest, BreakGlassRequest, GetDirectoryRequest, IssuedKey, KeyRequest,
        authority_client::AuthorityClient,
    },
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::{
    directory::{SignedDirectory, VerifiedDirectory},
    error::{ClientError, Result},
    files::unix_now,
    keystore::Identity,
    trust::TrustedAuthority,
};

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

impl Connection {
    /// Connect over TLS, trusting only the pinned root and checking the
    /// pinned TLS name. An authority without an endpoint (offline) cannot
    /// be connected to.
    pub async fn connect(trust: TrustedAuthority) -> Result<Connection> {
        let err = |detail: String| ClientError::Connect {
            authority: trust.id.to_string(),
            detail,
        };
        let endpoint = trust.endpoint.clone().ok_or_else(|| {
            err("it is an offline authority (no endpoint in the trust file)".into())
        })?;
        let channel = Endpoint::from_shared(endpoint)
            .map_err(|e| err(e.to_string()))?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&trust.tls_root))
                    .domain_name(trust.tls_name.clone()),
            )
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .map_err(|e| err(error_chain(&e)))?;
        Ok(Connection {
            client: AuthorityClient::new(channel)
                .max_decoding_message_size(mabe_proto::MAX_MESSAGE_BYTES),
            trust,
        })
    }

    /// The pinned authority this connection talks to.
    pub fn authority(&self) -> &TrustedAuthority {
        &self.trust
    }

    fn refused(&self, s: tonic::Status) -> ClientError {
        ClientError::Refused {
            authority: self.trust.id.to_string(),
            message: s.message().to_owned(),
            code: s.code(),
        }
    }

    /// Fetch the signed directory and verify it against the pinned identity
    /// key ([`VerifiedDirectory::verify`]); refuses one that has already expired.
    pub async fn verified_directory(&mut self) -> Result<VerifiedDirectory> {
        let signed = self
            .client
            .get_directory(GetDirectoryRequest {})
            .await
            .map_err(|s| self.refused(s))?
            .into_inner();
        let dir = VerifiedDirectory::verify(
            &self.trust,
            SignedDirectory {
                body: signed.body,
                signature: signed.signature,
            },
        )?;
        if dir.is_expired(unix_now()) {
            return Err(ClientError::BadDirectory {
                authority: self.trust.id.to_string(),
                reason: "it has expired".into(),
            });
        }
        Ok(dir)
    }

    /// Fetch the signed directory, verify it, and add every public key it
    /// lists to `ring`.
    pub async fn directory(&mut self, ring: &mut PublicKeyRing) -> Result<VerifiedDirectory> {
        let dir = self.verified_directory().await?;
        for (_, _, e) in dir.entries() {
            ring.insert(e.public_key.clone())?;
        }
        Ok(dir)
    }

    /// Every key granted to `who`, as issued (a signed request). Nothing is
    /// verified here: pass each key to
    /// [`StoredKeys::insert_verified`](crate::keystore::StoredKeys::insert_verified)
    /// or [`Connection::fetch_keys`] does it.
    pub async fn fetch_issued_keys(&mut self, who: &Identity) -> Result<Vec<IssuedKey>> {
        let n = nonce();
        let ts = unix_now();
        let id = self.trust.id.to_string();
        let msg = key_request_message(&id, who.gid.as_bytes(), &[], &n, ts);
        Ok(self
            .client
            .fetch_keys(KeyRequest {
                authority_id: id,
                gid: who.gid.as_bytes().to_vec(),
                attributes: vec![],
                nonce: n,
                timestamp: ts,
                signature: who.key.sign(&msg).to_bytes().to_vec(),
            })
            .await
            .map_err(|s| self.refused(s))?
            .into_inner()
            .keys)
    }

    /// Emergency access (DESIGN §4): ask for this authority's emergency key
    /// with a reason (signed; the reason lands in the authority's audit
    /// log). Succeeds only for people enrolled as emergency staff; the key
    /// is returned as issued, with its expiry: verify it like any other.
    pub async fn break_glass(&mut self, who: &Identity, reason: &str) -> Result<Vec<IssuedKey>> {
        let n = nonce();
        let ts = unix_now();
        let id = self.trust.id.to_string();
        let msg = break_glass_message(&id, who.gid.as_bytes(), reason, &n, ts);
        Ok(self
            .client
            .break_glass(BreakGlassRequest {
                authority_id: id,
                gid: who.gid.as_bytes().to_vec(),
                reason: reason.into(),
                nonce: n,
                timestamp: ts,
                signature: who.key.sign(&msg).to_bytes().to_vec(),
            })
            .await
            .map_err(|s| self.refused(s))?
            .into_inner()
            .keys)
    }

    /// Fetch every key granted to `who` (signed request), verify each by the
    /// pairing check against `pks`, and store it in `keys`. Returns the
    /// attributes received (`name@authority#version`).
    pub async fn fetch_keys(
        &mut self,
        who: &Identity,
        pks: &PublicKeyRing,
        keys: &mut UserKeyRing,
    ) -> Result<Vec<String>> {
        let mut got = Vec::new();
        for k in self.fetch_issued_keys(who).await? {
            let bad = |reason: String| ClientError::BadKey {
                authority: self.trust.id.to_string(),
                reason,
            };
            let key = UserKey::from_bytes(&k.user_key).map_err(|e| bad(e.to_string()))?;
            if key.attribute().authority() != &self.trust.id {
                return Err(bad(format!("{} is not this authority's", key.attribute())));
            }
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
    ) -> Result<i64> {
        let n = nonce();
        let ts = unix_now();
        let id = self.trust.id.to_string();
        let msg = attribute_request_message(&id, who.gid.as_bytes(), attribute, reason, &n, ts);
        let r = self
            .client
            .request_attribute(AttributeRequest {
                authority_id: id,
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

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
