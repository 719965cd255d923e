//! The relay loop: wake-up -> claim pass -> route. Plus the two timers around it (fallback poll, retention).
//!
//! Invariant: at most one claim pass runs at a time on a node, and the hub sees batches in claim order, so every
//! connection receives events in id order. Wake-ups arriving during a pass cause one more pass (see `wake`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::config::RelaySettings;
use crate::db::claim;
use crate::db::{migrate, Backoff};
use crate::health::{Metrics, Readiness};
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::wake::Wakeups;

/// What the relay tasks share.
pub struct Relay {
    pub pool: Pool,
    pub hub: Arc<Hub>,
    pub wakeups: Arc<Wakeups>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub settings: RelaySettings,
}

impl Relay {
    /// Run claim passes whenever woken, until shutdown. A pass in progress is finished before returning.
    pub async fn run_claims(&self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::default();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.triggered() => return,
                _ = self.wakeups.wait() => {}
            }
            match self.pass().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    tracing::warn!("claim pass failed: {e}");
                    self.readiness.set_error(e.to_string());
                    // Try again after a pause even if nobody wakes us: the rows are still pending.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => self.wakeups.wake(),
                        _ = shutdown.triggered() => return,
                    }
                }
            }
        }
    }

    /// Claim batches until one comes back short, routing each after its transaction committed.
    async fn pass(&self) -> Result<(), claim::ClaimError> {
        self.metrics.claim_passes.fetch_add(1, Ordering::Relaxed);
        loop {
            let batch = claim::claim_batch(&self.pool, self.settings.claim_batch, self.settings.max_age).await?;
            self.metrics.claimed.fetch_add(batch.claimed as u64, Ordering::Relaxed);
            self.metrics.expired.fetch_add(batch.expired as u64, Ordering::Relaxed);
            if !batch.events.is_empty() {
                let routed = self.hub.route(&batch.events, &self.metrics).await;
                tracing::debug!(
                    claimed = batch.claimed,
                    expired = batch.expired,
                    delivered = routed.delivered,
                    "claimed batch"
                );
            }
            if (batch.claimed as i64) < self.settings.claim_batch {
                return Ok(());
            }
        }
    }

    /// Wake the claim loop every poll interval: the safety net for notifications lost while LISTEN was down.
    pub async fn run_poll(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.settings.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.wakeups.wake(),
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
                match claim::delete_processed(&self.pool, self.settings.retention).await {
                    Ok(deleted) => {
                        self.metrics.deleted.fetch_add(deleted, Ordering::Relaxed);
                        if (deleted as i64) < claim::DELETE_BATCH || shutdown.is_triggered() {
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
