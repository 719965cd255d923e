//! The issuer's signing keys, published as a JWKS at `NUDGE_JWKS_URL` (Auth0, Keycloak, Okta, Cognito, Entra ID,
//! Firebase, Supabase Auth...): fetched at start, cached, refreshed every `NUDGE_JWKS_REFRESH` and when a token
//! names a key id nudge does not have, at most once per `NUDGE_JWKS_MIN_INTERVAL`.
//!
//! One fetch at a time (`begin` under the state lock): a storm of tokens with unknown key ids waits for the same
//! fetch, or, within the minimum interval, is refused at once; the provider sees at most one request per interval
//! whatever clients send. Tokens naming a cached key never wait for the network: a provider that is down, slow or
//! answering garbage leaves the cached keys in force (the failure is logged and retried with backoff). A connection
//! waits for a refresh at most [`UNKNOWN_KEY_WAIT`]; the fetch itself is bounded by [`FETCH_TIMEOUT`] and
//! [`MAX_JWKS_BYTES`].
//!
//! Keys are pinned to algorithms: a key's `alg` member, else the one its type and curve imply (RSA: RS256, RS384,
//! RS512, PS256, PS384, PS512; EC P-256: ES256; EC P-384: ES384; OKP Ed25519: EdDSA), narrowed to
//! `NUDGE_JWT_ALGORITHM` when it is set. Symmetric (`oct`) keys, `alg: none` or HS*, encryption keys and anything
//! nudge cannot verify with are skipped, each with its reason in the log.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use futures_util::FutureExt;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::health::Readiness;
use crate::shutdown::Shutdown;

/// A whole fetch (connect, TLS, request, response body) that takes longer is abandoned as failed.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a token naming an unknown key waits for a refresh before it is refused.
pub const UNKNOWN_KEY_WAIT: Duration = Duration::from_secs(5);
/// A JWKS larger than this is refused (a provider publishes a few keys, a few KiB).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// Keys read from one JWKS at most; the rest are skipped.
pub const MAX_KEYS: usize = 100;
/// Retries after a failed fetch start at 1 s and double up to this (or `NUDGE_JWKS_REFRESH`, if shorter).
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The first retry after a failed fetch.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);

/// The algorithms a JWKS key may verify, in the order they are named in messages.
pub const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// A set of [`ALGORITHMS`], one bit each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithms(u16);

impl Algorithms {
    pub const NONE: Algorithms = Algorithms(0);
    pub const ALL: Algorithms = Algorithms((1 << ALGORITHMS.len()) - 1);
    const RSA: Algorithms = Algorithms(0b11_1111);

    /// The set holding `alg`; empty for an algorithm a JWKS key never verifies (HS*).
    pub fn of(alg: Algorithm) -> Algorithms {
        ALGORITHMS.iter().position(|a| *a == alg).map_or(Algorithms::NONE, |i| Algorithms(1 << i))
    }

    pub fn contains(self, alg: Algorithm) -> bool {
        let one = Algorithms::of(alg);
        one != Algorithms::NONE && self.0 & one.0 != 0
    }

    fn and(self, other: Algorithms) -> Algorithms {
        Algorithms(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Algorithm> {
        ALGORITHMS.into_iter().enumerate().filter(move |(i, _)| self.0 & (1 << i) != 0).map(|(_, a)| a)
    }

    /// `RS256/PS256`, for logs.
    fn names(self) -> String {
        self.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join("/")
    }
}

/// What `NUDGE_JWKS_*` configure.
pub struct JwksSettings {
    pub url: String,
    pub refresh: Duration,
    pub min_interval: Duration,
    /// `NUDGE_JWT_ALGORITHM`, when set: keys verify this algorithm only.
    pub only: Option<Algorithm>,
}

/// A JWKS configuration that cannot work. Reported at start, exit code 2.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("NUDGE_JWKS_URL is not a URL: {0}")]
    BadUrl(String),
    #[error("NUDGE_JWKS_URL must be https (http is allowed only for a loopback host: localhost, 127.0.0.0/8, [::1])")]
    NotHttps,
    #[error("NUDGE_JWKS_URL must not carry a user name or password")]
    Credentials,
    #[error(
        "no trusted CA certificates for NUDGE_JWKS_URL (install the system's CA bundle, or set SSL_CERT_FILE): {0}"
    )]
    NoRoots(String),
}

/// Where the keys come from: the parsed URL and, for https, the TLS client.
struct Source {
    /// The URL as configured, for the log (a JWKS URL carries no secret: credentials are refused).
    url: String,
    host: String,
    port: u16,
    /// The `Host` header.
    authority: String,
    path_and_query: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// One usable key: its id, the algorithms it verifies, the key.
pub struct Key {
    pub kid: Box<str>,
    pub algorithms: Algorithms,
    pub key: DecodingKey,
}

/// The keys of the last good fetch.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<Key>,
}

/// What a token's `kid` and `alg` find.
pub enum Lookup<'a> {
    Found(&'a Key),
    /// Keys with this id exist, none verifies this algorithm.
    WrongAlgorithm(Algorithms),
    Missing,
}

impl KeySet {
    pub fn find(&self, kid: &str, alg: Algorithm) -> Lookup<'_> {
        let mut allowed = Algorithms::NONE;
        for key in self.keys.iter().filter(|k| *k.kid == *kid) {
            if key.algorithms.contains(alg) {
                return Lookup::Found(key);
            }
            allowed = Algorithms(allowed.0 | key.algorithms.0);
        }
        if allowed.is_empty() {
            Lookup::Missing
        } else {
            Lookup::WrongAlgorithm(allowed)
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// `kid (RS256/...), ...`, for logs.
    fn describe(&self) -> String {
        self.keys.iter().map(|k| format!("{} ({})", k.kid, k.algorithms.names())).collect::<Vec<_>>().join(", ")
    }
}

#[derive(Default)]
struct FetchState {
    in_flight: bool,
    /// When the last fetch started: the minimum interval counts from it.
    last_start: Option<Instant>,
    last_success: Option<Instant>,
    /// Fetches failed in a row since the last success.
    failures: u32,
    last_error: Option<String>,
}

/// How a token naming an unknown key fared with a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresh {
    /// A fetch finished (successfully or not: look again).
    Finished,
    /// A fetch started less than the minimum interval ago; none was started.
    TooSoon,
    /// The fetch did not finish within [`UNKNOWN_KEY_WAIT`]; it goes on without the token.
    TimedOut,
}

/// Why a key was not found, in words a client may read (no URL, no network detail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// No key set has been fetched yet.
    NeverFetched,
    /// The last fetch failed; the cached keys are those of an older one.
    LastFetchFailed,
    Fresh,
}

pub struct Jwks {
    source: Source,
    refresh: Duration,
    min_interval: Duration,
    only: Option<Algorithm>,
    keys: RwLock<Arc<KeySet>>,
    state: Mutex<FetchState>,
    /// Counts finished fetches; waiters subscribe while holding `state`, so they never miss the one they wait for.
    done: watch::Sender<u64>,
}

impl Jwks {
    pub fn new(settings: JwksSettings) -> Result<Arc<Jwks>, JwksError> {
        let source = Source::parse(&settings.url)?;
        Ok(Arc::new(Jwks {
            source,
            refresh: settings.refresh,
            min_interval: settings.min_interval,
            only: settings.only,
            keys: RwLock::default(),
            state: Mutex::default(),
            done: watch::Sender::new(0),
        }))
    }

    pub fn url(&self) -> &str {
        &self.source.url
    }

    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    /// The cached keys (those of the last good fetch; none before the first).
    pub fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn staleness(&self) -> Staleness {
        let state = self.lock();
        match (state.last_success, state.failures) {
            (None, _) => Staleness::NeverFetched,
            (Some(_), 0) => Staleness::Fresh,
            (Some(_), _) => Staleness::LastFetchFailed,
        }
    }

    /// A token named a key that is not cached: fetch the set again, unless a fetch started less than the minimum
    /// interval ago, sharing the fetch in progress if there is one; wait at most [`UNKNOWN_KEY_WAIT`] for it.
    pub async fn refresh_for_unknown_key(self: &Arc<Self>) -> Refresh {
        let mut done = {
            let mut state = self.lock();
            if !state.in_flight {
                if state.last_start.is_some_and(|at| at.elapsed() < self.min_interval) {
                    return Refresh::TooSoon;
                }
                self.begin(&mut state, "a token named an unknown key id");
            }
            self.done.subscribe()
        };
        match tokio::time::timeout(UNKNOWN_KEY_WAIT, done.changed()).await {
            Ok(_) => Refresh::Finished,
            Err(_) => Refresh::TimedOut,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FetchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Start a fetch in a task of its own (so that no waiter, whether it gives up or not, can cancel it).
    fn begin(self: &Arc<Self>, state: &mut FetchState, why: &'static str) {
        state.in_flight = true;
        state.last_start = Some(Instant::now());
        tracing::debug!(url = %self.source.url, "fetching the JWKS: {why}");
        let jwks = self.clone();
        tokio::spawn(async move {
            let fetch = async {
                match tokio::time::timeout(FETCH_TIMEOUT, jwks.source.fetch()).await {
                    Ok(Ok(body)) => parse(&body, jwks.only),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(format!("no complete answer within {FETCH_TIMEOUT:?}")),
                }
            };
            // `finish` must run whatever happens: it is what lets the next fetch start.
            let outcome = std::panic::AssertUnwindSafe(fetch)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err("the fetch panicked (a bug: please report it)".into()));
            jwks.finish(outcome);
        });
    }

    fn finish(&self, outcome: Result<Parsed, String>) {
        match outcome {
            Ok(parsed) => {
                let set = Arc::new(parsed.keys);
                let old = std::mem::replace(&mut *self.keys.write().unwrap_or_else(|e| e.into_inner()), set.clone());
                let ids = |s: &KeySet| s.keys.iter().map(|k| (k.kid.clone(), k.algorithms)).collect::<Vec<_>>();
                if ids(&old) != ids(&set) {
                    tracing::info!(url = %self.source.url, keys = %set.describe(), "JWKS keys in use");
                } else {
                    tracing::debug!(url = %self.source.url, keys = set.len(), "JWKS refreshed, keys unchanged");
                }
                for (kid, reason) in &parsed.skipped {
                    tracing::debug!(url = %self.source.url, kid = %kid, "JWKS key skipped: {reason}");
                }
                let mut state = self.lock();
                state.in_flight = false;
                state.last_success = Some(Instant::now());
                state.failures = 0;
                state.last_error = None;
            }
            Err(error) => {
                let mut state = self.lock();
                state.in_flight = false;
                state.failures = state.failures.saturating_add(1);
                let cached = self.current().len();
                let retry = self.backoff(state.failures);
                if state.last_success.is_some() {
                    tracing::warn!(
                        url = %self.source.url,
                        "JWKS refresh failed ({} in a row), keeping the {cached} cached keys, next try in {retry:?}: {error}",
                        state.failures
                    );
                } else {
                    tracing::error!(
                        url = %self.source.url,
                        "JWKS fetch failed ({} in a row), no keys yet (tokens are refused), next try in {retry:?}: {error}",
                        state.failures
                    );
                }
                state.last_error = Some(error);
            }
        }
        self.done.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The pause after `failures` failed fetches in a row: 1 s doubling, at most `MAX_BACKOFF` and the refresh
    /// interval.
    fn backoff(&self, failures: u32) -> Duration {
        let doubled = FIRST_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
        doubled.min(MAX_BACKOFF).min(self.refresh.max(FIRST_BACKOFF))
    }

    /// When the periodic loop should fetch next; `None` while a fetch runs.
    fn next_due(&self) -> Option<Instant> {
        let state = self.lock();
        if state.in_flight {
            return None;
        }
        let now = Instant::now();
        Some(match (state.last_start, state.failures) {
            (None, _) => now,
            (Some(start), 0) => state.last_success.unwrap_or(start) + self.refresh,
            (Some(start), failures) => start + self.backoff(failures),
        })
    }

    /// The periodic refresh, supervised: fetch at once, then every `NUDGE_JWKS_REFRESH` after the last good fetch
    /// (a fetch for an unknown key counts), retrying a failed one with backoff. Tells `/readyz` whether keys were
    /// ever fetched.
    pub async fn run(self: Arc<Self>, readiness: Arc<Readiness>, mut shutdown: Shutdown) {
        let mut done = self.done.subscribe();
        loop {
            self.tell(&readiness);
            let due = self.next_due();
            tokio::select! {
                _ = shutdown.triggered() => return,
                changed = done.changed() => if changed.is_err() { return },
                _ = sleep_until(due) => {
                    let mut state = self.lock();
                    if !state.in_flight {
                        self.begin(&mut state, "periodic refresh");
                    }
                }
            }
        }
    }

    /// Tell `/readyz` whether keys were ever fetched.
    pub fn tell(&self, readiness: &Readiness) {
        let state = self.lock();
        if state.last_success.is_some() {
            readiness.set_jwks(None);
        } else {
            let why = state.last_error.as_deref().unwrap_or("first fetch in progress");
            readiness.set_jwks(Some(format!("no JWKS keys fetched yet from {}: {why}", self.source.url)));
        }
    }
}

async fn sleep_until(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Source {
    fn parse(url: &str) -> Result<Source, JwksError> {
        let uri = hyper::Uri::from_str(url.trim()).map_err(|e| JwksError::BadUrl(e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(JwksError::BadUrl("the scheme must be https (or http for a loopback host)".into())),
        };
        let authority = uri.authority().ok_or_else(|| JwksError::BadUrl("no host".into()))?;
        if authority.as_str().contains('@') {
            return Err(JwksError::Credentials);
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(JwksError::BadUrl("no host".into()));
        }
        if !tls && !is_loopback(&host) {
            return Err(JwksError::NotHttps);
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let tls = if tls { Some(tls_connector()?) } else { None };
        Ok(Source {
            url: url.trim().to_owned(),
            host,
            port,
            authority: authority.as_str().to_owned(),
            path_and_query,
            tls,
        })
    }

    /// One GET, on a connection of its own (fetches are minutes apart): the body of a 200 answer.
    async fn fetch(&self) -> Result<Vec<u8>, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.get(tcp).await,
            Some(connector) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{} is not a TLS server name: {e}", self.host))?;
                let stream = connector.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
                self.get(stream).await
            }
        }
    }

    async fn get<IO>(&self, io: IO) -> Result<Vec<u8>, String>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use http_body_util::BodyExt;
        use hyper::header;
        let (mut sender, connection) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<hyper::body::Bytes>,
        >(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
        let request = hyper::Request::get(self.path_and_query.as_str())
            .header(header::HOST, self.authority.as_str())
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .header(header::USER_AGENT, concat!("nudge/", env!("CARGO_PKG_VERSION")))
            .header(header::CONNECTION, "close")
            .body(http_body_util::Empty::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let exchange = async {
            let response = sender.send_request(request).await.map_err(|e| format!("HTTP: {e}"))?;
            let status = response.status();
            if status != hyper::StatusCode::OK {
                let location = response.headers().get(header::LOCATION).and_then(|l| l.to_str().ok());
                return Err(match location {
                    Some(to) if status.is_redirection() => {
                        format!("HTTP {status}, a redirect to {to} (not followed: set NUDGE_JWKS_URL to the final URL)")
                    }
                    _ => format!("HTTP {status}"),
                });
            }
            let body = http_body_util::Limited::new(response.into_body(), MAX_JWKS_BYTES);
            match body.collect().await {
                Ok(collected) => Ok(collected.to_bytes().to_vec()),
                Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                    Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"))
                }
                Err(e) => Err(format!("reading the body: {e}")),
            }
        };
        tokio::pin!(exchange);
        tokio::pin!(connection);
        tokio::select! {
            result = &mut exchange => result,
            // The connection ended first: the answer is complete (or broken), the exchange knows which.
            _ = &mut connection => exchange.await,
        }
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// rustls with the ring provider (the one nudge's server side uses) and the system's trust store
/// (rustls-native-certs: `/etc/ssl/certs` and friends, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), so that a provider
/// behind a private CA (a company's Keycloak) is reached the way the host's other tools reach it.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, JwksError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        let why = if errors.is_empty() { "none found".to_owned() } else { errors.join("; ") };
        return Err(JwksError::NoRoots(why));
    }
    for e in &found.errors {
        tracing::debug!("some CA certificates could not be read: {e}");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JwksError::NoRoots(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A fetched set: the usable keys, and why each other one was skipped.
struct Parsed {
    keys: KeySet,
    skipped: Vec<(String, String)>,
}

#[derive(Deserialize)]
struct Document {
    keys: Vec<serde_json::Value>,
}

/// The members of a JWK nudge reads (RFC 7517, RFC 7518 section 6, RFC 8037); others are ignored.
#[derive(Deserialize)]
struct Member {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// A JWKS document into usable keys. A document without a single usable key is an error: the cached keys stay
/// (an empty or broken answer from a provider must not lock every client out).
fn parse(body: &[u8], only: Option<Algorithm>) -> Result<Parsed, String> {
    let document: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS (a JSON object with a \"keys\" array): {e}"))?;
    let mut parsed = Parsed { keys: KeySet::default(), skipped: Vec::new() };
    let total = document.keys.len();
    for (i, value) in document.keys.into_iter().enumerate() {
        let label = value.get("kid").and_then(|k| k.as_str()).map_or_else(|| format!("#{i}"), str::to_owned);
        if i >= MAX_KEYS {
            parsed.skipped.push((label, format!("only the first {MAX_KEYS} keys are read")));
            continue;
        }
        match key(value, only) {
            Ok(key) => parsed.keys.keys.push(key),
            Err(reason) => parsed.skipped.push((label, reason)),
        }
    }
    if parsed.keys.is_empty() {
        let reasons: Vec<String> = parsed.skipped.iter().map(|(kid, why)| format!("{kid}: {why}")).collect();
        return Err(format!("no usable signing key among the {total} keys of the JWKS ({})", reasons.join("; ")));
    }
    Ok(parsed)
}

fn key(value: serde_json::Value, only: Option<Algorithm>) -> Result<Key, String> {
    let member: Member = serde_json::from_value(value).map_err(|e| format!("not a JWK: {e}"))?;
    let kid = member.kid.filter(|k| !k.is_empty()).ok_or("no kid (tokens find their key by kid)")?;
    if let Some(usage) = member.usage.as_deref().filter(|u| *u != "sig") {
        return Err(format!("use is {usage:?}, not \"sig\""));
    }
    if let Some(ops) = &member.key_ops {
        if !ops.iter().any(|op| op == "verify") {
            return Err("key_ops does not include \"verify\"".into());
        }
    }
    let field = |name: &str, value: &Option<String>| -> Result<Vec<u8>, String> {
        let text = value.as_deref().ok_or_else(|| format!("no {name}"))?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|e| format!("{name} is not base64url: {e}"))
    };
    let (family, key) = match (member.kty.as_str(), member.crv.as_deref()) {
        ("RSA", _) => {
            let n = field("n", &member.n)?;
            let e = field("e", &member.e)?;
            let n = strip_zeros(&n);
            let e = strip_zeros(&e);
            let bits = n.first().map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
            if !(2048..=4096).contains(&bits) {
                return Err(format!("an RSA modulus of {bits} bits (nudge verifies 2048 to 4096)"));
            }
            if e.len() > 4 || e.last().is_none_or(|b| b & 1 == 0) || e == [1] {
                return Err("an RSA exponent that is not an odd number from 3 to 2^32 - 1".into());
            }
            (Algorithms::RSA, DecodingKey::from_rsa_raw_components(n, e))
        }
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (size, alg) = if crv == "P-256" { (32, Algorithm::ES256) } else { (48, Algorithm::ES384) };
            let x = field("x", &member.x)?;
            let y = field("y", &member.y)?;
            if x.len() != size || y.len() != size {
                return Err(format!("{crv} coordinates must be {size} bytes each"));
            }
            let point = [&[0x04][..], &x, &y].concat();
            (Algorithms::of(alg), probed(DecodingKey::from_ec_der(&point), alg)?)
        }
        ("OKP", Some("Ed25519")) => {
            let x = field("x", &member.x)?;
            if x.len() != 32 {
                return Err("an Ed25519 key must be 32 bytes".into());
            }
            (Algorithms::of(Algorithm::EdDSA), probed(DecodingKey::from_ed_der(&x), Algorithm::EdDSA)?)
        }
        ("oct", _) => return Err("a symmetric key: nudge never takes shared secrets from a JWKS".into()),
        (kty, crv) => return Err(format!("key type {kty:?}{} is not one nudge verifies with", curve(crv))),
    };
    let mut algorithms = family;
    if let Some(alg) = &member.alg {
        let named = Algorithm::from_str(alg).map(Algorithms::of).unwrap_or(Algorithms::NONE);
        if named.is_empty() {
            return Err(format!("alg {alg:?} is not one nudge accepts from a JWKS"));
        }
        algorithms = family.and(named);
        if algorithms.is_empty() {
            return Err(format!("alg {alg:?} does not fit a {} key", member.kty));
        }
    }
    if let Some(only) = only {
        algorithms = algorithms.and(Algorithms::of(only));
        if algorithms.is_empty() {
            return Err(format!("it does not verify {only:?} (NUDGE_JWT_ALGORITHM)"));
        }
    }
    Ok(Key { kid: kid.into(), algorithms, key })
}

fn curve(crv: Option<&str>) -> String {
    crv.map(|c| format!(" with curve {c:?}")).unwrap_or_default()
}

fn strip_zeros(bytes: &[u8]) -> &[u8] {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[first..]
}

/// A curve point that is not on the curve is found when a verifier is built from it: build one now, with a
/// signature that cannot verify, rather than fail every token later.
fn probed(key: DecodingKey, alg: Algorithm) -> Result<DecodingKey, String> {
    match jsonwebtoken::crypto::verify("AA", b"probe", &key, alg) {
        Ok(_) => Ok(key),
        Err(e) => Err(format!("not a valid {alg:?} public key: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An RSA modulus of `bits` bits (not a real key: parsing never factors it).
    fn modulus(bits: usize) -> String {
        let mut n = vec![0xffu8; bits / 8];
        n[0] = 0xc3;
        b64(&n)
    }

    fn rsa(kid: &str, more: serde_json::Value) -> serde_json::Value {
        let mut key = json!({"kty": "RSA", "kid": kid, "n": modulus(2048), "e": "AQAB"});
        key.as_object_mut().unwrap().extend(more.as_object().unwrap().clone());
        key
    }

    fn parse_keys(keys: serde_json::Value, only: Option<Algorithm>) -> Result<Parsed, String> {
        parse(json!({ "keys": keys }).to_string().as_bytes(), only)
    }

    #[test]
    fn an_rsa_key_without_alg_verifies_the_rsa_family_and_with_alg_only_that() {
        let parsed = parse_keys(json!([rsa("a", json!({})), rsa("b", json!({"alg": "PS384"}))]), None).unwrap();
        assert_eq!(parsed.keys.keys[0].algorithms, Algorithms::RSA);
        assert!(matches!(parsed.keys.find("a", Algorithm::PS512), Lookup::Found(_)));
        assert!(matches!(parsed.keys.find("b", Algorithm::PS384), Lookup::Found(_)));
        assert!(matches!(parsed.keys.find("b", Algorithm::RS256), Lookup::WrongAlgorithm(_)));
        assert!(matches!(parsed.keys.find("b", Algorithm::HS256), Lookup::WrongAlgorithm(_)));
        assert!(matches!(parsed.keys.find("c", Algorithm::RS256), Lookup::Missing));
    }

    #[test]
    fn the_configured_algorithm_narrows_every_key() {
        let keys = json!([rsa("a", json!({})), rsa("b", json!({"alg": "PS256"}))]);
        let parsed = parse_keys(keys, Some(Algorithm::RS256)).unwrap();
        assert_eq!(parsed.keys.len(), 1);
        assert_eq!(parsed.keys.keys[0].algorithms, Algorithms::of(Algorithm::RS256));
        assert!(parsed.skipped[0].1.contains("NUDGE_JWT_ALGORITHM"), "{:?}", parsed.skipped);
    }

    #[test]
    fn unusable_keys_are_skipped_with_a_reason() {
        let keys = json!([
            rsa("good", json!({})),
            {"kty": "oct", "kid": "hs", "k": "c2VjcmV0", "alg": "HS256"},
            rsa("none", json!({"alg": "none"})),
            rsa("hs", json!({"alg": "HS256"})),
            rsa("es", json!({"alg": "ES256"})),
            rsa("enc", json!({"use": "enc"})),
            rsa("ops", json!({"key_ops": ["encrypt"]})),
            {"kty": "RSA", "n": modulus(2048), "e": "AQAB"},
            rsa("small", json!({"n": modulus(1024)})),
            rsa("huge", json!({"n": modulus(8192)})),
            rsa("even", json!({"e": "AQAA"})),
            rsa("empty", json!({"n": ""})),
            rsa("zeros", json!({"n": "AAAA"})),
            {"kty": "EC", "kid": "short", "crv": "P-256", "x": b64(&[1; 31]), "y": b64(&[1; 32])},
            {"kty": "EC", "kid": "offcurve", "crv": "P-256", "x": b64(&[1; 32]), "y": b64(&[1; 32])},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": b64(&[1; 66]), "y": b64(&[1; 66])},
            {"kty": "OKP", "kid": "ed-short", "crv": "Ed25519", "x": b64(&[1; 10])},
            {"kty": "OKP", "kid": "x25519", "crv": "X25519", "x": b64(&[1; 32])},
            {"kty": "RSA", "kid": 7, "n": modulus(2048), "e": "AQAB"},
            "not an object",
        ]);
        let parsed = parse_keys(keys, None).unwrap();
        assert_eq!(parsed.keys.len(), 1, "{:?}", parsed.skipped);
        assert_eq!(parsed.skipped.len(), 19, "{:?}", parsed.skipped);
        for (kid, reason) in &parsed.skipped {
            assert!(!reason.is_empty(), "{kid}");
        }
    }

    #[test]
    fn a_set_without_a_usable_key_is_a_failed_fetch() {
        assert!(parse_keys(json!([]), None).is_err());
        assert!(parse_keys(json!([{"kty": "oct", "kid": "a", "k": "c2VjcmV0"}]), None).is_err());
        assert!(parse(b"<html>", None).is_err());
        assert!(parse(b"{\"keys\": {}}", None).is_err());
    }

    #[test]
    fn only_https_or_loopback_http_urls_are_accepted() {
        for good in ["http://127.0.0.1:8080/jwks", "http://localhost/jwks", "http://[::1]:1/x", "http://127.9.9.9/"] {
            assert!(Source::parse(good).is_ok(), "{good}");
        }
        assert!(matches!(Source::parse("http://example.com/jwks"), Err(JwksError::NotHttps)));
        assert!(matches!(Source::parse("http://10.0.0.1/jwks"), Err(JwksError::NotHttps)));
        assert!(matches!(Source::parse("https://u:p@example.com/jwks"), Err(JwksError::Credentials)));
        assert!(matches!(Source::parse("ftp://example.com/jwks"), Err(JwksError::BadUrl(_))));
        assert!(matches!(Source::parse("example.com/jwks"), Err(JwksError::BadUrl(_))));
        assert!(matches!(Source::parse(""), Err(JwksError::BadUrl(_))));
        let source = Source::parse("http://127.0.0.1:9/a/b?c=d").unwrap();
        assert_eq!((source.host.as_str(), source.port, source.path_and_query.as_str()), ("127.0.0.1", 9, "/a/b?c=d"));
    }

    #[test]
    fn backoff_doubles_up_to_the_refresh_interval_and_five_minutes() {
        let jwks = |refresh| {
            Jwks::new(JwksSettings {
                url: "http://127.0.0.1:1/".into(),
                refresh,
                min_interval: Duration::from_secs(30),
                only: None,
            })
            .unwrap()
        };
        let long = jwks(Duration::from_secs(3600));
        let delays: Vec<u64> = (1..=12).map(|n| long.backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(long.backoff(u32::MAX).as_secs(), 300);
        assert_eq!(jwks(Duration::from_secs(10)).backoff(10).as_secs(), 10);
        assert_eq!(jwks(Duration::from_millis(100)).backoff(3), Duration::from_secs(1));
    }
}
