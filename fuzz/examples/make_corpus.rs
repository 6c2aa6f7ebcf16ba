//! Writes the binary seed corpora of the fuzz targets (valid headers, keys,
//! tokens, secrets and payloads) from a seeded RNG, so the output is the same
//! on every run. The policy seeds are hand-written text files and are not
//! touched.
//!
//! ```text
//! cargo run --release --example make_corpus -- corpus
//! ```

use std::{error::Error, fs, io::Write, path::Path};

use ark_std::rand::{SeedableRng, rngs::StdRng};
use mabe_abe::{
    AttributeSecretKey, EncryptOptions, Gid, Header, MIN_SEGMENT_SIZE, PublicKeyRing, Snapshot,
    UpdateToken, UserKeyRing, Version, encapsulate,
};
use mabe_fuzz::key_kind;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)?;
    Ok(())
}

fn with_kind(kind: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 1);
    out.push(kind);
    out.extend_from_slice(bytes);
    out
}

fn main() -> Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "corpus".to_owned());
    let out = Path::new(&out);
    let headers = out.join("header_decode");
    let keys = out.join("key_decode");
    let payloads = out.join("payload_decrypt");

    let mut rng = StdRng::seed_from_u64(0x6d61_6265_0000_0000);
    let names = [
        "doctor@hospital-a",
        "cardiology@hospital-a",
        "a@x",
        "b@y",
        "c@z",
    ];
    let mut sks = Vec::new();
    let mut ring = PublicKeyRing::new();
    for name in names {
        let sk = AttributeSecretKey::generate(name.parse()?, Version::FIRST, &mut rng);
        ring.insert(sk.public_key(&mut rng))?;
        sks.push(sk);
    }

    // Headers of 1 to 5 rows.
    let policies = [
        ("leaf-1-row", "doctor@hospital-a"),
        ("and-2-rows", "doctor@hospital-a AND cardiology@hospital-a"),
        ("or-and-3-rows", "(a@x OR b@y) AND c@z"),
        ("threshold-3-rows", "2 of (a@x, b@y, c@z)"),
        ("repeated-attribute-3-rows", "a@x OR (a@x AND b@y)"),
        (
            "mixed-5-rows",
            "(doctor@hospital-a AND cardiology@hospital-a) OR 2 of (a@x, b@y, c@z)",
        ),
    ];
    for (i, (name, text)) in policies.iter().enumerate() {
        let policy = mabe_policy::parse(text)?;
        // Alternate between the default and the smallest segment size.
        let options = if i % 2 == 0 {
            EncryptOptions::default()
        } else {
            EncryptOptions {
                segment_size: MIN_SEGMENT_SIZE,
            }
        };
        let (header, _key) = encapsulate(&policy, &ring, &options, &mut rng)?;
        write(&headers, &format!("{name}.bin"), &header.to_bytes())?;
    }

    // User keys, public keys and a secret key.
    let mut user = UserKeyRing::new(Gid::derive("big-register", "19012345601")?)?;
    for (sk, name) in sks.iter().zip(["doctor", "cardiology"]) {
        let key = sk.keygen(user.hashed_gid(), &mut rng);
        write(
            &keys,
            &format!("user-key-{name}.bin"),
            &with_kind(key_kind::USER_KEY, &key.to_bytes()),
        )?;
        let pk = ring.current(sk.attribute()).ok_or("public key")?;
        user.insert(key, pk)?;
        write(
            &keys,
            &format!("public-key-{name}.bin"),
            &with_kind(key_kind::PUBLIC_KEY, &pk.to_bytes()),
        )?;
    }
    write(
        &keys,
        "secret-key-a.bin",
        &with_kind(key_kind::SECRET_KEY, &sks[2].to_bytes()),
    )?;

    // A revocation of a@x in a header that has it twice: update secret,
    // tokens, the new public key and the updated header (rows at version 2).
    let policy = mabe_policy::parse("a@x OR (a@x AND b@y)")?;
    let (mut header, _key) = encapsulate(&policy, &ring, &EncryptOptions::default(), &mut rng)?;
    let a_x = sks[2].attribute().clone();
    let (new_sk, update_secret) = sks[2].rotate(&mut rng)?;
    write(
        &keys,
        "update-secret-a.bin",
        &with_kind(key_kind::UPDATE_SECRET, &update_secret.to_bytes()),
    )?;
    write(
        &keys,
        "public-key-a-v2.bin",
        &with_kind(
            key_kind::PUBLIC_KEY,
            &new_sk.public_key(&mut rng).to_bytes(),
        ),
    )?;
    let rows = header.snapshot_rows(&a_x, Version::FIRST);
    let mut snapshot = Snapshot::new(a_x, Version::FIRST);
    for row in &rows {
        snapshot.insert(*row)?;
    }
    let mut generator = update_secret.token_generator(snapshot, &mut rng)?;
    let tokens = rows
        .iter()
        .map(|row| generator.issue(row, &mut rng))
        .collect::<std::result::Result<Vec<UpdateToken>, _>>()?;
    for token in &tokens {
        write(
            &keys,
            &format!("update-token-a-row{}.bin", token.row()),
            &with_kind(key_kind::UPDATE_TOKEN, &token.to_bytes()),
        )?;
    }
    header.apply_tokens(&tokens)?;
    let bytes = header.to_bytes();
    Header::from_bytes(&bytes)?;
    write(&headers, "revoked-a-version-2.bin", &bytes)?;

    // Payloads under the fixed record key of `payload_decrypt`: empty, inside
    // one 1 KiB segment, exactly one segment, and two or three segments
    // (including an exact multiple of the segment size).
    let key = mabe_fuzz::payload_key();
    for len in [0usize, 1, 100, 1024, 1500, 2048, 2600] {
        let plain: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut encryptor = key.encryptor(Vec::new())?;
        encryptor.write_all(&plain)?;
        let ciphertext = encryptor.finish()?;
        write(&payloads, &format!("plain-{len}.bin"), &ciphertext)?;
    }
    Ok(())
}
