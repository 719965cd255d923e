//! Supervision: every long-running task of a node (claim, delivery, LISTEN, poll, retention, heartbeat) runs
//! under `supervise`, which restarts it when it ends or panics before shutdown.
//!
//! Why: each of these loops is the only one doing its job on this node. A loop that died silently (a panic on a
//! row nobody foresaw, a bug) used to leave the process up, `/readyz` green and events undelivered. Now the
//! failure is logged with its reason, counted (`nudge_task_restarts_total`), shown by `/readyz` (503 with the
//! reason) until the task runs again, and the task restarts with backoff (100 ms doubling to 5 s), so a task that
//! fails at once every time costs a log line every few seconds, not a busy loop. A task must therefore be
//! restartable: its state lives in the hub and the relay, and it wakes itself up on start.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::db::Backoff;
use crate::health::{Metrics, Readiness};
use crate::shutdown::Shutdown;

/// A task that ran this long before failing gets its backoff reset: it was not failing in a loop.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Run `start()` as a task until shutdown, restarting it whenever it ends or panics before then.
pub async fn supervise<F, Fut>(
    name: &'static str,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    mut shutdown: Shutdown,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::default();
    loop {
        let started = Instant::now();
        let outcome = tokio::spawn(start()).await;
        if shutdown.is_triggered() {
            return;
        }
        let reason = match outcome {
            Ok(()) => "ended".to_owned(),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e.into_panic())),
            Err(e) => format!("was cancelled: {e}"),
        };
        tracing::error!(task = name, "task {reason}; restarting it");
        metrics.task_restarts.fetch_add(1, Ordering::Relaxed);
        readiness.set_task_down(name, reason);
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.triggered() => return,
        }
        readiness.set_task_up(name);
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload.downcast_ref::<&str>().map_or_else(|| "(no message)".to_owned(), |m| (*m).to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_is_restarted_and_readiness_says_why_meanwhile() {
        let readiness = Arc::new(Readiness::default());
        let metrics = Arc::new(Metrics::default());
        let (trigger, shutdown) = crate::shutdown::channel();
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let observer = shutdown.clone();
        let supervisor = tokio::spawn(supervise("claim", readiness.clone(), metrics.clone(), shutdown, move || {
            let (runs, mut shutdown) = (counted.clone(), observer.clone());
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("injected fault");
                }
                shutdown.triggered().await;
            }
        }));
        // The first run panics; until the restart, /readyz names the task and the panic.
        let deadline = Instant::now() + Duration::from_secs(1);
        while metrics.task_restarts.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let reason = readiness.check().expect_err("not ready while the task is down");
        assert!(reason.contains("claim task") && reason.contains("injected fault"), "{reason}");
        // After the backoff it runs again, and readiness no longer names it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert!(!readiness.check().unwrap_err().contains("claim task"));
        trigger.trigger();
        supervisor.await.expect("supervisor ends at shutdown");
    }
}
