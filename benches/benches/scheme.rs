//! Scheme benchmarks across policy sizes, with the bare multi-pairing of
//! n+1 pairs in the same group so decryption reads as a ratio to its floor.
//!
//! Run: `cargo bench -p mabe-benches --bench scheme`, then
//! `cargo run --release -p mabe-benches --bin bench-report` for the table and plots.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use ark_bls12_381::{Bls12_381, G1Affine, G1Projective, G2Affine, G2Projective};
use ark_ec::{CurveGroup, pairing::Pairing};
use ark_std::UniformRand;
use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use mabe_abe::{
    AttributeSecretKey, EncryptOptions, Gid, HashedGid, Header, Snapshot, Version, decapsulate,
    decapsulate_core, encapsulate,
};
use mabe_benches::{SIZES, attributes, fixture, flat_policy, rng};

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(2))
}

/// Attribute setup, key generation, and GID hashing.
fn authority_ops(c: &mut Criterion) {
    let mut g = c.benchmark_group("authority");
    let mut r = rng();
    let attr: mabe_abe::Attribute = "doctor@hospital-a".parse().unwrap();
    g.bench_function("attribute_setup", |b| {
        b.iter(|| {
            let sk = AttributeSecretKey::generate(attr.clone(), Version::FIRST, &mut r);
            sk.public_key(&mut r)
        })
    });
    let sk = AttributeSecretKey::generate(attr.clone(), Version::FIRST, &mut r);
    let gid = Gid::derive("bench-register", "someone").unwrap();
    let h = HashedGid::new(gid).unwrap();
    g.bench_function("keygen_per_attribute", |b| b.iter(|| sk.keygen(&h, &mut r)));
    g.bench_function("hash_gid_to_g2", |b| {
        b.iter(|| HashedGid::new(gid).unwrap())
    });
    let pk = sk.public_key(&mut r);
    let key = sk.keygen(&h, &mut r);
    g.bench_function("key_verify", |b| b.iter(|| key.verify(&h, &pk).unwrap()));
    g.finish();
}

/// Encrypt, decrypt, the decrypt core and the multi-pairing floor, per size.
fn policy_sizes(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_size");
    let mut r = rng();
    for &n in &SIZES {
        // The floor: a multi-pairing of n+1 pairs from affine points, and with
        // the G2 side already prepared (as a key ring holds it).
        let g1: Vec<G1Affine> = (0..=n)
            .map(|_| G1Projective::rand(&mut r).into_affine())
            .collect();
        let g2: Vec<G2Affine> = (0..=n)
            .map(|_| G2Projective::rand(&mut r).into_affine())
            .collect();
        let prepared: Vec<<Bls12_381 as Pairing>::G2Prepared> =
            g2.iter().map(|q| (*q).into()).collect();
        g.bench_with_input(BenchmarkId::new("multi_pairing", n), &n, |b, _| {
            b.iter(|| Bls12_381::multi_pairing(&g1, &g2))
        });
        g.bench_with_input(BenchmarkId::new("multi_pairing_prepared", n), &n, |b, _| {
            b.iter(|| Bls12_381::multi_pairing(&g1, prepared.iter().cloned()))
        });
        for authorities in [1usize, 5] {
            let attrs = attributes(n, authorities);
            let mut f = fixture(&attrs).unwrap();
            if authorities == 5 {
                // Issuing n keys to one person: one hash to G2, then n keygens.
                let gid = Gid::derive("bench-register", "new-person").unwrap();
                g.bench_with_input(BenchmarkId::new("keygen_n_attributes", n), &n, |b, _| {
                    b.iter(|| {
                        let h = HashedGid::new(gid).unwrap();
                        f.secrets
                            .iter()
                            .map(|sk| sk.keygen(&h, &mut f.rng))
                            .collect::<Vec<_>>()
                    })
                });
            }
            for and in [true, false] {
                let shape = if and { "and" } else { "or" };
                let policy = flat_policy(&attrs, and);
                let opts = EncryptOptions::default();
                let name = |op: &str| format!("{op}_{shape}_{authorities}a");
                g.bench_with_input(BenchmarkId::new(name("encrypt"), n), &n, |b, _| {
                    b.iter(|| encapsulate(&policy, &f.directory, &opts, &mut f.rng).unwrap())
                });
                let (header, _) = encapsulate(&policy, &f.directory, &opts, &mut f.rng).unwrap();
                g.bench_with_input(BenchmarkId::new(name("decrypt"), n), &n, |b, _| {
                    b.iter(|| decapsulate(&header, &f.keys, &f.directory).unwrap())
                });
                g.bench_with_input(BenchmarkId::new(name("decrypt_core"), n), &n, |b, _| {
                    b.iter(|| decapsulate_core(&header, &f.keys).unwrap())
                });
                if authorities == 5 {
                    let bytes = header.to_bytes();
                    g.bench_with_input(BenchmarkId::new(name("header_decode"), n), &n, |b, _| {
                        b.iter(|| Header::from_bytes(&bytes).unwrap())
                    });
                }
            }
        }
    }
    g.finish();
}

/// Revocation: token generation per row and application per record.
fn revocation(c: &mut Criterion) {
    let mut g = c.benchmark_group("revocation");
    let attrs = attributes(2, 1);
    let mut f = fixture(&attrs).unwrap();
    let policy = flat_policy(&attrs, true);
    let opts = EncryptOptions::default();
    let target = attrs[0].clone();
    let headers: Vec<Header> = (0..32)
        .map(|_| {
            encapsulate(&policy, &f.directory, &opts, &mut f.rng)
                .unwrap()
                .0
        })
        .collect();
    let (_, us) = f.secrets[0].rotate(&mut f.rng).unwrap();
    let mut snap = Snapshot::new(target.clone(), Version::FIRST);
    for h in &headers {
        for row in h.snapshot_rows(&target, Version::FIRST) {
            snap.insert(row).unwrap();
        }
    }
    let rows: Vec<_> = snap.rows().collect();
    let tg = us.token_generator(snap, &mut f.rng).unwrap();
    let mut i = 0usize;
    g.bench_function("token_generation_per_row", |b| {
        b.iter(|| {
            i = (i + 1) % rows.len();
            tg.compute(&rows[i], &mut f.rng).unwrap()
        })
    });
    let tokens: Vec<_> = headers
        .iter()
        .map(|h| {
            let row = h.snapshot_rows(&target, Version::FIRST)[0];
            tg.compute(&row, &mut f.rng).unwrap()
        })
        .collect();
    let encoded: Vec<Vec<u8>> = tokens.iter().map(|t| t.to_bytes()).collect();
    // The floor of token generation: one pairing with a prepared G2 point.
    let c2 = *headers[0].rows()[0].c2();
    let q: <Bls12_381 as Pairing>::G2Prepared = G2Projective::rand(&mut f.rng).into_affine().into();
    g.bench_function("pairing_one_prepared", |b| {
        b.iter(|| Bls12_381::multi_pairing([c2], [q.clone()]))
    });
    g.bench_function("token_apply_per_row", |b| {
        b.iter_batched(
            || headers[0].clone(),
            |mut h| h.apply_tokens(&tokens[..1]).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("token_decode", |b| {
        b.iter(|| mabe_abe::UpdateToken::from_bytes(&encoded[0]).unwrap())
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = authority_ops, policy_sizes, revocation
}
criterion_main!(benches);
