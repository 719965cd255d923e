//! The relay: two loops and the timers around them.
//!
//! - **Claims** (`run_claims`): woken by NOTIFY nudge (an INSERT), a client's `wakeup`, or the poll. One pass at
//!   a time claims pending rows in batches and gives them a cluster-wide `seq` (see `db::events`). It routes
//!   nothing itself: it hands its batches to this node's delivery loop, and every other node reads them. While
//!   producers commit fast (`--awake-above`) it stays awake and claims in a loop, and producers skip their
//!   NOTIFY (the wake gate, `Phase` below and sql/0003_wake_gate.sql).
//! - **Deliveries** (`run_deliveries`): woken by NOTIFY nudge_claimed (any node's claim), this node's own claims,
//!   or the poll. It routes this node's own fresh batches when they continue its cursor, otherwise reads claimed
//!   rows past the cursor, in seq order; routing advances the cursor. The cursor is the truth; notifications only
//!   wake (and say how far there is to read, so a node alone never reads back its own claims).
//!
//! Invariants: one pass of each loop at a time per node; the hub sees events in seq order, so every connection
//! receives them in that order, exactly once, on every node.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use deadpool_postgres::Pool;

use crate::config::RelaySettings;
use crate::db::events;
use crate::db::gate::{self, Gate};
use crate::db::nodes::{self, Peers};
use crate::db::{self, within, Backoff, QueryError};
use crate::health::{Metrics, Readiness};
use crate::hub::Hub;
use crate::shutdown::Shutdown;
use crate::wake::{DeliveryWakeups, Wakeups};

/// What the relay tasks share.
pub struct Relay {
    pub pool: Pool,
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
    /// Batches this node claimed, in claim order, waiting for the delivery loop (which alone routes).
    pub fresh: Mutex<Vec<events::Batch>>,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub settings: RelaySettings,
    /// Client-side limit on each query (`events::within`).
    pub statement_timeout: Duration,
    /// This node's id in `nudge.nodes` (LISTEN ignores its own announcements by it).
    pub node_id: String,
}

/// An awake relay goes back to NOTIFY once the rate falls below this share of `--awake-above`: lower than the
/// entry rate so that a flow near it does not flap, but not by much, so that a burst that woke the relay at
/// 2,000/s does not keep it awake.
///
/// Why `--awake-above` defaults to 2,500 producer transactions/s: below it a NOTIFY per inserting transaction
/// costs producers little (8 writers at 2,000/s kept their rate here) and wakes a claim sooner than a loop
/// reaches the row: at 2,000 events/s, staying on NOTIFY cut the median COMMIT-to-client latency from about 1.55
/// to 1.35 ms (docs/performance.md). Above it, producers' NOTIFYs serialize their commits (16 writers flat out:
/// 0.49x plain INSERTs with a NOTIFY each, 0.68x with the gate, in one run).
const AWAKE_BELOW_SHARE: f64 = 0.8;
/// The rate is measured over windows at least this long: long enough to smooth a burst of commits, short enough
/// that a flow starting is noticed within a few (transitions happen at most once per window).
const RATE_WINDOW: Duration = Duration::from_millis(100);
/// While awake, how soon an empty claim is retried: tokio's timer resolution, and about a claim's own cost.
const AWAKE_POLL: Duration = Duration::from_millis(1);
/// How long an awake relay keeps finding nothing before it goes idle.
const LINGER: Duration = Duration::from_millis(10);
/// While settling, polls back off up to this (a producer's transaction may stay open for a while).
const SETTLE_POLL_MAX: Duration = Duration::from_millis(100);

/// How fast producers commit: what decides whether claiming in a loop pays (see `AWAKE_BELOW_SHARE`). While idle
/// every inserting transaction NOTIFYs, so wake-ups count transactions (a client's `wakeup` counts too); while
/// awake they skip it, so claimed rows stand in, an upper bound (a transaction inserts one row or more).
#[derive(Debug)]
struct Flow {
    /// Start of the window being counted.
    since: Instant,
    /// Transactions (or rows) counted since `since`.
    count: u64,
    /// Per second: the mean of the last complete window's rate and the value before it, so a flow must last a
    /// few windows to count. Windows close at the first pass after they are `RATE_WINDOW` long, so a quiet spell
    /// reads as one long, slow window. The smoothing matters when PostgreSQL is saturated: one claim can then take
    /// 100 ms and the next catch up, and single windows swung between 1,400 and 9,900 rows/s (16 writers flat
    /// out, here).
    rate: f64,
    /// `Wakeups::requested` when last counted.
    wakeups: u64,
}

impl Flow {
    fn new() -> Self {
        Flow { since: Instant::now(), count: 0, rate: 0.0, wakeups: 0 }
    }

    /// Count wake-ups (idle: one per producer transaction), given the running total.
    fn record_wakeups(&mut self, requested: u64) {
        let new = requested.saturating_sub(self.wakeups);
        self.wakeups = requested;
        self.record(new);
    }

    /// Count claimed rows (awake: producers skip their NOTIFY, so there are no wake-ups to count).
    fn record(&mut self, count: u64) {
        let elapsed = self.since.elapsed();
        if elapsed >= RATE_WINDOW {
            self.rate = (self.rate + self.count as f64 / elapsed.as_secs_f64()) / 2.0;
            self.since = Instant::now();
            self.count = 0;
        }
        self.count += count;
    }
}

/// Where the claim loop is in the wake gate's protocol (sql/0003_wake_gate.sql).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Producers NOTIFY; one pass runs per wake-up.
    Idle,
    /// Rows are flowing: hold `awake` so producers skip their NOTIFY, and claim in a loop.
    Awake,
    /// No longer holding (or asking for) `awake`, but producers that skipped their NOTIFY may still be in
    /// flight: keep claiming until an instant with none, then claim once more.
    Settling,
}

/// Why a claim loop step failed: a query on the pool, or a statement on the wake gate's own session (whose
/// failure costs the session, and so `awake`).
#[derive(Debug, thiserror::Error)]
enum ClaimError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("wake gate session: {0}")]
    Gate(QueryError),
}

impl Relay {
    /// Claim whenever woken, until shutdown; see `Phase`. Claims route nothing themselves: each batch goes to
    /// this node's delivery loop, and every other node reads it.
    ///
    /// Starts settling, not idle: after a restart (supervisor.rs) producers may have skipped their NOTIFY for a
    /// loop that held `awake` when it died, and at a first start it costs one claim pass.
    pub async fn run_claims(&self, mut shutdown: Shutdown) {
        let mut phase = Phase::Settling;
        let mut gate: Option<Gate> = None;
        let mut flow = Flow::new();
        let mut backoff = Backoff::default();
        loop {
            let next = match phase {
                Phase::Idle => self.idle(&mut flow, &mut shutdown).await,
                Phase::Awake => self.awake(&mut flow, &mut gate, &mut shutdown).await,
                Phase::Settling => self.settle(&mut flow, &mut shutdown).await,
            };
            match next {
                Ok(Some(next)) => {
                    if next != phase {
                        tracing::debug!(from = ?phase, to = ?next, per_s = flow.rate as u64, "claim phase");
                    }
                    phase = next;
                    backoff.reset();
                }
                Ok(None) => return,
                Err(e) => {
                    // A broken gate session has released `awake`; either way producers may have skipped their
                    // NOTIFY for us, so settle. An idle node asked nothing of anyone and stays idle.
                    if phase != Phase::Idle {
                        gate = None;
                        phase = Phase::Settling;
                    }
                    if !self.pause_after_failure("claim", &e, &mut backoff, &mut shutdown).await {
                        return;
                    }
                    self.claims.wake();
                }
            }
        }
    }

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

    /// Wait for a wake-up, claim; go awake once producers commit faster than `--awake-above`.
    async fn idle(&self, flow: &mut Flow, shutdown: &mut Shutdown) -> Result<Option<Phase>, ClaimError> {
        tokio::select! {
            biased;
            _ = shutdown.triggered() => return Ok(None),
            _ = self.claims.wait() => {}
        }
        flow.record_wakeups(self.claims.requested());
        self.claim_pass(Some(flow)).await?;
        Ok(Some(if flow.rate >= self.settings.awake_above { Phase::Awake } else { Phase::Idle }))
    }

    /// Hold `awake` and claim in a loop until nothing came for `LINGER` or the rate fell below
    /// `AWAKE_BELOW_SHARE` of `--awake-above`, then release it and settle. Shutdown drops the gate session, which
    /// releases `awake` too.
    async fn awake(
        &self,
        flow: &mut Flow,
        gate: &mut Option<Gate>,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Phase>, ClaimError> {
        let session = match gate {
            Some(session) => session,
            None => match Gate::connect(&self.gate_database).await {
                Ok(session) => gate.insert(session),
                // Nothing was asked of producers yet: stay on NOTIFY.
                Err(e) => {
                    tracing::warn!("cannot open the wake gate session, staying on NOTIFY: {e}");
                    return Ok(Some(Phase::Idle));
                }
            },
        };
        if !self.on_gate(session.hold_awake()).await? {
            return Ok(Some(Phase::Settling));
        }
        self.metrics.awake_periods.fetch_add(1, Ordering::Relaxed);
        let mut last_rows = Instant::now();
        loop {
            let claimed = self.claim_pass(None).await?;
            flow.record(claimed as u64);
            if flow.rate < self.settings.awake_above * AWAKE_BELOW_SHARE {
                break;
            }
            if claimed > 0 {
                last_rows = Instant::now();
                continue;
            }
            if last_rows.elapsed() >= LINGER {
                break;
            }
            tokio::select! {
                biased;
                _ = shutdown.triggered() => return Ok(None),
                _ = tokio::time::sleep(AWAKE_POLL) => {}
                _ = self.claims.wait() => {}
            }
        }
        self.on_gate(session.release_awake()).await?;
        Ok(Some(Phase::Settling))
    }

    /// Claim until, at some instant, no producer transaction is in flight; the claim after that instant sees
    /// every row whose producer skipped its NOTIFY. Back to awake if rows flow fast again.
    async fn settle(&self, flow: &mut Flow, shutdown: &mut Shutdown) -> Result<Option<Phase>, ClaimError> {
        let mut delay = AWAKE_POLL;
        loop {
            let settled = within(&self.pool, self.statement_timeout, gate::producers_settled(&self.pool)).await?;
            // Released: producers NOTIFY again, so count their wake-ups.
            flow.record_wakeups(self.claims.requested());
            self.claim_pass(None).await?;
            if settled {
                return Ok(Some(Phase::Idle));
            }
            if flow.rate >= self.settings.awake_above {
                return Ok(Some(Phase::Awake));
            }
            tokio::select! {
                biased;
                _ = shutdown.triggered() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
                _ = self.claims.wait() => {}
            }
            delay = (delay * 2).min(SETTLE_POLL_MAX);
        }
    }

    /// A statement on the wake gate's own session, under the statement timeout: a gate session gone silent must
    /// not hang the claim loop (the caller drops the session, which releases `awake`, and settles).
    async fn on_gate<T>(
        &self,
        statement: impl std::future::Future<Output = Result<T, QueryError>>,
    ) -> Result<T, ClaimError> {
        match tokio::time::timeout(self.statement_timeout, statement).await {
            Ok(result) => result.map_err(ClaimError::Gate),
            Err(_) => Err(ClaimError::Gate(QueryError::Timeout(self.statement_timeout))),
        }
    }

    /// Claim batches until one comes back short; returns the rows claimed.
    ///
    /// An idle relay passes its `flow`: producers that keep every batch full would otherwise keep it in one
    /// endless pass, never measuring their rate and never going awake, while every one of them pays its NOTIFY.
    /// After each full batch it counts the wake-ups that came meanwhile and, once the rate calls for it, ends the
    /// pass so that the claim loop goes awake (which claims what is left).
    async fn claim_pass(&self, mut idle_flow: Option<&mut Flow>) -> Result<usize, QueryError> {
        self.metrics.claim_passes.fetch_add(1, Ordering::Relaxed);
        let mut total = 0;
        loop {
            let tell_others = self.peers.others_alive();
            let started = Instant::now();
            let claim = events::claim_batch(&self.pool, self.settings.claim_batch, self.settings.max_age, tell_others);
            let claimed = within(&self.pool, self.statement_timeout, claim).await?;
            self.metrics.claim_durations.record(started.elapsed());
            total += claimed.claimed;
            self.metrics.claimed.fetch_add(claimed.claimed as u64, Ordering::Relaxed);
            self.metrics.expired.fetch_add(claimed.expired as u64, Ordering::Relaxed);
            if let Some(last_seq) = claimed.batch.through {
                tracing::debug!(claimed = claimed.claimed, expired = claimed.expired, last_seq, "claimed batch");
                // Committed: hand the rows to our own delivery loop, which routes them without reading them back
                // when they continue its cursor. Other nodes read them after the NOTIFY.
                self.fresh.lock().unwrap_or_else(|e| e.into_inner()).push(claimed.batch);
                self.deliveries.claimed(last_seq);
            }
            if (claimed.claimed as i64) < self.settings.claim_batch {
                return Ok(total);
            }
            if let Some(flow) = idle_flow.as_deref_mut() {
                flow.record_wakeups(self.claims.requested());
                if flow.rate >= self.settings.awake_above {
                    return Ok(total);
                }
            }
        }
    }

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
