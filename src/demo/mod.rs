//! `nudge demo`: the product in one command.
//!
//! Starts a throwaway PostgreSQL (or uses `--database-url`), applies the migrations and the demo's own
//! table, generates an HS256 secret, and runs a normal nudge node with the demo page and its small backend
//! ([`api`]) mounted beside `/ws`. Nothing here is reachable under `nudge serve`.
//!
//! The demo's token route signs a token for any user name, so the demo must never run with production
//! settings that happen to be in its environment: it ignores `NUDGE_DATABASE_URL`, `NUDGE_LISTEN_DATABASE_URL`
//! and every `NUDGE_JWT_*` setting, always signs with a fresh random secret, and listens on loopback unless
//! `--listen` is on its command line ([`restrict`]).

mod api;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use crate::auth::JwtAlgorithm;
use crate::config::{ConfigError, Options};
use crate::{db, node, throwaway};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No server binaries and no URL: the one line that says how to install PostgreSQL (exit code 2).
    #[error("{0}")]
    NoPostgres(String),
    #[error("throwaway PostgreSQL: {0}")]
    Cluster(throwaway::Error),
    #[error("database: {0}")]
    Database(String),
    #[error(transparent)]
    Start(#[from] node::StartError),
}

/// Options `nudge demo` takes from its own command line only, and whether they were given there.
#[derive(Debug, Clone, Copy, Default)]
pub struct CommandLine {
    /// `--listen`: without it the demo listens on 127.0.0.1 (on the port `NUDGE_LISTEN` or the default names).
    pub listen: bool,
    /// `--database-url`: without it the demo starts a throwaway PostgreSQL.
    pub database_url: bool,
}

impl CommandLine {
    pub fn of(matches: &clap::ArgMatches) -> CommandLine {
        // Global options given after the subcommand are propagated up to the top-level matches.
        let given = |id: &str| matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine);
        CommandLine { listen: given("listen"), database_url: given("database_url") }
    }
}

/// Drop what the demo must not take from the environment (see the module comment).
fn restrict(options: &mut Options, command_line: CommandLine) {
    if !command_line.database_url {
        options.database_url = None;
    }
    options.listen_database_url = None;
    if !command_line.listen {
        options.listen.set_ip(Ipv4Addr::LOCALHOST.into());
    }
    options.jwt_secret = None;
    options.jwt_public_key = None;
    options.jwt_algorithm = Some(JwtAlgorithm::Hs256);
    options.jwt_audience = None;
    options.jwt_issuer = None;
    options.jwks_url = None;
    // The demo's own tokens carry `topics` at the top level.
    options.jwt_topics_claim = "topics".into();
}

pub async fn run(mut options: Options, command_line: CommandLine) -> Result<(), DemoError> {
    restrict(&mut options, command_line);
    let Some(url) = options.database_url.clone() else {
        // Named after the process, so that a demo's cluster is easy to find (tests/demo.rs looks for it).
        let directory = std::env::temp_dir().join(format!("nudge-demo-{}", std::process::id()));
        let cluster = throwaway::Builder::new().directory(directory).start().await.map_err(|e| match e {
            throwaway::Error::NoBinaries => DemoError::NoPostgres(format!("{e} or pass --database-url")),
            other => DemoError::Cluster(other),
        })?;
        let served = serve(options, cluster.url(), true).await;
        // Deleted before the demo exits, whichever way `serve` ended (the guard would do it after, otherwise).
        if let Err(e) = cluster.stop().await {
            tracing::warn!("stopping the throwaway PostgreSQL: {e}");
        }
        return served;
    };
    serve(options, url, false).await
}

/// The demo on the database at `url` (`throwaway`: one `run` started, which the banner says).
async fn serve(options: Options, url: String, throwaway: bool) -> Result<(), DemoError> {
    let database = db::Database::parse(&url).map_err(ConfigError::from_database_url)?;
    prepare_database(&database).await?;

    let secret: Arc<str> =
        random_secret().map_err(|e| DemoError::Database(format!("cannot read /dev/urandom: {e}")))?.into();
    let config = options.serve_config_with(database.clone(), Some(secret.to_string()))?;
    let tls = config.tls.is_some();
    let pool = db::pool(&database, 4).map_err(|e| DemoError::Database(e.to_string()))?;
    let routes = api::routes(pool, secret);
    node::run(config, Some(routes), |addr| banner(addr, tls, &url, throwaway)).await?;
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::config::Cli;

    fn parse(args: &[&str]) -> (Options, CommandLine) {
        let matches = Cli::command().try_get_matches_from(args).expect("valid arguments");
        let cli = Cli::from_arg_matches(&matches).expect("valid arguments");
        (cli.options, CommandLine::of(&matches))
    }

    #[test]
    fn listen_and_database_url_count_only_from_the_command_line_before_or_after_demo() {
        let (_, given) = parse(&["nudge", "demo", "--listen", "0.0.0.0:9", "--database-url", "postgres://h/d"]);
        assert!(given.listen && given.database_url);
        let (_, given) = parse(&["nudge", "--listen", "0.0.0.0:9", "demo"]);
        assert!(given.listen && !given.database_url);
        let (_, given) = parse(&["nudge", "demo"]);
        assert!(!given.listen && !given.database_url, "a default is not the command line");
    }

    #[test]
    fn the_demo_keeps_no_production_setting_it_was_not_given_on_its_command_line() {
        let (mut options, _) = parse(&[
            "nudge",
            "demo",
            "--listen",
            "0.0.0.0:9000",
            "--database-url",
            "postgres://prod/db",
            "--listen-database-url",
            "postgres://prod/db",
            "--jwt-secret",
            "production",
            "--jwt-audience",
            "prod",
            "--jwt-issuer",
            "prod",
        ]);
        // As if --listen and --database-url had come from the environment.
        restrict(&mut options, CommandLine::default());
        assert_eq!(options.listen, SocketAddr::from(([127, 0, 0, 1], 9000)), "loopback, the port kept");
        assert_eq!(options.database_url, None);
        assert_eq!(options.listen_database_url, None);
        assert_eq!((options.jwt_secret, options.jwt_audience, options.jwt_issuer), (None, None, None));
        assert_eq!(options.jwt_algorithm, Some(JwtAlgorithm::Hs256));
        assert_eq!((options.jwks_url, options.jwt_topics_claim.as_str()), (None, "topics"));

        let (mut options, given) =
            parse(&["nudge", "demo", "--listen", "0.0.0.0:9000", "--database-url", "postgres://h/d"]);
        restrict(&mut options, given);
        assert_eq!(options.listen, SocketAddr::from(([0, 0, 0, 0], 9000)));
        assert_eq!(options.database_url.as_deref(), Some("postgres://h/d"));
    }
}
