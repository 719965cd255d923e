//! `nudge demo`: the product in one command.
//!
//! Starts a throwaway PostgreSQL (or uses `NUDGE_DATABASE_URL`), applies the migrations and the demo's own
//! table, generates an HS256 secret, and runs a normal nudge node with the demo page and its small backend
//! ([`api`]) mounted beside `/ws`. Nothing here is reachable under `nudge serve`.

mod api;
mod postgres;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{ConfigError, Options};
use crate::{db, node};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No server binaries and no URL: the one line that says how to install PostgreSQL (exit code 2).
    #[error("{0}")]
    NoPostgres(String),
    #[error("throwaway PostgreSQL: {0}")]
    Cluster(postgres::ClusterError),
    #[error("database: {0}")]
    Database(String),
    #[error(transparent)]
    Start(#[from] node::StartError),
}

pub async fn run(options: Options) -> Result<(), DemoError> {
    let (cluster, url) = match options.database_url.clone() {
        Some(url) => (None, url),
        None => {
            let cluster = postgres::Cluster::start().await.map_err(|e| match e {
                postgres::ClusterError::NotFound => DemoError::NoPostgres(e.to_string()),
                other => DemoError::Cluster(other),
            })?;
            let url = cluster.url.clone();
            (Some(cluster), url)
        }
    };
    let database = db::Database::parse(&url).map_err(ConfigError::from_database_url)?;
    prepare_database(&database).await?;

    let secret: Arc<str> = match options.jwt_secret.clone().filter(|s| !s.is_empty()) {
        Some(secret) => secret.into(),
        None => random_secret().map_err(|e| DemoError::Database(format!("cannot read /dev/urandom: {e}")))?.into(),
    };
    let config = options.serve_config_with(database.clone(), Some(secret.to_string()))?;
    let tls = config.tls.is_some();
    let pool = db::pool(&database, 4).map_err(|e| DemoError::Database(e.to_string()))?;
    let routes = api::routes(pool, secret);
    let throwaway = cluster.is_some();
    node::run(config, Some(routes), |addr| banner(addr, tls, &url, throwaway)).await?;
    drop(cluster);
    Ok(())
}

async fn prepare_database(database: &db::Database) -> Result<(), DemoError> {
    db::migrate::migrate(database).await.map_err(|e| DemoError::Database(e.to_string()))?;
    let session = db::Session::connect(database).await.map_err(|e| DemoError::Database(e.to_string()))?;
    let created = session.batch_execute(api::SCHEMA).await;
    session.close().await;
    created.map_err(|e| DemoError::Database(format!("creating the demo table: {e}")))
}

fn banner(addr: SocketAddr, tls: bool, url: &str, throwaway: bool) {
    let (http, ws) = if tls { ("https", "wss") } else { ("http", "ws") };
    let host = if addr.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], addr.port())) } else { addr };
    let note = if throwaway { "  (throwaway: deleted when the demo stops)" } else { "" };
    println!(
        "\nnudge demo is running\n\n  \
         demo page  {http}://{host}/   open it in two tabs, as two different users\n  \
         websocket  {ws}://{host}/ws\n  \
         database   {url}{note}\n\n  \
         insert an event by hand (tabs showing post 1 see it):\n    \
         psql '{url}' -c \"INSERT INTO nudge.events (topic, kind, data) VALUES ('post:1', 'comment.created', '{{\\\"by\\\": \\\"psql\\\"}}')\"\n\n\
         Ctrl-C stops it.\n"
    );
}

fn random_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
