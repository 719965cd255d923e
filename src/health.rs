//! What operators see: readiness (`/readyz`) and counters (`/metrics`).
//!
//! Readiness is four facts kept by the tasks that know them: the schema is current (startup), the LISTEN
//! connection is up (`db::listen`), no long-running task is down (`node::supervise`), and the pool answers
//! (checked live by `/readyz`); with `NUDGE_JWKS_URL`, a fifth: the issuer's keys were fetched once (`jwks.rs`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Readiness {
    schema_ready: AtomicBool,
    listen_up: AtomicBool,
    /// The latest reason the database is not usable, for `/readyz`'s 503 body.
    last_error: Mutex<Option<String>>,
    /// Long-running tasks that ended or panicked and wait for their restart, with why.
    tasks_down: Mutex<BTreeMap<&'static str, String>>,
    /// Set while tokens cannot be verified because the issuer's key set was never fetched (`jwks.rs`).
    jwks_missing: Mutex<Option<String>>,
}

impl Readiness {
    pub fn set_schema_ready(&self) {
        self.schema_ready.store(true, Ordering::SeqCst);
        self.clear_error();
    }

    pub fn set_listen(&self, up: bool) {
        self.listen_up.store(up, Ordering::SeqCst);
    }

    pub fn set_error(&self, reason: impl Into<String>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.into());
    }

    pub fn clear_error(&self) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// A supervised task stopped (`reason`) and is about to be restarted.
    pub fn set_task_down(&self, task: &'static str, reason: String) {
        self.tasks_down.lock().unwrap_or_else(|e| e.into_inner()).insert(task, reason);
    }

    pub fn set_task_up(&self, task: &'static str) {
        self.tasks_down.lock().unwrap_or_else(|e| e.into_inner()).remove(task);
    }

    /// `Some(why)` until the JWKS has been fetched once; cached keys keep serving when later fetches fail.
    pub fn set_jwks(&self, missing: Option<String>) {
        *self.jwks_missing.lock().unwrap_or_else(|e| e.into_inner()) = missing;
    }

    /// `Ok` when the schema is current, LISTEN is up, every task runs and (with `NUDGE_JWKS_URL`) the issuer's
    /// keys were fetched; otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        if let Some((task, reason)) = self.tasks_down.lock().unwrap_or_else(|e| e.into_inner()).iter().next() {
            return Err(format!("{task} task restarting after it {reason}"));
        }
        let error = self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let detail = error.map(|e| format!(": {e}")).unwrap_or_default();
        if !self.schema_ready.load(Ordering::SeqCst) {
            return Err(format!("database schema not ready{detail}"));
        }
        if !self.listen_up.load(Ordering::SeqCst) {
            return Err(format!("LISTEN connection is down{detail}"));
        }
        if let Some(missing) = self.jwks_missing.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(missing);
        }
        Ok(())
    }
}

/// Upper bounds of `nudge_claim_duration_seconds`' buckets: from a fast claim on an idle database (sub-millisecond)
/// to a 1,000-row claim on a busy one.
const CLAIM_BUCKETS: &[f64] = &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// Upper bounds for the stages of the delivery path: each is tens of microseconds when all is well, so the
/// buckets start there; seconds mean something is wrong.
const STAGE_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
/// Upper bounds for the age of events at claim: milliseconds when nudge keeps up, up to minutes of backlog.
const AGE_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// The most buckets any histogram here has (the last slot counts "above the last bound").
const MAX_BUCKETS: usize = 17;

/// A fixed-bucket Prometheus histogram, lock-free: recording is a scan of at most 16 bounds and two relaxed
/// atomic adds, cheap enough for every claimed batch and every socket write.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    /// Per bucket, not cumulative (the rendering accumulates); slot `bounds.len()` is "above the last bound".
    counts: [AtomicU64; MAX_BUCKETS],
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Self {
        assert!(bounds.len() < MAX_BUCKETS);
        Histogram {
            name,
            help,
            bounds,
            counts: [const { AtomicU64::new(0) }; MAX_BUCKETS],
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn record(&self, took: Duration) {
        self.record_n(took, 1);
    }

    /// Record `n` observations of the same value (a batch of events claimed at one instant).
    pub fn record_n(&self, took: Duration, n: u64) {
        let seconds = took.as_secs_f64();
        let bucket = self.bounds.iter().position(|&le| seconds <= le).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(n, Ordering::Relaxed);
        self.sum_micros.fetch_add((took.as_micros() as u64).saturating_mul(n), Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let Histogram { name, help, .. } = self;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, count) in self.counts[..=self.bounds.len()].iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(le) => _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}"),
                None => _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}"),
            }
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Where the time of one event's path goes, stage by stage (docs/operations.md, "Metrics"): the wake-up to the
/// claim starting, the claim statement, the claim's commit to the frames queued, the frames queued to written.
/// Each is measured on this node's own clock; the event's age at claim also uses PostgreSQL's (`occurred_at`).
pub struct Stages {
    pub wake_to_claim: Histogram,
    pub claim: Histogram,
    pub claim_to_routed: Histogram,
    pub routed_to_written: Histogram,
    pub age_at_claim: Histogram,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            wake_to_claim: Histogram::new(
                "nudge_wake_to_claim_seconds",
                "From a wake-up (NOTIFY nudge, a client's wakeup, the poll) to its claim statement being sent.",
                STAGE_BUCKETS,
            ),
            claim: Histogram::new(
                "nudge_claim_duration_seconds",
                "Claim statements, from sending to the last row (one round trip).",
                CLAIM_BUCKETS,
            ),
            claim_to_routed: Histogram::new(
                "nudge_claim_to_routed_seconds",
                "From a claim statement's last row (committed) to its events queued to this node's connections; batches this node claimed.",
                STAGE_BUCKETS,
            ),
            routed_to_written: Histogram::new(
                "nudge_routed_to_written_seconds",
                "From an event frame queued to a connection to its write to the socket returning; the oldest frame of each write.",
                STAGE_BUCKETS,
            ),
            age_at_claim: Histogram::new(
                "nudge_event_age_at_claim_seconds",
                "Events' age when claimed: the claim's time minus occurred_at (PostgreSQL's clock; 0 if ahead of nudge's).",
                AGE_BUCKETS,
            ),
        }
    }
}

/// Counters since start. Relaxed atomics: they are statistics, not synchronization.
#[derive(Default)]
pub struct Metrics {
    pub stages: Stages,
    pub claim_passes: AtomicU64,
    /// Times this node held the wake gate's `awake` lock (producers skipped NOTIFY meanwhile).
    pub awake_periods: AtomicU64,
    pub claimed: AtomicU64,
    pub expired: AtomicU64,
    pub delivered: AtomicU64,
    /// Times a connection's queue overflowed and it switched to catching up from the table.
    pub fell_behind: AtomicU64,
    /// Connections closed with 1013: their socket accepted nothing for `NUDGE_WRITE_TIMEOUT`, or a catch-up
    /// found its events already deleted.
    pub slow_consumers: AtomicU64,
    /// Claimed rows that could not be decoded (skipped, with a WARN naming the id).
    pub rejected: AtomicU64,
    pub deleted: AtomicU64,
    pub connections_opened: AtomicU64,
    /// Presence flushes written (two statements each).
    pub presence_writes: AtomicU64,
    /// Supervised tasks restarted after they ended or panicked.
    pub task_restarts: AtomicU64,
    /// Claimed events this node has not routed yet (cluster's last seq minus its cursor), as of the last
    /// heartbeat.
    pub lag_events: AtomicI64,
    /// How long ago the oldest of those was claimed, in milliseconds, as of the last heartbeat.
    pub lag_millis: AtomicI64,
}

impl Metrics {
    /// Prometheus text exposition format.
    pub fn render(&self, connections: usize, wakeups: u64) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counter("nudge_wakeups_total", "Wake-ups requested (NOTIFY, client wakeup, poll).", wakeups);
        counter("nudge_claim_passes_total", "Claim passes run.", get(&self.claim_passes));
        counter(
            "nudge_awake_periods_total",
            "Times this node claimed in a loop while producers skipped their NOTIFY.",
            get(&self.awake_periods),
        );
        counter("nudge_events_claimed_total", "Events claimed and marked processed.", get(&self.claimed));
        counter(
            "nudge_events_expired_total",
            "Claimed events older than the max age, not delivered.",
            get(&self.expired),
        );
        counter("nudge_deliveries_total", "Event frames queued to connections.", get(&self.delivered));
        counter(
            "nudge_slow_consumers_total",
            "Connections closed with 1013: their socket accepted nothing for NUDGE_WRITE_TIMEOUT.",
            get(&self.slow_consumers),
        );
        counter(
            "nudge_connections_behind_total",
            "Times a connection's queue overflowed and it caught up from the table instead of taking live frames.",
            get(&self.fell_behind),
        );
        counter(
            "nudge_events_rejected_total",
            "Claimed events that could not be decoded and were skipped (each logged with its id).",
            get(&self.rejected),
        );
        counter("nudge_events_deleted_total", "Processed events deleted by retention.", get(&self.deleted));
        counter("nudge_connections_opened_total", "Authenticated connections opened.", get(&self.connections_opened));
        counter(
            "nudge_presence_writes_total",
            "Presence flushes written to nudge.presence_users/presence_topics (two statements each).",
            get(&self.presence_writes),
        );
        counter(
            "nudge_task_restarts_total",
            "Long-running tasks (claim, delivery, LISTEN, poll, retention, heartbeat) restarted after they ended or panicked.",
            get(&self.task_restarts),
        );
        let mut gauge = |name: &str, help: &str, value: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        };
        gauge(
            "nudge_delivery_lag_events",
            "Claimed events this node has not routed yet (cluster's last seq minus its cursor), every heartbeat.",
            self.lag_events.load(Ordering::Relaxed) as f64,
        );
        gauge(
            "nudge_delivery_lag_seconds",
            "How long ago the oldest event this node has not routed yet was claimed, every heartbeat.",
            self.lag_millis.load(Ordering::Relaxed) as f64 / 1000.0,
        );
        let Stages { wake_to_claim, claim, claim_to_routed, routed_to_written, age_at_claim } = &self.stages;
        for histogram in [wake_to_claim, claim, claim_to_routed, routed_to_written, age_at_claim] {
            histogram.render(&mut out);
        }
        let _ = writeln!(
            out,
            "# HELP nudge_connections Authenticated connections open now.\n# TYPE nudge_connections gauge\nnudge_connections {connections}"
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_durations_render_as_a_cumulative_prometheus_histogram() {
        let durations = Stages::default().claim;
        durations.record(Duration::from_micros(300));
        durations.record(Duration::from_millis(3));
        durations.record(Duration::from_secs(2));
        let mut out = String::new();
        durations.render(&mut out);
        for line in [
            "nudge_claim_duration_seconds_bucket{le=\"0.0005\"} 1",
            "nudge_claim_duration_seconds_bucket{le=\"0.002\"} 1",
            "nudge_claim_duration_seconds_bucket{le=\"0.005\"} 2",
            "nudge_claim_duration_seconds_bucket{le=\"1\"} 2",
            "nudge_claim_duration_seconds_bucket{le=\"+Inf\"} 3",
            "nudge_claim_duration_seconds_sum 2.0033",
            "nudge_claim_duration_seconds_count 3",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
        }
    }

    #[test]
    fn every_stage_renders_and_a_batch_counts_once_per_event() {
        let metrics = Metrics::default();
        metrics.stages.age_at_claim.record_n(Duration::from_millis(7), 5);
        let out = metrics.render(0, 0);
        for line in [
            "nudge_event_age_at_claim_seconds_bucket{le=\"0.005\"} 0",
            "nudge_event_age_at_claim_seconds_bucket{le=\"0.01\"} 5",
            "nudge_event_age_at_claim_seconds_sum 0.035",
            "nudge_event_age_at_claim_seconds_count 5",
            "nudge_wake_to_claim_seconds_count 0",
            "nudge_claim_to_routed_seconds_count 0",
            "nudge_routed_to_written_seconds_count 0",
            "nudge_claim_duration_seconds_count 0",
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line:?} in:\n{out}");
        }
    }
}
