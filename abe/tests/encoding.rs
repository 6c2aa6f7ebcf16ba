//! Decoding refuses every malformed or non-canonical encoding; RFC 9380
//! vectors pin hash-to-curve; a known answer pins the GT serialization.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use ark_bls12_381::{Fq, Fq2, Fq12, Fr, G1Affine, G2Affine};
use ark_ec::AffineRepr;
use ark_ff::{BigInteger, One, PrimeField, UniformRand, Zero};
use ark_serialize::CanonicalSerialize;
use common::World;
use mabe_abe::{
    AbeError, Gid, HashedGid, Header, UserKey,
    wire::{decode_fr, decode_g1, decode_g2, decode_gt},
};
use sha2::{Digest, Sha256};

fn ser<T: CanonicalSerialize>(t: &T) -> Vec<u8> {
    let mut v = Vec::new();
    t.serialize_compressed(&mut v).unwrap();
    v
}

fn be_hex(f: &Fq) -> String {
    hex::encode(f.into_bigint().to_bytes_be())
}

/// A point on E(Fq) outside the prime-order subgroup, and an x with no point.
fn g1_bad_points() -> (G1Affine, Fq) {
    let mut not_in_subgroup = None;
    let mut off_curve = None;
    for i in 1u64.. {
        let x = Fq::from(i);
        match G1Affine::get_point_from_x_unchecked(x, false) {
            Some(p) if !p.is_in_correct_subgroup_assuming_on_curve() => {
                not_in_subgroup.get_or_insert(p);
            }
            None => {
                off_curve.get_or_insert(x);
            }
            _ => {}
        }
        if let (Some(p), Some(x)) = (not_in_subgroup, off_curve) {
            return (p, x);
        }
    }
    unreachable!()
}

fn g2_bad_points() -> (G2Affine, Fq2) {
    let mut not_in_subgroup = None;
    let mut off_curve = None;
    for i in 1u64.. {
        let x = Fq2::new(Fq::from(i), Fq::one());
        match G2Affine::get_point_from_x_unchecked(x, false) {
            Some(p) if !p.is_in_correct_subgroup_assuming_on_curve() => {
                not_in_subgroup.get_or_insert(p);
            }
            None => {
                off_curve.get_or_insert(x);
            }
            _ => {}
        }
        if let (Some(p), Some(x)) = (not_in_subgroup, off_curve) {
            return (p, x);
        }
    }
    unreachable!()
}

fn modulus_be() -> Vec<u8> {
    Fq::MODULUS.to_bytes_be()
}

#[test]
fn g1_decoding_refuses_bad_points() {
    let g = G1Affine::generator();
    assert_eq!(decode_g1(&ser(&g), "t").unwrap(), g);
    let (outside, off_x) = g1_bad_points();
    // On the curve (arkworks' unchecked path accepts it) but not in G1.
    let enc = ser(&outside);
    assert!(
        ark_serialize::CanonicalDeserialize::deserialize_compressed_unchecked(&enc[..])
            .map(|p: G1Affine| p.is_on_curve())
            .unwrap()
    );
    assert!(decode_g1(&enc, "t").is_err());
    // x with no point on the curve.
    let mut enc = off_x.into_bigint().to_bytes_be();
    enc[0] |= 0x80;
    assert!(decode_g1(&enc, "t").is_err());
    // x ≥ p (non-canonical field element).
    let mut enc = modulus_be();
    enc[0] |= 0x80;
    assert!(decode_g1(&enc, "t").is_err());
    // Identity, and second encodings of it.
    let mut id = vec![0u8; 48];
    id[0] = 0xc0;
    assert!(decode_g1(&id, "t").is_err());
    let mut id2 = id.clone();
    id2[47] = 1;
    assert!(decode_g1(&id2, "t").is_err());
    id2 = id.clone();
    id2[0] = 0xe0;
    assert!(decode_g1(&id2, "t").is_err());
    assert!(decode_g1(&[0u8; 48], "t").is_err());
    // Missing compression flag, wrong sort flag, wrong lengths.
    let mut enc = ser(&g);
    enc[0] &= 0x7f;
    assert!(decode_g1(&enc, "t").is_err());
    let mut enc = ser(&g);
    enc[0] ^= 0x20;
    assert_ne!(decode_g1(&enc, "t").ok(), Some(g));
    let mut long = ser(&g);
    long.push(0);
    assert!(decode_g1(&long, "t").is_err());
    assert!(decode_g1(&ser(&g)[..47], "t").is_err());
}

#[test]
fn g2_decoding_refuses_bad_points() {
    let g = G2Affine::generator();
    assert_eq!(decode_g2(&ser(&g), "t").unwrap(), g);
    let (outside, off_x) = g2_bad_points();
    assert!(decode_g2(&ser(&outside), "t").is_err());
    // Compressed G2 writes x.c1 then x.c0.
    let mut enc = off_x.c1.into_bigint().to_bytes_be();
    enc.extend(off_x.c0.into_bigint().to_bytes_be());
    enc[0] |= 0x80;
    assert!(decode_g2(&enc, "t").is_err());
    let mut enc = modulus_be();
    enc.extend(modulus_be());
    enc[0] |= 0x80;
    assert!(decode_g2(&enc, "t").is_err());
    let mut id = vec![0u8; 96];
    id[0] = 0xc0;
    assert!(decode_g2(&id, "t").is_err());
    id[95] = 1;
    assert!(decode_g2(&id, "t").is_err());
    let mut long = ser(&g);
    long.push(0);
    assert!(decode_g2(&long, "t").is_err());
}

#[test]
fn gt_and_scalar_decoding_refuse_non_members_and_non_canonical_values() {
    let egg = mabe_abe::egg();
    assert_eq!(decode_gt(&ser(&egg.0), "t").unwrap(), egg);
    let mut rng = common::rng(40);
    let random = Fq12::rand(&mut rng);
    assert!(decode_gt(&ser(&random), "t").is_err());
    assert!(decode_gt(&ser(&Fq12::zero()), "t").is_err());
    // One coefficient equal to p.
    let mut enc = ser(&egg.0);
    let mut p_le = Fq::MODULUS.to_bytes_le();
    p_le.resize(48, 0);
    enc[..48].copy_from_slice(&p_le);
    assert!(decode_gt(&enc, "t").is_err());
    assert!(decode_gt(&ser(&egg.0)[..575], "t").is_err());

    let r_minus_1 = -Fr::one();
    assert_eq!(decode_fr(&ser(&r_minus_1), "t").unwrap(), r_minus_1);
    let mut r_le = Fr::MODULUS.to_bytes_le();
    r_le.resize(32, 0);
    assert!(decode_fr(&r_le, "t").is_err());
    assert!(decode_fr(&[0xff; 32], "t").is_err());
}

#[test]
fn header_and_key_decoding_refuse_substituted_points_and_trailing_bytes() {
    let mut w = World::new(&["a@x"], 41);
    let ring = w.person("u", &["a@x"]);
    let (header, _) = w.encrypt("a@x", b"z");
    let bytes = header.to_bytes();
    assert_eq!(Header::from_bytes(&bytes).unwrap(), header);
    let mut long = bytes.clone();
    long.push(0);
    assert!(matches!(
        Header::from_bytes(&long),
        Err(AbeError::Malformed {
            reason: "trailing bytes",
            ..
        })
    ));
    assert!(Header::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    assert!(Header::from_bytes(&[]).is_err());
    // Replace C2 (right after version and C1) by a point outside G1.
    let c2_at = bytes.len() - (32 + 7 + 4 + 32) - 48 - 48;
    let (outside, _) = g1_bad_points();
    let mut t = bytes.clone();
    t[c2_at..c2_at + 48].copy_from_slice(&ser(&outside));
    assert!(Header::from_bytes(&t).is_err());
    // Replace C1 by a random Fq12 (not in GT).
    let c1_at = c2_at - 576;
    let mut t = bytes.clone();
    t[c1_at..c1_at + 576].copy_from_slice(&ser(&Fq12::rand(&mut w.rng)));
    assert!(Header::from_bytes(&t).is_err());
    // A user key whose K is outside G2.
    let key = ring.get(&"a@x".parse().unwrap()).unwrap();
    let mut kb = key.to_bytes().to_vec();
    let n = kb.len();
    let (outside2, _) = g2_bad_points();
    kb[n - 96..].copy_from_slice(&ser(&outside2));
    assert!(UserKey::from_bytes(&kb).is_err());
    // Version 0 does not exist.
    let mut kb0 = key.to_bytes().to_vec();
    let at = kb0.len() - 96 - 4;
    kb0[at..at + 4].copy_from_slice(&0u32.to_be_bytes());
    assert!(UserKey::from_bytes(&kb0).is_err());
    // Wrong magic, kind and version.
    for i in 0..6 {
        let mut t = bytes.clone();
        t[i] ^= 0xff;
        assert!(Header::from_bytes(&t).is_err());
    }
    // A non-canonical policy text (extra spaces) is refused.
    let text = header.policy_text();
    let mut t = bytes[..6 + 2 + 16].to_vec();
    let padded = format!(" {text}");
    t.extend((padded.len() as u32).to_be_bytes());
    t.extend(padded.as_bytes());
    t.extend(&bytes[6 + 2 + 16 + 4 + text.len()..]);
    assert!(Header::from_bytes(&t).is_err());
}

// RFC 9380 appendix J.10.1 (BLS12381G2_XMD:SHA-256_SSWU_RO_) and J.9.1 (G1).
const G2_DST: &[u8] = b"QUUX-V01-CS02-with-BLS12381G2_XMD:SHA-256_SSWU_RO_";
const G1_DST: &[u8] = b"QUUX-V01-CS02-with-BLS12381G1_XMD:SHA-256_SSWU_RO_";

fn rfc_msgs() -> Vec<Vec<u8>> {
    vec![
        b"".to_vec(),
        b"abc".to_vec(),
        b"abcdef0123456789".to_vec(),
        [b"q128_".to_vec(), vec![b'q'; 128]].concat(),
        [b"a512_".to_vec(), vec![b'a'; 512]].concat(),
    ]
}

#[test]
fn rfc9380_hash_to_g2_vectors() {
    // (x.c0, x.c1, y.c0, y.c1) for msg "", "abc", "abcdef0123456789", q128_, a512_.
    let expected = [
        [
            "0141ebfbdca40eb85b87142e130ab689c673cf60f1a3e98d69335266f30d9b8d4ac44c1038e9dcdd5393faf5c41fb78a",
            "05cb8437535e20ecffaef7752baddf98034139c38452458baeefab379ba13dff5bf5dd71b72418717047f5b0f37da03d",
            "0503921d7f6a12805e72940b963c0cf3471c7b2a524950ca195d11062ee75ec076daf2d4bc358c4b190c0c98064fdd92",
            "12424ac32561493f3fe3c260708a12b7c620e7be00099a974e259ddc7d1f6395c3c811cdd19f1e8dbf3e9ecfdcbab8d6",
        ],
        [
            "02c2d18e033b960562aae3cab37a27ce00d80ccd5ba4b7fe0e7a210245129dbec7780ccc7954725f4168aff2787776e6",
            "139cddbccdc5e91b9623efd38c49f81a6f83f175e80b06fc374de9eb4b41dfe4ca3a230ed250fbe3a2acf73a41177fd8",
            "1787327b68159716a37440985269cf584bcb1e621d3a7202be6ea05c4cfe244aeb197642555a0645fb87bf7466b2ba48",
            "00aa65dae3c8d732d10ecd2c50f8a1baf3001578f71c694e03866e9f3d49ac1e1ce70dd94a733534f106d4cec0eddd16",
        ],
        [
            "121982811d2491fde9ba7ed31ef9ca474f0e1501297f68c298e9f4c0028add35aea8bb83d53c08cfc007c1e005723cd0",
            "190d119345b94fbd15497bcba94ecf7db2cbfd1e1fe7da034d26cbba169fb3968288b3fafb265f9ebd380512a71c3f2c",
            "05571a0f8d3c08d094576981f4a3b8eda0a8e771fcdcc8ecceaf1356a6acf17574518acb506e435b639353c2e14827c8",
            "0bb5e7572275c567462d91807de765611490205a941a5a6af3b1691bfe596c31225d3aabdf15faff860cb4ef17c7c3be",
        ],
        [
            "19a84dd7248a1066f737cc34502ee5555bd3c19f2ecdb3c7d9e24dc65d4e25e50d83f0f77105e955d78f4762d33c17da",
            "0934aba516a52d8ae479939a91998299c76d39cc0c035cd18813bec433f587e2d7a4fef038260eef0cef4d02aae3eb91",
            "14f81cd421617428bc3b9fe25afbb751d934a00493524bc4e065635b0555084dd54679df1536101b2c979c0152d09192",
            "09bcccfa036b4847c9950780733633f13619994394c23ff0b32fa6b795844f4a0673e20282d07bc69641cee04f5e5662",
        ],
        [
            "01a6ba2f9a11fa5598b2d8ace0fbe0a0eacb65deceb476fbbcb64fd24557c2f4b18ecfc5663e54ae16a84f5ab7f62534",
            "11fca2ff525572795a801eed17eb12785887c7b63fb77a42be46ce4a34131d71f7a73e95fee3f812aea3de78b4d01569",
            "0b6798718c8aed24bc19cb27f866f1c9effcdbf92397ad6448b5c9db90d2b9da6cbabf48adc1adf59a1a28344e79d57e",
            "03a47f8e6d1763ba0cad63d6114c0accbef65707825a511b251a660a9b3994249ae4e63fac38b23da0c398689ee2ab52",
        ],
    ];
    for (msg, exp) in rfc_msgs().iter().zip(expected) {
        let p = mabe_abe::hash_to_g2(G2_DST, msg).unwrap();
        let (x, y) = p.xy().unwrap();
        assert_eq!(
            [be_hex(&x.c0), be_hex(&x.c1), be_hex(&y.c0), be_hex(&y.c1)],
            exp.map(String::from),
            "msg of {} bytes",
            msg.len()
        );
    }
    // The compressed encoding of the msg "" point (ZCash format).
    let p = mabe_abe::hash_to_g2(G2_DST, b"").unwrap();
    assert_eq!(
        hex::encode(ser(&p)),
        "a5cb8437535e20ecffaef7752baddf98034139c38452458baeefab379ba13dff5bf5dd71b72418717047f5b0f37da03d0141ebfbdca40eb85b87142e130ab689c673cf60f1a3e98d69335266f30d9b8d4ac44c1038e9dcdd5393faf5c41fb78a"
    );
}

#[test]
fn rfc9380_hash_to_g1_vectors() {
    let expected = [
        (
            "052926add2207b76ca4fa57a8734416c8dc95e24501772c814278700eed6d1e4e8cf62d9c09db0fac349612b759e79a1",
            "08ba738453bfed09cb546dbb0783dbb3a5f1f566ed67bb6be0e8c67e2e81a4cc68ee29813bb7994998f3eae0c9c6a265",
        ),
        (
            "03567bc5ef9c690c2ab2ecdf6a96ef1c139cc0b2f284dca0a9a7943388a49a3aee664ba5379a7655d3c68900be2f6903",
            "0b9c15f3fe6e5cf4211f346271d7b01c8f3b28be689c8429c85b67af215533311f0b8dfaaa154fa6b88176c229f2885d",
        ),
        (
            "11e0b079dea29a68f0383ee94fed1b940995272407e3bb916bbf268c263ddd57a6a27200a784cbc248e84f357ce82d98",
            "03a87ae2caf14e8ee52e51fa2ed8eefe80f02457004ba4d486d6aa1f517c0889501dc7413753f9599b099ebcbbd2d709",
        ),
        (
            "15f68eaa693b95ccb85215dc65fa81038d69629f70aeee0d0f677cf22285e7bf58d7cb86eefe8f2e9bc3f8cb84fac488",
            "1807a1d50c29f430b8cafc4f8638dfeeadf51211e1602a5f184443076715f91bb90a48ba1e370edce6ae1062f5e6dd38",
        ),
        (
            "082aabae8b7dedb0e78aeb619ad3bfd9277a2f77ba7fad20ef6aabdc6c31d19ba5a6d12283553294c1825c4b3ca2dcfe",
            "05b84ae5a942248eea39e1d91030458c40153f3b654ab7872d779ad1e942856a20c438e8d99bc8abfbf74729ce1f7ac8",
        ),
    ];
    for (msg, (ex, ey)) in rfc_msgs().iter().zip(expected) {
        let p = mabe_abe::hash_to_g1(G1_DST, msg).unwrap();
        let (x, y) = p.xy().unwrap();
        assert_eq!((be_hex(&x), be_hex(&y)), (ex.to_string(), ey.to_string()));
    }
}

#[test]
fn gid_hash_uses_the_suite_dst_and_is_pinned() {
    // Same suite, our DST: pinned so a change of DST or of GID derivation is caught.
    let gid = Gid::derive("test-register", "alice").unwrap();
    assert_eq!(
        gid.to_string(),
        "8ad87d6315ac6996c56d043625569d9604db5bae67bda6186db07eaacd42714a"
    );
    let h = HashedGid::new(gid).unwrap();
    assert_eq!(
        hex::encode(ser(h.point())),
        "b05b4ebe55653dbb041e817b86b5fea82bfd24e3755aecac5a114912fa9b19e836f636f67c331714e9efcf455fd93299108cd979004c35ea74ea2d57c32ad974cb452c1aa5e594b921e5b73f50d27f22a8b1fef80b5f60dddc60eebad839ad34"
    );
    assert_eq!(
        *h.point(),
        mabe_abe::hash_to_g2(mabe_abe::kdf::DST_GID, gid.as_bytes()).unwrap()
    );
    assert_ne!(
        *h.point(),
        mabe_abe::hash_to_g2(G2_DST, gid.as_bytes()).unwrap()
    );
}

#[test]
fn egg_serialization_known_answer() {
    // e(g1, g2) from an independent source (zkcrypto bls12_381 `Gt::generator()`,
    // also in noble-curves' tests), big-endian, in arkworks' coefficient order
    // c0.c0.c0, c0.c0.c1, c0.c1.c0, …, c1.c2.c1. Cross-checked against py_ecc:
    // arkworks' e(g1, g2) == py_ecc pairing(G2, G1)^(-3).
    const EGG_BE: [&str; 12] = [
        "1250ebd871fc0a92a7b2d83168d0d727272d441befa15c503dd8e90ce98db3e7b6d194f60839c508a84305aaca1789b6",
        "089a1c5b46e5110b86750ec6a532348868a84045483c92b7af5af689452eafabf1a8943e50439f1d59882a98eaa0170f",
        "1368bb445c7c2d209703f239689ce34c0378a68e72a6b3b216da0e22a5031b54ddff57309396b38c881c4c849ec23e87",
        "193502b86edb8857c273fa075a50512937e0794e1e65a7617c90d8bd66065b1fffe51d7a579973b1315021ec3c19934f",
        "01b2f522473d171391125ba84dc4007cfbf2f8da752f7c74185203fcca589ac719c34dffbbaad8431dad1c1fb597aaa5",
        "018107154f25a764bd3c79937a45b84546da634b8f6be14a8061e55cceba478b23f7dacaa35c8ca78beae9624045b4b6",
        "19f26337d205fb469cd6bd15c3d5a04dc88784fbb3d0b2dbdea54d43b2b73f2cbb12d58386a8703e0f948226e47ee89d",
        "06fba23eb7c5af0d9f80940ca771b6ffd5857baaf222eb95a7d2809d61bfe02e1bfd1b68ff02f0b8102ae1c2d5d5ab1a",
        "11b8b424cd48bf38fcef68083b0b0ec5c81a93b330ee1a677d0d15ff7b984e8978ef48881e32fac91b93b47333e2ba57",
        "03350f55a7aefcd3c31b4fcb6ce5771cc6a0e9786ab5973320c806ad360829107ba810c5a09ffdd9be2291a0c25a99a2",
        "04c581234d086a9902249b64728ffd21a189e87935a954051c7cdba7b3872629a4fafc05066245cb9108f0242d0fe3ef",
        "0f41e58663bf08cf068672cbd01a7ec73baca4d72ca93544deff686bfd6df543d48eaa24afe47e1efde449383b676631",
    ];
    let bytes = ser(&mabe_abe::egg().0);
    assert_eq!(bytes.len(), 576);
    for (k, expected) in EGG_BE.iter().enumerate() {
        // Each coefficient is stored little-endian in 48 bytes.
        let mut be = bytes[48 * k..48 * (k + 1)].to_vec();
        be.reverse();
        assert_eq!(hex::encode(be), *expected, "coefficient {k}");
    }
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        "ff9912603bb02b77bc6ec1deaeddf9d1fee40ac17a781fb13c9c6e7a9f74d22b"
    );
}

#[test]
fn gid_normalization() {
    let a = Gid::derive("NL-BIG", "  Jos\u{e9} ").unwrap();
    let b = Gid::derive("nl-big", "Jose\u{301}").unwrap(); // NFD form of é
    assert_eq!(a, b);
    assert_ne!(
        a,
        Gid::derive("nl-big", "jos\u{e9}").unwrap(),
        "subject keeps case"
    );
    assert_ne!(
        Gid::derive("ab", "c").unwrap(),
        Gid::derive("a", "bc").unwrap(),
        "length prefixes separate the fields"
    );
    assert!(Gid::derive("", "x").is_err());
    assert!(Gid::derive("r", " ").is_err());
    assert!(Gid::derive("r", "a\u{0}b").is_err());
    assert!(Gid::derive("r", &"x".repeat(1025)).is_err());
    assert_eq!(Gid::from_hex(&a.to_string()).unwrap(), a);
    assert!(Gid::from_hex("zz").is_err());
}
