//! What a TCP connection may cost before it is a WebSocket: the header-read and keep-alive deadlines, the
//! header size limit, the cap on connections not yet upgraded and the per-address cap. Every test here holds
//! real sockets open against a real `nudge`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How a socket ended, seen from the client, and the bytes the server sent before.
#[derive(Debug)]
enum End {
    /// The server closed it (end-of-file).
    Eof(Vec<u8>),
    /// The server reset it.
    Reset(Vec<u8>),
    /// Still open when we stopped waiting.
    Open(Vec<u8>),
}

impl End {
    fn closed(&self) -> bool {
        !matches!(self, End::Open(_))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            End::Eof(b) | End::Reset(b) | End::Open(b) => b,
        }
    }
}

/// Read until the server closes the socket or `within` passes.
async fn read_to_close(stream: &mut (impl tokio::io::AsyncRead + Unpin), within: Duration) -> End {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return End::Open(got),
            Ok(Ok(0)) => return End::Eof(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => return End::Reset(got),
        }
    }
}

/// A TCP connection to nudge from `source` (any 127.0.0.0/8 address reaches it over loopback).
async fn connect_from(source: [u8; 4], port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from((source, 0))).expect("bind the source address");
    socket.connect(SocketAddr::from(([127, 0, 0, 1], port))).await.expect("connect")
}

async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).await.expect("connect")
}

/// One complete response on a kept-alive connection: (status line, body).
async fn request(stream: &mut TcpStream, path: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: nudge\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(SOON, stream.read(&mut buf)).await.expect("a response").expect("read");
        assert!(n > 0, "closed before a complete response; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let length = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse::<usize>().ok())
            .expect("a content-length");
        if body.len() >= length {
            let status = head.lines().next().unwrap_or_default().to_owned();
            return (status, body.to_owned());
        }
    }
}

/// `GET /healthz` on a new connection from `source`: was it answered 200?
async fn served_from(source: [u8; 4], port: u16) -> bool {
    let mut stream = connect_from(source, port).await;
    let request = b"GET /healthz HTTP/1.1\r\nHost: nudge\r\nConnection: close\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return false;
    }
    String::from_utf8_lossy(read_to_close(&mut stream, SOON).await.bytes()).starts_with("HTTP/1.1 200")
}

async fn served(port: u16) -> bool {
    served_from([127, 0, 0, 1], port).await
}

/// The socket is closed at once, without a byte of response.
async fn assert_closed_at_once(mut stream: TcpStream, what: &str) {
    let end = read_to_close(&mut stream, Duration::from_secs(2)).await;
    assert!(end.closed() && end.bytes().is_empty(), "{what}: expected an immediate close, got {end:?}");
}

/// None of `streams` is closed within `SILENCE`.
async fn assert_still_open(streams: &mut [TcpStream], what: &str) {
    for stream in streams {
        let end = read_to_close(stream, SILENCE).await;
        assert!(!end.closed(), "{what}: closed, expected it to stay open ({end:?})");
    }
}

const HALF_HEADER: &[u8] = b"GET /ws HTTP/1.1\r\nHost: nudge\r\nUpgrade: websocket\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Connects and sends nothing.
    Idle,
    /// Sends part of a request header and stops.
    Half,
    /// Sends a header one byte every 100 ms, which would take longer than the timeout.
    Drip,
}

/// A hostile socket that was opened, and how it ended.
struct Hostile {
    kind: Kind,
    /// From connect to the server closing it.
    lived: Duration,
    end: End,
}

/// Open `count` hostile sockets, of `kinds` in turn; the returned handles finish when the server has closed
/// each one or `within` has passed. Returns once every socket is connected and has sent its bytes.
async fn storm(
    source: [u8; 4],
    port: u16,
    count: usize,
    kinds: &[Kind],
    within: Duration,
) -> Vec<tokio::task::JoinHandle<Hostile>> {
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel(count);
    let mut handles = Vec::with_capacity(count);
    for i in 0..count {
        let kind = kinds[i % kinds.len()];
        let opened_tx = opened_tx.clone();
        handles.push(tokio::spawn(async move {
            let stream = connect_from(source, port).await;
            let opened = Instant::now();
            let (mut read, mut write) = stream.into_split();
            match kind {
                Kind::Idle => {}
                // It may already be closed (over a cap): that is for the caller to judge from how it ended.
                Kind::Half => _ = write.write_all(HALF_HEADER).await,
                Kind::Drip => {
                    tokio::spawn(async move {
                        let header =
                            format!("GET /healthz HTTP/1.1\r\nHost: nudge\r\nX-Slow: {}\r\n\r\n", "a".repeat(200));
                        for byte in header.as_bytes() {
                            if write.write_all(&[*byte]).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    });
                }
            }
            let _ = opened_tx.send(()).await;
            let end = read_to_close(&mut read, within).await;
            Hostile { kind, lived: opened.elapsed(), end }
        }));
    }
    for _ in 0..count {
        opened_rx.recv().await.expect("every hostile socket opens");
    }
    handles
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_and_half_sent_sockets_are_closed_by_the_header_timeout_while_a_real_client_gets_events() {
    const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
    const HOSTILE: usize = 500;
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_HEADER_TIMEOUT", "2s")]).await;
    let producer = db.client().await;

    let storm_began = Instant::now();
    let kinds = [Kind::Idle, Kind::Half, Kind::Drip];
    let storm = storm([127, 0, 0, 1], nudge.port, HOSTILE, &kinds, HEADER_TIMEOUT + Duration::from_secs(5)).await;

    // During the storm a real client connects, subscribes and gets an event, without waiting for the storm.
    let started = Instant::now();
    let mut alice = authed(&nudge, "alice", &["post:*"]).await;
    alice.subscribe("post:1").await;
    let connected = started.elapsed();
    let inserted = Instant::now();
    insert_event(&producer, "post:1", "comment.created", "{}").await;
    let event = alice.recv_type("event").await;
    let latency = inserted.elapsed();
    assert_eq!(event["topic"], "post:1");
    assert!(connected < Duration::from_secs(1), "connect, auth and subscribe took {connected:?} during the storm");
    assert!(latency < Duration::from_secs(1), "the event took {latency:?} during the storm");
    let during = storm_began.elapsed();
    assert!(during < HEADER_TIMEOUT, "all of it while every hostile socket was still open (took {during:?})");

    for handle in storm {
        let hostile = handle.await.expect("storm task");
        let (kind, lived, end) = (hostile.kind, hostile.lived, &hostile.end);
        assert!(end.closed(), "{kind:?} socket still open after {lived:?}");
        assert!(end.bytes().is_empty(), "{kind:?} socket got a response: {end:?}");
        assert!(
            lived >= HEADER_TIMEOUT - Duration::from_millis(100) && lived < HEADER_TIMEOUT + Duration::from_secs(3),
            "{kind:?} socket closed after {lived:?}, expected the header timeout ({HEADER_TIMEOUT:?})"
        );
    }
    // The real client was not disturbed, and nothing is left pending.
    alice.ping().await;
    assert_eq!(nudge.metric("nudge_http_pending_connections").await, 1.0, "only the /metrics request itself");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_pending_cap_closes_the_oldest_pending_connection_so_real_clients_still_get_in() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_MAX_PENDING_CONNECTIONS", "4"), ("NUDGE_HEADER_TIMEOUT", "30s")]).await;

    // A WebSocket stops counting once upgraded; four idle sockets then fill the cap, oldest first.
    let mut alice = authed(&nudge, "alice", &["post:*"]).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(nudge.port).await);
    }
    // A fifth connection is served: the oldest idle socket gave it its place, the others keep waiting.
    assert!(served(nudge.port).await, "a connection over the cap is served");
    assert_closed_at_once(held.remove(0), "the oldest pending connection").await;
    assert_still_open(&mut held, "the newer pending connections").await;
    // Full again (the served connection closed); a real client upgrades too, at the cost of the next oldest.
    held.push(connect(nudge.port).await);
    let mut bob = authed(&nudge, "bob", &["post:*"]).await;
    assert_closed_at_once(held.remove(0), "the next oldest pending connection").await;
    assert_still_open(&mut held, "the newer pending connections").await;
    alice.ping().await;
    bob.ping().await;

    let (status, metrics) = http_get(nudge.port, "/metrics").await;
    assert_eq!(status, 200);
    assert!(parse_metric(&metrics, "nudge_http_refused_total{cap=\"pending\"}").unwrap_or(0.0) >= 2.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_per_address_cap_are_closed_at_once_and_websockets_count_until_they_close() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_MAX_CONNECTIONS_PER_IP", "3"), ("NUDGE_HEADER_TIMEOUT", "30s")]).await;

    // 127.0.0.1 holds two idle sockets and a WebSocket: three, its cap.
    let alice = authed(&nudge, "alice", &["post:*"]).await;
    let mut held = vec![connect(nudge.port).await, connect(nudge.port).await];
    assert_closed_at_once(connect(nudge.port).await, "a fourth connection from 127.0.0.1").await;
    assert_still_open(&mut held, "a connection within the per-address cap").await;
    // Another address is not affected.
    assert!(served_from([127, 0, 0, 2], nudge.port).await, "a connection from 127.0.0.2");

    // The WebSocket closes: its place comes back when its connection task ends.
    drop(alice);
    eventually!(SOON, "a place for 127.0.0.1 again", served(nudge.port).await);
    let (_, metrics) = http_get(nudge.port, "/metrics").await;
    assert!(metrics.contains("nudge_http_refused_total{cap=\"per_ip\"} "), "{metrics}");
    assert!(!metrics.contains("nudge_http_refused_total{cap=\"per_ip\"} 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_header_over_the_size_limit_gets_431_and_the_connection_is_closed() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_MAX_HEADER_SIZE", "2048")]).await;
    let header = |pad: usize| format!("GET /healthz HTTP/1.1\r\nHost: nudge\r\nX-Pad: {}\r\n\r\n", "a".repeat(pad));

    let mut fits = connect(nudge.port).await;
    fits.write_all(header(1900).as_bytes()).await.expect("send");
    let end = read_to_close(&mut fits, Duration::from_secs(2)).await;
    assert!(String::from_utf8_lossy(end.bytes()).starts_with("HTTP/1.1 200"), "{end:?}");

    // Complete but too long, and too long without an end: both 431, then closed.
    for (what, bytes) in
        [("complete", header(2100)), ("unfinished", format!("GET / HTTP/1.1\r\nX-Pad: {}", "a".repeat(4000)))]
    {
        let mut stream = connect(nudge.port).await;
        stream.write_all(bytes.as_bytes()).await.expect("send");
        let end = read_to_close(&mut stream, Duration::from_secs(2)).await;
        let text = String::from_utf8_lossy(end.bytes()).into_owned();
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{what}: {end:?}");
        assert!(end.closed(), "{what}: the connection must be closed after the 431");
    }
    assert!(served(nudge.port).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout_not_the_header_timeout() {
    const KEEP_ALIVE: Duration = Duration::from_secs(3);
    const HEADER: Duration = Duration::from_secs(1);
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_KEEP_ALIVE_TIMEOUT", "3s"), ("NUDGE_HEADER_TIMEOUT", "1s")]).await;

    // Idle after a response: open past the header timeout, closed at the keep-alive timeout.
    let mut idle = connect(nudge.port).await;
    assert_eq!(request(&mut idle, "/healthz").await, ("HTTP/1.1 200 OK".into(), "ok\n".into()));
    let answered = Instant::now();
    assert_eq!(request(&mut idle, "/healthz").await.0, "HTTP/1.1 200 OK", "the connection is kept alive");
    let answered_again = Instant::now();
    let end = read_to_close(&mut idle, KEEP_ALIVE + Duration::from_secs(3)).await;
    let idle_for = answered_again.elapsed();
    assert!(end.closed() && end.bytes().is_empty(), "{end:?}");
    assert!(
        idle_for >= KEEP_ALIVE - Duration::from_millis(100) && idle_for < KEEP_ALIVE + Duration::from_secs(2),
        "closed after {idle_for:?} idle, expected the keep-alive timeout {KEEP_ALIVE:?} (first answer {:?} ago)",
        answered.elapsed()
    );

    // The next request started but never finished: the header timeout, counted from its first byte.
    let mut slow = connect(nudge.port).await;
    request(&mut slow, "/healthz").await;
    slow.write_all(HALF_HEADER).await.expect("half a header");
    let started = Instant::now();
    let end = read_to_close(&mut slow, KEEP_ALIVE + Duration::from_secs(3)).await;
    let took = started.elapsed();
    assert!(end.closed() && end.bytes().is_empty(), "{end:?}");
    assert!(
        took >= HEADER - Duration::from_millis(100) && took < HEADER + Duration::from_millis(1500),
        "closed {took:?} after the next request began, expected the header timeout {HEADER:?}"
    );
}

/// The target, measured against a given binary (not part of the suite):
/// `STORM_BIN=target/release/nudge STORM_SOCKETS=5000 STORM_ENV=NUDGE_MAX_PENDING_CONNECTIONS=10000 \
///  cargo test --test http_limits -- --ignored --nocapture storm_measurement`
/// (STORM_ENV: comma-separated NUDGE_*=value; STORM_SOURCE: the storm's source address, default 127.0.0.1,
/// the real client's).
/// Half the sockets send nothing, half send part of a header; meanwhile a real client connects, subscribes
/// and gets an event every 250 ms until the server has closed every hostile socket.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn storm_measurement() {
    let sockets: usize = std::env::var("STORM_SOCKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(5000);
    let bin = std::env::var("STORM_BIN").unwrap_or_else(|_| nudge_bin().to_owned());
    let extra = std::env::var("STORM_ENV").unwrap_or_default();
    let db = TestDb::new().await;
    let mut env = vec![
        ("NUDGE_DATABASE_URL".to_owned(), db.url.clone()),
        ("NUDGE_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("NUDGE_JWT_SECRET".to_owned(), SECRET.to_owned()),
        ("RUST_LOG".to_owned(), "info".to_owned()),
    ];
    env.extend(extra.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())));
    let mut command = std::process::Command::new(&bin);
    command.env_clear().envs(env.iter().map(|(k, v)| (k, v))).stdin(std::process::Stdio::null());
    command.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let nudge = Nudge::spawn(command).await;
    nudge.wait_ready().await;
    let producer = db.client().await;

    let began = Instant::now();
    let source = std::env::var("STORM_SOURCE").ok().and_then(|v| v.parse::<std::net::Ipv4Addr>().ok());
    let source = source.map_or([127, 0, 0, 1], |ip| ip.octets());
    let storm = storm(source, nudge.port, sockets, &[Kind::Idle, Kind::Half], Duration::from_secs(120)).await;
    let opened_in = began.elapsed();
    let storm = tokio::spawn(async move {
        let mut ended = Vec::with_capacity(storm.len());
        for handle in storm {
            ended.push(handle.await.expect("storm task"));
        }
        (ended, began.elapsed())
    });

    let (mut connects, mut latencies) = (Vec::new(), Vec::new());
    while !storm.is_finished() {
        let started = Instant::now();
        let mut client = authed(&nudge, "alice", &["post:*"]).await;
        client.subscribe("post:1").await;
        connects.push(started.elapsed());
        let inserted = Instant::now();
        insert_event(&producer, "post:1", "k", "{}").await;
        client.recv_type("event").await;
        latencies.push(inserted.elapsed());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (ended, all_closed) = storm.await.expect("storm");
    let open = ended.iter().filter(|h| !h.end.closed()).count();
    let lived = |h: &Hostile| h.lived;
    let (min, max) = (ended.iter().map(lived).min(), ended.iter().map(lived).max());
    connects.sort();
    latencies.sort();
    println!(
        "{sockets} hostile sockets ({bin}, {extra:?}, from {source:?}): opened in {opened_in:?}; still open after 120 s: {open}; \
         closed after min {min:?}, max {max:?} (all closed {:?} after the first was opened)\n\
         real client during the storm, {} rounds: connect+auth+subscribe median {:?} max {:?}; \
         event latency median {:?} max {:?}",
        all_closed,
        connects.len(),
        connects.get(connects.len() / 2),
        connects.last(),
        latencies.get(latencies.len() / 2),
        latencies.last(),
    );
}
