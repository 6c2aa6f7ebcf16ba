//! Client side of admin authentication: sign a request's metadata with the
//! admin key (used by the `mabe-authority` CLI against a running node, and
//! by tests).

use ark_std::rand::{RngCore, rngs::OsRng};
use ed25519_dalek::{Signer, SigningKey};
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Request, metadata::MetadataValue};

use crate::{
    grpc::{ADMIN_NONCE, ADMIN_SIGNATURE, ADMIN_TIMESTAMP},
    node::now,
};

/// Wrap `msg` in a request signed for `method` (the full gRPC path, e.g.
/// `/mabe.v1.AuthorityAdmin/Enroll`) of `authority`.
pub fn signed<T: Message>(msg: T, authority: &str, method: &str, key: &SigningKey) -> Request<T> {
    let mut nonce = [0u8; 16];
    OsRng.fill_bytes(&mut nonce);
    let ts = now();
    let digest: [u8; 32] = Sha256::digest(msg.encode_to_vec()).into();
    let m = mabe_proto::signing::admin_message(authority, method, &nonce, ts, &digest);
    let sig = key.sign(&m);
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    for (k, v) in [
        (ADMIN_TIMESTAMP, ts.to_string()),
        (ADMIN_NONCE, hex::encode(nonce)),
        (ADMIN_SIGNATURE, hex::encode(sig.to_bytes())),
    ] {
        if let Ok(v) = MetadataValue::try_from(v) {
            md.insert(k, v);
        }
    }
    req
}
