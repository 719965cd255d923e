//! The LISTEN connection: a dedicated tokio-postgres session on channel `nudge`, driven with `poll_message`.
//!
//! A notification only means "look": its payload is ignored, and the claim pass finds out what is pending. That
//! is why a lost notification (the connection was down) costs nothing but latency: every (re)connect wakes the
//! relay at once, and the fallback poll covers the rest.

use std::future::poll_fn;
use std::sync::Arc;

use tokio_postgres::{AsyncMessage, NoTls};

use super::Backoff;
use crate::health::Readiness;
use crate::shutdown::Shutdown;
use crate::wake::Wakeups;

/// The channel the `events_notify` trigger notifies.
pub const CHANNEL: &str = "nudge";
const LISTEN: &str = "LISTEN nudge";

/// Keep a LISTEN session open until shutdown, reconnecting with backoff.
pub async fn run(
    config: tokio_postgres::Config,
    wakeups: Arc<Wakeups>,
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
    wakeups: &Wakeups,
    readiness: &Readiness,
    backoff: &mut Backoff,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    // The connection object does the I/O for `client` too, so it is polled while LISTEN runs.
    let notifications = async {
        loop {
            match poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => wakeups.wake(),
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
    // Anything inserted while we were not listening would otherwise wait for the fallback poll.
    wakeups.wake();
    let ended = notifications.await;
    drop(client);
    ended
}
