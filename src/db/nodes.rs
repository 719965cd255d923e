//! Cluster membership: `nudge.nodes`, where every node records itself (id, address, connections, cursor) with a
//! heartbeat, so that `nudge status` can print the cluster; and [`Peers`], this node's verdict on whether it is
//! alone, which the heartbeat's answer and other nodes' announcements (`ANNOUNCE`, heard by `db::listen`) keep.
//! Rows whose heartbeat is older than `STALE` are dead nodes and age out.
//!
//! `Peers` lives here rather than with the wake-ups because it answers a membership question from the nodes
//! table's heartbeat; the claims only read its verdict.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::types::Type;

use super::QueryError;

/// How often a node refreshes its row.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// A node silent this long is considered gone; any live node deletes its row.
pub const STALE: Duration = Duration::from_secs(30);

/// The channel a node announces itself on at every heartbeat: a node that thought it was alone starts telling
/// others about its claims at once, not at its own next heartbeat.
pub const ANNOUNCE: &str = "nudge_nodes";

/// What a heartbeat learned.
#[derive(Debug)]
pub struct Beat {
    /// Whether any other node is alive.
    pub others: bool,
    /// This node's row was inserted, not refreshed: new, or aged out by others while it stalled. Its presence
    /// rows went with it and must be written again.
    pub inserted: bool,
    /// Claimed events past this node's cursor.
    pub lag_events: i64,
    /// Seconds since the oldest of them was claimed (0 when none).
    pub lag_seconds: f64,
}

/// Refresh this node's row (announcing it on `ANNOUNCE`), age out dead nodes, and measure this node's lag.
pub async fn heartbeat(
    pool: &Pool,
    id: &str,
    address: &str,
    connections: i32,
    cursor: i64,
) -> Result<Beat, QueryError> {
    let client = pool.get().await?;
    let me = client
        .query_typed_one(
            "WITH me AS (INSERT INTO nudge.nodes (id, address, started_at, heartbeat_at, connections, cursor) \
             VALUES ($1, $2, now(), now(), $3, $4) \
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), address = EXCLUDED.address, \
             connections = EXCLUDED.connections, cursor = EXCLUDED.cursor RETURNING id, (xmax = 0) AS inserted) \
             SELECT pg_notify($5, id), inserted FROM me",
            &[
                (&id, Type::TEXT),
                (&address, Type::TEXT),
                (&connections, Type::INT4),
                (&cursor, Type::INT8),
                (&ANNOUNCE, Type::TEXT),
            ],
        )
        .await?;
    // Dead nodes go, and their presence rows with them (the views already ignore them after 15 s).
    client
        .query_typed(
            "WITH gone AS (DELETE FROM nudge.nodes WHERE heartbeat_at < now() - make_interval(secs => $1) \
               RETURNING id), \
             u AS (DELETE FROM nudge.presence_users WHERE node_id IN (SELECT id FROM gone)) \
             DELETE FROM nudge.presence_topics WHERE node_id IN (SELECT id FROM gone)",
            &[(&STALE.as_secs_f64(), Type::FLOAT8)],
        )
        .await?;
    let others = client
        .query_typed_one(
            "SELECT EXISTS (SELECT 1 FROM nudge.nodes WHERE id <> $1 \
             AND heartbeat_at >= now() - make_interval(secs => $2))",
            &[(&id, Type::TEXT), (&STALE.as_secs_f64(), Type::FLOAT8)],
        )
        .await?;
    let lag = client.query_typed_one(LAG, &[(&cursor, Type::INT8)]).await?;
    Ok(Beat { others: others.get(0), inserted: me.get(1), lag_events: lag.get(0), lag_seconds: lag.get(1) })
}

/// A cursor's lag behind the cluster: events claimed past it, and seconds since the first of them was claimed
/// (found through `events_seq`).
const LAG: &str = "SELECT greatest(last_seq - $1, 0), coalesce(extract(epoch FROM now() - \
    (SELECT processed_at FROM nudge.events WHERE seq = $1 + 1))::float8, 0) FROM nudge.delivery";

/// Remove this node's row on a clean shutdown.
pub async fn remove(pool: &Pool, id: &str) -> Result<(), QueryError> {
    let client = pool.get().await?;
    client.query_typed("DELETE FROM nudge.nodes WHERE id = $1", &[(&id, Type::TEXT)]).await?;
    Ok(())
}

/// Whether another live node may need to hear of our claims (NOTIFY nudge_claimed). A node alone skips that
/// NOTIFY; a node that wrongly thinks it is alone leaves the others waiting for the fallback poll, so every
/// doubt resolves to "not alone".
///
/// Two sources set it: this node's heartbeat query ("is any other node's row fresh?") and other nodes'
/// announcements on the LISTEN session. They race: a node that registers just after our query looked announces
/// itself, and its announcement may arrive before we store our query's "alone". So the heartbeat reads
/// `announcements` before it queries, and "alone" is stored only if none arrived meanwhile.
#[derive(Default)]
pub struct Peers {
    /// Other nodes' announcements seen. Its lock is held while `alone` is written, so that a verdict and an
    /// announcement never interleave (written every few seconds per node).
    announcements: std::sync::Mutex<u64>,
    /// The verdict, read by every claim without the lock.
    alone: AtomicBool,
}

impl Peers {
    /// Another node announced itself.
    pub fn announced(&self) {
        self.may_have_missed_announcements();
    }

    /// The LISTEN session (re)connected: announcements sent while it was down are lost, so count this as one.
    /// (At start, a node's first heartbeat may run before its LISTEN session is up, find nobody, and miss the
    /// announcement of a node that starts a moment later: alone for a whole heartbeat, its claims told nobody.)
    pub fn may_have_missed_announcements(&self) {
        let mut announcements = self.announcements.lock().unwrap_or_else(|e| e.into_inner());
        *announcements += 1;
        self.alone.store(false, Ordering::Release);
    }

    /// Announcements seen so far: read before a heartbeat's query.
    pub fn seen(&self) -> u64 {
        *self.announcements.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A heartbeat's answer, given `seen()` from before it asked.
    pub fn heartbeat(&self, seen_before: u64, others_alive: bool) {
        let announcements = self.announcements.lock().unwrap_or_else(|e| e.into_inner());
        self.alone.store(!others_alive && *announcements == seen_before, Ordering::Release);
    }

    /// Whether our claims must NOTIFY nudge_claimed (asked by every claim, so lock-free).
    pub fn others_alive(&self) -> bool {
        !self.alone.load(Ordering::Acquire)
    }
}

/// One row of `nudge status`.
#[derive(Debug)]
pub struct NodeStatus {
    pub id: String,
    pub address: String,
    pub started: String,
    pub heartbeat_age_s: f64,
    pub connections: i32,
    pub cursor: i64,
    /// Seconds since the oldest event this node has not routed yet was claimed.
    pub lag_seconds: f64,
}

/// The whole cluster as the database sees it.
#[derive(Debug)]
pub struct ClusterStatus {
    pub last_seq: i64,
    pub pending: i64,
    /// Seconds since the oldest pending event occurred (0 when none is pending).
    pub oldest_pending_s: f64,
    pub nodes: Vec<NodeStatus>,
}

/// Read the cluster for `nudge status`, on the command's own session (it runs outside any node, with no pool).
pub async fn status(client: &tokio_postgres::Client) -> Result<ClusterStatus, QueryError> {
    let last_seq = super::events::read_last_seq(client).await?;
    let pending = client
        .query_typed_one(
            "SELECT count(*), coalesce(extract(epoch FROM now() - (SELECT occurred_at FROM nudge.events \
               WHERE processed_at IS NULL ORDER BY id LIMIT 1))::float8, 0) \
             FROM nudge.events WHERE processed_at IS NULL",
            &[],
        )
        .await?;
    let (pending, oldest_pending_s): (i64, f64) = (pending.get(0), pending.get(1));
    let rows = client
        .query_typed(
            "SELECT id, address, to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS'), \
             extract(epoch FROM now() - heartbeat_at)::float8, connections, cursor, \
             coalesce(extract(epoch FROM now() - \
               (SELECT processed_at FROM nudge.events e WHERE e.seq = nudge.nodes.cursor + 1))::float8, 0) \
             FROM nudge.nodes WHERE heartbeat_at >= now() - make_interval(secs => $1) ORDER BY started_at, id",
            &[(&STALE.as_secs_f64(), Type::FLOAT8)],
        )
        .await?;
    let nodes = rows
        .iter()
        .map(|r| NodeStatus {
            id: r.get(0),
            address: r.get(1),
            started: r.get(2),
            heartbeat_age_s: r.get(3),
            connections: r.get(4),
            cursor: r.get(5),
            lag_seconds: r.get(6),
        })
        .collect();
    Ok(ClusterStatus { last_seq, pending, oldest_pending_s, nodes })
}

#[cfg(test)]
mod tests {
    use super::Peers;

    #[test]
    fn an_announcement_during_a_heartbeat_outlives_its_alone_answer() {
        let peers = Peers::default();
        assert!(peers.others_alive(), "not alone until a heartbeat says so");
        let before = peers.seen();
        peers.heartbeat(before, false);
        assert!(!peers.others_alive());

        let before = peers.seen();
        peers.announced(); // a node that registered after our query looked
        peers.heartbeat(before, false);
        assert!(peers.others_alive(), "the heartbeat's stale answer overwrote the announcement");

        let before = peers.seen();
        peers.heartbeat(before, false);
        assert!(!peers.others_alive(), "alone again once a whole heartbeat saw nobody");

        let before = peers.seen();
        peers.may_have_missed_announcements(); // the LISTEN session reconnected
        peers.heartbeat(before, false);
        assert!(peers.others_alive(), "a heartbeat overlapping a LISTEN reconnect cannot say alone");
    }
}
