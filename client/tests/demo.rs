//! The README's first command: `mabe demo` runs the whole scenario (proxy,
//! revocation at the proxy, break-glass) and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

#[test]
fn demo_runs_the_whole_scenario_and_exits_zero() {
    let keep = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mabe"))
        .args(["demo", "--keep"])
        .arg(keep.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "Dr. Jansen (cardiologist, A)         reads vital signs",
        "R. Smit (researcher)                 reads research extract",
        "E. Jansen (daughter)                 reads personal report",
        "withheld: policy needs researcher@hospital-a",
        "Dr. de Vries: withheld: key for cardiology@hospital-a is version 1, record needs version 2",
        "proxy cloud-1: 1/1 row(s) updated with tokens",
        "payload bytes unchanged",
        "Dr. Visser reads vital signs",
        "break-glass by",
        "Done: every expectation held",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    // --keep leaves every authority's database behind.
    for id in ["hospital-a", "hospital-b", "hospital-c", "patient-jansen"] {
        assert!(keep.path().join(id).join("authority.db").exists(), "{id}");
    }
    assert!(keep.path().join("cloud-1").join("proxy.db").exists());
}
