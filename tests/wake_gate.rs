//! The wake gate (sql/0003_wake_gate.sql): producers skip their NOTIFY while a node claims in a loop, and no row
//! is ever left for the fallback poll (which every test here sets to 1 h). Nodes here go awake from 50 producer
//! transactions a second (`NUDGE_AWAKE_ABOVE`), a rate a test producer reaches on any machine.
mod common;

use std::time::Duration;

use common::*;
use tokio::time::Instant;

/// Does this producer's open transaction hold `awake` shared, i.e. did its trigger NOTIFY? (The bigint key
/// 121450474726657 shows in pg_locks as classid 0x6e75, objid 0x64676501.)
const NOTIFIED_IN_THIS_TRANSACTION: &str = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = pg_backend_pid() \
     AND locktype = 'advisory' AND classid = 28277 AND objid = 1684497665 AND objsubid = 1)";
/// (Advisory locks are per database, but pg_locks shows every database's: the tests here share one cluster.)
const AWAKE_HOLDERS: &str = "SELECT count(*) FROM pg_locks \
     WHERE locktype = 'advisory' AND classid = 28277 AND objid = 1684497665 AND mode = 'ExclusiveLock' AND granted \
     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// Sessions holding `awake` exclusively: 1 while a node claims in a loop, 0 otherwise.
async fn awake_holders(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one(AWAKE_HOLDERS, &[]).await.unwrap().get(0)
}

/// The awake rate the nodes here run with.
const AWAKE_ABOVE: (&str, &str) = ("NUDGE_AWAKE_ABOVE", "50");

/// One node (awake from `AWAKE_ABOVE`), and alice subscribed to `gate` on it.
async fn node_with_alice(db: &TestDb) -> (Nudge, Ws) {
    node_with_alice_and(db, &[AWAKE_ABOVE]).await
}

async fn node_with_alice_and(db: &TestDb, env: &[(&str, &str)]) -> (Nudge, Ws) {
    let nudge = Nudge::start(&db.url, env).await;
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("gate").await;
    (nudge, alice)
}

/// Insert one `gate` row in an open producer transaction: its id, and whether its trigger took the NOTIFY branch.
async fn insert_in(tx: &tokio_postgres::Transaction<'_>) -> (i64, bool) {
    let id: i64 = tx
        .query_one("INSERT INTO nudge.events (topic, kind) VALUES ('gate', 'k') RETURNING id", &[])
        .await
        .unwrap()
        .get(0);
    (id, tx.query_one(NOTIFIED_IN_THIS_TRANSACTION, &[]).await.unwrap().get(0))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_nudge_gets_a_notify_from_every_inserting_transaction() {
    let db = TestDb::new().await;
    let (_nudge, mut alice) = node_with_alice(&db).await;
    let (_listener, mut notes) = listen(&db.url, "nudge").await;
    let mut producer = db.client().await;

    let tx = producer.transaction().await.unwrap();
    let (id, notified) = insert_in(&tx).await;
    assert!(notified, "with nudge idle the trigger must take the NOTIFY branch");
    tx.commit().await.unwrap();

    assert_eq!(tokio::time::timeout(SOON, notes.recv()).await.expect("a NOTIFY").unwrap(), "nudge");
    assert_eq!(alice.recv_type("event").await["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_whose_producer_skipped_notify_while_nudge_was_awake_is_delivered_without_the_poll() {
    let db = TestDb::new().await;
    let (nudge, mut alice) = node_with_alice(&db).await;
    let pg = db.client().await;
    let mut producer = db.client().await;

    // Bursts make nudge claim in a loop (awake) for a few milliseconds; catch one of those moments with a
    // producer transaction whose trigger skips the NOTIFY.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut burst_ids = Vec::new();
    let skipped_id = loop {
        assert!(Instant::now() < deadline, "never caught nudge awake");
        burst_ids.extend(insert_many(&pg, "gate", 50).await);
        let tx = producer.transaction().await.unwrap();
        let (id, notified) = insert_in(&tx).await;
        if notified {
            tx.rollback().await.unwrap();
            continue;
        }
        // Stay open well past nudge's linger: it stops looping and must wait for us before it idles.
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.commit().await.unwrap();
        break id;
    };
    let committed = Instant::now();

    let mut expected = burst_ids;
    expected.push(skipped_id);
    let got = alice.recv_event_ids(expected.len(), SOON).await;
    assert_eq!(got, expected);
    let waited = committed.elapsed();
    assert!(waited < Duration::from_secs(5), "the skipped row waited {waited:?}: that is the fallback poll's job");
    assert!(nudge.metric("nudge_awake_periods_total").await >= 1.0);
    alice.expect_silence(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nudge_stops_holding_awake_once_rows_stop() {
    let db = TestDb::new().await;
    let (nudge, mut alice) = node_with_alice(&db).await;
    let pg = db.client().await;

    // A flow of transactions faster than the awake rate makes nudge claim in a loop.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = Vec::new();
    while awake_holders(&pg).await == 0 {
        assert!(Instant::now() < deadline, "a fast flow never made nudge hold `awake`");
        ids.extend(insert_many(&pg, "gate", 50).await);
    }
    assert_eq!(alice.recv_event_ids(ids.len(), SOON).await, ids);
    // (The lock is visible in pg_locks a moment before nudge counts the period.)
    eventually!(SOON, "the awake period counted", nudge.metric("nudge_awake_periods_total").await >= 1.0);
    eventually!(SOON, "nudge to release `awake`", awake_holders(&pg).await == 0);
    // Idle again: the next producer NOTIFYs and is delivered.
    let id = insert_event(&pg, "gate", "k", "{}").await;
    assert_eq!(alice.recv_type("event").await["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn below_the_default_awake_rate_every_producer_notifies() {
    let db = TestDb::new().await;
    let (nudge, mut alice) = node_with_alice_and(&db, &[]).await;
    let mut producer = db.client().await;

    // At most 300 transactions a second, an eighth of the default awake rate (2,500/s), with 2,000 rows in one
    // transaction among them: that counts as one transaction, not 2,000.
    let pg = db.client().await;
    let mut ids = insert_many(&pg, "gate", 2_000).await;
    for _ in 0..300 {
        let tx = producer.transaction().await.unwrap();
        let (id, notified) = insert_in(&tx).await;
        tx.commit().await.unwrap();
        assert!(notified, "a producer skipped its NOTIFY at a trickle (row {id})");
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(alice.recv_event_ids(ids.len(), SOON).await, ids);
    assert_eq!(nudge.metric("nudge_awake_periods_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_gate_session_while_rows_flow_loses_nothing() {
    let db = TestDb::new().await;
    let (_nudge, mut alice) = node_with_alice(&db).await;
    let pg = db.client().await;

    // Producers insert small batches for 3 s while the gate session is killed every 150 ms.
    let producer = {
        let producer_db = db.client().await;
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                ids.extend(insert_many(&producer_db, "gate", 5).await);
            }
            ids
        })
    };
    let gate_pids =
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'nudge-gate' AND datname = current_database()";
    let mut kills = 0;
    while !producer.is_finished() {
        let killed: Option<bool> = pg
            .query_one(&format!("SELECT bool_and(pg_terminate_backend(pid)) FROM ({gate_pids}) g"), &[])
            .await
            .unwrap()
            .get(0);
        kills += usize::from(killed == Some(true));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let ids = producer.await.unwrap();
    assert!(kills > 0, "the gate session was never up to be killed");

    let got = alice.recv_event_ids(ids.len(), SOON).await;
    assert_eq!(got, ids, "every row once, in order, after {kills} kills");
    alice.expect_silence(SILENCE).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_alone_stops_notifying_its_claims_and_starts_again_when_another_node_joins() {
    let db = TestDb::new().await;
    let first = Nudge::start(&db.url, &[("NUDGE_NODE_ID", "first")]).await;
    let mut alice = authed(&first, "alice", &["*"]).await;
    alice.subscribe("gate").await;
    let (_listener, mut claimed) = listen(&db.url, "nudge_claimed").await;
    let pg = db.client().await;

    // After its first heartbeat the node knows it is alone: its claims stop notifying nudge_claimed.
    let deadline = Instant::now() + SOON;
    loop {
        assert!(Instant::now() < deadline, "a lone node kept notifying nudge_claimed");
        while claimed.try_recv().is_ok() {}
        let id = insert_event(&pg, "gate", "k", "{}").await;
        assert_eq!(alice.recv_type("event").await["id"], id);
        if tokio::time::timeout(SILENCE, claimed.recv()).await.is_err() {
            break;
        }
    }

    // A second node announces itself; whichever node claims from now on, the other one hears of it at once
    // (the fallback poll is 1 h).
    let second = Nudge::start(&db.url, &[("NUDGE_NODE_ID", "second")]).await;
    let mut bob = authed(&second, "bob", &["*"]).await;
    bob.subscribe("gate").await;
    for _ in 0..20 {
        let id = insert_event(&pg, "gate", "k", "{}").await;
        assert_eq!(alice.recv_type("event").await["id"], id);
        assert_eq!(bob.recv_type("event").await["id"], id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_frozen_while_awake_loses_awake_within_its_lease() {
    let db = TestDb::new().await;
    let (nudge, mut alice) = node_with_alice(&db).await;
    let pg = db.client().await;
    let mut producer = db.client().await;

    // Freeze the node at a moment it holds `awake`.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ids = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "never froze nudge while awake");
        ids.extend(insert_many(&pg, "gate", 50).await);
        signal(nudge.pid(), "STOP");
        if awake_holders(&pg).await == 1 {
            break;
        }
        signal(nudge.pid(), "CONT");
    }
    let frozen = Instant::now();

    // PostgreSQL ends the frozen node's gate session: producers take the NOTIFY branch again.
    eventually!(Duration::from_secs(5), "`awake` released while the node is frozen", awake_holders(&pg).await == 0);
    let released_after = frozen.elapsed();
    let tx = producer.transaction().await.unwrap();
    let (id, notified) = insert_in(&tx).await;
    tx.commit().await.unwrap();
    assert!(notified, "a producer skipped its NOTIFY for a frozen node");
    ids.push(id);

    signal(nudge.pid(), "CONT");
    let got = alice.recv_event_ids(ids.len(), SOON).await;
    assert_eq!(got, ids);
    assert!(released_after < Duration::from_secs(2), "released after {released_after:?}");
}
