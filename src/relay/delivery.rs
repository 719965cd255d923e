//! Delivery: route claimed rows past the node cursor, in seq order, to this node's connections.
//!
//! A batch this node claims is routed by the claim task itself, at once, when it continues the cursor
//! (`hand_over`: no task hop between a claim and its frames; the common case on one node). Otherwise it waits in
//! `fresh` for the delivery loop, which routes it if it continues the cursor by then and reads everything else
//! back (`db::events::read_after`). Both route under `Relay::routing`, one batch at a time, and only rows past
//! the cursor: a row is routed once whichever task gets to it first. `start_cursor` places a starting node's
//! cursor at the cluster's last seq.

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
        // Our own claims first: a batch that continues the cursor needs no read. Any other batch is dropped: the
        // read below finds its rows.
        let fresh = std::mem::take(&mut *self.fresh.lock().unwrap_or_else(|e| e.into_inner()));
        for batch in fresh {
            self.route_if_next(&batch);
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
            self.route_past_cursor(&batch);
            if (batch.len() as i64) < self.settings.claim_batch {
                look = false;
            }
        }
    }

    /// A batch this node just claimed (committed): routed here, on the claim task, if it continues the cursor;
    /// otherwise queued for the delivery loop.
    pub(super) fn hand_over(&self, batch: events::Batch) {
        let Some(last_seq) = batch.through else { return };
        if self.route_if_next(&batch) {
            self.deliveries.note_claimed(last_seq);
        } else {
            self.fresh.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
            self.deliveries.claimed(last_seq);
        }
    }

    /// Route a claimed batch if its first seq is the one after the cursor; false (and nothing routed) otherwise.
    fn route_if_next(&self, batch: &events::Batch) -> bool {
        let _turn = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        // A claim's block of seqs starts at its lowest (possibly skipped) row; decoded or not, the rows between
        // the cursor and `through` are exactly this batch's.
        let first = batch.through.map(|through| through - batch.len() as i64 + 1);
        if first != Some(self.hub.cursor() + 1) {
            return false;
        }
        self.route(&batch.events, batch);
        true
    }

    /// Route the rows of a batch read back past the cursor, leaving out any the claim task routed meanwhile (the
    /// read started from an older cursor; no seq between two rows exists unread, so what is left continues the
    /// cursor).
    pub(super) fn route_past_cursor(&self, batch: &events::Batch) {
        let _turn = self.routing.lock().unwrap_or_else(|e| e.into_inner());
        let cursor = self.hub.cursor();
        if batch.through.is_some_and(|through| through <= cursor) {
            return;
        }
        let unrouted = batch.events.partition_point(|e| e.seq <= cursor);
        self.route(&batch.events[unrouted..], batch);
    }

    /// Under the routing turn: queue `events` (the rows of `batch` not yet routed) and move the cursor.
    fn route(&self, events: &[events::Event], batch: &events::Batch) {
        self.metrics.rejected.fetch_add(batch.rejected as u64, Ordering::Relaxed);
        let routed = self.hub.route(events, batch.through, &self.metrics);
        if let Some(claimed_at) = batch.claimed_at {
            self.metrics.stages.claim_to_routed.record(claimed_at.elapsed());
        }
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
