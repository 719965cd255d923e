//! The LISTEN connection: a dedicated tokio-postgres session, driven with `poll_message`, on three channels:
//! `nudge` (the insert trigger: rows are pending, claim them), `nudge_claimed` (some node claimed rows: read
//! past the cursor) and `nudge_nodes` (a node's heartbeat: someone else may need our `nudge_claimed`).
//!
//! A notification only means "look": the passes find out what there is. Payloads are hints at most (the last
//! seq a claim handed out, so a node reads only when someone else claimed; the announcing node's id). That is
//! why a lost notification (the connection was down) costs nothing but latency: every (re)connect wakes both
//! loops at once, and the fallback poll covers the rest.

use std::future::poll_fn;
use std::sync::Arc;

use tokio_postgres::{AsyncMessage, NoTls};

use super::{nodes, Backoff};
use crate::health::Readiness;
use crate::shutdown::Shutdown;
use crate::wake::{DeliveryWakeups, Peers, Wakeups};

/// The channel the `events_notify` trigger notifies.
pub const INSERTED: &str = "nudge";
/// The channel every claim notifies when it commits (payload: the last seq it handed out).
pub const CLAIMED: &str = "nudge_claimed";
const LISTEN: &str = "LISTEN nudge; LISTEN nudge_claimed; LISTEN nudge_nodes";

/// Who to wake for each channel.
pub struct Listeners {
    pub claims: Arc<Wakeups>,
    pub deliveries: Arc<DeliveryWakeups>,
    /// Told when another node's heartbeat announcement arrives.
    pub peers: Arc<Peers>,
    /// Our own announcements come back to us too; they say nothing.
    pub node_id: String,
}

/// Keep a LISTEN session open until shutdown, reconnecting with backoff.
pub async fn run(
    config: tokio_postgres::Config,
    wakeups: Listeners,
    readiness: Arc<Readiness>,
    mut shutdown: Shutdown,
) {
    let mut config = config;
    // Operators find this session in pg_stat_activity by name (and tests kill it by name).
    config.application_name("nudge-listen");
    let mut backoff = Backoff::default();
    loop {
        let session = listen_once(&config, &wakeups, &readiness, &mut backoff);
        let ended = tokio::select! {
            ended = session => ended,
            _ = shutdown.triggered() => return,
        };
        readiness.set_listen(false);
        let reason = match ended {
            Ok(()) => "LISTEN connection closed by the server".to_owned(),
            Err(e) => format!("LISTEN connection failed: {e}"),
        };
        tracing::warn!("{reason}; reconnecting");
        readiness.set_error(reason);
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.triggered() => return,
        }
    }
}

/// One session: connect, LISTEN, wake the relay, then forward notifications until the connection ends.
async fn listen_once(
    config: &tokio_postgres::Config,
    wakeups: &Listeners,
    readiness: &Readiness,
    backoff: &mut Backoff,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    // The connection object does the I/O for `client` too, so it is polled while LISTEN runs.
    let notifications = async {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == CLAIMED => match n.payload().parse() {
                    Ok(last_seq) => wakeups.deliveries.claimed(last_seq),
                    Err(_) => wakeups.deliveries.look(),
                },
                Some(Ok(AsyncMessage::Notification(n))) if n.channel() == nodes::ANNOUNCE => {
                    if n.payload() != wakeups.node_id {
                        wakeups.peers.announced();
                    }
                }
                Some(Ok(AsyncMessage::Notification(_))) => wakeups.claims.wake(),
                Some(Ok(_notice)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    };
    tokio::pin!(notifications);
    tokio::select! {
        ended = &mut notifications => return ended,
        listening = client.batch_execute(LISTEN) => listening?,
    }
    readiness.set_listen(true);
    backoff.reset();
    tracing::info!("LISTEN connection up");
    // Anything inserted or claimed while we were not listening would otherwise wait for the fallback poll; a
    // node that announced itself meanwhile would otherwise go unheard until our next heartbeat.
    wakeups.claims.wake();
    wakeups.deliveries.look();
    wakeups.peers.may_have_missed_announcements();
    let ended = notifications.await;
    drop(client);
    ended
}
