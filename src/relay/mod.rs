//! The relay: two loops and the timers around them, as tasks that share one [`Relay`] (each supervised by
//! `node.rs`, and each restartable: what they keep lives here or in the hub).
//!
//! | file | tasks | woken by |
//! |---|---|---|
//! | [`claim`] | `run_claims` (and its wake-gate phases) | NOTIFY nudge, a client's `wakeup`, the poll |
//! | [`delivery`] | `run_deliveries`, `start_cursor` | NOTIFY nudge_claimed, this node's claims, the poll |
//! | [`maintenance`] | `run_poll`, `run_retention`, `run_presence`, `run_heartbeat` | their own timers |
//!
//! - **Claims**: one pass at a time claims pending rows in batches and gives them a cluster-wide `seq` (see
//!   `db::events`). It routes nothing itself: it hands its batches to this node's delivery loop (`fresh`), and
//!   every other node reads them. While producers commit fast (`--awake-above`) it stays awake and claims in a
//!   loop, and producers skip their NOTIFY (the wake gate: `claim::Phase` and sql/0003_wake_gate.sql).
//! - **Deliveries**: routes this node's own fresh batches when they continue its cursor, otherwise reads claimed
//!   rows past the cursor, in seq order; routing advances the cursor. The cursor is the truth; notifications only
//!   wake (and say how far there is to read, so a node alone never reads back its own claims).
//! - **Maintenance**: the fallback poll (wakes both loops), the retention sweep, this node's presence rows and
//!   its heartbeat in `nudge.nodes` (which also keeps `peers`).
//!
//! Invariants: one pass of each loop at a time per node; the hub sees events in seq order, so every connection
//! receives them in that order, exactly once, on every node.

mod claim;
mod delivery;
mod maintenance;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::Pool;

use crate::config::RelaySettings;
use crate::db::nodes::Peers;
use crate::db::{self, events, Backoff};
use crate::health::{Metrics, Readiness};
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::wake::{DeliveryWakeups, Wakeups};

/// What the relay tasks share.
pub struct Relay {
    /// Claims, deliveries, retention, presence and heartbeats (never replays: they have a pool of their own, so
    /// that they cannot queue in front of live delivery).
    pub pool: Pool,
    /// Where deliveries route, and the node cursor they advance.
    pub hub: Arc<Hub>,
    /// "Rows may be pending": NOTIFY nudge, client `wakeup`, poll, LISTEN (re)connect.
    pub claims: Arc<Wakeups>,
    /// "Rows may be claimed past our cursor": NOTIFY nudge_claimed, our own claims, poll, LISTEN (re)connect.
    pub deliveries: Arc<DeliveryWakeups>,
    /// Whether another live node may need our NOTIFY nudge_claimed: heartbeats and other nodes' announcements
    /// (db::listen) decide it.
    pub peers: Arc<Peers>,
    /// The direct session config (never PgBouncer) for the wake gate's session-level lock.
    pub gate_database: db::Database,
    /// Batches this node claimed that did not continue the cursor when claimed, in claim order, waiting for the
    /// delivery loop.
    pub fresh: Mutex<Vec<events::Batch>>,
    /// The turn to route: the claim task (its own batches) and the delivery loop (the rest) both route, one
    /// batch at a time, so that the hub sees every seq once and in order. Held only while routing, which never
    /// waits.
    pub routing: Mutex<()>,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// A failed pass tells `/readyz` why.
    pub readiness: Arc<Readiness>,
    /// Batch size, `--awake-above`, poll interval, retention, max age.
    pub settings: RelaySettings,
    /// Client-side limit on each query (`db::within`) and on each statement of the wake gate's session.
    pub statement_timeout: Duration,
    /// This node's id in `nudge.nodes` (LISTEN ignores its own announcements by it).
    pub node_id: String,
}

impl Relay {
    /// After a failed pass: report it, then pause with backoff. The caller then retries even if nobody wakes
    /// it, since the work is still there. False if shutdown came first.
    async fn pause_after_failure(
        &self,
        what: &str,
        error: &(dyn std::fmt::Display + Sync),
        backoff: &mut Backoff,
        shutdown: &mut Shutdown,
    ) -> bool {
        tracing::warn!("{what} pass failed: {error}");
        self.readiness.set_error(error.to_string());
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => true,
            _ = shutdown.triggered() => false,
        }
    }
}
