//! The signed record container (`docs/FORMAT.md` §9): one file or stream
//! holding a ciphertext header, the writer's identity, the STREAM payload and
//! the writer's Ed25519 signature.
//!
//! ```text
//! "MABE" ‖ 'R' ‖ 0x01 ‖ be32(L) ‖ header ('H' object, L bytes)
//!   ‖ signer (1 byte: 0 unsigned, 1 Ed25519) ‖ [GID (32) ‖ public key (32)]
//!   ‖ payload (STREAM segments, to the end of the record less the signature)
//!   ‖ [signature (64)]
//! ```
//!
//! The signature covers
//! `"MABE-V1-RECORD-SIG" ‖ H_imm ‖ H_auth ‖ GID ‖ public key ‖ SHA-256(payload) ‖ final tag`,
//! where the final tag is the payload's last 16 bytes (the tag of its last
//! segment). `H_imm` and `H_auth` cover only the header fields revocation
//! never changes, so a record stays validly signed when the record store
//! applies update tokens; the payload hash binds every segment (a reader who
//! can decrypt could otherwise forge other segments under the same key).
//!
//! Everything streams: memory is one payload segment plus small buffers,
//! whatever the payload size.

use std::io::{self, Read, Write};

use ark_std::rand::{CryptoRng, RngCore};
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use mabe_abe::{EncryptOptions, Gid, Header, MAX_HEADER_LEN, Policy, PublicKeyRing, RecordKey};
use sha2::{Digest, Sha256};

use crate::{
    error::{ClientError, Result},
    keystore::Identity,
};

/// The container's first six bytes: `"MABE" ‖ 'R' ‖ 0x01`.
pub const RECORD_MAGIC: [u8; 6] = *b"MABER\x01";
/// Domain-separation tag of the writer's signature.
pub const SIGNATURE_TAG: &[u8] = b"MABE-V1-RECORD-SIG";
/// Ed25519 signature length.
pub const SIGNATURE_LEN: usize = 64;
const SIGNER_NONE: u8 = 0;
const SIGNER_ED25519: u8 = 1;
const CHUNK: usize = 8192;

/// Who claims to have written a record: a GID and an Ed25519 public key.
///
/// The signature proves the holder of `key` wrote the record. That the key
/// belongs to the person with `gid` is the writer's claim, unless the trust
/// file names the key (`mabe trust writer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer {
    /// The writer's GID.
    pub gid: Gid,
    /// The writer's Ed25519 public key (their request key).
    pub key: VerifyingKey,
}

/// What the signature check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureStatus {
    /// Signed, and the signature verifies.
    Valid(Writer),
    /// The record carries no signature.
    Unsigned,
    /// Signed, but the signature does not verify (or is missing).
    Invalid(Writer),
}

impl SignatureStatus {
    /// The verified writer, or [`ClientError::Unsigned`] /
    /// [`ClientError::BadSignature`].
    pub fn require_valid(&self) -> Result<Writer> {
        match self {
            SignatureStatus::Valid(w) => Ok(*w),
            SignatureStatus::Unsigned => Err(ClientError::Unsigned),
            SignatureStatus::Invalid(_) => Err(ClientError::BadSignature(
                "the record or its signature was altered, or it was signed by someone else",
            )),
        }
    }
}

/// The parts of a record before its payload.
#[derive(Clone, Debug)]
pub struct RecordPrefix {
    /// The ciphertext header.
    pub header: Header,
    /// Its encoding, as stored.
    pub header_bytes: Vec<u8>,
    /// The writer, if the record is signed.
    pub writer: Option<Writer>,
}

/// What a pass over a payload found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayloadSummary {
    /// Payload length in bytes (ciphertext and tags).
    pub payload_len: u64,
    /// The signature check.
    pub signature: SignatureStatus,
    /// The signature bytes, if the record is signed and long enough.
    pub signature_bytes: Option<[u8; SIGNATURE_LEN]>,
}

/// The exact bytes the writer signs.
pub fn signature_message(
    header: &Header,
    writer: &Writer,
    payload_digest: &[u8; 32],
    final_tag: &[u8; 16],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_TAG.len() + 176);
    m.extend_from_slice(SIGNATURE_TAG);
    m.extend_from_slice(&header.h_imm());
    m.extend_from_slice(&header.h_auth());
    m.extend_from_slice(writer.gid.as_bytes());
    m.extend_from_slice(writer.key.as_bytes());
    m.extend_from_slice(payload_digest);
    m.extend_from_slice(final_tag);
    m
}

/// Hashes what passes through and remembers the last 16 bytes.
struct Observer {
    hash: Sha256,
    last: [u8; 16],
    len: u64,
}

impl Observer {
    fn new() -> Self {
        Observer {
            hash: Sha256::new(),
            last: [0; 16],
            len: 0,
        }
    }
    fn see(&mut self, data: &[u8]) {
        self.hash.update(data);
        if data.len() >= 16 {
            self.last.copy_from_slice(&data[data.len() - 16..]);
        } else {
            self.last.rotate_left(data.len());
            self.last[16 - data.len()..].copy_from_slice(data);
        }
        self.len += data.len() as u64;
    }
    fn finish(self) -> ([u8; 32], [u8; 16], u64) {
        (self.hash.finalize().into(), self.last, self.len)
    }
}

struct ObservingWriter<W: Write> {
    inner: W,
    seen: Observer,
}

impl<W: Write> Write for ObservingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(data)?;
        self.seen.see(&data[..k.min(data.len())]);
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that withholds the last `keep` bytes of its input (the
/// signature) and observes the bytes it releases (the payload).
struct TailReader<R: Read> {
    inner: R,
    buf: Vec<u8>,
    keep: usize,
    eof: bool,
    seen: Observer,
}

impl<R: Read> TailReader<R> {
    fn new(inner: R, keep: usize) -> Self {
        TailReader {
            inner,
            buf: Vec::with_capacity(keep + 2 * CHUNK),
            keep,
            eof: false,
            seen: Observer::new(),
        }
    }
}

impl<R: Read> Read for TailReader<R> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        if dst.is_empty() {
            return Ok(0);
        }
        let want = self.keep + dst.len().min(CHUNK);
        let mut chunk = [0u8; CHUNK];
        while !self.eof && self.buf.len() < want {
            match self.inner.read(&mut chunk) {
                Ok(0) => self.eof = true,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k.min(CHUNK)]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let n = self.buf.len().saturating_sub(self.keep).min(dst.len());
        dst[..n].copy_from_slice(&self.buf[..n]);
        self.buf.drain(..n);
        self.seen.see(&dst[..n]);
        Ok(n)
    }
}

/// Encrypt `input` under `policy` into a record written to `output`, signed
/// by `signer` (unsigned if `None`). `pks` must hold the current public key of
/// every attribute (see [`crate::directory::encryption_ring`]). Returns the
/// header.
pub fn write_record<R, I, O>(
    policy: &Policy,
    pks: &PublicKeyRing,
    options: &EncryptOptions,
    signer: Option<&Identity>,
    rng: &mut R,
    mut input: I,
    mut output: O,
) -> Result<Header>
where
    R: RngCore + CryptoRng + ?Sized,
    I: Read,
    O: Write,
{
    let (header, key) = mabe_abe::encapsulate(policy, pks, options, rng)?;
    let hb = header.to_bytes();
    let werr = |e| ClientError::io("writing the record", e);
    output.write_all(&RECORD_MAGIC).map_err(werr)?;
    output
        .write_all(&(hb.len() as u32).to_be_bytes())
        .map_err(werr)?;
    output.write_all(&hb).map_err(werr)?;
    let writer = signer.map(|s| Writer {
        gid: s.gid,
        key: s.key.verifying_key(),
    });
    match &writer {
        None => output.write_all(&[SIGNER_NONE]).map_err(werr)?,
        Some(w) => {
            output.write_all(&[SIGNER_ED25519]).map_err(werr)?;
            output.write_all(w.gid.as_bytes()).map_err(werr)?;
            output.write_all(w.key.as_bytes()).map_err(werr)?;
        }
    }
    let observed = ObservingWriter {
        inner: &mut output,
        seen: Observer::new(),
    };
    let mut enc = key.encryptor(observed).map_err(werr)?;
    io::copy(&mut input, &mut enc).map_err(|e| ClientError::io("encrypting the payload", e))?;
    let observed = enc.finish().map_err(werr)?;
    let (digest, final_tag, _) = observed.seen.finish();
    if let (Some(s), Some(w)) = (signer, &writer) {
        let sig = s
            .key
            .sign(&signature_message(&header, w, &digest, &final_tag));
        output.write_all(&sig.to_bytes()).map_err(werr)?;
    }
    output.flush().map_err(werr)?;
    Ok(header)
}

fn read_exact_or<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ClientError::malformed(what, "truncated")
        } else {
            ClientError::io("reading the record", e)
        }
    })
}

/// Read and validate a record's prefix: magic, header (decoded with full
/// validation, at most [`MAX_HEADER_LEN`] bytes), signer.
pub fn read_prefix<R: Read>(input: &mut R) -> Result<RecordPrefix> {
    let mut magic = [0u8; 6];
    read_exact_or(input, &mut magic, "record")?;
    if magic != RECORD_MAGIC {
        return Err(ClientError::malformed(
            "record",
            if magic.starts_with(b"MABE") {
                "not a record container (another mabe object)"
            } else {
                "not a mabe record"
            },
        ));
    }
    let mut len = [0u8; 4];
    read_exact_or(input, &mut len, "record")?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_HEADER_LEN {
        return Err(ClientError::malformed(
            "record",
            "header over its size limit",
        ));
    }
    let mut header_bytes = vec![0u8; len];
    read_exact_or(input, &mut header_bytes, "record")?;
    let header = Header::from_bytes(&header_bytes)?;
    let mut signer = [0u8; 1];
    read_exact_or(input, &mut signer, "record")?;
    let writer = match signer[0] {
        SIGNER_NONE => None,
        SIGNER_ED25519 => {
            let mut gid = [0u8; 32];
            let mut key = [0u8; 32];
            read_exact_or(input, &mut gid, "record")?;
            read_exact_or(input, &mut key, "record")?;
            Some(Writer {
                gid: Gid::from_bytes(gid),
                key: VerifyingKey::from_bytes(&key)
                    .map_err(|_| ClientError::malformed("record", "invalid writer key"))?,
            })
        }
        _ => return Err(ClientError::malformed("record", "unknown signer type")),
    };
    Ok(RecordPrefix {
        header,
        header_bytes,
        writer,
    })
}

fn check_signature<R: Read>(prefix: &RecordPrefix, tail: TailReader<R>) -> PayloadSummary {
    let sig_bytes: Option<[u8; SIGNATURE_LEN]> = tail.buf.as_slice().try_into().ok();
    let (digest, final_tag, payload_len) = tail.seen.finish();
    let signature = match prefix.writer {
        None => SignatureStatus::Unsigned,
        Some(w) => {
            let ok = sig_bytes.is_some_and(|b| {
                w.key
                    .verify_strict(
                        &signature_message(&prefix.header, &w, &digest, &final_tag),
                        &Signature::from_bytes(&b),
                    )
                    .is_ok()
            });
            if ok {
                SignatureStatus::Valid(w)
            } else {
                SignatureStatus::Invalid(w)
            }
        }
    };
    PayloadSummary {
        payload_len,
        signature,
        signature_bytes: sig_bytes,
    }
}

/// Decrypt the payload that follows `prefix` in `input` into `output`, then
/// check the signature over it. Each segment is authenticated before its
/// bytes reach `output`, but the signature can only be checked at the end:
/// on any error, or a signature status other than `Valid`, treat what was
/// written as untrusted (write to a temporary file; keep it only on success).
pub fn decrypt_payload<R: Read, W: Write>(
    prefix: &RecordPrefix,
    key: &RecordKey,
    input: R,
    mut output: W,
) -> Result<PayloadSummary> {
    let keep = if prefix.writer.is_some() {
        SIGNATURE_LEN
    } else {
        0
    };
    let mut tail = TailReader::new(input, keep);
    {
        let mut dec = key
            .decryptor(&mut tail)
            .map_err(|e| ClientError::io("decrypting", e))?;
        io::copy(&mut dec, &mut output).map_err(|e| match e.kind() {
            io::ErrorKind::InvalidData => ClientError::io("decrypting", e),
            _ => ClientError::io("decrypting (reading the record or writing the output)", e),
        })?;
    }
    output
        .flush()
        .map_err(|e| ClientError::io("writing the output", e))?;
    Ok(check_signature(prefix, tail))
}

/// Read the payload that follows `prefix` without decrypting it, and check
/// the signature (which needs no key). Constant memory.
pub fn scan_payload<R: Read>(prefix: &RecordPrefix, input: R) -> Result<PayloadSummary> {
    let keep = if prefix.writer.is_some() {
        SIGNATURE_LEN
    } else {
        0
    };
    let mut tail = TailReader::new(input, keep);
    io::copy(&mut tail, &mut io::sink()).map_err(|e| ClientError::io("reading the record", e))?;
    Ok(check_signature(prefix, tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_reader_withholds_exactly_the_tail() {
        for total in [0usize, 10, 64, 65, 8191, 8192 + 64, 100_000] {
            let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
            let mut t = TailReader::new(&data[..], 64);
            let mut out = Vec::new();
            t.read_to_end(&mut out).unwrap_or_default();
            let cut = total.saturating_sub(64);
            assert_eq!(out, &data[..cut], "total {total}");
            assert_eq!(t.buf, &data[cut..]);
            let (_, last, len) = t.seen.finish();
            assert_eq!(len, cut as u64);
            if cut >= 16 {
                assert_eq!(last, data[cut - 16..cut]);
            }
        }
    }
}
