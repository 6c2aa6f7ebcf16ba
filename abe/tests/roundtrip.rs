//! Round trips: policies of every shape over 1–5 authorities, payload sizes
//! at the segment boundaries, streaming with odd chunk sizes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};

use common::World;
use mabe_abe::{AbeError, DEFAULT_SEGMENT_SIZE, EncryptOptions, Header, decapsulate, encapsulate};

const ATTRS: &[&str] = &[
    "doctor@hospital-a",
    "cardiology@hospital-a",
    "nurse@hospital-b",
    "emergency@hospital-b",
    "researcher@univ-c",
    "emergency@hospital-d",
    "family@patient-e",
];

#[test]
fn policies_of_every_shape_decrypt_for_satisfying_key_sets() {
    let mut w = World::new(ATTRS, 1);
    let cases: &[(&str, &[&str])] = &[
        ("doctor@hospital-a", &["doctor@hospital-a"]),
        (
            "doctor@hospital-a AND cardiology@hospital-a",
            &["doctor@hospital-a", "cardiology@hospital-a"],
        ),
        (
            "doctor@hospital-a OR nurse@hospital-b",
            &["nurse@hospital-b"],
        ),
        (
            "(doctor@hospital-a AND cardiology@hospital-a) OR 2 of (emergency@hospital-b, emergency@hospital-d, family@patient-e)",
            &["emergency@hospital-b", "family@patient-e"],
        ),
        (
            "doctor@hospital-a AND nurse@hospital-b AND researcher@univ-c AND emergency@hospital-d AND family@patient-e",
            &[
                "doctor@hospital-a",
                "nurse@hospital-b",
                "researcher@univ-c",
                "emergency@hospital-d",
                "family@patient-e",
            ],
        ),
        (
            "3 of (doctor@hospital-a, nurse@hospital-b, researcher@univ-c, emergency@hospital-d, family@patient-e)",
            &[
                "nurse@hospital-b",
                "emergency@hospital-d",
                "family@patient-e",
            ],
        ),
        (
            "(doctor@hospital-a OR nurse@hospital-b) AND 2 of (researcher@univ-c, emergency@hospital-d AND family@patient-e, cardiology@hospital-a)",
            &[
                "nurse@hospital-b",
                "researcher@univ-c",
                "emergency@hospital-d",
                "family@patient-e",
            ],
        ),
        // The same attribute in several rows.
        (
            "(doctor@hospital-a AND nurse@hospital-b) OR (doctor@hospital-a AND researcher@univ-c)",
            &["doctor@hospital-a", "researcher@univ-c"],
        ),
    ];
    for (i, (policy, held)) in cases.iter().enumerate() {
        let ring = w.person(&format!("person-{i}"), held);
        let payload = format!("record {i}: {policy}").into_bytes();
        let (header, ct) = w.encrypt(policy, &payload);
        // Through the wire encoding, as a stored record would be.
        let header = Header::from_bytes(&header.to_bytes()).unwrap();
        assert_eq!(w.decrypt(&header, &ring, &ct).unwrap(), payload, "{policy}");
    }
}

#[test]
fn payload_sizes_around_segment_boundaries() {
    let mut w = World::new(&["doctor@hospital-a", "nurse@hospital-b"], 2);
    let ring = w.person("p", &["doctor@hospital-a"]);
    let seg = DEFAULT_SEGMENT_SIZE as usize;
    for len in [0, 1, seg - 1, seg, seg + 1, 2 * seg, 10 * 1024 * 1024] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let (header, ct) = w.encrypt("doctor@hospital-a OR nurse@hospital-b", &payload);
        let segments = len.div_ceil(seg).max(1);
        assert_eq!(ct.len(), len + 16 * segments, "ciphertext size for {len}");
        assert_eq!(
            w.decrypt(&header, &ring, &ct).unwrap(),
            payload,
            "len {len}"
        );
    }
}

#[test]
fn streaming_with_odd_chunks_and_small_segments() {
    let mut w = World::new(&["doctor@hospital-a"], 3);
    let ring = w.person("p", &["doctor@hospital-a"]);
    let policy = mabe_policy::parse("doctor@hospital-a").unwrap();
    let opts = EncryptOptions { segment_size: 1024 };
    let (header, key) = encapsulate(&policy, &w.directory, &opts, &mut w.rng).unwrap();
    let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 256) as u8).collect();
    let mut enc = key.encryptor(Vec::new()).unwrap();
    for chunk in payload.chunks(333) {
        enc.write_all(chunk).unwrap();
    }
    let ct = enc.finish().unwrap();
    let key = decapsulate(&header, &ring, &w.directory).unwrap();
    let mut dec = key.decryptor(&ct[..]).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 77];
    loop {
        let n = dec.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out, payload);
}

#[test]
fn every_decryptor_gets_the_same_plaintext() {
    let mut w = World::new(&["doctor@hospital-a", "nurse@hospital-b"], 4);
    let a = w.person("a", &["doctor@hospital-a"]);
    let b = w.person("b", &["nurse@hospital-b"]);
    let (header, ct) = w.encrypt("doctor@hospital-a OR nurse@hospital-b", b"same for all");
    assert_eq!(w.decrypt(&header, &a, &ct).unwrap(), b"same for all");
    assert_eq!(w.decrypt(&header, &b, &ct).unwrap(), b"same for all");
}

#[test]
fn missing_public_key_and_bad_segment_size_are_clear_errors() {
    let mut w = World::new(&["doctor@hospital-a"], 5);
    let policy = mabe_policy::parse("doctor@hospital-a AND nurse@hospital-b").unwrap();
    let err = encapsulate(
        &policy,
        &w.directory,
        &EncryptOptions::default(),
        &mut w.rng,
    )
    .unwrap_err();
    assert!(err.to_string().contains("nurse@hospital-b"), "{err}");
    let policy = mabe_policy::parse("doctor@hospital-a").unwrap();
    let err = encapsulate(
        &policy,
        &w.directory,
        &EncryptOptions { segment_size: 10 },
        &mut w.rng,
    )
    .unwrap_err();
    assert!(matches!(err, AbeError::InvalidParameter(_)));
}
