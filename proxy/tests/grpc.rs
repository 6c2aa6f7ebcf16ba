//! The proxy over real gRPC with TLS on loopback: uploads and downloads,
//! freezes, token batches with real tokens and decryption, and the
//! authentication of authority calls.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{PROXY_ID, Served, World, attr, identity, relabelled};
use ed25519_dalek::SigningKey;
use mabe_abe::{AbeError, Header, Snapshot, Version};
use mabe_proto::signing::{self, METHOD_APPLY_TOKENS, METHOD_FREEZE};
use mabe_proto::v1::{
    ApplyOutcome, FreezeRequest, PutRecordFinish, PutRecordRequest, freeze_response,
    put_record_request, record_store_client::RecordStoreClient,
};
use mabe_proxy::ProxyError;
use mabe_proxy::node::NodeConfig;
use mabe_proxy::store::sqlite::SqliteStore;
use mabe_proxy::store::{NewRecord, RowEntry, Store};
use sha2::{Digest, Sha256};
use tonic::Code;

fn sqlite() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("proxy.db")).unwrap();
    (dir, Arc::new(store))
}

async fn trusted(served: &Served, names: &[&str]) {
    for n in names {
        served
            .node
            .trust(n, &identity(n).verifying_key().to_bytes())
            .await
            .unwrap();
    }
}

fn code(e: ProxyError) -> Code {
    match e {
        ProxyError::Rpc { code, .. } => code,
        other => panic!("not a refusal from the proxy: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_round_trip_is_byte_identical() {
    let (_d, store) = sqlite();
    let served = Served::start(store).await;
    let mut c = served.records().await;
    assert_eq!(c.proxy_id().await.unwrap(), PROXY_ID);
    let mut w = World::new(&["doctor@hospital-a"], 1);
    let dr = w.person("dr", &["doctor@hospital-a"]);
    for size in [0usize, 1, 5 * 1024 * 1024 + 123] {
        let plain: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        let (header, ct) = w.encrypt("doctor@hospital-a", &plain);
        let rid = c
            .put(&header.to_bytes(), std::io::Cursor::new(ct.clone()))
            .await
            .unwrap();
        assert_eq!(&rid, header.rid().as_bytes());
        let (h, payload) = c.get(&rid, Vec::new()).await.unwrap();
        assert_eq!(h, header.to_bytes());
        assert_eq!(payload, ct, "{size} bytes: byte-identical");
        assert_eq!(
            w.decrypt(&Header::from_bytes(&h).unwrap(), &dr, &payload)
                .unwrap(),
            plain
        );
    }
    // A second upload with the same id is refused.
    let (header, ct) = w.encrypt("doctor@hospital-a", b"x");
    c.put(&header.to_bytes(), std::io::Cursor::new(ct.clone()))
        .await
        .unwrap();
    assert_eq!(
        code(
            c.put(&header.to_bytes(), std::io::Cursor::new(ct))
                .await
                .unwrap_err()
        ),
        Code::AlreadyExists
    );
    served.stop().await;
}

/// GetRecord answers a payload of any size: empty, within one stored chunk
/// (answered from the record's own read), exactly one chunk, and several.
async fn get_answers_every_payload_size(store: Arc<dyn Store>) {
    let served = Served::start(store).await;
    let mut c = served.records().await;
    let mut w = World::new(&["doctor@hospital-a"], 21);
    let one = mabe_proxy::STORE_CHUNK_BYTES;
    for size in [0usize, 1, 4096, one - 1, one, one + 1, 2 * one + 5] {
        let (header, _) = w.encrypt("doctor@hospital-a", b"x");
        // The proxy never parses payloads: any bytes will do.
        let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        let rid = c
            .put(&header.to_bytes(), std::io::Cursor::new(payload.clone()))
            .await
            .unwrap();
        let (h, got) = c.get(&rid, Vec::new()).await.unwrap();
        assert_eq!(h, header.to_bytes(), "{size} bytes");
        assert_eq!(got, payload, "{size} bytes");
    }
    // Concurrent reads of the same records over one connection.
    let (header, _) = w.encrypt("doctor@hospital-a", b"x");
    let payload = vec![3u8; 4096];
    let rid = c
        .put(&header.to_bytes(), std::io::Cursor::new(payload.clone()))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let mut c = c.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let (_, got) = c.get(&rid, Vec::new()).await.unwrap();
            assert_eq!(got, payload);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_answers_every_payload_size_sqlite() {
    let (_d, store) = sqlite();
    get_answers_every_payload_size(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_answers_every_payload_size_postgres() {
    let (store, drop_db) = postgres("mabe_proxy_sizes").await;
    get_answers_every_payload_size(store).await;
    drop_db.await;
}

/// Thousands of reads at once on ONE connection all succeed. Each request is
/// a DATA frame of 23 bytes; h2 0.4.20 charges unread small frames against a
/// per-connection budget and closes the connection (GOAWAY
/// `ENHANCE_YOUR_CALM`, "too_many_data_frames") when it runs out, failing
/// every call on it. The server bounds the streams a connection may open
/// (`MAX_STREAMS_PER_CONNECTION`), so the client queues the rest instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_reads_on_one_connection_all_succeed() {
    let (_d, store) = sqlite();
    let served = Served::start(store).await;
    let mut c = served.records().await;
    let mut w = World::new(&["doctor@hospital-a"], 23);
    let (header, _) = w.encrypt("doctor@hospital-a", b"x");
    let payload = vec![5u8; 64];
    let rid = c
        .put(&header.to_bytes(), std::io::Cursor::new(payload.clone()))
        .await
        .unwrap();
    // One client, one channel: one HTTP/2 connection.
    let calls = 6_000;
    let start = Arc::new(tokio::sync::Barrier::new(calls));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let mut c = c.clone();
        let start = Arc::clone(&start);
        tasks.spawn(async move {
            start.wait().await;
            c.get(&rid, Vec::new()).await
        });
    }
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok((h, got)) => assert!(h == header.to_bytes() && got == payload),
            Err(e) => *failures.entry(e.to_string()).or_default() += 1,
        }
    }
    assert!(failures.is_empty(), "failed calls: {failures:?}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_and_delete() {
    let (_d, store) = sqlite();
    let served = Served::start(store).await;
    let mut c = served.records().await;
    let mut w = World::new(&["doctor@hospital-a", "nurse@hospital-b"], 2);
    let mut ids = Vec::new();
    for i in 0..5u8 {
        let (header, ct) = w.encrypt("doctor@hospital-a AND nurse@hospital-b", &[i; 10]);
        ids.push(
            c.put(&header.to_bytes(), std::io::Cursor::new(ct))
                .await
                .unwrap(),
        );
    }
    ids.sort();
    let mut seen = Vec::new();
    let mut token = Vec::new();
    loop {
        let page = c.list(&token, 2).await.unwrap();
        for r in &page.records {
            assert_eq!(r.rows.len(), 2);
            assert_eq!(r.rows[0].attribute, "doctor@hospital-a");
            assert_eq!(r.rows[0].version, 1);
            assert_eq!(r.payload_size, 26);
            seen.push(<[u8; 16]>::try_from(r.record_id.as_slice()).unwrap());
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids);
    c.delete(&ids[0]).await.unwrap();
    assert_eq!(code(c.delete(&ids[0]).await.unwrap_err()), Code::NotFound);
    assert_eq!(
        code(c.get(&ids[0], Vec::new()).await.unwrap_err()),
        Code::NotFound
    );
    assert_eq!(c.list(&[], 100).await.unwrap().records.len(), 4);
    assert_eq!(
        code(c.list(&[], 5000).await.unwrap_err()),
        Code::ResourceExhausted
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_uploads_store_nothing() {
    let (_d, store) = sqlite();
    let served = Served::start(store.clone()).await;
    let mut raw = RecordStoreClient::new(served.channel().await);
    let mut w = World::new(&["doctor@hospital-a"], 3);
    let (header, ct) = w.encrypt("doctor@hospital-a", b"payload");
    let hb = header.to_bytes();
    let msg = |p| PutRecordRequest { part: Some(p) };
    let finish = |size: u64, sha: Vec<u8>| {
        msg(put_record_request::Part::Finish(PutRecordFinish {
            payload_size: size,
            payload_sha256: sha,
        }))
    };
    let sha = Sha256::digest(&ct).to_vec();
    let cases: Vec<(Vec<PutRecordRequest>, Code)> = vec![
        // Not a header.
        (
            vec![msg(put_record_request::Part::Header(b"MABE junk".to_vec()))],
            Code::InvalidArgument,
        ),
        // A header with a trailing byte.
        (
            vec![msg(put_record_request::Part::Header(
                [hb.clone(), vec![0]].concat(),
            ))],
            Code::InvalidArgument,
        ),
        // Chunk before the header.
        (
            vec![msg(put_record_request::Part::Chunk(ct.clone()))],
            Code::InvalidArgument,
        ),
        // No finish: the stream just ends.
        (
            vec![
                msg(put_record_request::Part::Header(hb.clone())),
                msg(put_record_request::Part::Chunk(ct.clone())),
            ],
            Code::InvalidArgument,
        ),
        // Wrong size, wrong digest.
        (
            vec![
                msg(put_record_request::Part::Header(hb.clone())),
                msg(put_record_request::Part::Chunk(ct.clone())),
                finish(ct.len() as u64 + 1, sha.clone()),
            ],
            Code::InvalidArgument,
        ),
        (
            vec![
                msg(put_record_request::Part::Header(hb.clone())),
                msg(put_record_request::Part::Chunk(ct.clone())),
                finish(ct.len() as u64, vec![0; 32]),
            ],
            Code::InvalidArgument,
        ),
        // A chunk over the 1 MiB limit.
        (
            vec![
                msg(put_record_request::Part::Header(hb.clone())),
                msg(put_record_request::Part::Chunk(vec![0; (1 << 20) + 1])),
            ],
            Code::ResourceExhausted,
        ),
        // A message over the 4 MiB limit (tonic's decoder answers OUT_OF_RANGE).
        (
            vec![msg(put_record_request::Part::Header(vec![0; 5 << 20]))],
            Code::OutOfRange,
        ),
    ];
    for (i, (msgs, expected)) in cases.into_iter().enumerate() {
        let got = raw
            .put_record(tokio_stream::iter(msgs))
            .await
            .expect_err("refused");
        assert_eq!(got.code(), expected, "case {i}: {got:?}");
    }
    assert!(store.list_records(None, 10).await.unwrap().is_empty());
    // Every refused upload's chunks were discarded.
    assert_eq!(store.purge_abandoned_uploads(i64::MAX).await.unwrap(), 0);
    // The well-formed upload works.
    raw.put_record(tokio_stream::iter(vec![
        msg(put_record_request::Part::Header(hb)),
        msg(put_record_request::Part::Chunk(ct.clone())),
        finish(ct.len() as u64, sha),
    ]))
    .await
    .unwrap();
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_refuses_old_uploads_and_is_idempotent() {
    let (_d, store) = sqlite();
    let served = Served::start(store).await;
    trusted(&served, &["hospital-a"]).await;
    let mut c = served.records().await;
    let mut a = served.authority("hospital-a", identity("hospital-a")).await;
    let mut w = World::new(&["cardiology@hospital-a", "doctor@hospital-a"], 4);
    let mut headers = Vec::new();
    for p in [
        "cardiology@hospital-a",
        "cardiology@hospital-a AND doctor@hospital-a",
        "doctor@hospital-a",
    ] {
        let (h, ct) = w.encrypt(p, b"x");
        c.put(&h.to_bytes(), std::io::Cursor::new(ct))
            .await
            .unwrap();
        headers.push(h);
    }
    let f = a.freeze("cardiology@hospital-a", 1).await.unwrap();
    let mut expected = Snapshot::new(attr("cardiology@hospital-a"), Version::FIRST);
    for h in &headers {
        for r in h.snapshot_rows(&attr("cardiology@hospital-a"), Version::FIRST) {
            expected.insert(r).unwrap();
        }
    }
    assert_eq!(f.rows, expected.rows().collect::<Vec<_>>());
    assert_eq!(f.summary.rows, 2);
    assert_eq!(f.summary.merkle_root, expected.merkle_root().to_vec());
    // A writer still on v1 is refused.
    let (stale, ct) = w.encrypt("cardiology@hospital-a", b"late");
    let e = c
        .put(&stale.to_bytes(), std::io::Cursor::new(ct))
        .await
        .unwrap_err();
    assert_eq!(code(e), Code::FailedPrecondition);
    assert!(c.get(stale.rid().as_bytes(), Vec::new()).await.is_err());
    // Re-freezing (a restarted authority) returns the same snapshot.
    let again = a.freeze("cardiology@hospital-a", 1).await.unwrap();
    assert_eq!(again.summary, f.summary);
    assert_eq!(again.rows, f.rows);
    served.stop().await;
}

/// The whole revocation flow over gRPC: freeze, tokens, decryption with the
/// new key, the old key fails cryptographically, repeats are harmless.
async fn revocation_end_to_end(store: Arc<dyn Store>) {
    let served = Served::start(store).await;
    trusted(&served, &["hospital-a"]).await;
    let mut c = served.records().await;
    let mut a = served.authority("hospital-a", identity("hospital-a")).await;
    let mut w = World::new(
        &[
            "cardiology@hospital-a",
            "doctor@hospital-a",
            "nurse@hospital-b",
        ],
        5,
    );
    let revoked = w.person(
        "dr-revoked",
        &[
            "cardiology@hospital-a",
            "doctor@hospital-a",
            "nurse@hospital-b",
        ],
    );
    let policies = [
        "cardiology@hospital-a",
        "cardiology@hospital-a AND doctor@hospital-a",
        // The attribute in two rows: both updated or neither.
        "(cardiology@hospital-a AND doctor@hospital-a) OR (cardiology@hospital-a AND nurse@hospital-b)",
        "nurse@hospital-b",
    ];
    let mut stored = Vec::new();
    for (i, p) in policies.iter().enumerate() {
        let plain = format!("record {i}").into_bytes();
        let (h, ct) = w.encrypt(p, &plain);
        c.put(&h.to_bytes(), std::io::Cursor::new(ct.clone()))
            .await
            .unwrap();
        assert_eq!(w.decrypt(&h, &revoked, &ct).unwrap(), plain);
        stored.push((h, ct, plain));
    }
    let frozen = a.freeze("cardiology@hospital-a", 1).await.unwrap();
    assert_eq!(frozen.rows.len(), 4);
    let us = w.rotate("cardiology@hospital-a");
    let (_, tokens) = w.tokens(&us, &frozen.rows);
    let st = a.status("cardiology@hospital-a", 1, &[], 10).await.unwrap();
    assert_eq!(st.pending_rows, 4);
    assert_eq!(st.pending.len(), 4);
    // One batch, several records.
    let resp = a.apply(&tokens).await.unwrap();
    assert_eq!(resp.results.len(), 3, "three records have cardiology rows");
    for r in &resp.results {
        assert_eq!(r.outcome, ApplyOutcome::Applied as i32, "{r:?}");
    }
    assert_eq!(resp.results[2].rows, 2);
    assert_eq!(
        a.status("cardiology@hospital-a", 1, &[], 10)
            .await
            .unwrap()
            .pending_rows,
        0
    );
    // Repeats: acknowledged as already applied, never applied twice.
    let again = a.apply(&tokens).await.unwrap();
    assert!(
        again
            .results
            .iter()
            .all(|r| r.outcome == ApplyOutcome::AlreadyApplied as i32)
    );

    let staying = w.person(
        "dr-staying",
        &[
            "cardiology@hospital-a",
            "doctor@hospital-a",
            "nurse@hospital-b",
        ],
    );
    let forged = relabelled(
        &revoked,
        revoked.gid(),
        "cardiology@hospital-a",
        Version::new(2),
    );
    for (h, ct, plain) in &stored {
        let (now, payload) = c.get(h.rid().as_bytes(), Vec::new()).await.unwrap();
        assert_eq!(&payload, ct, "payload bytes never change");
        let now = Header::from_bytes(&now).unwrap();
        assert_eq!(&w.decrypt(&now, &staying, &payload).unwrap(), plain);
        let has_cardiology = now
            .rows()
            .iter()
            .any(|r| r.attribute() == &attr("cardiology@hospital-a"));
        if has_cardiology {
            assert!(
                now.rows()
                    .iter()
                    .all(|r| r.attribute() != &attr("cardiology@hospital-a")
                        || r.version() == Version::new(2))
            );
            // The revoked key, relabelled as v2, fails the cryptography.
            assert!(matches!(
                w.decrypt(&now, &forged, &payload),
                Err(AbeError::DecryptionFailed)
            ));
        }
    }
    // A token for a row outside the snapshot: a record uploaded at v2,
    // presented as a v1 row.
    let (fresh, ct) = w.encrypt("cardiology@hospital-a", b"after");
    c.put(&fresh.to_bytes(), std::io::Cursor::new(ct))
        .await
        .unwrap();
    let row = fresh.snapshot_rows(&attr("cardiology@hospital-a"), Version::new(2))[0];
    let (_, forged_tokens) = w.tokens(&us, &[row]);
    let resp = a.apply(&forged_tokens).await.unwrap();
    assert_eq!(
        resp.results[0].outcome,
        ApplyOutcome::Refused as i32,
        "{:?}",
        resp.results
    );
    let (h, _) = c.get(fresh.rid().as_bytes(), Vec::new()).await.unwrap();
    assert_eq!(h, fresh.to_bytes());
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_end_to_end_sqlite() {
    let (_d, store) = sqlite();
    revocation_end_to_end(store).await;
}

/// The same flow on PostgreSQL (a fresh database on the test server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_end_to_end_postgres() {
    let (store, drop_db) = postgres("mabe_proxy_e2e").await;
    revocation_end_to_end(store).await;
    drop_db.await;
}

/// A store in a fresh database `{prefix}_{pid}` on the test server, and a
/// future that drops the database.
async fn postgres(
    prefix: &str,
) -> (
    Arc<dyn Store>,
    impl std::future::Future<Output = ()> + use<>,
) {
    let url = common::test_database_url();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let name = format!("{prefix}_{}", std::process::id());
    for sql in [
        format!("DROP DATABASE IF EXISTS {name}"),
        format!("CREATE DATABASE {name}"),
    ] {
        client.batch_execute(&sql).await.unwrap();
    }
    let db_url = match url.rfind('/') {
        Some(i) if url.contains("://") => format!("{}/{name}", &url[..i]),
        _ => format!("{url} dbname={name}"),
    };
    let store = mabe_proxy::store::postgres::PgStore::connect(&db_url)
        .await
        .unwrap();
    let drop_db = async move {
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .unwrap();
    };
    (Arc::new(store), drop_db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_calls_must_be_signed_fresh_and_in_domain() {
    let (_d, store) = sqlite();
    let served = Served::start(store).await;
    trusted(&served, &["hospital-a", "hospital-b"]).await;
    let mut c = served.records().await;
    let mut w = World::new(&["cardiology@hospital-a"], 6);
    let (h, ct) = w.encrypt("cardiology@hospital-a", b"x");
    c.put(&h.to_bytes(), std::io::Cursor::new(ct))
        .await
        .unwrap();
    let mut a = served.authority("hospital-a", identity("hospital-a")).await;
    let body = || FreezeRequest {
        attribute: "cardiology@hospital-a".into(),
        version: 1,
    };
    let now = mabe_proxy::node::now();
    let sign = |key: &SigningKey, proxy: &str, who: &str, method: &str, nonce: &[u8], ts: i64| {
        signing::sign_proxy_request_with(body(), proxy, who, method, key, nonce, ts).unwrap()
    };
    let ka = identity("hospital-a");
    // Unsigned.
    assert_eq!(
        refused(a.client.freeze(body()).await),
        Code::Unauthenticated
    );
    // Signed by another key.
    let r = sign(
        &identity("mallory"),
        PROXY_ID,
        "hospital-a",
        METHOD_FREEZE,
        &[1; 16],
        now,
    );
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    // Untrusted authority (its own key).
    let r = sign(
        &identity("hospital-z"),
        PROXY_ID,
        "hospital-z",
        METHOD_FREEZE,
        &[2; 16],
        now,
    );
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    // Signed for another proxy, another method, or a stale / future time.
    let r = sign(
        &ka,
        "other-proxy",
        "hospital-a",
        METHOD_FREEZE,
        &[3; 16],
        now,
    );
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    let r = sign(
        &ka,
        PROXY_ID,
        "hospital-a",
        METHOD_APPLY_TOKENS,
        &[4; 16],
        now,
    );
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    let r = sign(
        &ka,
        PROXY_ID,
        "hospital-a",
        METHOD_FREEZE,
        &[5; 16],
        now - 3600,
    );
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    let r = sign(
        &ka,
        PROXY_ID,
        "hospital-a",
        METHOD_FREEZE,
        &[6; 16],
        now + 3600,
    );
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    // Extreme timestamps (regression: the freshness check must not overflow).
    for (i, ts) in [i64::MIN, i64::MAX].into_iter().enumerate() {
        let r = sign(
            &ka,
            PROXY_ID,
            "hospital-a",
            METHOD_FREEZE,
            &[20 + i as u8; 16],
            ts,
        );
        assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    }
    // A body other than the one signed.
    let mut r = sign(&ka, PROXY_ID, "hospital-a", METHOD_FREEZE, &[7; 16], now);
    r.get_mut().version = 2;
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    // A short nonce.
    let mut r = sign(&ka, PROXY_ID, "hospital-a", METHOD_FREEZE, &[8; 16], now);
    r.metadata_mut()
        .insert(signing::PROXY_NONCE, "0011".parse().unwrap());
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    // None of these froze anything: an upload at v1 still works.
    let (h2, ct2) = w.encrypt("cardiology@hospital-a", b"y");
    c.put(&h2.to_bytes(), std::io::Cursor::new(ct2))
        .await
        .unwrap();
    // A valid call, then its replay.
    let r = sign(&ka, PROXY_ID, "hospital-a", METHOD_FREEZE, &[9; 16], now);
    let mut s = a.client.freeze(r).await.unwrap().into_inner();
    assert!(matches!(
        s.message().await.unwrap().and_then(|m| m.part),
        Some(freeze_response::Part::Summary(_))
    ));
    let r = sign(&ka, PROXY_ID, "hospital-a", METHOD_FREEZE, &[9; 16], now);
    assert_eq!(refused(a.client.freeze(r).await), Code::Unauthenticated);
    // Hospital B, correctly signed, cannot touch hospital A's attributes.
    let mut b = served.authority("hospital-b", identity("hospital-b")).await;
    assert_eq!(
        b.freeze("cardiology@hospital-a", 2)
            .await
            .err()
            .unwrap()
            .code(),
        Code::PermissionDenied
    );
    assert_eq!(
        b.status("cardiology@hospital-a", 1, &[], 0)
            .await
            .err()
            .unwrap()
            .code(),
        Code::PermissionDenied
    );
    let us = w.rotate("cardiology@hospital-a");
    let rows = h.snapshot_rows(&attr("cardiology@hospital-a"), Version::FIRST);
    let (_, tokens) = w.tokens(&us, &rows);
    assert_eq!(
        b.apply(&tokens).await.err().unwrap().code(),
        Code::PermissionDenied
    );
    // Garbage tokens are refused before anything happens.
    let req = signing::sign_proxy_request(
        mabe_proto::v1::ApplyTokensRequest {
            tokens: vec![b"MABE nonsense".to_vec()],
        },
        PROXY_ID,
        "hospital-a",
        METHOD_APPLY_TOKENS,
        &ka,
    )
    .unwrap();
    assert_eq!(
        refused(a.client.apply_tokens(req).await),
        Code::InvalidArgument
    );
    // The metrics counted the refusals.
    let text = scrape(&served).await;
    assert!(
        text.contains("mabe_proxy_requests_total{method=\"Freeze\",code=\"unauthenticated\"} 12"),
        "{text}"
    );
    assert!(text.contains("mabe_proxy_auth_refusals_total 15"), "{text}");
    served.stop().await;
}

fn refused<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => panic!("accepted"),
        Err(s) => s.code(),
    }
}

/// `GET /metrics` over HTTPS (HTTP/1.1) on the admin listener.
async fn scrape(served: &Served) -> String {
    use http_body_util::BodyExt;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::{self, pki_types::CertificateDer, pki_types::ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&served.ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(served.admin).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get("/metrics")
        .header("host", "localhost")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_are_served() {
    let (_d, store) = sqlite();
    let served = Served::start(store).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(served.channel().await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "mabe.v1.RecordStore".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut c = served.records().await;
    let mut w = World::new(&["doctor@hospital-a"], 7);
    let (h, ct) = w.encrypt("doctor@hospital-a", &[3u8; 2000]);
    c.put(&h.to_bytes(), std::io::Cursor::new(ct.clone()))
        .await
        .unwrap();
    c.get(h.rid().as_bytes(), Vec::new()).await.unwrap();
    let text = scrape(&served).await;
    assert!(text.contains("mabe_proxy_up 1"));
    assert!(
        text.contains("mabe_proxy_requests_total{method=\"PutRecord\",code=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "mabe_proxy_payload_bytes_total{{direction=\"in\"}} {}",
            ct.len()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "mabe_proxy_payload_bytes_total{{direction=\"out\"}} {}",
            ct.len()
        )),
        "{text}"
    );
    served.stop().await;
}

/// 100,000 snapshot rows stream in pages; the root matches the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_streams_a_snapshot_of_100k_rows() {
    let (_d, store) = sqlite();
    let mut w = World::new(&["cardiology@hospital-a"], 8);
    let (h, _) = w.encrypt("cardiology@hospital-a", b"x");
    let c2 = mabe_proxy::store::header_rows(&h)[0].c2;
    // 100 records of 1,000 rows each (the store indexes rows; the proxy never
    // parses stored headers to freeze).
    for i in 0..100u32 {
        let blob = store.begin_upload(0).await.unwrap();
        let mut rid = [0u8; 16];
        rid[..4].copy_from_slice(&i.to_be_bytes());
        let rec = NewRecord {
            record_id: rid,
            header: h.to_bytes(),
            rows: (0..1000)
                .map(|_| RowEntry {
                    attribute: "cardiology@hospital-a".into(),
                    version: 1,
                    c2,
                })
                .collect(),
            payload_size: 0,
            payload_sha256: Sha256::digest(b"").into(),
            created_at: 0,
        };
        store.commit_upload(blob, &rec).await.unwrap();
    }
    let served = Served::start_with(store, NodeConfig::new(PROXY_ID)).await;
    trusted(&served, &["hospital-a"]).await;
    let mut a = served.authority("hospital-a", identity("hospital-a")).await;
    let req = signing::sign_proxy_request(
        FreezeRequest {
            attribute: "cardiology@hospital-a".into(),
            version: 1,
        },
        PROXY_ID,
        "hospital-a",
        METHOD_FREEZE,
        &identity("hospital-a"),
    )
    .unwrap();
    let mut s = a.client.freeze(req).await.unwrap().into_inner();
    let Some(freeze_response::Part::Summary(summary)) =
        s.message().await.unwrap().and_then(|m| m.part)
    else {
        panic!("no summary first")
    };
    let mut rows = Vec::new();
    let mut messages = 0;
    while let Some(m) = s.message().await.unwrap() {
        let Some(freeze_response::Part::Rows(r)) = m.part else {
            panic!("rows expected")
        };
        messages += 1;
        rows.extend(r.rows.into_iter().map(|r| mabe_proxy::store::SnapRow {
            record_id: r.record_id.try_into().unwrap(),
            row: r.row,
            c2: r.c2.try_into().unwrap(),
        }));
    }
    assert_eq!(summary.rows, 100_000);
    assert_eq!(rows.len(), 100_000);
    assert_eq!(messages, 10);
    assert!(
        rows.windows(2)
            .all(|p| (p[0].record_id, p[0].row) < (p[1].record_id, p[1].row))
    );
    assert_eq!(
        summary.merkle_root,
        mabe_proxy::store::snapshot_root("cardiology@hospital-a", 1, &rows).to_vec()
    );
    // Pending rows page through FreezeStatus.
    let st = a
        .status("cardiology@hospital-a", 1, &[], 10_000)
        .await
        .unwrap();
    assert_eq!(st.pending_rows, 100_000);
    assert_eq!(st.pending.len(), 10_000);
    let st2 = a
        .status("cardiology@hospital-a", 1, &st.next_page_token, 10_000)
        .await
        .unwrap();
    assert_eq!(st2.pending[0].row, 0);
    assert_eq!(st2.pending[0].record_id[..4], 10u32.to_be_bytes());
    assert_eq!(
        a.status("cardiology@hospital-a", 1, &[], 10_001)
            .await
            .err()
            .unwrap()
            .code(),
        Code::ResourceExhausted
    );
    served.stop().await;
}
