//! One generator process's share of the connections: connecting (bound to the source addresses), reading every
//! frame with its receive time, and summing up at the end (deliveries, duplicates, latency histogram, how the
//! stalled connections ended). The same `Worker` runs inside the parent (`--workers 1`) or in a child process
//! driven over stdin/stdout (see `remote.rs`).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use nudge::auth::{issue_token, TokenRequest};

use crate::stats::{histogram_pairs, new_histogram, now_us, CommitTable};
use crate::Mode;

pub type Ws = WebSocketStream<TcpStream>;
pub type WsSink = SplitSink<Ws, Message>;
/// Write halves by connection index (wakeup mode: every connection; otherwise the first live one only).
pub type Sinks = Vec<Option<Arc<Mutex<WsSink>>>>;

/// Connections opened at once per process: enough to keep the server's accept loop busy, few enough that the
/// handshake rate is measured rather than the listen backlog overflowing.
const CONNECT_CONCURRENCY: usize = 256;

/// What a worker needs to open its connections; built from the command line in every process alike.
#[derive(Clone)]
pub struct Plan {
    pub urls: Vec<String>,
    pub secret: String,
    pub mode: Mode,
    pub connections: usize,
    pub stalled: usize,
    /// Connections (spread evenly, as the stalled ones) that read one event frame, then wait 1 / `slow_rate`.
    pub slow_readers: usize,
    pub slow_rate: f64,
    /// SO_RCVBUF of the slow readers' sockets; 0 leaves the kernel's default (and its autotuning).
    pub slow_rcvbuf: u32,
    pub source_ips: usize,
    /// The local port range to take source ports from (`local_ports`).
    pub ports: (u16, u16),
    /// The connection indexes this worker owns: user ids stay u0..u{N-1} over all workers.
    pub range: Range<usize>,
    /// Prefix of this worker's progress lines on stderr.
    pub tag: String,
}

/// Whether connection `i` of `n` is one of the `s` stalled (or slow) ones: exactly `s` of them, spread evenly
/// over the indexes (so over the nodes, which are assigned round-robin, and over the workers).
pub fn is_stalled(i: usize, n: usize, s: usize) -> bool {
    let s = s.min(n);
    s > 0 && (i + 1) * s / n != i * s / n
}

/// Sent when the connect phase is over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub connected: u64,
    pub failed: u64,
    pub stalled_connected: u64,
    /// Rate-limited readers connected (included in `connected`).
    pub slow_connected: u64,
    /// The connect phase on the shared clock (`now_us`), so the parent can take the wall time over all workers.
    pub started_us: u64,
    pub finished_us: u64,
}

/// Sent at the end: everything the parent needs to merge, a few hundred bytes whatever the run's size.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Distinct events, among those the producers wrote, received by connections that read.
    pub deliveries: u64,
    pub duplicated: u64,
    /// Event frames whose id no producer wrote in this run (left over from an earlier run, say).
    pub unmatched: u64,
    /// Deliveries received before their reference time, counted with latency 0: in targeted and topic modes
    /// nudge delivered before the COMMIT's reply reached the writer; in wakeup mode another wakeup's claim pass
    /// took the row before its own wakeup was sent.
    pub early: u64,
    pub last_recv_us: u64,
    /// Latency histogram, (µs, count).
    pub latency: Vec<(u64, u64)>,
    /// How the stalled connections ended: outcome -> count.
    pub stalled: BTreeMap<String, u64>,
    /// Reading connections the server closed during the run: reason -> count. Should be empty.
    pub closed: BTreeMap<String, u64>,
    /// Saturate mode: sums over the reading connections.
    pub seq_unique: u64,
    /// Sum over the connections of the last id each received: ids 1..=last were due to it.
    pub seq_last_sum: u64,
    pub seq_max_id: u64,
    /// The rate-limited readers (`--slow-readers`), counted apart: their latency is their own pace.
    pub slow: SlowSummary,
    /// Latency histograms of the deliveries whose reference time falls in each of the phases `finish` was given.
    pub phases: Vec<Vec<(u64, u64)>>,
}

/// What the rate-limited readers received, over all of them.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SlowSummary {
    /// Distinct events among those the producers wrote.
    pub deliveries: u64,
    pub duplicated: u64,
    /// How they ended: "still open", or how the server closed them.
    pub outcome: BTreeMap<String, u64>,
}

/// One connection's receive log.
enum ConnLog {
    /// (id − base, receive time − worker epoch): 8 bytes per delivery, joined with commit times at the end, so
    /// tens of millions of deliveries fit in a few hundred MiB and nothing is looked up while frames arrive.
    Records { base: Option<i64>, records: Vec<(i32, u32)>, overflow: u64 },
    /// Saturate mode: ids are 1, 2, 3, … per connection, so counters suffice and nothing is stored.
    Sequence { last: u64, unique: u64, duplicated: u64, last_us: u64 },
}

struct ReaderEnd {
    log: ConnLog,
    closed: Option<String>,
    /// A rate-limited reader (`--slow-readers`).
    slow: bool,
}

/// A rate-limited reader's pace: one event frame, then `period`, until `off` is set (the drain at the end).
#[derive(Clone)]
struct Throttle {
    period: Duration,
    off: Arc<AtomicBool>,
}

/// What a worker's reading connections have read so far, as of `Worker::track_progress`'s last look (every
/// 10 ms): the parent's stop test and the writers' window.
pub struct Progress {
    /// Event frames read by all of them.
    pub received: AtomicU64,
    /// Event frames read by the one that has read the fewest (u64::MAX: no reading connection).
    pub slowest: AtomicU64,
    /// Event frames read by the rate-limited readers (not in `received` or `slowest`).
    pub slow_received: AtomicU64,
}

impl Default for Progress {
    fn default() -> Progress {
        Progress { received: AtomicU64::new(0), slowest: AtomicU64::new(u64::MAX), slow_received: AtomicU64::new(0) }
    }
}

pub struct Worker {
    plan: Arc<Plan>,
    epoch_us: u64,
    ready: Ready,
    readers: Vec<JoinHandle<ReaderEnd>>,
    stalled: Vec<Ws>,
    sinks: Arc<Sinks>,
    progress: Arc<Progress>,
    /// Event frames read, per reading connection, counted by its reader: `progress` is their sum and minimum.
    per_reader: Arc<Vec<Arc<AtomicU64>>>,
    /// The same for the rate-limited readers.
    per_slow_reader: Arc<Vec<Arc<AtomicU64>>>,
    /// Set to let the rate-limited readers read at full speed.
    unthrottle: Arc<AtomicBool>,
    /// The task that keeps `progress` current, from `track_progress` to `finish`.
    tracker: Option<JoinHandle<()>>,
    stop: watch::Sender<bool>,
    stop_flag: Arc<AtomicBool>,
}

impl Worker {
    /// Open this worker's connections (authenticated, subscribed in topic and saturate modes) and start reading.
    pub async fn start(plan: Plan) -> Result<Worker, String> {
        let plan = Arc::new(plan);
        let targets = resolve(&plan.urls).await?;
        let epoch_us = now_us();
        let (stop, stop_rx) = watch::channel(false);
        let stop_flag = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let mut per_reader = Vec::new();
        let mut per_slow_reader = Vec::new();
        let unthrottle = Arc::new(AtomicBool::new(false));
        let mut sinks: Sinks = (0..plan.range.len()).map(|_| None).collect();
        let mut readers = Vec::with_capacity(plan.range.len());
        let mut stalled = Vec::new();
        let mut failed = 0u64;
        let mut have_sink = false;
        let started_us = now_us();
        let connecting = plan.clone();
        let mut attempts = futures_util::stream::iter(plan.range.clone())
            .map(move |i| {
                let (plan, targets) = (connecting.clone(), targets.clone());
                async move { (i, connect(&plan, &targets, i).await) }
            })
            .buffer_unordered(CONNECT_CONCURRENCY);
        while let Some((i, result)) = attempts.next().await {
            let ws = match result {
                Ok(ws) => ws,
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("{}: connection {i} failed: {e}", plan.tag);
                    }
                    continue;
                }
            };
            if is_stalled(i, plan.connections, plan.stalled) {
                stalled.push(ws);
                continue;
            }
            let mine = Arc::new(AtomicU64::new(0));
            let throttle = is_stalled(i, plan.connections, plan.slow_readers)
                .then(|| Throttle { period: Duration::from_secs_f64(1.0 / plan.slow_rate), off: unthrottle.clone() });
            if throttle.is_some() {
                per_slow_reader.push(mine.clone());
            } else {
                per_reader.push(mine.clone());
            }
            let (stop, flag) = (stop_rx.clone(), stop_flag.clone());
            // Only connections someone sends on are split: the split's lock costs a little on every read. A slow
            // reader never sends the wakeup: it would sit behind its own pace.
            if plan.mode == Mode::Wakeup || (!have_sink && throttle.is_none()) {
                have_sink = true;
                let (sink, stream) = ws.split();
                sinks[i - plan.range.start] = Some(Arc::new(Mutex::new(sink)));
                readers.push(tokio::spawn(read_frames(stream, plan.mode, epoch_us, stop, flag, mine, throttle)));
            } else {
                readers.push(tokio::spawn(read_frames(ws, plan.mode, epoch_us, stop, flag, mine, throttle)));
            }
        }
        drop(attempts);
        let finished_us = now_us();
        let ready = Ready {
            connected: (readers.len() + stalled.len()) as u64,
            failed,
            stalled_connected: stalled.len() as u64,
            slow_connected: per_slow_reader.len() as u64,
            started_us,
            finished_us,
        };
        eprintln!(
            "{}: {} connected ({} failed, {} stalled) in {:.2}s",
            plan.tag,
            ready.connected,
            failed,
            ready.stalled_connected,
            (finished_us - started_us) as f64 / 1e6
        );
        let (sinks, per_reader, per_slow_reader) = (Arc::new(sinks), Arc::new(per_reader), Arc::new(per_slow_reader));
        Ok(Worker {
            plan,
            epoch_us,
            ready,
            readers,
            stalled,
            sinks,
            progress,
            per_reader,
            per_slow_reader,
            unthrottle,
            tracker: None,
            stop,
            stop_flag,
        })
    }

    pub fn ready(&self) -> Ready {
        self.ready.clone()
    }

    /// What the reading connections have read so far.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Keep `progress` current (every 10 ms) until the worker finishes, calling `report` after each update.
    pub fn track_progress(&mut self, report: impl Fn(&Progress) + Send + 'static) {
        let (progress, per_reader, per_slow) =
            (self.progress.clone(), self.per_reader.clone(), self.per_slow_reader.clone());
        self.tracker = Some(tokio::spawn(async move {
            loop {
                let (mut received, mut slowest) = (0, u64::MAX);
                for n in per_reader.iter().map(|n| n.load(Ordering::Relaxed)) {
                    (received, slowest) = (received + n, slowest.min(n));
                }
                progress.received.store(received, Ordering::Relaxed);
                progress.slowest.store(slowest, Ordering::Relaxed);
                let slow = per_slow.iter().map(|n| n.load(Ordering::Relaxed)).sum();
                progress.slow_received.store(slow, Ordering::Relaxed);
                report(&progress);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    /// Let the rate-limited readers read at full speed from now on (after producing: does everything arrive?).
    pub fn unthrottle(&self) {
        self.unthrottle.store(true, Ordering::Relaxed);
    }

    /// Write halves by connection index minus this worker's range start; wakeup mode has a single worker whose
    /// range starts at 0, so there it is the connection index.
    pub fn sinks(&self) -> Arc<Sinks> {
        self.sinks.clone()
    }

    /// Event frames read so far by each reading connection, counted as they arrive (the closed-loop wakeup).
    pub fn counters(&self) -> Arc<Vec<Arc<AtomicU64>>> {
        self.per_reader.clone()
    }

    /// Send one `wakeup` on this worker's first live reading connection (backlog and saturate modes).
    pub async fn wakeup(&self) -> Result<(), String> {
        let sink = self.sinks.iter().flatten().next().ok_or("no live connection to send a wakeup on")?;
        sink.lock().await.send(wakeup_message()).await.map_err(|e| format!("sending wakeup: {e}"))
    }

    /// Stop reading, join the receive logs with the commit times, and find out how the stalled connections ended.
    /// `phases` are (start, end) times on the shared clock: each gets the latency histogram of the deliveries whose
    /// reference time (the commit) falls in it.
    pub async fn finish(self, commits: &CommitTable, phases: &[(u64, u64)]) -> Summary {
        if let Some(tracker) = &self.tracker {
            tracker.abort();
        }
        self.stop_flag.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        let stalled = futures_util::future::join_all(self.stalled.into_iter().map(stalled_outcome));
        let mut summary = Summary::default();
        for outcome in stalled.await {
            *summary.stalled.entry(outcome).or_default() += 1;
        }
        let mut histogram = new_histogram();
        let mut by_phase: Vec<_> = phases.iter().map(|_| new_histogram()).collect();
        for reader in self.readers {
            let Ok(end) = reader.await else { continue };
            if end.slow {
                *summary.slow.outcome.entry(end.closed.unwrap_or_else(|| "still open".into())).or_default() += 1;
            } else if let Some(reason) = end.closed {
                *summary.closed.entry(reason).or_default() += 1;
            }
            match end.log {
                ConnLog::Records { base, mut records, overflow } => {
                    if overflow > 0 {
                        eprintln!("{}: {overflow} events too far from the first id to record", self.plan.tag);
                    }
                    let Some(base) = base else { continue };
                    // Sorted by (id, receive time): the first of equal ids is the earliest receive, the rest are
                    // duplicates.
                    records.sort_unstable();
                    let mut previous = None;
                    for (delta, recv) in records {
                        if previous == Some(delta) {
                            if end.slow {
                                summary.slow.duplicated += 1;
                            } else {
                                summary.duplicated += 1;
                            }
                            continue;
                        }
                        previous = Some(delta);
                        let received_us = self.epoch_us + u64::from(recv);
                        let Some(reference_us) = commits.get(base + i64::from(delta)) else {
                            summary.unmatched += 1;
                            continue;
                        };
                        if end.slow {
                            // Its pace, not nudge's: only whether each event arrived counts.
                            summary.slow.deliveries += 1;
                            continue;
                        }
                        summary.deliveries += 1;
                        summary.last_recv_us = summary.last_recv_us.max(received_us);
                        if received_us < reference_us {
                            summary.early += 1;
                        }
                        let latency_us = received_us.saturating_sub(reference_us);
                        histogram.saturating_record(latency_us);
                        if let Some(i) = phases.iter().position(|&(from, to)| (from..to).contains(&reference_us)) {
                            by_phase[i].saturating_record(latency_us);
                        }
                    }
                }
                ConnLog::Sequence { last, unique, duplicated, last_us } => {
                    summary.last_recv_us = summary.last_recv_us.max(last_us);
                    summary.seq_unique += unique;
                    summary.seq_last_sum += last;
                    summary.seq_max_id = summary.seq_max_id.max(last);
                    summary.duplicated += duplicated;
                    summary.deliveries += unique;
                }
            }
        }
        summary.latency = histogram_pairs(&histogram);
        summary.phases = by_phase.iter().map(histogram_pairs).collect();
        summary
    }
}

pub fn wakeup_message() -> Message {
    Message::text(json!({"type": "wakeup"}).to_string())
}

/// A node's URL with the address to connect to.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

/// Resolve every URL once, not per connection. Plain `ws://` only: the bench is built without TLS.
pub async fn resolve(urls: &[String]) -> Result<Arc<Vec<Target>>, String> {
    let mut targets = Vec::new();
    for url in urls {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        if uri.scheme_str() != Some("ws") {
            return Err(format!("{url}: only ws:// URLs are supported (the bench has no TLS)"));
        }
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(80);
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((host, port)).await.map_err(|e| format!("{url}: {e}"))?.collect();
        // Source addresses are 127.0.0.x, so prefer the IPv4 address of a name that has both.
        let addr = addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).ok_or_else(|| format!("{url}: no address"))?;
        targets.push(Target { url: url.clone(), addr: *addr });
    }
    Ok(Arc::new(targets))
}

/// The local port range (net.ipv4.ip_local_port_range): the ports one source address offers, ~28,000.
pub fn local_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| {
            let mut numbers = text.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((numbers.next()??, numbers.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// The socket for connection `i`, bound to its source address when the node is on IPv4 loopback.
///
/// Connection i uses 127.0.0.(1 + i mod K) and, with `explicit_port`, the port `low + i / K` of the local range:
/// unique over all workers without coordination, and bound in O(1). Leaving the port to the kernel (bind to port
/// 0) was measured to cost 34 s of system time for 45,000 connections on 3 addresses: the kernel scans for a free
/// port of one parity first, and at 15,000 per address that half is full.
fn open_socket(
    plan: &Plan,
    target: &Target,
    i: usize,
    rcvbuf: Option<u32>,
    explicit_port: bool,
) -> Result<TcpSocket, String> {
    let fail = |e: std::io::Error| format!("{}: {e}", target.url);
    let socket = if target.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(fail)?;
    // Close with a reset rather than a FIN: the generator's side of a closed connection would otherwise sit in
    // TIME_WAIT for 60 s holding its port, and the next run's binds would collide with tens of thousands of
    // them. The server sees a reset when the run is over, which it must cope with anyway.
    socket.set_zero_linger().map_err(fail)?;
    if let Some(size) = rcvbuf {
        // A client that stops reading (or reads slowly): with a small receive buffer the stall reaches nudge's outbound queue after
        // kilobytes rather than the megabytes loopback autotuning would buffer first, so a short run shows how
        // nudge handles it.
        socket.set_recv_buffer_size(size).map_err(fail)?;
    }
    let loopback_v4 = matches!(target.addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
    if plan.source_ips > 1 && !loopback_v4 {
        return Err(format!("{}: --source-ips needs a node on 127.0.0.0/8", target.url));
    }
    if loopback_v4 {
        let k = plan.source_ips.max(1);
        let source = Ipv4Addr::new(127, 0, 0, 1 + (i % k) as u8);
        let (low, high) = plan.ports;
        let port = usize::from(low) + i / k;
        if explicit_port && port <= usize::from(high) {
            // SO_REUSEADDR lets a server that also sets it (tokio, PostgreSQL) still listen on a port one of these
            // sockets holds on 127.0.0.1; our own ports never collide with each other.
            socket.set_reuseaddr(true).map_err(fail)?;
            if socket.bind(SocketAddr::new(IpAddr::V4(source), port as u16)).is_ok() {
                return Ok(socket);
            }
            // Held by another process: a fresh socket without SO_REUSEADDR, so that the kernel's port is one
            // nobody else holds.
            return open_socket(plan, target, i, rcvbuf, false);
        }
        // More connections than the range has ports, or the retry after a collision: the kernel's choice.
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).map_err(fail)?;
    }
    Ok(socket)
}

/// Connect connection `i` as user `u{i}`: TCP from its source address, WebSocket upgrade, `auth` as the first
/// message, `subscribe` to `bench` in topic and saturate modes, and wait for the replies.
async fn connect(plan: &Plan, targets: &[Target], i: usize) -> Result<Ws, String> {
    let target = &targets[i % targets.len()];
    let fail = |e: std::io::Error| format!("{}: {e}", target.url);
    // Stalled and slow readers get a small receive buffer (open_socket): what they do not read reaches nudge's
    // queue after kilobytes, not after the megabytes loopback autotuning buffers (tcp_rmem allows 32 MiB here).
    let rcvbuf = if is_stalled(i, plan.connections, plan.stalled) {
        Some(4096)
    } else if is_stalled(i, plan.connections, plan.slow_readers) && plan.slow_rcvbuf > 0 {
        Some(plan.slow_rcvbuf)
    } else {
        None
    };
    let handshake = async {
        let stream = match open_socket(plan, target, i, rcvbuf, true)?.connect(target.addr).await {
            // The port we chose is taken for this destination by some other process's socket (SO_REUSEADDR let
            // both bind it): let the kernel pick one instead.
            Err(first) if matches!(first.kind(), ErrorKind::AddrNotAvailable | ErrorKind::AddrInUse) => {
                let retry = open_socket(plan, target, i, rcvbuf, false)?.connect(target.addr).await;
                retry.map_err(|e| std::io::Error::new(e.kind(), format!("{e} (first try, own port: {first})")))
            }
            other => other,
        }
        .map_err(fail)?;
        // A small read buffer, as a client library on a phone would have: the generator must not be the
        // bottleneck in memory either. Saturate mode reads millions of frames per second, where fewer, larger
        // reads pay (a quarter less system time measured): 32 KiB per connection there.
        let read_buffer = if plan.mode == Mode::Saturate { 32 * 1024 } else { 4096 };
        let topics = vec!["bench".to_owned()];
        let subscribe = if matches!(plan.mode, Mode::Topic | Mode::Saturate) { &topics[..] } else { &[] };
        upgrade(stream, target, &plan.secret, &format!("u{i}"), &topics, subscribe, read_buffer).await
    };
    tokio::time::timeout(Duration::from_secs(30), handshake)
        .await
        .map_err(|_| format!("{}: no reply to auth/subscribe within 30 s", target.url))?
}

/// Connect as `user` from a port the kernel picks (a few hundred connections at most: the resume storm),
/// authenticate with a token allowing `topics`, subscribe to all of them, and wait for the replies.
pub async fn connect_as(target: &Target, secret: &str, user: &str, topics: &[String]) -> Result<Ws, String> {
    let fail = |e: std::io::Error| format!("{}: {e}", target.url);
    let handshake = async {
        let socket = if target.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(fail)?;
        socket.set_zero_linger().map_err(fail)?;
        let stream = socket.connect(target.addr).await.map_err(fail)?;
        upgrade(stream, target, secret, user, topics, topics, 4096).await
    };
    tokio::time::timeout(Duration::from_secs(30), handshake)
        .await
        .map_err(|_| format!("{}: no reply to auth/subscribe within 30 s", target.url))?
}

/// The WebSocket upgrade on a connected stream, `auth` as the first message (a token allowing `allowed`), one
/// `subscribe` per topic of `subscribe`, and the replies to all of them.
async fn upgrade(
    stream: TcpStream,
    target: &Target,
    secret: &str,
    user: &str,
    allowed: &[String],
    subscribe: &[String],
    read_buffer: usize,
) -> Result<Ws, String> {
    stream.set_nodelay(true).map_err(|e| format!("{}: {e}", target.url))?;
    let config = WebSocketConfig::default().read_buffer_size(read_buffer).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(target.url.as_str(), stream, Some(config))
        .await
        .map_err(|e| format!("{}: {e}", target.url))?;
    let request =
        TokenRequest { sub: user, topics: allowed, ttl: Duration::from_secs(3600), audience: None, issuer: None };
    let token = issue_token(secret, &request).map_err(|e| e.to_string())?;
    ws.send(Message::text(json!({"type": "auth", "token": token}).to_string())).await.map_err(|e| e.to_string())?;
    for topic in subscribe {
        let request = json!({"type": "subscribe", "topic": topic}).to_string();
        ws.send(Message::text(request)).await.map_err(|e| e.to_string())?;
    }
    let mut replies = 1 + subscribe.len();
    while replies > 0 {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                if text.contains("\"error\"") {
                    return Err(format!("server refused: {text}"));
                }
                replies -= 1;
            }
            Some(Ok(Message::Close(frame))) => return Err(format!("closed during auth: {frame:?}")),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("during auth: {e}")),
            None => return Err("closed during auth".into()),
        }
    }
    Ok(ws)
}

/// The event id of a frame, or None for any other frame.
///
/// nudge (serde, fields in declaration order) and the socket ceiling both start event frames with
/// `{"type":"event","id":`; reading the digits there costs nanoseconds instead of a JSON parse per frame, which
/// matters at millions of frames per second. Anything else goes through serde.
fn event_id(text: &str) -> Option<i64> {
    const HEAD: &str = r#"{"type":"event","id":"#;
    if let Some(rest) = text.strip_prefix(HEAD) {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if let Ok(id) = rest[..digits].parse() {
            return Some(id);
        }
    }
    #[derive(Deserialize)]
    struct EventHead {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        id: i64,
    }
    let head: EventHead = serde_json::from_str(text).ok()?;
    (head.kind == "event").then_some(head.id)
}

/// Read frames until told to stop, logging each event with its receive time.
async fn read_frames<S>(
    mut stream: S,
    mode: Mode,
    epoch_us: u64,
    mut stop: watch::Receiver<bool>,
    stop_flag: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    throttle: Option<Throttle>,
) -> ReaderEnd
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let mut log = match mode {
        Mode::Saturate => ConnLog::Sequence { last: 0, unique: 0, duplicated: 0, last_us: 0 },
        _ => ConnLog::Records { base: None, records: Vec::new(), overflow: 0 },
    };
    let mut closed = None;
    // The stop is a flag looked at between frames (a connection flooded with frames never waits) and a watch
    // future polled only when no frame is ready (an idle connection wakes up for it). Polling the watch future
    // on every frame, as a select! would, cost ~5 % of the generator's CPU at millions of frames per second.
    let stopped = stop.wait_for(|stop| *stop);
    tokio::pin!(stopped);
    loop {
        if stop_flag.load(Ordering::Relaxed) {
            break;
        }
        let frame = std::future::poll_fn(|cx| match stream.poll_next_unpin(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => stopped.as_mut().poll(cx).map(|_| None),
        })
        .await;
        let Some(frame) = frame else { break };
        match frame {
            Some(Ok(Message::Text(text))) => {
                let Some(id) = event_id(text.as_str()) else { continue };
                received.fetch_add(1, Ordering::Relaxed);
                match &mut log {
                    ConnLog::Records { base, records, overflow } => {
                        let at_us = now_us();
                        let base = *base.get_or_insert(id);
                        match i32::try_from(id - base) {
                            Ok(delta) => {
                                let recv = u32::try_from(at_us.saturating_sub(epoch_us)).unwrap_or(u32::MAX);
                                records.push((delta, recv));
                            }
                            Err(_) => *overflow += 1,
                        }
                    }
                    ConnLog::Sequence { last, unique, duplicated, last_us } => {
                        let id = u64::try_from(id).unwrap_or(0);
                        if id > *last {
                            *unique += 1;
                            *last = id;
                        } else {
                            *duplicated += 1;
                        }
                        // Only the connection's last receive time is used (the end of the run's window): reading
                        // the clock on every 16th frame instead of every one saves ~8 % of the generator's CPU and
                        // places the end at most 15 frames early, milliseconds at these rates.
                        if *unique % 16 == 1 {
                            *last_us = now_us();
                        }
                    }
                }
                if let Some(throttle) = &throttle {
                    // A slow client: one frame, then its pause. Nothing is read meanwhile, so what the server
                    // sends piles up in the socket buffers and then in nudge's queue for it.
                    if !throttle.off.load(Ordering::Relaxed) {
                        tokio::time::sleep(throttle.period).await;
                    }
                }
            }
            Some(Ok(Message::Close(frame))) => {
                closed = Some(close_description(frame.map(|f| u16::from(f.code))));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                closed = Some(format!("error: {e}"));
                break;
            }
            None => {
                closed = Some("closed without a close frame".into());
                break;
            }
        }
    }
    ReaderEnd { log, closed, slow: throttle.is_some() }
}

fn close_description(code: Option<u16>) -> String {
    match code {
        Some(code) => format!("closed by server with code {code}"),
        None => "closed by server without a code".into(),
    }
}

/// How a stalled connection ended: read what is buffered (events it never read) up to the close frame, if any.
/// "Still open" when nothing more arrives within a second (what was buffered reads in far less), or after 10 s
/// of a server still sending.
async fn stalled_outcome(mut ws: Ws) -> String {
    let give_up = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let idle = (tokio::time::Instant::now() + Duration::from_secs(1)).min(give_up);
        match tokio::time::timeout_at(idle, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return close_description(frame.map(|f| u16::from(f.code))),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))) | Ok(None) => {
                return "closed without a close frame".into()
            }
            Ok(Some(Err(e))) => return format!("error: {e}"),
            Err(_) => return "still open".into(),
        }
    }
}
