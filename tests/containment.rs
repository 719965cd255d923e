//! Nobody can hurt anybody else: a row nudge cannot encode, a producer writing nudge's own columns, clients that
//! read slowly, and a topic revoked while its frames are queued. Each test injects the fault and checks that
//! everyone else is still served, in order, with nothing lost.
mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::MaybeTlsStream;

/// A client whose socket has a tiny receive window: while it does not read, nudge's writes to it block within
/// a few kilobytes instead of filling megabytes of kernel buffers first.
async fn narrow_client(nudge: &Nudge, sub: &str, topics: &[&str]) -> Ws {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let port = nudge.ws_url().split(':').nth(2).and_then(|p| p.split('/').next()).expect("port").to_owned();
    let stream = socket.connect(format!("127.0.0.1:{port}").parse().expect("addr")).await.expect("connect");
    let request = nudge.ws_url().into_client_request().expect("request");
    let (inner, _) = tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)).await.expect("upgrade");
    let mut ws = Ws { inner };
    let ready = ws.auth(&Claims::new(sub).topics(topics).hs256()).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    ws
}

/// A ready node, and alice subscribed to `post:1` on it.
async fn nudge_with_alice_on_post_1() -> (TestDb, Nudge, Ws) {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    nudge.wait_ready().await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:1").await;
    (db, nudge, alice)
}

/// Insert `n` topic events of about `size` bytes of data each, in one transaction; returns their ids in order.
async fn insert_big(pg: &tokio_postgres::Client, topic: &str, n: i64, size: i32) -> Vec<i64> {
    let rows = pg
        .query(
            "INSERT INTO nudge.events (topic, kind, data) \
             SELECT $1, 'k', jsonb_build_object('pad', repeat('x', $3)) FROM generate_series(1, $2::bigint) \
             RETURNING id",
            &[&topic, &n, &size],
        )
        .await
        .expect("insert");
    let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ids.sort_unstable();
    ids
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_nudge_cannot_encode_is_skipped_and_delivery_goes_on() {
    let (db, nudge, mut alice) = nudge_with_alice_on_post_1().await;
    let pg = db.client().await;
    // A row from before schema version 6 (or from a role that bypassed its CHECK): an infinite occurred_at.
    pg.batch_execute("ALTER TABLE nudge.events DROP CONSTRAINT IF EXISTS events_occurred_at_finite").await.unwrap();
    let poison: i64 = pg
        .query_one(
            "INSERT INTO nudge.events (topic, kind, occurred_at) VALUES ('post:1', 'bad', 'infinity') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let good = insert_event(&pg, "post:1", "good", "{}").await;
    let event = alice.recv_type("event").await;
    assert_eq!(event["id"], good, "{event}");
    eventually!(SOON, "the skipped row to be counted", nudge.metric("nudge_events_rejected_total").await == 1.0);
    let log = nudge.log();
    assert!(log.contains(&format!("event {poison} cannot be delivered")), "no WARN naming the row:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    // Still alive for what comes next, and /readyz agrees.
    let later = insert_event(&pg, "post:1", "later", "{}").await;
    assert_eq!(alice.recv_type("event").await["id"], later);
    assert_eq!(nudge.get("/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn producers_cannot_write_nudges_own_columns_or_an_infinite_time() {
    let (db, _nudge, mut alice) = nudge_with_alice_on_post_1().await;
    let pg = db.client().await;
    for (sql, column) in [
        ("INSERT INTO nudge.events (topic, kind, seq) VALUES ('post:1', 'k', 1000000)", "seq"),
        ("INSERT INTO nudge.events (topic, kind, processed_at) VALUES ('post:1', 'k', now())", "processed_at"),
        // What copying old rows with INSERT ... SELECT * does: both set.
        ("INSERT INTO nudge.events (topic, kind, seq, processed_at) VALUES ('post:1', 'k', 1000000, now())", "seq"),
    ] {
        let err = pg.batch_execute(sql).await.expect_err(sql);
        let db_err = err.as_db_error().unwrap_or_else(|| panic!("not a database error: {err}"));
        assert_eq!(db_err.code().code(), "428C9", "{db_err}");
        assert_eq!(db_err.column(), Some(column), "{db_err}");
        assert!(db_err.message().contains(&format!("\"{column}\"")), "{db_err}");
    }
    for time in ["infinity", "-infinity"] {
        let sql = format!("INSERT INTO nudge.events (topic, kind, occurred_at) VALUES ('post:1', 'k', '{time}')");
        let err = pg.batch_execute(&sql).await.expect_err(&sql);
        let db_err = err.as_db_error().unwrap_or_else(|| panic!("not a database error: {err}"));
        assert_eq!((db_err.code().code(), db_err.constraint()), ("23514", Some("events_occurred_at_finite")));
    }
    // Nothing was written, and delivery goes on.
    let id = insert_event(&pg, "post:1", "k", "{}").await;
    assert_eq!(alice.recv_type("event").await["id"], id);
    alice.expect_silence(SILENCE).await;
}

/// Clients that fall behind their queue (here: every batch is larger than the 4-frame queue, and some clients
/// do not read for a while) are neither closed nor allowed to delay others: they catch up from the table, in
/// order, exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn slow_readers_catch_up_from_the_table_without_delaying_anyone() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_OUTBOUND_QUEUE", "4")]).await;
    nudge.wait_ready().await;
    let mut slow = Vec::new();
    for i in 0..3 {
        let mut ws = narrow_client(&nudge, &format!("slow{i}"), &["*"]).await;
        ws.subscribe("busy").await;
        slow.push(ws);
    }
    let mut fast = authed(&nudge, "fast", &["*"]).await;
    fast.subscribe("busy").await;
    let pg = db.client().await;
    // 1,500 events of 3 KB (4.5 MB): more than the kernel buffers and the queue hold for a client that does not
    // read, so the slow clients' sockets block and their queues overflow.
    let ids = insert_big(&pg, "busy", 1500, 3000).await;
    assert_eq!(fast.recv_event_ids(1500, SOON).await, ids);
    // The slow clients have not read a byte yet; an event now reaches the fast one regardless.
    let lone = insert_event(&pg, "busy", "lone", "{}").await;
    assert_eq!(fast.recv_event_ids(1, SOON).await, [lone]);
    let mut all = ids.clone();
    all.push(lone);
    for ws in &mut slow {
        assert_eq!(ws.recv_event_ids(1501, SOON).await, all);
        ws.expect_silence(SILENCE).await;
    }
    assert!(nudge.metric("nudge_connections_behind_total").await >= 3.0);
    assert_eq!(nudge.metric("nudge_slow_consumers_total").await, 0.0);
    // Caught up, they are back on the live stream.
    let next = insert_event(&pg, "busy", "next", "{}").await;
    for ws in slow.iter_mut().chain([&mut fast]) {
        assert_eq!(ws.recv_event_ids(1, SOON).await, [next]);
    }
}

/// A client that reads nothing at all for NUDGE_WRITE_TIMEOUT is closed (with 1013 when the stream is at a frame
/// boundary, else the socket is dropped) and leaves the hub; it can reconnect and `resume`.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_reads_nothing_is_closed_with_1013_after_the_write_timeout() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_WRITE_TIMEOUT", "1s")]).await;
    nudge.wait_ready().await;
    let mut stuck = narrow_client(&nudge, "stuck", &["*"]).await;
    stuck.subscribe("busy").await;
    let pg = db.client().await;
    // 7.5 MB: more than the kernel buffers between nudge and a client that does not read.
    insert_big(&pg, "busy", 2500, 3000).await;
    eventually!(SOON, "the stuck client to be closed", nudge.metric("nudge_slow_consumers_total").await == 1.0);
    eventually!(SOON, "it to leave the hub", nudge.metric("nudge_connections").await == 0.0);
    // Reading now, it gets what was written, then the end: never a hang.
    loop {
        match stuck.next(SOON).await {
            Some(Incoming::Json(v)) => assert_eq!(v["type"], "event", "{v}"),
            Some(Incoming::Close(code, _)) => {
                assert_eq!(code, 1013);
                break;
            }
            Some(Incoming::Gone(_)) => break,
            None => panic!("the stuck client's stream neither ended nor closed"),
        }
    }
}

/// Once `unsubscribed` is sent, no frame of that topic reaches the connection, including frames that were
/// already queued for it.
#[tokio::test(flavor = "multi_thread")]
async fn no_frame_of_a_topic_follows_its_unsubscribed() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    nudge.wait_ready().await;
    let mut ws = narrow_client(&nudge, "alice", &["*"]).await;
    ws.subscribe("busy").await;
    let pg = db.client().await;
    // More than the kernel buffers take while the client does not read (4.5 MB): the rest waits in nudge's queue.
    insert_big(&pg, "busy", 1500, 3000).await;
    eventually!(SOON, "frames to be queued", nudge.metric("nudge_deliveries_total").await >= 100.0);
    ws.send_json(json!({"type": "unsubscribe", "topic": "busy"})).await;
    let mut after_reply = 0;
    let mut replied = false;
    loop {
        match ws.next(Duration::from_secs(2)).await {
            Some(Incoming::Json(v)) if v["type"] == "unsubscribed" => replied = true,
            Some(Incoming::Json(v)) if v["type"] == "event" => {
                if replied {
                    after_reply += 1;
                }
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
    }
    assert!(replied, "no unsubscribed reply");
    assert_eq!(after_reply, 0, "event frames of the topic arrived after `unsubscribed`");
}
