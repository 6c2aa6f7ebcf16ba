//! Offline key bundles, the file `mabe-authority issue --out` writes and
//! `mabe keys import` reads, and the signed directory file both sides use.
//!
//! A bundle has no signature of its own: every key in it is checked by the
//! pairing check against the authority's signed directory before it is
//! stored, so a bundle cannot smuggle in a key the authority did not issue.
//! Version 2 carries that signed directory, so that a person can import keys
//! from an authority that has no network endpoint (a patient's personal
//! authority) with nothing but the authority's pinned identity key:
//!
//! ```text
//! V1: "MABE-KEYS-V1" ‖ lp(authority) ‖ be32(n) ‖ n × lp(user key)
//! V2: "MABE-KEYS-V2" ‖ lp(authority) ‖ lp(signed directory file, may be empty)
//!                    ‖ be32(n) ‖ n × lp(user key)
//! signed directory file: "MABE-SDIR-V1" ‖ lp(body) ‖ lp(signature)
//! ```
//!
//! User keys are FORMAT.md `'K'` objects: at most [`MAX_KEYS`] keys of at
//! most [`MAX_KEY_BYTES`] each; a directory body is at most
//! [`MAX_DIRECTORY_BYTES`]; no trailing bytes. Both versions decode; new
//! bundles are version 2.

use zeroize::Zeroizing;

use crate::signing::MAX_DIRECTORY_BYTES;

/// Magic at the start of a version-1 bundle (no directory).
pub const MAGIC: &[u8] = b"MABE-KEYS-V1";
/// Magic at the start of a version-2 bundle (with the signed directory).
pub const MAGIC_V2: &[u8] = b"MABE-KEYS-V2";
/// Magic of a signed directory file.
pub const SDIR_MAGIC: &[u8] = b"MABE-SDIR-V1";
/// Most keys in one bundle.
pub const MAX_KEYS: usize = 4096;
/// Largest encoded user key accepted.
pub const MAX_KEY_BYTES: usize = 1024;
/// Length of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// Why a bundle or directory file did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleError(pub &'static str);

impl std::fmt::Display for BundleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed key bundle or directory file: {}", self.0)
    }
}

impl std::error::Error for BundleError {}

/// A decoded bundle.
#[derive(Debug)]
pub struct Bundle {
    /// The issuing authority's id (as written; validate before use).
    pub authority: String,
    /// The authority's signed directory file, if the bundle carries one
    /// (decode it with [`decode_signed_directory`], then verify it).
    pub directory: Option<Vec<u8>>,
    /// The encoded user keys (wiped on drop).
    pub keys: Vec<Zeroizing<Vec<u8>>>,
}

/// Encode a signed directory file: `"MABE-SDIR-V1" ‖ lp(body) ‖ lp(signature)`.
///
/// ```
/// use mabe_proto::bundle::{decode_signed_directory, encode_signed_directory};
/// let f = encode_signed_directory(b"body", &[7; 64]);
/// assert_eq!(decode_signed_directory(&f)?, (b"body".to_vec(), vec![7; 64]));
/// # Ok::<(), mabe_proto::bundle::BundleError>(())
/// ```
pub fn encode_signed_directory(body: &[u8], signature: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SDIR_MAGIC.len() + 8 + body.len() + signature.len());
    out.extend_from_slice(SDIR_MAGIC);
    put_lp(&mut out, body);
    put_lp(&mut out, signature);
    out
}

/// Decode a signed directory file into `(body, signature)` (bounded, no
/// trailing bytes). Verifies nothing: check the signature against the
/// pinned identity key before believing the body.
pub fn decode_signed_directory(b: &[u8]) -> Result<(Vec<u8>, Vec<u8>), BundleError> {
    let rest = b
        .strip_prefix(SDIR_MAGIC)
        .ok_or(BundleError("not a signed directory file"))?;
    let mut cur = Cursor { b: rest, pos: 0 };
    let body = cur.lp(MAX_DIRECTORY_BYTES, "directory too long")?.to_vec();
    let signature = cur.lp(SIGNATURE_LEN, "signature too long")?.to_vec();
    cur.finish()?;
    Ok((body, signature))
}

/// Encode a version-2 bundle, with the authority's signed directory file
/// (empty: none). The result holds secret keys: it is wiped on drop.
///
/// ```
/// use mabe_proto::bundle::{decode, encode};
/// let b = encode("family-of-jansen", b"", &[vec![1, 2, 3]]);
/// let bundle = decode(&b)?;
/// assert_eq!(bundle.authority, "family-of-jansen");
/// assert_eq!(bundle.keys[0].as_slice(), &[1u8, 2, 3][..]);
/// assert!(bundle.directory.is_none());
/// # Ok::<(), mabe_proto::bundle::BundleError>(())
/// ```
pub fn encode(authority: &str, directory: &[u8], keys: &[Vec<u8>]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(64 + directory.len() + keys.len() * 200));
    out.extend_from_slice(MAGIC_V2);
    put_lp(&mut out, authority.as_bytes());
    put_lp(&mut out, directory);
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        put_lp(&mut out, k);
    }
    out
}

/// Decode a bundle of either version.
pub fn decode(b: &[u8]) -> Result<Bundle, BundleError> {
    let (rest, v2) = if let Some(rest) = b.strip_prefix(MAGIC_V2) {
        (rest, true)
    } else if let Some(rest) = b.strip_prefix(MAGIC) {
        (rest, false)
    } else {
        return Err(BundleError("not a mabe key bundle"));
    };
    let mut cur = Cursor { b: rest, pos: 0 };
    let authority = std::str::from_utf8(cur.lp(64, "authority id too long")?)
        .map_err(|_| BundleError("authority id is not UTF-8"))?
        .to_owned();
    let directory = if v2 {
        let d = cur.lp(
            SDIR_MAGIC.len() + 8 + MAX_DIRECTORY_BYTES + SIGNATURE_LEN,
            "directory too long",
        )?;
        (!d.is_empty()).then(|| d.to_vec())
    } else {
        None
    };
    let n = cur.u32()?;
    if n > MAX_KEYS {
        return Err(BundleError("too many keys"));
    }
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        keys.push(Zeroizing::new(
            cur.lp(MAX_KEY_BYTES, "key too long")?.to_vec(),
        ));
    }
    cur.finish()?;
    Ok(Bundle {
        authority,
        directory,
        keys,
    })
}

fn put_lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BundleError> {
        let end = self.pos.checked_add(n).ok_or(BundleError("truncated"))?;
        let s = self.b.get(self.pos..end).ok_or(BundleError("truncated"))?;
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<usize, BundleError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a) as usize)
    }
    fn lp(&mut self, max: usize, too_long: &'static str) -> Result<&'a [u8], BundleError> {
        let len = self.u32()?;
        if len > max {
            return Err(BundleError(too_long));
        }
        self.take(len)
    }
    fn finish(&self) -> Result<(), BundleError> {
        if self.pos == self.b.len() {
            Ok(())
        } else {
            Err(BundleError("trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1(authority: &str, keys: &[Vec<u8>]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        put_lp(&mut out, authority.as_bytes());
        out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
        for k in keys {
            put_lp(&mut out, k);
        }
        out
    }

    #[test]
    fn round_trip_and_refusals() {
        let keys = vec![vec![7u8; 200], vec![9u8; 150]];
        let dir = encode_signed_directory(b"a directory body", &[5; 64]);
        for (b, directory) in [
            (
                encode("hospital-a", &dir, &keys).to_vec(),
                Some(dir.clone()),
            ),
            (encode("hospital-a", b"", &keys).to_vec(), None),
            (v1("hospital-a", &keys), None),
        ] {
            let d = decode(&b).expect("decodes");
            assert_eq!(d.authority, "hospital-a");
            assert_eq!(d.directory, directory);
            assert_eq!(d.keys.iter().map(|k| k.to_vec()).collect::<Vec<_>>(), keys);
            let mut long = b.clone();
            long.push(0);
            assert_eq!(decode(&long).err(), Some(BundleError("trailing bytes")));
            for cut in 0..b.len() {
                assert!(decode(&b[..cut]).is_err(), "cut {cut}");
            }
        }
        assert!(decode(b"MABE-KEYS-V3").is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend(1u32.to_be_bytes());
        huge.push(b'a');
        huge.extend(u32::MAX.to_be_bytes());
        assert_eq!(decode(&huge).err(), Some(BundleError("too many keys")));
        let mut long_dir = MAGIC_V2.to_vec();
        put_lp(&mut long_dir, b"a");
        long_dir.extend(u32::MAX.to_be_bytes());
        assert_eq!(
            decode(&long_dir).err(),
            Some(BundleError("directory too long"))
        );
    }

    #[test]
    fn signed_directory_file_refusals() {
        let f = encode_signed_directory(b"body", &[1; 64]);
        for cut in 0..f.len() {
            assert!(decode_signed_directory(&f[..cut]).is_err(), "cut {cut}");
        }
        let mut long = f.clone();
        long.push(0);
        assert!(decode_signed_directory(&long).is_err());
        let bad_sig = encode_signed_directory(b"body", &[1; 65]);
        assert_eq!(
            decode_signed_directory(&bad_sig).err(),
            Some(BundleError("signature too long"))
        );
    }
}
