//! The independent decryptor (`interop-tests/python/mabe_decrypt.py`, py_ecc)
//! against records and key exports made by the real binaries: it must give
//! back the plaintext byte for byte, and refuse a key set that does not
//! satisfy the policy and a record with one flipped bit in a row that the
//! reader does not even use (only the re-encryption check of every row sees
//! that). It proves that docs/FORMAT.md is enough to read our records and
//! that py_ecc's pairing agrees with ours up to the normalization of §7.
//!
//! The Python interpreter is `MABE_PYTHON` (scripts/test-all makes a venv
//! with the pinned packages), else `python3`; without py_ecc this FAILS.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Instant,
};

use mabe_interop_tests::{Authority, bin, workspace_root};

/// The Python that runs the decryptor; panics (never skips) without py_ecc.
fn python() -> PathBuf {
    let py = std::env::var_os("MABE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"));
    let probe = Command::new(&py)
        .args(["-c", "import py_ecc, cryptography"])
        .output();
    match probe {
        Ok(o) if o.status.success() => py,
        other => panic!(
            "{} cannot import py_ecc and cryptography ({}): run scripts/test-all, which makes \
             target/pyenv with the pinned packages of interop-tests/python/requirements.txt, or \
             set MABE_PYTHON to a python that has them",
            py.display(),
            match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
                    .to_owned(),
                Err(e) => e.to_string(),
            }
        ),
    }
}

/// Run the decryptor; (output, seconds).
fn py_decrypt(inspect: &Path, record: &Path, keys: &Path) -> (Output, f64) {
    let script = workspace_root().join("interop-tests/python/mabe_decrypt.py");
    let started = Instant::now();
    let out = Command::new(python())
        .arg(script)
        .arg("--inspect")
        .arg(inspect)
        .arg("--record")
        .arg(record)
        .arg("--keys")
        .arg(keys)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "python decryptor: {} in {secs:.1} s; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    (out, secs)
}

fn assert_decrypts(inspect: &Path, record: &Path, keys: &Path, plain: &[u8]) {
    let (out, _) = py_decrypt(inspect, record, keys);
    assert!(
        out.status.success(),
        "the Python decryptor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == plain,
        "the Python decryptor's plaintext differs"
    );
}

fn assert_refused(inspect: &Path, record: &Path, keys: &Path, needle: &str) {
    let (out, _) = py_decrypt(inspect, record, keys);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the Python decryptor accepted it");
    assert!(out.stdout.is_empty(), "plaintext written on failure");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

/// A `mabe` key store in a temporary home.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        Home {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A copy of `src` (e.g. a golden home), so nothing writes to the source.
    fn copy_of(src: &Path) -> Home {
        let h = Home::new();
        copy_dir(src, h.dir.path());
        h
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(bin("mabe"))
            .arg("--home")
            .arg(self.dir.path())
            .args(args)
            .env_remove("MABE_HOME")
            .env_remove("MABE_PASSPHRASE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "mabe {args:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `identity new` in `big-register`; (GID, request key), both hex.
    fn identity(&self, subject: &str) -> (String, String) {
        let out = self.ok(&[
            "identity",
            "new",
            "--registry",
            "big-register",
            "--subject",
            subject,
        ]);
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {out}"))
                .trim()
                .to_owned()
        };
        (field("GID:"), field("request key:"))
    }

    fn trust(&self, a: &Authority) {
        let port = a.served.as_ref().expect("serving").public;
        self.ok(&[
            "trust",
            "add",
            "--id",
            &a.id,
            "--endpoint",
            &format!("https://localhost:{port}"),
            "--identity-key",
            &a.identity_key,
            "--tls-root",
            a.dir.join("tls/cert.pem").to_str().unwrap(),
        ]);
    }

    /// `mabe inspect --json RECORD` into a file next to it.
    fn inspect(&self, record: &Path) -> PathBuf {
        let json = record.with_extension("inspect.json");
        let text = self.ok(&["inspect", "--json", record.to_str().unwrap()]);
        fs::write(&json, text).unwrap();
        json
    }

    /// `mabe keys export --out FILE` (with extra global options first).
    fn export(&self, global: &[&str]) -> PathBuf {
        let file = self.path("keys-export.json");
        let mut args = global.to_vec();
        args.extend(["keys", "export", "--out", file.to_str().unwrap()]);
        self.ok(&args);
        file
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            fs::copy(e.path(), &to).unwrap();
        }
    }
}

/// A person enrolled at `auths` who trusts them; their GID.
fn person(home: &Home, subject: &str, auths: &[&Authority]) -> String {
    let (gid, key) = home.identity(subject);
    for a in auths {
        home.trust(a);
        a.ok(&[
            "enroll",
            "--registry",
            "big-register",
            "--subject",
            subject,
            "--request-key",
            &key,
        ])
        .unwrap();
    }
    gid
}

fn grant(a: &Authority, gid: &str, attr: &str) {
    a.ok(&["grant", "--gid", gid, "--attr", attr]).unwrap();
}

/// Two hospitals over SQLite; a record under a five-row policy with an OR,
/// an AND and a `2 of`, in three STREAM segments.
#[test]
fn python_decrypts_what_mabe_wrote() {
    python(); // fail early, before starting anything, if py_ecc is missing
    let root = tempfile::tempdir().unwrap();
    let mut a = Authority::init(root.path(), "hospital-a", None).unwrap();
    let mut b = Authority::init(root.path(), "hospital-b", None).unwrap();
    for attr in ["cardiology", "nurse", "emergency"] {
        a.ok(&["attribute", "create", attr]).unwrap();
    }
    for attr in ["consultant", "emergency"] {
        b.ok(&["attribute", "create", attr]).unwrap();
    }
    a.serve(&[]).unwrap();
    b.serve(&[]).unwrap();

    let writer = Home::new();
    person(&writer, "writer", &[&a, &b]);
    let reader = Home::new();
    let reader_gid = person(&reader, "reader", &[&a, &b]);
    grant(&a, &reader_gid, "cardiology");
    grant(&b, &reader_gid, "consultant");
    grant(&b, &reader_gid, "emergency");
    // Mallory holds two of the attributes, which is not enough.
    let mallory = Home::new();
    let mallory_gid = person(&mallory, "mallory", &[&a, &b]);
    grant(&a, &mallory_gid, "cardiology");
    grant(&b, &mallory_gid, "consultant");
    reader.ok(&["keys", "fetch"]);
    mallory.ok(&["keys", "fetch"]);

    // Rows: 0 cardiology@a, 1 nurse@a, 2 consultant@b, 3 emergency@a,
    // 4 emergency@b. The reader uses rows 0, 2 and 4 (a Lagrange
    // coefficient of -1 among them); rows 1 and 3 only meet the FO check.
    let policy = "(cardiology@hospital-a OR nurse@hospital-a) AND \
                  2 of (consultant@hospital-b, emergency@hospital-a, emergency@hospital-b)";
    // Three STREAM segments of the default 64 KiB (the last one partial).
    let plain: Vec<u8> = (0..150_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let input = writer.path("plain.bin");
    fs::write(&input, &plain).unwrap();
    let record = writer.path("record.mabe");
    writer.ok(&[
        "encrypt",
        "--policy",
        policy,
        "--in",
        input.to_str().unwrap(),
        "--out",
        record.to_str().unwrap(),
    ]);
    let inspect = writer.inspect(&record);
    let json = read_json(&inspect);
    assert!(json["payload_offset"].is_u64(), "{json}");
    assert_eq!(json["payload_segments"], 3);
    let keys = reader.export(&[]);
    let export = read_json(&keys);
    assert_eq!(export["format"], "mabe-key-export-v1");
    assert_eq!(export["gid"], reader_gid.as_str());
    assert_eq!(export["keys"].as_array().unwrap().len(), 3, "{export}");

    assert_decrypts(&inspect, &record, &keys, &plain);

    // (a) keys that do not satisfy the policy: refused, nothing written.
    let mallory_keys = mallory.export(&[]);
    assert_refused(
        &inspect,
        &record,
        &mallory_keys,
        "do not satisfy the policy",
    );

    // (b) one bit flipped in C3 of row 1 (nurse@hospital-a, a row the reader
    // does not use): the sign flag of the compressed point, so the header
    // still decodes (mabe inspect accepts it) and the signature still
    // verifies (it does not cover C3); only the FO check of every row sees it.
    let c3 = hex::decode(json["header"]["rows"][1]["c3"].as_str().unwrap()).unwrap();
    let mut bytes = fs::read(&record).unwrap();
    let at = find(&bytes, &c3).expect("C3 of row 1 in the record");
    bytes[at] ^= 0x20;
    let tampered = writer.path("tampered.mabe");
    fs::write(&tampered, &bytes).unwrap();
    let tampered_inspect = writer.inspect(&tampered);
    assert_eq!(read_json(&tampered_inspect)["signature_check"], "valid");
    assert_refused(&tampered_inspect, &tampered, &keys, "cannot decrypt");
    // The real decryptor refuses it too.
    let out = reader.run(&["decrypt", "--in", tampered.to_str().unwrap()]);
    assert!(!out.status.success() && out.stdout.is_empty());
}

/// The golden record-2 (written by an earlier version, `2 of` three
/// authorities) with a key export from a copy of the golden reader home.
#[test]
fn python_decrypts_the_golden_record() {
    python();
    let golden = workspace_root().join("client/tests/data/golden");
    let reader = Home::copy_of(&golden.join("reader-home"));
    let keys = reader.export(&["--offline"]);
    let record = reader.path("record-2.mabe");
    fs::copy(golden.join("record-2.mabe"), &record).unwrap();
    let inspect = reader.inspect(&record);
    let plain = fs::read(golden.join("record-2.txt")).unwrap();
    assert_decrypts(&inspect, &record, &keys, &plain);
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
