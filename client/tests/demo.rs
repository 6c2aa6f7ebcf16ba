//! The README's first command: `mabe demo` runs the whole scenario (proxy,
//! revocation at the proxy, break-glass) through the client library and
//! exits 0; `--keep DIR` leaves data that the real command-line tools accept.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{path::Path, process::Command};

use common::{MABE, Ran, authority_bin, proxy_bin};

/// A command with none of the environment that would point it elsewhere
/// (another key store, database or key-encryption key).
fn clean(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    for var in [
        "MABE_HOME",
        "MABE_PASSPHRASE",
        "MABE_KEK",
        "MABE_DATABASE_URL",
        "MABE_AUTHORITY_DIR",
        "MABE_PROXY_DIR",
        "MABE_PROXY_DATABASE_URL",
    ] {
        c.env_remove(var);
    }
    c
}

fn run(bin: &Path, args: &[&str]) -> Ran {
    Ran::from(clean(bin).args(args).output().unwrap())
}

fn demo(extra: &[&str]) -> Ran {
    let mut args = vec!["demo"];
    args.extend_from_slice(extra);
    run(Path::new(MABE), &args)
}

/// Some line of `out` contains every one of `parts`, in order.
fn has_line(out: &str, parts: &[&str]) -> bool {
    out.lines().any(|line| {
        let mut rest = line;
        parts.iter().all(|p| match rest.find(p) {
            Some(i) => {
                rest = &rest[i + p.len()..];
                true
            }
            None => false,
        })
    })
}

#[test]
fn demo_runs_the_whole_scenario_and_exits_zero() {
    let out = demo(&[]).ok("mabe demo");
    for line in [
        &[
            "Dr. Jansen (cardiologist, A)",
            "reads personal_report, vital_signs",
        ][..],
        &["R. Smit (researcher)", "reads research_extract"],
        &["E. Jansen (daughter)", "reads personal_report"],
        &["Dr. Visser (emergency physician, C)", "reads nothing"],
        &[
            "withheld research_extract: cannot decrypt: policy needs researcher@hospital-a",
            "(you hold cardiology@hospital-a, doctor@hospital-a)",
        ],
        &["proxy cloud-1: 1/1 row(s) updated with tokens"],
        &["the update secret is erased"],
        &[
            "1 header row now at cardiology v2",
            "payload bytes",
            "unchanged",
        ],
        &[
            "Dr. Jansen, before fetching keys",
            "withheld vital_signs: key for cardiology@hospital-a is version 1, record needs version 2",
        ],
        &["Dr. Jansen fetches keys: cardiology@hospital-a v2"],
        &["Dr. Jansen (cardiologist, A)", "reads vital_signs"],
        &[
            "Dr. de Vries, after fetching keys",
            "withheld vital_signs: key for cardiology@hospital-a is version 1, record needs version 2",
        ],
        &["hospital-c issues emergency@hospital-c v1", "expiring at"],
        &["Dr. Visser (emergency physician, C)", "reads vital_signs"],
        &["hospital-c's audit log", "break-glass by", "car accident"],
        &["patient-jansen", "checkpoint signed, chain verifies"],
        &["temporary directory, now removed"],
        &["Done: every expectation held"],
    ] {
        assert!(
            has_line(&out.stdout, line),
            "no line with {line:?} in:\n{}",
            out.stdout
        );
    }
}

#[test]
fn demo_keep_leaves_data_the_real_tools_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("demo");
    let dir = keep.to_str().unwrap();
    let out = demo(&["--keep", dir]).ok("mabe demo --keep");
    assert!(
        has_line(
            &out.stdout,
            &["mabe-authority --data-dir", "hospital-a audit verify"]
        ),
        "no example commands in:\n{}",
        out.stdout
    );

    // Complete data directories, as `init` makes them.
    for id in ["hospital-a", "hospital-b", "hospital-c", "patient-jansen"] {
        for f in [
            "authority-id",
            "kek.hex",
            "admin.key",
            "tls/cert.pem",
            "tls/key.pem",
            "authority.db",
        ] {
            assert!(keep.join(id).join(f).is_file(), "{id}/{f} missing");
        }
    }
    for f in ["proxy-id", "proxy.db", "tls/cert.pem", "tls/key.pem"] {
        assert!(
            keep.join("cloud-1").join(f).is_file(),
            "cloud-1/{f} missing"
        );
    }
    for who in [
        "records-a",
        "jansen",
        "devries",
        "bakker",
        "smit",
        "daughter",
        "visser",
    ] {
        for f in ["identity", "keys", "trust.toml"] {
            let p = keep.join("people").join(who).join(f);
            assert!(p.is_file(), "{} missing", p.display());
        }
    }
    assert!(keep.join("record.mabe.json").is_file());

    let a = keep.join("hospital-a");
    let verified = run(
        authority_bin(),
        &["--data-dir", a.to_str().unwrap(), "audit", "verify"],
    )
    .ok("mabe-authority audit verify");
    assert!(
        verified.stdout.contains("audit log verifies"),
        "{}",
        verified.stdout
    );

    let c = keep.join("hospital-c");
    let listed = run(
        authority_bin(),
        &[
            "--data-dir",
            c.to_str().unwrap(),
            "audit",
            "list",
            "--kind",
            "break-glass",
        ],
    )
    .ok("mabe-authority audit list");
    assert!(listed.stdout.contains("car accident"), "{}", listed.stdout);

    let cloud = keep.join("cloud-1");
    let records = run(
        proxy_bin(),
        &["--data-dir", cloud.to_str().unwrap(), "records", "list"],
    )
    .ok("mabe-proxy records list");
    assert_eq!(records.stdout.lines().count(), 3, "{}", records.stdout);
    assert!(
        records.stdout.contains("cardiology@hospital-a v2"),
        "{}",
        records.stdout
    );

    let home = |who: &str| keep.join("people").join(who);
    let keys = run(
        Path::new(MABE),
        &["--home", home("jansen").to_str().unwrap(), "keys", "list"],
    )
    .ok("mabe keys list");
    for k in [
        "cardiology@hospital-a version 2",
        "doctor@hospital-a version 1",
    ] {
        assert!(keys.stdout.contains(k), "{k} missing in:\n{}", keys.stdout);
    }

    // The record as the proxy holds it after the revocation, read offline.
    let record = keep.join("record.mabe.json");
    let read = |who: &str| {
        let out = run(
            Path::new(MABE),
            &[
                "--home",
                home(who).to_str().unwrap(),
                "--offline",
                "decrypt-json",
                "--in",
                record.to_str().unwrap(),
            ],
        )
        .ok("mabe decrypt-json");
        serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()
    };
    let jansen = read("jansen");
    assert_eq!(jansen["sections"]["vital_signs"]["ecg"], "sinus rhythm");
    let devries = read("devries");
    assert!(devries["sections"].get("vital_signs").is_none());
    assert!(
        devries["withheld"]["vital_signs"]
            .as_str()
            .unwrap()
            .contains("key for cardiology@hospital-a is version 1, record needs version 2"),
        "{devries}"
    );

    // A second demo never mixes its data into the first one's.
    demo(&["--keep", dir]).fails_with(1, "is not empty");
}
