//! Shared fixtures for the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;

use ark_std::rand::{SeedableRng, rngs::StdRng};
use mabe_abe::{
    Attribute, AttributeSecretKey, EncryptOptions, Gid, Header, PublicKeyRing, UserKeyRing,
    Version, decrypt, encrypt,
};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn attr(s: &str) -> Attribute {
    s.parse().expect("valid attribute")
}

/// A set of authorities' attribute secrets and the public directory.
pub struct World {
    pub secrets: BTreeMap<Attribute, AttributeSecretKey>,
    pub directory: PublicKeyRing,
    pub rng: StdRng,
}

impl World {
    pub fn new(attrs: &[&str], seed: u64) -> World {
        let mut rng = rng(seed);
        let mut secrets = BTreeMap::new();
        let mut directory = PublicKeyRing::new();
        for a in attrs {
            let sk = AttributeSecretKey::generate(attr(a), Version::FIRST, &mut rng);
            directory.insert(sk.public_key(&mut rng)).unwrap();
            secrets.insert(attr(a), sk);
        }
        World {
            secrets,
            directory,
            rng,
        }
    }

    /// A person holding verified keys for `attrs`.
    pub fn person(&mut self, subject: &str, attrs: &[&str]) -> UserKeyRing {
        let mut ring = UserKeyRing::new(Gid::derive("test-register", subject).unwrap()).unwrap();
        for a in attrs {
            self.grant(&mut ring, a);
        }
        ring
    }

    pub fn grant(&mut self, ring: &mut UserKeyRing, a: &str) {
        let sk = &self.secrets[&attr(a)];
        let key = sk.keygen(ring.hashed_gid(), &mut self.rng);
        let pk = self
            .directory
            .get(sk.attribute(), sk.version())
            .unwrap()
            .clone();
        ring.insert(key, &pk).unwrap();
    }

    pub fn encrypt(&mut self, policy: &str, payload: &[u8]) -> (Header, Vec<u8>) {
        let policy = mabe_policy::parse(policy).unwrap();
        let mut ct = Vec::new();
        let header = encrypt(
            &policy,
            &self.directory,
            &EncryptOptions::default(),
            &mut self.rng,
            payload,
            &mut ct,
        )
        .unwrap();
        (header, ct)
    }

    pub fn decrypt(
        &self,
        header: &Header,
        ring: &UserKeyRing,
        ct: &[u8],
    ) -> Result<Vec<u8>, mabe_abe::AbeError> {
        let mut out = Vec::new();
        decrypt(header, ring, &self.directory, ct, &mut out)?;
        Ok(out)
    }
}
