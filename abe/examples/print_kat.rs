//! Prints the values pinned by the known-answer tests (egg, H(GID)).
use ark_serialize::CanonicalSerialize;
use sha2::{Digest, Sha256};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut egg = Vec::new();
    mabe_abe::egg().0.serialize_compressed(&mut egg)?;
    println!("egg = {}", hex::encode(&egg));
    println!("sha256(egg) = {}", hex::encode(Sha256::digest(&egg)));
    let gid = mabe_abe::Gid::derive("test-register", "alice")?;
    println!("gid(test-register, alice) = {gid}");
    let h = mabe_abe::HashedGid::new(gid)?;
    let mut hb = Vec::new();
    h.point().serialize_compressed(&mut hb)?;
    println!("H(gid) = {}", hex::encode(hb));
    Ok(())
}
