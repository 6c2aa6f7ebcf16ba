//! `mabe inspect`: every field of a record container or a bare header, as
//! text or as JSON with group elements in hex exactly as `docs/FORMAT.md`
//! encodes them (G1 compressed 48 bytes, GT arkworks 576 bytes), so another
//! implementation can check ours. The writer's signature is checked too (it
//! needs no key). Reads in constant memory.

use std::io::Read;

use ark_serialize::CanonicalSerialize;
use mabe_abe::Header;
use serde_json::{Value, json};

use crate::{
    error::{ClientError, Result},
    record::{RECORD_MAGIC, SignatureStatus, read_prefix, scan_payload},
};

fn hex_of<T: CanonicalSerialize>(t: &T) -> String {
    let mut out = Vec::with_capacity(t.compressed_size());
    // Serializing into a Vec cannot fail.
    let _ = t.serialize_compressed(&mut out);
    hex::encode(out)
}

/// The header's fields as JSON (FORMAT.md §3.1 names).
pub fn header_json(header: &Header) -> Value {
    let rows: Vec<Value> = header
        .rows()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({
                "index": i,
                "attribute": r.attribute().to_string(),
                "version": r.version().get(),
                "c1": hex_of(&r.c1().0),
                "c2": hex_of(r.c2()),
                "c3": hex_of(r.c3()),
            })
        })
        .collect();
    json!({
        "suite": mabe_abe::SUITE_ID,
        "rid": header.rid().to_string(),
        "policy": header.policy_text(),
        "rows": rows,
        "c0": hex::encode(header.c0()),
        "nonce_prefix": hex::encode(header.nonce_prefix()),
        "segment_size": header.segment_size(),
        "key_commitment": hex::encode(header.key_commitment()),
        "h_imm": hex::encode(header.h_imm()),
        "h_auth": hex::encode(header.h_auth()),
    })
}

/// Inspect a record container (or a bare `'H'` header) read from `input`.
pub fn inspect<R: Read>(mut input: R) -> Result<Value> {
    let mut first = [0u8; 6];
    input
        .read_exact(&mut first)
        .map_err(|_| ClientError::malformed("record", "truncated"))?;
    if first == *b"MABEH\x01" {
        let mut rest = Vec::new();
        input
            .take(mabe_abe::MAX_HEADER_LEN as u64)
            .read_to_end(&mut rest)
            .map_err(|e| ClientError::io("reading the header", e))?;
        let mut bytes = first.to_vec();
        bytes.extend_from_slice(&rest);
        let header = Header::from_bytes(&bytes)?;
        return Ok(json!({
            "object": "header",
            "magic": "MABE",
            "kind": "H",
            "format_version": 1,
            "length": bytes.len(),
            "header": header_json(&header),
        }));
    }
    let mut chained = (&first[..]).chain(input);
    let prefix = read_prefix(&mut chained)?;
    // magic (6) ‖ be32(L) ‖ header ‖ signer type ‖ [GID ‖ public key]
    let payload_offset =
        11 + prefix.header_bytes.len() + if prefix.writer.is_some() { 64 } else { 0 };
    let summary = scan_payload(&prefix, chained)?;
    let segment = u64::from(prefix.header.segment_size()) + mabe_abe::TAG_LEN as u64;
    let segments = summary.payload_len.div_ceil(segment).max(1);
    let signature = match summary.signature {
        SignatureStatus::Valid(_) => "valid",
        SignatureStatus::Invalid(_) => "INVALID",
        SignatureStatus::Unsigned => "unsigned",
    };
    Ok(json!({
        "object": "record",
        "magic": "MABE",
        "kind": "R",
        "format_version": RECORD_MAGIC[5],
        "header_length": prefix.header_bytes.len(),
        "header": header_json(&prefix.header),
        "signer": prefix.writer.map(|w| json!({
            "type": "ed25519",
            "gid": w.gid.to_string(),
            "public_key": hex::encode(w.key.as_bytes()),
        })),
        "payload_offset": payload_offset,
        "payload_length": summary.payload_len,
        "payload_segments": segments,
        "signature": summary.signature_bytes.map(hex::encode),
        "signature_check": signature,
    }))
}

/// A text rendering of [`inspect`]'s JSON.
pub fn to_text(v: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18} {v}\n"));
    line("object", s(&v["object"]));
    if v["object"] == "record" {
        line("format version", s(&v["format_version"]));
        line("header length", s(&v["header_length"]));
    } else {
        line("length", s(&v["length"]));
    }
    let h = &v["header"];
    for k in ["suite", "rid", "policy"] {
        line(k, s(&h[k]));
    }
    if let Some(rows) = h["rows"].as_array() {
        for r in rows {
            line(
                &format!("row {}", s(&r["index"])),
                format!("{} version {}", s(&r["attribute"]), s(&r["version"])),
            );
            line("  C1 (GT)", s(&r["c1"]));
            line("  C2 (G1)", s(&r["c2"]));
            line("  C3 (G1)", s(&r["c3"]));
        }
    }
    for k in [
        "c0",
        "nonce_prefix",
        "segment_size",
        "key_commitment",
        "h_imm",
        "h_auth",
    ] {
        line(k, s(&h[k]));
    }
    if v["object"] == "record" {
        match v["signer"].as_object() {
            Some(w) => {
                line("writer GID", s(&w["gid"]));
                line("writer key", s(&w["public_key"]));
            }
            None => line("writer", "unsigned".into()),
        }
        line("payload offset", s(&v["payload_offset"]));
        line("payload length", s(&v["payload_length"]));
        line("payload segments", s(&v["payload_segments"]));
        line("signature", s(&v["signature"]));
        line("signature check", s(&v["signature_check"]));
    }
    out
}
