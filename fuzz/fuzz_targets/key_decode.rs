//! Key, token and secret decoding on arbitrary bytes.
//!
//! The first byte (modulo `KEY_KINDS`) picks the object kind, the rest is
//! decoded. Decoding never panics, and it is canonical: an object that
//! decodes re-encodes to exactly the input bytes.
#![no_main]

use ark_std::rand::{SeedableRng, rngs::StdRng};
use libfuzzer_sys::fuzz_target;
use mabe_abe::{AttributePublicKey, AttributeSecretKey, UpdateSecret, UpdateToken, UserKey};
use mabe_fuzz::{KEY_KINDS, key_kind};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % KEY_KINDS {
        key_kind::USER_KEY => {
            if let Ok(key) = UserKey::from_bytes(bytes) {
                assert_eq!(
                    &key.to_bytes()[..],
                    bytes,
                    "user key re-encodes differently"
                );
            }
        }
        key_kind::PUBLIC_KEY => {
            if let Ok(pk) = AttributePublicKey::from_bytes(bytes) {
                let encoded = pk.to_bytes();
                assert_eq!(encoded, bytes, "public key re-encodes differently");
                let again = AttributePublicKey::from_bytes(&encoded).expect("re-decode");
                assert!(again == pk, "public key changes on a round trip");
            }
        }
        key_kind::UPDATE_TOKEN => {
            if let Ok(token) = UpdateToken::from_bytes(bytes) {
                let encoded = token.to_bytes();
                assert_eq!(encoded, bytes, "update token re-encodes differently");
                let again = UpdateToken::from_bytes(&encoded).expect("re-decode");
                assert!(again == token, "update token changes on a round trip");
            }
        }
        key_kind::UPDATE_SECRET => {
            if let Ok(secret) = UpdateSecret::from_bytes(bytes) {
                assert_eq!(
                    &secret.to_bytes()[..],
                    bytes,
                    "update secret re-encodes differently"
                );
            }
        }
        _ => {
            // The RNG only blinds a scalar multiplication during decoding.
            let mut rng = StdRng::seed_from_u64(0);
            if let Ok(sk) = AttributeSecretKey::from_bytes(bytes, &mut rng) {
                assert_eq!(
                    &sk.to_bytes()[..],
                    bytes,
                    "attribute secret key re-encodes differently"
                );
            }
        }
    }
});
