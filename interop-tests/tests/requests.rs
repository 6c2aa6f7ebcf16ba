//! Scenario: a patient's record shared through requests and a personal
//! authority, with the real `mabe-authority` and `mabe` processes, with
//! hospital A on SQLite and on PostgreSQL (the patient's personal authority
//! is always the embedded SQLite default, as on a phone).
//!
//! - A researcher asks hospital A for `researcher@hospital-a` with a reason
//!   (`mabe keys request`); A's admin approves it against the running node
//!   (`mabe-authority --remote … approve`); a second request is denied.
//! - A daughter asks the patient's personal authority for
//!   `family@patient-jansen`; the patient approves it on the phone, then,
//!   offline, issues her a key bundle that she imports with nothing but the
//!   authority's pinned identity key (the bundle carries the signed
//!   directory).
//! - Hospital A's records system, which cannot reach the phone, imports the
//!   personal authority's exported directory and encrypts a JSON record
//!   section by section; the cardiologist, the daughter and the researcher
//!   each see exactly their sections, and are told why the others are
//!   withheld.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use mabe_interop_tests::{Authority, Backend, User};

fn keys_of(v: &serde_json::Value, field: &str) -> BTreeSet<String> {
    v[field]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// The request id from `mabe keys request` ("request #N for …").
fn request_id(out: &str) -> String {
    out.split_once('#')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no request id in {out:?}"))
        .to_owned()
}

async fn shared_by_request(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = Authority::init(
        tmp.path(),
        "hospital-a",
        backend.database_url("mabe_req_auth").await.unwrap(),
    )
    .unwrap();
    for attr in ["cardiology", "researcher"] {
        a.ok(&["attribute", "create", attr]).unwrap();
    }
    a.serve(&[]).unwrap();
    let mut phone = Authority::init(tmp.path(), "patient-jansen", None).unwrap();
    phone.ok(&["attribute", "create", "family"]).unwrap();
    phone.serve(&[]).unwrap();

    let cardiologist = User::new(tmp.path(), "cardiologist", "19012345601").unwrap();
    let researcher = User::new(tmp.path(), "researcher", "19012345602").unwrap();
    let other = User::new(tmp.path(), "other-researcher", "19012345603").unwrap();
    let daughter = User::new(tmp.path(), "daughter", "daughter-of-jansen").unwrap();
    let writer = User::new(tmp.path(), "records-a", "hospital-a-records").unwrap();
    for u in [&cardiologist, &researcher, &other, &daughter, &writer] {
        u.trust(&a).unwrap();
        u.trust(&phone).unwrap();
    }
    for u in [&cardiologist, &researcher, &other] {
        a.enroll_user(u, &[]).unwrap();
    }
    phone.enroll_user(&daughter, &[]).unwrap();
    a.grant_user(&cardiologist, "cardiology").unwrap();
    cardiologist
        .ok(&["keys", "fetch", "--authority", "hospital-a"])
        .unwrap();

    // The researcher asks; hospital A's admin approves on the running node.
    let asked = researcher
        .ok(&[
            "keys",
            "request",
            "--authority",
            "hospital-a",
            "--attr",
            "researcher",
            "--reason",
            "cohort study 2026-17 on post-surgery recovery",
        ])
        .unwrap();
    let id = request_id(&asked);
    let denied_id = request_id(
        &other
            .ok(&[
                "keys",
                "request",
                "--authority",
                "hospital-a",
                "--attr",
                "researcher",
                "--reason",
                "curiosity",
            ])
            .unwrap(),
    );
    let admin = format!("https://localhost:{}", a.served.as_ref().unwrap().admin);
    let pending = a
        .ok(&["--remote", &admin, "requests", "--state", "pending"])
        .unwrap();
    assert!(
        pending.contains("cohort study 2026-17") && pending.contains("curiosity"),
        "{pending}"
    );
    a.ok(&["--remote", &admin, "approve", &id, "--note", "IRB ok"])
        .unwrap();
    a.ok(&["--remote", &admin, "deny", &denied_id, "--note", "no study"])
        .unwrap();
    let fetched = researcher
        .ok(&["keys", "fetch", "--authority", "hospital-a"])
        .unwrap();
    assert!(
        fetched.contains("researcher@hospital-a version 1 verified and stored"),
        "{fetched}"
    );
    let fetched = other
        .ok(&["keys", "fetch", "--authority", "hospital-a"])
        .unwrap();
    assert!(fetched.contains("no keys granted"), "{fetched}");

    // The daughter asks the patient's personal authority; the patient
    // approves on the phone, which then goes offline.
    let asked = daughter
        .ok(&[
            "keys",
            "request",
            "--authority",
            "patient-jansen",
            "--attr",
            "family",
            "--reason",
            "I am her daughter and look after her at home",
        ])
        .unwrap();
    let family_id = request_id(&asked);
    let pending = phone.ok(&["requests", "--state", "pending"]).unwrap();
    assert!(pending.contains("look after her at home"), "{pending}");
    phone.ok(&["approve", &family_id]).unwrap();
    phone.served.take().unwrap().stop().unwrap();
    let bundle = tmp.path().join("daughter.keys");
    phone
        .ok(&[
            "--directory-validity",
            "604800",
            "issue",
            "--gid",
            &daughter.gid,
            "--out",
            &bundle.to_string_lossy(),
        ])
        .unwrap();
    let imported = daughter
        .ok(&["--offline", "keys", "import", &bundle.to_string_lossy()])
        .unwrap();
    assert!(
        imported.contains("family@patient-jansen version 1 verified and stored"),
        "{imported}"
    );
    // A bundle for someone else does not import into her store.
    let wrong = tmp.path().join("wrong.keys");
    phone.enroll_user(&researcher, &[]).unwrap();
    phone.grant_user(&researcher, "family").unwrap();
    phone
        .ok(&[
            "issue",
            "--gid",
            &researcher.gid,
            "--out",
            &wrong.to_string_lossy(),
        ])
        .unwrap();
    daughter
        .run(&["--offline", "keys", "import", &wrong.to_string_lossy()])
        .unwrap()
        .fails_with(5, "refused")
        .unwrap();

    // The records system gets the phone's directory as a file.
    let directory = tmp.path().join("patient-jansen.sdir");
    phone
        .ok(&[
            "--directory-validity",
            "604800",
            "directory",
            "export",
            "--out",
            &directory.to_string_lossy(),
        ])
        .unwrap();
    let out = writer
        .ok(&["directory", "import", &directory.to_string_lossy()])
        .unwrap();
    assert!(out.contains("verified and stored"), "{out}");
    // A tampered directory file is refused.
    let mut bad = std::fs::read(&directory).unwrap();
    let n = bad.len();
    bad[n / 2] ^= 1;
    let bad_path = tmp.path().join("tampered.sdir");
    std::fs::write(&bad_path, bad).unwrap();
    writer
        .run(&["directory", "import", &bad_path.to_string_lossy()])
        .unwrap()
        .fails_with(5, "patient-jansen")
        .unwrap();

    // A JSON record, each section under its own policy.
    let sections = writer.path("sections.toml");
    std::fs::write(
        &sections,
        "[sections]\n\
         vital_signs = \"cardiology@hospital-a\"\n\
         personal_report = \"family@patient-jansen\"\n\
         research = \"researcher@hospital-a\"\n",
    )
    .unwrap();
    let record = writer.path("record.json");
    std::fs::write(
        &record,
        r#"{"vital_signs": {"bp": "120/80", "pulse": 64},
            "personal_report": "recovering well, walks daily",
            "research": {"age_band": "60-69", "procedure": "CABG"}}"#,
    )
    .unwrap();
    let encrypted = writer.path("record.mabe.json");
    writer
        .ok(&[
            "encrypt-json",
            "--policies",
            &sections,
            "--in",
            &record,
            "--out",
            &encrypted,
        ])
        .unwrap();
    // Every reader is online (hospital A answers; the phone does not, and
    // its directory comes from what was imported).
    for (reader, section) in [
        (&cardiologist, "vital_signs"),
        (&daughter, "personal_report"),
        (&researcher, "research"),
    ] {
        let run = reader
            .run(&["decrypt-json", "--in", &encrypted])
            .unwrap()
            .ok()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(
            keys_of(&v, "sections"),
            BTreeSet::from([section.to_owned()]),
            "{}",
            run.stdout
        );
        assert_eq!(keys_of(&v, "withheld").len(), 2, "{}", run.stdout);
        assert!(
            run.stderr
                .contains("withheld: cannot decrypt: policy needs"),
            "{}",
            run.stderr
        );
        if section == "personal_report" {
            assert_eq!(
                v["sections"]["personal_report"],
                "recovering well, walks daily"
            );
        }
    }

    // Both authorities' audit logs record what happened, and verify.
    let log = a.ok(&["audit", "list", "--kind", "approve"]).unwrap();
    assert!(log.contains(&researcher.gid), "{log}");
    let log = a.ok(&["audit", "list", "--kind", "deny"]).unwrap();
    assert!(log.contains(&other.gid), "{log}");
    for auth in [&a, &phone] {
        let audit = auth.ok(&["audit", "verify"]).unwrap();
        assert!(audit.contains("audit log verifies"), "{audit}");
    }
    a.served.take().unwrap().stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_by_request_sqlite() {
    shared_by_request(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_by_request_postgres() {
    shared_by_request(Backend::Postgres).await;
}
