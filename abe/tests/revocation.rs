//! Revocation (DESIGN §3) at the scheme level: rotation, snapshot, tokens,
//! all-or-nothing application, and what the revoked key can no longer do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{World, attr};
use mabe_abe::{
    AbeError, Header, Snapshot, SnapshotRow, UpdateToken, UserKey, UserKeyRing, Version,
    decapsulate,
};

/// Rotate `a` in the world; returns the update secret.
fn rotate(w: &mut World, a: &str) -> mabe_abe::UpdateSecret {
    let old = w.secrets.remove(&attr(a)).unwrap();
    let (new, us) = old.rotate(&mut w.rng).unwrap();
    assert_eq!(new.version(), old.version().next().unwrap());
    w.directory.insert(new.public_key(&mut w.rng)).unwrap();
    w.secrets.insert(attr(a), new);
    us
}

fn snapshot_of(headers: &[&Header], a: &str, v: Version) -> Snapshot {
    let mut s = Snapshot::new(attr(a), v);
    for h in headers {
        for row in h.snapshot_rows(&attr(a), v) {
            s.insert(row).unwrap();
        }
    }
    s
}

/// Re-label a user key's version without changing its key material (what a
/// revoked user would try: present the old K as if it were the new version).
fn relabel(key: &UserKey, v: Version) -> UserKey {
    let mut b = key.to_bytes().to_vec();
    let at = b.len() - 96 - 4;
    b[at..at + 4].copy_from_slice(&v.get().to_be_bytes());
    UserKey::from_bytes(&b).unwrap()
}

#[test]
fn revoked_key_fails_and_reissued_key_succeeds_after_token_application() {
    let mut w = World::new(&["doctor@a", "cardiology@a", "nurse@b"], 30);
    let revoked = w.person("dr-revoked", &["doctor@a", "cardiology@a"]);
    let mut staying = w.person("dr-staying", &["doctor@a", "cardiology@a"]);
    let policy = "doctor@a AND cardiology@a";
    let (mut h1, ct1) = w.encrypt(policy, b"record one");
    let (mut h2, ct2) = w.encrypt("cardiology@a OR nurse@b", b"record two");
    let stored_payloads = (ct1.clone(), ct2.clone());

    let us = rotate(&mut w, "cardiology@a");
    let v1 = Version::FIRST;
    let mut tg = us
        .token_generator(snapshot_of(&[&h1, &h2], "cardiology@a", v1), &mut w.rng)
        .unwrap();
    assert_eq!(tg.remaining(), 2);
    for h in [&mut h1, &mut h2] {
        let rows = h.snapshot_rows(&attr("cardiology@a"), v1);
        let tokens: Vec<UpdateToken> = rows
            .iter()
            .map(|r| {
                let t = tg.issue(r, &mut w.rng).unwrap();
                // Tokens travel to the proxy encoded.
                UpdateToken::from_bytes(&t.to_bytes()).unwrap()
            })
            .collect();
        h.apply_tokens(&tokens).unwrap();
        let h2 = Header::from_bytes(&h.to_bytes()).unwrap();
        assert_eq!(&h2, &*h);
    }
    assert_eq!(tg.remaining(), 0);
    assert_eq!(
        stored_payloads,
        (ct1.clone(), ct2.clone()),
        "payloads untouched"
    );

    // The revoked doctor's old key: a version mismatch before cryptography…
    assert!(matches!(
        w.decrypt(&h1, &revoked, &ct1),
        Err(AbeError::KeyVersionMismatch { .. })
    ));
    // …and cryptographically dead when relabelled as the new version.
    let mut forged = UserKeyRing::new(revoked.gid()).unwrap();
    for a in ["doctor@a", "cardiology@a"] {
        let k = revoked.get(&attr(a)).unwrap();
        let v = w.directory.current(&attr(a)).unwrap().version();
        forged.insert_unverified(relabel(k, v));
    }
    for (h, ct) in [(&h1, &ct1), (&h2, &ct2)] {
        assert!(matches!(
            w.decrypt(h, &forged, ct),
            Err(AbeError::DecryptionFailed)
        ));
    }

    // The remaining holder fetches the v2 key and reads both (FO accepts the
    // updated rows as a fresh encryption under v2).
    w.grant(&mut staying, "cardiology@a");
    assert_eq!(
        staying.get(&attr("cardiology@a")).unwrap().version(),
        Version::new(2)
    );
    assert_eq!(w.decrypt(&h1, &staying, &ct1).unwrap(), b"record one");
    assert_eq!(w.decrypt(&h2, &staying, &ct2).unwrap(), b"record two");

    // Records written after the revocation use v2: unreadable with the old key.
    let (h3, ct3) = w.encrypt(policy, b"record three");
    assert_eq!(h3.rows()[1].version(), Version::new(2));
    assert!(w.decrypt(&h3, &revoked, &ct3).is_err());
    assert!(w.decrypt(&h3, &forged, &ct3).is_err());
    assert_eq!(w.decrypt(&h3, &staying, &ct3).unwrap(), b"record three");
}

#[test]
fn tokens_outside_the_snapshot_and_repeats_are_refused() {
    let mut w = World::new(&["cardiology@a"], 31);
    let (h_old, _) = w.encrypt("cardiology@a", b"old");
    let us = rotate(&mut w, "cardiology@a");
    let mut tg = us
        .token_generator(
            snapshot_of(&[&h_old], "cardiology@a", Version::FIRST),
            &mut w.rng,
        )
        .unwrap();
    let row = h_old.snapshot_rows(&attr("cardiology@a"), Version::FIRST)[0];
    tg.issue(&row, &mut w.rng).unwrap();
    assert!(matches!(
        tg.issue(&row, &mut w.rng),
        Err(AbeError::UpdateRefused(_))
    ));
    // A record created after the freeze (at v2) mislabelled as v1: its C2 is
    // not in the snapshot.
    let (h_new, _) = w.encrypt("cardiology@a", b"new");
    let new_row = h_new.snapshot_rows(&attr("cardiology@a"), Version::new(2))[0];
    let mislabelled = SnapshotRow {
        record: new_row.record,
        row: new_row.row,
        c2: new_row.c2,
    };
    assert!(tg.issue(&mislabelled, &mut w.rng).is_err());
    // A known (record, row) with a substituted C2.
    let swapped = SnapshotRow {
        c2: new_row.c2,
        ..row
    };
    assert!(tg.issue(&swapped, &mut w.rng).is_err());
    // A snapshot of another version is refused outright.
    assert!(
        us.token_generator(
            Snapshot::new(attr("cardiology@a"), Version::new(2)),
            &mut w.rng
        )
        .is_err()
    );
}

#[test]
fn a_record_with_the_attribute_in_two_rows_updates_both_or_neither() {
    let mut w = World::new(&["cardiology@a", "doctor@a", "nurse@b"], 32);
    let mut holder = w.person("h", &["cardiology@a", "doctor@a", "nurse@b"]);
    let (mut h, ct) = w.encrypt(
        "(cardiology@a AND doctor@a) OR (cardiology@a AND nurse@b)",
        b"two rows",
    );
    let us = rotate(&mut w, "cardiology@a");
    let snap = snapshot_of(&[&h], "cardiology@a", Version::FIRST);
    assert_eq!(snap.len(), 2);
    let tg = us.token_generator(snap, &mut w.rng).unwrap();
    let rows = h.snapshot_rows(&attr("cardiology@a"), Version::FIRST);
    let tokens: Vec<_> = rows
        .iter()
        .map(|r| tg.compute(r, &mut w.rng).unwrap())
        .collect();
    let before = h.clone();
    // Only one of the two rows: refused, header unchanged.
    for one in [&tokens[..1], &tokens[1..]] {
        assert!(matches!(
            h.apply_tokens(one),
            Err(AbeError::UpdateRefused(_))
        ));
        assert_eq!(h, before);
    }
    // The same token twice instead of both rows.
    let dup = vec![tokens[0].clone(), tokens[0].clone()];
    assert!(h.apply_tokens(&dup).is_err());
    assert_eq!(h, before);
    // A token for another record.
    let (other, _) = w.encrypt("cardiology@a", b"z");
    assert!(other.clone().apply_tokens(&tokens).is_err());
    // Both: applied. Again: refused (already at v2), nothing changes.
    h.apply_tokens(&tokens).unwrap();
    assert!(
        h.rows()
            .iter()
            .filter(|r| r.attribute() == &attr("cardiology@a"))
            .all(|r| r.version() == Version::new(2))
    );
    let after = h.clone();
    assert!(h.apply_tokens(&tokens).is_err());
    assert_eq!(h, after);
    w.grant(&mut holder, "cardiology@a");
    assert_eq!(w.decrypt(&h, &holder, &ct).unwrap(), b"two rows");
}

#[test]
fn two_rotations_in_a_row_and_secret_round_trips() {
    let mut w = World::new(&["cardiology@a"], 33);
    let mut holder = w.person("h", &["cardiology@a"]);
    let (mut h, ct) = w.encrypt("cardiology@a", b"twice");
    for from in [Version::FIRST, Version::new(2)] {
        let us = rotate(&mut w, "cardiology@a");
        let us = mabe_abe::UpdateSecret::from_bytes(&us.to_bytes()).unwrap();
        let mut tg = us
            .token_generator(snapshot_of(&[&h], "cardiology@a", from), &mut w.rng)
            .unwrap();
        let rows = h.snapshot_rows(&attr("cardiology@a"), from);
        let tokens: Vec<_> = rows
            .iter()
            .map(|r| tg.issue(r, &mut w.rng).unwrap())
            .collect();
        h.apply_tokens(&tokens).unwrap();
    }
    w.grant(&mut holder, "cardiology@a");
    assert_eq!(
        holder.get(&attr("cardiology@a")).unwrap().version(),
        Version::new(3)
    );
    assert_eq!(w.decrypt(&h, &holder, &ct).unwrap(), b"twice");
    assert!(decapsulate(&h, &holder, &w.directory).is_ok());
}

#[test]
fn snapshot_merkle_root_depends_on_every_row() {
    let mut w = World::new(&["cardiology@a"], 34);
    let hs: Vec<Header> = (0..5).map(|i| w.encrypt("cardiology@a", &[i]).0).collect();
    let refs: Vec<&Header> = hs.iter().collect();
    let full = snapshot_of(&refs, "cardiology@a", Version::FIRST);
    let partial = snapshot_of(&refs[..4], "cardiology@a", Version::FIRST);
    assert_ne!(full.merkle_root(), partial.merkle_root());
    let again = snapshot_of(&refs, "cardiology@a", Version::FIRST);
    assert_eq!(full.merkle_root(), again.merkle_root());
    let mut conflicting = full.clone();
    let r0 = hs[0].snapshot_rows(&attr("cardiology@a"), Version::FIRST)[0];
    let r1 = hs[1].snapshot_rows(&attr("cardiology@a"), Version::FIRST)[0];
    assert!(conflicting.insert(SnapshotRow { c2: r1.c2, ..r0 }).is_err());
}
