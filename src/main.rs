//! `nudge`: parse the configuration, then wire the parts together. Each part lives in its own module.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::sync::Semaphore;

use nudge::config::{Cli, Command, ConfigError, ServeConfig};
use nudge::connection::Shared;
use nudge::health::{Metrics, Readiness};
use nudge::hub::Hub;
use nudge::relay::{self, Relay};
use nudge::wake::Wakeups;
use nudge::{db, http, shutdown};

/// How long shutdown may take before nudge exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(9);

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let rendered = e.to_string();
            eprintln!("{}", rendered.lines().next().unwrap_or("invalid arguments"));
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
    let command = cli.command.unwrap_or(Command::Serve);
    let result = runtime.block_on(async {
        match command {
            Command::Serve => serve(cli.options.serve_config()?).await,
            Command::Migrate => migrate(cli.options.database()?).await,
        }
    });
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

enum Failure {
    Config(ConfigError),
    Runtime(String),
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::Config(e)
    }
}

async fn migrate(database: tokio_postgres::Config) -> Result<(), Failure> {
    let applied = db::migrate::migrate(&database).await.map_err(|e| Failure::Runtime(e.to_string()))?;
    match applied.as_slice() {
        [] => tracing::info!(version = db::migrate::latest_version(), "schema already current"),
        versions => tracing::info!(?versions, "schema migrated"),
    }
    Ok(())
}

async fn serve(config: ServeConfig) -> Result<(), Failure> {
    let ServeConfig { database, listen, authenticator, allowed_origins, max_connections, limits, relay, pool_size, migrate } =
        config;
    let pool = db::pool(&database, pool_size).map_err(|e| Failure::Runtime(format!("cannot build the pool: {e}")))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::Runtime(format!("cannot listen on {listen}: {e}")))?;
    let local = listener.local_addr().map_err(|e| Failure::Runtime(e.to_string()))?;

    let (trigger, shutdown) = shutdown::channel();
    let hub = Arc::new(Hub::new());
    let wakeups = Arc::new(Wakeups::default());
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let shared = Arc::new(Shared {
        hub: hub.clone(),
        wakeups: wakeups.clone(),
        authenticator: Arc::new(authenticator),
        metrics: metrics.clone(),
        limits,
    });
    let slots = Arc::new(Semaphore::new(max_connections));
    let server = Arc::new(http::Server {
        shared,
        readiness: readiness.clone(),
        pool: pool.clone(),
        allowed_origins,
        slots: slots.clone(),
        max_connections,
        shutdown: shutdown.clone(),
    });
    let relay = Arc::new(Relay { pool, hub, wakeups: wakeups.clone(), metrics, readiness: readiness.clone(), settings: relay });

    // HTTP first: /healthz and /readyz answer while the database is still coming up.
    let http_task = tokio::spawn(http::serve(listener, server));
    tracing::info!("listening on {local}");

    // Then the database side: schema, LISTEN, claims, poll, retention.
    let relay_task = tokio::spawn({
        let (relay, shutdown) = (relay.clone(), shutdown.clone());
        async move {
            if !relay::prepare_schema(&database, migrate, &relay.readiness, shutdown.clone()).await {
                return;
            }
            tokio::spawn(db::listen::run(database, relay.wakeups.clone(), relay.readiness.clone(), shutdown.clone()));
            tokio::spawn({
                let (relay, shutdown) = (relay.clone(), shutdown.clone());
                async move { relay.run_poll(shutdown).await }
            });
            tokio::spawn({
                let (relay, shutdown) = (relay.clone(), shutdown.clone());
                async move { relay.run_retention(shutdown).await }
            });
            relay.run_claims(shutdown).await;
        }
    });

    shutdown::os_signal().await;
    tracing::info!("shutting down: closing connections, finishing the claim pass in progress");
    trigger.trigger();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = http_task.await;
        // Every connection holds a slot until its task ends: all slots back means all connections closed.
        let _ = slots.acquire_many(max_connections as u32).await;
        let _ = relay_task.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period over; exiting with work still in progress");
    }
    tracing::info!("stopped");
    Ok(())
}
