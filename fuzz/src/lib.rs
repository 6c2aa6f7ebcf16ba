//! Fixtures shared by the fuzz targets and the corpus generator
//! (`examples/make_corpus.rs`).

use ark_std::rand::{SeedableRng, rngs::StdRng};
use mabe_abe::{
    AttributeSecretKey, EncryptOptions, MIN_SEGMENT_SIZE, PublicKeyRing, RecordKey, Version,
    encapsulate,
};

/// Seed of the RNG that builds the `payload_decrypt` record key.
pub const PAYLOAD_SEED: u64 = 0x6d61_6265_0000_0001;

/// The dispatch byte (first input byte, modulo [`KEY_KINDS`]) of `key_decode`.
pub mod key_kind {
    /// `UserKey`.
    pub const USER_KEY: u8 = 0;
    /// `AttributePublicKey`.
    pub const PUBLIC_KEY: u8 = 1;
    /// `UpdateToken`.
    pub const UPDATE_TOKEN: u8 = 2;
    /// `UpdateSecret`.
    pub const UPDATE_SECRET: u8 = 3;
    /// `AttributeSecretKey`.
    pub const SECRET_KEY: u8 = 4;
}

/// Number of object kinds `key_decode` dispatches on.
pub const KEY_KINDS: u8 = 5;

/// The fixed record key of `payload_decrypt`: the key of a record encrypted
/// for `reader@fuzz` with the smallest segment size (so that small inputs
/// span several segments), built only through the public API from a seeded
/// RNG. The same seed in the corpus generator gives the same key, so its
/// payload seeds decrypt.
pub fn payload_key() -> RecordKey {
    let mut rng = StdRng::seed_from_u64(PAYLOAD_SEED);
    let attribute = "reader@fuzz".parse().expect("valid attribute");
    let sk = AttributeSecretKey::generate(attribute, Version::FIRST, &mut rng);
    let mut ring = PublicKeyRing::new();
    ring.insert(sk.public_key(&mut rng))
        .expect("insert public key");
    let policy = mabe_policy::parse("reader@fuzz").expect("valid policy");
    let options = EncryptOptions {
        segment_size: MIN_SEGMENT_SIZE,
    };
    let (_header, key) = encapsulate(&policy, &ring, &options, &mut rng).expect("encapsulate");
    key
}
