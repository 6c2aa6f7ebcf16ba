//! The trust file: the only way an authority becomes trusted.
//!
//! A TOML file (`trust.toml` in the key store) listing each pinned authority
//! (id, endpoint, Ed25519 identity key, TLS root, TLS name), the
//! consortium's emergency attributes (what `EMERGENCY` in a policy expands to,
//! see [`TrustStore::expand_policy`]), and optionally the Ed25519 keys of
//! writers the reader knows by name:
//!
//! ```toml
//! emergency = ["emergency@hospital-a", "emergency@hospital-b"]
//!
//! [[authority]]
//! id = "hospital-a"
//! endpoint = "https://mabe.hospital-a.example:7443"
//! identity_key = "9f2c…64 hex digits…"
//! tls_name = "mabe.hospital-a.example"
//! tls_root_pem = """
//! -----BEGIN CERTIFICATE-----
//! …
//! -----END CERTIFICATE-----
//! """
//!
//! [[authority]]            # a patient's personal authority, offline
//! id = "patient-jansen"
//! identity_key = "…"
//!
//! [[writer]]
//! name = "hospital-a records system"
//! key = "…64 hex digits…"
//!
//! [[proxy]]                # a record store (untrusted for confidentiality)
//! id = "cloud-1"
//! endpoint = "https://records.example:7543"
//! tls_root_pem = "…"
//! ```
//!
//! `tls_root_file` (a path relative to the trust file) may replace
//! `tls_root_pem`. Every field is validated on load; unknown fields and
//! duplicate ids are errors. A proxy is listed only so that `mabe record`
//! knows where to store and fetch records: nothing it returns is believed
//! until the record decrypts and its signature verifies.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use ed25519_dalek::VerifyingKey;
use mabe_policy::{Attribute, AuthorityId, Policy};
use serde::{Deserialize, Serialize};

use crate::{
    error::{ClientError, Result},
    files::{read_limited, write_private},
};

/// Largest trust file accepted.
pub const MAX_TRUST_FILE: u64 = 1 << 20;

/// The token in policy text that expands to the consortium's emergency attributes.
pub const EMERGENCY_TOKEN: &str = "EMERGENCY";

/// A record store (`mabe-proxy`) the user stores records at and fetches
/// them from. The TLS root pins the connection; the proxy itself is not
/// trusted with anything (records are encrypted and signed end to end).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEndpoint {
    /// Proxy id (as `mabe-proxy init --proxy-id` set it).
    pub id: String,
    /// `https://host:port` of its public listener.
    pub endpoint: String,
    /// TLS root certificate (PEM) for its listener.
    pub tls_root: Vec<u8>,
    /// TLS server name to check.
    pub tls_name: String,
}

/// Whether `id` is a valid proxy id: 1–63 bytes of `[a-z0-9.-]`, starting
/// with a letter or digit (the rule `mabe-proxy init` applies).
///
/// ```
/// assert!(mabe_client::trust::valid_proxy_id("cloud-1"));
/// assert!(!mabe_client::trust::valid_proxy_id("Cloud 1"));
/// ```
pub fn valid_proxy_id(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() <= 63
        && b.first()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'.')
}

/// An authority the user trusts: the only way an authority becomes trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedAuthority {
    /// Authority id.
    pub id: AuthorityId,
    /// `https://host:port` of its public listener; `None` for an offline
    /// authority (keys arrive as bundles, see `mabe keys import`).
    pub endpoint: Option<String>,
    /// Pinned Ed25519 identity key: signs the authority's directory.
    pub identity_key: VerifyingKey,
    /// TLS root certificate (PEM) for its listener (empty when offline).
    pub tls_root: Vec<u8>,
    /// TLS server name to check (e.g. `localhost`).
    pub tls_name: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrust {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    emergency: Vec<String>,
    #[serde(default, rename = "authority", skip_serializing_if = "Vec::is_empty")]
    authorities: Vec<RawAuthority>,
    #[serde(default, rename = "writer", skip_serializing_if = "Vec::is_empty")]
    writers: Vec<RawWriter>,
    #[serde(default, rename = "proxy", skip_serializing_if = "Vec::is_empty")]
    proxies: Vec<RawProxy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    id: String,
    endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_root_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_root_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthority {
    id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    identity_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_root_pem: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tls_root_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWriter {
    name: String,
    key: String,
}

/// The validated trust file.
///
/// ```
/// use mabe_client::trust::TrustStore;
/// let dir = tempfile::tempdir()?;
/// let mut trust = TrustStore::load_or_empty(&dir.path().join("trust.toml"))?;
/// trust.add_authority(mabe_client::TrustedAuthority {
///     id: "hospital-a".parse()?,
///     endpoint: None,
///     identity_key: ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key(),
///     tls_root: vec![],
///     tls_name: "localhost".into(),
/// })?;
/// trust.set_emergency(vec!["emergency@hospital-a".parse()?])?;
/// trust.save()?;
/// let again = TrustStore::load(&dir.path().join("trust.toml"))?;
/// assert!(again.authority(&"hospital-a".parse()?).is_ok());
/// let p = again.expand_policy("doctor@hospital-a OR EMERGENCY")?;
/// assert_eq!(p.to_string(), "doctor@hospital-a OR 1 of (emergency@hospital-a)");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct TrustStore {
    path: PathBuf,
    authorities: BTreeMap<AuthorityId, TrustedAuthority>,
    emergency: Vec<Attribute>,
    writers: BTreeMap<String, VerifyingKey>,
    proxies: BTreeMap<String, ProxyEndpoint>,
}

fn parse_key(hex_key: &str) -> std::result::Result<VerifyingKey, String> {
    let b = hex::decode(hex_key.trim()).map_err(|_| "a key is 64 hexadecimal digits".to_owned())?;
    let a: [u8; 32] = b
        .try_into()
        .map_err(|_| "a key is 64 hexadecimal digits".to_owned())?;
    VerifyingKey::from_bytes(&a).map_err(|_| "not a valid Ed25519 public key".to_owned())
}

impl TrustStore {
    /// Load and validate the trust file at `path`.
    pub fn load(path: &Path) -> Result<TrustStore> {
        let bad = |reason: String| ClientError::Trust {
            path: path.to_owned(),
            reason,
        };
        if !path.exists() {
            return Err(bad(
                "it does not exist: pin an authority with `mabe trust add`".into(),
            ));
        }
        let bytes = read_limited(path, MAX_TRUST_FILE)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| bad("not UTF-8".into()))?;
        let raw: RawTrust = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut authorities = BTreeMap::new();
        for a in raw.authorities {
            let id = AuthorityId::new(&a.id).map_err(|e| bad(e.to_string()))?;
            let identity_key =
                parse_key(&a.identity_key).map_err(|e| bad(format!("authority {id}: {e}")))?;
            let tls_root = tls_root(base, &a.tls_root_pem, &a.tls_root_file)
                .map_err(|reason| bad(format!("authority {id}: {reason}")))?;
            if a.endpoint.is_some() && tls_root.is_empty() {
                return Err(bad(format!(
                    "authority {id} has an endpoint but no TLS root (tls_root_pem or tls_root_file)"
                )));
            }
            if let Some(e) = &a.endpoint {
                if !e.starts_with("https://") {
                    return Err(bad(format!(
                        "authority {id}: the endpoint must be https://"
                    )));
                }
            }
            let t = TrustedAuthority {
                id: id.clone(),
                endpoint: a.endpoint,
                identity_key,
                tls_root,
                tls_name: a.tls_name.unwrap_or_else(|| "localhost".into()),
            };
            if authorities.insert(id.clone(), t).is_some() {
                return Err(bad(format!("authority {id} is listed twice")));
            }
        }
        let mut emergency = Vec::new();
        for e in raw.emergency {
            let a: Attribute = e
                .parse()
                .map_err(|e: mabe_policy::PolicyError| bad(format!("emergency attribute: {e}")))?;
            if !emergency.contains(&a) {
                emergency.push(a);
            }
        }
        let mut writers = BTreeMap::new();
        for w in raw.writers {
            let k = parse_key(&w.key).map_err(|e| bad(format!("writer {}: {e}", w.name)))?;
            if writers.insert(w.name.clone(), k).is_some() {
                return Err(bad(format!("writer {} is listed twice", w.name)));
            }
        }
        let mut proxies = BTreeMap::new();
        for p in raw.proxies {
            let id = p.id.clone();
            if !valid_proxy_id(&id) {
                return Err(bad(format!("proxy id {id:?} is not valid")));
            }
            let tls_root = tls_root(base, &p.tls_root_pem, &p.tls_root_file)
                .map_err(|reason| bad(format!("proxy {id}: {reason}")))?;
            let proxy = ProxyEndpoint {
                id: id.clone(),
                endpoint: p.endpoint,
                tls_root,
                tls_name: p.tls_name.unwrap_or_else(|| "localhost".into()),
            };
            check_proxy(&proxy).map_err(bad)?;
            if proxies.insert(id.clone(), proxy).is_some() {
                return Err(bad(format!("proxy {id} is listed twice")));
            }
        }
        Ok(TrustStore {
            path: path.to_owned(),
            authorities,
            emergency,
            writers,
            proxies,
        })
    }

    /// Load the trust file, or start an empty one if it does not exist yet.
    pub fn load_or_empty(path: &Path) -> Result<TrustStore> {
        if path.exists() {
            Self::load(path)
        } else {
            Ok(TrustStore {
                path: path.to_owned(),
                authorities: BTreeMap::new(),
                emergency: Vec::new(),
                writers: BTreeMap::new(),
                proxies: BTreeMap::new(),
            })
        }
    }

    /// Write the trust file back (atomically). TLS roots are written inline.
    pub fn save(&self) -> Result<()> {
        let raw = RawTrust {
            emergency: self.emergency.iter().map(ToString::to_string).collect(),
            authorities: self
                .authorities
                .values()
                .map(|a| RawAuthority {
                    id: a.id.to_string(),
                    endpoint: a.endpoint.clone(),
                    identity_key: hex::encode(a.identity_key.to_bytes()),
                    tls_name: Some(a.tls_name.clone()),
                    tls_root_pem: (!a.tls_root.is_empty())
                        .then(|| String::from_utf8_lossy(&a.tls_root).into_owned()),
                    tls_root_file: None,
                })
                .collect(),
            writers: self
                .writers
                .iter()
                .map(|(name, k)| RawWriter {
                    name: name.clone(),
                    key: hex::encode(k.to_bytes()),
                })
                .collect(),
            proxies: self
                .proxies
                .values()
                .map(|p| RawProxy {
                    id: p.id.clone(),
                    endpoint: p.endpoint.clone(),
                    tls_name: Some(p.tls_name.clone()),
                    tls_root_pem: Some(String::from_utf8_lossy(&p.tls_root).into_owned()),
                    tls_root_file: None,
                })
                .collect(),
        };
        let text = toml::to_string_pretty(&raw).map_err(|e| ClientError::Trust {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        let mut out = String::from("# mabe trust file: the authorities this person trusts.\n");
        out.push_str(&text);
        write_private(&self.path, out.as_bytes())
    }

    /// Where the trust file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pin an authority (replacing an entry with the same id).
    pub fn add_authority(&mut self, a: TrustedAuthority) -> Result<()> {
        if a.endpoint.is_some() && a.tls_root.is_empty() {
            return Err(ClientError::Invalid(format!(
                "authority {} has an endpoint but no TLS root",
                a.id
            )));
        }
        self.authorities.insert(a.id.clone(), a);
        Ok(())
    }

    /// Remove a pinned authority; returns whether it was there.
    pub fn remove_authority(&mut self, id: &AuthorityId) -> bool {
        self.authorities.remove(id).is_some()
    }

    /// The pinned authority `id`, or [`ClientError::UntrustedAuthority`].
    pub fn authority(&self, id: &AuthorityId) -> Result<&TrustedAuthority> {
        self.authorities
            .get(id)
            .ok_or_else(|| ClientError::UntrustedAuthority(id.to_string()))
    }

    /// Every pinned authority, by id.
    pub fn authorities(&self) -> impl Iterator<Item = &TrustedAuthority> {
        self.authorities.values()
    }

    /// The consortium's emergency attributes.
    pub fn emergency(&self) -> &[Attribute] {
        &self.emergency
    }

    /// Replace the consortium's emergency attributes (each must belong to a
    /// pinned authority).
    pub fn set_emergency(&mut self, attrs: Vec<Attribute>) -> Result<()> {
        for a in &attrs {
            self.authority(a.authority())?;
        }
        let mut uniq = Vec::new();
        for a in attrs {
            if !uniq.contains(&a) {
                uniq.push(a);
            }
        }
        self.emergency = uniq;
        Ok(())
    }

    /// Name a writer's Ed25519 key, so `decrypt` can say who wrote a record.
    pub fn add_writer(&mut self, name: &str, key: VerifyingKey) -> Result<()> {
        if name.trim().is_empty() || name.len() > 256 {
            return Err(ClientError::Invalid(
                "a writer name is 1 to 256 characters".into(),
            ));
        }
        self.writers.insert(name.trim().to_owned(), key);
        Ok(())
    }

    /// Add a record store (replacing an entry with the same id).
    pub fn add_proxy(&mut self, p: ProxyEndpoint) -> Result<()> {
        if !valid_proxy_id(&p.id) {
            return Err(ClientError::Invalid(format!(
                "proxy id {:?} is not valid (1-63 of a-z 0-9 . -)",
                p.id
            )));
        }
        check_proxy(&p).map_err(ClientError::Invalid)?;
        self.proxies.insert(p.id.clone(), p);
        Ok(())
    }

    /// The record store `id`; with `None`, the only one listed.
    pub fn proxy(&self, id: Option<&str>) -> Result<&ProxyEndpoint> {
        match id {
            Some(id) => self.proxies.get(id).ok_or_else(|| {
                ClientError::Invalid(format!(
                    "proxy {id} is not in your trust file: add it with `mabe trust proxy`"
                ))
            }),
            None => {
                let mut all = self.proxies.values();
                match (all.next(), all.next()) {
                    (Some(p), None) => Ok(p),
                    (None, _) => Err(ClientError::Invalid(
                        "no record store in your trust file: add one with `mabe trust proxy`"
                            .into(),
                    )),
                    (Some(_), Some(_)) => Err(ClientError::Invalid(
                        "several record stores in your trust file: name one with --proxy".into(),
                    )),
                }
            }
        }
    }

    /// Every record store listed, by id.
    pub fn proxies(&self) -> impl Iterator<Item = &ProxyEndpoint> {
        self.proxies.values()
    }

    /// The name under which `key` is known, if any.
    pub fn writer_name(&self, key: &VerifyingKey) -> Option<&str> {
        self.writers
            .iter()
            .find(|(_, k)| *k == key)
            .map(|(n, _)| n.as_str())
    }

    /// Parse policy text after expanding every `EMERGENCY` word to
    /// `1 of (e_1, …, e_n)` over the trust file's emergency attributes. The
    /// word is matched case-sensitively as a whole word (attribute names are
    /// lowercase and contain `@`, so no attribute can collide with it). A
    /// policy using it without an emergency list is refused.
    ///
    /// Every authority the resulting policy names must be pinned.
    pub fn expand_policy(&self, text: &str) -> Result<Policy> {
        let expanded = expand_emergency(text, &self.emergency)?;
        let policy = mabe_policy::parse(&expanded)?;
        for a in policy.authorities() {
            self.authority(&a)?;
        }
        Ok(policy)
    }
}

/// A TLS root from inline PEM or a file relative to `base` (none: empty).
fn tls_root(
    base: &Path,
    pem: &Option<String>,
    file: &Option<PathBuf>,
) -> std::result::Result<Vec<u8>, String> {
    match (pem, file) {
        (Some(_), Some(_)) => Err("give tls_root_pem or tls_root_file, not both".into()),
        (Some(pem), None) => Ok(pem.as_bytes().to_vec()),
        (None, Some(f)) => read_limited(&base.join(f), 256 * 1024)
            .map_err(|e| format!("TLS root {}: {e}", f.display())),
        (None, None) => Ok(Vec::new()),
    }
}

fn check_proxy(p: &ProxyEndpoint) -> std::result::Result<(), String> {
    if !p.endpoint.starts_with("https://") {
        return Err(format!("proxy {}: the endpoint must be https://", p.id));
    }
    if p.tls_root.is_empty() {
        return Err(format!("proxy {} has no TLS root", p.id));
    }
    Ok(())
}

/// Replace whole-word `EMERGENCY` tokens in `text` by `1 of (…)` over `list`.
///
/// ```
/// use mabe_client::trust::expand_emergency;
/// let list = ["emergency@a".parse()?, "emergency@b".parse()?];
/// assert_eq!(expand_emergency("x@a OR EMERGENCY", &list)?, "x@a OR 1 of (emergency@a, emergency@b)");
/// assert_eq!(expand_emergency("x@a", &[])?, "x@a");
/// assert!(expand_emergency("EMERGENCY", &[]).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn expand_emergency(text: &str, list: &[Attribute]) -> Result<String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || "_.:@-".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let mut used = false;
    let flush = |word: &mut String, out: &mut String, used: &mut bool| {
        if word == EMERGENCY_TOKEN {
            *used = true;
            out.push_str("1 of (");
            out.push_str(
                &list
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            out.push(')');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if is_word(c) {
            word.push(c);
        } else {
            flush(&mut word, &mut out, &mut used);
            out.push(c);
        }
    }
    flush(&mut word, &mut out, &mut used);
    if used && list.is_empty() {
        return Err(ClientError::NoEmergencyList);
    }
    Ok(out)
}
