//! `nudge`: parse the command line, then hand over to the module that runs the command.

use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgMatches, CommandFactory, FromArgMatches};

use nudge::config::{Cli, Command, ConfigError, Options, TokenArgs};
use nudge::{auth, db, demo, node};

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches).map(|cli| (cli, matches)))
        .map_err(|e| e.format(&mut Cli::command()));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("error: invalid arguments"));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(cli.command.unwrap_or(Command::Serve), cli.options, &matches));
    // Connection tasks still draining after the grace period are not waited for.
    runtime.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Exit code 2 for configuration mistakes, 1 for everything that fails at run time.
enum Failure {
    Config(String),
    Runtime(String),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e.to_string())
    }
}

async fn run(command: Command, mut options: Options, matches: &ArgMatches) -> Result<(), Failure> {
    // `nudge demo` takes no database or secret from the environment (demo::restrict), files included.
    if command != Command::Demo {
        options.read_secret_files()?;
    }
    match command {
        Command::Serve => {
            node::run(options.serve_config()?, None, |_| {}).await.map_err(|e| Failure::Runtime(e.to_string()))
        }
        Command::Migrate => {
            let database = options.listen_database()?;
            let applied = db::migrate::migrate(&database).await.map_err(|e| Failure::Runtime(e.to_string()))?;
            match applied.as_slice() {
                [] => tracing::info!(version = db::migrate::latest_version(), "schema already current"),
                versions => tracing::info!(?versions, "schema migrated"),
            }
            Ok(())
        }
        Command::Token(args) => token(&options, &args),
        Command::Status => status(&options).await,
        Command::Demo => demo::run(options, demo::CommandLine::of(matches)).await.map_err(|e| match e {
            demo::DemoError::Config(e) => Failure::Config(e.to_string()),
            demo::DemoError::NoPostgres(message) => Failure::Config(message),
            other => Failure::Runtime(other.to_string()),
        }),
    }
}

/// `nudge status`: the cluster as the database sees it.
async fn status(options: &Options) -> Result<(), Failure> {
    let database = options.database()?;
    let runtime = |e: db::QueryError| Failure::Runtime(format!("cannot read the cluster status: {e}"));
    let session = db::Session::connect(&database)
        .await
        .map_err(|e| Failure::Runtime(format!("cannot read the cluster status: {e}")))?;
    let status = db::nodes::status(&session).await;
    session.close().await;
    let status = status.map_err(runtime)?;
    println!(
        "last seq {}, pending rows {}, nodes {}, oldest pending {:.1}s",
        status.last_seq,
        status.pending,
        status.nodes.len(),
        status.oldest_pending_s
    );
    if !status.nodes.is_empty() {
        println!(
            "\n{:<28} {:<22} {:<20} {:>9} {:>11} {:>10} {:>6} {:>8}",
            "NODE", "ADDRESS", "STARTED (UTC)", "HEARTBEAT", "CONNECTIONS", "CURSOR", "LAG", "LAG_S"
        );
    }
    for node in &status.nodes {
        println!(
            "{:<28} {:<22} {:<20} {:>8.0}s {:>11} {:>10} {:>6} {:>8.1}",
            node.id,
            node.address,
            node.started,
            node.heartbeat_age_s,
            node.connections,
            node.cursor,
            status.last_seq - node.cursor,
            node.lag_seconds
        );
    }
    Ok(())
}

fn token(options: &Options, args: &TokenArgs) -> Result<(), Failure> {
    if options.jwt_algorithm.is_some_and(|a| a != nudge::auth::JwtAlgorithm::Hs256) {
        return Err(Failure::Config(
            "nudge token signs HS256 only; with RS256/ES256/EdDSA your backend signs with its private key".into(),
        ));
    }
    let Some(secret) = options.jwt_secret.as_deref().filter(|s| !s.is_empty()) else {
        return Err(Failure::Config(
            "nudge token signs HS256 tokens with NUDGE_JWT_SECRET, which is not set (for RS256/ES256/EdDSA, \
             tokens are signed by your backend's private key)"
                .into(),
        ));
    };
    let claim = auth::TopicsClaim::new(&options.jwt_topics_claim).map_err(|e| Failure::Config(e.to_string()))?;
    let request = auth::TokenRequest {
        sub: &args.sub,
        topics: &args.topics,
        ttl: args.ttl,
        audience: options.jwt_audience.as_deref(),
        issuer: options.jwt_issuer.as_deref(),
    };
    let token =
        auth::issue_token_with(secret, &request, &claim).map_err(|e| Failure::Runtime(format!("cannot sign: {e}")))?;
    println!("{token}");
    Ok(())
}
