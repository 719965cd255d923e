//! One WebSocket connection's state machine: authenticate, then serve requests and write queued events.
//!
//! One task per connection owns the socket; nothing else writes to it. Events reach it through the bounded
//! queue the hub fills, replies are written directly. A queue that overflowed makes the connection catch up from
//! the table (`catch_up`) instead of closing it. The task ends on the client's close, an error, an authentication
//! failure (4001), an oversized frame (1009), a socket that accepts nothing for `NUDGE_WRITE_TIMEOUT` (1013), or
//! shutdown (1001), and always unregisters from the hub on the way out, even if it panicked.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::Pool;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::auth::{Authenticator, Identity};
use crate::config::ConnectionLimits;
use crate::db::events;
use crate::health::Metrics;
use crate::hub::{ConnId, Frame, Hub};
use crate::outbox::{Control, Next, Outbox};
use crate::protocol::{self, ErrorCode, Reply, Request};
use crate::shutdown::Shutdown;
use crate::wake::Wakeups;

/// Queued events written per flush: several frames per syscall, but a bounded stall for replies.
const FRAMES_PER_FLUSH: usize = 64;
/// Events one `resume` replays at most; beyond that the reply says `complete: false` and the client refetches.
pub const RESUME_LIMIT: i64 = 1000;
/// A `resume` whose replay (waiting for a connection of the replay pool included) takes longer answers
/// `complete: false` with what it has not got: the client refetches rather than waits.
const RESUME_DEADLINE: Duration = Duration::from_secs(4);

/// What every connection needs from the rest of nudge.
pub struct Shared {
    pub hub: Arc<Hub>,
    /// A client's `wakeup` asks for a claim pass.
    pub wakeups: Arc<Wakeups>,
    pub authenticator: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub limits: ConnectionLimits,
    /// For `resume` replays and catch-ups: a pool of its own (`NUDGE_REPLAY_POOL_SIZE`), so that a storm of
    /// replays queues behind itself, never in front of claims and live delivery.
    pub replay_pool: Pool,
    /// Client-side limit on each replay query.
    pub statement_timeout: Duration,
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
    id: ConnId,
    identity: Identity,
    /// Events routed to this connection, or word that it fell behind and must catch up from the table.
    outbox: Arc<Outbox>,
    /// At most `max_subscriptions`, so a Vec and a linear search.
    topics: Vec<Box<str>>,
    /// Highest seq written to the socket; live frames at or below it were already sent by a `resume` replay or
    /// a catch-up. Where a catch-up starts.
    last_sent_seq: i64,
    /// Live events written before a `resume` (it comes right after subscribing, so these are few): the replay
    /// leaves them out. Dropped after `SENT_BEFORE_RESUME` entries, to keep long-lived connections small.
    sent_before_resume: SentBeforeResume,
    resumed: bool,
}

/// What a connection remembers of its live events until it resumes.
enum SentBeforeResume {
    Seqs(Vec<i64>),
    /// More than `SENT_BEFORE_RESUME` were sent: a later `resume` cannot tell which events it would repeat.
    TooMany,
}

/// Live events remembered per connection for a later `resume`.
const SENT_BEFORE_RESUME: usize = 64;

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
    ws: WebSocketStream<S>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    session: Option<Session>,
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
        self.session = Some(Session {
            id,
            identity,
            outbox,
            topics: Vec::new(),
            last_sent_seq: 0,
            sent_before_resume: SentBeforeResume::Seqs(Vec::new()),
            resumed: false,
        });
        self.write(Message::Text(ready.into())).await
    }

    /// Write this event and whatever else is queued, up to a bound, with one `write()`: the frames are encoded
    /// into one buffer (`protocol::encode_text_frame`) and written to the socket directly. One write per frame
    /// costs several times more per event (nudge-bench's topic scenarios).
    async fn write_events(&mut self, first: Frame) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        let mut frames = Vec::with_capacity(FRAMES_PER_FLUSH);
        frames.push(first);
        session.outbox.pop_many(&mut frames, FRAMES_PER_FLUSH - 1);
        self.write_frames(&frames).await
    }

    /// Write event frames not yet written (seq above `last_sent_seq`), in one buffer, remembering what was sent.
    async fn write_frames(&mut self, frames: &[Frame]) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        let mut batch = Vec::new();
        for frame in frames {
            // At or below last_sent_seq: a resume replay or a catch-up already wrote it.
            if frame.seq > session.last_sent_seq {
                if let (false, SentBeforeResume::Seqs(seqs)) = (session.resumed, &mut session.sent_before_resume) {
                    if seqs.len() < SENT_BEFORE_RESUME {
                        seqs.push(frame.seq);
                    } else {
                        session.sent_before_resume = SentBeforeResume::TooMany;
                    }
                }
                session.last_sent_seq = frame.seq;
                protocol::encode_text_frame(&mut batch, frame.text.as_bytes());
            }
        }
        self.write_encoded(&batch).await
    }

    /// Write frames already encoded into one buffer with one `write()`, after whatever tungstenite holds.
    async fn write_encoded(&mut self, batch: &[u8]) -> Step {
        if batch.is_empty() {
            return Step::Continue;
        }
        let limit = self.shared.limits.write_timeout;
        // Anything tungstenite still holds (a reply, an automatic pong) goes first: frames never interleave.
        match tokio::time::timeout(limit, self.ws.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Step::Gone(format!("write failed: {e}")),
            Err(_) => return not_reading(),
        }
        match write_with_progress(self.ws.get_mut(), batch, limit).await {
            Ok(()) => Step::Continue,
            Err(Stalled::Io(e)) => Step::Gone(format!("write failed: {e}")),
            // Nothing of this batch went out: the stream is at a frame boundary, a close frame is still valid.
            Err(Stalled::AtBoundary) => not_reading(),
            Err(Stalled::MidFrame) => {
                // A close frame now would be read as the rest of the cut frame: drop the socket instead.
                self.shared.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                Step::Gone("not reading (write timed out mid-frame)".into())
            }
        }
    }

    /// The outbox overflowed and has been refusing live frames: rejoin the live stream, then write from the
    /// table what was refused, i.e. this connection's events in (last written, cursor at rejoin]. Live frames
    /// queued meanwhile are all above that cursor and follow. If the queue overflows again during this, the
    /// outbox falls behind again and, once drained, sends us here again.
    async fn catch_up(&mut self) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        let until = self.shared.hub.rejoin(&session.outbox);
        // The seqs written now are not remembered one by one: a later `resume` replays nothing (incomplete).
        session.sent_before_resume = SentBeforeResume::TooMany;
        loop {
            let Some(session) = &self.session else { return Step::Continue };
            let since = session.last_sent_seq;
            if since >= until {
                return Step::Continue;
            }
            let topics: Vec<&str> = session.topics.iter().map(|t| &**t).collect();
            let user = session.identity.user.clone();
            // At most a queue's worth per query: a connection behind holds no more than one that is not.
            let batch = self.shared.limits.outbound_queue.max(1) as i64;
            let replay = events::within(
                &self.shared.replay_pool,
                self.shared.statement_timeout,
                events::replay(&self.shared.replay_pool, &user, &topics, since, until, batch),
            )
            .await;
            drop(topics);
            let replay = match replay {
                Ok(replay) => replay,
                Err(e) => {
                    tracing::warn!(user = %user, "catch-up failed, closing the connection (it can resume): {e}");
                    return Step::Close { code: protocol::CLOSE_TOO_SLOW, reason: "could not catch up", error: None };
                }
            };
            if replay.events.is_empty() && !replay.complete {
                // Deleted after the retention while this connection was behind: it must refetch.
                return Step::Close {
                    code: protocol::CLOSE_TOO_SLOW,
                    reason: "fell behind the retention",
                    error: None,
                };
            }
            let frames: Vec<Frame> = replay.events.iter().map(|e| crate::hub::encode(e, None)).collect();
            if let step @ (Step::Close { .. } | Step::Gone(_)) = self.write_frames(&frames).await {
                return step;
            }
            if let Some(session) = &mut self.session {
                // Nothing else of this connection's lies below `reached`.
                session.last_sent_seq = session.last_sent_seq.max(replay.reached);
            }
        }
    }

    /// Replay this user's events in (since, until] and join them to the live stream with no gap and no
    /// duplicate. `until` is the node cursor (everything up to it is already in the live queues), or just below
    /// the first live event this connection got, whichever is lower.
    async fn resume(&mut self, since: i64, reference: Option<&Value>) -> Step {
        let Some(session) = &mut self.session else { return Step::Continue };
        if session.resumed {
            let message = "resume is accepted once per connection, right after subscribing".into();
            return self.error(ErrorCode::BadRequest, message, reference.cloned()).await;
        }
        if since < 0 {
            return self
                .error(ErrorCode::BadRequest, "`since` must be a seq (0 or more)".into(), reference.cloned())
                .await;
        }
        session.resumed = true;
        let Some(cursor) = started_cursor(self.shared.hub.clone()).await else {
            // The node has not read its starting position yet (the database is away): we cannot know what was
            // missed, and saying so makes the client refetch, which is always correct.
            return written(
                self.reply(Reply::Resumed { since, until: since, replayed: 0, complete: false }, reference).await,
            );
        };
        let Some(session) = &mut self.session else { return Step::Continue };
        // Everything up to the cursor has been routed: what matched this connection then is queued or written.
        // The replay covers (since, cursor] except the live events already written; queued ones are skipped
        // below (at or below `until`). A connection that wrote too many live events to remember them cannot know
        // what a replay would repeat: it replays nothing and says so (`complete: false`, the client refetches).
        let (until, already_sent, known) =
            match std::mem::replace(&mut session.sent_before_resume, SentBeforeResume::TooMany) {
                SentBeforeResume::Seqs(seqs) => (cursor, seqs, true),
                SentBeforeResume::TooMany => (since, Vec::new(), false),
            };
        let topics: Vec<&str> = session.topics.iter().map(|t| &**t).collect();
        let user = session.identity.user.clone();
        // Waiting for a replay connection counts too: under a storm of resumes each client still hears back soon.
        let pool = &self.shared.replay_pool;
        let query = events::replay(pool, &user, &topics, since, until, RESUME_LIMIT);
        let replay = tokio::time::timeout(RESUME_DEADLINE, events::within(pool, self.shared.statement_timeout, query))
            .await
            .unwrap_or(Err(events::QueryError::Timeout(RESUME_DEADLINE)));
        drop(topics);
        let (mut events, complete, skip_through) = match replay {
            Ok(replay) => (replay.events, replay.complete && known, replay.skip_through),
            Err(e) => {
                // Unknown is incomplete: the client refetches, which is always correct.
                tracing::warn!(user = %user, "resume replay failed: {e}");
                (Vec::new(), false, until)
            }
        };
        events.retain(|event| !already_sent.contains(&event.seq));
        let replayed = events.len();
        // One buffer, one write(): a storm of resumes must not cost a system call per replayed event.
        let mut batch = Vec::new();
        for event in &events {
            protocol::encode_text_frame(&mut batch, crate::hub::encode(event, None).text.as_bytes());
        }
        if let step @ (Step::Close { .. } | Step::Gone(_)) = self.write_encoded(&batch).await {
            return step;
        }
        if let Some(session) = &mut self.session {
            session.last_sent_seq = session.last_sent_seq.max(skip_through);
        }
        written(self.reply(Reply::Resumed { since, until, replayed, complete }, reference).await)
    }

    async fn reply(&mut self, reply: Reply<'_>, reference: Option<&Value>) -> Result<(), WsError> {
        self.write(Message::Text(reply.encode(reference).into())).await
    }

    /// Send an error that leaves the connection open.
    async fn error(&mut self, code: ErrorCode, message: String, reference: Option<Value>) -> Step {
        written(self.reply(Reply::Error { code, message: &message }, reference.as_ref()).await)
    }

    async fn write(&mut self, message: Message) -> Result<(), WsError> {
        match tokio::time::timeout(self.shared.limits.write_timeout, self.ws.send(message)).await {
            Ok(result) => result,
            Err(_) => Err(WsError::Io(std::io::ErrorKind::TimedOut.into())),
        }
    }

    /// Send a close frame and wait (briefly) for the peer's, so the client reads our code rather than a reset.
    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            if self.ws.close(Some(frame)).await.is_ok() {
                while let Some(Ok(_)) = self.ws.next().await {}
            }
        })
        .await;
    }
}

/// The node cursor, once the node has read its starting position; waits a little for a node that just started.
async fn started_cursor(hub: Arc<Hub>) -> Option<i64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = hub.cursor();
        if value >= 0 {
            return Some(value);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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

fn not_reading() -> Step {
    Step::Close { code: protocol::CLOSE_TOO_SLOW, reason: "not reading", error: None }
}

/// Why `write_with_progress` gave up.
enum Stalled {
    Io(std::io::Error),
    /// No byte of the buffer was accepted within the limit.
    AtBoundary,
    /// Part of it was: the stream now ends inside a frame.
    MidFrame,
}

/// Write all of `buf`, giving up only when the socket accepts nothing for `limit`: a slow reader that keeps
/// reading is never cut off, one that stopped is noticed after `limit` whatever the batch's size.
async fn write_with_progress<W: AsyncWrite + Unpin>(
    socket: &mut W,
    buf: &[u8],
    limit: Duration,
) -> Result<(), Stalled> {
    let mut written = 0;
    while written < buf.len() {
        match tokio::time::timeout(limit, socket.write(&buf[written..])).await {
            Ok(Ok(0)) => return Err(Stalled::Io(std::io::ErrorKind::WriteZero.into())),
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(Stalled::Io(e)),
            Err(_) if written == 0 => return Err(Stalled::AtBoundary),
            Err(_) => return Err(Stalled::MidFrame),
        }
    }
    match tokio::time::timeout(limit, socket.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Stalled::Io(e)),
        Err(_) => Err(Stalled::MidFrame),
    }
}

fn instant_of(at: SystemTime) -> Instant {
    let now = SystemTime::now();
    Instant::now() + at.duration_since(now).unwrap_or(Duration::ZERO)
}

/// Token bucket: `rate` messages per second, bursts of up to `rate`.
struct RateLimit {
    rate: f32,
    tokens: f32,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        RateLimit { rate: rate as f32, tokens: rate as f32, last: Instant::now() }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f32() * self.rate).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn message(&self) -> String {
        format!("more than {} messages per second; this one was dropped", self.rate)
    }
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
        let config: crate::db::Database = "host=127.0.0.1 user=x dbname=x".parse().expect("config");
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
            replay_pool: crate::db::pool(&config, 1).expect("pool"),
            statement_timeout: Duration::from_secs(10),
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
