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
use crate::relay::Relay;
use crate::replay::Replays;
use crate::shutdown::{self, Shutdown};
use crate::supervisor::supervise;
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
        metrics_listen,
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
    // Every session this node opens (pool, LISTEN, wake gate, migrations) carries the keepalive and TCP user
    // timeout options; `nudge demo` builds its own configuration, so they are applied here too.
    let (mut database, mut listen_database) = (database, listen_database);
    db::apply_timeouts(&mut database, &timeouts);
    db::apply_timeouts(&mut listen_database, &timeouts);
    let pool = db::pool(&database, pool_size)?;
    // Replays and catch-ups on a pool of their own: however many clients resume at once, claims and live
    // delivery never wait behind them (they wait for each other, up to the pool's wait timeout).
    let mut replay_database = database.clone();
    if replay_database.get_application_name().is_none() {
        replay_database.application_name("nudge-replay");
    }
    let replay_pool = db::pool(&replay_database, replay_pool_size)?;
    let replay_pool_handle = replay_pool.clone();
    let listener = bind(listen).map_err(|source| StartError::Listen { addr: listen, source })?;
    let local = listener.local_addr().map_err(|source| StartError::Listen { addr: listen, source })?;
    let metrics_listener = match metrics_listen {
        Some(addr) => {
            let listener = bind(addr).map_err(|source| StartError::Listen { addr, source })?;
            let local = listener.local_addr().map_err(|source| StartError::Listen { addr, source })?;
            Some((listener, local))
        }
        None => None,
    };

    let (trigger, shutdown) = shutdown::channel();
    let hub = Arc::new(Hub::new());
    let claims = Arc::new(Wakeups::default());
    let deliveries = Arc::new(DeliveryWakeups::default());
    let metrics = Arc::new(Metrics::default());
    let readiness = Arc::new(Readiness::default());
    // The issuer's keys, when tokens are verified with a JWKS: the first fetch starts now, before HTTP answers;
    // `/readyz` says 503 until it succeeds.
    if let Some(jwks) = authenticator.jwks().cloned() {
        jwks.tell(&readiness);
        let (readiness, observer) = (readiness.clone(), shutdown.clone());
        tokio::spawn(supervise("JWKS", readiness.clone(), metrics.clone(), shutdown.clone(), move || {
            jwks.clone().run(readiness.clone(), observer.clone())
        }));
    }
    let shared = Arc::new(Shared {
        hub: hub.clone(),
        wakeups: claims.clone(),
        authenticator: Arc::new(authenticator),
        metrics: metrics.clone(),
        limits,
        replays: Replays::new(replay_pool, timeouts.statement),
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
        routing: Default::default(),
        metrics,
        readiness,
        settings: relay,
        statement_timeout: timeouts.statement,
        node_id: node_id.clone(),
    });

    let scheme = if tls.is_some() { "https/wss" } else { "http/ws" };
    let (metrics_listener, metrics_local) = metrics_listener.unzip();
    let http_task = tokio::spawn(http::serve(listener, server, tls, extra_routes, metrics_listener));
    tracing::info!("listening on {local} ({scheme})");
    if let Some(metrics) = metrics_local {
        tracing::info!("serving /metrics on {metrics} (http), not on {local}");
    }
    on_listening(local);

    let node = NodeIdentity { id: node_id, address: local.to_string() };
    tracing::info!(node = %node.id, "node started");
    // When LISTEN is lost, sessions of both pools opened before are distrusted (db::distrust_sessions).
    let pools = vec![relay.pool.clone(), replay_pool_handle];
    let relay_task = tokio::spawn(run_database_side(relay, listen_database, migrate, node, pools, shutdown.clone()));

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
/// and the two relay loops, each supervised (restarted if it ends or panics). `session_db` is the direct
/// connection (LISTEN and migrations need a session).
async fn run_database_side(
    relay: Arc<Relay>,
    session_db: db::Database,
    migrate: bool,
    node: NodeIdentity,
    pools: Vec<deadpool_postgres::Pool>,
    shutdown: Shutdown,
) {
    if !db::migrate::prepare_schema(&session_db, migrate, &relay.readiness, shutdown.clone()).await {
        return;
    }
    let node = Arc::new(node);
    // Heartbeats first: the first one announces this node, so nodes that thought they were alone start sending
    // NOTIFY nudge_claimed before we take our cursor.
    let heartbeat = supervised(&relay, &shutdown, "heartbeat", move |r, s| {
        let node = node.clone();
        async move { r.run_heartbeat(&node.id, &node.address, s).await }
    });
    if !relay.start_cursor(shutdown.clone()).await {
        return;
    }
    let listen = {
        let readiness = relay.readiness.clone();
        supervised(&relay, &shutdown, "LISTEN", move |r, s| {
            let listeners = Listeners {
                claims: r.claims.clone(),
                deliveries: r.deliveries.clone(),
                peers: r.peers.clone(),
                node_id: r.node_id.clone(),
                pools: pools.clone(),
                hub: r.hub.clone(),
            };
            db::listen::run(session_db.clone(), listeners, readiness.clone(), s)
        })
    };
    let presence = supervised(&relay, &shutdown, "presence", |r, s| async move {
        let node_id = r.node_id.clone();
        r.run_presence(&node_id, s).await
    });
    let poll = supervised(&relay, &shutdown, "poll", |r, s| async move { r.run_poll(s).await });
    let retention = supervised(&relay, &shutdown, "retention", |r, s| async move { r.run_retention(s).await });
    let deliveries = supervised(&relay, &shutdown, "delivery", |r, s| async move { r.run_deliveries(s).await });
    let claims = supervised(&relay, &shutdown, "claim", |r, s| async move { r.run_claims(s).await });
    // Shutdown: wait for the pass in progress of each loop, and for the heartbeat to remove our row.
    let _ = tokio::join!(claims, poll, retention, deliveries, heartbeat, listen, presence);
}

/// Spawn `task` under `supervisor::supervise`, handing it the relay and a shutdown observer at every (re)start.
fn supervised<F, Fut>(
    relay: &Arc<Relay>,
    shutdown: &Shutdown,
    name: &'static str,
    task: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Arc<Relay>, Shutdown) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (readiness, metrics) = (relay.readiness.clone(), relay.metrics.clone());
    let (relay, observer) = (relay.clone(), shutdown.clone());
    tokio::spawn(supervise(name, readiness, metrics, shutdown.clone(), move || task(relay.clone(), observer.clone())))
}
