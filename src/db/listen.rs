//! The LISTEN connection: a dedicated tokio-postgres session, driven with `poll_message`, on four channels:
//! `nudge` (the insert trigger: rows are pending, claim them), `nudge_claimed` (some node claimed rows: read
//! past the cursor), `nudge_nodes` (a node's heartbeat: someone else may need our `nudge_claimed`) and
//! `nudge_control` (a backend called `nudge.disconnect()` or `nudge.unsubscribe()`: an order for this node's
//! connections of one user, sql/0007_presence.sql).
//!
//! A notification only means "look": the passes find out what there is. Payloads are hints at most (the last
//! seq a claim handed out, so a node reads only when someone else claimed; the announcing node's id). That is
//! why a lost notification (the connection was down) costs nothing but latency: every (re)connect wakes both
//! loops at once, and the fallback poll covers the rest.
//!
//! A LISTEN session mostly waits, so a session that went silent (a failover that dropped packets, no FIN, no RST)
//! would look like a quiet one forever. It probes itself on the keepalive schedule ([`Liveness`]): a query after
//! `NUDGE_DB_KEEPALIVE_IDLE`, answered within `NUDGE_DB_KEEPALIVE_INTERVAL` x `NUDGE_DB_KEEPALIVE_COUNT`, or the
//! session is given up: `/readyz` answers 503, pooled sessions from before are discarded (they likely took the
//! same path), and a new session is opened (with backoff), which wakes both loops.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio_postgres::AsyncMessage;

use super::nodes::{self, Peers};
use super::{Backoff, ConnectError, Liveness};
use crate::health::Readiness;
use crate::shutdown::Shutdown;
use crate::wake::{DeliveryWakeups, Wakeups};

/// The channel the `events_notify` trigger notifies.
pub const INSERTED: &str = "nudge";
/// The channel every claim notifies when it commits (payload: the last seq it handed out).
pub const CLAIMED: &str = "nudge_claimed";
const LISTEN: &str = "LISTEN nudge; LISTEN nudge_claimed; LISTEN nudge_nodes; LISTEN nudge_control";
/// Orders from SQL for the connections of one user.
pub const CONTROL: &str = "nudge_control";
/// The liveness probe: the cheapest statement with a round trip through the server.
const PROBE: &str = "SELECT 1";

/// Who to wake for each channel.
pub struct Listeners {
    pub claims: Arc<Wakeups>,
    pub deliveries: Arc<DeliveryWakeups>,
    /// Told when another node's heartbeat announcement arrives.
    pub peers: Arc<Peers>,
    /// Our own announcements come back to us too; they say nothing.
    pub node_id: String,
    /// Pools whose sessions are distrusted when the LISTEN session is lost (`db::distrust_sessions`).
    pub pools: Vec<Pool>,
    /// Where `nudge_control` orders go.
    pub hub: Arc<crate::hub::Hub>,
}

/// A `nudge_control` payload, as `nudge.disconnect()` / `nudge.unsubscribe()` write it.
#[derive(serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Order {
    Disconnect { user: String, reason: String },
    Unsubscribe { user: String, pattern: String },
}

/// Hand an order to this node's connections of its user. An order nudge cannot read is logged and dropped: it
/// came from the database, and the functions that write it are nudge's own.
fn obey(hub: &crate::hub::Hub, payload: &str) {
    use crate::outbox::Control;
    match serde_json::from_str::<Order>(payload) {
        Ok(Order::Disconnect { user, reason }) => {
            let n = hub.control_user(&user, &Control::Revoke(reason));
            tracing::info!(%user, connections = n, "disconnect ordered by nudge.disconnect()");
        }
        Ok(Order::Unsubscribe { user, pattern }) => {
            let n = hub.control_user(&user, &Control::Unsubscribe(pattern.clone()));
            tracing::info!(%user, %pattern, connections = n, "unsubscribe ordered by nudge.unsubscribe()");
        }
        Err(e) => tracing::warn!("ignoring a nudge_control notification nudge cannot read: {e}"),
    }
}

/// Why a LISTEN session ended.
#[derive(Debug, thiserror::Error)]
enum ListenError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{}", super::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no answer from the database within {0:?}")]
    Silent(Duration),
    #[error("closed by the server")]
    Closed,
}

/// Keep a LISTEN session open until shutdown, reconnecting with backoff.
pub async fn run(config: super::Database, wakeups: Listeners, readiness: Arc<Readiness>, mut shutdown: Shutdown) {
    let mut config = config;
    // Operators find this session in pg_stat_activity by name (and tests kill it by name).
    config.application_name("nudge-listen");
    let liveness = Liveness::of(&config);
    let mut backoff = Backoff::default();
    loop {
        let session = listen_once(&config, liveness, &wakeups, &readiness, &mut backoff);
        let ended = tokio::select! {
            ended = session => ended,
            _ = shutdown.triggered() => return,
        };
        readiness.set_listen(false);
        // Whatever took this session may have taken the pool's too: a query on a silent session waits for the
        // kernel's timeouts (or, behind a proxy, forever).
        super::distrust_sessions(&wakeups.pools);
        let reason = format!("LISTEN connection failed: {ended}");
        tracing::warn!("{reason}; reconnecting");
        readiness.set_error(reason);
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

/// One session: connect, LISTEN, wake the relay, then forward notifications until the connection ends or stops
/// answering. Returns why it ended.
async fn listen_once(
    config: &super::Database,
    liveness: Liveness,
    wakeups: &Listeners,
    readiness: &Readiness,
    backoff: &mut Backoff,
) -> ListenError {
    let (session, mut connection) = match super::connect(config).await {
        Ok(connected) => connected,
        Err(e) => return e.into(),
    };
    let client = &session;
    // The connection object does the I/O for `client` too, so it is polled while LISTEN runs.
    let notifications = async {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CLAIMED => match n.payload().parse() {
                    Ok(last_seq) => wakeups.deliveries.claimed(last_seq),
                    Err(_) => wakeups.deliveries.look(),
                },
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CONTROL => obey(&wakeups.hub, n.payload()),
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == nodes::ANNOUNCE => {
                    if n.payload() != wakeups.node_id {
                        wakeups.peers.announced();
                    }
                }
                Some(Ok(AsyncMessage::Notification(_))) => wakeups.claims.wake(),
                Some(Ok(_notice)) => {}
                Some(Err(e)) => return ListenError::Postgres(e),
                None => return ListenError::Closed,
            }
        }
    };
    tokio::pin!(notifications);
    let answered = |statement| async move {
        match tokio::time::timeout(liveness.answer_within, client.batch_execute(statement)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ListenError::Postgres(e)),
            Err(_) => Err(ListenError::Silent(liveness.answer_within)),
        }
    };
    tokio::select! {
        ended = &mut notifications => return ended,
        listening = answered(LISTEN) => if let Err(e) = listening {
            return e;
        },
    }
    readiness.set_listen(true);
    backoff.reset();
    tracing::info!("LISTEN connection up");
    // Anything inserted or claimed while we were not listening would otherwise wait for the fallback poll; a
    // node that announced itself meanwhile would otherwise go unheard until our next heartbeat.
    wakeups.claims.wake();
    wakeups.deliveries.look();
    wakeups.peers.may_have_missed_announcements();
    let probes = async {
        loop {
            tokio::time::sleep(liveness.probe_every).await;
            if let Err(e) = answered(PROBE).await {
                return e;
            }
        }
    };
    let ended = tokio::select! {
        ended = notifications => ended,
        failed = probes => failed,
    };
    drop(session);
    ended
}
