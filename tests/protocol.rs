//! Protocol v1 details: refs, bad requests, subscriptions, limits, slow consumers, keepalive and shutdown.
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(extra: &[(&str, &str)]) -> (TestDb, Nudge) {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, extra).await;
    (db, nudge)
}

#[tokio::test(flavor = "multi_thread")]
async fn ref_is_echoed_on_replies() {
    let (_db, nudge) = start(&[]).await;
    let claims = Claims::new("alice").topics(&["*"]);
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    ws.send_json(json!({"type": "ping", "ref": 1})).await;
    assert_eq!(ws.recv_json(SOON).await, json!({"type": "pong", "ref": 1}));
    ws.send_json(json!({"type": "auth", "token": claims.hs256(), "ref": "a"})).await;
    assert_eq!(
        ws.recv_json(SOON).await,
        json!({"type": "ready", "user": "alice", "expires_at": claims.exp(), "ref": "a"})
    );
    ws.send_json(json!({"type": "subscribe", "topic": "post:1", "ref": {"n": [1, 2]}})).await;
    assert_eq!(ws.recv_json(SOON).await, json!({"type": "subscribed", "topic": "post:1", "ref": {"n": [1, 2]}}));
    ws.send_json(json!({"type": "unsubscribe", "topic": "post:1", "ref": null})).await;
    let v = ws.recv_json(SOON).await;
    assert_eq!(v["type"], "unsubscribed");
    assert_eq!(v["topic"], "post:1");
    let newer = Claims::new("alice").exp_in(7200);
    ws.send_json(json!({"type": "refresh", "token": newer.hs256(), "ref": 3.5})).await;
    assert_eq!(ws.recv_json(SOON).await, json!({"type": "refreshed", "expires_at": newer.exp(), "ref": 3.5}));
}

#[tokio::test(flavor = "multi_thread")]
async fn ref_is_echoed_on_error_replies() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["post:*"]).await;
    let cases = [
        (json!({"type": "subscribe", "topic": "chat:1", "ref": 1}), "forbidden"),
        (json!({"type": "subscribe", "topic": "a b", "ref": "x"}), "bad_request"),
        (json!({"type": "frobnicate", "ref": [1]}), "bad_request"),
        (json!({"type": "subscribe", "ref": {"k": true}}), "bad_request"),
        (json!({"type": "refresh", "token": "garbage", "ref": 9}), "unauthorized"),
        (json!({"type": "refresh", "token": Claims::new("bob").hs256(), "ref": "other"}), "forbidden"),
    ];
    for (req, code) in cases {
        ws.send_json(req.clone()).await;
        let err = ws.expect_error(code).await;
        assert_eq!(err["ref"], req["ref"], "{req} -> {err}");
    }
}

/// A bad_request leaves the connection usable.
async fn assert_bad_request_then_usable(ws: &mut Ws) {
    ws.expect_error("bad_request").await;
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_bad_request_and_connection_stays() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    for text in ["{", "not json", "[1,2]", "\"ping\"", ""] {
        ws.send_text(text).await;
        assert_bad_request_then_usable(&mut ws).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_type_is_bad_request_and_connection_stays() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.send_json(json!({"type": "frobnicate"})).await;
    assert_bad_request_then_usable(&mut ws).await;
    ws.send_json(json!({"topic": "post:1"})).await;
    assert_bad_request_then_usable(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_field_is_bad_request_and_connection_stays() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    for req in [
        json!({"type": "subscribe"}),
        json!({"type": "unsubscribe"}),
        json!({"type": "refresh"}),
        json!({"type": "subscribe", "topic": 42}),
    ] {
        ws.send_json(req).await;
        assert_bad_request_then_usable(&mut ws).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_frame_is_bad_request_and_connection_stays() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.send_binary(br#"{"type":"ping"}"#.to_vec()).await;
    assert_bad_request_then_usable(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_is_idempotent() {
    let (db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.subscribe("post:1").await;
    ws.subscribe("post:1").await;
    let id = insert_event(&db.client().await, "post:1", "k", "{}").await;
    assert_eq!(ws.recv_type("event").await["id"], id);
    ws.expect_silence(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unsubscribe_is_idempotent_and_stops_delivery() {
    let (db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.subscribe("post:1").await;
    for _ in 0..2 {
        ws.send_json(json!({"type": "unsubscribe", "topic": "post:1"})).await;
        assert_eq!(ws.recv_json(SOON).await, json!({"type": "unsubscribed", "topic": "post:1"}));
    }
    // Never subscribed at all.
    ws.send_json(json!({"type": "unsubscribe", "topic": "post:2"})).await;
    assert_eq!(ws.recv_json(SOON).await, json!({"type": "unsubscribed", "topic": "post:2"}));
    insert_event(&db.client().await, "post:1", "k", "{}").await;
    ws.expect_silence(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_topic_is_bad_request() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    let long = "t".repeat(201);
    for topic in ["", "post 1", "post\t1", "post:1\n", &long] {
        ws.send_json(json!({"type": "subscribe", "topic": topic})).await;
        assert_bad_request_then_usable(&mut ws).await;
    }
    ws.subscribe(&"t".repeat(200)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_limit_is_forbidden() {
    let (_db, nudge) = start(&[("NUDGE_MAX_SUBSCRIPTIONS", "2")]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.subscribe("a").await;
    ws.subscribe("b").await;
    ws.send_json(json!({"type": "subscribe", "topic": "c"})).await;
    ws.expect_error("forbidden").await;
    ws.ping().await;
    ws.send_json(json!({"type": "unsubscribe", "topic": "a"})).await;
    ws.recv_type("unsubscribed").await;
    ws.subscribe("c").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn frame_over_the_limit_gets_too_large_and_1009_while_others_keep_receiving() {
    let (db, nudge) = start(&[]).await;
    let mut other = authed(&nudge, "bob", &["*"]).await;
    other.subscribe("post:1").await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.subscribe("post:1").await;
    let big = json!({"type": "ping", "pad": "x".repeat(5000)}).to_string();
    assert!(big.len() > 4096);
    ws.send_text(&big).await;
    let err = ws.recv_json(SOON).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "too_large", "{err}");
    assert_eq!(ws.expect_close(SOON).await.0, 1009);

    let id = insert_event(&db.client().await, "post:1", "k", "{}").await;
    assert_eq!(other.recv_type("event").await["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_message_size_is_configurable() {
    let (_db, nudge) = start(&[("NUDGE_MAX_MESSAGE_SIZE", "8192")]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    // 6000 bytes: over the default, under the configured limit.
    let pad = 6000 - json!({"type": "ping", "pad": ""}).to_string().len();
    let msg = json!({"type": "ping", "pad": "x".repeat(pad)}).to_string();
    assert_eq!(msg.len(), 6000);
    ws.send_text(&msg).await;
    ws.recv_type("pong").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_over_the_rate_are_rate_limited_and_connection_stays() {
    let (_db, nudge) = start(&[("NUDGE_CLIENT_RATE", "5")]).await;
    // Header auth, so that no message of the burst is spent on `auth`.
    let bearer = format!("Bearer {}", Claims::new("alice").hs256());
    let mut ws = Ws::connect_with_headers(&nudge.ws_url(), &[("authorization", &bearer)]).await.unwrap();
    ws.recv_type("ready").await;
    {
        use futures_util::SinkExt;
        for i in 0..50 {
            ws.inner
                .feed(tokio_tungstenite::tungstenite::Message::text(json!({"type": "ping", "ref": i}).to_string()))
                .await
                .unwrap();
        }
        ws.inner.flush().await.unwrap();
    }
    let (mut pongs, mut limited) = (0, 0);
    for _ in 0..50 {
        let v = ws.recv_json(SOON).await;
        match (v["type"].as_str(), v["code"].as_str()) {
            (Some("pong"), _) => pongs += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected reply {v}"),
        }
    }
    assert!(limited >= 30, "only {limited} of 50 rapid pings were rate limited (rate 5/s)");
    assert!(pongs >= 5, "only {pongs} pongs: the burst should allow 5");
    // The bucket refills: eventually a ping is answered again.
    eventually!(Duration::from_secs(5), "a ping to be answered after the burst", {
        ws.send_json(json!({"type": "ping"})).await;
        ws.recv_json(SOON).await["type"] == "pong"
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_closed_while_a_healthy_client_gets_everything() {
    // A small queue, so the client that does not read falls behind at once; it is closed once its socket has
    // accepted nothing for NUDGE_WRITE_TIMEOUT.
    let (db, nudge) = start(&[("NUDGE_OUTBOUND_QUEUE", "16"), ("NUDGE_WRITE_TIMEOUT", "2s")]).await;
    let mut slow = authed(&nudge, "slow", &["*"]).await;
    slow.subscribe("firehose").await;
    let mut healthy = authed(&nudge, "healthy", &["*"]).await;
    healthy.subscribe("firehose").await;
    let pg = db.client().await;

    // ~30 MB of events, far more than the socket buffers hold for the client that does not read, produced at
    // the healthy client's pace (it reads each statement's rows before the next INSERT).
    let mut ids = Vec::new();
    for _ in 0..500 {
        let rows = pg
            .query(
                "INSERT INTO nudge.events (topic, kind, data) \
                 SELECT 'firehose', 'k', jsonb_build_object('pad', repeat('x', 3000)) FROM generate_series(1, 20) \
                 RETURNING id",
                &[],
            )
            .await
            .unwrap();
        let mut batch: Vec<i64> = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
        batch.sort();
        let got = healthy.recv_event_ids(batch.len(), SOON).await;
        assert_eq!(got, batch, "the healthy client must receive every event in order");
        ids.extend(batch);
    }
    eventually!(SOON, "the slow client to be closed", nudge.metric("nudge_slow_consumers_total").await == 1.0);

    // Now read the slow one: whatever was buffered, then the end: a 1013 close frame, or, when its stream was
    // cut mid-frame, the end of the connection.
    let mut n = 0;
    loop {
        match slow.next(Duration::from_secs(60)).await {
            Some(Incoming::Json(_)) => n += 1,
            Some(Incoming::Close(code, _)) => {
                assert_eq!(code, 1013, "slow client closed with {code} after {n} messages");
                break;
            }
            Some(Incoming::Gone(_)) => break,
            None => panic!("the slow client was not closed ({n} messages read)"),
        }
    }
    assert!(n < ids.len(), "the slow client received everything ({n}); the test did not stall it");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_limit_get_503() {
    let (_db, nudge) = start(&[("NUDGE_MAX_CONNECTIONS", "2")]).await;
    let mut a = authed(&nudge, "alice", &["*"]).await;
    let b = Ws::connect(&nudge.ws_url()).await.unwrap(); // unauthenticated still counts
    assert_eq!(Ws::refused_status(&nudge.ws_url(), &[]).await, 503);
    a.ping().await;
    drop(b);
    eventually!(SOON, "a slot to free up after a close", Ws::connect(&nudge.ws_url()).await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let (_db, mut nudge) = start(&[]).await;
    let mut a = authed(&nudge, "alice", &["*"]).await;
    let mut b = Ws::connect(&nudge.ws_url()).await.unwrap(); // not yet authenticated
    a.subscribe("post:1").await;
    let t0 = Instant::now();
    nudge.sigterm();
    assert_eq!(a.expect_close(Duration::from_secs(10)).await.0, 1001);
    assert_eq!(b.expect_close(Duration::from_secs(10)).await.0, 1001);
    let status = nudge.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM; log:\n{}", nudge.log());
    assert!(t0.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn server_sends_websocket_pings() {
    let (_db, nudge) = start(&[("NUDGE_PING_INTERVAL", "200ms")]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_secs(5), ws.inner.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_)))) => {}
            Ok(Some(Ok(other))) => panic!("unexpected frame {other:?}"),
            Ok(other) => panic!("connection ended: {other:?}"),
            Err(_) => panic!("no ping within 5s with NUDGE_PING_INTERVAL=200ms"),
        }
    }
    // A client that answers pings (tungstenite does, while reading) stays connected.
    ws.expect_silence(Duration::from_millis(800)).await;
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_client_is_dropped_after_two_ping_intervals() {
    let (_db, nudge) = start(&[("NUDGE_PING_INTERVAL", "200ms")]).await;
    // A hand-made WebSocket client that reads but never answers pings.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", nudge.port)).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        nudge.port,
        Claims::new("alice").hs256()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let mut seen = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let head = String::from_utf8_lossy(&seen[..seen.len().min(12)]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "upgrade response: {head:?}");
    assert!(ended.is_ok(), "a client that never answered pings was still connected after 10s (interval 200ms)");
}
