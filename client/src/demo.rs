//! `mabe demo`: three hospitals and a patient's personal authority, as real
//! authority nodes, and a record-store proxy (SQLite, TLS gRPC on loopback)
//! in this process, sharing a patient's record.
//!
//! The servers are made the way `mabe-authority init` and `mabe-proxy init`
//! make them (complete data directories), and people act through the same
//! library the `mabe` command uses: each has a key store and a trust file
//! under `DIR/people/<name>/`, fetches keys with [`Client::fetch_keys`],
//! files requests with [`Client::request_attribute`] and breaks the glass
//! with [`Client::break_glass`]. A hospital records system writes the
//! patient's record as a signed field-level JSON document
//! ([`json::encrypt_json`]) to `DIR/record.mabe.json` and stores each
//! section at the proxy ([`records::put`]); readers use
//! [`json::decrypt_json`]. After a revocation carried out at the proxy with
//! update tokens, the document is rebuilt from the proxy ([`records::get`])
//! and read again. Administrators act with signed calls to each authority's
//! admin listener, as `mabe-authority --remote` does.
//!
//! Prints the story; fails (non-zero exit) if any expectation does not hold.
//! With `--keep DIR` everything stays in DIR for the real command-line tools.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use ark_std::rand::rngs::OsRng;
use base64::{Engine, engine::general_purpose::STANDARD};
use ed25519_dalek::{SigningKey, VerifyingKey};
use mabe_abe::Header;
use mabe_authority::{
    admin_client::signed,
    datadir::{DataDir, StoreOptions},
    node::{Node, NodeConfig},
    server::{Listeners, ServeOptions, serve},
};
use mabe_policy::{Attribute, AuthorityId};
use mabe_proto::v1::{
    AddProxyRequest, CreateAttributeRequest, DecideRequestRequest, EnrollRequest, GrantRequest,
    ListRequestsRequest, RevokeRequest, authority_admin_client::AuthorityAdminClient,
};
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use mabe_client::{
    Client, Fetched, IdentityInfo, KeyStore, ProxyEndpoint, TrustStore, TrustedAuthority,
    json::{self, SectionPolicies},
    record::SignatureStatus,
    records::{self, RecordId},
};

const ADMIN: &str = "/mabe.v1.AuthorityAdmin/";
/// The name every certificate of the demo carries (the servers listen on
/// 127.0.0.1; `init` makes certificates for localhost and 127.0.0.1).
const TLS_NAME: &str = "localhost";
const PROXY_ID: &str = "cloud-1";
const WRITER_NAME: &str = "hospital-a records system";

/// The patient's record: one section per part of the chart.
const RECORD: &str = r#"{
  "vital_signs": {"bp": "128/84", "hr": 71, "ecg": "sinus rhythm"},
  "personal_report": {"summary": "Recovering well; may go home on Friday."},
  "research_extract": {"age_band": "60-69", "condition": "I25.1", "outcome": "stable"}
}"#;

/// One policy per section (`mabe encrypt-json --policies` reads the same
/// file; the demo leaves it as `DIR/sections.toml`).
const SECTIONS: &str = r#"[sections]
vital_signs = "(doctor@hospital-a AND cardiology@hospital-a) OR EMERGENCY"
personal_report = "family@patient-jansen OR doctor@hospital-a"
research_extract = "researcher@hospital-a"
"#;

/// The consortium's emergency attributes: what `EMERGENCY` expands to.
const EMERGENCY: [&str; 2] = ["emergency@hospital-b", "emergency@hospital-c"];

/// A server task and the way to stop it.
struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Server {
    /// Stop serving and wait until the task has let go of the node (and so
    /// of its database).
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// One authority node, made by the authority crate's `init`, served in
/// this process, with a signed admin session on its admin listener.
struct Authority {
    id: &'static str,
    node: Arc<Node>,
    admin_key: SigningKey,
    admin: AuthorityAdminClient<Channel>,
    pinned: TrustedAuthority,
    server: Server,
}

/// A person (or the records system) and their client: key store and trust
/// file under `DIR/people/<short>/`.
struct Person {
    short: &'static str,
    label: &'static str,
    info: IdentityInfo,
    client: Client,
}

fn step(t0: Instant, text: &str) {
    println!("\n[{:>6.2}s] {text}", t0.elapsed().as_secs_f64());
}

/// A TLS channel to `url`, pinning `root`.
async fn channel(url: &str, root: &[u8]) -> Result<Channel> {
    Endpoint::from_shared(url.to_owned())?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(root))
                .domain_name(TLS_NAME),
        )?
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))
}

/// `mabe-authority --data-dir DIR init --authority-id ID`, then `serve` on
/// ephemeral loopback ports.
async fn start_authority(root: &Path, id: &'static str) -> Result<Authority> {
    let dir = DataDir::new(root.join(id));
    let opts = StoreOptions::default();
    let authority_id: AuthorityId = id.parse()?;
    dir.init(&authority_id, &opts)
        .await
        .with_context(|| format!("creating authority {id}"))?;
    let node = Arc::new(dir.open_node(&opts, NodeConfig::default()).await?);
    let tls = dir.tls(None, None)?;
    let cert = tls.cert.clone();
    let listeners = Listeners::bind("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let (public, admin_addr) = listeners.addrs()?;
    let (stop, rx) = oneshot::channel::<()>();
    let served = Arc::clone(&node);
    let task = tokio::spawn(async move {
        let opts = ServeOptions {
            tls: Some(tls),
            request_timeout: Duration::from_secs(30),
        };
        if let Err(e) = serve(served, listeners, opts, async {
            let _ = rx.await;
        })
        .await
        {
            eprintln!("authority {id} stopped with an error: {e}");
        }
    });
    let admin = channel(&format!("https://127.0.0.1:{}", admin_addr.port()), &cert)
        .await
        .context("the admin listener")?;
    Ok(Authority {
        id,
        pinned: TrustedAuthority {
            id: authority_id,
            endpoint: Some(format!("https://127.0.0.1:{}", public.port())),
            identity_key: node.identity_public_key(),
            tls_root: cert,
            tls_name: TLS_NAME.into(),
        },
        admin_key: dir.admin_key()?,
        admin: AuthorityAdminClient::new(admin)
            .max_decoding_message_size(mabe_proto::MAX_MESSAGE_BYTES),
        node,
        server: Server { stop, task },
    })
}

/// `mabe-proxy --data-dir DIR init --proxy-id cloud-1`, `trust add` for
/// each authority, then `serve` on ephemeral loopback ports.
async fn start_proxy(
    root: &Path,
    trusted: &[(&str, VerifyingKey)],
) -> Result<(ProxyEndpoint, Server)> {
    use mabe_proxy::server::{Listeners as ProxyListeners, ServeOptions as ProxyOptions};
    let dir = mabe_proxy::datadir::DataDir::new(root.join(PROXY_ID));
    dir.init(PROXY_ID, None)
        .await
        .context("creating the record-store proxy")?;
    let node = Arc::new(dir.open_node(None).await?);
    for (authority, key) in trusted {
        node.trust(authority, key.as_bytes()).await?;
    }
    let tls = dir.tls(None, None)?;
    let cert = tls.cert.clone();
    let listeners = ProxyListeners::bind("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let (public, _) = listeners.addrs()?;
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        if let Err(e) =
            mabe_proxy::server::serve(node, listeners, ProxyOptions::new(Some(tls)), async {
                let _ = rx.await;
            })
            .await
        {
            eprintln!("proxy stopped with an error: {e}");
        }
    });
    let endpoint = ProxyEndpoint {
        id: PROXY_ID.into(),
        endpoint: format!("https://127.0.0.1:{}", public.port()),
        tls_root: cert,
        tls_name: TLS_NAME.into(),
    };
    Ok((endpoint, Server { stop, task }))
}

/// Admin calls, signed with the admin key `init` wrote (`DATA/admin.key`),
/// exactly as `mabe-authority --remote` signs them.
impl Authority {
    async fn create(&mut self, name: &str) -> Result<()> {
        let req = signed(
            CreateAttributeRequest { name: name.into() },
            self.id,
            &format!("{ADMIN}CreateAttribute"),
            &self.admin_key,
        );
        self.admin.create_attribute(req).await?;
        Ok(())
    }

    async fn add_proxy(&mut self, p: &ProxyEndpoint) -> Result<()> {
        let req = signed(
            AddProxyRequest {
                id: p.id.clone(),
                endpoint: p.endpoint.clone(),
                tls_root: p.tls_root.clone(),
                tls_name: p.tls_name.clone(),
            },
            self.id,
            &format!("{ADMIN}AddProxy"),
            &self.admin_key,
        );
        self.admin.add_proxy(req).await?;
        Ok(())
    }

    async fn enroll(&mut self, who: &IdentityInfo, roles: &[&str]) -> Result<()> {
        let req = signed(
            EnrollRequest {
                registry: who.registry.clone(),
                subject: who.subject.clone(),
                request_key: who.request_key.to_bytes().to_vec(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
            },
            self.id,
            &format!("{ADMIN}Enroll"),
            &self.admin_key,
        );
        self.admin.enroll(req).await?;
        Ok(())
    }

    async fn grant(&mut self, who: &IdentityInfo, attr: &str) -> Result<()> {
        let req = signed(
            GrantRequest {
                gid: who.gid.as_bytes().to_vec(),
                attribute: attr.into(),
                expires_at: 0,
            },
            self.id,
            &format!("{ADMIN}Grant"),
            &self.admin_key,
        );
        self.admin.grant(req).await?;
        Ok(())
    }

    async fn approve_all(&mut self, note: &str) -> Result<usize> {
        let list = self
            .admin
            .list_requests(signed(
                // The demo files a handful of requests: one page holds them.
                ListRequestsRequest {
                    state: "pending".into(),
                    ..Default::default()
                },
                self.id,
                &format!("{ADMIN}ListRequests"),
                &self.admin_key,
            ))
            .await?
            .into_inner()
            .requests;
        for r in &list {
            println!(
                "    request #{} for {}: \"{}\" -> approved",
                r.id, r.attribute, r.reason
            );
            self.admin
                .decide_request(signed(
                    DecideRequestRequest {
                        id: r.id,
                        approve: true,
                        note: note.into(),
                    },
                    self.id,
                    &format!("{ADMIN}DecideRequest"),
                    &self.admin_key,
                ))
                .await?;
        }
        Ok(list.len())
    }
}

/// `mabe --home DIR/people/<short> identity new`, then the trust file:
/// the four authorities, the emergency attributes, the record store and
/// the records system's key.
fn new_person(
    people: &Path,
    short: &'static str,
    label: &'static str,
    (registry, subject): (&str, &str),
    authorities: &[TrustedAuthority],
    proxy: &ProxyEndpoint,
    writer: Option<VerifyingKey>,
) -> Result<Person> {
    let store = KeyStore::open(people.join(short));
    let info = store.create_identity(registry, subject, None, &mut OsRng)?;
    let mut trust = TrustStore::load_or_empty(&store.trust_path())?;
    for a in authorities {
        trust.add_authority(a.clone())?;
    }
    trust.set_emergency(
        EMERGENCY
            .iter()
            .map(|a| a.parse())
            .collect::<Result<Vec<Attribute>, _>>()?,
    )?;
    trust.add_proxy(proxy.clone())?;
    if let Some(key) = writer {
        trust.add_writer(WRITER_NAME, key)?;
    }
    trust.save()?;
    Ok(Person {
        short,
        label,
        info,
        client: Client::open(store)?,
    })
}

fn fetched_list(fetched: &[Fetched]) -> String {
    let keys: Vec<String> = fetched
        .iter()
        .flat_map(|f| f.keys.iter())
        .map(|(a, v, new)| format!("{a} v{v}{}", if *new { "" } else { " (already held)" }))
        .collect();
    if keys.is_empty() {
        "(no keys)".into()
    } else {
        keys.join(", ")
    }
}

/// What one reader got from the document.
struct Reading {
    visible: BTreeSet<String>,
    withheld: BTreeMap<String, String>,
}

impl Reading {
    fn reason(&self, section: &str) -> &str {
        self.withheld.get(section).map_or("", String::as_str)
    }
}

/// `mabe decrypt-json` for `p`: every section read must be the original
/// value, signed by the records system.
async fn read_as(p: &Person, doc: &Value, plain: &Value, writer: &VerifyingKey) -> Result<Reading> {
    let out = json::decrypt_json(&p.client, doc, true, false)
        .await
        .with_context(|| format!("{} reading the record", p.label))?;
    let mut visible = BTreeSet::new();
    if let Some(sections) = out.value.get("sections").and_then(Value::as_object) {
        for (name, value) in sections {
            ensure!(
                plain.get(name) == Some(value),
                "{} read {name} but it differs from what was written",
                p.label
            );
            match out.signatures.get(name) {
                Some(SignatureStatus::Valid(w)) if &w.key == writer => {}
                other => bail!(
                    "{}: {name} is not signed by the records system: {other:?}",
                    p.label
                ),
            }
            visible.insert(name.clone());
        }
    }
    let mut withheld = BTreeMap::new();
    if let Some(w) = out.value.get("withheld").and_then(Value::as_object) {
        for (name, reason) in w {
            withheld.insert(name.clone(), reason.as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(Reading { visible, withheld })
}

/// Print what `p` reads and why the rest is withheld.
fn show(who: &str, r: &Reading) {
    let reads = if r.visible.is_empty() {
        "reads nothing".to_owned()
    } else {
        format!(
            "reads {}",
            r.visible.iter().cloned().collect::<Vec<_>>().join(", ")
        )
    };
    println!("    {who:<36} {reads}");
    for (section, reason) in &r.withheld {
        println!("    {:<36}   withheld {section}: {reason}", "");
    }
}

/// Why a section is withheld when nothing else is said: the keys held do
/// not satisfy its policy.
const UNSATISFIED: &str = "cannot decrypt: policy needs";
/// Why a section is withheld from a cardiologist whose cardiology key is
/// older than the updated header row.
const STALE: &str = "key for cardiology@hospital-a is version 1, record needs version 2";

/// Print what `who` gets of one section.
fn show_section(who: &str, r: &Reading, section: &str) {
    if r.visible.contains(section) {
        println!("    {who:<36} reads {section}");
    } else {
        println!("    {who:<36} withheld {section}: {}", r.reason(section));
    }
}

/// Check that `r` shows exactly `expected`, and that the reason for each
/// withheld section contains the text `why` gives for it, else
/// [`UNSATISFIED`].
fn expect(who: &str, r: &Reading, expected: &[&str], why: &[(&str, &str)]) -> Result<()> {
    let want: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
    ensure!(
        r.visible == want,
        "{who} should read {want:?} but reads {:?}",
        r.visible
    );
    for (section, reason) in &r.withheld {
        let needle = why
            .iter()
            .find(|(s, _)| s == section)
            .map_or(UNSATISFIED, |(_, w)| w);
        ensure!(
            reason.contains(needle),
            "{who}, {section}: expected a reason with {needle:?}, got {reason:?}"
        );
    }
    Ok(())
}

/// A record container's header and the bytes after it (FORMAT.md §9.1).
fn split_container(bytes: &[u8]) -> Result<(Header, &[u8])> {
    let len = bytes
        .get(6..10)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .context("a record container is too short")? as usize;
    let end = 10usize.checked_add(len).context("header length")?;
    let header = bytes
        .get(10..end)
        .context("a record container is truncated")?;
    Ok((Header::from_bytes(header)?, &bytes[end..]))
}

/// The base64 record of each section of an encrypted document.
fn section_records(doc: &Value) -> Result<BTreeMap<String, Vec<u8>>> {
    let sections = doc
        .get("sections")
        .and_then(Value::as_object)
        .context("the encrypted document has no sections")?;
    sections
        .iter()
        .map(|(name, s)| {
            let b64 = s
                .get("record")
                .and_then(Value::as_str)
                .context("a section has no record")?;
            Ok((name.clone(), STANDARD.decode(b64)?))
        })
        .collect()
}

/// Quote `path` for a POSIX shell if it needs it.
fn sh(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:=@,".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// `--keep DIR` must be new or empty: the demo's data is never mixed with
/// anything else.
fn prepare_keep(dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!(
                "demo --keep {}: this is not a directory; give a new or empty directory",
                dir.display()
            );
        }
        let mut entries = std::fs::read_dir(dir)
            .with_context(|| format!("demo --keep: reading {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "demo --keep {}: the directory is not empty (a previous demo?); give a new or \
                 empty directory, or remove this one first",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Run the demo; with `keep`, everything (authorities, proxy, people's key
/// stores, the encrypted record) stays in that directory, which must be new
/// or empty.
pub async fn run(keep: Option<PathBuf>) -> Result<()> {
    let t0 = Instant::now();
    let tmp;
    let root: PathBuf = match &keep {
        Some(dir) => {
            prepare_keep(dir)?;
            dir.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!("mabe demo: three hospitals and one patient's personal authority share a record.");
    println!(
        "Each authority and the record-store proxy is a real node (SQLite, TLS gRPC on 127.0.0.1) in this process;"
    );
    println!(
        "people act through the `mabe` client library, each with a key store and a trust file."
    );
    if std::env::var_os("MABE_KEK").is_some() {
        println!(
            "MABE_KEK is set: the authorities seal their secrets under it (no kek.hex is written)."
        );
    }

    step(
        t0,
        "Starting authorities hospital-a, hospital-b, hospital-c and patient-jansen (mabe-authority init + serve)",
    );
    let mut hs: BTreeMap<&str, Authority> = BTreeMap::new();
    for id in ["hospital-a", "hospital-b", "hospital-c", "patient-jansen"] {
        let h = start_authority(&root, id).await?;
        println!(
            "    {id:<15} listening on {} (identity key {}…)",
            h.pinned.endpoint.as_deref().unwrap_or("-"),
            &hex::encode(h.pinned.identity_key.to_bytes())[..16]
        );
        hs.insert(id, h);
    }
    let pinned: Vec<TrustedAuthority> = hs.values().map(|h| h.pinned.clone()).collect();

    step(
        t0,
        "Starting the record-store proxy cloud-1 (it never sees a key or a plaintext)",
    );
    let trusted: Vec<(&str, VerifyingKey)> = hs
        .iter()
        .map(|(id, h)| (*id, h.pinned.identity_key))
        .collect();
    let (cloud, cloud_server) = start_proxy(&root, &trusted).await?;
    for h in hs.values_mut() {
        h.add_proxy(&cloud).await?;
    }
    println!(
        "    cloud-1 listening on {}; it pins the four authorities' identity keys, and each authority registered it",
        cloud.endpoint
    );

    step(t0, "Administrators create attributes");
    for (id, names) in [
        ("hospital-a", &["doctor", "cardiology", "researcher"][..]),
        ("hospital-b", &["emergency"][..]),
        ("hospital-c", &["emergency"][..]),
        ("patient-jansen", &["family"][..]),
    ] {
        let a = hs.get_mut(id).context("authority")?;
        for n in names {
            a.create(n).await?;
            println!("    {n}@{id}");
        }
    }

    step(
        t0,
        "Key stores and trust files: `mabe identity new` for each person, the four authorities pinned",
    );
    let people_dir = root.join("people");
    let writer = new_person(
        &people_dir,
        "records-a",
        "hospital-a records system",
        ("hospital-a", "records-system"),
        &pinned,
        &cloud,
        None,
    )?;
    let writer_key = writer.info.request_key;
    let mut people: Vec<Person> = Vec::new();
    for (short, label, id) in [
        (
            "jansen",
            "Dr. Jansen (cardiologist, A)",
            ("big-register", "19011111101"),
        ),
        (
            "devries",
            "Dr. de Vries (cardiologist, A)",
            ("big-register", "19022222202"),
        ),
        (
            "bakker",
            "Nurse Bakker (emergency, B)",
            ("big-register", "19033333303"),
        ),
        (
            "smit",
            "R. Smit (researcher)",
            ("orcid", "0000-0002-1825-0097"),
        ),
        (
            "daughter",
            "E. Jansen (daughter)",
            ("national-id", "NL-123456782"),
        ),
        (
            "visser",
            "Dr. Visser (emergency physician, C)",
            ("big-register", "19044444404"),
        ),
    ] {
        people.push(new_person(
            &people_dir,
            short,
            label,
            id,
            &pinned,
            &cloud,
            Some(writer_key),
        )?);
    }
    for p in std::iter::once(&writer).chain(&people) {
        println!(
            "    people/{:<10} {:<36} GID {}…",
            p.short,
            p.label,
            &p.info.gid.to_string()[..16]
        );
    }
    println!(
        "    each trust file pins 4 authorities (endpoint, identity key, TLS root), EMERGENCY = {}, record store cloud-1",
        EMERGENCY.join(" | ")
    );

    step(
        t0,
        "People are enrolled; each authority verifies the identity itself",
    );
    for p in &people {
        for a in hs.values_mut() {
            // Hospital C enrolls Dr. Visser as emergency staff.
            let roles: &[&str] = if a.id == "hospital-c" && p.short == "visser" {
                &["emergency-staff"]
            } else {
                &[]
            };
            a.enroll(&p.info, roles).await?;
        }
    }
    {
        let a = hs.get_mut("hospital-a").context("hospital-a")?;
        for p in &people[..2] {
            a.grant(&p.info, "doctor").await?;
            a.grant(&p.info, "cardiology").await?;
        }
        hs.get_mut("hospital-b")
            .context("hospital-b")?
            .grant(&people[2].info, "emergency")
            .await?;
    }
    println!(
        "    {} people enrolled at all four authorities (Dr. Visser as emergency staff at hospital-c)",
        people.len()
    );
    println!(
        "    hospital-a grants doctor + cardiology to both cardiologists; hospital-b grants emergency to Nurse Bakker"
    );

    step(
        t0,
        "The researcher and the daughter request attributes, with a reason (Client::request_attribute)",
    );
    let id = people[3]
        .client
        .request_attribute(
            &"researcher@hospital-a".parse()?,
            "cohort study CARD-2026, ethics approval 2026-114",
        )
        .await?;
    println!("    R. Smit files request #{id} at hospital-a");
    let id = people[4]
        .client
        .request_attribute(
            &"family@patient-jansen".parse()?,
            "I am his daughter and his contact person",
        )
        .await?;
    println!("    E. Jansen files request #{id} at patient-jansen");
    println!("    hospital-a's admin reviews:");
    ensure!(
        hs.get_mut("hospital-a")
            .context("hospital-a")?
            .approve_all("ethics approval checked")
            .await?
            == 1,
        "hospital-a should have one pending request"
    );
    println!("    the patient reviews requests to his personal authority:");
    ensure!(
        hs.get_mut("patient-jansen")
            .context("patient-jansen")?
            .approve_all("approved by the patient")
            .await?
            == 1,
        "patient-jansen should have one pending request"
    );

    step(
        t0,
        "Everyone fetches keys (signed requests; each key passes the pairing check before it is stored)",
    );
    let expected_keys = [
        vec!["cardiology@hospital-a", "doctor@hospital-a"],
        vec!["cardiology@hospital-a", "doctor@hospital-a"],
        vec!["emergency@hospital-b"],
        vec!["researcher@hospital-a"],
        vec!["family@patient-jansen"],
        vec![],
    ];
    for (p, want) in people.iter().zip(&expected_keys) {
        let got = p.client.fetch_keys(None).await?;
        println!("    {:<36} {}", p.label, fetched_list(&got));
        let held: Vec<String> = got
            .iter()
            .flat_map(|f| f.keys.iter().map(|(a, _, _)| a.to_string()))
            .collect();
        ensure!(
            &held == want,
            "{} should hold {want:?}, holds {held:?}",
            p.label
        );
    }

    step(
        t0,
        "The hospital-a records system writes the patient's record, one policy per section (encrypt_json, signed)",
    );
    let plain: Value = serde_json::from_str(RECORD)?;
    let policies = SectionPolicies::from_toml(SECTIONS)?;
    let signer = writer.client.store().load_identity()?;
    let mut doc = json::encrypt_json(
        &writer.client,
        &policies,
        &plain,
        Some(&signer),
        true,
        &mut OsRng,
    )
    .await?;
    let record_path = root.join("record.mabe.json");
    std::fs::write(&record_path, serde_json::to_string_pretty(&doc)?)?;
    std::fs::write(root.join("sections.toml"), SECTIONS)?;
    let mut store = records::connect(&cloud).await?;
    let originals = section_records(&doc)?;
    let mut ids: BTreeMap<String, RecordId> = BTreeMap::new();
    for (section, container) in &originals {
        let policy = doc
            .pointer(&format!("/sections/{section}/policy"))
            .and_then(Value::as_str)
            .unwrap_or_default();
        let id = records::put(
            &mut store,
            &cloud.id,
            std::io::Cursor::new(container.clone()),
        )
        .await?;
        println!(
            "    {section:<17} under {policy}\n{:<22}stored at cloud-1 as record {}",
            "",
            hex::encode(id)
        );
        ids.insert(section.clone(), id);
    }
    println!(
        "    the document ({} sections, each a signed record) is in {}",
        originals.len(),
        record_path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    );

    // Who may read which section.
    let expected: [&[&str]; 6] = [
        &["personal_report", "vital_signs"],
        &["personal_report", "vital_signs"],
        &["vital_signs"],
        &["research_extract"],
        &["personal_report"],
        &[],
    ];
    step(
        t0,
        "Who can read what (decrypt_json per reader; every section read is signed by the records system)",
    );
    for (p, want) in people.iter().zip(expected) {
        let r = read_as(p, &doc, &plain, &writer_key).await?;
        show(p.label, &r);
        expect(p.label, &r, want, &[])?;
    }

    step(
        t0,
        "hospital-a removes cardiology from Dr. de Vries (revocation)",
    );
    let a = hs.get_mut("hospital-a").context("hospital-a")?;
    let rev = a
        .admin
        .revoke(signed(
            RevokeRequest {
                gid: people[1].info.gid.as_bytes().to_vec(),
                attribute: "cardiology".into(),
            },
            a.id,
            &format!("{ADMIN}Revoke"),
            &a.admin_key,
        ))
        .await?
        .into_inner();
    println!(
        "    cardiology@hospital-a is now version {}; {} remaining holder(s)",
        rev.new_version, rev.reissued_to
    );
    // The authority drives the rotation at the proxy: freeze version 1,
    // snapshot the affected rows, send one update token per row, erase the
    // update secret.
    let report = |p: &mabe_authority::store::RotationProgress| {
        if p.done_at.is_some() {
            println!(
                "    proxy {}: {}/{} row(s) updated with tokens (snapshot root {}…)",
                p.proxy_id,
                p.rows_done,
                p.rows_total,
                &hex::encode(p.snapshot_root)[..16]
            );
        }
    };
    let job = mabe_authority::revocation::drive_rotation(&a.node, rev.rotation_id, &report).await?;
    ensure!(
        job.update_secret_sealed.is_none(),
        "the update secret must be erased"
    );
    println!("    the update secret is erased");

    // Rebuild the document from the record store: headers as the proxy
    // updated them, everything after each header as stored.
    let mut updated_rows = 0;
    for (section, id) in &ids {
        let fetched = records::get(&mut store, &cloud.id, id, Vec::new()).await?;
        let original = originals.get(section).context("section")?;
        let (_, before) = split_container(original)?;
        let (header, after) = split_container(&fetched)?;
        ensure!(
            before == after,
            "{section}: the payload bytes changed at the proxy"
        );
        updated_rows += header
            .rows()
            .iter()
            .filter(|r| {
                r.attribute().to_string() == "cardiology@hospital-a" && r.version().get() == 2
            })
            .count();
        let slot = doc
            .pointer_mut(&format!("/sections/{section}/record"))
            .context("section record")?;
        *slot = Value::String(STANDARD.encode(&fetched));
    }
    ensure!(
        updated_rows == 1,
        "expected 1 header row at cardiology v2, found {updated_rows}"
    );
    std::fs::write(&record_path, serde_json::to_string_pretty(&doc)?)?;
    println!(
        "    records::get: {updated_rows} header row now at cardiology v2; payload bytes (all after each header) unchanged"
    );
    println!(
        "    record.mabe.json now holds the document rebuilt from cloud-1 (records::get: headers as the proxy updated them)"
    );

    let (jansen, devries) = (&people[0], &people[1]);
    let r = read_as(jansen, &doc, &plain, &writer_key).await?;
    show_section("Dr. Jansen, before fetching keys", &r, "vital_signs");
    expect(
        jansen.label,
        &r,
        &["personal_report"],
        &[("vital_signs", STALE)],
    )?;
    let got = jansen
        .client
        .fetch_keys(Some(&"hospital-a".parse()?))
        .await?;
    println!("    Dr. Jansen fetches keys: {}", fetched_list(&got));
    let r = read_as(jansen, &doc, &plain, &writer_key).await?;
    show_section(jansen.label, &r, "vital_signs");
    expect(jansen.label, &r, &["personal_report", "vital_signs"], &[])?;
    let r = read_as(devries, &doc, &plain, &writer_key).await?;
    show_section(devries.label, &r, "vital_signs");
    expect(
        devries.label,
        &r,
        &["personal_report"],
        &[("vital_signs", STALE)],
    )?;
    let got = devries
        .client
        .fetch_keys(Some(&"hospital-a".parse()?))
        .await?;
    ensure!(
        got.iter()
            .flat_map(|f| f.keys.iter())
            .all(|(a, _, _)| a.to_string() != "cardiology@hospital-a"),
        "the revoked cardiologist was issued cardiology again"
    );
    println!(
        "    Dr. de Vries fetches keys: {}; no cardiology",
        fetched_list(&got)
    );
    let r = read_as(devries, &doc, &plain, &writer_key).await?;
    show_section("Dr. de Vries, after fetching keys", &r, "vital_signs");
    expect(
        devries.label,
        &r,
        &["personal_report"],
        &[("vital_signs", STALE)],
    )?;

    step(
        t0,
        "Emergency: Dr. Visser at hospital-c breaks the glass for a patient from hospital-a",
    );
    let visser = &people[5];
    let reason = "patient Jansen unconscious in our ER after a car accident";
    let got = visser
        .client
        .break_glass(&"hospital-c".parse()?, reason)
        .await?;
    let keys = visser.client.store().load_keys()?;
    for k in keys.iter() {
        println!(
            "    hospital-c issues {} v{} at once, expiring at {} (pairing check passed, stored)",
            k.key.attribute(),
            k.key.version(),
            mabe_client::utc_text(k.expires_at)
        );
    }
    ensure!(
        got.keys.len() == 1 && keys.iter().all(|k| k.expires_at > 0),
        "break-glass should give one expiring key"
    );
    let r = read_as(visser, &doc, &plain, &writer_key).await?;
    show(visser.label, &r);
    expect(visser.label, &r, &["vital_signs"], &[])?;
    let c_audit = hs
        .get("hospital-c")
        .context("hospital-c")?
        .node
        .store()
        .audit_entries(1, 10_000)
        .await?;
    let entry = c_audit
        .iter()
        .find(|e| e.event.kind == "break-glass")
        .context("hospital-c audited the break-glass")?;
    ensure!(entry.event.detail.contains(reason));
    println!(
        "    hospital-c's audit log, entry #{}: break-glass by {}…: {}",
        entry.seq,
        &entry.event.actor[..16.min(entry.event.actor.len())],
        entry.event.detail
    );
    println!(
        "    when the grant expires, `rotate-expired` rotates emergency@hospital-c and the proxy updates stored rows"
    );

    step(t0, "Every authority verifies its tamper-evident audit log");
    for (id, a) in &hs {
        a.node.checkpoint().await?;
        let report = a.node.verify_audit().await?;
        ensure!(report.problems.is_empty(), "{id}: {:?}", report.problems);
        println!(
            "    {id:<15} {} entries, checkpoint signed, chain verifies",
            report.entries
        );
    }

    // Stop every server and let go of every database before the data is
    // left for the command-line tools (or removed).
    drop(store);
    cloud_server.stop().await;
    for (_, a) in std::mem::take(&mut hs) {
        a.server.stop().await;
    }
    drop(people);
    drop(writer);

    match &keep {
        Some(dir) => {
            let d = |p: &str| sh(&dir.join(p));
            println!("\nThe data is in {}:", dir.display());
            println!(
                "    hospital-a/ … patient-jansen/   mabe-authority data directories (authority.db, admin.key, kek.hex, tls/)"
            );
            println!("    cloud-1/                        the mabe-proxy data directory");
            println!(
                "    people/<name>/                  key stores and trust files (records-a, jansen, devries, bakker, smit, daughter, visser)"
            );
            println!(
                "    record.mabe.json, sections.toml the encrypted record (as cloud-1 holds it now) and its policies"
            );
            println!(
                "Explore it with the real tools (in target/release/, or `cargo run --release -p <crate> --`); the servers are stopped, so use --offline:"
            );
            for cmd in [
                format!("mabe-authority --data-dir {} audit verify", d("hospital-a")),
                format!(
                    "mabe-authority --data-dir {} audit list --kind break-glass",
                    d("hospital-c")
                ),
                format!(
                    "mabe-authority --data-dir {} attribute describe cardiology",
                    d("hospital-a")
                ),
                format!("mabe-proxy --data-dir {} records list", d("cloud-1")),
                format!("mabe --home {} keys list", d("people/jansen")),
                format!(
                    "mabe --home {} --offline decrypt-json --in {}",
                    d("people/jansen"),
                    d("record.mabe.json")
                ),
                format!(
                    "mabe --home {} --offline decrypt-json --in {}",
                    d("people/devries"),
                    d("record.mabe.json")
                ),
            ] {
                println!("    {cmd}");
            }
        }
        None => println!(
            "\nThe data was in a temporary directory, now removed: `mabe demo --keep DIR` keeps it to explore."
        ),
    }
    step(t0, "Done: every expectation held");
    Ok(())
}
