//! Shared fixtures for mabe's benchmarks, and the `bench-report` command that
//! turns criterion's results into the table and plots in `benches/README.md`.
//! [`load`] holds what the load generators (`mabe-loadgen`,
//! `mabe-proxy-load`) share.
#![warn(missing_docs)]

pub mod load;

use ark_std::rand::{SeedableRng, rngs::StdRng};
use mabe_abe::{Attribute, AttributeSecretKey, Gid, Policy, PublicKeyRing, UserKeyRing, Version};

/// Policy sizes (rows) measured.
pub const SIZES: [usize; 7] = [1, 2, 5, 10, 20, 50, 100];

/// A seeded RNG (benchmarks must be reproducible).
pub fn rng() -> StdRng {
    StdRng::seed_from_u64(0x6d616265)
}

/// `n` distinct attributes spread round-robin over `authorities` authorities.
pub fn attributes(n: usize, authorities: usize) -> Vec<Attribute> {
    (0..n)
        .filter_map(|i| {
            format!("attr{i}@hospital-{}", i % authorities.max(1))
                .parse()
                .ok()
        })
        .collect()
}

/// The AND (or OR) of the given attributes.
pub fn flat_policy(attrs: &[Attribute], and: bool) -> Policy {
    let leaves: Vec<Policy> = attrs.iter().cloned().map(Policy::Leaf).collect();
    match leaves.len() {
        1 => leaves
            .into_iter()
            .next()
            .unwrap_or_else(|| Policy::Or(Vec::new())),
        _ if and => Policy::And(leaves),
        _ => Policy::Or(leaves),
    }
}

/// Authorities' secrets, the directory (tables warm) and one person holding
/// every attribute.
#[derive(Debug)]
pub struct Fixture {
    /// Attribute secrets.
    pub secrets: Vec<AttributeSecretKey>,
    /// Public directory, fixed-base tables built.
    pub directory: PublicKeyRing,
    /// A person with a verified key for every attribute.
    pub keys: UserKeyRing,
    /// RNG for the benchmark.
    pub rng: StdRng,
}

/// Build a [`Fixture`] for `attrs`.
pub fn fixture(attrs: &[Attribute]) -> Result<Fixture, mabe_abe::AbeError> {
    let mut rng = rng();
    let mut directory = PublicKeyRing::new();
    let mut secrets = Vec::new();
    for a in attrs {
        let sk = AttributeSecretKey::generate(a.clone(), Version::FIRST, &mut rng);
        directory.insert(sk.public_key(&mut rng))?;
        secrets.push(sk);
    }
    let mut keys = UserKeyRing::new(Gid::derive("bench-register", "bench-person")?)?;
    for sk in &secrets {
        let k = sk.keygen(keys.hashed_gid(), &mut rng);
        let pk = directory
            .get(sk.attribute(), sk.version())
            .cloned()
            .ok_or(mabe_abe::AbeError::InvalidParameter("missing public key"))?;
        keys.insert(k, &pk)?;
    }
    directory.warm_up();
    Ok(Fixture {
        secrets,
        directory,
        keys,
        rng,
    })
}
