//! Worker processes (`--workers K`): the parent re-executes itself K times with a hidden `--worker-index`, and
//! each child runs a `Worker` over its share of the connections, driven by JSON lines:
//!
//! ```text
//! child -> parent   {"ready":{…}}                 connect phase over (counts, start and end on the shared clock)
//! parent -> child   "go"                          producing starts; the child reports progress from now on
//! child -> parent   {"progress":[N,M]}            every 10 ms: event frames read so far, all connections and the
//!                                                 slowest one (the parent's stop test and the writers' window)
//! parent -> child   "wakeup"                      send one wakeup on a live connection (backlog, saturate)
//! parent -> child   {"finish":{"commits":PATH}}   stop; PATH holds the commit times (id, µs) of every event
//! child -> parent   {"summary":{…}}               counts, latency histogram as (µs, count) pairs, stalled outcomes
//! ```
//!
//! Each child joins its own receive log with the commit times, so what crosses the pipe is a few hundred bytes per
//! worker however many frames were received. A child whose stdin closes (the parent died) exits.
//!
//! tokio's process and stdin support need features this crate does not enable, so pipes are read by plain
//! threads that forward into tokio channels.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::stats::CommitTable;
use crate::worker::{Plan, Progress, Ready, Summary, Worker};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToWorker {
    Go,
    Wakeup,
    Finish { commits: Option<PathBuf> },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromWorker {
    Ready(Ready),
    Progress(u64, u64),
    Summary(Box<Summary>),
    Failed(String),
}

/// The parent's side of one worker process.
pub struct RemoteWorker {
    index: usize,
    child: Child,
    stdin: ChildStdin,
    messages: mpsc::UnboundedReceiver<FromWorker>,
    /// As last reported by the child.
    progress: Arc<Progress>,
}

impl RemoteWorker {
    /// Start worker `index` of `count`: this executable with the same arguments plus the hidden worker flags.
    pub fn spawn(index: usize, count: usize) -> Result<RemoteWorker, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
        let mut child = Command::new(exe)
            .args(std::env::args_os().skip(1))
            .arg("--worker-index")
            .arg(index.to_string())
            .arg("--worker-count")
            .arg(count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting worker {index}: {e}"))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(format!("worker {index}: no pipes"));
        };
        let (tx, messages) = mpsc::unbounded_channel();
        let progress = Arc::new(Progress::default());
        let reported = progress.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<FromWorker>(&line) {
                    Ok(FromWorker::Progress(received, slowest)) => {
                        reported.received.store(received, Ordering::Relaxed);
                        reported.slowest.store(slowest, Ordering::Relaxed);
                    }
                    Ok(message) => {
                        if tx.send(message).is_err() {
                            break;
                        }
                    }
                    Err(e) => eprintln!("nudge-bench: worker {index} sent an unreadable line ({e}): {line}"),
                }
            }
            // Dropping the sender tells the parent the worker is gone.
        });
        Ok(RemoteWorker { index, child, stdin, messages, progress })
    }

    pub fn send(&mut self, message: &ToWorker) -> Result<(), String> {
        let line = serde_json::to_string(message).map_err(|e| e.to_string())?;
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| format!("worker {}: {e}", self.index))
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    async fn next(&mut self, waiting_for: &str) -> Result<FromWorker, String> {
        match self.messages.recv().await {
            Some(FromWorker::Failed(e)) => Err(format!("worker {}: {e}", self.index)),
            Some(message) => Ok(message),
            None => Err(format!("worker {} exited before its {waiting_for}", self.index)),
        }
    }

    pub async fn ready(&mut self) -> Result<Ready, String> {
        match self.next("ready").await? {
            FromWorker::Ready(ready) => Ok(ready),
            other => Err(format!("worker {}: expected ready, got {other:?}", self.index)),
        }
    }

    pub async fn summary(&mut self) -> Result<Summary, String> {
        match self.next("summary").await? {
            FromWorker::Summary(summary) => {
                // It exits right after its summary; reap it.
                let _ = self.child.wait();
                Ok(*summary)
            }
            other => Err(format!("worker {}: expected summary, got {other:?}", self.index)),
        }
    }
}

impl Drop for RemoteWorker {
    /// On an early error the parent returns with workers still connected: end them (this process's own
    /// children, by handle) rather than leave thousands of sockets open.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn emit(message: &FromWorker) {
    let Ok(line) = serde_json::to_string(message) else { return };
    // One locked write per line: the progress task and the final summary never interleave within a line.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The child's side: run a worker and answer the parent's commands until `finish`.
pub async fn serve(plan: Plan) -> Result<(), String> {
    let (tx, mut commands) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<ToWorker>(&line) {
                Ok(command) => {
                    if tx.send(command).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("nudge-bench worker: unreadable command ({e}): {line}"),
            }
        }
    });
    let tag = plan.tag.clone();
    let mut worker = match Worker::start(plan).await {
        Ok(worker) => worker,
        Err(e) => {
            emit(&FromWorker::Failed(e.clone()));
            return Err(e);
        }
    };
    emit(&FromWorker::Ready(worker.ready()));
    while let Some(command) = commands.recv().await {
        match command {
            ToWorker::Go => {
                let last = std::cell::Cell::new((u64::MAX, u64::MAX));
                worker.track_progress(move |progress| {
                    let now = (progress.received.load(Ordering::Relaxed), progress.slowest.load(Ordering::Relaxed));
                    if now != last.replace(now) {
                        emit(&FromWorker::Progress(now.0, now.1));
                    }
                });
            }
            ToWorker::Wakeup => {
                if let Err(e) = worker.wakeup().await {
                    eprintln!("{tag}: {e}");
                }
            }
            ToWorker::Finish { commits } => {
                let pairs = match commits {
                    Some(path) => {
                        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                        CommitTable::decode(&bytes)
                    }
                    None => Vec::new(),
                };
                let table = CommitTable::new(&pairs);
                drop(pairs);
                let summary = worker.finish(&table, &[]).await;
                emit(&FromWorker::Summary(Box::new(summary)));
                return Ok(());
            }
        }
    }
    Err("the parent went away (stdin closed)".into())
}
