//! Presence and control in SQL, on three nodes sharing one database: `nudge.presence`, `nudge.topic_presence`,
//! `nudge.is_online()`, `nudge.disconnect()`, `nudge.unsubscribe()` and `nudge.status` (sql/0007_presence.sql).
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn three_nodes(db: &TestDb) -> Vec<Nudge> {
    let mut nodes = Vec::new();
    for id in ["n1", "n2", "n3"] {
        let node = Nudge::start(&db.url, &[("NUDGE_NODE_ID", id)]).await;
        node.wait_ready().await;
        nodes.push(node);
    }
    nodes
}

/// (connections, nodes) of a user in nudge.presence, None when absent.
async fn presence_of(pg: &tokio_postgres::Client, user: &str) -> Option<(i32, i32)> {
    pg.query_opt("SELECT connections, nodes FROM nudge.presence WHERE user_id = $1", &[&user])
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

async fn is_online(pg: &tokio_postgres::Client, user: &str) -> bool {
    pg.query_one("SELECT nudge.is_online($1)", &[&user]).await.unwrap().get(0)
}

/// (connections, users) of a topic in nudge.topic_presence.
async fn topic_presence_of(pg: &tokio_postgres::Client, topic: &str) -> Option<(i32, i32)> {
    pg.query_opt("SELECT connections, users FROM nudge.topic_presence WHERE topic = $1", &[&topic])
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)))
}

/// Users appear within 2 s of authenticating and disappear within 2 s of their last connection closing, with
/// connection and node counts across the cluster; topics count connections and distinct users.
#[tokio::test(flavor = "multi_thread")]
async fn presence_follows_connections_across_nodes_within_two_seconds() {
    let db = TestDb::new().await;
    let nodes = three_nodes(&db).await;
    let pg = db.client().await;
    assert!(!is_online(&pg, "alice").await);

    let opened = Instant::now();
    let mut a1 = authed(&nodes[0], "alice", &["*"]).await;
    let mut a2 = authed(&nodes[1], "alice", &["*"]).await;
    let mut b = authed(&nodes[2], "bob", &["*"]).await;
    for ws in [&mut a1, &mut a2, &mut b] {
        ws.subscribe("post:1").await;
    }
    let deadline = Duration::from_secs(2);
    eventually!(deadline, "alice on two nodes", presence_of(&pg, "alice").await == Some((2, 2)));
    eventually!(deadline, "bob on one", presence_of(&pg, "bob").await == Some((1, 1)));
    eventually!(deadline, "post:1: 3 connections of 2 users", topic_presence_of(&pg, "post:1").await == Some((3, 2)));
    eprintln!("presence visible {:?} after the connections opened", opened.elapsed());
    assert!(is_online(&pg, "alice").await);
    assert!(!is_online(&pg, "carol").await);

    // Unsubscribing counts too; then alice leaves entirely.
    a2.send_json(json!({"type": "unsubscribe", "topic": "post:1"})).await;
    a2.recv_type("unsubscribed").await;
    eventually!(deadline, "post:1 down to 2 connections", topic_presence_of(&pg, "post:1").await == Some((2, 2)));
    let closed = Instant::now();
    drop(a1);
    drop(a2);
    eventually!(deadline, "alice gone", presence_of(&pg, "alice").await.is_none());
    eprintln!("presence gone {:?} after the last connection closed", closed.elapsed());
    assert!(!is_online(&pg, "alice").await);
    // Users and topics are two statements of one flush: the topic's row follows within the same bound.
    eventually!(deadline, "post:1 down to bob", topic_presence_of(&pg, "post:1").await == Some((1, 1)));
    b.ping().await;
}

/// A node killed without a word takes its users out within three heartbeat intervals (15 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_node_killed_with_users_online_drops_them_within_three_heartbeats() {
    let db = TestDb::new().await;
    let mut nodes = three_nodes(&db).await;
    let pg = db.client().await;
    let _carol = authed(&nodes[2], "carol", &["*"]).await;
    let _dave = authed(&nodes[0], "dave", &["*"]).await;
    eventually!(Duration::from_secs(2), "carol online", is_online(&pg, "carol").await);
    signal(nodes[2].pid(), "KILL");
    let killed = Instant::now();
    let _ = nodes[2].wait_exit(SOON).await;
    eventually!(Duration::from_secs(20), "carol gone with her node", !is_online(&pg, "carol").await);
    eprintln!("a killed node's users gone {:?} after SIGKILL", killed.elapsed());
    assert!(is_online(&pg, "dave").await, "users of live nodes stay");
    nodes.truncate(2);
}

/// `nudge.disconnect()` closes every connection of the user, on every node, with `revoked` and 4003, within 1 s
/// of the commit; inside a transaction that rolls back it does nothing.
#[tokio::test(flavor = "multi_thread")]
async fn disconnect_closes_every_connection_of_the_user_on_commit_only() {
    let db = TestDb::new().await;
    let nodes = three_nodes(&db).await;
    let mut pg = db.client().await;
    let mut a1 = authed(&nodes[0], "alice", &["*"]).await;
    let mut a2 = authed(&nodes[1], "alice", &["*"]).await;
    let mut bob = authed(&nodes[0], "bob", &["*"]).await;

    let tx = pg.transaction().await.unwrap();
    tx.execute("SELECT nudge.disconnect('alice', 'removed from the workspace')", &[]).await.unwrap();
    tx.rollback().await.unwrap();
    a1.expect_silence(SILENCE).await;
    a2.expect_silence(SILENCE).await;

    let committed = Instant::now();
    pg.execute("SELECT nudge.disconnect('alice', 'removed from the workspace')", &[]).await.unwrap();
    for ws in [&mut a1, &mut a2] {
        let error = ws.recv_json(Duration::from_secs(1)).await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str(), error["message"].as_str()),
            (Some("error"), Some("revoked"), Some("removed from the workspace")),
            "{error}"
        );
        assert_eq!(ws.expect_close(Duration::from_secs(1)).await.0, 4003);
    }
    assert!(committed.elapsed() < Duration::from_secs(1), "took {:?}", committed.elapsed());
    bob.ping().await;
    eventually!(Duration::from_secs(2), "alice offline", !is_online(&pg, "alice").await);
}

/// `nudge.unsubscribe()` drops the matching subscriptions on every node and announces each; no later frame of
/// them arrives, other subscriptions stay.
#[tokio::test(flavor = "multi_thread")]
async fn unsubscribe_drops_matching_subscriptions_on_every_node() {
    let db = TestDb::new().await;
    let nodes = three_nodes(&db).await;
    let pg = db.client().await;
    let mut a1 = authed(&nodes[0], "alice", &["*"]).await;
    let mut a2 = authed(&nodes[2], "alice", &["*"]).await;
    for ws in [&mut a1, &mut a2] {
        for topic in ["group:7:posts", "group:7:chat", "group:8:posts"] {
            ws.subscribe(topic).await;
        }
    }
    pg.execute("SELECT nudge.unsubscribe('alice', 'group:7:*')", &[]).await.unwrap();
    for ws in [&mut a1, &mut a2] {
        let mut dropped = Vec::new();
        for _ in 0..2 {
            let reply = ws.recv_json(Duration::from_secs(1)).await;
            assert_eq!(reply["type"], "unsubscribed", "{reply}");
            dropped.push(reply["topic"].as_str().unwrap_or_default().to_owned());
        }
        dropped.sort();
        assert_eq!(dropped, ["group:7:chat", "group:7:posts"]);
    }
    insert_event(&pg, "group:7:posts", "k", "{}").await;
    let kept = insert_event(&pg, "group:8:posts", "k", "{}").await;
    for ws in [&mut a1, &mut a2] {
        assert_eq!(ws.recv_event_ids(1, SOON).await, [kept]);
        ws.expect_silence(SILENCE).await;
    }
}

/// `nudge.status`: every live node with its cursor and lag, and the cluster's pending events.
#[tokio::test(flavor = "multi_thread")]
async fn the_status_view_lists_live_nodes_with_their_lag() {
    let db = TestDb::new().await;
    let nodes = three_nodes(&db).await;
    let pg = db.client().await;
    let mut c = authed(&nodes[1], "carol", &["*"]).await;
    c.subscribe("t").await;
    let id = insert_event(&pg, "t", "k", "{}").await;
    assert_eq!(c.recv_event_ids(1, SOON).await, [id]);
    let caught_up = || async {
        let rows = pg
            .query("SELECT node_id, lag_events, lag_seconds, pending_events FROM nudge.status ORDER BY node_id", &[])
            .await
            .unwrap();
        rows.len() == 3
            && rows.iter().all(|r| r.get::<_, i64>(1) == 0 && r.get::<_, f64>(2) == 0.0 && r.get::<_, i64>(3) == 0)
    };
    eventually!(SOON, "three caught-up nodes in nudge.status (heartbeats every 5 s)", caught_up().await);
}
