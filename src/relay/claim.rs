//! The claim loop: one pass at a time claims pending rows and hands the batches to this node's delivery loop,
//! moving between the wake gate's phases (`Phase`: Idle on NOTIFY, Awake claiming in a loop while producers skip
//! their NOTIFY, Settling until no producer that skipped it can be left behind). `Flow` measures how fast
//! producers commit, which decides when being awake pays.
//!
//! The phase machine asks PostgreSQL through [`ClaimStore`] (claim a batch, "producers settled?", the gate's
//! session); [`Postgres`] is the real store, and the unit tests below run the machine on a fake one, under
//! tokio's paused clock.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::Relay;
use crate::config::ClaimCommit;
use crate::db::events::{self, Claimed};
use crate::db::gate::{self, Gate};
use crate::db::{within, Backoff, ConnectError, Database, QueryError};
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

/// What the claim loop asks of PostgreSQL: the seam between the phase machine and the database.
trait ClaimStore {
    /// The wake gate's own session. Dropping it ends the session, which releases `awake`.
    type Gate: GateSession;
    /// Claim up to `limit` pending rows and number them (`events::claim_batch`), under the statement timeout.
    async fn claim(&self, limit: i64, max_age: Duration, tell_others: bool) -> Result<Claimed, QueryError>;
    /// Whether, for an instant, no producer was in flight (`gate::producers_settled`), under the statement
    /// timeout.
    async fn producers_settled(&self) -> Result<bool, QueryError>;
    /// Open the wake gate's session.
    async fn open_gate(&self) -> Result<Self::Gate, ConnectError>;
}

/// `awake` on the gate's session (`db::gate::Gate`). Its statements are not timed by the store: the claim loop
/// bounds them itself (`Relay::on_gate`), because what a silent gate session costs, the session, is the loop's
/// decision, whereas a pool query that times out distrusts the pool (`db::within`).
trait GateSession {
    /// Try to take `awake`; false when another node (or a slow producer) held it past the wait.
    async fn hold_awake(&mut self) -> Result<bool, QueryError>;
    /// Let go of `awake`: producers NOTIFY again.
    async fn release_awake(&mut self) -> Result<(), QueryError>;
}

impl Relay {
    /// Claim whenever woken, until shutdown; see `Phase`. Claims route nothing themselves: each batch goes to
    /// this node's delivery loop, and every other node reads it.
    pub async fn run_claims(&self, shutdown: Shutdown) {
        let store = Postgres {
            pool: &self.pool,
            gate: &self.gate_database,
            statement_timeout: self.statement_timeout,
            commit_async: self.settings.claim_commit == ClaimCommit::Async,
        };
        self.claim_loop(&store, shutdown).await;
    }

    /// The phase machine. Starts settling, not idle: after a restart (supervisor.rs) producers may have skipped
    /// their NOTIFY for a loop that held `awake` when it died, and at a first start it costs one claim pass.
    async fn claim_loop<S: ClaimStore>(&self, store: &S, mut shutdown: Shutdown) {
        let mut phase = Phase::Settling;
        let mut gate: Option<S::Gate> = None;
        let mut flow = Flow::new();
        let mut backoff = Backoff::default();
        loop {
            let next = match phase {
                Phase::Idle => self.idle(store, &mut flow, &mut shutdown).await,
                Phase::Awake => self.awake(store, &mut flow, &mut gate, &mut shutdown).await,
                Phase::Settling => self.settle(store, &mut flow, &mut shutdown).await,
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
    async fn idle(
        &self,
        store: &impl ClaimStore,
        flow: &mut Flow,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Phase>, ClaimError> {
        tokio::select! {
            biased;
            _ = shutdown.triggered() => return Ok(None),
            _ = self.claims.wait() => {}
        }
        flow.record_wakeups(self.claims.requested());
        self.claim_pass(store, Some(flow)).await?;
        Ok(Some(if flow.rate >= self.settings.awake_above { Phase::Awake } else { Phase::Idle }))
    }

    /// Hold `awake` and claim in a loop until nothing came for `LINGER` or the rate fell below
    /// `AWAKE_BELOW_SHARE` of `--awake-above`, then release it and settle. Shutdown drops the gate session, which
    /// releases `awake` too.
    async fn awake<S: ClaimStore>(
        &self,
        store: &S,
        flow: &mut Flow,
        gate: &mut Option<S::Gate>,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Phase>, ClaimError> {
        let session = match gate {
            Some(session) => session,
            None => match store.open_gate().await {
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
            let claimed = self.claim_pass(store, None).await?;
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
    async fn settle(
        &self,
        store: &impl ClaimStore,
        flow: &mut Flow,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Phase>, ClaimError> {
        let mut delay = AWAKE_POLL;
        loop {
            let settled = store.producers_settled().await?;
            // Released: producers NOTIFY again, so count their wake-ups.
            flow.record_wakeups(self.claims.requested());
            self.claim_pass(store, None).await?;
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
    async fn claim_pass(&self, store: &impl ClaimStore, mut idle_flow: Option<&mut Flow>) -> Result<usize, QueryError> {
        self.metrics.claim_passes.fetch_add(1, Ordering::Relaxed);
        let mut total = 0;
        loop {
            let tell_others = self.peers.others_alive();
            let started = Instant::now();
            // This statement serves every wake-up that came before it.
            if let Some(woken_at) = self.claims.take_woken_at() {
                self.metrics.stages.wake_to_claim.record(started.saturating_duration_since(woken_at));
            }
            let mut claimed = store.claim(self.settings.claim_batch, self.settings.max_age, tell_others).await?;
            let committed = Instant::now();
            self.metrics.stages.claim.record(committed - started);
            total += claimed.claimed;
            self.metrics.claimed.fetch_add(claimed.claimed as u64, Ordering::Relaxed);
            self.metrics.expired.fetch_add(claimed.expired as u64, Ordering::Relaxed);
            self.record_ages(&claimed.batch);
            if let Some(last_seq) = claimed.batch.through {
                tracing::debug!(claimed = claimed.claimed, expired = claimed.expired, last_seq, "claimed batch");
                // Committed: route it now if it continues the cursor, else hand it to the delivery loop. Other
                // nodes read it after the NOTIFY.
                claimed.batch.claimed_at = Some(committed);
                self.hand_over(claimed.batch);
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

impl Relay {
    /// `nudge_event_age_at_claim_seconds`: now minus each event's `occurred_at`, PostgreSQL's clock against
    /// this node's (an event from a clock ahead of ours counts as age 0).
    fn record_ages(&self, batch: &events::Batch) {
        let Ok(now) = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) else { return };
        let now = now.as_millis() as i64;
        for event in &batch.events {
            if let Some(at) = event.occurred_at_millis() {
                self.metrics.stages.age_at_claim.record(Duration::from_millis(now.saturating_sub(at).max(0) as u64));
            }
        }
    }
}

/// The real store: claims and "settled?" on the pool (each under `db::within`), the gate on a direct session.
struct Postgres<'a> {
    pool: &'a deadpool_postgres::Pool,
    /// The gate's lock lives in a session-long transaction, so never through PgBouncer: the LISTEN database.
    gate: &'a Database,
    /// `NUDGE_STATEMENT_TIMEOUT`.
    statement_timeout: Duration,
    /// `NUDGE_CLAIM_COMMIT=async`: claims commit without waiting for their WAL flush.
    commit_async: bool,
}

impl ClaimStore for Postgres<'_> {
    type Gate = Gate;

    async fn claim(&self, limit: i64, max_age: Duration, tell_others: bool) -> Result<Claimed, QueryError> {
        let claim = events::claim_batch(self.pool, limit, max_age, tell_others, self.commit_async);
        within(self.pool, self.statement_timeout, claim).await
    }

    async fn producers_settled(&self) -> Result<bool, QueryError> {
        within(self.pool, self.statement_timeout, gate::producers_settled(self.pool)).await
    }

    async fn open_gate(&self) -> Result<Gate, ConnectError> {
        Gate::connect(self.gate).await
    }
}

impl GateSession for Gate {
    async fn hold_awake(&mut self) -> Result<bool, QueryError> {
        Gate::hold_awake(self).await
    }

    async fn release_awake(&mut self) -> Result<(), QueryError> {
        Gate::release_awake(self).await
    }
}

/// The phase machine on a fake store, under tokio's paused clock: time moves only when every task waits, so the
/// windows, `LINGER` and the statement timeout are exact, and no test starts a process or opens a socket.
#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::config::RelaySettings;
    use crate::db::events::{Batch, Event};
    use crate::hub::Hub;
    use crate::shutdown::{self, ShutdownTrigger};

    /// What a claim statement costs on the fake: time must pass between claims, as it does on PostgreSQL.
    const CLAIM_COST: Duration = Duration::from_millis(1);
    const AWAKE_ABOVE: f64 = 1000.0;
    const STATEMENT_TIMEOUT: Duration = Duration::from_secs(2);

    /// What the loop asked of the store, in order.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Call {
        /// A claim, with the rows it got.
        Claim(usize),
        Settled(bool),
        OpenGate,
        Hold,
        Release,
        /// The gate session was dropped (which releases `awake` on PostgreSQL).
        GateDropped,
    }

    /// How a gate statement answers.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Yes,
        /// `hold_awake` only: the wait for `awake` ran out.
        Busy,
        Fails,
        /// Never answers: a session gone silent.
        Silent,
    }

    type Log = Arc<Mutex<Vec<(Duration, Call)>>>;

    struct Fake {
        start: Instant,
        log: Log,
        /// Rows the n-th claim finds, given the time it starts at.
        rows: fn(usize, Duration) -> usize,
        /// The n-th answer to "producers settled?".
        settled: fn(usize) -> bool,
        connects: bool,
        hold: Answer,
        release: Answer,
        next_seq: Mutex<i64>,
    }

    impl Fake {
        fn new(rows: fn(usize, Duration) -> usize) -> Fake {
            Fake {
                start: Instant::now(),
                log: Log::default(),
                rows,
                settled: |_| true,
                connects: true,
                hold: Answer::Yes,
                release: Answer::Yes,
                next_seq: Mutex::new(1),
            }
        }

        fn calls(&self) -> Vec<Call> {
            self.log.lock().unwrap().iter().map(|(_, call)| *call).collect()
        }

        fn count(&self, wanted: fn(&Call) -> bool) -> usize {
            self.calls().iter().filter(|call| wanted(call)).count()
        }
    }

    fn record(log: &Log, start: Instant, call: Call) {
        log.lock().unwrap().push((start.elapsed(), call));
    }

    async fn answer<T>(answer: Answer, yes: T, busy: T) -> Result<T, QueryError> {
        match answer {
            Answer::Yes => Ok(yes),
            Answer::Busy => Ok(busy),
            Answer::Fails => Err(QueryError::Pool(deadpool_postgres::PoolError::Closed)),
            Answer::Silent => std::future::pending().await,
        }
    }

    impl ClaimStore for Fake {
        type Gate = FakeGate;

        async fn claim(&self, limit: i64, _: Duration, _: bool) -> Result<Claimed, QueryError> {
            let n = self.count(|call| matches!(call, Call::Claim(_)));
            let rows = (self.rows)(n, self.start.elapsed()).min(limit as usize);
            tokio::time::sleep(CLAIM_COST).await;
            record(&self.log, self.start, Call::Claim(rows));
            let mut next = self.next_seq.lock().unwrap();
            let events: Vec<Event> = (*next..*next + rows as i64).map(event).collect();
            *next += rows as i64;
            let through = events.last().map(|e| e.seq);
            Ok(Claimed { claimed: rows, expired: 0, batch: Batch { events, through, rejected: 0, claimed_at: None } })
        }

        async fn producers_settled(&self) -> Result<bool, QueryError> {
            let settled = (self.settled)(self.count(|call| matches!(call, Call::Settled(_))));
            record(&self.log, self.start, Call::Settled(settled));
            Ok(settled)
        }

        async fn open_gate(&self) -> Result<FakeGate, ConnectError> {
            record(&self.log, self.start, Call::OpenGate);
            if !self.connects {
                return Err(ConnectError::Timeout(Duration::from_secs(5)));
            }
            Ok(FakeGate { log: self.log.clone(), start: self.start, hold: self.hold, release: self.release })
        }
    }

    struct FakeGate {
        log: Log,
        start: Instant,
        hold: Answer,
        release: Answer,
    }

    impl GateSession for FakeGate {
        async fn hold_awake(&mut self) -> Result<bool, QueryError> {
            record(&self.log, self.start, Call::Hold);
            answer(self.hold, true, false).await
        }

        async fn release_awake(&mut self) -> Result<(), QueryError> {
            record(&self.log, self.start, Call::Release);
            answer(self.release, (), ()).await
        }
    }

    impl Drop for FakeGate {
        fn drop(&mut self) {
            record(&self.log, self.start, Call::GateDropped);
        }
    }

    fn event(seq: i64) -> Event {
        Event::sample(seq, "t", None)
    }

    /// A relay whose database is never reached: the store is the fake, and the pool never opens a session.
    fn relay(claim_batch: i64) -> Relay {
        let database: Database = "postgres://nudge@127.0.0.1:9/nudge".parse().unwrap();
        Relay {
            pool: crate::db::pool(&database, 1).unwrap(),
            hub: Arc::new(Hub::new()),
            claims: Default::default(),
            deliveries: Default::default(),
            peers: Default::default(),
            gate_database: database,
            fresh: Default::default(),
            routing: Default::default(),
            metrics: Default::default(),
            readiness: Default::default(),
            settings: RelaySettings {
                poll_interval: Duration::from_secs(3600),
                claim_batch,
                claim_commit: ClaimCommit::Durable,
                awake_above: AWAKE_ABOVE,
                retention: Duration::from_secs(3600),
                max_age: Duration::from_secs(3600),
            },
            statement_timeout: STATEMENT_TIMEOUT,
            node_id: "test".into(),
        }
    }

    /// A shutdown that stays untriggered as long as the trigger lives (dropping it would shut down).
    fn running() -> (ShutdownTrigger, Shutdown) {
        shutdown::channel()
    }

    fn flow_at(rate: f64) -> Flow {
        Flow { rate, ..Flow::new() }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_stays_idle_while_producers_commit_below_awake_above() {
        let relay = relay(100);
        let store = Fake::new(|_, _| 1);
        let (_trigger, mut shutdown) = running();
        let mut flow = Flow::new();
        let start = Instant::now();
        // 50 transactions a second for two seconds, each NOTIFYing.
        for i in 1..=100 {
            tokio::time::sleep_until(start + Duration::from_millis(20) * i).await;
            relay.claims.wake();
            let next = relay.idle(&store, &mut flow, &mut shutdown).await.unwrap();
            assert_eq!(next, Some(Phase::Idle), "pass {i} at {:.0}/s", flow.rate);
        }
        assert!((40.0..60.0).contains(&flow.rate), "the rate was measured: {}", flow.rate);
        assert_eq!(store.count(|call| matches!(call, Call::OpenGate)), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_goes_awake_once_producers_commit_faster_than_awake_above_for_two_windows() {
        let relay = relay(100);
        let store = Fake::new(|_, _| 1);
        let (_trigger, mut shutdown) = running();
        let mut flow = Flow::new();
        let start = Instant::now();
        // 1,500 transactions a second: 15 NOTIFYs every 10 ms.
        let mut awake_at = None;
        for i in 1..=50 {
            tokio::time::sleep_until(start + Duration::from_millis(10) * i).await;
            for _ in 0..15 {
                relay.claims.wake();
            }
            if relay.idle(&store, &mut flow, &mut shutdown).await.unwrap() == Some(Phase::Awake) {
                awake_at = Some(start.elapsed());
                break;
            }
        }
        let awake_at = awake_at.expect("never went awake at 1,500/s");
        // The first window alone (smoothed with the rate before it, 0) reads 750/s: one window is not enough.
        assert!(awake_at >= 2 * RATE_WINDOW && awake_at < 3 * RATE_WINDOW, "awake after {awake_at:?}");
        assert!(flow.rate >= AWAKE_ABOVE);
    }

    #[tokio::test(start_paused = true)]
    async fn awake_settles_after_nothing_came_for_linger() {
        let relay = relay(100);
        // Rows keep coming for 30 ms, then stop.
        let store = Fake::new(|_, at| usize::from(at < Duration::from_millis(30)));
        let (_trigger, mut shutdown) = running();
        let (mut flow, mut gate) = (flow_at(5000.0), None);
        let start = Instant::now();
        let next = relay.awake(&store, &mut flow, &mut gate, &mut shutdown).await.unwrap();
        assert_eq!(next, Some(Phase::Settling));
        let took = start.elapsed();
        let last_rows = Duration::from_millis(30);
        assert!(took >= last_rows + LINGER && took <= last_rows + LINGER + 3 * CLAIM_COST, "settled after {took:?}");
        assert_eq!(store.calls().first(), Some(&Call::OpenGate));
        assert_eq!(store.calls()[1], Call::Hold);
        assert_eq!(store.calls().last(), Some(&Call::Release));
        assert!(gate.is_some(), "the session stays open for the next awake period");
        assert_eq!(relay.metrics.awake_periods.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn awake_settles_when_the_rate_falls_below_its_share_of_awake_above() {
        let relay = relay(100);
        // A row every other claim: about 330 rows a second, never quiet for LINGER.
        let store = Fake::new(|n, _| usize::from(n % 2 == 0));
        let (_trigger, mut shutdown) = running();
        let (mut flow, mut gate) = (flow_at(AWAKE_ABOVE), None);
        let start = Instant::now();
        let awake = relay.awake(&store, &mut flow, &mut gate, &mut shutdown);
        let next = tokio::time::timeout(Duration::from_secs(10), awake).await.expect("stayed awake").unwrap();
        assert_eq!(next, Some(Phase::Settling));
        // Ended by the first window that closed (mean of 1,000 and ~330 < 800), not by LINGER.
        let took = start.elapsed();
        assert!(took >= RATE_WINDOW && took < RATE_WINDOW + 5 * CLAIM_COST, "settled after {took:?}");
        assert!(flow.rate < AWAKE_ABOVE * AWAKE_BELOW_SHARE);
        assert_eq!(store.calls().last(), Some(&Call::Release));
    }

    #[tokio::test(start_paused = true)]
    async fn awake_settles_without_claiming_when_awake_is_taken() {
        let relay = relay(100);
        let mut store = Fake::new(|_, _| 1);
        store.hold = Answer::Busy;
        let (_trigger, mut shutdown) = running();
        let (mut flow, mut gate) = (flow_at(5000.0), None);
        let next = relay.awake(&store, &mut flow, &mut gate, &mut shutdown).await.unwrap();
        // Producers may have skipped their NOTIFY while we asked: settle, not idle.
        assert_eq!(next, Some(Phase::Settling));
        assert_eq!(store.calls(), [Call::OpenGate, Call::Hold]);
        assert_eq!(relay.metrics.awake_periods.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn settling_ends_only_after_producers_settled_and_one_more_claim() {
        let relay = relay(100);
        let mut store = Fake::new(|_, _| 0);
        store.settled = |n| n >= 2;
        let (_trigger, mut shutdown) = running();
        let mut flow = Flow::new();
        let next = relay.settle(&store, &mut flow, &mut shutdown).await.unwrap();
        assert_eq!(next, Some(Phase::Idle));
        use Call::*;
        assert_eq!(store.calls(), [Settled(false), Claim(0), Settled(false), Claim(0), Settled(true), Claim(0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gate_that_cannot_connect_leaves_the_loop_on_notify() {
        let relay = relay(100);
        let mut store = Fake::new(|_, _| 1);
        store.connects = false;
        let (_trigger, mut shutdown) = running();
        let (mut flow, mut gate) = (flow_at(5000.0), None);
        let next = relay.awake(&store, &mut flow, &mut gate, &mut shutdown).await.unwrap();
        // Nothing was asked of producers, so there is nothing to settle: straight back to idle.
        assert_eq!(next, Some(Phase::Idle));
        assert_eq!(store.calls(), [Call::OpenGate]);
        assert!(gate.is_none());
    }

    /// Runs the whole loop with producers committing at 200/s (`awake_above` lowered to 100/s, so the loop goes
    /// awake) for `run`, then shuts it down; returns the fake's log.
    async fn run_loop(store: Fake, run: Duration) -> Vec<(Duration, Call)> {
        let mut relay = relay(100);
        relay.settings.awake_above = 100.0;
        let (trigger, shutdown) = running();
        let producers = async {
            let start = Instant::now();
            while start.elapsed() < run {
                relay.claims.wake();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            trigger.trigger();
        };
        tokio::join!(relay.claim_loop(&store, shutdown), producers);
        let log = store.log.lock().unwrap().clone();
        log
    }

    /// What the loop did right after the gate session went: it must drop the session first, then settle (ask
    /// "settled?" before any other claim), never carry on idle or reopen the gate.
    fn after_gate_failure(log: &[(Duration, Call)]) -> (Duration, Vec<Call>) {
        let dropped = log.iter().position(|(_, call)| *call == Call::GateDropped).expect("the session was not dropped");
        (log[dropped].0, log[dropped..].iter().take(3).map(|(_, call)| *call).collect())
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_gate_statement_drops_the_session_and_settles() {
        let mut store = Fake::new(|_, _| 0);
        store.hold = Answer::Fails;
        let log = run_loop(store, Duration::from_secs(1)).await;
        let hold = log.iter().position(|(_, call)| *call == Call::Hold).expect("never went awake");
        let (_, next) = after_gate_failure(&log);
        assert_eq!(log[hold + 1].1, Call::GateDropped);
        assert_eq!(next, [Call::GateDropped, Call::Settled(true), Call::Claim(0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_gate_session_times_out_drops_the_session_and_settles() {
        let mut store = Fake::new(|_, _| 0);
        store.release = Answer::Silent;
        let log = run_loop(store, Duration::from_secs(4)).await;
        let (released, _) = *log.iter().find(|(_, call)| *call == Call::Release).expect("never released");
        let (dropped, next) = after_gate_failure(&log);
        assert_eq!(dropped - released, STATEMENT_TIMEOUT, "dropped when the statement timeout ran out");
        assert_eq!(next, [Call::GateDropped, Call::Settled(true), Call::Claim(0)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pass_of_full_batches_ends_once_the_rate_calls_for_awake() {
        let relay = relay(10);
        // Every batch comes back full: without measuring, the pass would never end.
        let store = Fake::new(|_, _| 10);
        let (_trigger, mut shutdown) = running();
        let mut flow = Flow::new();
        let start = Instant::now();
        relay.claims.wake();
        // Producers at 2,000 transactions a second, each NOTIFYing.
        let producers = async {
            loop {
                relay.claims.wake();
                relay.claims.wake();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let pass = tokio::time::timeout(Duration::from_secs(10), relay.idle(&store, &mut flow, &mut shutdown));
        let next = tokio::select! {
            next = pass => next.expect("the pass never ended").unwrap(),
            _ = producers => unreachable!(),
        };
        assert_eq!(next, Some(Phase::Awake));
        assert!(start.elapsed() < 3 * RATE_WINDOW, "ended after {:?}", start.elapsed());
        assert_eq!(relay.metrics.claim_passes.load(Ordering::Relaxed), 1, "one pass, ended early");
    }

    #[tokio::test(start_paused = true)]
    async fn every_claimed_batch_goes_to_delivery_in_claim_order() {
        let relay = relay(10);
        // Two passes: full, full, short; then full, short.
        let store = Fake::new(|n, _| [10, 10, 4, 10, 7].get(n).copied().unwrap_or(0));
        assert_eq!(relay.claim_pass(&store, None).await.unwrap(), 24);
        assert_eq!(relay.claim_pass(&store, None).await.unwrap(), 17);
        let fresh = relay.fresh.lock().unwrap();
        let throughs: Vec<_> = fresh.iter().map(|batch| batch.through).collect();
        assert_eq!(throughs, [Some(10), Some(20), Some(24), Some(34), Some(41)]);
        let seqs: Vec<i64> = fresh.iter().flat_map(|batch| batch.events.iter().map(|e| e.seq)).collect();
        assert_eq!(seqs, (1..=41).collect::<Vec<_>>(), "every event, once, in seq order");
        assert_eq!(relay.deliveries.claimed_through(), 41, "delivery was told how far claims went");
    }

    /// Frames queued to `outbox`, by seq.
    fn queued_seqs(outbox: &crate::outbox::Outbox) -> Vec<i64> {
        let mut frames = Vec::new();
        outbox.pop_many(&mut frames, usize::MAX);
        frames.iter().map(|frame| frame.seq).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_continues_the_cursor_is_routed_by_the_claim_task_itself() {
        let relay = relay(10);
        relay.hub.start_at(0);
        let (id, outbox) = relay.hub.register(&"u".into(), 100);
        relay.hub.subscribe(id, "t");
        let store = Fake::new(|n, _| [10, 10, 4].get(n).copied().unwrap_or(0));
        assert_eq!(relay.claim_pass(&store, None).await.unwrap(), 24);
        assert!(relay.fresh.lock().unwrap().is_empty(), "nothing left for the delivery loop");
        assert_eq!(queued_seqs(&outbox), (1..=24).collect::<Vec<_>>());
        assert_eq!(relay.hub.cursor(), 24);
        assert_eq!(relay.deliveries.claimed_through(), 24);
        let metrics = relay.metrics.render(1, 0);
        assert!(metrics.contains("nudge_claim_to_routed_seconds_count 3"), "{metrics}");
        assert!(metrics.contains("nudge_event_age_at_claim_seconds_count 24"), "{metrics}");
    }

    #[tokio::test(start_paused = true)]
    async fn rows_read_back_skip_what_the_claim_task_routed_meanwhile() {
        let relay = relay(10);
        relay.hub.start_at(0);
        let (id, outbox) = relay.hub.register(&"u".into(), 100);
        relay.hub.subscribe(id, "t");
        // The delivery loop read (0, 15] while the claim task routed its own batch of 1..=10.
        let read = Batch { events: (1..=15).map(event).collect(), through: Some(15), rejected: 0, claimed_at: None };
        let store = Fake::new(|n, _| [10].get(n).copied().unwrap_or(0));
        relay.claim_pass(&store, None).await.unwrap();
        relay.route_past_cursor(&read);
        assert_eq!(queued_seqs(&outbox), (1..=15).collect::<Vec<_>>(), "each seq once, in order");
        relay.route_past_cursor(&read);
        assert!(queued_seqs(&outbox).is_empty(), "a read wholly behind the cursor routes nothing");
        assert_eq!(relay.hub.cursor(), 15);
    }
}
