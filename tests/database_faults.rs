//! The database goes away under a running node: its sessions go silent (a failover that drops packets, no FIN, no
//! RST), are reset, are terminated by the server, the server restarts, or the network path is gone altogether.
//! Each test connects nudge through a `Proxy` (both the pool and the LISTEN session), proves one event gets
//! through, injects the fault, commits an event directly (not through the proxy) while the fault is on, and
//! asserts that the event arrives exactly once, within a deadline, and that the next one does too.
//!
//! The fallback poll is off (one hour, the harness' default): recovery must come from nudge noticing the fault.
mod common;

use std::time::{Duration, Instant};

use common::*;

const TOPIC: &str = "faults";

/// Liveness options that keep these tests quick: a silent session is given up within 2 s + 1 s x 2.
const QUICK: &[(&str, &str)] = &[
    ("NUDGE_DB_KEEPALIVE_IDLE", "2s"),
    ("NUDGE_DB_KEEPALIVE_INTERVAL", "1s"),
    ("NUDGE_DB_KEEPALIVE_COUNT", "2"),
    ("NUDGE_DB_TCP_USER_TIMEOUT", "3s"),
];

/// A node whose every database session goes through `proxy`, one subscribed client, one event delivered.
struct Faulty {
    db: TestDb,
    proxy: Proxy,
    nudge: Nudge,
    ws: Ws,
    /// A direct session, around the proxy.
    pg: tokio_postgres::Client,
}

impl Faulty {
    async fn start(options: &[(&str, &str)]) -> Faulty {
        let db = TestDb::new().await;
        let proxy = Proxy::start(cluster().await.port()).await;
        let pg = db.client().await;
        let (nudge, ws) = start_through(&proxy, &db.name, options, &pg).await;
        Faulty { db, proxy, nudge, ws, pg }
    }

    /// Commit an event directly and return how long it took to arrive; asserts it arrived once, and that the
    /// next event arrives right after it (nothing lost, nothing duplicated).
    async fn delivered_once_within(&mut self, deadline: Duration) -> Duration {
        delivered_once_within(&mut self.ws, &self.pg, &self.nudge, deadline).await
    }
}

async fn start_through(
    proxy: &Proxy,
    name: &str,
    options: &[(&str, &str)],
    pg: &tokio_postgres::Client,
) -> (Nudge, Ws) {
    let url = proxy.url(name);
    let mut env = vec![("NUDGE_LISTEN_DATABASE_URL", url.as_str())];
    env.extend_from_slice(options);
    let nudge = Nudge::start(&url, &env).await;
    let mut ws = authed(&nudge, "alice", &[TOPIC]).await;
    ws.subscribe(TOPIC).await;
    let id = insert_event(pg, TOPIC, "before", "{}").await;
    assert_eq!(ws.recv_event_ids(1, SOON).await, vec![id]);
    // No pass in flight: the fault meets idle sessions, as a failover at a quiet moment does.
    nudge.wait_idle().await;
    (nudge, ws)
}

async fn delivered_once_within(
    ws: &mut Ws,
    pg: &tokio_postgres::Client,
    nudge: &Nudge,
    deadline: Duration,
) -> Duration {
    let committed = Instant::now();
    let id = insert_event(pg, TOPIC, "during", "{}").await;
    let got = match tokio::time::timeout(deadline, ws.recv_event_ids(1, deadline)).await {
        Ok(got) => got,
        Err(_) => panic!("event not delivered within {deadline:?}; log:\n{}", nudge.log()),
    };
    let took = committed.elapsed();
    assert_eq!(got, vec![id], "the event committed during the fault");
    let after = insert_event(pg, TOPIC, "after", "{}").await;
    assert_eq!(ws.recv_event_ids(1, SOON).await, vec![after], "the next event, and no duplicate before it");
    ws.expect_silence(SILENCE).await;
    took
}

/// Wait until `/readyz` is 503 because the LISTEN session is down; returns the body.
async fn listen_down(nudge: &Nudge) -> String {
    let deadline = Instant::now() + SOON;
    loop {
        let (status, body) = nudge.get("/readyz").await;
        if status == 503 && body.starts_with("not ready: LISTEN connection is down: ") {
            return body;
        }
        assert!(Instant::now() < deadline, "/readyz still {status} {body:?}, not 503 for LISTEN, after {SOON:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How many of nudge's sessions the proxy forwards (LISTEN and at least one pooled session, once it is idle).
async fn wait_for_sessions(proxy: &Proxy, at_least: usize) {
    eventually!(SOON, format!("{at_least} proxied sessions"), proxy.forwarding() >= at_least);
}

#[tokio::test(flavor = "multi_thread")]
async fn silent_sessions_are_given_up_and_the_event_is_delivered() {
    let mut t = Faulty::start(QUICK).await;
    wait_for_sessions(&t.proxy, 2).await;
    let silenced = t.proxy.go_silent();
    assert!(silenced >= 2, "only {silenced} sessions silenced");
    let took = t.delivered_once_within(SOON).await;
    eprintln!("silent sessions (idle 2s, interval 1s x 2): delivered {took:?} after the commit");
    assert!(t.nudge.log().contains("LISTEN connection failed: no answer from the database within 2s"));
}

/// The same with the default options: the figure the documentation gives (under 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn silent_sessions_with_default_options_are_given_up_within_30s() {
    let mut t = Faulty::start(&[]).await;
    wait_for_sessions(&t.proxy, 2).await;
    assert!(t.proxy.go_silent() >= 2);
    let took = t.delivered_once_within(Duration::from_secs(30)).await;
    eprintln!("silent sessions (default options): delivered {took:?} after the commit");
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_sessions_are_replaced_and_the_event_is_delivered() {
    let mut t = Faulty::start(QUICK).await;
    wait_for_sessions(&t.proxy, 2).await;
    let reset = t.proxy.reset();
    assert!(reset >= 2, "only {reset} sessions reset");
    let took = t.delivered_once_within(SOON).await;
    eprintln!("reset sessions: delivered {took:?} after the commit");
}

#[tokio::test(flavor = "multi_thread")]
async fn terminated_backends_are_replaced_and_the_event_is_delivered() {
    let mut t = Faulty::start(QUICK).await;
    let terminated: i64 =
        t.pg.query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name LIKE 'nudge%'",
            &[&t.db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(terminated >= 2, "only {terminated} nudge backends terminated");
    let took = t.delivered_once_within(SOON).await;
    eprintln!("terminated backends: delivered {took:?} after the commit");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgresql_restart_is_survived_and_the_event_is_delivered() {
    let mut server = OwnCluster::start().await;
    server.create_database("faults").await;
    let proxy = Proxy::start(server.port).await;
    let mut pg = pg_connect(&server.url("faults")).await;
    let (nudge, mut ws) = start_through(&proxy, "faults", QUICK, &pg).await;

    server.stop().await;
    let reason = listen_down(&nudge).await;
    eprintln!("PostgreSQL stopped: /readyz 503: {reason}");
    server.start_again().await;
    // The event is committed as soon as the server is back: nudge's old sessions are gone and it may not have
    // reconnected yet.
    pg = pg_connect(&server.url("faults")).await;
    let took = delivered_once_within(&mut ws, &pg, &nudge, SOON).await;
    eprintln!("PostgreSQL restart: delivered {took:?} after the commit");
    eventually!(SOON, "/readyz 200 after the restart", nudge.get("/readyz").await.0 == 200);
}

/// The network path is gone (every packet dropped, old sessions and new): `/readyz` says so with a reason, and
/// says 200 again once the path is back; the event committed meanwhile is delivered once.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_with_a_reason_while_the_database_is_unreachable_and_200_after() {
    let mut t = Faulty::start(QUICK).await;
    wait_for_sessions(&t.proxy, 2).await;
    let cut = Instant::now();
    assert!(t.proxy.blackhole() >= 2);
    let reason = listen_down(&t.nudge).await;
    eprintln!("unreachable: /readyz 503 {:?} after the cut: {reason}", cut.elapsed());
    let id = insert_event(&t.pg, TOPIC, "during", "{}").await;
    t.ws.expect_silence(SILENCE).await;

    let back = Instant::now();
    t.proxy.restore();
    eventually!(SOON, "/readyz 200 once the database is reachable", t.nudge.get("/readyz").await.0 == 200);
    eprintln!("unreachable: /readyz 200 {:?} after the path came back", back.elapsed());
    assert_eq!(t.ws.recv_event_ids(1, SOON).await, vec![id]);
    let took = t.delivered_once_within(SOON).await;
    eprintln!("after the outage: delivered {took:?} after the commit");
}

/// Nothing listens (connections reset, new ones refused): `/readyz` is 503 with the reason, 200 after.
#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_with_a_reason_while_the_database_refuses_and_200_after() {
    let mut t = Faulty::start(QUICK).await;
    wait_for_sessions(&t.proxy, 2).await;
    assert!(t.proxy.refuse() >= 2);
    let reason = listen_down(&t.nudge).await;
    eprintln!("refused: /readyz 503: {reason}");
    let id = insert_event(&t.pg, TOPIC, "during", "{}").await;
    t.proxy.restore();
    eventually!(SOON, "/readyz 200 once the database accepts again", t.nudge.get("/readyz").await.0 == 200);
    assert_eq!(t.ws.recv_event_ids(1, SOON).await, vec![id]);
    t.delivered_once_within(SOON).await;
}

/// Every session nudge holds (LISTEN, the pool) has the keepalive armed with NUDGE_DB_KEEPALIVE_IDLE, not the
/// kernel's two hours (or the old fixed 30 s).
#[tokio::test(flavor = "multi_thread")]
async fn every_database_session_has_the_configured_keepalive() {
    let t = Faulty::start(QUICK).await;
    wait_for_sessions(&t.proxy, 2).await;
    eventually!(SOON, "every proxied session with a keepalive timer of at most 2s", {
        let sockets = established_to(t.proxy.port);
        sockets.len() >= 2 && sockets.iter().all(|&(kind, left)| kind == 2 && left <= 2.0)
    });
}

/// A PostgreSQL that loses commits when it crashes: WAL written only at commit (claims with
/// `NUDGE_CLAIM_COMMIT=async` excepted) or by the WAL writer every 10 s; no background writer flushing it sooner.
async fn crash_prone_cluster() -> OwnCluster {
    let server = OwnCluster::start_with(|builder| {
        builder
            .setting("synchronous_commit", "on")
            .setting("wal_writer_delay", "10s")
            .setting("bgwriter_lru_maxpages", "0")
    })
    .await;
    server.create_database("crash").await;
    server
}

/// The next event frame, whole.
async fn next_event(ws: &mut Ws) -> serde_json::Value {
    let event = ws.recv_json(SOON).await;
    assert_eq!(event["type"], "event", "expected an event, got {event}");
    event
}

/// `NUDGE_CLAIM_COMMIT=async`: PostgreSQL crashes right after a claim whose event went out and forgets that claim.
/// The event is claimed again and delivered again, same id, with a seq above every seq handed out before; nothing
/// is lost, and a client resuming from the forgotten seq gets what came after it. The claim is forgotten only if
/// no other commit flushed the WAL between it and the crash (the node's heartbeat may, now and then): up to five
/// rounds until one is.
#[tokio::test(flavor = "multi_thread")]
async fn async_claims_forgotten_by_a_crash_are_delivered_again_with_new_seqs_and_nothing_is_lost() {
    let mut server = crash_prone_cluster().await;
    let url = server.url("crash");
    let nudge = Nudge::start(&url, &[("NUDGE_CLAIM_COMMIT", "async"), QUICK[0], QUICK[1], QUICK[2], QUICK[3]]).await;
    let mut ws = authed(&nudge, "alice", &[TOPIC]).await;
    ws.subscribe(TOPIC).await;
    for round in 1..=5 {
        let pg = pg_connect(&url).await;
        let lost = insert_event(&pg, TOPIC, "lost?", "{}").await;
        let first = next_event(&mut ws).await;
        assert_eq!(first["id"], lost);
        let first_seq = first["seq"].as_i64().expect("seq");
        server.crash().await;
        server.start_again().await;
        let pg = pg_connect(&url).await;
        let after = insert_event(&pg, TOPIC, "after", "{}").await;
        let next = next_event(&mut ws).await;
        if next["id"] == after {
            // The claim reached the disk before the crash: nothing to see this round.
            eprintln!("round {round}: the claim survived the crash");
            ws.expect_silence(SILENCE).await;
            continue;
        }
        // Forgotten: the same event again, numbered above anything handed out before the crash.
        assert_eq!(next["id"], lost, "expected event {lost} again, got {next}");
        let again_seq = next["seq"].as_i64().expect("seq");
        assert!(again_seq > first_seq, "seq {again_seq} reused after the crash (first delivery: {first_seq})");
        let last = next_event(&mut ws).await;
        assert_eq!(last["id"], after);
        assert!(last["seq"].as_i64().expect("seq") > again_seq);
        ws.expect_silence(SILENCE).await;
        // A client that saw the forgotten seq and resumes from it misses nothing.
        let mut late = authed(&nudge, "bob", &[TOPIC]).await;
        late.subscribe(TOPIC).await;
        late.send_json(serde_json::json!({"type": "resume", "since": first_seq})).await;
        let replayed = late.recv_event_ids(2, SOON).await;
        assert_eq!(replayed, vec![lost, after], "resume from the forgotten seq {first_seq}");
        let resumed = late.recv_type("resumed").await;
        assert_eq!(resumed["complete"], true, "{resumed}");
        eprintln!("round {round}: claim forgotten by the crash; seq {first_seq} -> {again_seq}, delivered again");
        return;
    }
    panic!("in five rounds no crash forgot a claim: the WAL was flushed every time; log:\n{}", nudge.log());
}

/// Durable claims (the default): the same crash forgets nothing, so nothing is delivered twice; and the first
/// claim after the restart skips ahead (schema version 8), so the seqs handed out before stay unique whatever a
/// crash or failover would have lost.
#[tokio::test(flavor = "multi_thread")]
async fn durable_claims_survive_a_crash_and_are_never_delivered_twice() {
    let mut server = crash_prone_cluster().await;
    let url = server.url("crash");
    let nudge = Nudge::start(&url, QUICK).await;
    let mut ws = authed(&nudge, "alice", &[TOPIC]).await;
    ws.subscribe(TOPIC).await;
    let pg = pg_connect(&url).await;
    let before = insert_event(&pg, TOPIC, "before", "{}").await;
    let first = next_event(&mut ws).await;
    assert_eq!(first["id"], before);
    server.crash().await;
    server.start_again().await;
    let pg = pg_connect(&url).await;
    let after = insert_event(&pg, TOPIC, "after", "{}").await;
    let next = next_event(&mut ws).await;
    assert_eq!(next["id"], after, "the event claimed before the crash came again: {next}");
    let (first_seq, next_seq) = (first["seq"].as_i64().expect("seq"), next["seq"].as_i64().expect("seq"));
    assert!(next_seq > first_seq + 1_000_000_000, "no skip after the restart: {first_seq} then {next_seq}");
    ws.expect_silence(SILENCE).await;
    // The skipped numbers are no deleted events: a resume across them is complete.
    let mut late = authed(&nudge, "bob", &[TOPIC]).await;
    late.subscribe(TOPIC).await;
    late.send_json(serde_json::json!({"type": "resume", "since": first_seq})).await;
    assert_eq!(late.recv_event_ids(1, SOON).await, vec![after]);
    let resumed = late.recv_type("resumed").await;
    assert_eq!(resumed["complete"], true, "{resumed}");
}
