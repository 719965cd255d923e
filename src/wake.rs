//! Wake-ups: the one place that turns "something may be pending" into "run a claim pass" ([`Wakeups`]), and
//! "something may be claimed past the cursor" into "run a delivery pass" ([`DeliveryWakeups`]).
//!
//! Sources: NOTIFY on the LISTEN connection, a client's `wakeup`, the fallback poll, a LISTEN (re)connect, and
//! (for deliveries) this node's own claims.
//! Coalescing is the point: `tokio::sync::Notify` stores at most one permit, so any number of wake-ups while a
//! pass runs cause exactly one more pass, and 10,000 wakeups a second cost a handful of queries.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;
use tokio::time::Instant;

/// "Run a pass", coalesced: any number of wake-ups between two waits make one permit.
#[derive(Default)]
pub struct Wakeups {
    notify: Notify,
    /// Total wake-ups requested, for `/metrics`: compare with claim passes to see the coalescing.
    requested: AtomicU64,
    /// When the oldest wake-up not yet served arrived: the start of `nudge_wake_to_claim_seconds`. A lock held
    /// for a compare and a store, never across anything else.
    woken_at: Mutex<Option<Instant>>,
}

impl Wakeups {
    /// Ask for a claim pass. Never blocks, never allocates.
    pub fn wake(&self) {
        self.requested.fetch_add(1, Ordering::Relaxed);
        {
            let mut woken_at = self.woken_at.lock().unwrap_or_else(|e| e.into_inner());
            if woken_at.is_none() {
                *woken_at = Some(Instant::now());
            }
        }
        self.notify.notify_one();
    }

    /// When the oldest wake-up since the last call arrived, if any: the pass about to start serves them all.
    pub fn take_woken_at(&self) -> Option<Instant> {
        self.woken_at.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Wait until at least one wake-up arrived since the last call returned.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Wake-ups asked for since start: `/metrics`, and the claim loop's measure of how fast producers commit
    /// while they NOTIFY.
    pub fn requested(&self) -> u64 {
        self.requested.load(Ordering::Relaxed)
    }
}

/// Wake-ups for the delivery loop, carrying what they know: the highest seq any node is known to have handed
/// out. A delivery pass reads the database only when that is past what this node already routed from its own
/// claims, or when a wake-up could not say (the poll, a LISTEN reconnect). On one node, that makes a claimed
/// batch cost one query, not three.
#[derive(Default)]
pub struct DeliveryWakeups {
    wakeups: Wakeups,
    /// From NOTIFY nudge_claimed payloads and this node's own claims. Only grows.
    claimed_through: AtomicI64,
    /// Set by wake-ups that know nothing: read past the cursor whatever `claimed_through` says.
    look: AtomicBool,
}

impl DeliveryWakeups {
    /// Seqs up to `seq` are claimed and committed.
    pub fn claimed(&self, seq: i64) {
        self.claimed_through.fetch_max(seq, Ordering::AcqRel);
        self.wakeups.wake();
    }

    /// Seqs up to `seq` are claimed and committed, and this node already routed them: no pass needed.
    pub fn note_claimed(&self, seq: i64) {
        self.claimed_through.fetch_max(seq, Ordering::AcqRel);
    }

    /// Something may be claimed past the cursor; go and look.
    pub fn look(&self) {
        self.look.store(true, Ordering::Release);
        self.wakeups.wake();
    }

    /// Wait until at least one wake-up arrived since the last call returned.
    pub async fn wait(&self) {
        self.wakeups.wait().await;
    }

    /// The highest seq known to be claimed and committed.
    pub fn claimed_through(&self) -> i64 {
        self.claimed_through.load(Ordering::Acquire)
    }

    /// Whether a `look` arrived since the last call.
    pub fn take_look(&self) -> bool {
        self.look.swap(false, Ordering::AcqRel)
    }
}
