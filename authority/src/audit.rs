//! The tamper-evident audit log: hash chain and signed checkpoints.
//!
//! Entry `n` stores `hash_n = SHA-256("MABE-V1-AUDIT" ‖ be64(n) ‖ hash_{n-1} ‖
//! be64(ts) ‖ lp(kind) ‖ lp(actor) ‖ opt(subject) ‖ opt(attribute) ‖ lp(detail))`
//! with `hash_0 = 0^32`, where `lp` is a 4-byte big-endian length prefix and
//! `opt(x)` is `0x00` for none or `0x01 ‖ lp(x)`. A checkpoint is the identity
//! key's Ed25519 signature over `"MABE-V1-CHECKPOINT" ‖ lp(authority) ‖ be64(seq)
//! ‖ hash_seq ‖ be64(ts)`. Editing, deleting or reordering any entry breaks the
//! chain at that entry; rewriting history covered by a checkpoint, or
//! deleting the newest entries that a checkpoint covers, is caught by the
//! checkpoint signatures. Deleting the newest entries *after* the last
//! checkpoint (together with any later checkpoint rows) leaves a shorter but
//! consistent log: no check inside the database can see it, so the report
//! counts those [uncovered](AuditReport::uncovered) entries and `serve` signs
//! a checkpoint on schedule and at shutdown; only a checkpoint kept outside
//! the database (an external witness) closes the gap.

use std::borrow::Cow;

use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::store::{AuditEntry, AuditEvent, Checkpoint};

/// Longest `kind`, `actor`, `subject` or `attribute` an audit entry stores
/// (ids, GIDs in hex and attribute names are far shorter).
pub const MAX_AUDIT_FIELD_BYTES: usize = 1024;

/// Longest `detail` an audit entry stores (a break-glass reason is at most
/// 2000 bytes; a key issuance lists the issued attributes).
pub const MAX_AUDIT_DETAIL_BYTES: usize = 64 * 1024;

/// `s` if it has at most `max` bytes; otherwise its start, cut at a
/// character boundary, followed by a marker that gives the original length,
/// all in at most `max` bytes.
pub fn clip(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut marker = format!("...[truncated, {} bytes]", s.len());
    if marker.len() > max {
        marker.clear(); // no room for it
    }
    let mut keep = max - marker.len();
    while !s.is_char_boundary(keep) {
        keep -= 1;
    }
    let mut out = String::with_capacity(keep + marker.len());
    out.push_str(&s[..keep]);
    out.push_str(&marker);
    Cow::Owned(out)
}

/// `ev` with every text within [`MAX_AUDIT_FIELD_BYTES`] and
/// [`MAX_AUDIT_DETAIL_BYTES`]. Both stores apply it to every entry before
/// hashing and storing it, so no caller, authenticated or not, can make an
/// audit entry large.
pub fn bounded(ev: &AuditEvent) -> Cow<'_, AuditEvent> {
    let short = |s: &str| s.len() <= MAX_AUDIT_FIELD_BYTES;
    let fits = short(&ev.kind)
        && short(&ev.actor)
        && ev.subject.as_deref().is_none_or(short)
        && ev.attribute.as_deref().is_none_or(short)
        && ev.detail.len() <= MAX_AUDIT_DETAIL_BYTES;
    if fits {
        return Cow::Borrowed(ev);
    }
    let field = |s: &str| clip(s, MAX_AUDIT_FIELD_BYTES).into_owned();
    Cow::Owned(AuditEvent {
        ts: ev.ts,
        kind: field(&ev.kind),
        actor: field(&ev.actor),
        subject: ev.subject.as_deref().map(field),
        attribute: ev.attribute.as_deref().map(field),
        detail: clip(&ev.detail, MAX_AUDIT_DETAIL_BYTES).into_owned(),
    })
}

fn lp(h: &mut Sha256, b: &[u8]) {
    h.update((b.len() as u32).to_be_bytes());
    h.update(b);
}

fn opt(h: &mut Sha256, b: Option<&str>) {
    match b {
        None => h.update([0u8]),
        Some(s) => {
            h.update([1u8]);
            lp(h, s.as_bytes());
        }
    }
}

/// The hash of entry `seq` with predecessor hash `prev`.
pub fn entry_hash(seq: i64, prev: &[u8; 32], ev: &AuditEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"MABE-V1-AUDIT");
    h.update(seq.to_be_bytes());
    h.update(prev);
    h.update(ev.ts.to_be_bytes());
    lp(&mut h, ev.kind.as_bytes());
    lp(&mut h, ev.actor.as_bytes());
    opt(&mut h, ev.subject.as_deref());
    opt(&mut h, ev.attribute.as_deref());
    lp(&mut h, ev.detail.as_bytes());
    h.finalize().into()
}

/// The message a checkpoint signs.
pub fn checkpoint_message(authority: &str, seq: i64, hash: &[u8; 32], ts: i64) -> Vec<u8> {
    let mut m = Vec::with_capacity(80 + authority.len());
    m.extend_from_slice(b"MABE-V1-CHECKPOINT");
    m.extend_from_slice(&(authority.len() as u32).to_be_bytes());
    m.extend_from_slice(authority.as_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&ts.to_be_bytes());
    m
}

/// What `audit verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditProblem {
    /// Entry `seq` does not hash to its stored hash: it was edited.
    Edited {
        /// The entry.
        seq: i64,
    },
    /// The sequence jumps from `after` to `next`: entries were deleted.
    Missing {
        /// Last good entry.
        after: i64,
        /// The entry found next.
        next: i64,
    },
    /// Entry `seq` does not link to the entry before it: reordered, inserted,
    /// or its predecessor was edited and re-hashed.
    BrokenLink {
        /// The entry.
        seq: i64,
    },
    /// A checkpoint's signature does not verify.
    BadCheckpointSignature {
        /// The checkpoint's seq.
        seq: i64,
    },
    /// A checkpoint covers an entry whose hash differs from the signed one, or
    /// an entry that no longer exists: history before it was rewritten or cut.
    CheckpointMismatch {
        /// The checkpoint's seq.
        seq: i64,
    },
    /// A validly signed checkpoint covers entries beyond the end of the log:
    /// the newest entries were deleted.
    Truncated {
        /// The checkpoint's seq.
        checkpoint: i64,
        /// The last entry left in the log (0: the log is empty).
        head: i64,
    },
}

impl std::fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditProblem::Edited { seq } => write!(f, "entry {seq} was edited (hash mismatch)"),
            AuditProblem::Missing { after, next } => {
                write!(
                    f,
                    "entries after {after} are missing (next entry is {next})"
                )
            }
            AuditProblem::BrokenLink { seq } => write!(
                f,
                "entry {seq} does not follow the entry before it (reordered, inserted or re-hashed)"
            ),
            AuditProblem::BadCheckpointSignature { seq } => {
                write!(f, "checkpoint at entry {seq} has an invalid signature")
            }
            AuditProblem::CheckpointMismatch { seq } => write!(
                f,
                "checkpoint at entry {seq} does not match the log (history rewritten or truncated)"
            ),
            AuditProblem::Truncated { checkpoint, head } => write!(
                f,
                "the log ends at entry {head} but a signed checkpoint covers entry {checkpoint}: \
                 the newest entries were deleted"
            ),
        }
    }
}

/// Result of verifying the whole log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditReport {
    /// Entries checked.
    pub entries: i64,
    /// Checkpoints checked.
    pub checkpoints: usize,
    /// Every problem found, in log order (empty: the log verifies).
    pub problems: Vec<AuditProblem>,
    /// The last entry of the log, if it has any.
    pub head: Option<i64>,
    /// The newest checkpoint that verifies and matches the log, if any.
    pub last_checkpoint: Option<i64>,
    /// Entries after `last_checkpoint` (every entry, without one). Nothing
    /// in the database can reveal that such entries were deleted: only a
    /// checkpoint kept elsewhere can (see docs/PROTOCOL.md, Audit).
    pub uncovered: i64,
}

/// Incremental verifier: feed entries in stored order, then checkpoints.
#[derive(Debug)]
pub struct Verifier {
    prev_seq: i64,
    prev_hash: [u8; 32],
    hashes: std::collections::BTreeMap<i64, [u8; 32]>,
    report: AuditReport,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            prev_seq: 0,
            prev_hash: [0u8; 32],
            hashes: Default::default(),
            report: AuditReport {
                entries: 0,
                checkpoints: 0,
                problems: Vec::new(),
                head: None,
                last_checkpoint: None,
                uncovered: 0,
            },
        }
    }
}

impl Verifier {
    /// Check the next entry in stored (seq) order.
    pub fn entry(&mut self, e: &AuditEntry) {
        self.report.entries = self.report.entries.saturating_add(1);
        if entry_hash(e.seq, &e.prev_hash, &e.event) != e.hash {
            self.report
                .problems
                .push(AuditProblem::Edited { seq: e.seq });
        }
        // `prev_seq + 1` overflows only after an entry at i64::MAX (a
        // tampered row): then nothing can follow it in order.
        let expected = self.prev_seq.checked_add(1);
        if expected.is_some_and(|next| e.seq > next) {
            self.report.problems.push(AuditProblem::Missing {
                after: self.prev_seq,
                next: e.seq,
            });
        } else if e.seq <= self.prev_seq || e.prev_hash != self.prev_hash {
            self.report
                .problems
                .push(AuditProblem::BrokenLink { seq: e.seq });
        }
        self.prev_seq = e.seq;
        self.prev_hash = e.hash;
        self.hashes.insert(e.seq, e.hash);
    }

    /// Check a checkpoint against the entries seen and the identity key.
    pub fn checkpoint(&mut self, authority: &str, key: &VerifyingKey, cp: &Checkpoint) {
        self.report.checkpoints += 1;
        let msg = checkpoint_message(authority, cp.seq, &cp.hash, cp.ts);
        let sig_ok = Signature::from_slice(&cp.signature)
            .map(|s| key.verify_strict(&msg, &s).is_ok())
            .unwrap_or(false);
        let head = self.hashes.keys().next_back().copied();
        if !sig_ok {
            self.report
                .problems
                .push(AuditProblem::BadCheckpointSignature { seq: cp.seq });
        } else if self.hashes.get(&cp.seq) == Some(&cp.hash) {
            if self.report.last_checkpoint.is_none_or(|s| s < cp.seq) {
                self.report.last_checkpoint = Some(cp.seq);
            }
        } else if head.is_none_or(|h| cp.seq > h) {
            self.report.problems.push(AuditProblem::Truncated {
                checkpoint: cp.seq,
                head: head.unwrap_or(0),
            });
        } else {
            self.report
                .problems
                .push(AuditProblem::CheckpointMismatch { seq: cp.seq });
        }
    }

    /// The report: problems, and how much of the log no checkpoint covers.
    pub fn finish(mut self) -> AuditReport {
        use std::ops::Bound::{Excluded, Unbounded};
        self.report.head = self.hashes.keys().next_back().copied();
        let uncovered = match self.report.last_checkpoint {
            Some(cp) => self.hashes.range((Excluded(cp), Unbounded)).count(),
            None => self.hashes.len(),
        };
        self.report.uncovered = i64::try_from(uncovered).unwrap_or(i64::MAX);
        self.report
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(detail: &str) -> AuditEvent {
        AuditEvent {
            ts: 1_700_000_000,
            kind: "issue".into(),
            actor: "admin".into(),
            subject: None,
            attribute: None,
            detail: detail.into(),
        }
    }

    fn entry(seq: i64, prev_hash: [u8; 32], detail: &str) -> AuditEntry {
        let ev = event(detail);
        AuditEntry {
            seq,
            hash: entry_hash(seq, &prev_hash, &ev),
            prev_hash,
            event: ev,
        }
    }

    #[test]
    fn clip_keeps_short_text_and_marks_cut_text() {
        assert_eq!(clip("hospital-a", 64), "hospital-a");
        let long = "é".repeat(1000); // 2000 bytes
        let c = clip(&long, 100);
        assert!(c.len() <= 100, "{}", c.len());
        assert!(c.ends_with("...[truncated, 2000 bytes]"), "{c}");
        assert!(c.starts_with("éé"));
        assert_eq!(clip("abcdef", 3).len(), 3);
    }

    #[test]
    fn bounded_events_fit_the_limits() {
        let small = event("ok");
        assert!(matches!(bounded(&small), Cow::Borrowed(_)));
        let mut big = event(&"d".repeat(3 << 20));
        big.actor = "a".repeat(5000);
        big.subject = Some("s".repeat(5000));
        big.attribute = Some("x".repeat(10));
        let b = bounded(&big);
        assert!(b.detail.len() <= MAX_AUDIT_DETAIL_BYTES);
        assert!(b.detail.contains("truncated, 3145728 bytes"));
        assert!(b.actor.len() <= MAX_AUDIT_FIELD_BYTES);
        assert!(b.subject.as_deref().unwrap().len() <= MAX_AUDIT_FIELD_BYTES);
        assert_eq!(b.attribute.as_deref(), Some("xxxxxxxxxx"));
        assert_eq!((b.ts, b.kind.as_str()), (big.ts, "issue"));
    }

    /// Regression: an entry after one at `i64::MAX` made `prev_seq + 1`
    /// overflow (a panic in debug builds) instead of being reported.
    #[test]
    fn entries_around_i64_max_are_reported_not_overflowed() {
        let mut v = Verifier::default();
        let first = entry(1, [0; 32], "a");
        let top = entry(i64::MAX, first.hash, "b");
        let after = entry(i64::MAX, top.hash, "c");
        let wrapped = entry(i64::MIN, after.hash, "d");
        for e in [&first, &top, &after, &wrapped] {
            v.entry(e);
        }
        let report = v.finish();
        assert_eq!(report.entries, 4);
        assert_eq!(
            report.problems,
            vec![
                AuditProblem::Missing {
                    after: 1,
                    next: i64::MAX
                },
                AuditProblem::BrokenLink { seq: i64::MAX },
                AuditProblem::BrokenLink { seq: i64::MIN },
            ]
        );
    }
}
