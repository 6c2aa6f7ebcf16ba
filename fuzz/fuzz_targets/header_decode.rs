//! Ciphertext header decoding on arbitrary bytes.
//!
//! Decoding never panics, and it is canonical: a header that decodes
//! re-encodes to exactly the input bytes, and decodes again to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mabe_abe::Header;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = Header::from_bytes(data) else {
        return;
    };
    let bytes = header.to_bytes();
    assert_eq!(bytes, data, "a decoded header re-encodes to other bytes");
    let again = Header::from_bytes(&bytes).expect("a re-encoded header decodes");
    assert_eq!(again, header);
    assert_eq!(header.rows().len(), header.policy().leaf_count());
    assert_eq!(header.policy().to_string(), header.policy_text());
    // The hashes over a decoded header must not panic either.
    let _ = (header.h_imm(), header.h_auth());
});
