//! The relay: two loops and the timers around them.
//!
//! - **Claims** (`run_claims`): woken by NOTIFY nudge (an INSERT), a client's `wakeup`, or the poll. One pass at
//!   a time claims pending rows in batches and gives them a cluster-wide `seq` (see `db::events`). It routes
//!   nothing itself: it hands its batches to this node's delivery loop, and every other node reads them.
//! - **Deliveries** (`run_deliveries`): woken by NOTIFY nudge_claimed (any node's claim), this node's own claims,
//!   or the poll. It routes this node's own fresh batches when they continue its cursor, otherwise reads claimed
//!   rows past the cursor, in seq order; routing advances the cursor. The cursor is the truth; notifications only
//!   wake.
//!
//! Invariants: one pass of each loop at a time per node; the hub sees events in seq order, so every connection
//! receives them in that order, exactly once, on every node.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::config::RelaySettings;
use crate::db::events;
use crate::db::{migrate, nodes, Backoff};
use crate::health::{Metrics, Readiness};
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::wake::Wakeups;

/// What the relay tasks share.
pub struct Relay {
    pub pool: Pool,
    pub hub: Arc<Hub>,
    /// "Rows may be pending": NOTIFY nudge, client `wakeup`, poll, LISTEN (re)connect.
    pub claims: Arc<Wakeups>,
    /// "Rows may be claimed past our cursor": NOTIFY nudge_claimed, our own claims, poll, LISTEN (re)connect.
    pub deliveries: Arc<Wakeups>,
    /// Batches this node claimed, in claim order, waiting for the delivery loop (which alone routes).
    pub fresh: Mutex<Vec<Vec<events::Event>>>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub settings: RelaySettings,
}

impl Relay {
    /// Run claim passes whenever woken, until shutdown. A pass in progress is finished before returning.
    pub async fn run_claims(&self, shutdown: Shutdown) {
        self.run_passes(&self.claims, shutdown, "claim", || self.claim_pass()).await
    }

    /// Deliver claimed rows past the cursor whenever woken, until shutdown.
    pub async fn run_deliveries(&self, shutdown: Shutdown) {
        self.run_passes(&self.deliveries, shutdown, "delivery", || self.delivery_pass()).await
    }

    /// The loop both share: wait for a wake-up, run one pass; after a failure, pause with backoff and retry even
    /// if nobody wakes us, since the work is still there.
    async fn run_passes<'a, F, Fut>(&'a self, wakeups: &Wakeups, mut shutdown: Shutdown, what: &str, pass: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), events::QueryError>> + 'a,
    {
        let mut backoff = Backoff::default();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.triggered() => return,
                _ = wakeups.wait() => {}
            }
            match pass().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    tracing::warn!("{what} pass failed: {e}");
                    self.readiness.set_error(e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => wakeups.wake(),
                        _ = shutdown.triggered() => return,
                    }
                }
            }
        }
    }

    /// Claim batches until one comes back short.
    async fn claim_pass(&self) -> Result<(), events::QueryError> {
        self.metrics.claim_passes.fetch_add(1, Ordering::Relaxed);
        loop {
            let claimed = events::claim_batch(&self.pool, self.settings.claim_batch, self.settings.max_age).await?;
            self.metrics.claimed.fetch_add(claimed.claimed as u64, Ordering::Relaxed);
            self.metrics.expired.fetch_add(claimed.expired as u64, Ordering::Relaxed);
            if let Some(last) = claimed.events.last() {
                tracing::debug!(
                    claimed = claimed.claimed,
                    expired = claimed.expired,
                    last_seq = last.seq,
                    "claimed batch"
                );
                // Committed: hand the rows to our own delivery loop, which routes them without reading them back
                // when they continue its cursor. Other nodes read them after the NOTIFY.
                self.fresh.lock().unwrap_or_else(|e| e.into_inner()).push(claimed.events);
                self.deliveries.wake();
            }
            if (claimed.claimed as i64) < self.settings.claim_batch {
                return Ok(());
            }
        }
    }

    /// Route claimed rows past the cursor, batch by batch, advancing the cursor after each.
    async fn delivery_pass(&self) -> Result<(), events::QueryError> {
        // Our own claims first: a batch that starts right after the cursor needs no read (the common case on a
        // single node, and the lowest latency). Any other batch is dropped: the read below finds its rows.
        let fresh = std::mem::take(&mut *self.fresh.lock().unwrap_or_else(|e| e.into_inner()));
        for batch in fresh {
            if batch.first().map(|e| e.seq) == Some(self.hub.cursor() + 1) {
                self.hub.route(&batch, &self.metrics).await;
            }
        }
        loop {
            let batch = events::read_after(&self.pool, self.hub.cursor(), self.settings.claim_batch).await?;
            if batch.is_empty() {
                return Ok(());
            }
            // Routing advances the hub's cursor to the batch's last seq.
            let routed = self.hub.route(&batch, &self.metrics).await;
            tracing::debug!(
                events = batch.len(),
                delivered = routed.delivered,
                cursor = self.hub.cursor(),
                "delivered batch"
            );
            if (batch.len() as i64) < self.settings.claim_batch {
                return Ok(());
            }
        }
    }

    /// Start the cursor at the last seq handed out: a node delivers what is claimed after it starts.
    pub async fn start_cursor(&self, mut shutdown: Shutdown) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match events::last_seq(&self.pool).await {
                Ok(last) => {
                    self.hub.start_at(last);
                    return true;
                }
                Err(e) => self.readiness.set_error(e.to_string()),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = shutdown.triggered() => return false,
            }
        }
    }

    /// Wake both loops every poll interval: the safety net for notifications lost while LISTEN was down.
    pub async fn run_poll(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.settings.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.claims.wake();
                    self.deliveries.wake();
                }
                _ = shutdown.triggered() => return,
            }
        }
    }

    /// Delete processed rows older than the retention, in small batches.
    pub async fn run_retention(&self, mut shutdown: Shutdown) {
        let every = (self.settings.retention / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.triggered() => return,
            }
            loop {
                match events::delete_processed(&self.pool, self.settings.retention).await {
                    Ok(deleted) => {
                        self.metrics.deleted.fetch_add(deleted, Ordering::Relaxed);
                        if (deleted as i64) < events::DELETE_BATCH || shutdown.is_triggered() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("retention sweep failed: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// Record this node in `nudge.nodes` every few seconds; remove the row on a clean shutdown.
    pub async fn run_heartbeat(&self, node_id: &str, address: &str, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(nodes::HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.triggered() => {
                    let _ = nodes::remove(&self.pool, node_id).await;
                    return;
                }
            }
            let connections = i32::try_from(self.hub.connections()).unwrap_or(i32::MAX);
            if let Err(e) = nodes::heartbeat(&self.pool, node_id, address, connections, self.hub.cursor()).await {
                tracing::debug!("heartbeat failed: {e}");
            }
        }
    }
}

/// Bring the schema up to date (or, with `--no-migrate`, wait until someone else has), retrying with backoff
/// while the database is unreachable. Returns false if shutdown came first.
pub async fn prepare_schema(
    database: &tokio_postgres::Config,
    apply: bool,
    readiness: &Readiness,
    mut shutdown: Shutdown,
) -> bool {
    let mut backoff = Backoff::default();
    loop {
        let result = if apply { migrate::migrate(database).await.map(|_| ()) } else { migrate::check(database).await };
        match result {
            Ok(()) => {
                readiness.set_schema_ready();
                return true;
            }
            Err(e) => {
                tracing::warn!("database not ready: {e}");
                readiness.set_error(e.to_string());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.triggered() => return false,
        }
    }
}
