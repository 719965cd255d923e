//! Wake-ups: the one place that turns "something may be pending" into "run a claim pass".
//!
//! Sources: NOTIFY on the LISTEN connection, a client's `wakeup`, the fallback poll, a LISTEN (re)connect.
//! Coalescing is the point: `tokio::sync::Notify` stores at most one permit, so any number of wake-ups while a
//! pass runs cause exactly one more pass, and 10,000 wakeups a second cost a handful of queries.

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::Notify;

#[derive(Default)]
pub struct Wakeups {
    notify: Notify,
    /// Total wake-ups requested, for `/metrics`: compare with claim passes to see the coalescing.
    requested: AtomicU64,
}

impl Wakeups {
    /// Ask for a claim pass. Never blocks, never allocates.
    pub fn wake(&self) {
        self.requested.fetch_add(1, Ordering::Relaxed);
        self.notify.notify_one();
    }

    /// Wait until at least one wake-up arrived since the last call returned.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    pub fn requested(&self) -> u64 {
        self.requested.load(Ordering::Relaxed)
    }
}
