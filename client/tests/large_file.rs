//! A 256 MiB payload streams through `mabe encrypt | mabe decrypt` (two child
//! processes joined by a pipe, data generated on the fly, compared by hash)
//! and neither process's peak RSS exceeds a fixed ceiling. Nothing is timed.
//!
//! This file holds one test on purpose: the ceiling is read with
//! `getrusage(RUSAGE_CHILDREN)`, the largest peak RSS of any child this test
//! process has waited for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::{
    io::{Read, Write},
    process::Stdio,
};

use ark_std::rand::{SeedableRng, rngs::StdRng};
use common::{OfflineAuthority, Person, offline_home};
use sha2::{Digest, Sha256};

const PAYLOAD: u64 = (256 << 20) + 12_345;
const CEILING_KIB: i64 = 64 * 1024;

#[cfg(target_os = "linux")]
#[test]
fn a_256_mib_record_streams_through_encrypt_and_decrypt_in_bounded_memory() {
    let mut rng = StdRng::seed_from_u64(42);
    let a = OfflineAuthority::new("hospital-a", &["doctor"], &mut rng);
    let p = Person::new("writer");
    offline_home(
        p.home.path(),
        "big-register",
        "writer-1",
        &[&a],
        &["doctor@hospital-a"],
        mabe_client::unix_now(),
        86_400,
        &mut rng,
    );
    let mut enc = p
        .cmd()
        .args(["--offline", "encrypt", "--policy", "doctor@hospital-a"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut dec = p
        .cmd()
        .args(["--offline", "decrypt"])
        .stdin(Stdio::from(enc.stdout.take().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = enc.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 1 << 16];
        let mut left = PAYLOAD;
        while left > 0 {
            for chunk in buf.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            let n = left.min(buf.len() as u64) as usize;
            stdin.write_all(&buf[..n]).unwrap();
            h.update(&buf[..n]);
            left -= n as u64;
        }
        drop(stdin);
        h.finalize()
    });
    let mut out = dec.stdout.take().unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    let sent = writer.join().unwrap();
    let enc_out = enc.wait_with_output().unwrap();
    let dec_out = dec.wait_with_output().unwrap();
    assert!(
        enc_out.status.success(),
        "encrypt: {}",
        String::from_utf8_lossy(&enc_out.stderr)
    );
    assert!(
        dec_out.status.success(),
        "decrypt: {}",
        String::from_utf8_lossy(&dec_out.stderr)
    );
    assert!(String::from_utf8_lossy(&dec_out.stderr).contains("verified writer"));
    assert_eq!(total, PAYLOAD);
    assert_eq!(h.finalize(), sent, "the plaintext came back different");

    let usage =
        nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN).unwrap();
    let peak_kib = usage.max_rss();
    eprintln!("peak RSS of the largest child: {} KiB", peak_kib);
    assert!(
        peak_kib <= CEILING_KIB,
        "a child's peak RSS was {peak_kib} KiB, over the {CEILING_KIB} KiB ceiling"
    );
}
