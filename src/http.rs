//! HTTP: the accept loop, the routes (`/ws`, `/healthz`, `/readyz`, `/metrics`) and the WebSocket upgrade; with
//! `--metrics-listen`, `/metrics` on a listener of its own instead.
//!
//! nudge owns the accept loop (hyper's HTTP/1 connection builder around `warp::service`) so that shutdown and the
//! connection limit are explicit here, and so the same loop can later serve TLS. The upgrade is done by hand
//! rather than with `warp::ws()`, because warp gives every socket tungstenite's default 128 KiB read buffer and
//! no way to change it; `Shared::websocket_config` sizes buffers for hints instead.
//!
//! What a connection may cost before it is a WebSocket (caps at accept, header and keep-alive deadlines, header
//! size) is in [`limits`].

mod limits;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tower_service::Service;
use warp::filters::BoxedFilter;
use warp::http::{header, HeaderMap, HeaderValue, StatusCode};
use warp::reply::{Reply, Response};
use warp::Filter;

use crate::auth::Identity;
use crate::config::HttpLimits;
use crate::connection::{self, Shared};
use crate::health::Readiness;
use crate::shutdown::Shutdown;

/// Everything the HTTP side needs.
pub struct Server {
    pub shared: Arc<Shared>,
    pub readiness: Arc<Readiness>,
    /// Checked live by `/readyz`.
    pub pool: Pool,
    /// Empty means any Origin.
    pub allowed_origins: Vec<String>,
    /// One permit per open WebSocket: the connection limit, and (when all are back) the proof that every
    /// connection has finished during shutdown.
    pub slots: Arc<Semaphore>,
    pub max_connections: usize,
    /// Deadlines and caps for connections not yet upgraded (`limits`).
    pub http_limits: HttpLimits,
    pub shutdown: Shutdown,
}

/// The connection a request came on, put into each request's extensions by the accept loop.
#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    conn: Arc<limits::ConnState>,
}

/// Routes added by an embedder (`nudge demo`); `nudge serve` has none.
pub type ExtraRoutes = BoxedFilter<(Response,)>;

/// Accept connections until shutdown; with `tls`, every connection is a TLS one (wss). With `metrics`,
/// `/metrics` is served there ([`serve_metrics`]) and not on `listener`.
pub async fn serve(
    listener: TcpListener,
    server: Arc<Server>,
    tls: Option<TlsAcceptor>,
    extra: Option<ExtraRoutes>,
    metrics: Option<TcpListener>,
) {
    let admission = Arc::new(limits::Admission::new(&server.http_limits));
    let metrics_here = metrics.is_none();
    if let Some(metrics) = metrics {
        tokio::spawn(serve_metrics(metrics, server.clone(), admission.clone()));
    }
    let service = warp::service(routes(server.clone(), admission.clone(), extra, metrics_here));
    let mut refusals = Refusals::default();
    let mut shutdown = server.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning; the limit may free up.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let accepted_at = Instant::now();
        let admitted = match admission.admit(peer.ip()) {
            Ok(admitted) => admitted,
            Err(refused) => {
                // Closed before a byte is read or written: the client reads end-of-file (or a reset, if its
                // request had already arrived).
                drop(stream);
                refusals.log(refused, &peer, &admission, &server.http_limits);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        set_notsent_lowat(&stream);
        let service = service.clone();
        let tls = tls.clone();
        let limits = server.http_limits.clone();
        tokio::spawn(async move {
            let state = admitted.state.clone();
            let socket = limits::Tracked::new(stream, admitted);
            let clock = limits::HeaderClock::new(accepted_at, &limits, state.clone());
            let serve = async {
                match tls {
                    None => serve_http(socket, clock, &limits, service, Peer { addr: peer, conn: state.clone() }).await,
                    // The handshake is part of the first request's header deadline.
                    Some(acceptor) => {
                        match tokio::time::timeout_at(accepted_at + limits.header_timeout, acceptor.accept(socket))
                            .await
                        {
                            Ok(Ok(stream)) => {
                                serve_http(stream, clock, &limits, service, Peer { addr: peer, conn: state.clone() })
                                    .await
                            }
                            Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    }
                }
            };
            // A newer connection took this one's place under the pending cap (limits.rs): drop it, unanswered.
            tokio::select! {
                _ = serve => {}
                _ = state.evicted.notified() => tracing::debug!(%peer, "closed: the oldest of the pending connections"),
            }
            // Upgraded (the socket now belongs to its WebSocket task) or closed: no longer pending.
            state.not_pending();
        });
    }
}

/// How much unsent data the kernel keeps queued for a client before the socket stops being writable.
///
/// Why: without it Linux grows a busy socket's send buffer to megabytes and reports it writable again only once
/// half of what is queued has gone, so a client reading slowly but steadily (20 frames/s of 3 KB) looked as if
/// it read nothing for longer than `NUDGE_WRITE_TIMEOUT` and was closed. With a low-water mark, writability, and
/// therefore "progress", comes back every 128 KiB the client reads; it also keeps a slow client's backlog in
/// nudge's bounded queue (and in the table) instead of in kernel memory.
const NOTSENT_LOWAT: u32 = 128 * 1024;

#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_notsent_lowat(stream: &tokio::net::TcpStream) {
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        tracing::debug!("TCP_NOTSENT_LOWAT not set: {e}");
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_notsent_lowat(_: &tokio::net::TcpStream) {}

/// Connections refused at accept are logged at most every `REFUSALS_LOGGED_EVERY`, so that a flood of them
/// cannot flood the log too.
#[derive(Default)]
struct Refusals {
    logged: Option<Instant>,
    /// `Admission::refused` when last logged.
    counted: (u64, u64),
}

const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

impl Refusals {
    fn log(&mut self, refused: limits::Refused, peer: &SocketAddr, admission: &limits::Admission, limits: &HttpLimits) {
        tracing::debug!(%peer, ?refused, "connection closed at accept");
        if self.logged.is_some_and(|at| at.elapsed() < REFUSALS_LOGGED_EVERY) {
            return;
        }
        self.logged = Some(Instant::now());
        let (pending, per_ip) = admission.refused();
        tracing::warn!(
            "connections closed at accept since the last such message: {} over the pending-connection cap ({}), \
             {} over the per-address cap ({})",
            pending - self.counted.0,
            limits.max_pending,
            per_ip - self.counted.1,
            limits.max_per_ip.map_or_else(|| "off".to_owned(), |n| n.to_string()),
        );
        self.counted = (pending, per_ip);
    }
}

/// HTTP/1.1 on one connection (plain or TLS), with upgrades, handing requests to warp.
async fn serve_http<IO, S>(io: IO, clock: limits::HeaderClock, limits: &HttpLimits, service: S, peer: Peer)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<hyper::Request<Incoming>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let addr = peer.addr;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(peer.clone());
        service.clone().call(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper ignores `header_read_timeout` without a timer; `clock` decides the actual deadline of each wait.
    builder.timer(clock).header_read_timeout(limits.header_timeout);
    // A longer head gets 431 (hyper's answer) and the connection is closed; the read buffer of a connection
    // never grows past this (hyper's floor is 8 KiB).
    builder.max_header_size(limits.max_header_size).max_buf_size(limits.max_header_size.max(HYPER_MIN_BUF_SIZE));
    let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(peer = %addr, "http connection ended: {e}");
    }
}

/// `http1::Builder::max_buf_size` panics below this.
const HYPER_MIN_BUF_SIZE: usize = 8192;

fn routes(
    server: Arc<Server>,
    admission: Arc<limits::Admission>,
    extra: Option<ExtraRoutes>,
    metrics_here: bool,
) -> BoxedFilter<(Response,)> {
    let with_server = warp::any().map(move || server.clone());
    let ws = warp::path!("ws")
        .and(warp::get())
        .and(with_server.clone())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<Peer>())
        .then(|server: Arc<Server>, headers: HeaderMap, query: String, on_upgrade, peer: Option<Peer>| async move {
            upgrade(&server, &headers, &query, on_upgrade, peer).await
        });
    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok\n".into_response());
    let readyz =
        warp::path!("readyz").and(warp::get()).and(with_server.clone()).then(|server: Arc<Server>| async move {
            match ready(&server).await {
                Ok(()) => "ready\n".into_response(),
                Err(reason) => plain(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
            }
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_server)
        .map(move |server: Arc<Server>| metrics_response(&server, &admission));
    let mut all = ws.or(healthz).unify().or(readyz).unify().boxed();
    if metrics_here {
        all = all.or(metrics).unify().boxed();
    }
    if let Some(extra) = extra {
        all = all.or(extra).unify().boxed();
    }
    all.recover(|rejection| async move { Ok::<_, Infallible>(rejected(rejection)) }).unify().boxed()
}

/// `/metrics`: Prometheus text.
fn metrics_response(server: &Server, admission: &limits::Admission) -> Response {
    let shared = &server.shared;
    let mut text = shared.metrics.render(shared.hub.connections(), shared.wakeups.requested());
    admission.render(&mut text);
    let mut response = text.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    response
}

/// Scrapers connected to the metrics listener at once; more are closed at accept.
const METRICS_CONNECTIONS: usize = 16;
/// A metrics connection is closed after this long, kept alive or not (scrapers reconnect).
const METRICS_CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// The metrics listener (`--metrics-listen`): plain HTTP/1.1, `GET /metrics` and nothing else, so that the
/// public listener need not expose it. Few connections, each with the header deadline and a bounded lifetime.
async fn serve_metrics(listener: TcpListener, server: Arc<Server>, admission: Arc<limits::Admission>) {
    let mut shutdown = server.shutdown.clone();
    let open = Arc::new(Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.triggered() => return,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else { continue };
        let (server, admission) = (server.clone(), admission.clone());
        tokio::spawn(async move {
            let header_timeout = server.http_limits.header_timeout;
            let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
                let response = match (request.method(), request.uri().path()) {
                    (&hyper::Method::GET, "/metrics") => metrics_response(&server, &admission),
                    (_, "/metrics") => plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into()),
                    _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
                };
                std::future::ready(Ok::<_, Infallible>(response))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(header_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(METRICS_CONNECTION_LIFETIME, connection).await;
            drop(permit);
        });
    }
}

/// A plain-text answer for a request no route took.
fn rejected(rejection: warp::Rejection) -> Response {
    use warp::reject;
    if rejection.is_not_found() {
        return plain(StatusCode::NOT_FOUND, "not found\n".into());
    }
    if let Some(e) = rejection.find::<warp::filters::body::BodyDeserializeError>() {
        return plain(StatusCode::BAD_REQUEST, format!("{e}\n"));
    }
    let status = if rejection.find::<reject::MethodNotAllowed>().is_some() {
        StatusCode::METHOD_NOT_ALLOWED
    } else if rejection.find::<reject::UnsupportedMediaType>().is_some() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    } else if rejection.find::<reject::PayloadTooLarge>().is_some() {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::BAD_REQUEST
    };
    plain(status, format!("{}\n", status.canonical_reason().unwrap_or("bad request")))
}

async fn ready(server: &Server) -> Result<(), String> {
    server.readiness.check()?;
    let check = async {
        let client = server.pool.get().await.map_err(|e| e.to_string())?;
        client.simple_query("SELECT 1").await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("database pool: {e}")),
        Err(_) => Err("database pool: no answer within 2s".into()),
    }
}

/// Validate an upgrade request and, if it passes, answer 101 and hand the socket to a connection task.
async fn upgrade(
    server: &Arc<Server>,
    headers: &HeaderMap,
    query: &str,
    on_upgrade: Option<OnUpgrade>,
    peer: Option<Peer>,
) -> Response {
    let is = |name, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    let (Some(key), Some(on_upgrade), true, true, true) = (
        key,
        on_upgrade,
        is(header::UPGRADE, "websocket"),
        is(header::CONNECTION, "upgrade"),
        is(header::SEC_WEBSOCKET_VERSION, "13"),
    ) else {
        return plain(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade (version 13) on /ws\n".into());
    };

    if !server.allowed_origins.is_empty() {
        if let Some(origin) = headers.get(header::ORIGIN) {
            let allowed = origin.to_str().is_ok_and(|o| server.allowed_origins.iter().any(|a| a == o));
            if !allowed {
                return plain(StatusCode::FORBIDDEN, "origin not allowed\n".into());
            }
        }
    }

    let unauthorized = |message: String| {
        let mut response = plain(StatusCode::UNAUTHORIZED, message);
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
        response
    };
    let identity: Option<Identity> = match credentials(headers, query) {
        Credentials::None => None,
        Credentials::Malformed => return unauthorized("the Authorization header carries no Bearer token\n".into()),
        // With a JWKS, a token naming a key nudge does not have yet waits (bounded) for the set to be fetched again.
        Credentials::Token(token) => match server.shared.authenticator.verify_waiting(&token).await {
            Ok(identity) => Some(identity),
            Err(e) => return unauthorized(format!("{e}\n")),
        },
    };

    let Ok(slot) = server.slots.clone().try_acquire_owned() else {
        let limit = server.max_connections;
        return plain(StatusCode::SERVICE_UNAVAILABLE, format!("connection limit ({limit}) reached\n"));
    };
    // From here the connection counts under `slots`, no longer as pending (before the client sees the 101).
    let peer = match peer {
        Some(Peer { addr, conn }) => {
            conn.not_pending();
            addr
        }
        None => SocketAddr::from(([0, 0, 0, 0], 0)),
    };

    let shared = server.shared.clone();
    let shutdown = server.shutdown.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(%peer, "upgrade failed: {e}");
                return;
            }
        };
        let config = shared.websocket_config();
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        connection::serve(ws, shared, identity, peer, shutdown).await;
        drop(slot);
    });

    let mut response = Response::new(Default::default());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}

/// What an upgrade request says about who is connecting.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    /// Neither an `Authorization` header nor a `token` query parameter: the client sends `auth` later.
    None,
    Token(String),
    /// An `Authorization` header that is not exactly one `Bearer <token>`: refused, never ignored.
    Malformed,
}

/// The token from `Authorization: Bearer …` or, when there is no such header, the `token` query parameter.
fn credentials(headers: &HeaderMap, query: &str) -> Credentials {
    let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
    match (authorization.next(), authorization.next()) {
        (None, _) => query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map_or(Credentials::None, |token| Credentials::Token(percent_decode(token))),
        (Some(value), None) => bearer(value).map_or(Credentials::Malformed, Credentials::Token),
        (Some(_), Some(_)) => Credentials::Malformed,
    }
}

fn bearer(value: &HeaderValue) -> Option<String> {
    let (scheme, token) = value.to_str().ok()?.trim().split_once(' ')?;
    let token = token.trim_start();
    let well_formed =
        scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(char::is_whitespace);
    well_formed.then(|| token.to_owned())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn plain(status: StatusCode, body: String) -> Response {
    let mut response = body.into_response();
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comes_from_bearer_header_or_query() {
        let mut headers = HeaderMap::new();
        assert_eq!(credentials(&headers, "a=1&token=abc.def%2Dg"), Credentials::Token("abc.def-g".into()));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer xyz"));
        assert_eq!(credentials(&headers, "token=abc"), Credentials::Token("xyz".into()));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer   xyz "));
        assert_eq!(credentials(&headers, ""), Credentials::Token("xyz".into()));
        assert_eq!(credentials(&HeaderMap::new(), "a=1"), Credentials::None);
    }

    #[test]
    fn an_authorization_header_without_a_bearer_token_is_malformed_whatever_the_query_says() {
        for value in ["Bearer", "Bearer ", "Bearer   ", "Basic dXNlcjpwYXNz", "xyz", "Bearer a b", "Token xyz", ""] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
            assert_eq!(credentials(&headers, "token=abc"), Credentials::Malformed, "{value:?}");
        }
        let mut headers = HeaderMap::new();
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer xyz"));
        headers.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert_eq!(credentials(&headers, ""), Credentials::Malformed, "two Authorization headers");
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_bytes(b"Bearer \xff").expect("a header value"));
        assert_eq!(credentials(&headers, ""), Credentials::Malformed, "not visible ASCII");
    }

    #[test]
    fn percent_decoding_leaves_broken_escapes_alone() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%4a"), "AJ");
    }
}
