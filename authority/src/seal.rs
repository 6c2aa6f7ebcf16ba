//! Secrets at rest: AES-256-GCM under the node's key-encryption key (KEK),
//! with associated data binding each sealed value to what it is, so a sealed
//! secret moved to another row does not open. A dump of the database alone
//! reveals no secret.

use std::{fmt, path::Path};

use aes_gcm::{
    Aes256Gcm, KeyInit,
    aead::{Aead, Payload, array::Array},
};
use ark_std::rand::RngCore;
use zeroize::Zeroizing;

/// Format byte of a sealed value.
const SEALED_V1: u8 = 1;

/// Why a KEK could not be loaded or a value could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The KEK file or variable is missing or malformed.
    #[error("key-encryption key: {0}")]
    Kek(String),
    /// A sealed value does not open: wrong KEK, or the value was altered or
    /// moved to another row.
    #[error("sealed value does not open (wrong key-encryption key, or the data was altered)")]
    Open,
}

/// The 32-byte key-encryption key. Zeroized on drop, never printed.
pub struct Kek(Zeroizing<[u8; 32]>);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek(<secret>)")
    }
}

impl Kek {
    /// A fresh random KEK.
    pub fn generate<R: RngCore + ?Sized>(rng: &mut R) -> Kek {
        let mut k = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(k.as_mut());
        Kek(k)
    }

    /// Parse 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<Kek, SealError> {
        let t = text.trim();
        let mut k = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(t, k.as_mut())
            .map_err(|_| SealError::Kek("expected 64 hexadecimal digits".into()))?;
        Ok(Kek(k))
    }

    /// Read a KEK file (64 hex digits). Refuses a file readable by others.
    pub fn from_file(path: &Path) -> Result<Kek, SealError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path)
                .map_err(|e| SealError::Kek(format!("{}: {e}", path.display())))?;
            if meta.permissions().mode() & 0o077 != 0 {
                return Err(SealError::Kek(format!(
                    "{} is readable by group or others; run chmod 600 on it",
                    path.display()
                )));
            }
        }
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|e| SealError::Kek(format!("{}: {e}", path.display())))?,
        );
        Self::from_hex(&text)
    }

    /// Hex form, for writing a freshly generated KEK to a 0600 file.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }

    fn cipher(&self) -> Result<Aes256Gcm, SealError> {
        Aes256Gcm::new_from_slice(self.0.as_ref()).map_err(|_| SealError::Open)
    }

    /// Seal `secret` with associated data `ad`: `0x01 ‖ nonce (12) ‖ ciphertext ‖ tag`.
    pub fn seal<R: RngCore + ?Sized>(
        &self,
        rng: &mut R,
        ad: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        let ct = self
            .cipher()?
            .encrypt(
                &Array::from(nonce),
                Payload {
                    msg: secret,
                    aad: ad,
                },
            )
            .map_err(|_| SealError::Open)?;
        let mut out = Vec::with_capacity(13 + ct.len());
        out.push(SEALED_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Open a value sealed with the same `ad`.
    pub fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let (head, rest) = sealed.split_first().ok_or(SealError::Open)?;
        if *head != SEALED_V1 || rest.len() < 12 + 16 {
            return Err(SealError::Open);
        }
        let (nonce, ct) = rest.split_at(12);
        let mut n = [0u8; 12];
        n.copy_from_slice(nonce);
        self.cipher()?
            .decrypt(&Array::from(n), Payload { msg: ct, aad: ad })
            .map(Zeroizing::new)
            .map_err(|_| SealError::Open)
    }
}

fn lp(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// AD of an attribute secret: `"MABE-V1-SEAL-ATTR" ‖ lp(authority) ‖ lp(attribute) ‖ be32(version)`.
pub fn attribute_ad(authority: &str, attribute: &str, version: u32) -> Vec<u8> {
    let mut ad = b"MABE-V1-SEAL-ATTR".to_vec();
    lp(&mut ad, authority.as_bytes());
    lp(&mut ad, attribute.as_bytes());
    ad.extend_from_slice(&version.to_be_bytes());
    ad
}

/// AD of a rotation's update secret:
/// `"MABE-V1-SEAL-UPDATE" ‖ lp(authority) ‖ lp(attribute) ‖ be32(from_version)`.
pub fn update_ad(authority: &str, attribute: &str, from_version: u32) -> Vec<u8> {
    let mut ad = b"MABE-V1-SEAL-UPDATE".to_vec();
    lp(&mut ad, authority.as_bytes());
    lp(&mut ad, attribute.as_bytes());
    ad.extend_from_slice(&from_version.to_be_bytes());
    ad
}

/// AD of the identity key: `"MABE-V1-SEAL-IDENTITY" ‖ lp(authority)`.
pub fn identity_ad(authority: &str) -> Vec<u8> {
    let mut ad = b"MABE-V1-SEAL-IDENTITY".to_vec();
    lp(&mut ad, authority.as_bytes());
    ad
}

#[cfg(test)]
mod tests {
    use super::*;
    use ark_std::rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn sealed_values_open_only_with_their_key_and_binding() {
        let mut rng = StdRng::seed_from_u64(1);
        let kek = Kek::generate(&mut rng);
        let ad = attribute_ad("hospital-a", "doctor@hospital-a", 1);
        let sealed = kek.seal(&mut rng, &ad, b"alpha and y").expect("seal");
        assert_eq!(&kek.open(&ad, &sealed).expect("open")[..], b"alpha and y");
        // Moved to another attribute or version: refused.
        assert!(
            kek.open(&attribute_ad("hospital-a", "doctor@hospital-a", 2), &sealed)
                .is_err()
        );
        assert!(
            kek.open(&attribute_ad("hospital-a", "nurse@hospital-a", 1), &sealed)
                .is_err()
        );
        // Another KEK, or any altered byte: refused.
        assert!(Kek::generate(&mut rng).open(&ad, &sealed).is_err());
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 1;
            assert!(kek.open(&ad, &t).is_err());
        }
        assert!(kek.open(&ad, &[]).is_err());
        let back = Kek::from_hex(&kek.to_hex()).expect("hex");
        assert_eq!(&back.open(&ad, &sealed).expect("open")[..], b"alpha and y");
        assert!(Kek::from_hex("abc").is_err());
        assert!(!format!("{kek:?}").contains(&kek.to_hex()[..8]));
    }
}
