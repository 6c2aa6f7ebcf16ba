//! Payload (STREAM AES-256-GCM) decryption of arbitrary bytes under a fixed
//! record key (`mabe_fuzz::payload_key`, 1 KiB segments).
//!
//! Decryption never panics; once it fails, it keeps failing; and whatever
//! decrypts is exactly what encrypting its plaintext again gives (the stream
//! is deterministic for a given key, so anything else would be a forgery or
//! a framing bug).
#![no_main]

use std::{
    io::{Read, Write},
    sync::OnceLock,
};

use libfuzzer_sys::fuzz_target;
use mabe_abe::RecordKey;

static KEY: OnceLock<RecordKey> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let key = KEY.get_or_init(mabe_fuzz::payload_key);
    let mut decryptor = key.decryptor(data).expect("decryptor");
    let mut plain = Vec::new();
    match decryptor.read_to_end(&mut plain) {
        Ok(_) => {
            let mut encryptor = key.encryptor(Vec::new()).expect("encryptor");
            encryptor.write_all(&plain).expect("encrypt");
            let again = encryptor.finish().expect("finish");
            assert_eq!(
                again, data,
                "accepted a payload that is not the encryption of its plaintext"
            );
        }
        Err(_) => {
            let mut byte = [0u8; 1];
            assert!(
                decryptor.read(&mut byte).is_err(),
                "a failed decryptor returned data or end of stream"
            );
        }
    }
});
