//! What operators see: readiness (`/readyz`) and counters (`/metrics`).
//!
//! Readiness is three facts kept by the tasks that know them: the schema is current (startup), the LISTEN
//! connection is up (`db::listen`), and the pool answers (checked live by `/readyz`).

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Readiness {
    schema_ready: AtomicBool,
    listen_up: AtomicBool,
    /// The latest reason the database is not usable, for `/readyz`'s 503 body.
    last_error: Mutex<Option<String>>,
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

    /// `Ok` when the schema is current and LISTEN is up; otherwise why not.
    pub fn check(&self) -> Result<(), String> {
        let error = self.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let detail = error.map(|e| format!(": {e}")).unwrap_or_default();
        if !self.schema_ready.load(Ordering::SeqCst) {
            return Err(format!("database schema not ready{detail}"));
        }
        if !self.listen_up.load(Ordering::SeqCst) {
            return Err(format!("LISTEN connection is down{detail}"));
        }
        Ok(())
    }
}

/// Counters since start. Relaxed atomics: they are statistics, not synchronization.
#[derive(Default)]
pub struct Metrics {
    pub claim_passes: AtomicU64,
    /// Times this node held the wake gate's `awake` lock (producers skipped NOTIFY meanwhile).
    pub awake_periods: AtomicU64,
    pub claimed: AtomicU64,
    pub expired: AtomicU64,
    pub delivered: AtomicU64,
    pub overflowed: AtomicU64,
    pub deleted: AtomicU64,
    pub connections_opened: AtomicU64,
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
            "Connections closed because their queue overflowed.",
            get(&self.overflowed),
        );
        counter("nudge_events_deleted_total", "Processed events deleted by retention.", get(&self.deleted));
        counter("nudge_connections_opened_total", "Authenticated connections opened.", get(&self.connections_opened));
        let _ = writeln!(
            out,
            "# HELP nudge_connections Authenticated connections open now.\n# TYPE nudge_connections gauge\nnudge_connections {connections}"
        );
        out
    }
}
