//! From `INSERT INTO nudge.events` to the sockets: routing, shape, order, wake-ups, claims, expiry, retention.
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn topic_event_reaches_every_subscriber_and_no_one_else() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice1 = authed(&nudge, "alice", &["*"]).await;
    let mut alice2 = authed(&nudge, "alice", &["*"]).await;
    let mut bob = authed(&nudge, "bob", &["*"]).await;
    let mut carol = authed(&nudge, "carol", &["*"]).await; // subscribed to another topic
    let mut dave = authed(&nudge, "dave", &["*"]).await; // subscribed to nothing
    let mut alice3 = authed(&nudge, "alice", &["*"]).await; // same user, not subscribed
    for ws in [&mut alice1, &mut alice2, &mut bob] {
        ws.subscribe("post:1").await;
    }
    carol.subscribe("post:2").await;

    let pg = db.client().await;
    let id = insert_event(&pg, "post:1", "comment.created", "{}").await;

    for ws in [&mut alice1, &mut alice2, &mut bob] {
        let ev = ws.recv_type("event").await;
        assert_eq!(ev["id"], id);
        assert_eq!(ev["topic"], "post:1");
    }
    for ws in [&mut carol, &mut dave, &mut alice3] {
        ws.expect_silence(SILENCE).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn personal_event_reaches_every_connection_of_each_recipient_and_no_one_else() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    // No subscriptions needed (and alice has no topics claim at all).
    let mut alice1 = authed_with(&nudge, &Claims::new("alice").hs256()).await;
    let mut alice2 = authed_with(&nudge, &Claims::new("alice").hs256()).await;
    let mut bob = authed(&nudge, "bob", &["*"]).await;
    // carol is subscribed to the event's topic but not a recipient.
    let mut carol = authed(&nudge, "carol", &["*"]).await;
    carol.subscribe("inbox").await;
    let mut dave = authed(&nudge, "dave", &["*"]).await;

    let pg = db.client().await;
    let id = insert_personal(&pg, "inbox", "message.created", &["alice", "bob"]).await;

    for ws in [&mut alice1, &mut alice2, &mut bob] {
        let ev = ws.recv_type("event").await;
        assert_eq!(ev["id"], id);
        assert_eq!(ev["kind"], "message.created");
    }
    carol.expect_silence(SILENCE).await;
    dave.expect_silence(SILENCE).await;
}

fn assert_iso_millis_utc(at: &str) {
    // 2026-11-25T10:00:00.123Z
    let b = at.as_bytes();
    let ok = b.len() == 24
        && at.chars().enumerate().all(|(i, c)| match i {
            4 | 7 => c == '-',
            10 => c == 'T',
            13 | 16 => c == ':',
            19 => c == '.',
            23 => c == 'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(ok, "`at` is not UTC with milliseconds like 2026-11-25T10:00:00.123Z: {at:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn event_json_has_exactly_the_documented_fields_and_never_recipients() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:42").await;
    let pg = db.client().await;

    // Microseconds 456 make truncation and rounding to milliseconds agree.
    let sql = "INSERT INTO nudge.events (topic, kind, recipients, data, occurred_at) \
               VALUES ($1, $2, $3, '{\"comment_id\": 991, \"nested\": {\"a\": [1, 2]}}', \
                       date_trunc('milliseconds', now()) + interval '456 microseconds') \
               RETURNING id, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')";
    for recipients in [None, Some(vec!["alice".to_string()])] {
        let row = pg.query_one(sql, &[&"post:42", &"comment.created", &recipients]).await.unwrap();
        let (id, at): (i64, String) = (row.get(0), row.get(1));
        let ev = alice.recv_json(SOON).await;
        // seq is the cluster-wide delivery order (schema v2); its value is checked in tests/cluster.rs.
        assert!(ev["seq"].as_i64().is_some_and(|seq| seq > 0), "seq: {ev}");
        assert_eq!(
            ev,
            json!({
                "type": "event",
                "id": id,
                "seq": ev["seq"],
                "topic": "post:42",
                "kind": "comment.created",
                "at": at,
                "data": {"comment_id": 991, "nested": {"a": [1, 2]}},
            }),
            "recipients = {recipients:?}"
        );
        assert_iso_millis_utc(ev["at"].as_str().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_in_id_order_without_duplicates() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut a = authed(&nudge, "alice", &["*"]).await;
    a.subscribe("order").await;
    let mut b = authed(&nudge, "bob", &["*"]).await;
    b.subscribe("order").await;
    let pg = db.client().await;

    // Many statements, each waking nudge while earlier passes may still run.
    let mut expected = Vec::new();
    for i in 0..200 {
        if i % 2 == 0 {
            expected.extend(insert_many(&pg, "order", 10).await);
        } else {
            let id: i64 = pg.query_one("SELECT nudge.publish('order', 'k')", &[]).await.unwrap().get(0);
            expected.push(id);
        }
    }
    for ws in [&mut a, &mut b] {
        let got = ws.recv_event_ids(expected.len(), Duration::from_secs(60)).await;
        assert_eq!(got, expected, "events not in id order (or missing / duplicated)");
        ws.expect_silence(SILENCE).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_function_returns_the_id_and_delivers() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:42").await;
    let pg = db.client().await;

    let id: i64 = pg
        .query_one("SELECT nudge.publish('post:42', 'comment.created', NULL, '{\"comment_id\": 991}')", &[])
        .await
        .unwrap()
        .get(0);
    let ev = alice.recv_type("event").await;
    assert_eq!(ev["id"], id);
    assert_eq!(ev["data"], json!({"comment_id": 991}));

    // With recipients and the default data.
    let id2: i64 =
        pg.query_one("SELECT nudge.publish('inbox', 'message.created', ARRAY['alice'])", &[]).await.unwrap().get(0);
    let ev = alice.recv_type("event").await;
    assert_eq!(ev["id"], id2);
    assert_eq!(ev["data"], json!({}));
    let n: i64 =
        pg.query_one("SELECT count(*) FROM nudge.events WHERE id IN ($1, $2)", &[&id, &id2]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn backlog_of_10000_rows_is_delivered_in_order_after_a_wakeup() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("backlog").await;
    let pg = db.client().await;

    // Without the trigger nothing wakes nudge (poll interval is 1h). Skipped for this session only: an ALTER TABLE
    // would lock the table, and a claim pass still waiting on that lock would see the rows.
    nudge.wait_idle().await;
    pg.batch_execute("SET session_replication_role = replica").await.unwrap();
    let ids = insert_many(&pg, "backlog", 10_000).await;
    alice.expect_silence(SILENCE).await;

    alice.send_json(json!({"type": "wakeup"})).await;
    let got = alice.recv_event_ids(ids.len(), Duration::from_secs(60)).await;
    assert_eq!(got, ids);
    alice.expect_silence(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backlog_inserted_while_nudge_is_down_is_claimed_at_start() {
    let db = TestDb::new().await;
    db.migrate();
    let pg = db.client().await;
    insert_many(&pg, "backlog", 10_000).await;

    // Poll interval 1h and no NOTIFY after start: only the claim at LISTEN connect can do this.
    let _nudge = Nudge::start(&db.url, &[]).await;
    eventually!(
        Duration::from_secs(60),
        "all 10,000 backlog rows to be claimed",
        pg.query_one("SELECT count(*) FROM nudge.events WHERE processed_at IS NULL", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_inserting_10000_rows_notifies_once() {
    let db = TestDb::new().await;
    db.migrate();
    let (_listener, mut notes) = listen(&db.url, "nudge").await;
    let pg = db.client().await;

    let mut sql = String::from("BEGIN;");
    for i in 0..10_000 {
        sql.push_str(&format!("INSERT INTO nudge.events (topic, kind) VALUES ('t:{i}', 'k');"));
    }
    sql.push_str("COMMIT;");
    pg.batch_execute(&sql).await.unwrap();

    let first = tokio::time::timeout(SOON, notes.recv()).await.expect("one NOTIFY").unwrap();
    assert_eq!(first, "nudge");
    let more = tokio::time::timeout(SILENCE, notes.recv()).await;
    assert!(more.is_err(), "a second NOTIFY arrived: {more:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_constraints_refuse_bad_rows_by_name() {
    let db = TestDb::new().await;
    db.migrate();
    let pg = db.client().await;
    let long_topic = "t".repeat(201);
    let long_kind = "k".repeat(101);
    let big = format!("{{\"p\": \"{}\"}}", "x".repeat(5000));
    let cases: Vec<(String, &str)> = vec![
        ("INSERT INTO nudge.events (topic, kind) VALUES ('', 'k')".into(), "events_topic_format"),
        (format!("INSERT INTO nudge.events (topic, kind) VALUES ('{long_topic}', 'k')"), "events_topic_format"),
        ("INSERT INTO nudge.events (topic, kind) VALUES ('post 42', 'k')".into(), "events_topic_format"),
        ("INSERT INTO nudge.events (topic, kind) VALUES (E'post\\t42', 'k')".into(), "events_topic_format"),
        ("INSERT INTO nudge.events (topic, kind) VALUES (E'post42\\n', 'k')".into(), "events_topic_format"),
        ("INSERT INTO nudge.events (topic, kind) VALUES (E'\\rpost42', 'k')".into(), "events_topic_format"),
        // Characters, not bytes: 201 two-byte characters are too many.
        (format!("INSERT INTO nudge.events (topic, kind) VALUES ('{}', 'k')", "é".repeat(201)), "events_topic_format"),
        ("INSERT INTO nudge.events (topic, kind) VALUES ('t', '')".into(), "events_kind_length"),
        (format!("INSERT INTO nudge.events (topic, kind) VALUES ('t', '{long_kind}')"), "events_kind_length"),
        ("INSERT INTO nudge.events (topic, kind, data) VALUES ('t', 'k', '[1]')".into(), "events_data_object"),
        ("INSERT INTO nudge.events (topic, kind, data) VALUES ('t', 'k', '\"x\"')".into(), "events_data_object"),
        ("INSERT INTO nudge.events (topic, kind, data) VALUES ('t', 'k', '1')".into(), "events_data_object"),
        ("INSERT INTO nudge.events (topic, kind, data) VALUES ('t', 'k', 'null')".into(), "events_data_object"),
        (format!("INSERT INTO nudge.events (topic, kind, data) VALUES ('t', 'k', '{big}')"), "events_data_size"),
        (
            "INSERT INTO nudge.events (topic, kind, recipients) VALUES ('t', 'k', '{}')".into(),
            "events_recipients_not_empty",
        ),
        (
            "INSERT INTO nudge.events (topic, kind, recipients) VALUES ('t', 'k', ARRAY['a', NULL])".into(),
            "events_recipients_valid",
        ),
        (
            "INSERT INTO nudge.events (topic, kind, recipients) VALUES ('t', 'k', ARRAY['a', ''])".into(),
            "events_recipients_valid",
        ),
    ];
    for (sql, constraint) in &cases {
        let err = pg.batch_execute(sql).await.expect_err(&format!("accepted: {}", &sql[..sql.len().min(120)]));
        let db_err = err.as_db_error().unwrap_or_else(|| panic!("not a database error: {err}"));
        assert_eq!(db_err.code().code(), "23514", "SQLSTATE for {constraint}: {db_err}");
        assert_eq!(db_err.constraint(), Some(*constraint), "constraint for {}", &sql[..sql.len().min(120)]);
    }

    // The limits themselves are allowed.
    let ok_topic = "t".repeat(200);
    let ok_kind = "k".repeat(100);
    let ok_data = format!("{{\"p\": \"{}\"}}", "x".repeat(4000));
    pg.batch_execute(&format!(
        "INSERT INTO nudge.events (topic, kind, data, recipients) VALUES ('{ok_topic}', '{ok_kind}', '{ok_data}', ARRAY['a'])"
    ))
    .await
    .expect("a row at the limits is accepted");
    let wide_topic = "é".repeat(200);
    pg.batch_execute(&format!("INSERT INTO nudge.events (topic, kind) VALUES ('{wide_topic}', 'k')"))
        .await
        .expect("200 two-byte characters are a valid topic");
    let n: i64 = pg.query_one("SELECT count(*) FROM nudge.events", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_listen_connection_loses_nothing() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    nudge.wait_ready().await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:1").await;
    let pg = db.client().await;
    let listen_pids =
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'nudge-listen' AND datname = current_database()";
    eventually!(SOON, "a nudge-listen backend", !pg.query(listen_pids, &[]).await.unwrap().is_empty());
    let old: Vec<i32> = pg.query(listen_pids, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();

    let killed: bool = pg
        .query_one(&format!("SELECT bool_and(pg_terminate_backend(pid)) FROM ({listen_pids}) l"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    // Inserted while nobody listens: the NOTIFY is lost, the claim at reconnect must find it.
    let id = insert_event(&pg, "post:1", "k", "{}").await;
    let ev = alice.recv_json(Duration::from_secs(30)).await;
    assert_eq!(ev["type"], "event");
    assert_eq!(ev["id"], id);

    eventually!(SOON, "a new nudge-listen backend", {
        let now: Vec<i32> = pg.query(listen_pids, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        !now.is_empty() && now.iter().all(|p| !old.contains(p))
    });
    let id2 = insert_event(&pg, "post:1", "k", "{}").await;
    let ev = alice.recv_type("event").await;
    assert_eq!(ev["id"], id2);
}

#[tokio::test(flavor = "multi_thread")]
async fn row_inserted_without_notify_is_delivered_after_a_client_wakeup() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:1").await;
    let mut bob = authed(&nudge, "bob", &["*"]).await;
    let pg = db.client().await;

    // The trigger skipped for this session only (see the backlog test), once the claims of nudge's start are over.
    nudge.wait_idle().await;
    pg.batch_execute("SET session_replication_role = replica").await.unwrap();
    let id = insert_event(&pg, "post:1", "k", "{}").await;
    alice.expect_silence(SILENCE).await;

    // Any client's wakeup claims it, here one that is not even subscribed.
    bob.send_json(json!({"type": "wakeup"})).await;
    let ev = alice.recv_type("event").await;
    assert_eq!(ev["id"], id);
    bob.expect_silence(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_events_are_counted_not_delivered() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:1").await;
    let before = nudge.metric("nudge_events_expired_total").await;
    let pg = db.client().await;

    pg.batch_execute(
        "INSERT INTO nudge.events (topic, kind, occurred_at) VALUES ('post:1', 'old', now() - interval '10 minutes')",
    )
    .await
    .unwrap();
    let fresh = insert_event(&pg, "post:1", "new", "{}").await;
    // Delivery is in id order, so the fresh event coming first means the stale one was dropped.
    let ev = alice.recv_type("event").await;
    assert_eq!(ev["id"], fresh, "got {ev}");
    alice.expect_silence(SILENCE).await;
    eventually!(
        SOON,
        "nudge_events_expired_total to grow by 1",
        nudge.metric("nudge_events_expired_total").await == before + 1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn processed_rows_are_deleted_after_retention() {
    let db = TestDb::new().await;
    // The cleanup schedule is not tied to wake-ups; use the default poll interval here.
    let _nudge = Nudge::start(&db.url, &[("NUDGE_RETENTION", "1s"), ("NUDGE_POLL_INTERVAL", "2s")]).await;
    let pg = db.client().await;
    // More than one deletion batch (1,000), and expired rows, which are processed without a seq and swept by age.
    insert_many(&pg, "post:1", 2_500).await;
    pg.batch_execute(
        "INSERT INTO nudge.events (topic, kind, occurred_at) \
         SELECT 'post:1', 'old', now() - interval '10 minutes' FROM generate_series(1, 10)",
    )
    .await
    .unwrap();
    eventually!(
        Duration::from_secs(60),
        "rows to be claimed",
        pg.query_one("SELECT count(*) FROM nudge.events WHERE processed_at IS NULL", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 0
    );
    eventually!(
        Duration::from_secs(60),
        "processed rows to be deleted",
        pg.query_one("SELECT count(*) FROM nudge.events", &[]).await.unwrap().get::<_, i64>(0) == 0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_claim_disjoint_rows_and_each_delivers_every_event_once() {
    let db = TestDb::new().await;
    db.migrate();
    let n1 = Nudge::start(&db.url, &[("NUDGE_CLAIM_BATCH", "50")]).await;
    let n2 = Nudge::start(&db.url, &[("NUDGE_CLAIM_BATCH", "50")]).await;
    let mut a = authed(&n1, "alice", &["*"]).await;
    a.subscribe("multi").await;
    let mut b = authed(&n2, "bob", &["*"]).await;
    b.subscribe("multi").await;
    let pg = db.client().await;

    let mut all = BTreeSet::new();
    for _ in 0..50 {
        all.extend(insert_many(&pg, "multi", 100).await);
    }
    let wait = Duration::from_secs(60);
    let (got_a, got_b) = tokio::join!(a.recv_event_ids(all.len(), wait), b.recv_event_ids(all.len(), wait));
    a.expect_silence(SILENCE).await;
    b.expect_silence(SILENCE).await;
    for (node, got) in [("node 1", &got_a), ("node 2", &got_b)] {
        let set: BTreeSet<i64> = got.iter().copied().collect();
        assert_eq!(set.len(), got.len(), "{node} delivered an event twice");
        assert_eq!(set, all, "{node} missed events");
    }
    // Both nodes claimed (the work is shared), and every row was claimed once: one seq each, no gaps.
    let claimed_1 = n1.metric("nudge_events_claimed_total").await;
    let claimed_2 = n2.metric("nudge_events_claimed_total").await;
    assert_eq!(claimed_1 + claimed_2, all.len() as f64, "claims overlapped or were lost");
    let row = pg.query_one("SELECT count(DISTINCT seq), min(seq), max(seq) FROM nudge.events", &[]).await.unwrap();
    let (distinct, min, max): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!((distinct, min, max), (all.len() as i64, 1, all.len() as i64));
}

#[tokio::test(flavor = "multi_thread")]
async fn many_wakeups_coalesce_into_few_claim_passes() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_CLIENT_RATE", "100000")]).await;
    nudge.wait_ready().await;
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(authed(&nudge, &format!("u{i}"), &["*"]).await);
    }
    let before = nudge.metric("nudge_claim_passes_total").await;

    // 4 x 500 wakeups, each connection's burst written in one go.
    let sends = clients.iter_mut().map(|ws| async move {
        use futures_util::SinkExt;
        for _ in 0..500 {
            ws.inner.feed(tokio_tungstenite::tungstenite::Message::text(r#"{"type":"wakeup"}"#)).await.unwrap();
        }
        ws.inner.flush().await.unwrap();
        // The pong proves this connection's wakeups were all read.
        ws.ping().await;
    });
    futures_util::future::join_all(sends).await;

    // Wait for the passes to settle (two equal readings), then count.
    let mut last = nudge.metric("nudge_claim_passes_total").await;
    eventually!(SOON, "claim passes to settle", {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = nudge.metric("nudge_claim_passes_total").await;
        let settled = now == last;
        last = now;
        settled
    });
    let passes = last - before;
    assert!(passes >= 1.0, "wakeups caused no claim pass at all");
    assert!(passes < 200.0, "2,000 wakeups caused {passes} claim passes");
}

/// The claim and the retention sweep find their rows through indexes, so their cost follows the rows they touch,
/// not the rows the table keeps for `resume`. Until schema version 5 PostgreSQL planned the claim's row update
/// as a scan of the whole table (or, with a plan cached while the table was nearly empty, one scan per claimed
/// row), and every 1,000-row retention batch scanned the table twice. This reads the plans that actually run.
#[tokio::test(flavor = "multi_thread")]
async fn claim_and_retention_never_scan_the_whole_table() {
    let db = TestDb::new().await;
    db.migrate();
    let pg = db.client().await;
    // Statistics change only when this test says so.
    pg.batch_execute("ALTER TABLE nudge.events SET (autovacuum_enabled = false)").await.unwrap();

    // A session that starts while the table is empty caches its plan after a few claims, as a node does ...
    let mut claimer = Claimer::connect(&db.url).await;
    for _ in 0..8 {
        claimer.claim_and_keep(0).await;
    }
    // ... and keeps it while the table grows: 30,000 rows processed two hours ago (some expired: no seq), 1,000
    // pending. Written as history directly, by the table's owner: producers cannot set seq or processed_at.
    pg.batch_execute(
        "ALTER TABLE nudge.events DISABLE TRIGGER events_internal_columns;
         INSERT INTO nudge.events (topic, kind, processed_at, seq)
             SELECT 'old', 'k', now() - interval '2 hours', CASE WHEN g % 100 <> 0 THEN -g END
             FROM generate_series(1, 30000) g;
         ALTER TABLE nudge.events ENABLE TRIGGER events_internal_columns;
         INSERT INTO nudge.events (topic, kind) SELECT 'new', 'k' FROM generate_series(1, 1000);",
    )
    .await
    .unwrap();
    let plan = claimer.plan_of_claim(1000).await;
    assert!(!scans_events(&plan), "nudge.claim(), plan cached on a small table, scans nudge.events: {plan}");
    // A session that starts now plans with the statistics of a table of 31,000 rows.
    pg.batch_execute("ANALYZE nudge.events").await.unwrap();
    let plan = Claimer::connect(&db.url).await.plan_of_claim(1000).await;
    assert!(!scans_events(&plan), "nudge.claim() on an analyzed table scans nudge.events: {plan}");

    // The sweep's statements are planned afresh each time, with the statistics of the moment.
    for (name, statement) in [
        ("DELETE_NUMBERED", nudge::db::events::DELETE_NUMBERED),
        ("DELETE_UNNUMBERED", nudge::db::events::DELETE_UNNUMBERED),
    ] {
        // The sweep's parameters written in: a custom plan, as the sweep's own statement gets.
        let sql = format!("EXPLAIN (FORMAT JSON) {}", statement.replace("$1", "3600").replace("$2", "1000"));
        let plan = &explain(&pg, &sql).await;
        assert!(!scans_events(plan), "retention's {name} scans nudge.events: {plan}");
    }
}

/// A `resume` (or a catch-up) reads one user's personal events and one connection's topics' events through
/// indexes of their own, not by walking the seq range past everyone else's history.
#[tokio::test(flavor = "multi_thread")]
async fn replays_read_one_users_events_through_their_own_indexes() {
    let db = TestDb::new().await;
    db.migrate();
    let pg = db.client().await;
    // 40,000 numbered rows of other users and topics, a few of alice's and of her topic among them.
    pg.batch_execute(
        "ALTER TABLE nudge.events DISABLE TRIGGER events_internal_columns;
         INSERT INTO nudge.events (topic, kind, recipients, processed_at, seq)
             SELECT CASE WHEN g % 1000 = 0 THEN 'post:1' ELSE 'post:' || (g % 97 + 2) END, 'k',
                    CASE WHEN g % 2 = 0 THEN NULL WHEN g % 1001 = 0 THEN ARRAY['alice'] ELSE ARRAY['u' || g % 500] END,
                    now(), g
             FROM generate_series(1, 40000) g;
         ALTER TABLE nudge.events ENABLE TRIGGER events_internal_columns;
         UPDATE nudge.delivery SET last_seq = 40000;
         ANALYZE nudge.events;",
    )
    .await
    .unwrap();
    // The statement nudge sends, with its parameters: nudge sends it unnamed, so PostgreSQL plans it for the
    // values at hand (a custom plan), through PgBouncer too.
    let sql = format!(
        "SET plan_cache_mode = force_custom_plan; \
         PREPARE replay(bigint, bigint, text, text[], bigint) AS {}; \
         EXPLAIN (FORMAT JSON) EXECUTE replay(0, 40000, 'alice', '{{post:1}}', 1001); DEALLOCATE replay;",
        nudge::db::events::REPLAY
    );
    let plan = &explain(&pg, &sql).await;
    assert!(!scans_events(plan), "a replay scans nudge.events: {plan}");
    for index in ["events_recipients", "events_topic_seq"] {
        assert!(plan.contains(index), "a replay does not use {index}: {plan}");
    }
    assert!(!plan.contains("\"events_seq\""), "a replay walks the seq range (events_seq): {plan}");
}

/// The JSON plan an `EXPLAIN (FORMAT JSON)` among `sql`'s statements returned.
async fn explain(pg: &tokio_postgres::Client, sql: &str) -> String {
    let messages = pg.simple_query(sql).await.unwrap();
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("EXPLAIN returned {messages:?}"))
}

/// Whether a plan in JSON (EXPLAIN's, or auto_explain's after its "duration: … plan:" prefix) scans nudge.events
/// sequentially.
fn scans_events(plan: &str) -> bool {
    fn walk(node: &serde_json::Value) -> bool {
        match node {
            serde_json::Value::Object(fields) => {
                (fields.get("Node Type").is_some_and(|t| t == "Seq Scan")
                    && fields.get("Relation Name").is_some_and(|r| r == "events"))
                    || fields.values().any(walk)
            }
            serde_json::Value::Array(items) => items.iter().any(walk),
            _ => false,
        }
    }
    let json = &plan[plan.find(['{', '[']).unwrap_or_else(|| panic!("no JSON in {plan}"))..];
    walk(&serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")))
}

/// A session that calls nudge.claim() with auto_explain reporting the plans of the statements inside it.
struct Claimer {
    client: tokio_postgres::Client,
    /// auto_explain's notices.
    notices: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Claimer {
    async fn connect(url: &str) -> Claimer {
        let (client, notices) = connect_watching(url, |message| match message {
            tokio_postgres::AsyncMessage::Notice(notice) => Some(notice.message().to_owned()),
            _ => None,
        })
        .await;
        client
            .batch_execute(
                "LOAD 'auto_explain';
                 SET auto_explain.log_min_duration = 0;
                 SET auto_explain.log_nested_statements = on;
                 SET auto_explain.log_format = json;
                 SET auto_explain.log_level = notice;
                 SET client_min_messages = notice;",
            )
            .await
            .unwrap();
        Claimer { client, notices }
    }

    async fn claim_and_keep(&self, expected: usize) {
        let claimed = self.client.query("SELECT * FROM nudge.claim(1000, 3600, false, false)", &[]).await.unwrap();
        assert_eq!(claimed.len(), expected);
    }

    /// The plan of the claim's row update, for a claim that is rolled back.
    async fn plan_of_claim(&mut self, expected: usize) -> String {
        while self.notices.try_recv().is_ok() {}
        self.client.batch_execute("BEGIN").await.unwrap();
        self.claim_and_keep(expected).await;
        self.client.batch_execute("ROLLBACK").await.unwrap();
        std::iter::from_fn(|| self.notices.try_recv().ok())
            .find(|plan| plan.contains("UPDATE nudge.events"))
            .expect("auto_explain reported no claim")
    }
}
