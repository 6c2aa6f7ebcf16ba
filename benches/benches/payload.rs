//! Payload throughput: the STREAM AES-256-GCM DEM against plain AES-256-GCM
//! over the same 64 KiB segments, for 1 MiB and 64 MiB payloads.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{io::Write, time::Duration};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{AeadInOut, array::Array},
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mabe_abe::{EncryptOptions, decapsulate, encapsulate};
use mabe_benches::{attributes, fixture, flat_policy};

fn payload(c: &mut Criterion) {
    let mut g = c.benchmark_group("payload");
    let attrs = attributes(1, 1);
    let mut f = fixture(&attrs).unwrap();
    let policy = flat_policy(&attrs, true);
    let (header, key) = encapsulate(
        &policy,
        &f.directory,
        &EncryptOptions::default(),
        &mut f.rng,
    )
    .unwrap();
    let dkey = decapsulate(&header, &f.keys, &f.directory).unwrap();
    for mib in [1usize, 64] {
        let len = mib << 20;
        let plain = vec![0x5au8; len];
        g.throughput(Throughput::Bytes(len as u64));
        let mut sink = Vec::with_capacity(len + len / 4096 + 64);
        g.bench_with_input(
            BenchmarkId::new("encrypt", format!("{mib}MiB")),
            &len,
            |b, _| {
                b.iter(|| {
                    sink.clear();
                    let mut e = key.encryptor(&mut sink).unwrap();
                    e.write_all(&plain).unwrap();
                    e.finish().unwrap();
                })
            },
        );
        let mut ct = Vec::new();
        let mut e = key.encryptor(&mut ct).unwrap();
        e.write_all(&plain).unwrap();
        e.finish().unwrap();
        let mut out = Vec::with_capacity(len);
        g.bench_with_input(
            BenchmarkId::new("decrypt", format!("{mib}MiB")),
            &len,
            |b, _| {
                b.iter(|| {
                    out.clear();
                    let mut d = dkey.decryptor(&ct[..]).unwrap();
                    std::io::copy(&mut d, &mut out).unwrap();
                })
            },
        );
        // Baseline: AES-256-GCM over the same segments, no streaming layer.
        let aes = Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap();
        let mut buf = plain.clone();
        g.bench_with_input(
            BenchmarkId::new("aes256gcm_baseline", format!("{mib}MiB")),
            &len,
            |b, _| {
                b.iter(|| {
                    for (i, seg) in buf.chunks_mut(65536).enumerate() {
                        let mut n = [0u8; 12];
                        n[..8].copy_from_slice(&(i as u64).to_be_bytes());
                        aes.encrypt_inout_detached(&Array::from(n), b"ad", seg.into())
                            .unwrap();
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = payload
}
criterion_main!(benches);
