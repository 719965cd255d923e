//! Wake-ups: the one place that turns "something may be pending" into "run a claim pass".
//!
//! Sources: NOTIFY on the LISTEN connection, a client's `wakeup`, the fallback poll, a LISTEN (re)connect.
//! Coalescing is the point: `tokio::sync::Notify` stores at most one permit, so any number of wake-ups while a
//! pass runs cause exactly one more pass, and 10,000 wakeups a second cost a handful of queries.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
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

    /// Something may be claimed past the cursor; go and look.
    pub fn look(&self) {
        self.look.store(true, Ordering::Release);
        self.wakeups.wake();
    }

    pub async fn wait(&self) {
        self.wakeups.wait().await;
    }

    pub fn claimed_through(&self) -> i64 {
        self.claimed_through.load(Ordering::Acquire)
    }

    /// Whether a `look` arrived since the last call.
    pub fn take_look(&self) -> bool {
        self.look.swap(false, Ordering::AcqRel)
    }
}

/// Whether another live node may need to hear of our claims (NOTIFY nudge_claimed). A node alone skips that
/// NOTIFY; a node that wrongly thinks it is alone leaves the others waiting for the fallback poll, so every
/// doubt resolves to "not alone".
///
/// Two sources set it: this node's heartbeat query ("is any other node's row fresh?") and other nodes'
/// announcements on the LISTEN session. They race: a node that registers just after our query looked announces
/// itself, and its announcement may arrive before we store our query's "alone". So the heartbeat reads
/// `announcements` before it queries, and "alone" is stored only if none arrived meanwhile.
#[derive(Default)]
pub struct Peers {
    /// Other nodes' announcements seen. Its lock is held while `alone` is written, so that a verdict and an
    /// announcement never interleave (written every few seconds per node).
    announcements: std::sync::Mutex<u64>,
    /// The verdict, read by every claim without the lock.
    alone: AtomicBool,
}

impl Peers {
    /// Another node announced itself.
    pub fn announced(&self) {
        self.may_have_missed_announcements();
    }

    /// The LISTEN session (re)connected: announcements sent while it was down are lost, so count this as one.
    /// (At start, a node's first heartbeat may run before its LISTEN session is up, find nobody, and miss the
    /// announcement of a node that starts a moment later: alone for a whole heartbeat, its claims told nobody.)
    pub fn may_have_missed_announcements(&self) {
        let mut announcements = self.announcements.lock().unwrap_or_else(|e| e.into_inner());
        *announcements += 1;
        self.alone.store(false, Ordering::Release);
    }

    /// Announcements seen so far: read before a heartbeat's query.
    pub fn seen(&self) -> u64 {
        *self.announcements.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A heartbeat's answer, given `seen()` from before it asked.
    pub fn heartbeat(&self, seen_before: u64, others_alive: bool) {
        let announcements = self.announcements.lock().unwrap_or_else(|e| e.into_inner());
        self.alone.store(!others_alive && *announcements == seen_before, Ordering::Release);
    }

    pub fn others_alive(&self) -> bool {
        !self.alone.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::Peers;

    #[test]
    fn an_announcement_during_a_heartbeat_outlives_its_alone_answer() {
        let peers = Peers::default();
        assert!(peers.others_alive(), "not alone until a heartbeat says so");
        let before = peers.seen();
        peers.heartbeat(before, false);
        assert!(!peers.others_alive());

        let before = peers.seen();
        peers.announced(); // a node that registered after our query looked
        peers.heartbeat(before, false);
        assert!(peers.others_alive(), "the heartbeat's stale answer overwrote the announcement");

        let before = peers.seen();
        peers.heartbeat(before, false);
        assert!(!peers.others_alive(), "alone again once a whole heartbeat saw nobody");

        let before = peers.seen();
        peers.may_have_missed_announcements(); // the LISTEN session reconnected
        peers.heartbeat(before, false);
        assert!(peers.others_alive(), "a heartbeat overlapping a LISTEN reconnect cannot say alone");
    }
}
