//! The claim loop: one pass at a time claims pending rows and hands the batches to this node's delivery loop,
//! moving between the wake gate's phases (`Phase`: Idle on NOTIFY, Awake claiming in a loop while producers skip
//! their NOTIFY, Settling until no producer that skipped it can be left behind). `Flow` measures how fast
//! producers commit, which decides when being awake pays.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::Relay;
use crate::db::gate::{self, Gate};
use crate::db::{events, within, Backoff, QueryError};
use crate::shutdown::Shutdown;

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
}
