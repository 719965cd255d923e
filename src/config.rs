//! Configuration: every option is a flag and an environment variable (`--help` lists them with defaults).
//!
//! Parsing (clap) and checking (keys readable, URL well-formed) both happen here, before anything starts, so
//! a mistake is one line on stderr and exit code 2 rather than a failure minutes later.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::{Authenticator, JwtAlgorithm, JwtKey, JwtSettings, KeyError, TopicsClaim};
use crate::jwks::{Jwks, JwksSettings};

#[derive(Debug, Parser)]
#[command(
    name = "nudge",
    version,
    about = "Relays 'something new happened' hints from PostgreSQL to WebSocket clients.",
    after_help = "Durations are written like 250ms, 10s, 5m, 1h. Exit codes: 0 clean shutdown, 1 runtime failure, \
                  2 configuration error."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub options: Options,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run the relay (the default command).
    Serve,
    /// Apply the SQL migrations and exit.
    Migrate,
    /// Print a signed token (HS256, from NUDGE_JWT_SECRET), for development and examples.
    Token(TokenArgs),
    /// Run the product on a throwaway PostgreSQL with a demo page: a live comment thread.
    Demo,
    /// Print the cluster: nodes, connections, pending rows, each node's cursor lag.
    Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    pub sub: String,
    /// Topic patterns the user may subscribe to, comma-separated (`post:*,chat:7`).
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Lifetime of the token.
    #[arg(long, default_value = "1h", value_parser = duration)]
    pub ttl: Duration,
}

#[derive(Debug, Args)]
pub struct Options {
    /// PostgreSQL URL (postgres://user:pass@host:5432/db) or key=value connection string.
    #[arg(long, env = "NUDGE_DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// File holding the database URL (a mounted secret), instead of NUDGE_DATABASE_URL; a trailing newline is
    /// ignored.
    #[arg(long, env = "NUDGE_DATABASE_URL_FILE", global = true, value_name = "PATH")]
    pub database_url_file: Option<PathBuf>,

    /// Direct PostgreSQL URL for LISTEN and migrations, when NUDGE_DATABASE_URL goes through PgBouncer in
    /// transaction mode (LISTEN and advisory locks need a session). Default: NUDGE_DATABASE_URL.
    #[arg(long, env = "NUDGE_LISTEN_DATABASE_URL", global = true, hide_env_values = true)]
    pub listen_database_url: Option<String>,

    /// File holding the direct database URL, instead of NUDGE_LISTEN_DATABASE_URL; a trailing newline is ignored.
    #[arg(long, env = "NUDGE_LISTEN_DATABASE_URL_FILE", global = true, value_name = "PATH")]
    pub listen_database_url_file: Option<PathBuf>,

    /// This node's id in nudge.nodes and `nudge status` (default: hostname-pid).
    #[arg(long, env = "NUDGE_NODE_ID", global = true)]
    pub node_id: Option<String>,

    /// Address for HTTP and WebSocket.
    #[arg(long, env = "NUDGE_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    pub listen: SocketAddr,

    /// Address serving /metrics (plain HTTP) apart from --listen, which then answers /metrics with 404.
    /// Default: /metrics is served on --listen.
    #[arg(long, env = "NUDGE_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,

    /// PEM certificate chain: serve TLS (https/wss) with it. Needs --tls-key.
    #[arg(long, env = "NUDGE_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, env = "NUDGE_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,

    /// HS256 shared secret.
    #[arg(long, env = "NUDGE_JWT_SECRET", global = true, hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// File holding the HS256 secret, instead of NUDGE_JWT_SECRET; a trailing newline is ignored.
    #[arg(long, env = "NUDGE_JWT_SECRET_FILE", global = true, value_name = "PATH")]
    pub jwt_secret_file: Option<PathBuf>,

    /// Path to a PEM public key (RS256, ES256, EdDSA...).
    #[arg(long, env = "NUDGE_JWT_PUBLIC_KEY", global = true)]
    pub jwt_public_key: Option<PathBuf>,

    /// URL of the issuer's published signing keys (JWKS; https, or http to a loopback host): tokens are verified
    /// with the key their `kid` names. Excludes --jwt-secret and --jwt-public-key.
    #[arg(long, env = "NUDGE_JWKS_URL", global = true)]
    pub jwks_url: Option<String>,

    /// How often the JWKS is fetched again (failed fetches are retried sooner, with backoff).
    #[arg(long, env = "NUDGE_JWKS_REFRESH", default_value = "10m", value_parser = duration, global = true)]
    pub jwks_refresh: Duration,

    /// Least time between two JWKS fetches caused by tokens naming an unknown key id.
    #[arg(long, env = "NUDGE_JWKS_MIN_INTERVAL", default_value = "30s", value_parser = duration, global = true)]
    pub jwks_min_interval: Duration,

    /// Token algorithm; tokens signed with any other are refused [default: HS256; with --jwks-url, any the keys
    /// allow].
    #[arg(long, env = "NUDGE_JWT_ALGORITHM", global = true)]
    pub jwt_algorithm: Option<JwtAlgorithm>,

    /// The claim holding the topic patterns: a top-level claim of exactly this name, else a dot path into nested
    /// objects (app_metadata.topics).
    #[arg(long, env = "NUDGE_JWT_TOPICS_CLAIM", default_value = "topics", global = true)]
    pub jwt_topics_claim: String,

    /// Required `aud` claim.
    #[arg(long, env = "NUDGE_JWT_AUDIENCE", global = true)]
    pub jwt_audience: Option<String>,

    /// Required `iss` claim.
    #[arg(long, env = "NUDGE_JWT_ISSUER", global = true)]
    pub jwt_issuer: Option<String>,

    /// Clock leeway for `exp` and `nbf`.
    #[arg(long, env = "NUDGE_JWT_LEEWAY", default_value = "0s", value_parser = duration, global = true)]
    pub jwt_leeway: Duration,

    /// Time a client has to send `auth` after connecting.
    #[arg(long, env = "NUDGE_AUTH_TIMEOUT", default_value = "10s", value_parser = duration, global = true)]
    pub auth_timeout: Duration,

    /// Comma-separated Origins allowed to upgrade (default: any). Requests without Origin are allowed.
    #[arg(long, env = "NUDGE_ALLOWED_ORIGINS", value_delimiter = ',', global = true)]
    pub allowed_origins: Vec<String>,

    /// Fallback poll: claims anything a missed NOTIFY left behind.
    #[arg(long, env = "NUDGE_POLL_INTERVAL", default_value = "2s", value_parser = duration, global = true)]
    pub poll_interval: Duration,

    /// Rows per claim statement.
    #[arg(long, env = "NUDGE_CLAIM_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..=100_000), global = true)]
    pub claim_batch: i64,

    /// How a claim commits: `durable` waits for its WAL flush (nothing is ever delivered twice); `async` does not,
    /// and after a PostgreSQL crash redelivers the events claimed in its last moments (same id, new seq).
    #[arg(long, env = "NUDGE_CLAIM_COMMIT", value_enum, default_value_t = ClaimCommit::Durable, global = true)]
    pub claim_commit: ClaimCommit,

    /// Producer transactions per second from which a node claims in a loop and producers skip their NOTIFY
    /// (the wake gate); below it every inserting transaction NOTIFYs.
    #[arg(long, env = "NUDGE_AWAKE_ABOVE", default_value_t = 2500, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub awake_above: u32,

    /// How long processed rows are kept before they are deleted.
    #[arg(long, env = "NUDGE_RETENTION", default_value = "1h", value_parser = duration, global = true)]
    pub retention: Duration,

    /// Events older than this when claimed are expired, not delivered.
    #[arg(long, env = "NUDGE_MAX_AGE", default_value = "5m", value_parser = duration, global = true)]
    pub max_age: Duration,

    /// Open WebSocket connections; further upgrades get HTTP 503.
    #[arg(long, env = "NUDGE_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_connections: u32,

    /// Inbound frame limit in bytes; larger frames close the connection with 1009.
    #[arg(long, env = "NUDGE_MAX_MESSAGE_SIZE", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(64..=1_048_576), global = true)]
    pub max_message_size: u32,

    /// Topics one connection may subscribe to.
    #[arg(long, env = "NUDGE_MAX_SUBSCRIPTIONS", default_value_t = 100, global = true)]
    pub max_subscriptions: usize,

    /// Events queued per connection; a client that lets it overflow is closed with 1013.
    #[arg(long, env = "NUDGE_OUTBOUND_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000), global = true)]
    pub outbound_queue: u32,

    /// Messages per second one connection may send (burst of the same size).
    #[arg(long, env = "NUDGE_CLIENT_RATE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub client_rate: u32,

    /// WebSocket ping interval; a peer silent for two intervals is dropped.
    #[arg(long, env = "NUDGE_PING_INTERVAL", default_value = "30s", value_parser = duration, global = true)]
    pub ping_interval: Duration,

    /// PostgreSQL connections for claims and cleanup (the LISTEN connection is extra).
    #[arg(long, env = "NUDGE_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=1000), global = true)]
    pub pool_size: u32,

    /// A connection whose socket accepts no bytes for this long (it reads nothing) is closed with 1013; the client
    /// can reconnect and `resume`.
    #[arg(long, env = "NUDGE_WRITE_TIMEOUT", default_value = "10s", value_parser = duration, global = true)]
    pub write_timeout: Duration,

    /// Time a client has to send a complete HTTP request header (the upgrade request, or any other request on
    /// a kept-alive connection); slower connections are closed.
    #[arg(long, env = "NUDGE_HEADER_TIMEOUT", default_value = "10s", value_parser = duration, global = true)]
    pub header_timeout: Duration,

    /// An HTTP connection (not a WebSocket) idle this long between requests is closed.
    #[arg(long, env = "NUDGE_KEEP_ALIVE_TIMEOUT", default_value = "30s", value_parser = duration, global = true)]
    pub keep_alive_timeout: Duration,

    /// Largest HTTP request header accepted, in bytes; larger requests get 431 or are closed.
    #[arg(long, env = "NUDGE_MAX_HEADER_SIZE", default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1024..=1_048_576), global = true)]
    pub max_header_size: u32,

    /// TCP connections still speaking HTTP (not yet upgraded to WebSocket); further connections are closed at
    /// once until some finish.
    #[arg(long, env = "NUDGE_MAX_PENDING_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub max_pending_connections: u32,

    /// TCP connections (HTTP and WebSocket) one IP address may hold open; 0 means no per-address limit.
    #[arg(long, env = "NUDGE_MAX_CONNECTIONS_PER_IP", default_value_t = 0, global = true)]
    pub max_connections_per_ip: u32,

    /// PostgreSQL connections for `resume` replays and slow-consumer catch-ups, apart from the pool claims and
    /// live delivery use, so that replays never delay them.
    #[arg(long, env = "NUDGE_REPLAY_POOL_SIZE", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=100), global = true)]
    pub replay_pool_size: u32,

    /// Client-side limit on each of nudge's own queries on the pools; a query that has not answered by then is
    /// abandoned and its database session discarded.
    #[arg(long, env = "NUDGE_STATEMENT_TIMEOUT", default_value = "10s", value_parser = duration, global = true)]
    pub statement_timeout: Duration,

    /// TCP keepalive: idle time before the first probe on a database session (overrides the URL's
    /// keepalives_idle).
    #[arg(long, env = "NUDGE_DB_KEEPALIVE_IDLE", default_value = "10s", value_parser = duration, global = true)]
    pub db_keepalive_idle: Duration,

    /// TCP keepalive: time between probes on a database session.
    #[arg(long, env = "NUDGE_DB_KEEPALIVE_INTERVAL", default_value = "5s", value_parser = duration, global = true)]
    pub db_keepalive_interval: Duration,

    /// TCP keepalive: unanswered probes after which a database session is dead.
    #[arg(long, env = "NUDGE_DB_KEEPALIVE_COUNT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100), global = true)]
    pub db_keepalive_count: u32,

    /// TCP user timeout on database sessions: data unacknowledged this long kills the session (Linux).
    #[arg(long, env = "NUDGE_DB_TCP_USER_TIMEOUT", default_value = "20s", value_parser = duration, global = true)]
    pub db_tcp_user_timeout: Duration,

    /// Do not apply migrations at start (`serve` then waits until the schema is current).
    #[arg(long, env = "NUDGE_NO_MIGRATE", global = true)]
    pub no_migrate: bool,
}

/// Everything wrong with a configuration, each variant one line for stderr.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("NUDGE_DATABASE_URL (--database-url) is required")]
    MissingDatabaseUrl,
    #[error("NUDGE_DATABASE_URL is malformed: {0}")]
    BadDatabaseUrl(String),
    #[error("NUDGE_LISTEN_DATABASE_URL is malformed: {0}")]
    BadListenDatabaseUrl(String),
    /// The URL's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`): which variable, and why.
    #[error("{0}: {1}")]
    DatabaseTls(&'static str, String),
    #[error(transparent)]
    Jwt(#[from] crate::auth::KeyError),
    #[error("--{0} must be greater than zero")]
    Zero(&'static str),
    #[error("TLS needs both NUDGE_TLS_CERT and NUDGE_TLS_KEY")]
    TlsHalf,
    #[error("cannot read TLS {what} {path}: {reason}")]
    Tls { what: &'static str, path: PathBuf, reason: String },
    #[error("{var} and {var}_FILE (--{flag} and --{flag}-file) are both set: give one of them")]
    ValueAndFile { var: &'static str, flag: &'static str },
    #[error("cannot read {var}_FILE {path}: {reason}")]
    SecretFile { var: &'static str, path: PathBuf, reason: String },
}

/// Limits applied to each WebSocket connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub auth_timeout: Duration,
    pub max_message_size: usize,
    pub max_subscriptions: usize,
    pub outbound_queue: usize,
    pub client_rate: u32,
    pub ping_interval: Duration,
    /// A socket that accepts nothing for this long is closed with 1013.
    pub write_timeout: Duration,
}

/// Limits on the HTTP side, before a connection becomes a WebSocket (`http.rs`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub header_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_header_size: usize,
    /// Connections not yet upgraded.
    pub max_pending: usize,
    /// Connections per IP address, upgraded or not; `None`: no limit.
    pub max_per_ip: Option<usize>,
}

/// How nudge notices a database session that went away without a word (`db` module).
#[derive(Debug, Clone)]
pub struct DatabaseTimeouts {
    pub keepalive_idle: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count: u32,
    pub tcp_user_timeout: Duration,
    /// Client-side limit on each query nudge sends through its pools.
    pub statement: Duration,
}

/// How a claim's transaction commits (`NUDGE_CLAIM_COMMIT`; sql/0008_claim_commit.sql).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClaimCommit {
    /// Wait for the WAL flush: a claim whose events went out survives a PostgreSQL crash.
    Durable,
    /// `synchronous_commit = off` for the claim only: a claim skips its WAL flush (about half a millisecond on a
    /// durable disk), and a PostgreSQL crash may forget the claims of its last moments (at most three
    /// `wal_writer_delay`s), whose events are then claimed and delivered again, with the same id and a new, higher
    /// seq. Nothing is lost; online clients may see such an event twice.
    Async,
}

/// Settings of the claim loop and the retention sweep.
#[derive(Debug, Clone)]
pub struct RelaySettings {
    pub poll_interval: Duration,
    pub claim_batch: i64,
    pub claim_commit: ClaimCommit,
    /// Producer transactions per second from which the claim loop holds the wake gate (relay/claim.rs, `Flow`).
    pub awake_above: f64,
    pub retention: Duration,
    pub max_age: Duration,
}

/// A checked configuration for `serve`.
pub struct ServeConfig {
    /// The pool's database (may be PgBouncer in transaction mode).
    pub database: crate::db::Database,
    /// A direct session for LISTEN and migrations.
    pub listen_database: crate::db::Database,
    pub node_id: String,
    pub listen: SocketAddr,
    /// Where /metrics is served when not on `listen`.
    pub metrics_listen: Option<SocketAddr>,
    /// Set when nudge terminates TLS itself.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub authenticator: Authenticator,
    /// Empty means any Origin.
    pub allowed_origins: Vec<String>,
    pub max_connections: usize,
    pub limits: ConnectionLimits,
    pub http: HttpLimits,
    pub relay: RelaySettings,
    pub pool_size: usize,
    /// The separate pool for `resume` replays and slow-consumer catch-ups.
    pub replay_pool_size: usize,
    pub timeouts: DatabaseTimeouts,
    pub migrate: bool,
}

impl Options {
    /// Replace each `*_FILE` option (a path, e.g. a mounted secret) with the contents of its file, trailing
    /// newlines removed. Setting an option and its `_FILE` twin is a configuration error, and so is a file that
    /// cannot be read or is empty; no message contains what the file holds.
    pub fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        for (var, flag, value, file) in [
            ("NUDGE_DATABASE_URL", "database-url", &mut self.database_url, self.database_url_file.take()),
            (
                "NUDGE_LISTEN_DATABASE_URL",
                "listen-database-url",
                &mut self.listen_database_url,
                self.listen_database_url_file.take(),
            ),
            ("NUDGE_JWT_SECRET", "jwt-secret", &mut self.jwt_secret, self.jwt_secret_file.take()),
        ] {
            let Some(path) = file else { continue };
            if value.is_some() {
                return Err(ConfigError::ValueAndFile { var, flag });
            }
            let bad = |reason: String| ConfigError::SecretFile { var, path: path.clone(), reason };
            let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
            let text = text.trim_end_matches(['\n', '\r']);
            if text.is_empty() {
                return Err(bad("the file is empty".into()));
            }
            *value = Some(text.to_owned());
        }
        Ok(())
    }

    pub fn database(&self) -> Result<crate::db::Database, ConfigError> {
        let url = self.database_url.as_deref().ok_or(ConfigError::MissingDatabaseUrl)?;
        parse_database_url(url, &self.database_timeouts()).map_err(ConfigError::from_database_url)
    }

    /// The direct session for LISTEN and migrations: NUDGE_LISTEN_DATABASE_URL, else NUDGE_DATABASE_URL.
    pub fn listen_database(&self) -> Result<crate::db::Database, ConfigError> {
        match self.listen_database_url.as_deref() {
            Some(url) => {
                parse_database_url(url, &self.database_timeouts()).map_err(ConfigError::from_listen_database_url)
            }
            None => self.database(),
        }
    }

    pub fn serve_config(&self) -> Result<ServeConfig, ConfigError> {
        self.serve_config_with(self.database()?, self.jwt_secret.clone())
    }

    /// `serve_config` with the database and secret given by the caller (`nudge demo` makes its own).
    pub fn serve_config_with(
        &self,
        database: crate::db::Database,
        jwt_secret: Option<String>,
    ) -> Result<ServeConfig, ConfigError> {
        let key = match (&jwt_secret, &self.jwt_public_key, &self.jwks_url) {
            (Some(_), _, Some(_)) => return Err(KeyError::JwksAnd("NUDGE_JWT_SECRET").into()),
            (_, Some(_), Some(_)) => return Err(KeyError::JwksAnd("NUDGE_JWT_PUBLIC_KEY").into()),
            (Some(secret), None, None) => JwtKey::Secret(secret.clone()),
            (None, Some(path), None) => JwtKey::PublicKeyPem(path.clone()),
            (None, None, Some(url)) => {
                for (name, value) in
                    [("jwks-refresh", self.jwks_refresh), ("jwks-min-interval", self.jwks_min_interval)]
                {
                    if value.is_zero() {
                        return Err(ConfigError::Zero(name));
                    }
                }
                if self.jwt_algorithm == Some(JwtAlgorithm::Hs256) {
                    return Err(KeyError::HmacFromJwks.into());
                }
                let jwks = Jwks::new(JwksSettings {
                    url: url.clone(),
                    refresh: self.jwks_refresh,
                    min_interval: self.jwks_min_interval,
                    only: self.jwt_algorithm.map(JwtAlgorithm::jsonwebtoken),
                })
                .map_err(KeyError::from)?;
                JwtKey::Jwks { jwks, only: self.jwt_algorithm }
            }
            (None, None, None) => return Err(KeyError::Missing.into()),
            (Some(_), Some(_), None) => return Err(KeyError::Both.into()),
        };
        let authenticator = Authenticator::new(JwtSettings {
            algorithm: self.jwt_algorithm.unwrap_or(JwtAlgorithm::Hs256),
            key,
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            leeway: self.jwt_leeway,
        })?
        .with_topics_claim(TopicsClaim::new(&self.jwt_topics_claim)?);
        for (name, value) in [
            ("auth-timeout", self.auth_timeout),
            ("poll-interval", self.poll_interval),
            ("ping-interval", self.ping_interval),
            ("retention", self.retention),
            ("max-age", self.max_age),
            ("write-timeout", self.write_timeout),
            ("header-timeout", self.header_timeout),
            ("keep-alive-timeout", self.keep_alive_timeout),
            ("statement-timeout", self.statement_timeout),
            ("db-keepalive-idle", self.db_keepalive_idle),
            ("db-keepalive-interval", self.db_keepalive_interval),
            ("db-tcp-user-timeout", self.db_tcp_user_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        let listen_database = match self.listen_database_url.as_deref() {
            Some(url) => {
                parse_database_url(url, &self.database_timeouts()).map_err(ConfigError::from_listen_database_url)?
            }
            None => database.clone(),
        };
        Ok(ServeConfig {
            database,
            listen_database,
            node_id: self.node_id.clone().unwrap_or_else(default_node_id),
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            tls: self.tls()?,
            authenticator,
            allowed_origins: self
                .allowed_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            max_connections: self.max_connections as usize,
            limits: ConnectionLimits {
                auth_timeout: self.auth_timeout,
                max_message_size: self.max_message_size as usize,
                max_subscriptions: self.max_subscriptions,
                outbound_queue: self.outbound_queue as usize,
                client_rate: self.client_rate,
                ping_interval: self.ping_interval,
                write_timeout: self.write_timeout,
            },
            http: HttpLimits {
                header_timeout: self.header_timeout,
                keep_alive_timeout: self.keep_alive_timeout,
                max_header_size: self.max_header_size as usize,
                max_pending: self.max_pending_connections as usize,
                max_per_ip: (self.max_connections_per_ip > 0).then_some(self.max_connections_per_ip as usize),
            },
            relay: RelaySettings {
                poll_interval: self.poll_interval,
                claim_batch: self.claim_batch,
                claim_commit: self.claim_commit,
                awake_above: f64::from(self.awake_above),
                retention: self.retention,
                max_age: self.max_age,
            },
            pool_size: self.pool_size as usize,
            replay_pool_size: self.replay_pool_size as usize,
            timeouts: self.database_timeouts(),
            migrate: !self.no_migrate,
        })
    }
}

impl Options {
    pub fn database_timeouts(&self) -> DatabaseTimeouts {
        DatabaseTimeouts {
            keepalive_idle: self.db_keepalive_idle,
            keepalive_interval: self.db_keepalive_interval,
            keepalive_count: self.db_keepalive_count,
            tcp_user_timeout: self.db_tcp_user_timeout,
            statement: self.statement_timeout,
        }
    }

    fn tls(&self) -> Result<Option<tokio_rustls::TlsAcceptor>, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert_path, key_path) = match (&self.tls_cert, &self.tls_key) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            _ => return Err(ConfigError::TlsHalf),
        };
        let bad = |what, path: &PathBuf, reason: String| ConfigError::Tls { what, path: path.clone(), reason };
        let certs = CertificateDer::pem_file_iter(cert_path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| bad("certificate", cert_path, e.to_string()))?;
        if certs.is_empty() {
            return Err(bad("certificate", cert_path, "no CERTIFICATE block".into()));
        }
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| bad("key", key_path, e.to_string()))?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|builder| builder.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| bad("certificate/key pair", cert_path, e.to_string()))?;
        // WebSocket upgrades are HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))))
    }
}

impl ConfigError {
    /// Messages name the variable and the parameter, never the URL (it may hold a password).
    pub fn from_database_url(e: crate::db::UrlError) -> ConfigError {
        match e {
            crate::db::UrlError::Malformed(e) => ConfigError::BadDatabaseUrl(e),
            crate::db::UrlError::Tls(e) => ConfigError::DatabaseTls("NUDGE_DATABASE_URL", e),
        }
    }

    pub fn from_listen_database_url(e: crate::db::UrlError) -> ConfigError {
        match e {
            crate::db::UrlError::Malformed(e) => ConfigError::BadListenDatabaseUrl(e),
            crate::db::UrlError::Tls(e) => ConfigError::DatabaseTls("NUDGE_LISTEN_DATABASE_URL", e),
        }
    }
}

/// A URL or key=value string (with libpq's TLS parameters, `db::tls`), with nudge's session settings:
/// `connect_timeout` 5 s unless the URL sets one (it bounds the whole session setup, `db::connect_bound`), and the
/// `NUDGE_DB_*` keepalive and TCP user timeout options, which override the URL's `keepalives*` and
/// `tcp_user_timeout` (`db::apply_timeouts`).
fn parse_database_url(url: &str, timeouts: &DatabaseTimeouts) -> Result<crate::db::Database, crate::db::UrlError> {
    let mut config = crate::db::Database::parse(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    crate::db::apply_timeouts(&mut config, timeouts);
    Ok(config)
}

/// `hostname-pid`: unique among live nodes, and says where to look.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "nudge".into());
    format!("{host}-{}", std::process::id())
}

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{e} (write durations like 250ms, 10s, 5m, 1h)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_readme_says() {
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(duration("soon").is_err());
    }

    #[test]
    fn every_option_has_an_environment_variable() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for arg in cmd.get_arguments() {
            if matches!(arg.get_id().as_str(), "help" | "version") {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert!(
                env.as_deref().is_some_and(|e| e.starts_with("NUDGE_")),
                "--{} has no NUDGE_ environment variable",
                arg.get_id()
            );
        }
    }
}
