//! The payload: STREAM over AES-256-GCM (DESIGN §2 step 8, FORMAT.md §4).
//!
//! The plaintext is cut into segments of `segment_size` bytes (the last one
//! may be shorter, or empty). Segment `i` is sealed with nonce
//! `nonce_prefix (7) ‖ i (u32 BE) ‖ last (1 byte: 0 or 1)` and associated data
//! `H_auth`, and written as ciphertext followed by its 16-byte tag. Memory use
//! is one segment, whatever the payload size.

use std::{
    fmt,
    io::{self, Read, Write},
};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{AeadInOut, array::Array},
};
use zeroize::Zeroizing;

use crate::{AbeError, RecordKey};

/// Bytes of authentication tag after each segment.
pub const TAG_LEN: usize = 16;

fn cipher(key: &RecordKey) -> io::Result<Aes256Gcm> {
    Aes256Gcm::new_from_slice(key.dek.as_ref())
        .map_err(|_| AbeError::InvalidParameter("data key length").into())
}

fn nonce(prefix: &[u8; 7], counter: u32, last: bool) -> Array<u8, aes_gcm::aead::consts::U12> {
    let mut n = [0u8; 12];
    n[..7].copy_from_slice(prefix);
    n[7..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    Array::from(n)
}

impl RecordKey {
    /// Start encrypting a payload into `inner`. Call [`Encryptor::finish`] at
    /// the end: without it the stream lacks its last segment and every reader
    /// will refuse it as truncated.
    pub fn encryptor<W: Write>(&self, inner: W) -> io::Result<Encryptor<W>> {
        Ok(Encryptor {
            cipher: cipher(self)?,
            h_auth: self.h_auth,
            nonce_prefix: self.nonce_prefix,
            segment: self.segment_size as usize,
            buf: Zeroizing::new(Vec::with_capacity(self.segment_size as usize + TAG_LEN)),
            counter: 0,
            inner,
        })
    }

    /// Start decrypting a payload read from `inner`. Each segment is verified
    /// before any of its bytes are returned; a missing last segment is an error.
    pub fn decryptor<R: Read>(&self, inner: R) -> io::Result<Decryptor<R>> {
        let seg = self.segment_size as usize;
        Ok(Decryptor {
            cipher: cipher(self)?,
            h_auth: self.h_auth,
            nonce_prefix: self.nonce_prefix,
            segment: seg,
            inbuf: Zeroizing::new(Vec::with_capacity(seg + TAG_LEN + 1)),
            out: Zeroizing::new(Vec::with_capacity(seg + TAG_LEN)),
            out_pos: 0,
            counter: 0,
            state: DecState::Reading,
            inner,
        })
    }
}

/// Streaming payload encryptor (implements [`Write`]).
pub struct Encryptor<W: Write> {
    cipher: Aes256Gcm,
    h_auth: [u8; 32],
    nonce_prefix: [u8; 7],
    segment: usize,
    buf: Zeroizing<Vec<u8>>,
    counter: u32,
    inner: W,
}

impl<W: Write> fmt::Debug for Encryptor<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encryptor")
            .field("segments_written", &self.counter)
            .finish_non_exhaustive()
    }
}

impl<W: Write> Encryptor<W> {
    fn seal_buffer(&mut self, last: bool) -> io::Result<()> {
        let n = nonce(&self.nonce_prefix, self.counter, last);
        let tag = self
            .cipher
            .encrypt_inout_detached(&n, &self.h_auth, self.buf.as_mut_slice().into())
            .map_err(|_| io::Error::other("segment encryption failed"))?;
        self.inner.write_all(&self.buf)?;
        self.inner.write_all(tag.as_slice())?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("payload exceeds 2^32 segments"))?;
        Ok(())
    }

    /// Seal the last segment, flush, and return the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.seal_buffer(true)?;
        self.inner.flush()?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Encryptor<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full buffer is sealed as a non-last segment only once more data
        // arrives, so a payload that is an exact multiple of the segment size
        // ends with a full last segment.
        if self.buf.len() == self.segment {
            self.seal_buffer(false)?;
        }
        let take = (self.segment - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum DecState {
    Reading,
    Done,
    Failed,
}

/// Streaming payload decryptor (implements [`Read`]).
pub struct Decryptor<R: Read> {
    cipher: Aes256Gcm,
    h_auth: [u8; 32],
    nonce_prefix: [u8; 7],
    segment: usize,
    inbuf: Zeroizing<Vec<u8>>,
    out: Zeroizing<Vec<u8>>,
    out_pos: usize,
    counter: u32,
    state: DecState,
    inner: R,
}

impl<R: Read> fmt::Debug for Decryptor<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decryptor")
            .field("segments_read", &self.counter)
            .finish_non_exhaustive()
    }
}

fn failed() -> io::Error {
    AbeError::DecryptionFailed.into()
}

impl<R: Read> Decryptor<R> {
    /// Fill `inbuf` up to `want` bytes; returns false at end of input.
    fn fill(&mut self, want: usize) -> io::Result<bool> {
        let mut chunk = [0u8; 8192];
        while self.inbuf.len() < want {
            let room = (want - self.inbuf.len()).min(chunk.len());
            match self.inner.read(&mut chunk[..room]) {
                Ok(0) => return Ok(false),
                Ok(k) => self.inbuf.extend_from_slice(&chunk[..k.min(room)]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    fn next_segment(&mut self) -> io::Result<()> {
        let full = self.segment + TAG_LEN;
        // Read one byte beyond a full segment to learn whether it is the last.
        let more = self.fill(full + 1)?;
        let (len, last) = if more {
            (full, false)
        } else {
            if self.inbuf.len() < TAG_LEN {
                return Err(failed()); // truncated: the last segment is missing
            }
            if self.inbuf.len() == TAG_LEN && self.counter > 0 {
                // Only an empty payload has an empty last segment: a full
                // final segment is always sealed as the last one.
                return Err(failed());
            }
            (self.inbuf.len(), true)
        };
        let n = nonce(&self.nonce_prefix, self.counter, last);
        self.out.clear();
        self.out.extend_from_slice(&self.inbuf[..len - TAG_LEN]);
        let tag = Array::try_from(&self.inbuf[len - TAG_LEN..len]).map_err(|_| failed())?;
        self.cipher
            .decrypt_inout_detached(&n, &self.h_auth, self.out.as_mut_slice().into(), &tag)
            .map_err(|_| failed())?;
        self.inbuf.drain(..len);
        self.out_pos = 0;
        self.counter = self.counter.checked_add(1).ok_or_else(failed)?;
        if last {
            self.state = DecState::Done;
        }
        Ok(())
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for Decryptor<R> {
    fn read(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.out_pos < self.out.len() {
                let k = (self.out.len() - self.out_pos).min(dst.len());
                dst[..k].copy_from_slice(&self.out[self.out_pos..self.out_pos + k]);
                self.out_pos += k;
                return Ok(k);
            }
            match self.state {
                DecState::Done => return Ok(0),
                DecState::Failed => return Err(failed()),
                DecState::Reading => {
                    if let Err(e) = self.next_segment() {
                        self.state = DecState::Failed;
                        self.out.clear();
                        return Err(e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(segment_size: u32) -> RecordKey {
        RecordKey {
            dek: Zeroizing::new([9u8; 32]),
            h_auth: [3u8; 32],
            nonce_prefix: [1u8; 7],
            segment_size,
        }
    }

    fn seal(k: &RecordKey, counter: u32, last: bool, plain: &[u8]) -> Vec<u8> {
        let c = cipher(k).expect("key");
        let mut buf = plain.to_vec();
        let tag = c
            .encrypt_inout_detached(
                &nonce(&k.nonce_prefix, counter, last),
                &k.h_auth,
                buf.as_mut_slice().into(),
            )
            .expect("seal");
        buf.extend_from_slice(tag.as_slice());
        buf
    }

    #[test]
    fn hand_sealed_stream_matches_the_encryptor() {
        let k = key(1024);
        let plain = vec![7u8; 1500];
        let mut e = k.encryptor(Vec::new()).expect("enc");
        e.write_all(&plain).expect("write");
        let ct = e.finish().expect("finish");
        let mut expected = seal(&k, 0, false, &plain[..1024]);
        expected.extend(seal(&k, 1, true, &plain[1024..]));
        assert_eq!(ct, expected);
    }

    #[test]
    fn an_empty_last_segment_after_full_ones_is_refused() {
        let k = key(1024);
        let plain = vec![5u8; 1024];
        // The canonical form: one full last segment.
        let ok = seal(&k, 0, true, &plain);
        let mut out = Vec::new();
        k.decryptor(&ok[..])
            .expect("dec")
            .read_to_end(&mut out)
            .expect("canonical stream decrypts");
        assert_eq!(out, plain);
        // The other form: a full non-last segment, then an empty last one.
        let mut alt = seal(&k, 0, false, &plain);
        alt.extend(seal(&k, 1, true, &[]));
        assert!(
            k.decryptor(&alt[..])
                .expect("dec")
                .read_to_end(&mut Vec::new())
                .is_err()
        );
        // An empty payload is one empty last segment.
        let empty = seal(&k, 0, true, &[]);
        let mut out = Vec::new();
        k.decryptor(&empty[..])
            .expect("dec")
            .read_to_end(&mut out)
            .expect("empty payload");
        assert!(out.is_empty());
    }
}
