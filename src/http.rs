//! HTTP: the accept loop, the routes (`/ws`, `/healthz`, `/readyz`, `/metrics`) and the WebSocket upgrade.
//!
//! nudge owns the accept loop (hyper's HTTP/1 connection builder around `warp::service`) so that shutdown and the
//! connection limit are explicit here, and so the same loop can later serve TLS. The upgrade is done by hand
//! rather than with `warp::ws()`, because warp gives every socket tungstenite's default 128 KiB read buffer and
//! no way to change it; `Shared::websocket_config` sizes buffers for hints instead.

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
    pub shutdown: Shutdown,
}

/// The peer's address, put into each request's extensions by the accept loop.
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

/// Routes added by an embedder (`nudge demo`); `nudge serve` has none.
pub type ExtraRoutes = BoxedFilter<(Response,)>;

/// Accept connections until shutdown; with `tls`, every connection is a TLS one (wss).
pub async fn serve(listener: TcpListener, server: Arc<Server>, tls: Option<TlsAcceptor>, extra: Option<ExtraRoutes>) {
    let service = warp::service(routes(server.clone(), extra));
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
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_http(stream, service, peer).await,
                Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => serve_http(stream, service, peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
        });
    }
}

/// A peer that has not finished the TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/1.1 on one connection (plain or TLS), with upgrades, handing requests to warp.
async fn serve_http<IO, S>(io: IO, service: S, peer: SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<hyper::Request<Incoming>, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(Peer(peer));
        service.clone().call(request)
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), service).with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(%peer, "http connection ended: {e}");
    }
}

fn routes(server: Arc<Server>, extra: Option<ExtraRoutes>) -> BoxedFilter<(Response,)> {
    let with_server = warp::any().map(move || server.clone());
    let ws = warp::path!("ws")
        .and(warp::get())
        .and(with_server.clone())
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<Peer>())
        .then(|server: Arc<Server>, headers: HeaderMap, query: String, on_upgrade, peer: Option<Peer>| async move {
            let peer = peer.map(|p| p.0).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
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
    let metrics = warp::path!("metrics").and(warp::get()).and(with_server).map(|server: Arc<Server>| {
        let shared = &server.shared;
        let text = shared.metrics.render(shared.hub.connections(), shared.wakeups.requested());
        let mut response = text.into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
        response
    });
    let mut all = ws.or(healthz).unify().or(readyz).unify().or(metrics).unify().boxed();
    if let Some(extra) = extra {
        all = all.or(extra).unify().boxed();
    }
    all.recover(|rejection| async move { Ok::<_, Infallible>(rejected(rejection)) }).unify().boxed()
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
    peer: SocketAddr,
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

    let identity: Option<Identity> = match token_from(headers, query) {
        None => None,
        // With a JWKS, a token naming a key nudge does not have yet waits (bounded) for the set to be fetched again.
        Some(token) => match server.shared.authenticator.verify_waiting(&token).await {
            Ok(identity) => Some(identity),
            Err(e) => {
                let mut response = plain(StatusCode::UNAUTHORIZED, format!("{e}\n"));
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer error=\"invalid_token\""));
                return response;
            }
        },
    };

    let Ok(slot) = server.slots.clone().try_acquire_owned() else {
        let limit = server.max_connections;
        return plain(StatusCode::SERVICE_UNAVAILABLE, format!("connection limit ({limit}) reached\n"));
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

/// The token from `Authorization: Bearer …` or the `token` query parameter, if either is there.
fn token_from(headers: &HeaderMap, query: &str) -> Option<String> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
    });
    bearer.or_else(|| query.split('&').find_map(|pair| pair.strip_prefix("token=")).map(percent_decode))
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
        assert_eq!(token_from(&headers, "a=1&token=abc.def%2Dg"), Some("abc.def-g".into()));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer xyz"));
        assert_eq!(token_from(&headers, "token=abc"), Some("xyz".into()));
        assert_eq!(token_from(&HeaderMap::new(), "a=1"), None);
    }

    #[test]
    fn percent_decoding_leaves_broken_escapes_alone() {
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%4a"), "AJ");
    }
}
