//! Offline key bundles: the file `mabe-authority issue --out` writes and
//! `mabe keys import` reads. No signature: every key in it is checked by the
//! pairing check against the authority's signed directory before it is
//! stored, so a bundle cannot smuggle in a key the authority did not issue.
//!
//! `"MABE-KEYS-V1" ‖ lp(authority) ‖ be32(n) ‖ n × lp(user key)` (FORMAT.md 'K'
//! objects), at most 4096 keys of at most 1 KiB each, no trailing bytes.

use zeroize::Zeroizing;

/// Magic at the start of a bundle.
pub const MAGIC: &[u8] = b"MABE-KEYS-V1";
/// Most keys in one bundle.
pub const MAX_KEYS: usize = 4096;
/// Largest encoded user key accepted.
pub const MAX_KEY_BYTES: usize = 1024;

/// Why a bundle did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleError(pub &'static str);

impl std::fmt::Display for BundleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed key bundle: {}", self.0)
    }
}

impl std::error::Error for BundleError {}

/// Encode a bundle. The result holds secret keys: it is wiped on drop.
///
/// ```
/// let b = mabe_proto::bundle::encode("family-of-jansen", &[vec![1, 2, 3]]);
/// let (authority, keys) = mabe_proto::bundle::decode(&b)?;
/// assert_eq!((authority.as_str(), keys[0].as_slice()), ("family-of-jansen", &[1u8, 2, 3][..]));
/// # Ok::<(), mabe_proto::bundle::BundleError>(())
/// ```
pub fn encode(authority: &str, keys: &[Vec<u8>]) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(32 + keys.len() * 200));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(authority.len() as u32).to_be_bytes());
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    for k in keys {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
    }
    out
}

/// A decoded bundle: the authority id and the encoded keys (wiped on drop).
pub type Decoded = (String, Vec<Zeroizing<Vec<u8>>>);

/// Decode a bundle into the authority id and the encoded keys.
pub fn decode(b: &[u8]) -> Result<Decoded, BundleError> {
    let rest = b
        .strip_prefix(MAGIC)
        .ok_or(BundleError("not a mabe key bundle"))?;
    let mut cur = Cursor { b: rest, pos: 0 };
    let alen = cur.u32()?;
    if alen > 64 {
        return Err(BundleError("authority id too long"));
    }
    let authority = std::str::from_utf8(cur.take(alen)?)
        .map_err(|_| BundleError("authority id is not UTF-8"))?
        .to_owned();
    let n = cur.u32()?;
    if n > MAX_KEYS {
        return Err(BundleError("too many keys"));
    }
    let mut keys = Vec::with_capacity(n);
    for _ in 0..n {
        let len = cur.u32()?;
        if len > MAX_KEY_BYTES {
            return Err(BundleError("key too long"));
        }
        keys.push(Zeroizing::new(cur.take(len)?.to_vec()));
    }
    if cur.pos != rest.len() {
        return Err(BundleError("trailing bytes"));
    }
    Ok((authority, keys))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let keys = vec![vec![7u8; 200], vec![9u8; 150]];
        let b = encode("hospital-a", &keys);
        let (a, k) = decode(&b).expect("decodes");
        assert_eq!(a, "hospital-a");
        assert_eq!(k.iter().map(|k| k.to_vec()).collect::<Vec<_>>(), keys);
        let mut long = b.to_vec();
        long.push(0);
        assert!(decode(&long).is_err());
        for cut in 0..b.len() {
            assert!(decode(&b[..cut]).is_err(), "cut {cut}");
        }
        assert!(decode(b"MABE-KEYS-V2").is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend(1u32.to_be_bytes());
        huge.push(b'a');
        huge.extend(u32::MAX.to_be_bytes());
        assert_eq!(decode(&huge), Err(BundleError("too many keys")));
    }
}
