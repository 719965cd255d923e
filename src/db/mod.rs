//! Everything nudge says to PostgreSQL: the schema ([`migrate`]), the LISTEN connection ([`listen`]), the claim,
//! delivery, replay and retention queries ([`events`]), the wake gate ([`gate`]), cluster membership ([`nodes`])
//! and presence rows ([`presence`]). Queries use a deadpool pool; LISTEN, the wake gate and migrations have
//! sessions of their own.
//! Every query, on whatever table, fails with one [`QueryError`], and the loops and replays bound each one with
//! [`within`] (`NUDGE_STATEMENT_TIMEOUT`).
//!
//! How a session that went away without a word is noticed (a failover that drops packets, no FIN, no RST):
//! every session carries the `NUDGE_DB_*` keepalive and TCP user timeout settings ([`apply_timeouts`]), so the
//! kernel declares a silent direct connection dead; the LISTEN session also probes itself ([`Liveness`]), which
//! works through proxies too (a proxy's kernel answers keepalives for a dead backend); and when LISTEN is lost,
//! every pooled session that was opened or handed out before is discarded ([`distrust_sessions`]).
//!
//! Every session is opened from a [`Database`]: tokio-postgres' configuration and the TLS connector built from the
//! URL's libpq TLS parameters ([`tls`]).

mod error;
pub mod events;
pub mod gate;
pub mod listen;
pub mod migrate;
pub mod nodes;
pub mod presence;
pub mod tls;

pub use error::{within, QueryError};

use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::{Hook, HookError, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Socket;

use crate::config::DatabaseTimeouts;

/// One database as nudge reaches it: tokio-postgres' configuration (derefs to it) and the TLS connector that every
/// session to it uses. Built from a libpq URL or key=value string by [`Database::parse`].
#[derive(Clone, Debug)]
pub struct Database {
    config: tokio_postgres::Config,
    tls: tls::Connector,
}

/// Why a database URL was refused. Neither variant carries the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a connection string tokio-postgres and libpq accept.
    #[error("{0}")]
    Malformed(String),
    /// The TLS parameters: an unknown `sslmode`, a file that cannot be used, a contradiction.
    #[error("{0}")]
    Tls(String),
}

impl Database {
    /// `sslmode`, `sslrootcert`, `sslcert` and `sslkey` are nudge's (libpq semantics, [`tls`]); everything else
    /// is tokio-postgres'. Reads the certificate and key files named.
    pub fn parse(url: &str) -> Result<Database, UrlError> {
        let (rest, params) = tls::split(url).map_err(UrlError::Malformed)?;
        // tokio-postgres' messages never echo the password back.
        let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| UrlError::Malformed(e.to_string()))?;
        let tls = tls::Connector::new(&params, &mut config).map_err(UrlError::Tls)?;
        Ok(Database { config, tls })
    }

    pub fn tls(&self) -> &tls::Connector {
        &self.tls
    }
}

impl FromStr for Database {
    type Err = UrlError;
    fn from_str(url: &str) -> Result<Database, UrlError> {
        Database::parse(url)
    }
}

impl std::ops::Deref for Database {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl std::ops::DerefMut for Database {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }
}

/// Apply nudge's liveness options to a session's configuration. They win over the URL's `keepalives`,
/// `keepalives_idle`, `keepalives_interval`, `keepalives_retries` and `tcp_user_timeout` (keepalives are always
/// on). They act on TCP sessions only; a Unix-socket host has no network path to lose.
pub fn apply_timeouts(config: &mut tokio_postgres::Config, timeouts: &DatabaseTimeouts) {
    config
        .keepalives(true)
        .keepalives_idle(timeouts.keepalive_idle)
        .keepalives_interval(timeouts.keepalive_interval)
        .keepalives_retries(timeouts.keepalive_count)
        .tcp_user_timeout(timeouts.tcp_user_timeout);
}

/// The same schedule as the TCP keepalive, one level up: a query after `probe_every`, which must be answered
/// within `answer_within` (interval x count). For sessions that sit idle waiting for the server (LISTEN): a
/// proxy between nudge and PostgreSQL (PgBouncer, HAProxy, a cloud proxy) keeps answering TCP keepalives after
/// its backend went silent, so only a round trip through the server proves the session is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub probe_every: Duration,
    pub answer_within: Duration,
}

impl Liveness {
    /// Read from a configuration that went through [`apply_timeouts`] (tokio-postgres' defaults otherwise).
    pub fn of(config: &tokio_postgres::Config) -> Liveness {
        let interval = config.get_keepalives_interval().unwrap_or(Duration::from_secs(5));
        let count = config.get_keepalives_retries().unwrap_or(3).max(1);
        Liveness { probe_every: config.get_keepalives_idle(), answer_within: interval * count }
    }
}

/// A tokio-postgres error with its cause: its own text is often only "db error" or "error communicating with
/// the server".
pub fn describe(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// A connection attempt that failed, or did not finish in time.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no database session within {0:?} (connect_timeout)")]
    Timeout(Duration),
}

/// How long opening a session may take in all: the URL's `connect_timeout` (5 s by default, see
/// `config::parse_database_url`) per host. tokio-postgres applies `connect_timeout` to the TCP connect only;
/// behind a proxy whose backend is gone the TCP connect succeeds and the startup exchange would wait forever.
pub fn connect_bound(config: &tokio_postgres::Config) -> Duration {
    let per_host = config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(5));
    per_host * config.get_hosts().len().max(1) as u32
}

/// Open a direct session, bounded by [`connect_bound`].
pub async fn connect(
    database: &Database,
) -> Result<(tokio_postgres::Client, tokio_postgres::Connection<Socket, tls::TlsStream>), ConnectError> {
    let bound = connect_bound(database);
    match tokio::time::timeout(bound, database.tls.connect(&database.config)).await {
        Ok(connected) => Ok(connected?),
        Err(_) => Err(ConnectError::Timeout(bound)),
    }
}

/// A direct session, not from the pool: for migrations, `nudge status`, the demo's setup and the wake gate.
/// Derefs to the client; `close` ends it cleanly (the server sees a Terminate, not a reset).
pub struct Session {
    client: tokio_postgres::Client,
    /// Drives the connection's I/O; ends once the client is dropped.
    driver: tokio::task::JoinHandle<()>,
}

impl Session {
    pub async fn connect(database: &Database) -> Result<Session, ConnectError> {
        let (client, connection) = connect(database).await?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Session { client, driver })
    }

    pub async fn close(self) {
        let Session { client, driver } = self;
        drop(client);
        let _ = driver.await;
    }
}

impl std::ops::Deref for Session {
    type Target = tokio_postgres::Client;
    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl std::ops::DerefMut for Session {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
    }
}

/// How long a pass waits for a pooled session when all are in use.
const POOL_WAIT: Duration = Duration::from_secs(5);
/// Recycling is `Fast`: no I/O, only "has the connection ended?", so this bound never bites in practice.
const POOL_RECYCLE: Duration = Duration::from_secs(5);

/// The pool for claims, deliveries and cleanup. It hands out only sessions that are still open (`Fast`
/// recycling checks `Client::is_closed`, true once the kernel or the server ended the connection) and that were
/// not in use or idle when the LISTEN session was lost ([`distrust_sessions`]). Creating a session is bounded by
/// [`connect_bound`], waiting for one by `POOL_WAIT`. Sessions are opened with the database's TLS connector.
pub fn pool(database: &Database, size: usize) -> Result<Pool, deadpool_postgres::BuildError> {
    let mut config = database.config.clone();
    if config.get_application_name().is_none() {
        config.application_name("nudge");
    }
    let create = connect_bound(&config);
    let manager = Manager::from_connect(
        config,
        PoolConnect(database.tls.clone()),
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        // A pool waiting forever would hide a dead database behind hanging passes.
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(create))
        .recycle_timeout(Some(POOL_RECYCLE))
        .pre_recycle(Hook::sync_fn(|_, metrics| {
            if trusted(metrics.recycled.unwrap_or(metrics.created)) {
                Ok(())
            } else {
                tracing::debug!("discarding a pooled session from before the LISTEN session was lost");
                Err(HookError::message("session from before the LISTEN session was lost"))
            }
        }))
        .build()
}

/// How the pool opens a session: as [`connect`] does, with the database's TLS connector (deadpool's own
/// `ConfigConnectImpl` would not retry a failed `prefer` handshake in plain text).
struct PoolConnect(tls::Connector);

impl deadpool_postgres::Connect for PoolConnect {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
                > + Send
                + '_,
        >,
    > {
        let config = config.clone();
        Box::pin(async move {
            let (client, connection) = self.0.connect(&config).await?;
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(target: "deadpool.postgres", "Connection error: {}", describe(&e));
                }
            });
            Ok((client, driver))
        })
    }
}

/// Sessions last handed out (or opened) before this instant are not handed out again.
static DISTRUSTED_BEFORE: Mutex<Option<Instant>> = Mutex::new(None);

/// The network path to the database may have failed (the LISTEN session was lost): every pooled session opened
/// or handed out until now may be silent for good, and a query on it would wait for the kernel's timeouts (or
/// forever, behind a proxy). Drop the idle ones now; those in use are discarded when they come back. Sessions
/// opened from now on are trusted. Applies to every pool of the process.
pub fn distrust_sessions(pools: &[Pool]) {
    let now = Instant::now();
    *DISTRUSTED_BEFORE.lock().unwrap_or_else(|e| e.into_inner()) = Some(now);
    for pool in pools {
        let dropped = pool.retain(|_, metrics| metrics.recycled.unwrap_or(metrics.created) > now).removed.len();
        if dropped > 0 {
            tracing::info!(sessions = dropped, "discarded idle pooled sessions");
        }
    }
}

fn trusted(last_handed_out: Instant) -> bool {
    match *DISTRUSTED_BEFORE.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(before) => last_handed_out > before,
        None => true,
    }
}

/// Exponential backoff for reconnects: 100 ms doubling to 5 s, with jitter so nodes do not retry in lockstep.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: Duration::from_millis(100) }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        // Cheap jitter from the clock: up to +25 %.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        delay + delay.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }

    pub fn reset(&mut self) {
        *self = Backoff::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn options(args: &[&str]) -> crate::config::Options {
        crate::config::Cli::try_parse_from([&["nudge"], args].concat()).expect("parse").options
    }

    #[test]
    fn the_options_override_the_urls_keepalive_and_user_timeout_settings() {
        let url = "postgres://u@db.example/app?keepalives=0&keepalives_idle=600&keepalives_interval=60\
                   &keepalives_retries=20&tcp_user_timeout=300";
        let options = options(&[
            "--database-url",
            url,
            "--listen-database-url",
            url,
            "--db-keepalive-idle",
            "7s",
            "--db-keepalive-interval",
            "2s",
            "--db-keepalive-count",
            "4",
            "--db-tcp-user-timeout",
            "9s",
        ]);
        // `database()` serves `nudge status`, `listen_database()` `nudge migrate`; `serve` goes through both.
        for config in [options.database().unwrap(), options.listen_database().unwrap()] {
            assert!(config.get_keepalives());
            assert_eq!(config.get_keepalives_idle(), Duration::from_secs(7));
            assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(2)));
            assert_eq!(config.get_keepalives_retries(), Some(4));
            assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(9)));
            assert_eq!(
                Liveness::of(&config),
                Liveness { probe_every: Duration::from_secs(7), answer_within: Duration::from_secs(8) }
            );
        }
    }

    #[test]
    fn the_defaults_notice_a_silent_session_within_25s() {
        let config = options(&["--database-url", "postgres://u@db.example/app"]).database().unwrap();
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(20)));
        let liveness = Liveness::of(&config);
        assert_eq!(liveness.probe_every + liveness.answer_within, Duration::from_secs(25));
    }

    #[test]
    fn opening_a_session_is_bounded_by_connect_timeout_per_host() {
        let one = options(&["--database-url", "postgres://u@db.example/app"]).database().unwrap();
        assert_eq!(connect_bound(&one), Duration::from_secs(5));
        let two = options(&["--database-url", "postgres://u@a,b/app?connect_timeout=3"]).database().unwrap();
        assert_eq!(connect_bound(&two), Duration::from_secs(6));
    }
}
