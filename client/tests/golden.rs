//! Format stability: records, keys, directories and a key store made from a
//! fixed seed live in `tests/data/golden/`; every later version must still
//! decrypt them with the `mabe` command and inspect them identically.
//!
//! Regenerate (only when the format changes on purpose, with a new format
//! version) with `MABE_REGENERATE_GOLDEN=1 cargo test -p mabe-client --test golden`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ark_std::rand::{SeedableRng, rngs::StdRng};
use common::{OfflineAuthority, Person, offline_home};
use mabe_abe::EncryptOptions;
use mabe_client::{KeyStore, directory::encryption_ring, record::write_record};

/// 2026-01-01T00:00:00Z: the directories' issue time (long expired, which
/// decryption accepts).
const ISSUED_AT: i64 = 1_767_225_600;

struct Case {
    name: &'static str,
    policy: &'static str,
    segment_size: u32,
    plaintext: Vec<u8>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "record-1",
            policy: "cardiology@hospital-a AND (consultant@hospital-b OR genetics@hospital-c)",
            segment_size: 1024,
            plaintext: (0..5000u32)
                .flat_map(|i| format!("line {i}: blood pressure 120/80\n").into_bytes())
                .take(5000)
                .collect(),
        },
        Case {
            name: "record-2",
            policy: "2 of (cardiology@hospital-a, consultant@hospital-b, genetics@hospital-c)",
            segment_size: 65536,
            plaintext: b"allergies: penicillin\n".to_vec(),
        },
        Case {
            name: "record-3-empty",
            policy: "consultant@hospital-b",
            segment_size: 65536,
            plaintext: Vec::new(),
        },
    ]
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/golden")
}

fn regenerate() {
    let d = dir();
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let mut rng = StdRng::seed_from_u64(0x6d61_6265);
    let auths = [
        OfflineAuthority::new("hospital-a", &["cardiology"], &mut rng),
        OfflineAuthority::new("hospital-b", &["consultant"], &mut rng),
        OfflineAuthority::new("hospital-c", &["genetics"], &mut rng),
    ];
    let refs: Vec<&OfflineAuthority> = auths.iter().collect();
    // The reader's key store holds A's and B's attributes.
    offline_home(
        &d.join("reader-home"),
        "big-register",
        "reader-1",
        &refs,
        &["cardiology@hospital-a", "consultant@hospital-b"],
        ISSUED_AT,
        3600,
        &mut rng,
    );
    // The writer's key store: an identity and the directories.
    let writer_home = d.join("writer-home");
    offline_home(
        &writer_home,
        "big-register",
        "writer-1",
        &refs,
        &[],
        ISSUED_AT,
        3600,
        &mut rng,
    );
    let writer = KeyStore::open(&writer_home);
    let identity = writer.load_identity().unwrap();
    let trust = writer.trust().unwrap();
    let dirs: BTreeMap<_, _> = writer.directories(&trust).unwrap();
    // The reader names the writer's key.
    let mut reader_trust = KeyStore::open(d.join("reader-home")).trust().unwrap();
    reader_trust
        .add_writer("golden writer", identity.key.verifying_key())
        .unwrap();
    reader_trust.save().unwrap();
    for c in cases() {
        let policy = mabe_policy::parse(c.policy).unwrap();
        let pks = encryption_ring(&policy, &dirs, ISSUED_AT).unwrap();
        let mut out = Vec::new();
        write_record(
            &policy,
            &pks,
            &EncryptOptions {
                segment_size: c.segment_size,
            },
            Some(&identity),
            &mut rng,
            &c.plaintext[..],
            &mut out,
        )
        .unwrap();
        std::fs::write(d.join(format!("{}.mabe", c.name)), out).unwrap();
        std::fs::write(d.join(format!("{}.txt", c.name)), &c.plaintext).unwrap();
    }
    // Bare user keys too (FORMAT.md 'K'), as an offline key bundle.
    let keys = KeyStore::open(d.join("reader-home")).load_keys().unwrap();
    let encoded: Vec<Vec<u8>> = keys.iter().map(|k| k.key.to_bytes().to_vec()).collect();
    std::fs::write(
        d.join("reader-keys.bundle"),
        mabe_proto::bundle::encode("hospital-a", b"", &encoded[..1]),
    )
    .unwrap();
    // The expected inspection output.
    let reader = reader_person(&d);
    for c in cases() {
        let json = reader.ok(&[
            "inspect",
            "--json",
            d.join(format!("{}.mabe", c.name)).to_str().unwrap(),
        ]);
        std::fs::write(d.join(format!("{}.inspect.json", c.name)), json).unwrap();
    }
}

/// A person whose key store is a copy of the golden reader's.
fn reader_person(d: &Path) -> Person {
    let p = Person::new("golden reader");
    copy_dir(&d.join("reader-home"), p.home.path());
    p
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

#[test]
fn golden_records_decrypt_and_inspect_identically() {
    if std::env::var_os("MABE_REGENERATE_GOLDEN").is_some_and(|v| v == "1") {
        regenerate();
    }
    let d = dir();
    assert!(
        d.join("record-1.mabe").exists(),
        "golden files missing: run with MABE_REGENERATE_GOLDEN=1 once"
    );
    let reader = reader_person(&d);
    for c in cases() {
        let record = d.join(format!("{}.mabe", c.name));
        let out = reader.path("out.bin");
        let ran = reader
            .run(&[
                "--offline",
                "decrypt",
                "--in",
                record.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ])
            .ok(c.name);
        assert!(
            ran.stderr.contains("verified writer: golden writer"),
            "{}",
            ran.stderr
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(d.join(format!("{}.txt", c.name))).unwrap(),
            "{} decrypted differently",
            c.name
        );
        let json = reader.ok(&["inspect", "--json", record.to_str().unwrap()]);
        let expected = std::fs::read_to_string(d.join(format!("{}.inspect.json", c.name))).unwrap();
        assert_eq!(json, expected, "{} inspects differently", c.name);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["signature_check"], "valid");
        for row in v["header"]["rows"].as_array().unwrap() {
            assert_eq!(row["c1"].as_str().unwrap().len(), 2 * 576);
            assert_eq!(row["c2"].as_str().unwrap().len(), 2 * 48);
            assert_eq!(row["c3"].as_str().unwrap().len(), 2 * 48);
        }
    }
    // The golden key bundle imports into a fresh store of the same person
    // (verified against the golden directory).
    let fresh = Person::new("fresh reader");
    copy_dir(&d.join("reader-home"), fresh.home.path());
    let text = fresh.ok(&[
        "--offline",
        "keys",
        "import",
        d.join("reader-keys.bundle").to_str().unwrap(),
    ]);
    assert!(
        text.contains("cardiology@hospital-a version 1 verified"),
        "{text}"
    );
}
