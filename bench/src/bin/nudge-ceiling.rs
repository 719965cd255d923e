//! nudge-ceiling: the socket ceiling of this machine, for scripts/bench (target P5).
//!
//! A minimal tokio-tungstenite broadcaster with no database and no authentication. It speaks just enough of
//! nudge's protocol v1 for nudge-bench: `auth` gets `ready`, `subscribe` gets `subscribed`, `ping` gets `pong`.
//! The first `wakeup` from any connection starts a broadcast of event frames with ids 1, 2, 3, … to every
//! connection, as fast as the sockets take them, for `--duration`; then sending stops and connections stay open.
//! nudge's fan-out is measured against this: the same frames, the same library, nothing else to do.
//!
//! Frames are never skipped: the broadcast waits for the slowest connection (backpressure), so a client that
//! stops reading stops the broadcast for everyone. That is right for a ceiling driven by a generator that reads
//! everything, and is why nudge (which closes such clients with 1013) is not built this way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames the broadcast queue can hold. The producer never lets the slowest connection fall this far behind, so
/// no connection lags and skips frames (which nudge-bench would count as lost): backpressure, not loss.
const CAPACITY: usize = 4096;
/// Frames the producer keeps queued ahead of the slowest connection: eight full batches, so a writer always finds
/// a whole batch, and few enough that the broadcast stops soon after `--duration` (at 10,000 connections and 2M
/// frames/s, 512 frames are 2.5 s of one connection's stream).
const FILL: usize = 512;
/// Frames written per flush: one write() on loopback costs 2-4.5 µs, so batching is what makes a ceiling.
const FRAMES_PER_FLUSH: usize = 64;

#[derive(Debug, Parser)]
#[command(name = "nudge-ceiling", about = "Socket ceiling: broadcast nudge-shaped event frames, no database.")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// How long to broadcast after the first `wakeup`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

/// The fields of a client request the ceiling looks at.
#[derive(Deserialize)]
struct Request {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    topic: Option<String>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("nudge-ceiling: cannot listen on {}: {e}", args.listen);
            std::process::exit(1);
        }
    };
    let (tx, _) = broadcast::channel::<Utf8Bytes>(CAPACITY);
    let started = Arc::new(AtomicBool::new(false));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, usually: back off instead of spinning, keep the connections we have.
                eprintln!("nudge-ceiling: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Subscribe before the handshake finishes so a connection sees every frame sent after it was accepted.
        let (rx, tx, started) = (tx.subscribe(), tx.clone(), started.clone());
        // A connection's end is not news: generators reset thousands of them when a run ends.
        tokio::spawn(async move {
            let _ = serve(stream, rx, tx, started, args.duration).await;
        });
    }
}

/// One connection: answer requests, and write broadcast frames in batches of up to `FRAMES_PER_FLUSH`.
async fn serve(
    stream: TcpStream,
    mut rx: broadcast::Receiver<Utf8Bytes>,
    tx: broadcast::Sender<Utf8Bytes>,
    started: Arc<AtomicBool>,
    duration: Duration,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    // Small frames, written in batches: no Nagle delay on the last frame of a batch.
    let _ = stream.set_nodelay(true);
    // A small read buffer as nudge has; a write buffer that holds a whole batch (64 frames of ~120 bytes), so
    // `feed` only buffers and `flush` makes one write(). With write_buffer_size(0) every feed would write.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(16 * 1024);
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    loop {
        tokio::select! {
            frame = rx.recv() => {
                let first = match frame {
                    Ok(frame) => frame,
                    // Cannot happen while the producer waits for the slowest receiver; skip ahead if it does.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return Ok(()),
                };
                ws.feed(Message::Text(first)).await?;
                for _ in 1..FRAMES_PER_FLUSH {
                    match rx.try_recv() {
                        Ok(frame) => ws.feed(Message::Text(frame)).await?,
                        Err(TryRecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    }
                }
                ws.flush().await?;
            }
            message = ws.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => continue, // pings are answered by tungstenite on the next write
                    Some(Err(e)) => return Err(e),
                };
                // Malformed requests are ignored: the generator never sends any, and this is not nudge.
                let Ok(request) = serde_json::from_str::<Request>(&text) else { continue };
                let reply = match request.kind.as_str() {
                    "auth" => json!({"type": "ready", "user": "x", "expires_at": 0}),
                    "subscribe" => json!({"type": "subscribed", "topic": request.topic}),
                    "ping" => json!({"type": "pong"}),
                    "wakeup" => {
                        if !started.swap(true, Ordering::SeqCst) {
                            tokio::spawn(produce(tx.clone(), duration));
                        }
                        continue;
                    }
                    _ => continue,
                };
                ws.send(Message::Text(reply.to_string().into())).await?;
            }
        }
    }
}

/// Broadcast frames K = 1, 2, … for `duration`, each serialized once and shared by every connection.
async fn produce(tx: broadcast::Sender<Utf8Bytes>, duration: Duration) {
    let deadline = tokio::time::Instant::now() + duration;
    let mut k: u64 = 0;
    eprintln!("nudge-ceiling: broadcasting to {} connections for {duration:?}", tx.receiver_count());
    while tokio::time::Instant::now() < deadline {
        // Top the queue up to FILL in one go, then sleep (1 ms timer) until the slowest connection has taken a
        // batch. Yielding after every few frames instead leaves the producer behind thousands of runnable
        // writers, which then find small batches. Making a frame costs ~0.3 µs, a top-up at most ~0.2 ms.
        let room = FILL.saturating_sub(tx.len());
        if room < FRAMES_PER_FLUSH {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        for _ in 0..room {
            k += 1;
            let frame = format!(
                r#"{{"type":"event","id":{k},"seq":{k},"topic":"bench","kind":"bench.event","at":"2026-01-01T00:00:00.000Z","data":{{}}}}"#
            );
            // With no receiver (every connection gone) send fails; keep counting, a receiver may come.
            let _ = tx.send(frame.into());
        }
    }
    eprintln!("nudge-ceiling: sent {k} frames to each connection");
}
