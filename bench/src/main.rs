//! nudge-bench: a load generator that measures nudge from the outside, as its users see it.
//!
//! It opens N authenticated WebSocket connections (spread over one or more nudge nodes, several source addresses
//! and several generator processes), subscribes them, produces events through PostgreSQL exactly as a backend
//! would, and measures on the client side: handshakes per second, deliveries per second, latency and its
//! distribution, and lost and duplicated events (which must be zero). With `--server-pid` it also reports the
//! server processes' RSS and CPU time from /proc. One JSON object on stdout; progress on stderr.
//!
//! Lost means never delivered: after producing it waits while deliveries go on, until `--grace` passes without
//! one. `--window` closes the loop for saturation runs: producers wait for the slowest reader, so a server is
//! measured at its throughput rather than at its slow-consumer policy.
//!
//! Modes (docs/performance.md names the targets):
//! - `targeted`: event K goes to user u{K mod N}; latency from the producer's COMMIT returning to the receive.
//! - `topic`: every connection subscribes topic `bench`; every event goes to all of them.
//! - `wakeup` (P9, P17): rows are written with the trigger off, then the recipient's connection sends `wakeup`;
//!   latency from the wakeup sent to the event received. With `--pause` a closed loop (P17's lone client): each
//!   wakeup waits for its event, then the pause, for `--count` events.
//! - `backlog` (P7): `--backlog` rows in one transaction with the trigger off, then one `wakeup`; deliveries per
//!   second and latency from that COMMIT until every row has arrived.
//! - `produce` (P8): writers INSERT into `--table` and nothing else; the producer's ceiling.
//! - `saturate` (P5): against `nudge-ceiling`: one `wakeup`, then count the broadcast frames per connection.
//! - `floor`: no server. The NOTIFY round trip (a producer's COMMIT → the notification on a LISTEN session) and
//!   one `nudge.claim()` of that row on the open LISTEN session, `--count` samples (floor.rs): the physical limit
//!   every latency is compared with.
//! - `history` (P14): fill an empty `nudge.events` with `--history` delivered events spread over many users and
//!   topics, before nudge starts (storm.rs); nothing else.
//! - `storm` (P14): one live client receives targeted events at `--rate` while, in each of `--storm-rounds`
//!   rounds, `--duration` of calm is followed by `--storm` clients that connect, subscribe and `resume` from 0 at
//!   once over that history. The live client's latency is reported for the calm and the storm phases apart, by
//!   commit time: a storm phase lasts from the first connect until the last client has its `resumed` and has
//!   closed; the half second after it counts for neither.
//!
//! `--active K` (P16's idle crowd): targeted events go to the first K users only; the other connections stay
//! connected, authenticated and idle. `--drain-max` bounds the wait for a backlog after producing (P18's ingest
//! runs report what was delivered while producing and the backlog left when the producers stopped).
//!
//! `--slow-readers K` (P13) makes K connections read one event frame, then wait 1 / `--slow-rate`: clients that
//! fall behind without stopping. They are counted apart (`slow_readers`); after producing they read at full speed
//! until every event has arrived or `--grace` passes without one.
//!
//! `--workers K` splits the connections over K processes of this same executable (remote.rs): one process runs
//! out of file descriptors (and one source address out of ephemeral ports) long before nudge does.

mod floor;
mod produce;
mod remote;
mod stats;
mod storm;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde_json::json;

use crate::produce::{event_data, insert_backlog, produce, Window, Writers};
use crate::remote::{RemoteWorker, ToWorker};
use crate::stats::{
    log_buckets_ms, new_histogram, now_us, percentile_ms, raise_nofile_limit, server_cpu, server_rss_kib, CommitTable,
};
use crate::worker::{Plan, Progress, Ready, Summary, Worker};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Each event has one recipient (`recipients = ARRAY['uK']`): one delivery per event.
    Targeted,
    /// Each event goes to topic `bench`, which every connection subscribes to: N deliveries per event.
    Topic,
    /// Rows written without the NOTIFY trigger, each followed by a `wakeup` on the recipient's connection.
    Wakeup,
    /// `--backlog` rows in one transaction (trigger off), then one `wakeup`: how fast nudge drains them.
    Backlog,
    /// INSERTs into `--table` only (no WebSocket measurement): the producer's cost.
    Produce,
    /// Against the socket-ceiling server: one `wakeup`, then count its broadcast per connection.
    Saturate,
    /// Fill an empty nudge.events with `--history` delivered events (before nudge starts), then exit.
    History,
    /// A live client at `--rate` targeted events/s; rounds of calm and of `--storm` clients resuming from 0.
    Storm,
    /// No server: the NOTIFY round trip plus one claim statement, `--count` samples (the floor).
    Floor,
}

#[derive(Debug, Parser)]
#[command(name = "nudge-bench", about = "Load generator for nudge: connections, events, latency, losses.")]
pub struct Args {
    /// WebSocket URL (ws://) of a node; repeat for several nodes (connections are spread round-robin).
    #[arg(long = "url")]
    urls: Vec<String>,
    /// The database the nodes use; events are INSERTed here. Not needed in saturate mode.
    #[arg(long, env = "NUDGE_DATABASE_URL")]
    database_url: Option<String>,
    /// HS256 secret the nodes verify tokens with. Not needed in saturate mode.
    #[arg(long, env = "NUDGE_JWT_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// WebSocket connections over all workers (0 is allowed in produce mode).
    #[arg(long, default_value_t = 100)]
    connections: usize,
    #[arg(long, value_enum, default_value_t = Mode::Targeted)]
    mode: Mode,
    /// Events per second over all writers; 0 = as fast as the writers can commit.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// How long the writers produce (backlog: unused, the drain is waited for as --grace says; saturate: how long
    /// to count the broadcast).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent producer connections.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Events per INSERT statement (its own transaction) in targeted and topic modes: 1 is one row per commit, as
    /// most backends write; more is a backend that writes several events in one transaction, which takes the
    /// producers' commit rate out of a fan-out or throughput measurement.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    batch: u32,
    /// After producing stops, keep waiting for the remaining deliveries until this long passes without a new
    /// one: a server still draining a backlog is waited for, one that stopped delivering is not. What is then
    /// still missing is lost.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Closed loop (topic mode): a writer waits while the slowest reading connection is more than N events behind
    /// the events committed, as the socket ceiling waits for its sockets. With N below the server's queue per
    /// connection, this measures what it sustains without closing anyone as a slow consumer. 0 = open loop: the
    /// writers keep the rate whatever the readers do.
    #[arg(long, default_value_t = 0)]
    window: u64,
    /// Generator processes; the connections are split evenly over them (wakeup mode: 1).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Spread the connections over the source addresses 127.0.0.1 .. 127.0.0.K (~28,000 ports each).
    #[arg(long, default_value_t = 1)]
    source_ips: usize,
    /// This many connections (spread evenly) stop reading right after subscribing; their events are not expected.
    #[arg(long, default_value_t = 0)]
    stalled: usize,
    /// This many connections (spread evenly) read one event frame, then wait 1 / --slow-rate: clients that keep
    /// reading, slower than events arrive. Counted apart; after producing they read at full speed until every
    /// event has arrived (or --grace passes without one). One process only (--workers 1).
    #[arg(long, default_value_t = 0)]
    slow_readers: usize,
    /// Event frames per second each slow reader reads.
    #[arg(long, default_value_t = 20.0)]
    slow_rate: f64,
    /// SO_RCVBUF of each slow reader's socket (the kernel doubles it), so that what it has not read waits in
    /// nudge rather than in the client's kernel; 0 = the kernel's default with autotuning (megabytes on loopback).
    #[arg(long, default_value_t = 4096)]
    slow_rcvbuf: u32,
    /// Pad each event's `data` to about this many bytes (targeted, topic, produce modes; at most 4096, nudge's
    /// limit). 0: `{"bench": true}`.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=4096))]
    data_bytes: u32,
    /// Targeted mode: events go to users u0..u{K-1} only; the other connections stay connected and idle (an idle
    /// crowd). 0: every connection receives events.
    #[arg(long, default_value_t = 0)]
    active: usize,
    /// Floor mode: how the claim commits, as nudge's own option: `async` measures the floor of
    /// `NUDGE_CLAIM_COMMIT=async` (no WAL flush in the claim).
    #[arg(long, env = "NUDGE_CLAIM_COMMIT", default_value = "durable", value_parser = ["durable", "async"])]
    claim_commit: String,
    /// Wakeup mode with --pause, and floor mode: this many events (samples); 0 = until --duration (floor: 200).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Wakeup mode, closed loop (one writer): after each wakeup wait for its event, then pause this long. Floor
    /// mode: the pause between samples (default 10 ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pause: Option<Duration>,
    /// After producing, wait at most this long for the remaining deliveries (however fast they still arrive):
    /// ingest runs whose backlog would take minutes to drain. What is missing then is `drain_cut`, not lost.
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_max: Option<Duration>,
    /// Backlog mode: rows inserted before measuring.
    #[arg(long, default_value_t = 100_000)]
    backlog: u64,
    /// History and storm modes: delivered events in the history (seqs 1..=N).
    #[arg(long, default_value_t = 1_000_000)]
    history: u64,
    /// History and storm modes: users the history's personal events (3 in 5) are spread over (`h0`, `h1`, …).
    #[arg(long, default_value_t = 20_000)]
    history_users: u64,
    /// History and storm modes: topics the history's topic events (2 in 5) are spread over (`t0`, `t1`, …).
    #[arg(long, default_value_t = 2_000)]
    history_topics: u64,
    /// Storm mode: clients per storm; each is user `h{k}` on two topics and resumes from 0.
    #[arg(long, default_value_t = 200)]
    storm: usize,
    /// Storm mode: rounds of calm (--duration) then storm.
    #[arg(long, default_value_t = 3)]
    storm_rounds: usize,
    /// Read the nodes' /metrics at the end (same host and port as --url) and report nudge's counters.
    #[arg(long)]
    scrape_metrics: bool,
    /// Targeted and topic modes: also report the latency of the events committed in each interval of this length
    /// (`latency_timeline`), to see when during a run it moved.
    #[arg(long, value_parser = humantime::parse_duration)]
    latency_every: Option<Duration>,
    /// Produce mode: the table to INSERT into (same columns as nudge.events).
    #[arg(long, default_value = "nudge.events")]
    table: String,
    /// Server processes to read RSS and CPU from (/proc/PID).
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
    /// Internal: this process is worker I of --worker-count, started by the parent.
    #[arg(long, hide = true)]
    worker_index: Option<usize>,
    #[arg(long, hide = true)]
    worker_count: Option<usize>,
}

fn main() {
    // Anchor the shared clock before anything else (stats::now_us).
    now_us();
    let args = Args::parse();
    // A worker process runs on one thread: the parallelism comes from the processes, and K processes with a
    // thread per core each would mostly switch between threads on a machine this size.
    let runtime = if args.worker_index.is_some() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nudge-bench: {e}");
            std::process::exit(1);
        }
    };
    if let Some(index) = args.worker_index {
        let count = args.worker_count.unwrap_or(1).max(1);
        if let Err(e) = runtime.block_on(remote::serve(plan(&args, index, count))) {
            eprintln!("nudge-bench[worker {index}]: {e}");
            std::process::exit(1);
        }
        // Exit without waiting for the stdin thread or the runtime's tasks.
        std::process::exit(0);
    }
    match runtime.block_on(run(args)) {
        Ok(summary) => {
            println!("{summary}");
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("nudge-bench: {e}");
            std::process::exit(1);
        }
    }
}

/// Worker `index`'s share of the connections: a contiguous range of indexes, so user ids stay u0..u{N-1}.
fn plan(args: &Args, index: usize, count: usize) -> Plan {
    let n = args.connections;
    Plan {
        urls: args.urls.clone(),
        // Saturate mode's server ignores the token, so any secret signs it.
        secret: args.secret.clone().unwrap_or_else(|| "nudge-bench-unused-secret".into()),
        // The storm's live client is an ordinary targeted connection; its storm clients are storm.rs's own.
        mode: if args.mode == Mode::Storm { Mode::Targeted } else { args.mode },
        connections: n,
        stalled: args.stalled,
        slow_readers: args.slow_readers,
        slow_rate: args.slow_rate,
        slow_rcvbuf: args.slow_rcvbuf,
        source_ips: args.source_ips,
        ports: worker::local_ports(),
        range: index * n / count..(index + 1) * n / count,
        tag: if count > 1 { format!("nudge-bench[worker {index}]") } else { "nudge-bench".into() },
    }
}

fn validate(args: &Args) -> Result<(), String> {
    if args.mode == Mode::History {
        if args.database_url.is_none() {
            return Err("--database-url (or NUDGE_DATABASE_URL) is required in history mode".into());
        }
        if args.history == 0 || args.history_users == 0 || args.history_topics < 2 {
            return Err("--history and --history-users must be positive, --history-topics at least 2".into());
        }
        return Ok(());
    }
    if args.mode == Mode::Floor {
        if args.database_url.is_none() {
            return Err("--database-url (or NUDGE_DATABASE_URL) is required in floor mode".into());
        }
        return Ok(());
    }
    if args.active > 0 && (args.mode != Mode::Targeted || args.active > args.connections) {
        return Err("--active: targeted mode, at most --connections".into());
    }
    if (args.pause.is_some() || args.count > 0) && (args.mode != Mode::Wakeup || args.writers != 1) {
        return Err("--pause and --count: wakeup mode (closed loop), --writers 1; or floor mode".into());
    }
    if args.mode == Mode::Storm {
        if args.workers != 1 || args.connections != 1 || args.urls.len() != 1 {
            return Err("storm mode: one live connection (--connections 1), one process, one --url".into());
        }
        if args.storm == 0 || args.storm_rounds == 0 || args.rate <= 0.0 {
            return Err("storm mode needs --storm, --storm-rounds and --rate above 0".into());
        }
        if args.history_users == 0 || args.history_topics < 2 {
            return Err("--history-users must be positive, --history-topics at least 2".into());
        }
    }
    if args.slow_readers > 0 {
        if args.workers != 1 || args.stalled > 0 || args.mode != Mode::Topic {
            return Err("--slow-readers: topic mode, --workers 1, no --stalled".into());
        }
        if args.slow_readers >= args.connections {
            return Err("--slow-readers: at least one connection must read at full speed".into());
        }
        if !(args.slow_rate > 0.0 && args.slow_rate.is_finite()) {
            return Err("--slow-rate must be positive".into());
        }
    }
    if args.connections == 0 && args.mode != Mode::Produce {
        return Err("--connections 0 only makes sense in produce mode".into());
    }
    if args.connections > 0 && args.urls.is_empty() {
        return Err("--url is required with connections".into());
    }
    if args.mode != Mode::Saturate && args.database_url.is_none() {
        return Err("--database-url (or NUDGE_DATABASE_URL) is required in this mode".into());
    }
    if args.connections > 0 && args.mode != Mode::Saturate && args.secret.is_none() {
        return Err("--secret (or NUDGE_JWT_SECRET) is required in this mode".into());
    }
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if args.mode == Mode::Wakeup && args.workers != 1 {
        return Err(
            "wakeup mode runs in one process (--workers 1): wakeups go out on the recipients' own connections, \
                    next to the writers"
                .into(),
        );
    }
    if args.window > 0 && args.mode != Mode::Topic {
        return Err("--window applies to topic mode".into());
    }
    if !(1..=254).contains(&args.source_ips) {
        return Err("--source-ips must be 1 to 254 (127.0.0.1 .. 127.0.0.254)".into());
    }
    if args.stalled > args.connections {
        return Err("--stalled cannot exceed --connections".into());
    }
    if args.stalled == args.connections && args.connections > 0 && args.mode != Mode::Produce {
        return Err("at least one connection must read".into());
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        return Err("--rate must be 0 (flat out) or positive".into());
    }
    // Interpolated into the INSERT: an identifier, optionally schema-qualified, nothing else.
    let identifier = |part: &str| {
        !part.is_empty()
            && !part.starts_with(|c: char| c.is_ascii_digit())
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = args.table.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| identifier(p)) {
        return Err(format!("--table {:?}: expected [schema.]table, letters, digits and _", args.table));
    }
    Ok(())
}

/// The parent's view of a worker: in this process (`--workers 1`) or a child process.
enum Handle {
    Local(Box<Worker>),
    Remote(RemoteWorker),
}

impl Handle {
    async fn ready(&mut self) -> Result<Ready, String> {
        match self {
            Handle::Local(worker) => Ok(worker.ready()),
            Handle::Remote(remote) => remote.ready().await,
        }
    }

    fn go(&mut self) -> Result<(), String> {
        match self {
            Handle::Local(worker) => {
                worker.track_progress(|_| {});
                Ok(())
            }
            Handle::Remote(remote) => remote.send(&ToWorker::Go),
        }
    }

    /// What its reading connections have read so far (a child process's figures are at most 10 ms old).
    fn progress(&self) -> Arc<Progress> {
        match self {
            Handle::Local(worker) => worker.progress(),
            Handle::Remote(remote) => remote.progress(),
        }
    }

    fn received(&self) -> u64 {
        self.progress().received.load(Ordering::Relaxed)
    }

    fn slow_received(&self) -> u64 {
        self.progress().slow_received.load(Ordering::Relaxed)
    }

    /// Let the slow readers read at full speed (they exist only with one, local, worker).
    fn unthrottle(&self) {
        if let Handle::Local(worker) = self {
            worker.unthrottle();
        }
    }

    async fn wakeup(&mut self) -> Result<(), String> {
        match self {
            Handle::Local(worker) => worker.wakeup().await,
            Handle::Remote(remote) => remote.send(&ToWorker::Wakeup),
        }
    }
}

/// Stop every worker and collect its summary. Children read the commit times from a file: one write, however
/// many workers, and nothing large crosses a pipe.
async fn finish(handles: Vec<Handle>, commits: &[(i64, u64)], phases: &[(u64, u64)]) -> Result<Vec<Summary>, String> {
    let mut path = None;
    if handles.iter().any(|h| matches!(h, Handle::Remote(_))) && !commits.is_empty() {
        let file = std::env::temp_dir().join(format!("nudge-bench-{}-commits.bin", std::process::id()));
        std::fs::write(&file, CommitTable::encode(commits)).map_err(|e| format!("{}: {e}", file.display()))?;
        path = Some(file);
    }
    let mut summaries = Vec::new();
    let mut remotes = Vec::new();
    for handle in handles {
        match handle {
            Handle::Local(worker) => summaries.push(worker.finish(&CommitTable::new(commits), phases).await),
            Handle::Remote(mut remote) => {
                remote.send(&ToWorker::Finish { commits: path.clone() })?;
                remotes.push(remote);
            }
        }
    }
    // All children work on their summaries at once; collect them in turn.
    let mut result = Ok(());
    for remote in &mut remotes {
        match remote.summary().await {
            Ok(summary) => summaries.push(summary),
            Err(e) => result = Err(e),
        }
    }
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    result.map(|()| summaries)
}

/// What the producing phase leaves for the report.
#[derive(Default)]
struct Produced {
    events: u64,
    events_per_s: f64,
    expected: u64,
    commits: Vec<(i64, u64)>,
    /// Deliveries per second are counted from here…
    window_start_us: u64,
    /// …over at least this long (the producing time).
    window_min_s: f64,
}

fn received(handles: &[Handle]) -> u64 {
    handles.iter().map(Handle::received).sum()
}

/// Wait until `expected` event frames have been read, or until `quiet` passes without a new one.
async fn wait_for(handles: &[Handle], expected: u64, quiet: Duration) {
    wait_until(|| received(handles), expected, quiet).await;
}

/// Wait until `count()` reaches `expected`, or until `quiet` passes without it changing.
async fn wait_until(count: impl Fn() -> u64, expected: u64, quiet: Duration) {
    let (mut last, mut last_change) = (count(), tokio::time::Instant::now());
    while last < expected && last_change.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = count();
        if now != last {
            (last, last_change) = (now, tokio::time::Instant::now());
        }
    }
}

/// The latency figures of one histogram given as (µs, count) pairs.
fn latency_json(pairs: &[&[(u64, u64)]]) -> serde_json::Value {
    let mut h = new_histogram();
    for &(value, count) in pairs.iter().copied().flatten() {
        h.saturating_record_n(value, count);
    }
    json!({
        "count": h.len(),
        "p50": percentile_ms(&h, 0.50),
        "p90": percentile_ms(&h, 0.90),
        "p99": percentile_ms(&h, 0.99),
        "max": percentile_ms(&h, 1.0),
    })
}

/// Read the nodes' slow-consumer counters every second and note each change with its time (seconds since the
/// watch started, about when producing started): when connections fell behind, when any was closed as slow.
async fn watch_metrics(urls: Vec<String>, timeline: Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    const WATCHED: [&str; 2] = ["nudge_connections_behind_total", "nudge_slow_consumers_total"];
    let started = tokio::time::Instant::now();
    let mut last = None;
    loop {
        let metrics = scrape_metrics(&urls).await;
        let now: Vec<f64> = WATCHED.iter().map(|name| metrics.get(*name).copied().unwrap_or(0.0)).collect();
        if last.as_ref() != Some(&now) {
            let mut entry = json!({"at_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0});
            for (name, value) in WATCHED.iter().zip(&now) {
                entry[*name] = json!(value);
            }
            timeline.lock().unwrap_or_else(|e| e.into_inner()).push(entry);
            last = Some(now);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// nudge's counters from each node's /metrics (the --url's host and port), summed over the nodes. Plain HTTP/1.0
/// over a socket: the bench has no HTTP client, and the exposition format is lines of `name value`.
async fn scrape_metrics(urls: &[String]) -> BTreeMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sums = BTreeMap::new();
    for url in urls {
        let Some(authority) = url.strip_prefix("ws://").and_then(|rest| rest.split('/').next()) else { continue };
        let fetch = async {
            let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
            let request = format!("GET /metrics HTTP/1.0\r\nHost: {authority}\r\n\r\n");
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut body = String::new();
            stream.read_to_string(&mut body).await.ok()?;
            Some(body)
        };
        let Ok(Some(body)) = tokio::time::timeout(Duration::from_secs(5), fetch).await else {
            eprintln!("nudge-bench: could not read {authority}/metrics");
            continue;
        };
        for line in body.lines().filter(|l| l.starts_with("nudge_") && !l.contains('{')) {
            let mut parts = line.split_whitespace();
            if let (Some(name), Some(Ok(value))) = (parts.next(), parts.next().map(str::parse::<f64>)) {
                *sums.entry(name.to_owned()).or_default() += value;
            }
        }
    }
    sums
}

async fn run(args: Args) -> Result<serde_json::Value, String> {
    validate(&args)?;
    let layout = storm::Layout { rows: args.history, users: args.history_users, topics: args.history_topics };
    if args.mode == Mode::History {
        let secs = storm::fill_history(args.database_url.as_deref().unwrap_or_default(), layout).await?;
        eprintln!("nudge-bench: history of {} events written in {secs:.1}s", args.history);
        return Ok(json!({"mode": "history", "events": args.history, "users": args.history_users,
                         "topics": args.history_topics, "secs": secs}));
    }
    if args.mode == Mode::Floor {
        let pause = args.pause.unwrap_or(Duration::from_millis(10));
        let commit_async = args.claim_commit == "async";
        return floor::run(args.database_url.as_deref().unwrap_or_default(), args.count, pause, commit_async).await;
    }
    let workers = if args.connections == 0 { 0 } else { args.workers.min(args.connections) };
    let per_process = args.connections.div_ceil(workers.max(1));
    if let Some(soft) = raise_nofile_limit() {
        // Each connection is a file descriptor; a few dozen more for the runtime, writers and pipes.
        if (per_process as u64) + 64 > soft {
            eprintln!(
                "nudge-bench: warning: {per_process} connections per process but an open-files limit of {soft}; \
                 use more --workers"
            );
        }
    }
    let (low, high) = worker::local_ports();
    let per_address = args.connections.div_ceil(args.source_ips);
    if per_address > usize::from(high - low) + 1 {
        eprintln!(
            "nudge-bench: warning: {per_address} connections per source address, but the local port range has {}; \
             use more --source-ips",
            high - low + 1
        );
    }
    let rss_before_kib = server_rss_kib(&args.server_pids);

    // Connect: every worker at once.
    let mut handles = Vec::with_capacity(workers);
    if workers == 1 {
        handles.push(Handle::Local(Box::new(Worker::start(plan(&args, 0, 1)).await?)));
    } else {
        for i in 0..workers {
            handles.push(Handle::Remote(RemoteWorker::spawn(i, workers)?));
        }
    }
    let mut readies = Vec::with_capacity(workers);
    for handle in &mut handles {
        readies.push(handle.ready().await?);
    }
    let connected: u64 = readies.iter().map(|r| r.connected).sum();
    let failed: u64 = readies.iter().map(|r| r.failed).sum();
    let stalled_connected: u64 = readies.iter().map(|r| r.stalled_connected).sum();
    let slow_connected: u64 = readies.iter().map(|r| r.slow_connected).sum();
    // Reading at full speed: what the latency and the losses are measured on.
    let reading = connected - stalled_connected - slow_connected;
    // Wall time of the whole connect phase, first connect of any worker to last reply of any worker, on the
    // clock all processes share.
    let connect_secs = match (readies.iter().map(|r| r.started_us).min(), readies.iter().map(|r| r.finished_us).max()) {
        (Some(start), Some(end)) => end.saturating_sub(start) as f64 / 1e6,
        _ => 0.0,
    };
    if workers > 1 {
        eprintln!("nudge-bench: {connected} connected ({failed} failed) over {workers} workers in {connect_secs:.2}s");
    }
    let cpu_before = server_cpu(&args.server_pids);
    for handle in &mut handles {
        handle.go()?;
    }

    let database_url = args.database_url.clone().unwrap_or_default();
    let mut slow_report = None;
    // Targeted, topic and wakeup modes: what was delivered while producing, and the backlog at the end.
    let mut keep_up = None;
    // With --scrape-metrics, when the slow-consumer counters moved: every second, from here to the end.
    let timeline: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let watcher = args.scrape_metrics.then(|| tokio::spawn(watch_metrics(args.urls.clone(), timeline.clone())));
    // Storm mode: alternating calm and storm phases (start, end), and each storm's outcome.
    let (mut phases, mut rounds) = (Vec::new(), Vec::new());
    let produced = match args.mode {
        Mode::Targeted | Mode::Topic | Mode::Wakeup | Mode::Produce => {
            let (sinks, closed_loop) = match (&handles[..], args.mode) {
                ([Handle::Local(worker)], Mode::Wakeup) => {
                    (Some(worker.sinks()), args.pause.map(|pause| (pause, worker.counters())))
                }
                _ => (None, None),
            };
            let setup = Writers {
                database_url,
                writers: args.writers.max(1),
                batch: args.batch as usize,
                rate: args.rate,
                duration: args.duration,
                mode: args.mode,
                connections: args.connections,
                stalled: args.stalled,
                table: args.table.clone(),
                sinks,
                active: args.active,
                count: args.count,
                closed_loop,
                window: (args.window > 0)
                    .then(|| Window::new(args.window, handles.iter().map(Handle::progress).collect())),
                data: event_data(args.data_bytes as usize),
                stop: None,
            };
            let out = produce(Arc::new(setup)).await?;
            let slow_while_producing: u64 = handles.iter().map(Handle::slow_received).sum();
            // Delivered while the producers ran (as of the workers' last look, at most 10 ms old).
            let while_producing = received(&handles);
            let expected = match args.mode {
                Mode::Topic => out.events * reading,
                Mode::Produce => 0,
                _ => out.expected,
            };
            eprintln!(
                "nudge-bench: produced {} events in {:.2}s; waiting for {expected} deliveries",
                out.events, out.secs
            );
            let drain = tokio::time::Instant::now();
            let cut = match args.drain_max {
                Some(max) => tokio::time::timeout(max, wait_for(&handles, expected, args.grace)).await.is_err(),
                None => {
                    wait_for(&handles, expected, args.grace).await;
                    false
                }
            };
            if args.mode != Mode::Produce {
                let left = expected.saturating_sub(received(&handles));
                keep_up = Some(json!({
                    "producing_s": out.secs,
                    "received_while_producing": while_producing,
                    "deliveries_per_s_while_producing": while_producing as f64 / out.secs.max(1e-9),
                    // Deliveries while producing over deliveries due from what was committed meanwhile.
                    "ratio": while_producing as f64 / expected.max(1) as f64,
                    "backlog_at_end": expected.saturating_sub(while_producing),
                    "drain_s": drain.elapsed().as_secs_f64(),
                    "drain_cut": cut,
                    "left_after_drain": left,
                }));
                if cut {
                    eprintln!("nudge-bench: --drain-max reached with {left} deliveries still to come");
                }
            }
            if slow_connected > 0 {
                // Do the slow readers get every event? Let them read at full speed and wait, as for the others.
                let slow_expected = out.events * slow_connected;
                let drain = tokio::time::Instant::now();
                eprintln!(
                    "nudge-bench: slow readers read {slow_while_producing} events while producing; now at full \
                     speed until {slow_expected}"
                );
                handles.iter().for_each(Handle::unthrottle);
                let slow = || handles.iter().map(Handle::slow_received).sum();
                wait_until(slow, slow_expected, args.grace).await;
                slow_report = Some(json!({
                    "connections": slow_connected,
                    "rate_per_reader": args.slow_rate,
                    "expected": slow_expected,
                    "received_while_producing": slow_while_producing,
                    "deliveries_per_s_while_producing": slow_while_producing as f64 / out.secs.max(1e-9),
                    "drain_s": drain.elapsed().as_secs_f64(),
                }));
            }
            if let Some(every) = args.latency_every.filter(|e| !e.is_zero()) {
                let step = every.as_micros() as u64;
                let end = out.started_us + (out.secs * 1e6) as u64;
                phases = (out.started_us..end).step_by(step as usize).map(|at| (at, at + step)).collect();
            }
            Produced {
                events: out.events,
                events_per_s: out.events as f64 / out.secs.max(1e-9),
                expected,
                commits: out.commits,
                window_start_us: out.started_us,
                window_min_s: out.secs,
            }
        }
        Mode::Storm => {
            let stop = Arc::new(AtomicBool::new(false));
            let setup = Writers {
                database_url,
                writers: args.writers.max(1),
                batch: 1,
                rate: args.rate,
                // Until the rounds are over (`stop`).
                duration: Duration::from_secs(24 * 3600),
                mode: Mode::Targeted,
                connections: 1,
                stalled: 0,
                table: args.table.clone(),
                sinks: None,
                active: 0,
                count: 0,
                closed_loop: None,
                window: None,
                data: event_data(args.data_bytes as usize),
                stop: Some(stop.clone()),
            };
            let writers = tokio::spawn(produce(Arc::new(setup)));
            let targets = worker::resolve(&args.urls).await?;
            let secret = args.secret.clone().unwrap_or_default();
            for r in 0..args.storm_rounds {
                let calm = now_us();
                tokio::time::sleep(args.duration).await;
                let storm_start = now_us();
                phases.push((calm, storm_start));
                // Until the last client has its reply and has closed (each closes as soon as it has it).
                let round = storm::round(&targets[0], &secret, layout, args.storm, r).await;
                phases.push((storm_start, now_us()));
                // Half a second in neither phase, so that no calm phase starts with the storm's tail.
                tokio::time::sleep(Duration::from_millis(500)).await;
                eprintln!(
                    "nudge-bench: storm {}: {} of {} resumed ({} complete) in at most {:.0} ms; {} failed",
                    r + 1,
                    round.resumed,
                    round.clients,
                    round.complete,
                    round.resumed_ms.iter().copied().fold(0.0, f64::max),
                    round.failed.values().sum::<u64>()
                );
                rounds.push(round);
            }
            stop.store(true, Ordering::Relaxed);
            let out = writers.await.map_err(|e| e.to_string())??;
            eprintln!("nudge-bench: produced {} events; waiting for {} deliveries", out.events, out.expected);
            wait_for(&handles, out.expected, args.grace).await;
            Produced {
                events: out.events,
                events_per_s: out.events as f64 / out.secs.max(1e-9),
                expected: out.expected,
                commits: out.commits,
                window_start_us: out.started_us,
                window_min_s: out.secs,
            }
        }
        Mode::History | Mode::Floor => unreachable!("history and floor modes return before connecting"),
        Mode::Backlog => {
            let backlog = insert_backlog(&database_url, args.backlog, args.connections, args.stalled).await?;
            eprintln!(
                "nudge-bench: {} rows inserted and committed in {:.2}s; sending one wakeup",
                args.backlog, backlog.insert_secs
            );
            wakeup_any(&mut handles, &readies).await?;
            wait_for(&handles, backlog.expected, args.grace).await;
            Produced {
                events: args.backlog,
                events_per_s: args.backlog as f64 / backlog.insert_secs.max(1e-9),
                expected: backlog.expected,
                commits: backlog.commits,
                window_start_us: backlog.t0_us,
                window_min_s: 0.0,
            }
        }
        Mode::Saturate => {
            let start_us = now_us();
            wakeup_any(&mut handles, &readies).await?;
            let started = tokio::time::Instant::now();
            tokio::time::sleep(args.duration).await;
            // The server broadcasts for its own --duration: count until the frames stop (1 s of quiet) or the
            // grace period is over.
            let deadline = started + args.duration + args.grace;
            let _ = tokio::time::timeout_at(deadline, wait_for(&handles, u64::MAX, Duration::from_secs(1))).await;
            Produced { window_start_us: start_us, ..Produced::default() }
        }
    };
    let rss_kib = server_rss_kib(&args.server_pids);
    let cpu_after = server_cpu(&args.server_pids);
    let server_metrics = if args.scrape_metrics { Some(scrape_metrics(&args.urls).await) } else { None };
    let metrics_timeline = watcher.map(|watcher| {
        watcher.abort();
        std::mem::take(&mut *timeline.lock().unwrap_or_else(|e| e.into_inner()))
    });

    let summaries = finish(handles, &produced.commits, &phases).await?;
    let mut latency = new_histogram();
    let mut stalled_outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut closed: BTreeMap<String, u64> = BTreeMap::new();
    let (mut delivered, mut duplicated, mut unmatched, mut early, mut last_recv_us) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut seq_unique, mut seq_last_sum, mut seq_max) = (0u64, 0u64, 0u64);
    let (mut slow_delivered, mut slow_duplicated, mut slow_outcomes) = (0u64, 0u64, BTreeMap::<String, u64>::new());
    for s in &summaries {
        slow_delivered += s.slow.deliveries;
        slow_duplicated += s.slow.duplicated;
        for (outcome, n) in &s.slow.outcome {
            *slow_outcomes.entry(outcome.clone()).or_default() += n;
        }
        for &(value, count) in &s.latency {
            latency.saturating_record_n(value, count);
        }
        for (outcome, n) in &s.stalled {
            *stalled_outcomes.entry(outcome.clone()).or_default() += n;
        }
        for (reason, n) in &s.closed {
            *closed.entry(reason.clone()).or_default() += n;
        }
        delivered += s.deliveries;
        duplicated += s.duplicated;
        unmatched += s.unmatched;
        early += s.early;
        last_recv_us = last_recv_us.max(s.last_recv_us);
        seq_unique += s.seq_unique;
        seq_last_sum += s.seq_last_sum;
        seq_max = seq_max.max(s.seq_max_id);
    }
    if !closed.is_empty() {
        eprintln!("nudge-bench: warning: reading connections closed during the run: {}", describe(&closed));
    }
    if unmatched > 0 {
        eprintln!("nudge-bench: {unmatched} event frames with ids this run did not write (ignored)");
    }
    if early > 0 {
        // Targeted and topic: nudge delivered before the COMMIT's reply reached the writer. Wakeup: another
        // wakeup's claim pass took the row before its own wakeup was sent.
        eprintln!("nudge-bench: {early} deliveries arrived before their reference time (counted as 0 ms)");
    }
    let stalled_not_connected = (args.stalled as u64).saturating_sub(stalled_connected);
    if stalled_not_connected > 0 {
        stalled_outcomes.insert("failed to connect".into(), stalled_not_connected);
    }
    let stalled_outcome = if args.stalled == 0 { "none".to_owned() } else { describe(&stalled_outcomes) };

    let window_s = |start_us: u64, min_s: f64| (last_recv_us.saturating_sub(start_us) as f64 / 1e6).max(min_s);
    let (events, events_per_s, expected, deliveries_per_s) = match args.mode {
        Mode::Saturate => {
            // Each connection was due every id up to the last it received: the ones it lacks below that are the
            // gaps, i.e. lost. The ceiling stops sending at its own deadline, wherever each connection is, so a
            // connection that ends lower than the others has a short tail, not a loss.
            let window = window_s(produced.window_start_us, 0.0).max(1e-9);
            (seq_max, seq_max as f64 / window, seq_last_sum, delivered as f64 / window)
        }
        Mode::Produce => (produced.events, produced.events_per_s, 0, 0.0),
        _ => {
            let window = window_s(produced.window_start_us, produced.window_min_s).max(1e-9);
            (produced.events, produced.events_per_s, produced.expected, delivered as f64 / window)
        }
    };
    let lost = match args.mode {
        Mode::Saturate => expected.saturating_sub(seq_unique),
        _ => expected.saturating_sub(delivered),
    };
    if let Some(report) = &mut slow_report {
        let expected = report["expected"].as_u64().unwrap_or(0);
        report["received"] = json!(slow_delivered);
        report["lost"] = json!(expected.saturating_sub(slow_delivered));
        report["duplicated"] = json!(slow_duplicated);
        report["outcome"] = json!(describe(&slow_outcomes));
    }
    // Storm mode: the live client's latency in the calm phases (even) and the storm phases (odd), pooled and by
    // round; each storm's outcome.
    let storm_report = (args.mode == Mode::Storm).then(|| {
        let phase = |i: usize| -> Vec<&[(u64, u64)]> {
            summaries.iter().filter_map(|s| s.phases.get(i).map(Vec::as_slice)).collect()
        };
        let pooled = |odd: usize| -> serde_json::Value {
            let parts: Vec<&[(u64, u64)]> = (0..phases.len()).filter(|i| i % 2 == odd).flat_map(phase).collect();
            latency_json(&parts)
        };
        let all_ms: Vec<f64> = rounds.iter().flat_map(|r| r.resumed_ms.iter().copied()).collect();
        let mut sorted = all_ms.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied();
        let mut failed: BTreeMap<String, u64> = BTreeMap::new();
        for r in &rounds {
            for (why, n) in &r.failed {
                *failed.entry(why.clone()).or_default() += n;
            }
        }
        json!({
            "history": {"events": args.history, "users": args.history_users, "topics": args.history_topics},
            "calm_s": args.duration.as_secs_f64(),
            "calm": pooled(0),
            "storm": pooled(1),
            "clients": rounds.iter().map(|r| r.clients).sum::<usize>(),
            "resumed": rounds.iter().map(|r| r.resumed).sum::<usize>(),
            "complete": rounds.iter().map(|r| r.complete).sum::<usize>(),
            "wrong": rounds.iter().map(|r| r.wrong).sum::<usize>(),
            "failed": failed,
            "replayed": rounds.iter().map(|r| r.replayed).sum::<u64>(),
            "resumed_ms": {"p50": at(0.5), "p99": at(0.99), "max": at(1.0)},
            "rounds": rounds.iter().enumerate().map(|(i, r)| {
                let max = r.resumed_ms.iter().copied().fold(0.0, f64::max);
                json!({
                    "calm": latency_json(&phase(2 * i)),
                    "storm": latency_json(&phase(2 * i + 1)),
                    "storm_s": phases.get(2 * i + 1).map(|(a, b)| (b - a) as f64 / 1e6),
                    "clients": r.clients,
                    "resumed": r.resumed,
                    "complete": r.complete,
                    "wrong": r.wrong,
                    "replayed": r.replayed,
                    "connect_s": r.connect_s,
                    "resumed_max_ms": max,
                })
            }).collect::<Vec<_>>(),
        })
    });
    let latency_timeline = (args.mode != Mode::Storm && !phases.is_empty()).then(|| {
        let start = phases.first().map_or(0, |p| p.0);
        (0..phases.len())
            .map(|i| {
                let parts: Vec<&[(u64, u64)]> =
                    summaries.iter().filter_map(|s| s.phases.get(i).map(Vec::as_slice)).collect();
                let mut entry = latency_json(&parts);
                entry["at_s"] = json!((phases[i].0 - start) as f64 / 1e6);
                entry
            })
            .collect::<Vec<_>>()
    });
    Ok(json!({
        "nodes": args.urls.len(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "connections": connected,
        "connection_failures": failed,
        "handshakes_per_s": if connect_secs > 0.0 { connected as f64 / connect_secs } else { 0.0 },
        "workers": workers,
        "source_ips": args.source_ips,
        "writers": args.writers,
        "batch": args.batch,
        "target_rate": args.rate,
        "events": events,
        "events_per_s": events_per_s,
        "deliveries_expected": expected,
        "deliveries": delivered,
        "deliveries_per_s": deliveries_per_s,
        "lost": lost,
        "duplicated": duplicated,
        "stalled": args.stalled,
        "stalled_outcome": stalled_outcome,
        "latency_ms": {
            "p50": percentile_ms(&latency, 0.50),
            "p90": percentile_ms(&latency, 0.90),
            "p99": percentile_ms(&latency, 0.99),
            "max": percentile_ms(&latency, 1.0),
        },
        "latency_histogram_ms": log_buckets_ms(&latency).into_iter().map(|(b, c)| json!([b, c])).collect::<Vec<_>>(),
        "server_rss_kib_before": rss_before_kib,
        "server_rss_kib": rss_kib,
        "server_rss_kib_per_connection": rss_kib.saturating_sub(rss_before_kib) as f64 / connected.max(1) as f64,
        "server_cpu_s": cpu_after - cpu_before,
        "data_bytes": args.data_bytes,
        "slow_readers": slow_report,
        "active": (args.active > 0).then_some(args.active),
        "keep_up": keep_up.clone(),
        "drain_cut": keep_up.as_ref().is_some_and(|k| k["drain_cut"] == json!(true)),
        "storm": storm_report,
        "server_metrics": server_metrics,
        "server_metrics_timeline": metrics_timeline,
        "latency_timeline": latency_timeline,
    }))
}

/// Send one wakeup through the first worker that has a reading connection.
async fn wakeup_any(handles: &mut [Handle], readies: &[Ready]) -> Result<(), String> {
    let i = readies
        .iter()
        .position(|r| r.connected > r.stalled_connected)
        .ok_or("no reading connection to send the wakeup on")?;
    handles[i].wakeup().await
}

/// "2 closed by server with code 1013, 1 still open".
fn describe(counts: &BTreeMap<String, u64>) -> String {
    counts.iter().map(|(what, n)| format!("{n} {what}")).collect::<Vec<_>>().join(", ")
}
