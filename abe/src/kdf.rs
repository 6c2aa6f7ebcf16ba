//! Domain-separation tags and scalar derivation (DESIGN §2, FORMAT.md §2).

use ark_bls12_381::Fr;
use ark_ff::PrimeField;
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Prefix of the GID hash.
pub const TAG_GID: &[u8] = b"MABE-V1-GID";
/// Prefix of the immutable-header hash `H_imm`.
pub const TAG_HDR: &[u8] = b"MABE-V1-HDR";
/// HKDF-Extract salt for the FO coins.
pub const TAG_FO: &[u8] = b"MABE-V1-FO";
/// HKDF salt for the mask of `m`.
pub const TAG_MASK: &[u8] = b"MABE-V1-MASK";
/// HKDF info for the DEM key and key commitment.
pub const TAG_DEM: &[u8] = b"MABE-V1-DEM";
/// RFC 9380 DST for `H(GID)`.
pub const DST_GID: &[u8] = b"MABE-V01-CS01-with-BLS12381G2_XMD:SHA-256_SSWU_RO_GID_";

/// `HS(prk, info) = OS2IP(HKDF-Expand(prk, info, 64)) mod r`, with `info` the
/// concatenation of `parts`.
pub(crate) fn hs(prk: &Hkdf<Sha256>, parts: &[&[u8]]) -> Fr {
    let mut okm = Zeroizing::new([0u8; 64]);
    // 64 bytes is far below HKDF-SHA-256's 8160-byte output limit.
    let _ = prk.expand_multi_info(parts, okm.as_mut());
    Fr::from_be_bytes_mod_order(okm.as_ref())
}
