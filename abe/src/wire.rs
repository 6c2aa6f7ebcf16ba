//! Byte-level encoding helpers shared by every wire object (FORMAT.md §1).
//!
//! Every object starts with `"MABE" ‖ kind ‖ format_version`. Group elements
//! are decoded with full validation (curve equation, prime-order subgroup,
//! canonical encoding, no identity); a decode must consume its input exactly.

use ark_bls12_381::{Fq12, Fr, G1Affine, G2Affine};
use ark_ec::AffineRepr;
use ark_ff::Zero;
use ark_serialize::{CanonicalDeserialize, CanonicalSerialize, Compress, Validate};

use crate::{AbeError, group::Gt};

/// Magic bytes at the start of every encoded object.
pub const MAGIC: &[u8; 4] = b"MABE";
/// Format version of every object kind defined here.
pub const FORMAT_VERSION: u8 = 1;
/// Size of a compressed G1 point.
pub const G1_LEN: usize = 48;
/// Size of a compressed G2 point.
pub const G2_LEN: usize = 96;
/// Size of a GT element (arkworks canonical Fq12).
pub const GT_LEN: usize = 576;
/// Size of a scalar.
pub const FR_LEN: usize = 32;

/// Object kinds (the fifth byte of every encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Kind {
    Header = b'H',
    PublicKey = b'P',
    SecretKey = b'S',
    UserKey = b'K',
    UpdateSecret = b'U',
    Token = b'T',
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Header => "ciphertext header",
            Kind::PublicKey => "attribute public key",
            Kind::SecretKey => "attribute secret key",
            Kind::UserKey => "user key",
            Kind::UpdateSecret => "update secret",
            Kind::Token => "update token",
        }
    }
}

/// Append-only encoder.
pub(crate) struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(kind: Kind, capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity + 6);
        buf.extend_from_slice(MAGIC);
        buf.push(kind as u8);
        buf.push(FORMAT_VERSION);
        Writer { buf }
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// 32-bit big-endian length prefix, then the bytes. Callers keep every
    /// length far below 4 GiB (limits are enforced on construction).
    pub(crate) fn lp(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).unwrap_or(u32::MAX));
        self.bytes(b);
    }
    pub(crate) fn g1(&mut self, p: &G1Affine) {
        self.bytes(&g1_bytes(p));
    }
    pub(crate) fn g2(&mut self, p: &G2Affine) {
        self.bytes(&g2_bytes(p));
    }
    pub(crate) fn gt(&mut self, g: &Gt) {
        self.bytes(&gt_bytes(g));
    }
    pub(crate) fn fr(&mut self, s: &Fr) {
        self.bytes(&fr_bytes(s));
    }
    pub(crate) fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Compressed (ZCash) encoding of a G1 point.
pub(crate) fn g1_bytes(p: &G1Affine) -> [u8; G1_LEN] {
    let mut out = [0u8; G1_LEN];
    // Writing into a fixed slice of exactly the compressed size cannot fail.
    let _ = p.serialize_compressed(&mut out[..]);
    out
}

/// Compressed (ZCash) encoding of a G2 point.
pub(crate) fn g2_bytes(p: &G2Affine) -> [u8; G2_LEN] {
    let mut out = [0u8; G2_LEN];
    let _ = p.serialize_compressed(&mut out[..]);
    out
}

/// arkworks canonical encoding of a GT element (12 Fq coefficients, little-endian).
pub(crate) fn gt_bytes(g: &Gt) -> [u8; GT_LEN] {
    let mut out = [0u8; GT_LEN];
    let _ = g.0.serialize_compressed(&mut out[..]);
    out
}

/// 32-byte little-endian canonical encoding of a scalar.
pub(crate) fn fr_bytes(s: &Fr) -> [u8; FR_LEN] {
    let mut out = [0u8; FR_LEN];
    let _ = s.serialize_compressed(&mut out[..]);
    out
}

/// Decode a compressed G1 point: on the curve, in the subgroup, not the
/// identity, and the unique canonical encoding.
pub fn decode_g1(bytes: &[u8], what: &'static str) -> Result<G1Affine, AbeError> {
    let bad = |reason| AbeError::Malformed { what, reason };
    if bytes.len() != G1_LEN {
        return Err(bad("a G1 point is 48 bytes"));
    }
    let p = G1Affine::deserialize_with_mode(bytes, Compress::Yes, Validate::Yes)
        .map_err(|_| bad("not a valid compressed G1 point in the prime-order subgroup"))?;
    if p.is_zero() {
        return Err(bad("the identity is not allowed here"));
    }
    if g1_bytes(&p).as_slice() != bytes {
        return Err(bad("non-canonical point encoding"));
    }
    Ok(p)
}

/// Decode a compressed G2 point with the same checks as [`decode_g1`].
pub fn decode_g2(bytes: &[u8], what: &'static str) -> Result<G2Affine, AbeError> {
    let bad = |reason| AbeError::Malformed { what, reason };
    if bytes.len() != G2_LEN {
        return Err(bad("a G2 point is 96 bytes"));
    }
    let p = G2Affine::deserialize_with_mode(bytes, Compress::Yes, Validate::Yes)
        .map_err(|_| bad("not a valid compressed G2 point in the prime-order subgroup"))?;
    if p.is_zero() {
        return Err(bad("the identity is not allowed here"));
    }
    if g2_bytes(&p).as_slice() != bytes {
        return Err(bad("non-canonical point encoding"));
    }
    Ok(p)
}

/// Decode a GT element: canonical coefficients, non-zero, and a member of the
/// order-r subgroup (checked with the fast cyclotomic + Frobenius test).
pub fn decode_gt(bytes: &[u8], what: &'static str) -> Result<Gt, AbeError> {
    let bad = |reason| AbeError::Malformed { what, reason };
    if bytes.len() != GT_LEN {
        return Err(bad("a GT element is 576 bytes"));
    }
    // Validate::No skips only the (slow, generic) subgroup test; canonical
    // coefficients are still enforced, and we run our own membership test.
    let f = Fq12::deserialize_with_mode(bytes, Compress::No, Validate::No)
        .map_err(|_| bad("non-canonical GT encoding"))?;
    if !crate::group::gt_in_subgroup(&f) {
        return Err(bad("not an element of the pairing target group"));
    }
    let g = ark_ec::pairing::PairingOutput(f);
    if gt_bytes(&g).as_slice() != bytes {
        return Err(bad("non-canonical GT encoding"));
    }
    Ok(g)
}

/// Decode a canonical little-endian scalar.
pub fn decode_fr(bytes: &[u8], what: &'static str) -> Result<Fr, AbeError> {
    let bad = |reason| AbeError::Malformed { what, reason };
    if bytes.len() != FR_LEN {
        return Err(bad("a scalar is 32 bytes"));
    }
    let s = Fr::deserialize_with_mode(bytes, Compress::Yes, Validate::Yes)
        .map_err(|_| bad("non-canonical scalar (not below the group order)"))?;
    if fr_bytes(&s).as_slice() != bytes {
        return Err(bad("non-canonical scalar"));
    }
    Ok(s)
}

/// Bounds-checked decoder over a byte slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Start decoding an object of `kind`, checking magic, kind and version
    /// and an overall size limit.
    pub(crate) fn new(buf: &'a [u8], kind: Kind, max_len: usize) -> Result<Self, AbeError> {
        let what = kind.name();
        if buf.len() > max_len {
            return Err(AbeError::Malformed {
                what,
                reason: "larger than the size limit",
            });
        }
        let mut r = Reader { buf, pos: 0, what };
        if r.take(4)? != MAGIC {
            return Err(r.bad("bad magic (not a mabe object)"));
        }
        if r.u8()? != kind as u8 {
            return Err(r.bad("wrong object kind"));
        }
        if r.u8()? != FORMAT_VERSION {
            return Err(r.bad("unsupported format version"));
        }
        Ok(r)
    }

    pub(crate) fn bad(&self, reason: &'static str) -> AbeError {
        AbeError::Malformed {
            what: self.what,
            reason,
        }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], AbeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(AbeError::Malformed {
                what: self.what,
                reason: "truncated",
            })?;
        let s = self.buf.get(self.pos..end).ok_or(AbeError::Malformed {
            what: self.what,
            reason: "truncated",
        })?;
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], AbeError> {
        let s = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, AbeError> {
        Ok(self.array::<1>()?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, AbeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, AbeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// An attribute version (never 0: versions start at 1).
    pub(crate) fn version(&mut self) -> Result<crate::Version, AbeError> {
        match self.u32()? {
            0 => Err(self.bad("version 0 does not exist")),
            v => Ok(crate::Version::new(v)),
        }
    }
    /// A length-prefixed byte string of at most `max` bytes.
    pub(crate) fn lp(&mut self, max: usize) -> Result<&'a [u8], AbeError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(self.bad("length prefix over its limit"));
        }
        self.take(len)
    }
    /// A length-prefixed UTF-8 string of at most `max` bytes.
    pub(crate) fn str(&mut self, max: usize) -> Result<&'a str, AbeError> {
        let b = self.lp(max)?;
        std::str::from_utf8(b).map_err(|_| self.bad("text is not UTF-8"))
    }
    pub(crate) fn g1(&mut self) -> Result<G1Affine, AbeError> {
        let w = self.what;
        decode_g1(self.take(G1_LEN)?, w)
    }
    pub(crate) fn g2(&mut self) -> Result<G2Affine, AbeError> {
        let w = self.what;
        decode_g2(self.take(G2_LEN)?, w)
    }
    pub(crate) fn gt(&mut self) -> Result<Gt, AbeError> {
        let w = self.what;
        decode_gt(self.take(GT_LEN)?, w)
    }
    pub(crate) fn fr(&mut self) -> Result<Fr, AbeError> {
        let w = self.what;
        decode_fr(self.take(FR_LEN)?, w)
    }
    /// Non-zero scalar (secrets are never zero).
    pub(crate) fn fr_nonzero(&mut self) -> Result<Fr, AbeError> {
        let s = self.fr()?;
        if s.is_zero() {
            return Err(self.bad("zero scalar"));
        }
        Ok(s)
    }
    /// The input must be used up exactly.
    pub(crate) fn finish(self) -> Result<(), AbeError> {
        if self.pos != self.buf.len() {
            return Err(self.bad("trailing bytes"));
        }
        Ok(())
    }
}
