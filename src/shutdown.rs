//! Graceful shutdown: one trigger, observed by every long-running task.
//!
//! On SIGTERM or Ctrl-C the accept loop stops, every connection closes with 1001, the relay finishes the claim
//! pass in progress, and `main` waits (bounded) for all of them before exiting 0.

use tokio::sync::watch;

/// Fires the shutdown. Held by `main`; dropping it also counts as a shutdown.
pub struct ShutdownTrigger(watch::Sender<bool>);

/// A task's view of the shutdown: cheap to clone, one per task.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has been triggered (at once if it already was). Cancel-safe.
    pub async fn triggered(&mut self) {
        // An error means the trigger was dropped, which only happens when main is exiting.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// Resolves on the first SIGTERM or Ctrl-C (SIGINT).
pub async fn os_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
