//! nudge-bench: a load generator that measures nudge from the outside, as its users see it.
//!
//! It opens N authenticated WebSocket connections (spread over one or more nudge nodes), subscribes them,
//! produces events through PostgreSQL exactly as a backend would (INSERTs from several writer connections), and
//! measures on the client side: deliveries per second, latency from the producer's COMMIT to the client's
//! receive, and lost and duplicated events (which must be zero). With `--server-pid` it also reports the server
//! processes' RSS and CPU time from /proc. One JSON object on stdout; progress on stderr.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use nudge::auth::{issue_token, TokenRequest};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Each event has one recipient (`recipients = ARRAY['uK']`): one delivery per event.
    Targeted,
    /// Each event goes to topic `bench`, which every connection subscribes to: N deliveries per event.
    Topic,
}

#[derive(Debug, Parser)]
#[command(name = "nudge-bench", about = "Load generator for nudge: connections, events, latency, losses.")]
struct Args {
    /// WebSocket URL of a nudge node; repeat for several nodes (connections are spread round-robin).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,
    /// The database the nodes use; events are INSERTed here.
    #[arg(long, env = "NUDGE_DATABASE_URL")]
    database_url: String,
    /// HS256 secret the nodes verify tokens with.
    #[arg(long, env = "NUDGE_JWT_SECRET", hide_env_values = true)]
    secret: String,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    #[arg(long, value_enum, default_value_t = Mode::Targeted)]
    mode: Mode,
    /// Events per second over all writers; 0 = as fast as the writers can commit.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Concurrent producer connections.
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// How long to wait for the last deliveries after producing stops.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Server processes to read RSS and CPU from (/proc/PID).
    #[arg(long = "server-pid")]
    server_pids: Vec<u32>,
}

/// What the client needs from an event frame.
#[derive(Deserialize)]
struct EventHead {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: i64,
}

/// Receive times of one connection: (event id, when).
type Received = Vec<(i64, Instant)>;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(args).await {
        eprintln!("nudge-bench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    let rss_before_kib = server_rss_kib(&args.server_pids);
    let connect_started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let received_total = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(args.connections);
    let mut failed = 0usize;
    // Connect in waves so the handshake rate is measured, not the listen backlog.
    for chunk in (0..args.connections).collect::<Vec<_>>().chunks(256) {
        let attempts = chunk.iter().map(|&i| connect(&args, i));
        for result in futures_util::future::join_all(attempts).await {
            match result {
                Ok(ws) => {
                    let (stop, total) = (stop.clone(), received_total.clone());
                    readers.push(tokio::spawn(read_events(ws, stop, total)));
                }
                Err(e) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("nudge-bench: connection failed: {e}");
                    }
                }
            }
        }
    }
    let connected = readers.len();
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!("nudge-bench: {connected} connected ({failed} failed) in {connect_secs:.2}s");
    let cpu_before = server_cpu(&args.server_pids);

    // Produce.
    let commits: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let produce_started = Instant::now();
    let mut writers = Vec::new();
    for w in 0..args.writers.max(1) {
        writers.push(tokio::spawn(produce(
            args.database_url.clone(),
            w,
            args.writers.max(1),
            args.rate,
            args.duration,
            args.mode,
            args.connections,
            commits.clone(),
        )));
    }
    let mut produced = 0u64;
    for writer in writers {
        produced += writer.await.map_err(|e| e.to_string())??;
    }
    let produce_secs = produce_started.elapsed().as_secs_f64();
    let per_event = match args.mode {
        Mode::Targeted => 1,
        Mode::Topic => connected as u64,
    };
    let expected = produced * per_event;
    eprintln!("nudge-bench: produced {produced} events in {produce_secs:.2}s; waiting for {expected} deliveries");

    // Wait for the last deliveries (or the grace period), then stop the readers.
    let deadline = Instant::now() + args.grace;
    while received_total.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_kib = server_rss_kib(&args.server_pids);
    let cpu_after = server_cpu(&args.server_pids);
    stop.store(true, Ordering::Relaxed);
    let mut latencies_us: Vec<u64> = Vec::with_capacity(expected as usize);
    let mut duplicates = 0u64;
    let mut last_receive = produce_started;
    let commits = commits.lock().await;
    for reader in readers {
        let received = reader.await.map_err(|e| e.to_string())?;
        let mut seen = std::collections::HashSet::with_capacity(received.len());
        for (id, at) in received {
            if !seen.insert(id) {
                duplicates += 1;
                continue;
            }
            last_receive = last_receive.max(at);
            if let Some(committed) = commits.get(&id) {
                latencies_us.push(at.saturating_duration_since(*committed).as_micros() as u64);
            }
        }
    }
    let delivered = latencies_us.len() as u64;
    latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((latencies_us.len() as f64 * p).ceil() as usize).clamp(1, latencies_us.len()) - 1;
        latencies_us[i] as f64 / 1000.0
    };
    let delivery_secs = last_receive.saturating_duration_since(produce_started).as_secs_f64().max(produce_secs);
    let summary = json!({
        "nodes": args.urls.len(),
        "mode": format!("{:?}", args.mode).to_lowercase(),
        "connections": connected,
        "connection_failures": failed,
        "handshakes_per_s": connected as f64 / connect_secs,
        "writers": args.writers,
        "target_rate": args.rate,
        "events": produced,
        "events_per_s": produced as f64 / produce_secs,
        "deliveries_expected": expected,
        "deliveries": delivered,
        "deliveries_per_s": delivered as f64 / delivery_secs,
        "lost": expected.saturating_sub(delivered),
        "duplicated": duplicates,
        "latency_ms": { "p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": pct(1.0) },
        "server_rss_kib_before": rss_before_kib,
        "server_rss_kib": rss_kib,
        "server_rss_kib_per_connection": (rss_kib.saturating_sub(rss_before_kib)) as f64 / connected.max(1) as f64,
        "server_cpu_s": cpu_after - cpu_before,
    });
    println!("{summary}");
    Ok(())
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connect connection `i` as user `u{i}`, authenticate with the first message, subscribe in topic mode.
async fn connect(args: &Args, i: usize) -> Result<Ws, String> {
    let url = &args.urls[i % args.urls.len()];
    // A small read buffer, as a client library on a phone would have: the generator must not be the bottleneck
    // in memory either.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let user = format!("u{i}");
    let topics = vec!["bench".to_owned()];
    let request =
        TokenRequest { sub: &user, topics: &topics, ttl: Duration::from_secs(3600), audience: None, issuer: None };
    let token = issue_token(&args.secret, &request).map_err(|e| e.to_string())?;
    let send = |text: String| Message::Text(text.into());
    ws.send(send(json!({"type": "auth", "token": token}).to_string())).await.map_err(|e| e.to_string())?;
    if args.mode == Mode::Topic {
        ws.send(send(json!({"type": "subscribe", "topic": "bench"}).to_string())).await.map_err(|e| e.to_string())?;
    }
    let expected = if args.mode == Mode::Topic { 2 } else { 1 };
    let mut replies = 0;
    while replies < expected {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                if text.contains("\"error\"") {
                    return Err(format!("server refused: {text}"));
                }
                replies += 1;
            }
            Ok(Some(Ok(_))) => {}
            other => return Err(format!("no reply to auth/subscribe: {other:?}")),
        }
    }
    Ok(ws)
}

/// Record (id, receive time) for every event until told to stop.
async fn read_events(mut ws: Ws, stop: Arc<AtomicBool>, total: Arc<AtomicU64>) -> Received {
    let mut received = Received::new();
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(100), ws.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let at = Instant::now();
                if let Ok(head) = serde_json::from_str::<EventHead>(&text) {
                    if head.kind == "event" {
                        received.push((head.id, at));
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(Some(Err(_))) | Ok(None) => break,
        }
    }
    received
}

/// One writer: INSERT events at its share of the rate for `duration`, recording each COMMIT's time by id.
#[allow(clippy::too_many_arguments)]
async fn produce(
    database_url: String,
    writer: usize,
    writers: usize,
    rate: f64,
    duration: Duration,
    mode: Mode,
    connections: usize,
    commits: Arc<Mutex<HashMap<i64, Instant>>>,
) -> Result<u64, String> {
    let (client, connection) =
        tokio_postgres::connect(&database_url, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let statement = client
        .prepare(
            "INSERT INTO nudge.events (topic, kind, recipients, data) \
             VALUES ('bench', 'bench.event', $1, '{\"bench\": true}') RETURNING id",
        )
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut tick = (rate > 0.0).then(|| {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(writers as f64 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        tick
    });
    let mut produced = 0u64;
    let mut k = writer;
    while started.elapsed() < duration {
        if let Some(tick) = &mut tick {
            tick.tick().await;
        }
        let recipients: Option<Vec<String>> = match mode {
            Mode::Targeted => Some(vec![format!("u{}", k % connections.max(1))]),
            Mode::Topic => None,
        };
        k += writers;
        let row = client.query_one(&statement, &[&recipients]).await.map_err(|e| e.to_string())?;
        // The statement's implicit transaction has committed when its reply arrives.
        let committed = Instant::now();
        commits.lock().await.insert(row.get(0), committed);
        produced += 1;
    }
    Ok(produced)
}

fn server_rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum::<u64>()
}

/// User + system CPU seconds of the given processes.
fn server_cpu(pids: &[u32]) -> f64 {
    let ticks_per_s = 100.0; // USER_HZ on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may contain spaces) start after the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks_per_s)
        })
        .sum()
}
