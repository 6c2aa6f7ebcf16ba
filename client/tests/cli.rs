//! `mabe` end to end against real `mabe-authority` processes on loopback
//! (SQLite, TLS with the dev certificates `init` makes).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Authority, Person};

struct World {
    a: Authority,
    b: Authority,
    c: Authority,
}

fn world() -> World {
    let mut a = Authority::init("hospital-a", &["cardiology", "emergency"]);
    let mut b = Authority::init("hospital-b", &["consultant", "emergency"]);
    let mut c = Authority::init("hospital-c", &["genetics", "family", "researcher"]);
    a.serve();
    b.serve();
    c.serve();
    World { a, b, c }
}

/// A person who trusts all three authorities and is enrolled at each.
fn person(w: &World, name: &str) -> (Person, String) {
    let p = Person::new(name);
    let (gid, key) = p.identity("big-register", name);
    for auth in [&w.a, &w.b, &w.c] {
        p.trust(auth);
        auth.enroll("big-register", name, &key);
    }
    (p, gid)
}

fn write(p: &Person, name: &str, bytes: &[u8]) -> String {
    let path = p.path(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn three_hospitals_end_to_end() {
    let w = world();
    let (alice, alice_gid) = person(&w, "alice");
    let (bob, bob_gid) = person(&w, "bob");
    let (carol, carol_gid) = person(&w, "carol");
    w.a.grant(&alice_gid, "cardiology");
    w.b.grant(&alice_gid, "consultant");
    w.c.grant(&alice_gid, "genetics");
    w.a.grant(&bob_gid, "cardiology");
    w.b.grant(&bob_gid, "consultant");
    w.c.grant(&carol_gid, "genetics");

    // Fetch: every key verified before it is stored.
    let fetched = alice.ok(&["keys", "fetch"]);
    for k in [
        "cardiology@hospital-a version 1 verified and stored",
        "consultant@hospital-b version 1 verified and stored",
        "genetics@hospital-c version 1 verified and stored",
    ] {
        assert!(fetched.contains(k), "{fetched}");
    }
    bob.ok(&["keys", "fetch"]);
    carol.ok(&["keys", "fetch"]);
    let listed = alice.ok(&["keys", "list"]);
    assert!(listed.contains(&alice_gid) && listed.contains("genetics@hospital-c version 1"));

    // A record needing all three authorities: Alice (one GID) reads it.
    let policy = "cardiology@hospital-a AND consultant@hospital-b AND genetics@hospital-c";
    let plain: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let input = write(&alice, "plain.bin", &plain);
    let rec = alice.path("record.mabe");
    let rec = rec.to_str().unwrap();
    alice.ok(&["encrypt", "--policy", policy, "--in", &input, "--out", rec]);
    let out = alice.path("back.bin");
    let ran = alice
        .run(&["decrypt", "--in", rec, "--out", out.to_str().unwrap()])
        .ok("alice decrypt");
    assert!(ran.stderr.contains("verified writer"), "{}", ran.stderr);
    assert!(ran.stderr.contains(&alice_gid), "{}", ran.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), plain);

    // Stdin and stdout with -.
    let piped = alice
        .cmd()
        .args(["decrypt", "--in", "-", "--out", "-"])
        .stdin(std::fs::File::open(rec).unwrap())
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert_eq!(piped.stdout, plain);

    // The same keys split across two GIDs: Bob (A, B) and Carol (C) each fail.
    let bob_out = bob.path("x.bin");
    bob.run(&["decrypt", "--in", rec, "--out", bob_out.to_str().unwrap()])
        .fails_with(
            3,
            "cannot decrypt: policy needs genetics@hospital-c (you hold cardiology@hospital-a, consultant@hospital-b)",
        );
    assert!(
        !bob_out.exists(),
        "nothing may be left under the final name"
    );
    carol
        .run(&["decrypt", "--in", rec, "--out", "-"])
        .fails_with(3, "cannot decrypt: policy needs");
    // Carol's key cannot be smuggled into Bob's store either.
    w.c.ok(&[
        "issue",
        "--gid",
        &carol_gid,
        "--out",
        carol.path("carol.bundle").to_str().unwrap(),
    ]);
    bob.run(&[
        "keys",
        "import",
        carol.path("carol.bundle").to_str().unwrap(),
    ])
    .fails_with(5, "issued to another person");

    // policy check: canonical form, authorities, what is missing.
    let checked = bob.run(&[
        "policy",
        "check",
        "genetics@Hospital-C and (cardiology@hospital-a or consultant@hospital-b)",
    ]);
    assert_eq!(checked.code, Some(3));
    assert!(checked.stdout.contains(
        "canonical: genetics@hospital-c AND (cardiology@hospital-a OR consultant@hospital-b)"
    ));
    assert!(checked.stdout.contains("authority: hospital-c"));
    assert!(
        checked.stdout.contains("missing genetics@hospital-c"),
        "{}",
        checked.stdout
    );
    let checked = alice.ok(&["policy", "check", policy]);
    assert!(checked.contains("satisfied by your keys: yes"), "{checked}");

    // inspect: every header field, group elements in hex.
    let json = alice.ok(&["inspect", "--json", rec]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["header"]["policy"], policy);
    assert_eq!(v["header"]["rows"].as_array().unwrap().len(), 3);
    assert_eq!(v["header"]["rows"][0]["c1"].as_str().unwrap().len(), 1152);
    assert_eq!(v["signer"]["gid"], alice_gid.as_str());
    assert_eq!(v["signature_check"], "valid");
    assert!(alice.ok(&["inspect", rec]).contains("row 2"));

    // Tampering: a payload byte (cannot decrypt) and the signature (signature
    // problem); nothing is left under the output name either way.
    let bytes = std::fs::read(rec).unwrap();
    let mut bad = bytes.clone();
    let n = bad.len();
    bad[n - 1000] ^= 1;
    let bad_path = write(&alice, "bad.mabe", &bad);
    let bad_out = alice.path("bad.out");
    alice
        .run(&[
            "decrypt",
            "--in",
            &bad_path,
            "--out",
            bad_out.to_str().unwrap(),
        ])
        .fails_with(3, "cannot decrypt");
    assert!(!bad_out.exists());
    let mut bad = bytes.clone();
    bad[n - 1] ^= 1;
    let bad_path = write(&alice, "badsig.mabe", &bad);
    alice
        .run(&[
            "decrypt",
            "--in",
            &bad_path,
            "--out",
            bad_out.to_str().unwrap(),
        ])
        .fails_with(4, "signature does not verify");
    assert!(!bad_out.exists());
    alice
        .run(&[
            "decrypt",
            "--allow-bad-signature",
            "--in",
            &bad_path,
            "--out",
            bad_out.to_str().unwrap(),
        ])
        .ok("allow bad signature");
    assert_eq!(std::fs::read(&bad_out).unwrap(), plain);
    // Unsigned records are refused unless allowed.
    let unsigned = alice.path("unsigned.mabe");
    alice.ok(&[
        "encrypt",
        "--no-sign",
        "--policy",
        policy,
        "--in",
        &input,
        "--out",
        unsigned.to_str().unwrap(),
    ]);
    let refused = alice
        .run(&["decrypt", "--in", unsigned.to_str().unwrap(), "--out", "-"])
        .fails_with(4, "not signed");
    // Refused before any plaintext is written, even to stdout.
    assert!(refused.stdout.is_empty(), "{}", refused.stdout);
    alice.ok(&[
        "decrypt",
        "--allow-unsigned",
        "--in",
        unsigned.to_str().unwrap(),
        "--out",
        bad_out.to_str().unwrap(),
    ]);

    // Requests: Carol asks for researcher@hospital-c, the admin approves.
    let asked = carol.ok(&[
        "keys",
        "request",
        "--authority",
        "hospital-c",
        "--attr",
        "researcher",
        "--reason",
        "study 42",
    ]);
    let id = asked
        .split_whitespace()
        .find_map(|t| t.strip_prefix('#'))
        .unwrap()
        .to_owned();
    w.c.ok(&["approve", &id]);
    assert!(
        carol
            .ok(&["keys", "fetch", "--authority", "hospital-c"])
            .contains("researcher@hospital-c version 1")
    );

    // Field-level JSON: three readers, three different subsets.
    w.c.grant(&bob_gid, "family");
    bob.ok(&["keys", "fetch"]);
    let sections = write(
        &alice,
        "sections.toml",
        b"[sections]\nvital_signs = \"cardiology@hospital-a\"\npersonal_report = \"family@hospital-c\"\nresearch = \"researcher@hospital-c\"\n",
    );
    let record = write(
        &alice,
        "record.json",
        br#"{"vital_signs": {"bp": "120/80", "pulse": 64}, "personal_report": "recovering well", "research": {"age_band": "60-69"}}"#,
    );
    let enc_json = alice.path("record.mabe.json");
    alice.ok(&[
        "encrypt-json",
        "--policies",
        &sections,
        "--in",
        &record,
        "--out",
        enc_json.to_str().unwrap(),
    ]);
    let encrypted = std::fs::read_to_string(&enc_json).unwrap();
    assert!(!encrypted.contains("recovering well") && !encrypted.contains("120/80"));
    let view = |p: &Person| -> serde_json::Value {
        serde_json::from_str(&p.ok(&["decrypt-json", "--in", enc_json.to_str().unwrap()])).unwrap()
    };
    let keys_of = |v: &serde_json::Value, field: &str| -> Vec<String> {
        let mut k: Vec<String> = v[field].as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let (va, vb, vc) = (view(&alice), view(&bob), view(&carol));
    assert_eq!(keys_of(&va, "sections"), ["vital_signs"]);
    assert_eq!(keys_of(&vb, "sections"), ["personal_report", "vital_signs"]);
    assert_eq!(keys_of(&vc, "sections"), ["research"]);
    assert_eq!(vb["sections"]["personal_report"], "recovering well");
    assert_eq!(vc["sections"]["research"]["age_band"], "60-69");
    assert!(
        va["withheld"]["research"]
            .as_str()
            .unwrap()
            .contains("policy needs researcher@hospital-c"),
        "{va}"
    );
    // A section without a policy is refused, not left in the clear.
    let extra = write(
        &alice,
        "extra.json",
        br#"{"vital_signs": 1, "diary": "secret"}"#,
    );
    alice
        .run(&[
            "encrypt-json",
            "--policies",
            &sections,
            "--in",
            &extra,
            "--out",
            "-",
        ])
        .fails_with(1, "section \"diary\" of the record has no policy");

    // EMERGENCY expands from the trust file's consortium list.
    alice
        .run(&["policy", "check", "cardiology@hospital-a OR EMERGENCY"])
        .fails_with(1, "lists no emergency attributes");
    alice.ok(&[
        "trust",
        "emergency",
        "emergency@hospital-a",
        "emergency@hospital-b",
    ]);
    let checked = alice.ok(&["policy", "check", "cardiology@hospital-a OR EMERGENCY"]);
    assert!(
        checked.contains(
            "canonical: cardiology@hospital-a OR 1 of (emergency@hospital-a, emergency@hospital-b)"
        ),
        "{checked}"
    );
    let (er, er_gid) = person(&w, "er-nurse");
    w.b.grant(&er_gid, "emergency");
    er.ok(&["keys", "fetch"]);
    let er_rec = alice.path("er.mabe");
    alice.ok(&[
        "encrypt",
        "--policy",
        "cardiology@hospital-a OR EMERGENCY",
        "--in",
        &input,
        "--out",
        er_rec.to_str().unwrap(),
    ]);
    let got = er
        .cmd()
        .args(["decrypt", "--in", er_rec.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(got.stdout, plain);

    // Revocation: Bob loses cardiology; A rotates it to version 2.
    let single = "cardiology@hospital-a";
    let old_rec = alice.path("old.mabe");
    alice.ok(&[
        "encrypt",
        "--policy",
        single,
        "--in",
        &input,
        "--out",
        old_rec.to_str().unwrap(),
    ]);
    w.a.ok(&["revoke", "--gid", &bob_gid, "--attr", "cardiology"]);
    assert!(
        alice
            .ok(&["keys", "fetch"])
            .contains("cardiology@hospital-a version 2")
    );
    let new_rec = alice.path("new.mabe");
    alice.ok(&[
        "encrypt",
        "--policy",
        single,
        "--in",
        &input,
        "--out",
        new_rec.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&alice.ok(&["inspect", "--json", new_rec.to_str().unwrap()])).unwrap();
    assert_eq!(
        v["header"]["rows"][0]["version"], 2,
        "encryption must use the current version"
    );
    bob.ok(&["keys", "fetch"]);
    bob.run(&["decrypt", "--in", new_rec.to_str().unwrap(), "--out", "-"])
        .fails_with(
            3,
            "key for cardiology@hospital-a is version 1, record needs version 2: run `mabe keys fetch`",
        );
    // Alice still reads the record made before the rotation (not yet updated
    // by a record store) and the new one.
    alice.ok(&["decrypt", "--in", old_rec.to_str().unwrap(), "--out", "-"]);
    alice.ok(&["decrypt", "--in", new_rec.to_str().unwrap(), "--out", "-"]);

    // A person who does not trust hospital-c.
    let dave = Person::new("dave");
    let (_, dave_key) = dave.identity("big-register", "dave");
    dave.trust(&w.a);
    w.a.enroll("big-register", "dave", &dave_key);
    dave.run(&["decrypt", "--in", rec, "--out", "-"])
        .fails_with(5, "authority hospital-b is not in your trust file");
    dave.run(&["encrypt", "--policy", policy, "--in", &input, "--out", "-"])
        .fails_with(5, "authority hospital-b is not in your trust file");

    // --help lists every capability and the exit codes.
    let help = alice.ok(&["--help"]);
    for cmd in [
        "identity",
        "trust",
        "keys",
        "encrypt",
        "decrypt",
        "encrypt-json",
        "decrypt-json",
        "policy",
        "inspect",
        "Exit codes",
    ] {
        assert!(help.contains(cmd), "{cmd} missing from --help");
    }
}

#[test]
fn tampered_directories_impostor_keys_and_untrusted_authorities_are_refused() {
    let mut a = Authority::init("hospital-a", &["cardiology"]);
    a.serve();
    let p = Person::new("erin");
    let (gid, key) = p.identity("big-register", "erin");
    p.trust(&a);
    a.enroll("big-register", "erin", &key);
    a.grant(&gid, "cardiology");
    p.ok(&["keys", "fetch"]);

    // An impostor with the same id but another identity key issues a key
    // for the same person and attribute: it fails the pairing check against
    // the real, pinned directory.
    let imp = Authority::init("hospital-a", &["cardiology"]);
    imp.enroll("big-register", "erin", &key);
    imp.grant(&gid, "cardiology");
    let bundle = p.path("impostor.bundle");
    imp.ok(&["issue", "--gid", &gid, "--out", bundle.to_str().unwrap()]);
    // The bundle carries the impostor's directory, whose signature does not
    // verify with the pinned identity key.
    p.run(&["keys", "import", bundle.to_str().unwrap()])
        .fails_with(5, "directory of hospital-a refused");
    // Without that directory, the key is checked against the real, pinned
    // one and fails the pairing check.
    let decoded = mabe_proto::bundle::decode(&std::fs::read(&bundle).unwrap()).unwrap();
    let keys: Vec<Vec<u8>> = decoded.keys.iter().map(|k| k.to_vec()).collect();
    let bare = p.path("impostor-bare.bundle");
    std::fs::write(
        &bare,
        mabe_proto::bundle::encode(&decoded.authority, b"", &keys).as_slice(),
    )
    .unwrap();
    p.run(&["keys", "import", bare.to_str().unwrap()])
        .fails_with(5, "key from hospital-a refused");
    // A bundle from an authority not in the trust file.
    let x = Authority::init("hospital-x", &["cardiology"]);
    x.enroll("big-register", "erin", &key);
    x.grant(&gid, "cardiology");
    let xb = p.path("x.bundle");
    x.ok(&["issue", "--gid", &gid, "--out", xb.to_str().unwrap()]);
    p.run(&["keys", "import", xb.to_str().unwrap()])
        .fails_with(5, "authority hospital-x is not in your trust file");
    // The genuine bundle imports (verified against the fetched directory).
    let real = p.path("real.bundle");
    a.ok(&["issue", "--gid", &gid, "--out", real.to_str().unwrap()]);
    assert!(
        p.ok(&["keys", "import", real.to_str().unwrap()])
            .contains("cardiology@hospital-a version 1 verified")
    );

    // A tampered entry in the stored directory: refused, offline and online
    // (the stored copy is verified again whenever it is read).
    let input = p.path("in.txt");
    std::fs::write(&input, b"hello").unwrap();
    let sdir = p.path("directories/hospital-a.sdir");
    let mut bytes = std::fs::read(&sdir).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0x10; // inside the last entry's public key
    std::fs::write(&sdir, &bytes).unwrap();
    p.run(&[
        "--offline",
        "encrypt",
        "--policy",
        "cardiology@hospital-a",
        "--in",
        input.to_str().unwrap(),
        "--out",
        "-",
    ])
    .fails_with(
        5,
        "directory of hospital-a refused: signature does not verify",
    );
    // A trust file pinning the wrong identity key refuses the live directory.
    let q = Person::new("frank");
    q.identity("big-register", "frank");
    q.ok(&[
        "trust",
        "add",
        "--id",
        "hospital-a",
        "--endpoint",
        &format!("https://localhost:{}", a.port.unwrap()),
        "--identity-key",
        &imp.identity_key,
        "--tls-root",
        a.dir.join("tls/cert.pem").to_str().unwrap(),
    ]);
    q.run(&[
        "encrypt",
        "--policy",
        "cardiology@hospital-a",
        "--in",
        input.to_str().unwrap(),
        "--out",
        "-",
    ])
    .fails_with(5, "signature does not verify with the pinned identity key");
    // TLS: the impostor's certificate is not the pinned root.
    let r = Person::new("gina");
    r.identity("big-register", "gina");
    r.ok(&[
        "trust",
        "add",
        "--id",
        "hospital-a",
        "--endpoint",
        &format!("https://localhost:{}", a.port.unwrap()),
        "--identity-key",
        &a.identity_key,
        "--tls-root",
        imp.dir.join("tls/cert.pem").to_str().unwrap(),
    ]);
    r.run(&["keys", "fetch"])
        .fails_with(6, "cannot reach authority hospital-a");
}

#[test]
fn a_passphrase_protects_the_key_store() {
    let p = Person::new("henk");
    let ran = p
        .cmd()
        .args([
            "identity",
            "new",
            "--registry",
            "big-register",
            "--subject",
            "henk",
            "--passphrase",
        ])
        .env("MABE_PASSPHRASE", "correct horse battery")
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in ["identity", "keys"] {
            let mode = std::fs::metadata(p.path(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{f} must be private");
        }
    }
    // The public part needs no passphrase; the keys do.
    assert!(p.ok(&["identity", "show"]).contains("protected: yes"));
    p.run(&["keys", "list"])
        .fails_with(1, "protected by a passphrase");
    let wrong = p
        .cmd()
        .args(["keys", "list"])
        .env("MABE_PASSPHRASE", "wrong")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("wrong passphrase"));
    let right = p
        .cmd()
        .args(["keys", "list"])
        .env("MABE_PASSPHRASE", "correct horse battery")
        .output()
        .unwrap();
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    // No secret in the files in the clear: the seed is sealed.
    let id = std::fs::read(p.path("identity")).unwrap();
    assert!(id.len() > 100);
    p.run(&[
        "identity",
        "new",
        "--registry",
        "big-register",
        "--subject",
        "henk",
    ])
    .fails_with(1, "already exists");
}
