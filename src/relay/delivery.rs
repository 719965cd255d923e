//! The delivery loop: route claimed rows past the node cursor, in seq order, to this node's connections. This
//! node's own fresh batches are routed without a read when they continue the cursor; anything else is read back
//! (`db::events::read_after`). `start_cursor` places a starting node's cursor at the cluster's last seq.

use std::sync::atomic::Ordering;

use super::Relay;
use crate::db::{events, within, Backoff, QueryError};
use crate::shutdown::Shutdown;

impl Relay {
    /// Route claimed rows past the cursor whenever woken, until shutdown; after a failure, retry with backoff.
    pub async fn run_deliveries(&self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::default();
        // A (re)start may follow claims nobody told us about.
        self.deliveries.look();
        loop {
            tokio::select! {
                biased;
                _ = shutdown.triggered() => return,
                _ = self.deliveries.wait() => {}
            }
            match self.delivery_pass().await {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    if !self.pause_after_failure("delivery", &e, &mut backoff, &mut shutdown).await {
                        return;
                    }
                    self.deliveries.look();
                }
            }
        }
    }

    /// Route claimed rows past the cursor, batch by batch, advancing the cursor after each. Reads the database
    /// only when something past the cursor is known to exist that our own claims did not bring, or when a
    /// wake-up could not tell (poll, reconnect, retry).
    async fn delivery_pass(&self) -> Result<(), QueryError> {
        let mut look = self.deliveries.take_look();
        // Our own claims first: a batch that starts right after the cursor needs no read (the common case on a
        // single node, and the lowest latency). Any other batch is dropped: the read below finds its rows.
        let fresh = std::mem::take(&mut *self.fresh.lock().unwrap_or_else(|e| e.into_inner()));
        for batch in fresh {
            // A claim's block of seqs starts at its lowest (possibly skipped) row; decoded or not, the rows
            // between the cursor and `through` are exactly this batch's.
            let first = batch.through.map(|through| through - batch.len() as i64 + 1);
            if first == Some(self.hub.cursor() + 1) {
                self.route(&batch);
            }
        }
        loop {
            if !look && self.hub.cursor() >= self.deliveries.claimed_through() {
                return Ok(());
            }
            let read = events::read_after(&self.pool, self.hub.cursor(), self.settings.claim_batch);
            let batch = within(&self.pool, self.statement_timeout, read).await?;
            if batch.is_empty() {
                return Ok(());
            }
            // Routing advances the hub's cursor past the batch's last seq.
            self.route(&batch);
            if (batch.len() as i64) < self.settings.claim_batch {
                look = false;
            }
        }
    }

    fn route(&self, batch: &events::Batch) {
        self.metrics.rejected.fetch_add(batch.rejected as u64, Ordering::Relaxed);
        let routed = self.hub.route(&batch.events, batch.through, &self.metrics);
        tracing::debug!(
            events = batch.events.len(),
            delivered = routed.delivered,
            fell_behind = routed.fell_behind,
            cursor = self.hub.cursor(),
            "delivered batch"
        );
    }

    /// Start the cursor at the last seq handed out: a node delivers what is claimed after it starts.
    pub async fn start_cursor(&self, mut shutdown: Shutdown) -> bool {
        let mut backoff = Backoff::default();
        loop {
            match within(&self.pool, self.statement_timeout, events::last_seq(&self.pool)).await {
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
}
