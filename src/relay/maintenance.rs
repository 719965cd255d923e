//! The relay's timers: the fallback poll (wakes both loops in case notifications were lost), the retention
//! sweep, this node's presence rows, and its heartbeat in `nudge.nodes` (which keeps `Relay::peers`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Relay;
use crate::db::{self, events, nodes, within};
use crate::shutdown::Shutdown;

impl Relay {
    /// Wake both loops every poll interval: the safety net for notifications lost while LISTEN was down.
    pub async fn run_poll(&self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(self.settings.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    self.claims.wake();
                    self.deliveries.look();
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
                match within(
                    &self.pool,
                    self.statement_timeout,
                    events::delete_processed(&self.pool, self.settings.retention),
                )
                .await
                {
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

    /// Write this node's presence rows (presence.rs) every `FLUSH_EVERY` while something changed; remove them on
    /// a clean shutdown. A failed write marks everything for rewriting and is retried at the next flush.
    pub async fn run_presence(&self, node_id: &str, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(crate::presence::FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Rows of an earlier process with this node id, and everything present now.
        let mut cleared = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.triggered() => {
                    let _ = within(&self.pool, self.statement_timeout, db::presence::clear(&self.pool, node_id)).await;
                    return;
                }
            }
            if !cleared {
                match within(&self.pool, self.statement_timeout, db::presence::clear(&self.pool, node_id)).await {
                    Ok(()) => cleared = true,
                    Err(e) => {
                        tracing::debug!("presence: clearing old rows failed: {e}");
                        continue;
                    }
                }
                self.hub.presence_rewrite();
            }
            let changes = self.hub.presence_changes();
            if changes.is_empty() {
                continue;
            }
            let write = db::presence::write(&self.pool, node_id, &changes);
            match within(&self.pool, self.statement_timeout, write).await {
                Ok(()) => _ = self.metrics.presence_writes.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    tracing::warn!("presence write failed, rewriting everything at the next flush: {e}");
                    self.hub.presence_rewrite();
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
            let seen = self.peers.seen();
            let beat = nodes::heartbeat(&self.pool, node_id, address, connections, self.hub.cursor());
            match within(&self.pool, self.statement_timeout, beat).await {
                Ok(beat) => {
                    self.peers.heartbeat(seen, beat.others);
                    if beat.inserted {
                        // A new row: our presence rows are not there (first beat, or we were aged out).
                        self.hub.presence_rewrite();
                    }
                    self.metrics.lag_events.store(beat.lag_events, Ordering::Relaxed);
                    self.metrics.lag_millis.store((beat.lag_seconds * 1000.0) as i64, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("heartbeat failed: {e}"),
            }
        }
    }
}
