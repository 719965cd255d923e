//! One WebSocket connection's state machine: authenticate, then serve requests and write queued events.
//!
//! One task per connection owns the socket; nothing else writes to it. Events reach it through the bounded
//! queue the hub fills, replies are written directly. What it reads from the table (a `resume`, the catch-up of a
//! queue that overflowed) it gets from `replay.rs`, which joins it to the live stream; this file speaks the
//! protocol and writes frames. The task ends on the client's close, an error, an authentication
//! failure (4001), an oversized frame (1009), a socket that accepts nothing for `NUDGE_WRITE_TIMEOUT` (1013), or
//! shutdown (1001), and always unregisters from the hub on the way out, even if it panicked.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::auth::{Authenticator, Identity};
use crate::config::ConnectionLimits;
use crate::health::Metrics;
use crate::hub::{ConnId, Frame, Hub};
use crate::outbox::{Control, Next, Outbox};
use crate::protocol::{self, ErrorCode, Reply, Request};
use crate::replay::{self, CatchUp, Chunk, Replays, Written};
use crate::shutdown::Shutdown;
use crate::wake::Wakeups;

mod rate;
mod write;

use rate::RateLimit;

/// Queued events written per flush: several frames per syscall, but a bounded stall for replies.
const FRAMES_PER_FLUSH: usize = 64;

/// What every connection needs from the rest of nudge.
pub struct Shared {
    /// Where the connection registers, subscribes, and finds the cursor its replays join at.
    pub hub: Arc<Hub>,
    /// A client's `wakeup` asks for a claim pass.
    pub wakeups: Arc<Wakeups>,
    /// Verifies `auth` and `refresh` tokens (and waits for a JWKS that is still being fetched).
    pub authenticator: Arc<Authenticator>,
    /// Connections opened, slow consumers closed.
    pub metrics: Arc<Metrics>,
    /// What one connection may do and cost: its queue, its subscriptions, its rates and timeouts.
    pub limits: ConnectionLimits,
    /// The table, for `resume` replays and catch-ups.
    pub replays: Replays,
}

impl Shared {
    /// Buffers sized for hints, not for tungstenite's 128 KiB default: memory per idle connection is what
    /// bounds how many one node holds. Client messages are small (a subscribe is ~50 bytes), so the read buffer
    /// starts at 512 bytes; tungstenite grows it for a larger frame, up to the inbound limit.
    pub fn websocket_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(512)
            .write_buffer_size(0)
            .max_message_size(Some(self.limits.max_message_size))
            .max_frame_size(Some(self.limits.max_message_size))
    }
}

/// After authentication: who this is, and what they are subscribed to.
struct Session {
    /// Its key in the hub, for subscribing and unregistering.
    id: ConnId,
    /// Who this is, and the topics their token allows; replaced by a `refresh` for the same user.
    identity: Identity,
    /// Events routed to this connection, or word that it fell behind and must catch up from the table.
    outbox: Arc<Outbox>,
    /// At most `max_subscriptions`, so a Vec and a linear search.
    topics: Vec<Box<str>>,
    /// What the join of replay and live stream needs to know of what this connection wrote.
    written: Written,
}

/// How the loop goes on after one step.
enum Step {
    Continue,
    /// Send an optional error frame, then close with this code.
    Close {
        code: u16,
        reason: &'static str,
        error: Option<(ErrorCode, String, Option<Value>)>,
    },
    /// The peer is gone or broken: nothing more can be written.
    Gone(String),
}

/// Serve one upgraded socket until it closes. `identity` is set when the upgrade request carried a valid token.
pub async fn serve<S>(
    ws: WebSocketStream<S>,
    shared: Arc<Shared>,
    identity: Option<Identity>,
    peer: SocketAddr,
    shutdown: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let rate = RateLimit::new(shared.limits.client_rate);
    let mut connection = Connection { ws, shared, peer, session: None, rate, last_heard: Instant::now() };
    // A panic here must not leave the connection registered (the hub would route to a dead queue forever): it
    // is caught, logged by the panic hook and below, and the connection unregisters like any other.
    let reason = match AssertUnwindSafe(connection.run(identity, shutdown)).catch_unwind().await {
        Ok(reason) => reason,
        Err(_) => {
            tracing::error!(%peer, "connection task panicked; unregistering it");
            "connection task panicked".to_owned()
        }
    };
    match &connection.session {
        Some(session) => {
            tracing::info!(conn = session.id, user = %session.identity.user, %peer, %reason, "connection closed");
            let topics = session.topics.iter().map(|t| &**t);
            connection.shared.hub.unregister(session.id, &session.identity.user, topics);
        }
        None => tracing::info!(user = "-", %peer, %reason, "connection closed"),
    }
}

struct Connection<S> {
    /// The socket; only this task writes to it.
    ws: WebSocketStream<S>,
    shared: Arc<Shared>,
    /// For the log.
    peer: SocketAddr,
    /// `None` until the connection authenticates: until then nothing is routed to it.
    session: Option<Session>,
    /// Counts every message the client sends, before it is parsed.
    rate: RateLimit,
    /// Last time the peer sent anything, pongs included: a silent peer is a dead one.
    last_heard: Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// The loop; returns why the connection ended, for the log.
    async fn run(&mut self, identity: Option<Identity>, mut shutdown: Shutdown) -> String {
        let limits = self.shared.limits.clone();
        // One timer for "must authenticate by" and, later, "token valid until".
        let deadline = tokio::time::sleep(limits.auth_timeout);
        tokio::pin!(deadline);
        if let Some(identity) = identity {
            deadline.as_mut().reset(instant_of(identity.valid_until));
            if let Err(e) = Box::pin(self.authenticate(identity, None)).await {
                return format!("write failed: {e}");
            }
        }
        let mut ping = tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            let step = tokio::select! {
                biased;
                _ = shutdown.triggered() => Step::Close { code: protocol::CLOSE_GOING_AWAY, reason: "server shutting down", error: None },
                inbound = self.ws.next() => Box::pin(self.on_inbound(inbound, &mut deadline)).await,
                next = next_event(&mut self.session) => match next {
                    Next::Frame(frame) => Box::pin(self.write_events(frame)).await,
                    Next::Behind => Box::pin(self.catch_up()).await,
                    Next::Control(Control::Revoke(message)) => Step::Close {
                        code: protocol::CLOSE_REVOKED,
                        reason: "revoked",
                        error: Some((ErrorCode::Revoked, message, None)),
                    },
                    Next::Control(Control::Unsubscribe(pattern)) => Box::pin(self.drop_subscriptions(&pattern)).await,
                },
                _ = &mut deadline => match &self.session {
                    None => Step::Close {
                        code: protocol::CLOSE_UNAUTHORIZED,
                        reason: "auth timeout",
                        error: Some((ErrorCode::Unauthorized, format!("no auth message within {:?}", limits.auth_timeout), None)),
                    },
                    Some(_) => Step::Close {
                        code: protocol::CLOSE_UNAUTHORIZED,
                        reason: "token expired",
                        error: Some((ErrorCode::TokenExpired, "token expired; connect again with a fresh token".into(), None)),
                    },
                },
                _ = ping.tick() => {
                    if self.last_heard.elapsed() > limits.ping_interval * 2 {
                        Step::Gone("peer silent for two ping intervals".into())
                    } else {
                        match Box::pin(self.write(Message::Ping(Default::default()))).await {
                            Ok(()) => Step::Continue,
                            Err(e) => Step::Gone(format!("write failed: {e}")),
                        }
                    }
                },
            };
            match step {
                Step::Continue => {}
                Step::Gone(reason) => return reason,
                Step::Close { code, reason, error } => {
                    if code == protocol::CLOSE_TOO_SLOW {
                        self.shared.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    }
                    // Boxed, like other rare paths: what the idle connection future does not hold costs nothing.
                    Box::pin(async {
                        if let Some((code, message, reference)) = error {
                            let _ = self.reply(Reply::Error { code, message: &message }, reference.as_ref()).await;
                        }
                        self.close(code, reason).await;
                    })
                    .await;
                    return reason.to_owned();
                }
            }
        }
    }

    async fn on_inbound(
        &mut self,
        inbound: Option<Result<Message, WsError>>,
        deadline: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Step {
        let message = match inbound {
            None => return Step::Gone("client disconnected".into()),
            Some(Err(WsError::Capacity(_))) => {
                let limit = self.shared.limits.max_message_size;
                return Step::Close {
                    code: protocol::CLOSE_TOO_LARGE,
                    reason: "frame too large",
                    error: Some((ErrorCode::TooLarge, format!("frames are limited to {limit} bytes"), None)),
                };
            }
            Some(Err(e)) => return Step::Gone(format!("read failed: {e}")),
            Some(Ok(message)) => message,
        };
        self.last_heard = Instant::now();
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                if !self.rate.allow() {
                    return self.error(ErrorCode::RateLimited, self.rate.message(), None).await;
                }
                return self
                    .error(ErrorCode::BadRequest, "binary frames are not supported: send JSON text".into(), None)
                    .await;
            }
            // tungstenite answers the close handshake itself on the next write or flush.
            Message::Close(_) => {
                let _ = self.ws.flush().await;
                return Step::Gone("client closed".into());
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Step::Continue,
        };
        if !self.rate.allow() {
            let reference = protocol::parse(&text).ok().and_then(|i| i.reference);
            return self.error(ErrorCode::RateLimited, self.rate.message(), reference).await;
        }
        match protocol::parse(&text) {
            // Boxed: requests are rare (rate-limited) and their states would otherwise sit in every idle
            // connection future.
            Ok(inbound) => Box::pin(self.on_request(inbound.request, inbound.reference, deadline)).await,
            Err(bad) => self.error(ErrorCode::BadRequest, bad.message, bad.reference).await,
        }
    }

    async fn on_request(
        &mut self,
        request: Request,
        reference: Option<Value>,
        deadline: &mut std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Step {
        let reference = reference.as_ref();
        let Some(session) = &mut self.session else {
            return match request {
                Request::Auth { token } => match self.shared.authenticator.verify_waiting(&token).await {
                    Ok(identity) => {
                        deadline.as_mut().reset(instant_of(identity.valid_until));
                        written(self.authenticate(identity, reference).await)
                    }
                    Err(e) => unauthorized(e.to_string(), reference),
                },
                Request::Ping => written(self.reply(Reply::Pong, reference).await),
                _ => unauthorized("authenticate first: send {\"type\":\"auth\",\"token\":...}".into(), reference),
            };
        };
        match request {
            Request::Auth { .. } => {
                let message = "already authenticated; send refresh to replace the token".into();
                self.error(ErrorCode::BadRequest, message, reference.cloned()).await
            }
            Request::Subscribe { topic } => {
                if let Err(message) = protocol::check_topic(&topic) {
                    return self.error(ErrorCode::BadRequest, message, reference.cloned()).await;
                }
                if !session.identity.topics.allows(&topic) {
                    let message = format!("your token does not allow subscribing to {topic}");
                    return self.error(ErrorCode::Forbidden, message, reference.cloned()).await;
                }
                if !session.topics.iter().any(|t| **t == *topic) {
                    let max = self.shared.limits.max_subscriptions;
                    if session.topics.len() >= max {
                        let message = format!("a connection may hold at most {max} subscriptions");
                        return self.error(ErrorCode::Forbidden, message, reference.cloned()).await;
                    }
                    self.shared.hub.subscribe(session.id, &topic);
                    session.topics.push(topic.as_str().into());
                }
                written(self.reply(Reply::Subscribed { topic: &topic }, reference).await)
            }
            Request::Unsubscribe { topic } => {
                if let Some(at) = session.topics.iter().position(|t| **t == *topic) {
                    session.topics.swap_remove(at);
                    // The hub first (no new frames of the topic), then what is already queued.
                    self.shared.hub.unsubscribe(session.id, &topic);
                    session.outbox.purge_topic(&topic);
                }
                written(self.reply(Reply::Unsubscribed { topic: &topic }, reference).await)
            }
            Request::Wakeup => {
                self.shared.wakeups.wake();
                Step::Continue
            }
            Request::Ping => written(self.reply(Reply::Pong, reference).await),
            // Boxed: the replay query makes this the largest state of the connection future, and it is rare.
            Request::Resume { since } => Box::pin(self.resume(since, reference)).await,
            Request::Refresh { token } => {
                let identity = match self.shared.authenticator.verify_waiting(&token).await {
                    Ok(identity) if identity.user == session.identity.user => identity,
                    Ok(_) => {
                        let message = crate::auth::AuthError::OtherUser.to_string();
                        return self.error(ErrorCode::Forbidden, message, reference.cloned()).await;
                    }
                    Err(e) => return self.error(ErrorCode::Unauthorized, e.to_string(), reference.cloned()).await,
                };
                // The new token's topics replace the old: drop what it no longer allows.
                let (kept, revoked): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut session.topics).into_iter().partition(|t| identity.topics.allows(t));
                session.topics = kept;
                for topic in &revoked {
                    self.shared.hub.unsubscribe(session.id, topic);
                    session.outbox.purge_topic(topic);
                }
                deadline.as_mut().reset(instant_of(identity.valid_until));
                let expires_at = identity.expires_at;
                session.identity = identity;
                for topic in &revoked {
                    if let Err(e) = self.reply(Reply::Unsubscribed { topic }, None).await {
                        return Step::Gone(format!("write failed: {e}"));
                    }
                }
                written(self.reply(Reply::Refreshed { expires_at }, reference).await)
            }
        }
    }

    /// `nudge.unsubscribe()`: drop every subscription matching `pattern` (a topic, or a prefix ending in `*`),
    /// purge what is queued of them, and announce each with `unsubscribed`.
    async fn drop_subscriptions(&mut self, pattern: &str) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        let matches = crate::auth::TopicPatterns::new([pattern.to_owned()]);
        let (dropped, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut session.topics).into_iter().partition(|t| matches.allows(t));
        session.topics = kept;
        for topic in &dropped {
            self.shared.hub.unsubscribe(session.id, topic);
            session.outbox.purge_topic(topic);
        }
        for topic in &dropped {
            if let Err(e) = self.reply(Reply::Unsubscribed { topic }, None).await {
                return Step::Gone(format!("write failed: {e}"));
            }
        }
        Step::Continue
    }

    /// Register with the hub and tell the client it is `ready`.
    async fn authenticate(&mut self, identity: Identity, reference: Option<&Value>) -> Result<(), WsError> {
        let (id, outbox) = self.shared.hub.register(&identity.user, self.shared.limits.outbound_queue);
        self.shared.metrics.connections_opened.fetch_add(1, Ordering::Relaxed);
        tracing::info!(conn = id, user = %identity.user, peer = %self.peer, "connection opened");
        let ready = Reply::Ready { user: &identity.user, expires_at: identity.expires_at }.encode(reference);
        self.session = Some(Session { id, identity, outbox, topics: Vec::new(), written: Written::default() });
        self.write(Message::Text(ready.into())).await
    }

    /// Write this event and whatever else is queued, up to a bound, with one `write()` (`write.rs`): a write
    /// per frame would cost a system call per event.
    async fn write_events(&mut self, first: Frame) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        let mut frames = Vec::with_capacity(FRAMES_PER_FLUSH);
        frames.push(first);
        session.outbox.pop_many(&mut frames, FRAMES_PER_FLUSH - 1);
        let queued_at = session.outbox.take_queued_at();
        let step = self.write_frames(&frames).await;
        if let (Step::Continue, Some(queued_at)) = (&step, queued_at) {
            self.shared.metrics.stages.routed_to_written.record(queued_at.elapsed());
        }
        step
    }

    /// The outbox overflowed and has been refusing live frames: rejoin the live stream and write, chunk by
    /// chunk, what the table holds of what was refused (`replay::CatchUp`). A catch-up that cannot read its
    /// events closes with 1013: the client reconnects and resumes.
    async fn catch_up(&mut self) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        let queue = self.shared.limits.outbound_queue;
        let catch_up = CatchUp::start(&self.shared.hub, &session.outbox, &mut session.written, queue);
        loop {
            let Some(session) = &mut self.session else { return Step::Continue };
            let topics: Vec<&str> = session.topics.iter().map(|t| &**t).collect();
            let user = &session.identity.user;
            let chunk = catch_up.next(&self.shared.replays, &mut session.written, user, &topics).await;
            drop(topics);
            match chunk {
                Chunk::Write(frames) => {
                    if let step @ (Step::Close { .. } | Step::Gone(_)) = self.write_replayed(&frames).await {
                        return step;
                    }
                }
                Chunk::Done => return Step::Continue,
                Chunk::Lost(reason) => return Step::Close { code: protocol::CLOSE_TOO_SLOW, reason, error: None },
            }
        }
    }

    /// `resume`: refused when repeated or with a negative `since`; otherwise write what `replay::resume` says
    /// this connection missed, then `resumed`.
    async fn resume(&mut self, since: i64, reference: Option<&Value>) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        if session.written.resumed() {
            let message = "resume is accepted once per connection, right after subscribing".into();
            return self.error(ErrorCode::BadRequest, message, reference.cloned()).await;
        }
        if since < 0 {
            return self
                .error(ErrorCode::BadRequest, "`since` must be a seq (0 or more)".into(), reference.cloned())
                .await;
        }
        let topics: Vec<&str> = session.topics.iter().map(|t| &**t).collect();
        let user = &session.identity.user;
        let shared = &self.shared;
        let resumed = replay::resume(&shared.replays, &shared.hub, &mut session.written, user, &topics, since).await;
        drop(topics);
        if let step @ (Step::Close { .. } | Step::Gone(_)) = self.write_replayed(&resumed.frames).await {
            return step;
        }
        let (until, replayed, complete) = (resumed.until, resumed.frames.len(), resumed.complete);
        written(self.reply(Reply::Resumed { since, until, replayed, complete }, reference).await)
    }

    async fn reply(&mut self, reply: Reply<'_>, reference: Option<&Value>) -> Result<(), WsError> {
        self.write(Message::Text(reply.encode(reference).into())).await
    }

    /// Send an error that leaves the connection open.
    async fn error(&mut self, code: ErrorCode, message: String, reference: Option<Value>) -> Step {
        written(self.reply(Reply::Error { code, message: &message }, reference.as_ref()).await)
    }
}

/// The step after a write: go on, or give up on a peer we cannot write to.
fn written(result: Result<(), WsError>) -> Step {
    match result {
        Ok(()) => Step::Continue,
        Err(e) => Step::Gone(format!("write failed: {e}")),
    }
}

fn unauthorized(message: String, reference: Option<&Value>) -> Step {
    Step::Close {
        code: protocol::CLOSE_UNAUTHORIZED,
        reason: "unauthorized",
        error: Some((ErrorCode::Unauthorized, message, reference.cloned())),
    }
}

/// The next queued event (or catch-up), or pending forever before authentication.
async fn next_event(session: &mut Option<Session>) -> Next {
    match session {
        Some(session) => session.outbox.next().await,
        None => std::future::pending().await,
    }
}

fn instant_of(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    Instant::now() + at.duration_since(now).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{JwtAlgorithm, JwtKey, JwtSettings};

    fn shared() -> Arc<Shared> {
        let authenticator = Authenticator::new(JwtSettings {
            algorithm: JwtAlgorithm::Hs256,
            key: JwtKey::Secret("0123456789abcdef0123456789abcdef".into()),
            audience: None,
            issuer: None,
            leeway: Duration::ZERO,
        })
        .expect("settings");
        Arc::new(Shared {
            hub: Arc::new(Hub::new()),
            wakeups: Arc::default(),
            authenticator: Arc::new(authenticator),
            metrics: Arc::default(),
            limits: ConnectionLimits {
                auth_timeout: Duration::from_secs(10),
                max_message_size: 4096,
                max_subscriptions: 100,
                outbound_queue: 256,
                client_rate: 50,
                ping_interval: Duration::from_secs(30),
                write_timeout: Duration::from_secs(10),
            },
            replays: Replays::unconnected(),
        })
    }

    /// A socket whose reads panic: stands in for any bug on a connection's path.
    struct PanickingReads(tokio::io::DuplexStream);

    impl AsyncRead for PanickingReads {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            panic!("injected fault in the connection's read path");
        }
    }

    impl AsyncWrite for PanickingReads {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_connection_task_that_panics_still_leaves_the_hub() {
        let shared = shared();
        let (io, _peer) = tokio::io::duplex(4096);
        let ws = WebSocketStream::from_raw_socket(
            PanickingReads(io),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        let identity = Identity {
            user: "alice".into(),
            expires_at: 0,
            valid_until: SystemTime::now() + Duration::from_secs(60),
            topics: crate::auth::TopicPatterns::default(),
        };
        let (_trigger, shutdown) = crate::shutdown::channel();
        serve(ws, shared.clone(), Some(identity), "127.0.0.1:1".parse().expect("addr"), shutdown).await;
        assert_eq!(shared.hub.connections(), 0);
    }

    /// The connection task's future is allocated once per connection and lives as long as the socket: its size
    /// is a direct part of the memory per idle connection.
    #[tokio::test]
    async fn the_connection_future_stays_small() {
        let shared = shared();
        let (io, _peer) = tokio::io::duplex(64);
        let ws =
            WebSocketStream::from_raw_socket(io, tokio_tungstenite::tungstenite::protocol::Role::Server, None).await;
        let (_trigger, shutdown) = crate::shutdown::channel();
        let future = serve(ws, shared, None, "127.0.0.1:1".parse().expect("addr"), shutdown);
        let size = std::mem::size_of_val(&future);
        eprintln!(
            "connection future: {size} bytes; WebSocketStream {} Session {} Sleep {} Interval {} Shutdown {}",
            std::mem::size_of::<WebSocketStream<tokio::io::DuplexStream>>(),
            std::mem::size_of::<Session>(),
            std::mem::size_of::<tokio::time::Sleep>(),
            std::mem::size_of::<tokio::time::Interval>(),
            std::mem::size_of::<Shutdown>(),
        );
        assert!(size < 4096, "connection future is {size} bytes");
    }
}
