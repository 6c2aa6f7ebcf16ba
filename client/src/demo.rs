//! `mabe demo`: three hospitals and a patient's personal authority, as real
//! authority nodes, and a record-store proxy (SQLite, TLS gRPC on loopback)
//! in this process, sharing a patient's record: requests and approvals,
//! field-level policies, a revocation carried out at the proxy with update
//! tokens, and break-glass emergency access. Prints the story; fails
//! (non-zero exit) if any expectation does not hold.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use ark_std::rand::rngs::OsRng;
use ed25519_dalek::SigningKey;
use mabe_abe::{
    AbeError, EncryptOptions, Header, PublicKeyRing, UserKey, UserKeyRing, decrypt, encrypt,
};
use mabe_authority::{
    admin_client::signed,
    node::{Node, NodeConfig},
    seal::Kek,
    server::{Listeners, ServeOptions, TlsPem, serve},
    store::sqlite::SqliteStore,
};
use mabe_proto::v1::{
    CreateAttributeRequest, DecideRequestRequest, EnrollRequest, GrantRequest, ListRequestsRequest,
    RevokeRequest, authority_admin_client::AuthorityAdminClient,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use mabe_client::{Connection, Identity, TrustedAuthority};

const ADMIN: &str = "/mabe.v1.AuthorityAdmin/";

struct Hospital {
    id: String,
    node: Arc<Node>,
    admin_key: SigningKey,
    admin: AuthorityAdminClient<Channel>,
    trust: TrustedAuthority,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

fn step(t0: Instant, text: &str) {
    println!("\n[{:>6.2}s] {text}", t0.elapsed().as_secs_f64());
}

async fn start_authority(dir: &Path, id: &str) -> Result<Hospital> {
    std::fs::create_dir_all(dir)?;
    let store = Arc::new(SqliteStore::open(&dir.join("authority.db"))?);
    let (node, admin_key) =
        Node::init(store, id, Kek::generate(&mut OsRng), NodeConfig::default()).await?;
    let node = Arc::new(node);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let tls = TlsPem {
        cert: ck.cert.pem().into_bytes(),
        key: ck.signing_key.serialize_pem().into_bytes(),
    };
    let listeners = Listeners::bind("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let (public, admin_addr) = listeners.addrs()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let n2 = Arc::clone(&node);
    tokio::spawn(async move {
        let opts = ServeOptions {
            tls: Some(tls),
            request_timeout: Duration::from_secs(30),
        };
        if let Err(e) = serve(n2, listeners, opts, async {
            let _ = rx.await;
        })
        .await
        {
            eprintln!("authority stopped with an error: {e}");
        }
    });
    let cert = ck.cert.pem().into_bytes();
    let admin_channel = Endpoint::from_shared(format!("https://localhost:{}", admin_addr.port()))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&cert))
                .domain_name("localhost"),
        )?
        .connect()
        .await
        .context("connecting to the admin listener")?;
    Ok(Hospital {
        id: id.into(),
        trust: TrustedAuthority {
            id: id.parse()?,
            endpoint: Some(format!("https://localhost:{}", public.port())),
            identity_key: node.identity_public_key(),
            tls_root: cert,
            tls_name: "localhost".into(),
        },
        node,
        admin_key,
        admin: AuthorityAdminClient::new(admin_channel),
        stop: Some(tx),
    })
}

/// The record-store proxy, in this process: its id, URL and TLS root.
struct Cloud {
    id: String,
    url: String,
    tls_root: Vec<u8>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start_proxy(dir: &Path, id: &str, trusted: &[(&str, [u8; 32])]) -> Result<Cloud> {
    use mabe_proxy::{
        node::{Node as ProxyNode, NodeConfig as ProxyConfig},
        server::{Listeners as ProxyListeners, ServeOptions as ProxyOptions, TlsPem as ProxyTls},
        store::sqlite::SqliteStore as ProxyStore,
    };
    std::fs::create_dir_all(dir)?;
    let store = Arc::new(ProxyStore::open(&dir.join("proxy.db"))?);
    let node = Arc::new(ProxyNode::new(store, ProxyConfig::new(id))?);
    for (authority, key) in trusted {
        node.trust(authority, key).await?;
    }
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()])?;
    let tls = ProxyTls {
        cert: ck.cert.pem().into_bytes(),
        key: ck.signing_key.serialize_pem().into_bytes(),
    };
    let listeners = ProxyListeners::bind("127.0.0.1:0".parse()?, "127.0.0.1:0".parse()?).await?;
    let (public, _) = listeners.addrs()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if let Err(e) =
            mabe_proxy::server::serve(node, listeners, ProxyOptions::new(Some(tls)), async {
                let _ = rx.await;
            })
            .await
        {
            eprintln!("proxy stopped with an error: {e}");
        }
    });
    Ok(Cloud {
        id: id.into(),
        url: format!("https://localhost:{}", public.port()),
        tls_root: ck.cert.pem().into_bytes(),
        stop: Some(tx),
    })
}

impl Hospital {
    async fn create(&mut self, name: &str) -> Result<()> {
        let req = signed(
            CreateAttributeRequest { name: name.into() },
            &self.id,
            &format!("{ADMIN}CreateAttribute"),
            &self.admin_key,
        );
        self.admin.create_attribute(req).await?;
        Ok(())
    }

    async fn enroll(
        &mut self,
        who: &Identity,
        registry: &str,
        subject: &str,
        roles: &[&str],
    ) -> Result<()> {
        let req = signed(
            EnrollRequest {
                registry: registry.into(),
                subject: subject.into(),
                request_key: who.key.verifying_key().to_bytes().to_vec(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
            },
            &self.id,
            &format!("{ADMIN}Enroll"),
            &self.admin_key,
        );
        self.admin.enroll(req).await?;
        Ok(())
    }

    async fn grant(&mut self, who: &Identity, attr: &str) -> Result<()> {
        let req = signed(
            GrantRequest {
                gid: who.gid.as_bytes().to_vec(),
                attribute: attr.into(),
                expires_at: 0,
            },
            &self.id,
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
                &self.id,
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
                    &self.id,
                    &format!("{ADMIN}DecideRequest"),
                    &self.admin_key,
                ))
                .await?;
        }
        Ok(list.len())
    }
}

struct Person {
    name: &'static str,
    id: Identity,
    keys: UserKeyRing,
}

/// The patient's record: sections, each under its own policy.
const SECTIONS: &[(&str, &str, &str)] = &[
    (
        "vital signs",
        "(doctor@hospital-a AND cardiology@hospital-a) OR emergency@hospital-b OR emergency@hospital-c",
        r#"{"bp": "128/84", "hr": 71, "ecg": "sinus rhythm"}"#,
    ),
    (
        "personal report",
        "family@patient-jansen OR doctor@hospital-a",
        r#"{"summary": "Recovering well; may go home on Friday."}"#,
    ),
    (
        "research extract",
        "researcher@hospital-a",
        r#"{"age_band": "60-69", "condition": "I25.1", "outcome": "stable"}"#,
    ),
];

fn read(
    header: &Header,
    payload: &[u8],
    keys: &UserKeyRing,
    pks: &PublicKeyRing,
) -> Result<Vec<u8>, AbeError> {
    let mut out = Vec::new();
    decrypt(header, keys, pks, payload, &mut out)?;
    Ok(out)
}

fn explain(e: &AbeError) -> String {
    match e {
        AbeError::Unsatisfied { missing, .. } => format!(
            "withheld: policy needs {}",
            missing
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" + ")
        ),
        AbeError::KeyVersionMismatch {
            attribute,
            held,
            needed,
        } => format!(
            "withheld: key for {attribute} is version {held}, record needs version {needed}"
        ),
        other => format!("withheld: {other}"),
    }
}

/// Run the demo; `keep` leaves the authorities' data directories there.
pub async fn run(keep: Option<PathBuf>) -> Result<()> {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir()?;
    let root = match &keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.clone()
        }
        None => tmp.path().to_path_buf(),
    };
    println!("mabe demo: three hospitals and one patient's personal authority share a record.");
    println!(
        "Each authority and the record-store proxy is a real node (SQLite, TLS gRPC on 127.0.0.1) in this process."
    );

    step(
        t0,
        "Starting authorities hospital-a, hospital-b, hospital-c and patient-jansen",
    );
    let mut hs: BTreeMap<&str, Hospital> = BTreeMap::new();
    for id in ["hospital-a", "hospital-b", "hospital-c", "patient-jansen"] {
        let h = start_authority(&root.join(id), id).await?;
        println!(
            "    {id:<15} listening on {} (identity key {}…)",
            h.trust.endpoint.as_deref().unwrap_or("-"),
            &hex::encode(h.trust.identity_key.to_bytes())[..16]
        );
        hs.insert(id, h);
    }
    step(
        t0,
        "Starting the record-store proxy cloud-1 (it never sees a key or a plaintext)",
    );
    let trusted: Vec<(&str, [u8; 32])> = hs
        .iter()
        .map(|(id, h)| (*id, h.trust.identity_key.to_bytes()))
        .collect();
    let mut cloud = start_proxy(&root.join("cloud-1"), "cloud-1", &trusted).await?;
    for h in hs.values() {
        h.node
            .add_proxy(&cloud.id, &cloud.url, &cloud.tls_root, "localhost")
            .await?;
    }
    println!(
        "    cloud-1 listening on {}; it pins the four authorities' identity keys, and each authority registered it",
        cloud.url
    );
    let mut records =
        mabe_proxy::client::RecordClient::connect(&cloud.url, &cloud.tls_root, "localhost").await?;

    step(t0, "Administrators create attributes");
    for (id, names) in [
        ("hospital-a", &["doctor", "cardiology", "researcher"][..]),
        ("hospital-b", &["emergency"][..]),
        ("hospital-c", &["emergency"][..]),
        ("patient-jansen", &["family"][..]),
    ] {
        let hosp = hs.get_mut(id).context("authority")?;
        for n in names {
            hosp.create(n).await?;
            println!("    {n}@{id}");
        }
    }

    step(
        t0,
        "People are enrolled; each authority verifies the identity itself",
    );
    let mut people: Vec<Person> = Vec::new();
    for (name, registry, subject) in [
        (
            "Dr. Jansen (cardiologist, A)",
            "big-register",
            "19011111101",
        ),
        (
            "Dr. de Vries (cardiologist, A)",
            "big-register",
            "19022222202",
        ),
        ("Nurse Bakker (emergency, B)", "big-register", "19033333303"),
        ("R. Smit (researcher)", "orcid", "0000-0002-1825-0097"),
        ("E. Jansen (daughter)", "national-id", "NL-123456782"),
        (
            "Dr. Visser (emergency physician, C)",
            "big-register",
            "19044444404",
        ),
    ] {
        let id = Identity::new(registry, subject)?;
        let keys = UserKeyRing::new(id.gid)?;
        people.push(Person { name, id, keys });
        let p = people.last().context("person")?;
        for auth in ["hospital-a", "hospital-b", "hospital-c", "patient-jansen"] {
            // Hospital C enrolls Dr. Visser as emergency staff.
            let roles: &[&str] = if auth == "hospital-c" && subject == "19044444404" {
                &["emergency-staff"]
            } else {
                &[]
            };
            hs.get_mut(auth)
                .context("authority")?
                .enroll(&p.id, registry, subject, roles)
                .await?;
        }
        println!("    {name:<36} GID {}…", &p.id.gid.to_string()[..16]);
    }
    {
        let a = hs.get_mut("hospital-a").context("a")?;
        for i in [0, 1] {
            a.grant(&people[i].id, "doctor").await?;
            a.grant(&people[i].id, "cardiology").await?;
        }
        hs.get_mut("hospital-b")
            .context("b")?
            .grant(&people[2].id, "emergency")
            .await?;
    }
    println!(
        "    hospital-a grants doctor + cardiology to both cardiologists; hospital-b grants emergency to Nurse Bakker"
    );

    step(
        t0,
        "The researcher and the daughter request attributes, with a reason",
    );
    let mut conns: BTreeMap<String, Connection> = BTreeMap::new();
    for (id, hosp) in &hs {
        conns.insert(
            (*id).to_owned(),
            Connection::connect(hosp.trust.clone()).await?,
        );
    }
    let c = conns.get_mut("hospital-a").context("a")?;
    c.request_attribute(
        &people[3].id,
        "researcher@hospital-a",
        "cohort study CARD-2026, ethics approval 2026-114",
    )
    .await?;
    let c = conns.get_mut("patient-jansen").context("p")?;
    c.request_attribute(
        &people[4].id,
        "family@patient-jansen",
        "I am his daughter and his contact person",
    )
    .await?;
    println!("    hospital-a's admin reviews:");
    ensure!(
        hs.get_mut("hospital-a")
            .context("a")?
            .approve_all("ethics approval checked")
            .await?
            == 1
    );
    println!("    the patient reviews requests to his personal authority:");
    ensure!(
        hs.get_mut("patient-jansen")
            .context("p")?
            .approve_all("approved by the patient")
            .await?
            == 1
    );

    step(
        t0,
        "Everyone fetches keys (signed requests; every key passes the pairing check)",
    );
    let mut pks = PublicKeyRing::new();
    for conn in conns.values_mut() {
        conn.directory(&mut pks).await?;
    }
    println!(
        "    {} public keys from 4 signed directories, each verified against its pinned identity key",
        pks.len()
    );
    for p in people.iter_mut() {
        let mut got = Vec::new();
        for conn in conns.values_mut() {
            got.extend(conn.fetch_keys(&p.id, &pks, &mut p.keys).await?);
        }
        println!(
            "    {:<36} {}",
            p.name,
            if got.is_empty() {
                "(no keys)".into()
            } else {
                got.join(", ")
            }
        );
    }

    step(
        t0,
        "A hospital system writes the patient's record, one policy per section",
    );
    let mut stored: Vec<(Header, Vec<u8>)> = Vec::new();
    let mut ids: Vec<[u8; 16]> = Vec::new();
    for (section, policy, body) in SECTIONS {
        let p = mabe_policy::parse(policy)?;
        let mut payload = Vec::new();
        let header = encrypt(
            &p,
            &pks,
            &EncryptOptions::default(),
            &mut OsRng,
            body.as_bytes(),
            &mut payload,
        )?;
        let id = records
            .put(&header.to_bytes(), std::io::Cursor::new(payload.clone()))
            .await?;
        println!(
            "    {section:<17} under {policy}\n{:<22}stored at cloud-1 as {}",
            "",
            hex::encode(id)
        );
        ids.push(id);
        stored.push((Header::from_bytes(&header.to_bytes())?, payload));
    }

    // Who may read what: (person, section) -> expected.
    let expect = [
        [true, true, false],   // Dr. Jansen
        [true, true, false],   // Dr. de Vries
        [true, false, false],  // Nurse Bakker (emergency@hospital-b)
        [false, false, true],  // researcher
        [false, true, false],  // daughter
        [false, false, false], // Dr. Visser, before breaking the glass
    ];
    step(t0, "Who can read what");
    let mut failures = 0;
    for (p, row) in people.iter().zip(expect.iter()) {
        for ((section, _, body), ((header, payload), &should)) in
            SECTIONS.iter().zip(stored.iter().zip(row.iter()))
        {
            let got = read(header, payload, &p.keys, &pks);
            let line = match (&got, should) {
                (Ok(text), true) if text == body.as_bytes() => format!("reads {section}"),
                (Err(e), false) => explain(e),
                (got, _) => {
                    failures += 1;
                    format!(
                        "UNEXPECTED for {section}: {:?}",
                        got.as_ref().map(|_| "read")
                    )
                }
            };
            println!("    {:<36} {line}", p.name);
        }
    }
    ensure!(failures == 0, "{failures} unexpected read results");

    step(
        t0,
        "hospital-a removes cardiology from Dr. de Vries (revocation)",
    );
    let a = hs.get_mut("hospital-a").context("a")?;
    let rev = a
        .admin
        .revoke(signed(
            RevokeRequest {
                gid: people[1].id.gid.as_bytes().to_vec(),
                attribute: "cardiology".into(),
            },
            "hospital-a",
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
    let mut updated_rows = 0;
    for (i, id) in ids.iter().enumerate() {
        let (header, payload) = records.get(id, Vec::new()).await?;
        let entry = stored.get_mut(i).context("record")?;
        ensure!(payload == entry.1, "payload bytes changed at the proxy");
        let fresh = Header::from_bytes(&header)?;
        updated_rows += fresh
            .rows()
            .iter()
            .filter(|r| {
                r.attribute().to_string() == "cardiology@hospital-a" && r.version().get() == 2
            })
            .count();
        entry.0 = fresh;
    }
    println!(
        "    {updated_rows} header row(s) at cardiology v2 in storage; payload bytes unchanged; update secret erased"
    );
    let mut pks2 = PublicKeyRing::new();
    for conn in conns.values_mut() {
        conn.directory(&mut pks2).await?;
    }
    let jansen = &mut people[0];
    let got = conns
        .get_mut("hospital-a")
        .context("a")?
        .fetch_keys(&jansen.id, &pks2, &mut jansen.keys)
        .await?;
    println!("    Dr. Jansen fetches again: {}", got.join(", "));
    let vitals = &stored[0];
    ensure!(read(&vitals.0, &vitals.1, &people[0].keys, &pks2)? == SECTIONS[0].2.as_bytes());
    println!("    Dr. Jansen reads vital signs");
    match read(&vitals.0, &vitals.1, &people[1].keys, &pks2) {
        Err(e) => println!("    Dr. de Vries: {}", explain(&e)),
        Ok(_) => bail!("the revoked cardiologist can still read the record"),
    }
    let devries = &mut people[1];
    match conns
        .get_mut("hospital-a")
        .context("a")?
        .fetch_keys(&devries.id, &pks2, &mut devries.keys)
        .await
    {
        Ok(got) if got.iter().all(|k| !k.starts_with("cardiology")) => {
            println!(
                "    Dr. de Vries fetches again: gets {} but no cardiology",
                got.join(", ")
            );
        }
        other => bail!("unexpected fetch for the revoked cardiologist: {other:?}"),
    }

    step(
        t0,
        "Emergency: Dr. Visser at hospital-c breaks the glass for a patient from hospital-a",
    );
    let visser = &mut people[5];
    let reason = "patient Jansen unconscious in our ER after a car accident";
    let issued = conns
        .get_mut("hospital-c")
        .context("c")?
        .break_glass(&visser.id, reason)
        .await?;
    for k in issued {
        let key = UserKey::from_bytes(&k.user_key)?;
        let pk = pks2
            .get(key.attribute(), key.version())
            .context("emergency public key")?
            .clone();
        println!(
            "    hospital-c issues {} v{} at once, expiring at {} (pairing check passed)",
            key.attribute(),
            key.version(),
            k.expires_at
        );
        visser.keys.insert(key, &pk)?;
    }
    let vitals = &stored[0];
    ensure!(read(&vitals.0, &vitals.1, &people[5].keys, &pks2)? == SECTIONS[0].2.as_bytes());
    println!("    Dr. Visser reads vital signs");
    match read(&stored[1].0, &stored[1].1, &people[5].keys, &pks2) {
        Err(e) => println!("    Dr. Visser, personal report: {}", explain(&e)),
        Ok(_) => bail!("the emergency key must not open the personal report"),
    }
    let c_audit = hs
        .get("hospital-c")
        .context("c")?
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
    for (id, hosp) in &hs {
        hosp.node.checkpoint().await?;
        let report = hosp.node.verify_audit().await?;
        ensure!(report.problems.is_empty(), "{id}: {:?}", report.problems);
        println!(
            "    {id:<15} {} entries, checkpoint signed, chain verifies",
            report.entries
        );
    }

    println!(
        "\nThe same flows from the command line: `mabe` (key store, encrypt/decrypt, encrypt-json,"
    );
    println!(
        "keys break-glass), `mabe-authority` and `mabe-proxy`; see README.md and docs/CLIENT.md."
    );
    let _ = cloud.stop.take().map(|s| s.send(()));
    for hosp in hs.values_mut() {
        let _ = hosp.stop.take().map(|s| s.send(()));
    }
    if let Some(dir) = keep {
        println!("\nData left in {}", dir.display());
    }
    step(t0, "Done: every expectation held");
    Ok(())
}
