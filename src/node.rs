//! A nudge node: everything `nudge serve` (and `nudge demo`) runs, wired together, and its shutdown sequence.
//!
//! Start order: HTTP first (so `/healthz` and `/readyz` answer while the database comes up), then the schema,
//! then LISTEN, the claim loop, the fallback poll and the retention sweep. Stop order: stop accepting, close
//! every connection with 1001, let the claim pass in progress finish, bounded by `SHUTDOWN_GRACE`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::config::ServeConfig;
use crate::connection::Shared;
use crate::db;
use crate::db::listen::Listeners;
use crate::health::{Metrics, Readiness};
use crate::http::{self, ExtraRoutes};
use crate::hub::Hub;
use crate::relay::{self, Relay};
use crate::shutdown::{self, Shutdown};
use crate::wake::{DeliveryWakeups, Wakeups};

/// How long shutdown may take before nudge exits anyway (the contract says within 10 s).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(9);

/// A failure that stops the node at start: the listen address is taken, the pool cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot build the database pool: {0}")]
    Pool(#[from] deadpool_postgres::BuildError),
}

/// Run until SIGTERM/Ctrl-C (or until `stop` resolves, for embedders such as `nudge demo`).
/// `on_listening` is told the bound address once HTTP accepts connections.
pub async fn run(
    config: ServeConfig,
    extra_routes: Option<ExtraRoutes>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), StartError> {
    let ServeConfig {
        database,
        listen_database,
        node_id,
        listen,
        tls,
        authenticator,
        allowed_origins,
        max_connections,
        limits,
        relay,
        http: http_limits,
        pool_size,
        replay_pool_size,
        timeouts,
        migrate,
    } = config;
    // Wired in by the HTTP, replay and database-timeout work that follows.
    let _ = (replay_pool_size, &timeouts);
    let pool = db::pool(&database, pool_size)?;
    let listener = bind(listen).map_err(|source| StartError::Listen { addr: listen, source })?;
    let local = listener.local_addr().map_err(|source| StartError::Listen { addr: listen, source })?;

    let (trigger, shutdown) = shutdown::channel();
    let hub = Arc::new(Hub::new());
    let claims = Arc::new(Wakeups::default());
    let deliveries = Arc::new(DeliveryWakeups::default());
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    let shared = Arc::new(Shared {
        hub: hub.clone(),
        wakeups: claims.clone(),
        authenticator: Arc::new(authenticator),
        metrics: metrics.clone(),
        limits,
        pool: pool.clone(),
    });
    let slots = Arc::new(Semaphore::new(max_connections));
    let server = Arc::new(http::Server {
        shared,
        readiness: readiness.clone(),
        pool: pool.clone(),
        allowed_origins,
        slots: slots.clone(),
        max_connections,
        http_limits,
        shutdown: shutdown.clone(),
    });
    let relay = Arc::new(Relay {
        pool,
        hub,
        claims,
        deliveries,
        peers: Default::default(),
        gate_database: listen_database.clone(),
        fresh: Default::default(),
        metrics,
        readiness,
        settings: relay,
    });

    let scheme = if tls.is_some() { "https/wss" } else { "http/ws" };
    let http_task = tokio::spawn(http::serve(listener, server, tls, extra_routes));
    tracing::info!("listening on {local} ({scheme})");
    on_listening(local);

    let node = NodeIdentity { id: node_id, address: local.to_string() };
    tracing::info!(node = %node.id, "node started");
    let relay_task = tokio::spawn(run_database_side(relay, listen_database, migrate, node, shutdown.clone()));

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

/// Pending connections the kernel queues before `accept`. The default of 128 overflowed when thousands of
/// clients reconnected at once: each overflow is a dropped SYN, retried by the client after a full second.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    // As std's bind does: a restarted nudge can listen again while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How this node appears in `nudge.nodes`.
struct NodeIdentity {
    id: String,
    address: String,
}

/// Schema first (retrying while the database is away), then the cursor, then LISTEN, poll, retention, heartbeat
/// and the two relay loops. `session_db` is the direct connection (LISTEN and migrations need a session).
async fn run_database_side(
    relay: Arc<Relay>,
    session_db: tokio_postgres::Config,
    migrate: bool,
    node: NodeIdentity,
    shutdown: Shutdown,
) {
    if !relay::prepare_schema(&session_db, migrate, &relay.readiness, shutdown.clone()).await {
        return;
    }
    let node_id = node.id.clone();
    // Heartbeats first: the first one announces this node, so nodes that thought they were alone start sending
    // NOTIFY nudge_claimed before we take our cursor.
    let heartbeat =
        spawn_relay(&relay, &shutdown, |r, s| async move { r.run_heartbeat(&node.id, &node.address, s).await });
    if !relay.start_cursor(shutdown.clone()).await {
        return;
    }
    let listeners = Listeners {
        claims: relay.claims.clone(),
        deliveries: relay.deliveries.clone(),
        peers: relay.peers.clone(),
        node_id,
    };
    tokio::spawn(db::listen::run(session_db, listeners, relay.readiness.clone(), shutdown.clone()));
    let poll = spawn_relay(&relay, &shutdown, |r, s| async move { r.run_poll(s).await });
    let retention = spawn_relay(&relay, &shutdown, |r, s| async move { r.run_retention(s).await });
    let deliveries = spawn_relay(&relay, &shutdown, |r, s| async move { r.run_deliveries(s).await });
    relay.run_claims(shutdown).await;
    // Shutdown: wait for the pass in progress of each loop, and for the heartbeat to remove our row.
    let _ = tokio::join!(poll, retention, deliveries, heartbeat);
}

fn spawn_relay<F, Fut>(relay: &Arc<Relay>, shutdown: &Shutdown, task: F) -> tokio::task::JoinHandle<()>
where
    F: FnOnce(Arc<Relay>, Shutdown) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(task(relay.clone(), shutdown.clone()))
}
