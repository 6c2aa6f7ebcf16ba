//! Field-level records: each top-level section of a JSON health record is
//! encrypted as its own signed record under its own policy.
//!
//! Policies come from a TOML file, one per section (`EMERGENCY` expands as
//! everywhere):
//!
//! ```toml
//! [sections]
//! vital_signs = "doctor@hospital-a OR nurse@hospital-b OR EMERGENCY"
//! personal_report = "family@patient-jansen"
//! research = "researcher@hospital-a"
//! ```
//!
//! Every section of the record must have a policy (a section without one is
//! refused, never left in the clear). The encrypted document is JSON:
//!
//! ```json
//! {"format": "mabe-json-v1", "document": "<32 hex>",
//!  "sections": {"vital_signs": {"policy": "<canonical policy>", "record": "<base64 record>"}}}
//! ```
//!
//! Each section's plaintext is `{"document": …, "section": …, "value": …}`,
//! so a section moved from another document or renamed is refused. A reader
//! gets `{"document": …, "sections": {…what they may see…}, "withheld":
//! {"<section>": "<reason>"}}`.

use std::collections::BTreeMap;

use ark_std::rand::{CryptoRng, RngCore};
use base64::{Engine, engine::general_purpose::STANDARD};
use mabe_abe::EncryptOptions;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    client::Client,
    error::{ClientError, Result},
    keystore::Identity,
    record::SignatureStatus,
};

/// Format tag of an encrypted JSON document.
pub const JSON_FORMAT: &str = "mabe-json-v1";
/// Largest JSON document (plain or encrypted) handled.
pub const MAX_JSON_BYTES: usize = 64 << 20;
/// Most sections in one document.
pub const MAX_SECTIONS: usize = 1024;

/// The policy of each section (from a TOML `[sections]` table).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SectionPolicies {
    /// Section name → policy text.
    pub sections: BTreeMap<String, String>,
}

impl SectionPolicies {
    /// Parse the TOML text.
    ///
    /// ```
    /// let p = mabe_client::json::SectionPolicies::from_toml("[sections]\nvitals = \"doctor@hospital-a\"\n")?;
    /// assert_eq!(p.sections["vitals"], "doctor@hospital-a");
    /// # Ok::<(), mabe_client::ClientError>(())
    /// ```
    pub fn from_toml(text: &str) -> Result<Self> {
        let p: SectionPolicies = toml::from_str(text)
            .map_err(|e| ClientError::malformed("sections file", e.to_string()))?;
        if p.sections.len() > MAX_SECTIONS {
            return Err(ClientError::malformed("sections file", "too many sections"));
        }
        Ok(p)
    }
}

/// What a reader got from [`decrypt_json`].
#[derive(Debug)]
pub struct JsonOutcome {
    /// `{"document", "sections", "withheld"}`.
    pub value: Value,
    /// The signature check of each section read.
    pub signatures: BTreeMap<String, SignatureStatus>,
}

/// Encrypt each section of `record` (a JSON object) under its policy.
/// Directories are refreshed when `online` (see [`Client::directories`]).
pub async fn encrypt_json<R: RngCore + CryptoRng + ?Sized>(
    client: &Client,
    policies: &SectionPolicies,
    record: &Value,
    signer: Option<&Identity>,
    online: bool,
    rng: &mut R,
) -> Result<Value> {
    let obj = record.as_object().ok_or_else(|| {
        ClientError::Invalid("the JSON record must be an object of sections".into())
    })?;
    if obj.len() > MAX_SECTIONS {
        return Err(ClientError::Invalid("too many sections".into()));
    }
    for name in obj.keys() {
        if !policies.sections.contains_key(name) {
            return Err(ClientError::Invalid(format!(
                "section {name:?} of the record has no policy in the sections file: refusing to leave it unprotected"
            )));
        }
    }
    let mut doc_id = [0u8; 16];
    rng.fill_bytes(&mut doc_id);
    let doc_hex = hex::encode(doc_id);
    let mut sections = Map::new();
    for (name, value) in obj {
        let text = policies
            .sections
            .get(name)
            .map(String::as_str)
            .unwrap_or_default();
        let policy = client.policy(text)?;
        let (pks, _) = client.encryption_keys(&policy, online).await?;
        let plain = serde_json::to_vec(&json!({
            "document": doc_hex,
            "section": name,
            "value": value,
        }))
        .map_err(|e| ClientError::Invalid(e.to_string()))?;
        let mut out = Vec::new();
        client.encrypt(
            &policy,
            &pks,
            signer,
            &EncryptOptions::default(),
            rng,
            &plain[..],
            &mut out,
        )?;
        sections.insert(
            name.clone(),
            json!({ "policy": policy.to_string(), "record": STANDARD.encode(&out) }),
        );
    }
    Ok(json!({ "format": JSON_FORMAT, "document": doc_hex, "sections": sections }))
}

/// Decrypt the sections of an encrypted document that the reader may see;
/// the others are listed under `withheld` with the reason. A section that
/// fails for a cryptographic or signature reason fails the whole call
/// (unless `allow_unsigned` and the section is merely unsigned).
pub async fn decrypt_json(
    client: &Client,
    doc: &Value,
    online: bool,
    allow_unsigned: bool,
) -> Result<JsonOutcome> {
    let bad = |r: &str| ClientError::malformed("encrypted JSON document", r.to_owned());
    if doc.get("format").and_then(Value::as_str) != Some(JSON_FORMAT) {
        return Err(bad("not a mabe-json-v1 document"));
    }
    let doc_id = doc
        .get("document")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no document id"))?;
    let sections = doc
        .get("sections")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("no sections"))?;
    if sections.len() > MAX_SECTIONS {
        return Err(bad("too many sections"));
    }
    let mut visible = Map::new();
    let mut withheld = Map::new();
    let mut signatures = BTreeMap::new();
    for (name, s) in sections {
        let record = s
            .get("record")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a section has no record"))?;
        let bytes = STANDARD
            .decode(record)
            .map_err(|_| bad("a section's record is not base64"))?;
        let mut input = &bytes[..];
        let opened = match client.open_record(&mut input, online).await {
            Ok(o) => o,
            Err(
                e @ (ClientError::NotSatisfied { .. }
                | ClientError::StaleKey { .. }
                | ClientError::StaleRecord { .. }
                | ClientError::MissingPublicKey { .. }
                | ClientError::NoDirectory(_)
                | ClientError::UntrustedAuthority(_)),
            ) => {
                withheld.insert(name.clone(), Value::String(e.to_string()));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut plain = Vec::new();
        let summary = opened.decrypt(input, &mut plain)?;
        match summary.signature {
            SignatureStatus::Valid(_) => {}
            SignatureStatus::Unsigned if allow_unsigned => {}
            other => {
                other.require_valid()?;
            }
        }
        signatures.insert(name.clone(), summary.signature);
        let inner: Value =
            serde_json::from_slice(&plain).map_err(|_| bad("a section's plaintext is not JSON"))?;
        if inner.get("document").and_then(Value::as_str) != Some(doc_id)
            || inner.get("section").and_then(Value::as_str) != Some(name.as_str())
        {
            return Err(ClientError::BadSignature(
                "a section was moved from another document or renamed",
            ));
        }
        visible.insert(
            name.clone(),
            inner.get("value").cloned().unwrap_or(Value::Null),
        );
    }
    Ok(JsonOutcome {
        value: json!({ "document": doc_id, "sections": visible, "withheld": withheld }),
        signatures,
    })
}
