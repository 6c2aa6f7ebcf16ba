//! Hardening of the authority node, over real gRPC with TLS on loopback and
//! against both backends: audit scans that meet a tampered `seq = i64::MAX`,
//! truncation of the newest audit entries, size limits on what callers can
//! write into the audit log, paged listings, `DescribeAttribute`, the
//! health status during shutdown, and thousands of calls on one connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{future::Future, path::PathBuf, sync::Arc, time::Duration};

use mabe_authority::{
    admin_client::signed,
    audit::AuditProblem,
    node::{MAX_PAGE_SIZE, now},
    store::{AuditEvent, Store, postgres::PgStore, sqlite::SqliteStore},
};
use mabe_proto::{
    signing::break_glass_message,
    v1::{
        BreakGlassRequest, DescribeAttributeRequest, KeyRequest, ListAttributesRequest,
        ListAuditRequest, ListRequestsRequest, VerifyAuditRequest,
    },
};
use tonic::Code;

mod common;
use common::*;

/// One fresh database of either backend, with raw SQL access (the
/// tamperer's view).
enum Db {
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    Postgres {
        url: String,
    },
}

impl Db {
    async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("authority.db");
        Db::Sqlite { _dir: dir, path }
    }

    async fn postgres() -> Db {
        Db::Postgres {
            url: fresh_pg_url("mabe_hardening").await,
        }
    }

    async fn store(&self) -> Arc<dyn Store> {
        match self {
            Db::Sqlite { path, .. } => Arc::new(SqliteStore::open(path).unwrap()),
            Db::Postgres { url } => Arc::new(PgStore::connect(url).await.unwrap()),
        }
    }

    async fn exec(&self, sql: &str) {
        match self {
            Db::Sqlite { path, .. } => {
                let c = rusqlite::Connection::open(path).unwrap();
                c.busy_timeout(Duration::from_secs(5)).unwrap();
                c.execute_batch(sql).unwrap();
            }
            Db::Postgres { url } => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                client.batch_execute(sql).await.unwrap();
            }
        }
    }
}

/// Declare each test once; it runs on both backends.
macro_rules! both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Db::postgres().await).await;
                }
            )*
        }
    };
}

both!(
    audit_scans_stop_at_a_tampered_i64_max,
    deleting_the_newest_entries_is_reported_and_exposure_counted,
    callers_cannot_write_large_audit_entries,
    attributes_and_requests_are_listed_in_pages,
    describe_attribute_shows_versions_holders_requests_and_rotations,
);

/// Fails the test instead of hanging on an endless loop.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 60 s"))
}

fn admin_path(m: &str) -> String {
    format!("{ADMIN}{m}")
}

/// Regression: an audit row moved to `seq = i64::MAX` made the verify,
/// checkpoint and ListAudit scans compute `seq + 1` (a panic in debug
/// builds, an endless loop in release builds).
async fn audit_scans_stop_at_a_tampered_i64_max(db: Db) {
    let mut r = start(db.store().await).await;
    r.node.create_attribute("cardiology").await.unwrap();
    r.node.create_attribute("nurse").await.unwrap();
    db.exec("UPDATE audit SET seq = 9223372036854775807 WHERE seq = 2")
        .await;
    let report = within("verify", r.node.verify_audit()).await.unwrap();
    assert_eq!(report.entries, 3);
    assert!(
        report
            .problems
            .contains(&AuditProblem::Edited { seq: i64::MAX }),
        "{:?}",
        report.problems
    );
    assert!(
        report
            .problems
            .contains(&AuditProblem::Missing { after: 1, next: 3 })
    );
    let cp = within("checkpoint", r.node.checkpoint())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cp.seq, i64::MAX);
    for from_seq in [1, i64::MAX, i64::MIN] {
        let list = within(
            "ListAudit",
            r.admin.list_audit(signed(
                ListAuditRequest {
                    from_seq,
                    limit: 1000,
                    kind: String::new(),
                },
                "hospital-a",
                &admin_path("ListAudit"),
                &r.admin_key,
            )),
        )
        .await
        .unwrap()
        .into_inner();
        assert_eq!(list.next_seq, 0, "from {from_seq}");
        assert_eq!(list.entries.last().map(|e| e.seq), Some(i64::MAX));
    }
    // Nothing can follow it: appending is refused, not wrapped around.
    assert!(r.node.create_attribute("surgeon").await.is_err());
    r.stop().await;
}

/// Deleting the newest entries that a checkpoint covers is named as such;
/// entries after the newest checkpoint are counted, because their deletion
/// (with any later checkpoint) cannot be seen from inside the database.
async fn deleting_the_newest_entries_is_reported_and_exposure_counted(db: Db) {
    let mut r = start(db.store().await).await;
    let verify = |r: &mut Running| {
        let req = signed(
            VerifyAuditRequest {},
            "hospital-a",
            &admin_path("VerifyAudit"),
            &r.admin_key,
        );
        let mut admin = r.admin.clone();
        async move { admin.verify_audit(req).await.unwrap().into_inner() }
    };
    // 1 init, 2 and 3 create-attribute.
    r.node.create_attribute("a").await.unwrap();
    r.node.create_attribute("b").await.unwrap();
    let v = verify(&mut r).await;
    assert_eq!(
        (v.head_seq, v.last_checkpoint_seq, v.uncovered_entries),
        (3, 0, 3)
    );
    assert_eq!(r.node.checkpoint().await.unwrap().unwrap().seq, 3);
    // Signing again at the same head keeps the checkpoint there.
    assert_eq!(r.node.checkpoint().await.unwrap().unwrap().seq, 3);
    r.node.create_attribute("c").await.unwrap();
    r.node.create_attribute("d").await.unwrap();
    let v = verify(&mut r).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!(
        (v.head_seq, v.last_checkpoint_seq, v.uncovered_entries),
        (5, 3, 2)
    );
    assert_eq!(r.node.checkpoint().await.unwrap().unwrap().seq, 5);
    let v = verify(&mut r).await;
    assert_eq!((v.last_checkpoint_seq, v.uncovered_entries), (5, 0));

    // The newest two entries go; the checkpoint at 5 still names them.
    db.exec("DELETE FROM audit WHERE seq > 3").await;
    let report = r.node.verify_audit().await.unwrap();
    assert_eq!(
        report.problems,
        vec![AuditProblem::Truncated {
            checkpoint: 5,
            head: 3
        }]
    );
    let v = verify(&mut r).await;
    assert_eq!(
        v.problems,
        vec![
            "the log ends at entry 3 but a signed checkpoint covers entry 5: the newest \
             entries were deleted"
        ]
    );
    // The residual risk (docs/PROTOCOL.md): with that checkpoint deleted as
    // well, the shorter log is consistent; only a copy kept elsewhere shows it.
    db.exec("DELETE FROM checkpoints WHERE seq > 3").await;
    let v = verify(&mut r).await;
    assert!(v.problems.is_empty(), "{:?}", v.problems);
    assert_eq!((v.head_seq, v.last_checkpoint_seq), (3, 3));
    r.stop().await;
}

/// Refusals of unauthenticated calls are audited, but what the caller chose
/// is echoed only up to a bound: no caller can write megabytes into the log
/// (nor into the status message).
async fn callers_cannot_write_large_audit_entries(db: Db) {
    let mut r = start(db.store().await).await;
    let stranger = person("nobody");
    let huge = "h".repeat(3 << 20);
    let mut req = key_request(&stranger, &[], now(), &stranger.key);
    req.authority_id = huge.clone();
    let err = r.public.fetch_keys(req).await.expect_err("wrong authority");
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(err.message().len() < 400, "{}", err.message().len());
    let entries = r.node.store().audit_entries(1, 1000).await.unwrap();
    let last = entries.last().unwrap();
    assert_eq!(last.event.kind, "refusal");
    assert!(last.event.detail.len() < 400, "{}", last.event.detail.len());
    assert!(
        last.event.detail.contains("...[truncated, 3145728 bytes]"),
        "{}",
        last.event.detail
    );
    assert!(r.node.verify_audit().await.unwrap().problems.is_empty());

    // An oversized break-glass reason is refused before anything is audited.
    let before = r.node.store().audit_entries(1, 1000).await.unwrap().len();
    let reason = "r".repeat(1 << 20);
    let nonce = nonce();
    let ts = now();
    let msg = break_glass_message("hospital-a", stranger.gid.as_bytes(), &reason, &nonce, ts);
    use ed25519_dalek::Signer;
    let err = r
        .public
        .break_glass(BreakGlassRequest {
            authority_id: "hospital-a".into(),
            gid: stranger.gid.as_bytes().to_vec(),
            reason,
            nonce,
            timestamp: ts,
            signature: stranger.key.sign(&msg).to_bytes().to_vec(),
        })
        .await
        .expect_err("oversized reason");
    assert_eq!(err.code(), Code::InvalidArgument);
    let after = r.node.store().audit_entries(1, 1000).await.unwrap().len();
    assert_eq!(after, before);
    // A long multi-byte id is cut at a character boundary.
    let mut req: KeyRequest = key_request(&stranger, &[], now(), &stranger.key);
    req.authority_id = format!("hospital-a{}", "\u{1f3e5}".repeat(1000));
    let err = r.public.fetch_keys(req).await.expect_err("wrong authority");
    assert_eq!(err.code(), Code::Unauthenticated);
    let entries = r.node.store().audit_entries(1, 1000).await.unwrap();
    assert!(entries.last().unwrap().event.detail.len() < 400);
    r.stop().await;
}

/// ListAttributes and ListRequests come in pages of at most
/// [`MAX_PAGE_SIZE`]; following `next_page_token` yields every item once,
/// in order.
async fn attributes_and_requests_are_listed_in_pages(db: Db) {
    let r = start(db.store().await).await;
    for name in ["e", "a", "g", "c", "b", "f", "d"] {
        r.node.create_attribute(name).await.unwrap();
    }
    let doc = person("19012345601");
    let p = r
        .node
        .enroll(
            "big-register",
            "19012345601",
            &doc.key.verifying_key().to_bytes(),
            &[],
        )
        .await
        .unwrap();
    r.node.grant(&p.gid, "c", None, "admin").await.unwrap();
    r.node.revoke(&p.gid, "c").await.unwrap(); // c gets version 2
    let list_attributes = |r: &Running, page_token: String, page_size: u32| {
        let req = signed(
            ListAttributesRequest {
                page_token,
                page_size,
            },
            "hospital-a",
            &admin_path("ListAttributes"),
            &r.admin_key,
        );
        let mut admin = r.admin.clone();
        async move { admin.list_attributes(req).await.map(|x| x.into_inner()) }
    };
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list_attributes(&r, token.clone(), 3).await.unwrap();
        assert!(page.attributes.len() <= 3);
        pages += 1;
        seen.extend(
            page.attributes
                .iter()
                .map(|a| (a.attribute.clone(), a.version)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let all: Vec<(String, u32)> = r
        .node
        .attributes()
        .await
        .unwrap()
        .into_iter()
        .map(|(a, _)| (a.attribute, a.version))
        .collect();
    assert_eq!(all.len(), 8);
    assert_eq!(seen, all);
    assert_eq!(pages, 3);
    let one = list_attributes(&r, String::new(), 0).await.unwrap();
    assert_eq!(one.attributes.len(), 8);
    assert!(one.next_page_token.is_empty());
    for bad in ["x", "a1.zz.1", "a1.61", "r1.5"] {
        let err = list_attributes(&r, bad.into(), 2).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
    }

    // More requests than the largest page.
    let n = MAX_PAGE_SIZE as usize + 7;
    let mut tasks = Vec::new();
    for i in 0..n {
        let store = Arc::clone(r.node.store());
        let gid = p.gid;
        tasks.push(tokio::spawn(async move {
            let ev = AuditEvent {
                ts: now(),
                kind: "request".into(),
                actor: hex::encode(gid),
                subject: Some(hex::encode(gid)),
                attribute: Some("a@hospital-a".into()),
                detail: format!("reason: study {i}"),
            };
            store
                .create_request(&gid, "a@hospital-a", "study", now(), ev)
                .await
                .unwrap()
                .id
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort_unstable();
    let list_requests = |r: &Running, page_token: String, page_size: u32| {
        let req = signed(
            ListRequestsRequest {
                state: "pending".into(),
                page_token,
                page_size,
            },
            "hospital-a",
            &admin_path("ListRequests"),
            &r.admin_key,
        );
        let mut admin = r.admin.clone();
        async move { admin.list_requests(req).await.map(|x| x.into_inner()) }
    };
    for size in [0, MAX_PAGE_SIZE, 100_000] {
        let first = list_requests(&r, String::new(), size).await.unwrap();
        assert_eq!(first.requests.len(), MAX_PAGE_SIZE as usize, "size {size}");
        let second = list_requests(&r, first.next_page_token, size)
            .await
            .unwrap();
        assert_eq!(second.requests.len(), 7);
        assert!(second.next_page_token.is_empty());
        let got: Vec<i64> = first
            .requests
            .iter()
            .chain(&second.requests)
            .map(|q| q.id)
            .collect();
        assert_eq!(got, ids);
    }
    let small = list_requests(&r, String::new(), 2).await.unwrap();
    assert_eq!(small.requests.len(), 2);
    assert_eq!(small.next_page_token, format!("r1.{}", ids[1]));
    let err = list_requests(&r, "r1.x".into(), 2).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    r.stop().await;
}

/// DescribeAttribute: versions with their times, current holders, pending
/// requests and rotation jobs of one attribute.
async fn describe_attribute_shows_versions_holders_requests_and_rotations(db: Db) {
    let mut r = start(db.store().await).await;
    r.node.create_attribute("cardiology").await.unwrap();
    r.node.create_attribute("nurse").await.unwrap();
    let mut gids = Vec::new();
    for i in 0..3 {
        let subject = format!("1901234560{i}");
        let p = person(&subject);
        let rec = r
            .node
            .enroll(
                "big-register",
                &subject,
                &p.key.verifying_key().to_bytes(),
                &[],
            )
            .await
            .unwrap();
        gids.push(rec.gid);
    }
    r.node
        .grant(&gids[0], "cardiology", None, "admin")
        .await
        .unwrap();
    r.node
        .grant(&gids[1], "cardiology", None, "admin")
        .await
        .unwrap();
    let rev = r.node.revoke(&gids[1], "cardiology").await.unwrap();
    assert_eq!(rev.new_version, 2);
    let store = r.node.store();
    let req_ev = || AuditEvent {
        ts: now(),
        kind: "request".into(),
        actor: "test".into(),
        subject: None,
        attribute: None,
        detail: String::new(),
    };
    let pending = store
        .create_request(&gids[2], "cardiology@hospital-a", "ward", now(), req_ev())
        .await
        .unwrap();
    let decided = store
        .create_request(&gids[1], "cardiology@hospital-a", "back", now(), req_ev())
        .await
        .unwrap();
    r.node
        .decide(decided.id, false, "no", "admin", None)
        .await
        .unwrap();
    store
        .create_request(&gids[2], "nurse@hospital-a", "other", now(), req_ev())
        .await
        .unwrap();

    let describe = |r: &Running, name: &str| {
        let req = signed(
            DescribeAttributeRequest { name: name.into() },
            "hospital-a",
            &admin_path("DescribeAttribute"),
            &r.admin_key,
        );
        let mut admin = r.admin.clone();
        async move { admin.describe_attribute(req).await.map(|x| x.into_inner()) }
    };
    let d = describe(&r, "cardiology").await.unwrap();
    assert_eq!(d.attribute, "cardiology@hospital-a");
    assert_eq!(d.current_version, 2);
    let versions = r
        .node
        .store()
        .attribute_versions("cardiology@hospital-a")
        .await
        .unwrap();
    let shown: Vec<(u32, &str, i64, i64)> = d
        .versions
        .iter()
        .map(|v| (v.version, v.state.as_str(), v.created_at, v.superseded_at))
        .collect();
    assert_eq!(
        shown,
        vec![
            (
                1,
                "superseded",
                versions[0].created_at,
                versions[1].created_at
            ),
            (2, "current", versions[1].created_at, 0),
        ]
    );
    assert_eq!(d.holders, 1);
    assert_eq!(d.pending_requests, 1);
    assert_eq!(d.pending.len(), 1);
    assert_eq!(
        (d.pending[0].id, d.pending[0].reason.as_str()),
        (pending.id, "ward")
    );
    assert_eq!(d.rotations.len(), 1);
    let job = &d.rotations[0];
    assert_eq!(
        (job.id, job.from_version, job.to_version, job.state.as_str()),
        (rev.rotation_id, 1, 2, "pending")
    );
    // The full name works too; another authority's attribute, an unknown
    // one and an unsigned call are refused.
    assert_eq!(
        describe(&r, "cardiology@hospital-a")
            .await
            .unwrap()
            .current_version,
        2
    );
    let nurse = describe(&r, "nurse").await.unwrap();
    assert_eq!(
        (nurse.current_version, nurse.holders, nurse.pending_requests),
        (1, 0, 1)
    );
    assert!(nurse.rotations.is_empty());
    assert_eq!(
        describe(&r, "ghost").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        describe(&r, "cardiology@hospital-b")
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    let unsigned = r
        .admin
        .describe_attribute(DescribeAttributeRequest {
            name: "cardiology".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unsigned.code(), Code::Unauthenticated);
    r.stop().await;
}

/// Graceful shutdown first turns the health status to NOT_SERVING (a
/// watcher sees it), then drains; an open Watch stream ends instead of
/// holding the drain up forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_shutdown_starts() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let db = Db::sqlite().await;
    let mut r = start(db.store().await).await;
    let mut health = HealthClient::new(r.public_channel.clone());
    for service in ["", "mabe.v1.Authority"] {
        let s = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(s.status(), ServingStatus::Serving, "{service:?}");
    }
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "mabe.v1.Authority".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let _ = r.stop.take().map(|s| s.send(()));
    let next = tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("a status change when shutdown starts")
        .unwrap()
        .unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    // The stream ends and the server finishes draining.
    let end = tokio::time::timeout(Duration::from_secs(20), watch.message())
        .await
        .expect("the watch stream ends");
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    tokio::time::timeout(Duration::from_secs(20), &mut r.task)
        .await
        .expect("the server drains")
        .unwrap();
}

/// Thousands of calls at once on ONE connection all succeed. Each empty
/// request is a DATA frame of 5 bytes; h2 0.4.20 charges unread small frames
/// against a per-connection budget and closes the connection (GOAWAY
/// `ENHANCE_YOUR_CALM`) when it runs out, failing every call on it. The
/// server bounds the streams a connection may open
/// (`MAX_STREAMS_PER_CONNECTION`), so the client queues the rest instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_calls_on_one_connection_all_succeed() {
    let db = Db::sqlite().await;
    let r = start(db.store().await).await;
    let calls = 6_000;
    let start = Arc::new(tokio::sync::Barrier::new(calls));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let mut public = r.public.clone();
        let start = Arc::clone(&start);
        tasks.spawn(async move {
            start.wait().await;
            public
                .get_info(mabe_proto::v1::GetInfoRequest {})
                .await
                .map(|info| info.into_inner().authority_id)
        });
    }
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    while let Some(t) = tasks.join_next().await {
        match t.unwrap() {
            Ok(id) => assert_eq!(id, "hospital-a"),
            Err(e) => *failures.entry(e.to_string()).or_default() += 1,
        }
    }
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    r.stop().await;
}
