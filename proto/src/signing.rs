//! The byte strings covered by signatures (docs/PROTOCOL.md).
//!
//! Every string starts with a domain-separation tag; variable-length fields
//! carry a 4-byte big-endian length prefix (`lp`), integers are big-endian.
//! Signatures never cover a protobuf encoding directly, except the admin
//! request digest, which both sides compute with the same generated code.

/// Tag of a key fetch.
pub const TAG_KEY_REQUEST: &[u8] = b"MABE-V1-KEYREQ";
/// Tag of an attribute request.
pub const TAG_ATTRIBUTE_REQUEST: &[u8] = b"MABE-V1-ATTRREQ";
/// Tag of an admin call.
pub const TAG_ADMIN: &[u8] = b"MABE-V1-ADMIN";
/// Tag of a break-glass (emergency access) request.
pub const TAG_BREAK_GLASS: &[u8] = b"MABE-V1-BREAKGLASS";
/// Tag of a directory body.
pub const TAG_DIRECTORY: &[u8] = b"MABE-V1-DIR";
/// Tag of an authority's call to a record store proxy.
pub const TAG_PROXY: &[u8] = b"MABE-V1-PROXY";

fn lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// `"MABE-V1-KEYREQ" ‖ lp(authority) ‖ lp(gid) ‖ be32(n) ‖ lp(attr_1) … ‖ lp(nonce) ‖ be64(timestamp)`.
///
/// ```
/// let m = mabe_proto::signing::key_request_message("hospital-a", &[0; 32], &["doctor@hospital-a".into()], b"nonce-0123456789", 1_700_000_000);
/// assert!(m.starts_with(b"MABE-V1-KEYREQ"));
/// ```
pub fn key_request_message(
    authority: &str,
    gid: &[u8],
    attributes: &[String],
    nonce: &[u8],
    timestamp: i64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(TAG_KEY_REQUEST);
    lp(&mut m, authority.as_bytes());
    lp(&mut m, gid);
    m.extend_from_slice(&(attributes.len() as u32).to_be_bytes());
    for a in attributes {
        lp(&mut m, a.as_bytes());
    }
    lp(&mut m, nonce);
    m.extend_from_slice(&timestamp.to_be_bytes());
    m
}

/// `"MABE-V1-BREAKGLASS" ‖ lp(authority) ‖ lp(gid) ‖ lp(reason) ‖ lp(nonce) ‖ be64(timestamp)`.
///
/// ```
/// let m = mabe_proto::signing::break_glass_message("hospital-c", &[0; 32], "cardiac arrest, patient unconscious", b"nonce-0123456789", 1_700_000_000);
/// assert!(m.starts_with(b"MABE-V1-BREAKGLASS"));
/// ```
pub fn break_glass_message(
    authority: &str,
    gid: &[u8],
    reason: &str,
    nonce: &[u8],
    timestamp: i64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(128 + reason.len());
    m.extend_from_slice(TAG_BREAK_GLASS);
    lp(&mut m, authority.as_bytes());
    lp(&mut m, gid);
    lp(&mut m, reason.as_bytes());
    lp(&mut m, nonce);
    m.extend_from_slice(&timestamp.to_be_bytes());
    m
}

/// `"MABE-V1-ATTRREQ" ‖ lp(authority) ‖ lp(gid) ‖ lp(attribute) ‖ lp(reason) ‖ lp(nonce) ‖ be64(timestamp)`.
///
/// ```
/// let m = mabe_proto::signing::attribute_request_message("hospital-a", &[0; 32], "researcher@hospital-a", "study 42", b"n", 1);
/// assert!(m.starts_with(b"MABE-V1-ATTRREQ"));
/// ```
pub fn attribute_request_message(
    authority: &str,
    gid: &[u8],
    attribute: &str,
    reason: &str,
    nonce: &[u8],
    timestamp: i64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(128 + reason.len());
    m.extend_from_slice(TAG_ATTRIBUTE_REQUEST);
    lp(&mut m, authority.as_bytes());
    lp(&mut m, gid);
    lp(&mut m, attribute.as_bytes());
    lp(&mut m, reason.as_bytes());
    lp(&mut m, nonce);
    m.extend_from_slice(&timestamp.to_be_bytes());
    m
}

/// `"MABE-V1-ADMIN" ‖ lp(authority) ‖ lp(method path) ‖ lp(nonce) ‖ be64(timestamp) ‖ body_digest`,
/// where `body_digest` is SHA-256 of the request message's protobuf encoding.
///
/// ```
/// let m = mabe_proto::signing::admin_message("hospital-a", "/mabe.v1.AuthorityAdmin/Enroll", b"n", 1, &[0; 32]);
/// assert!(m.starts_with(b"MABE-V1-ADMIN"));
/// ```
pub fn admin_message(
    authority: &str,
    method: &str,
    nonce: &[u8],
    timestamp: i64,
    body_digest: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(128);
    m.extend_from_slice(TAG_ADMIN);
    lp(&mut m, authority.as_bytes());
    lp(&mut m, method.as_bytes());
    lp(&mut m, nonce);
    m.extend_from_slice(&timestamp.to_be_bytes());
    m.extend_from_slice(body_digest);
    m
}

/// `"MABE-V1-PROXY" ‖ lp(proxy) ‖ lp(authority) ‖ lp(method path) ‖ lp(nonce) ‖ be64(timestamp) ‖ body_digest`,
/// where `proxy` is the proxy's id (the audience: a signed call cannot be
/// replayed to another proxy) and `body_digest` is SHA-256 of the request
/// message's protobuf encoding.
///
/// Most callers want [`sign_proxy_request`], which builds this message and
/// puts the signature in the request's metadata.
///
/// ```
/// let m = mabe_proto::signing::proxy_message("cloud-1", "hospital-a", "/mabe.v1.ProxyAuthority/Freeze", b"n", 1, &[0; 32]);
/// assert!(m.starts_with(b"MABE-V1-PROXY"));
/// ```
pub fn proxy_message(
    proxy: &str,
    authority: &str,
    method: &str,
    nonce: &[u8],
    timestamp: i64,
    body_digest: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(160);
    m.extend_from_slice(TAG_PROXY);
    lp(&mut m, proxy.as_bytes());
    lp(&mut m, authority.as_bytes());
    lp(&mut m, method.as_bytes());
    lp(&mut m, nonce);
    m.extend_from_slice(&timestamp.to_be_bytes());
    m.extend_from_slice(body_digest);
    m
}

/// Metadata key of a proxy call's authority id.
pub const PROXY_AUTHORITY: &str = "x-mabe-authority";
/// Metadata key of a proxy call's timestamp (Unix seconds, decimal).
pub const PROXY_TIMESTAMP: &str = "x-mabe-timestamp";
/// Metadata key of a proxy call's nonce (hex, 16..=64 bytes).
pub const PROXY_NONCE: &str = "x-mabe-nonce";
/// Metadata key of a proxy call's Ed25519 signature (hex, 64 bytes).
pub const PROXY_SIGNATURE: &str = "x-mabe-signature";

/// Full gRPC path of `ProxyAuthority/Freeze`.
pub const METHOD_FREEZE: &str = "/mabe.v1.ProxyAuthority/Freeze";
/// Full gRPC path of `ProxyAuthority/ApplyTokens`.
pub const METHOD_APPLY_TOKENS: &str = "/mabe.v1.ProxyAuthority/ApplyTokens";
/// Full gRPC path of `ProxyAuthority/FreezeStatus`.
pub const METHOD_FREEZE_STATUS: &str = "/mabe.v1.ProxyAuthority/FreezeStatus";

/// Why a request could not be signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignError(pub &'static str);

impl std::fmt::Display for SignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot sign the proxy call: {}", self.0)
    }
}

impl std::error::Error for SignError {}

/// Wrap `msg` in a request to the proxy `proxy` for `method` (the full gRPC
/// path, e.g. [`METHOD_FREEZE`]), signed by `authority`'s identity key with a
/// fresh 16-byte random nonce and the current time.
///
/// The proxy refuses the call unless `key` is the identity key it pins for
/// `authority`, the timestamp is within its clock-skew window, the nonce was
/// never used, and the request's body is exactly `msg`.
///
/// ```
/// use ed25519_dalek::SigningKey;
/// use mabe_proto::{signing, v1::FreezeRequest};
/// let key = SigningKey::from_bytes(&[7; 32]);
/// let msg = FreezeRequest { attribute: "cardiology@hospital-a".into(), version: 1 };
/// let req = signing::sign_proxy_request(msg, "cloud-1", "hospital-a", signing::METHOD_FREEZE, &key)?;
/// assert!(req.metadata().get(signing::PROXY_SIGNATURE).is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn sign_proxy_request<T: prost::Message>(
    msg: T,
    proxy: &str,
    authority: &str,
    method: &str,
    key: &ed25519_dalek::SigningKey,
) -> Result<tonic::Request<T>, SignError> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|_| SignError("no OS randomness for the nonce"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| SignError("the system clock is before 1970"))?
        .as_secs();
    let timestamp =
        i64::try_from(now).map_err(|_| SignError("the system clock is out of range"))?;
    sign_proxy_request_with(msg, proxy, authority, method, key, &nonce, timestamp)
}

/// [`sign_proxy_request`] with an explicit nonce (16..=64 bytes, never
/// reused) and timestamp (Unix seconds), for tests and for callers with
/// their own clock or randomness.
pub fn sign_proxy_request_with<T: prost::Message>(
    msg: T,
    proxy: &str,
    authority: &str,
    method: &str,
    key: &ed25519_dalek::SigningKey,
    nonce: &[u8],
    timestamp: i64,
) -> Result<tonic::Request<T>, SignError> {
    use ed25519_dalek::Signer;
    use sha2::{Digest, Sha256};
    use tonic::metadata::MetadataValue;

    if !(16..=64).contains(&nonce.len()) {
        return Err(SignError("the nonce must be 16 to 64 bytes"));
    }
    let digest: [u8; 32] = Sha256::digest(msg.encode_to_vec()).into();
    let m = proxy_message(proxy, authority, method, nonce, timestamp, &digest);
    let signature = key.sign(&m);
    let mut req = tonic::Request::new(msg);
    let md = req.metadata_mut();
    for (k, v) in [
        (PROXY_AUTHORITY, authority.to_owned()),
        (PROXY_TIMESTAMP, timestamp.to_string()),
        (PROXY_NONCE, hex::encode(nonce)),
        (PROXY_SIGNATURE, hex::encode(signature.to_bytes())),
    ] {
        let v = MetadataValue::try_from(v)
            .map_err(|_| SignError("the authority id is not valid metadata text"))?;
        md.insert(k, v);
    }
    Ok(req)
}

/// One entry of a signed directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// Canonical attribute text.
    pub attribute: String,
    /// Version.
    pub version: u32,
    /// Whether encryptors must use this version (false: superseded).
    pub current: bool,
    /// Encoded attribute public key (FORMAT.md 'P').
    pub public_key: Vec<u8>,
}

/// A directory body: what the identity key signs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Directory {
    /// Authority id.
    pub authority: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds after which clients must fetch a fresh directory.
    pub valid_until: i64,
    /// Entries, ordered by attribute then version.
    pub entries: Vec<DirectoryEntry>,
}

/// Largest directory body accepted.
pub const MAX_DIRECTORY_BYTES: usize = 4 * 1024 * 1024;

/// Why a directory body did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryError(pub &'static str);

impl std::fmt::Display for DirectoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed directory: {}", self.0)
    }
}

impl std::error::Error for DirectoryError {}

impl Directory {
    /// `"MABE-V1-DIR" ‖ lp(authority) ‖ be64(issued_at) ‖ be64(valid_until) ‖ be32(n) ‖
    /// n × (lp(attribute) ‖ be32(version) ‖ u8(current) ‖ lp(public_key))`.
    ///
    /// ```
    /// use mabe_proto::signing::Directory;
    /// let d = Directory { authority: "hospital-a".into(), issued_at: 1, valid_until: 2, entries: vec![] };
    /// assert_eq!(Directory::decode(&d.encode()), Ok(d));
    /// ```
    pub fn encode(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(64 + self.entries.len() * 700);
        m.extend_from_slice(TAG_DIRECTORY);
        lp(&mut m, self.authority.as_bytes());
        m.extend_from_slice(&self.issued_at.to_be_bytes());
        m.extend_from_slice(&self.valid_until.to_be_bytes());
        m.extend_from_slice(&(self.entries.len() as u32).to_be_bytes());
        for e in &self.entries {
            lp(&mut m, e.attribute.as_bytes());
            m.extend_from_slice(&e.version.to_be_bytes());
            m.push(u8::from(e.current));
            lp(&mut m, &e.public_key);
        }
        m
    }

    /// Decode a body (bounded, no trailing bytes). Does not check the
    /// signature or the public keys: callers do both.
    pub fn decode(b: &[u8]) -> Result<Directory, DirectoryError> {
        if b.len() > MAX_DIRECTORY_BYTES {
            return Err(DirectoryError("larger than the size limit"));
        }
        let mut r = Cursor { b, pos: 0 };
        if r.take(TAG_DIRECTORY.len())? != TAG_DIRECTORY {
            return Err(DirectoryError("bad tag"));
        }
        let authority = r.string(64)?;
        let issued_at = r.i64()?;
        let valid_until = r.i64()?;
        let n = r.u32()? as usize;
        if n > 100_000 {
            return Err(DirectoryError("too many entries"));
        }
        let mut entries = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let attribute = r.string(256)?;
            let version = r.u32()?;
            let current = match r.take(1)? {
                [0] => false,
                [1] => true,
                _ => return Err(DirectoryError("bad current flag")),
            };
            let public_key = r.lp(2048)?.to_vec();
            entries.push(DirectoryEntry {
                attribute,
                version,
                current,
                public_key,
            });
        }
        if r.pos != b.len() {
            return Err(DirectoryError("trailing bytes"));
        }
        Ok(Directory {
            authority,
            issued_at,
            valid_until,
            entries,
        })
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DirectoryError> {
        let end = self.pos.checked_add(n).ok_or(DirectoryError("truncated"))?;
        let s = self
            .b
            .get(self.pos..end)
            .ok_or(DirectoryError("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, DirectoryError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    fn i64(&mut self) -> Result<i64, DirectoryError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(i64::from_be_bytes(a))
    }
    fn lp(&mut self, max: usize) -> Result<&'a [u8], DirectoryError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DirectoryError("field over its size limit"));
        }
        self.take(n)
    }
    fn string(&mut self, max: usize) -> Result<String, DirectoryError> {
        std::str::from_utf8(self.lp(max)?)
            .map(str::to_owned)
            .map_err(|_| DirectoryError("text is not UTF-8"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod proxy_signing_tests {
    use super::*;
    use ed25519_dalek::{Signature, SigningKey, Verifier};
    use sha2::{Digest, Sha256};

    #[test]
    fn proxy_message_layout_is_exact() {
        let m = proxy_message("p", "ab", "/m", &[9, 9], 0x0102, &[7; 32]);
        let mut expected = b"MABE-V1-PROXY".to_vec();
        expected.extend_from_slice(&[0, 0, 0, 1, b'p']);
        expected.extend_from_slice(&[0, 0, 0, 2, b'a', b'b']);
        expected.extend_from_slice(&[0, 0, 0, 2, b'/', b'm']);
        expected.extend_from_slice(&[0, 0, 0, 2, 9, 9]);
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 1, 2]);
        expected.extend_from_slice(&[7; 32]);
        assert_eq!(m, expected);
    }

    #[test]
    fn signed_request_verifies_over_its_metadata_and_body() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let msg = crate::v1::FreezeRequest {
            attribute: "cardiology@hospital-a".into(),
            version: 4,
        };
        let req =
            sign_proxy_request(msg.clone(), "cloud-1", "hospital-a", METHOD_FREEZE, &key).unwrap();
        let md = req.metadata();
        let get = |k: &str| md.get(k).unwrap().to_str().unwrap().to_owned();
        assert_eq!(get(PROXY_AUTHORITY), "hospital-a");
        let nonce = hex::decode(get(PROXY_NONCE)).unwrap();
        assert_eq!(nonce.len(), 16);
        let ts: i64 = get(PROXY_TIMESTAMP).parse().unwrap();
        let sig = Signature::from_slice(&hex::decode(get(PROXY_SIGNATURE)).unwrap()).unwrap();
        let digest: [u8; 32] = Sha256::digest(prost::Message::encode_to_vec(&msg)).into();
        let signed = proxy_message("cloud-1", "hospital-a", METHOD_FREEZE, &nonce, ts, &digest);
        key.verifying_key().verify(&signed, &sig).unwrap();
        // Another proxy id, method or body is another message.
        let other = proxy_message("cloud-2", "hospital-a", METHOD_FREEZE, &nonce, ts, &digest);
        assert!(key.verifying_key().verify(&other, &sig).is_err());
        // Two requests never share a nonce.
        let again = sign_proxy_request(msg, "cloud-1", "hospital-a", METHOD_FREEZE, &key).unwrap();
        assert_ne!(again.metadata().get(PROXY_NONCE), md.get(PROXY_NONCE));
    }

    #[test]
    fn bad_nonces_and_authority_ids_are_refused() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let msg = crate::v1::FreezeStatusRequest::default();
        for nonce in [&[0u8; 15][..], &[0u8; 65][..]] {
            assert!(
                sign_proxy_request_with(
                    msg.clone(),
                    "p",
                    "a",
                    METHOD_FREEZE_STATUS,
                    &key,
                    nonce,
                    1
                )
                .is_err()
            );
        }
        assert!(
            sign_proxy_request_with(msg, "p", "a\nb", METHOD_FREEZE_STATUS, &key, &[0; 16], 1)
                .is_err()
        );
    }
}
