//! Test harness: a throwaway PostgreSQL cluster per test binary, one database per test, real `nudge`
//! processes, real WebSocket clients, JWT helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "nudge-test-secret-0123456789abcdef";

/// Generous deadline for things that should happen "soon".
pub const SOON: Duration = Duration::from_secs(15);
/// The only fixed wait we allow: asserting that nothing arrives.
pub const SILENCE: Duration = Duration::from_millis(300);

/// Wait for a condition (the expression may `.await`) with a deadline; never sleep-and-hope.
#[macro_export]
macro_rules! eventually {
    ($timeout:expr, $what:expr, $cond:expr) => {{
        let timeout: std::time::Duration = $timeout;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() > deadline {
                panic!("timed out after {:?} waiting for {}", timeout, $what);
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn unique() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{}-{}-{}", std::process::id(), nanos, N.fetch_add(1, Ordering::SeqCst))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL cluster
// ---------------------------------------------------------------------------------------------

/// A throwaway cluster as the tests want it: fast and disposable (no durability), room for many sessions.
pub fn throwaway() -> nudge::throwaway::Builder {
    nudge::throwaway::Builder::new()
        .setting("fsync", "off")
        .setting("synchronous_commit", "off")
        .setting("full_page_writes", "off")
        .setting("max_connections", "300")
}

/// The cluster every test of this binary shares (one database each, `TestDb`). Never dropped: the test binary's
/// exit closes its guard's pipe, which stops and deletes it.
pub async fn cluster() -> &'static nudge::throwaway::Cluster {
    static CLUSTER: tokio::sync::OnceCell<nudge::throwaway::Cluster> = tokio::sync::OnceCell::const_new();
    CLUSTER
        .get_or_init(|| async { throwaway().start().await.unwrap_or_else(|e| panic!("throwaway PostgreSQL: {e}")) })
        .await
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A test's database. `url` connects as the cluster's superuser (the test's view of everything). Each database
/// has three roles of its own, as sql/roles.sql describes: `<name>_owner` (migrates, owns schema nudge),
/// `<name>_runtime` (what `Nudge::start` runs nudge as) and `<name>_producer` (INSERT and `nudge.publish`).
pub struct TestDb {
    pub name: String,
    pub url: String,
}

/// The roles sql/roles.sql sets up, each a login role of its own per test database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Owner,
    Runtime,
    Producer,
}

impl Role {
    fn suffix(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Runtime => "runtime",
            Role::Producer => "producer",
        }
    }
}

/// Databases `TestDb::create` made, by superuser URL: whether their schema has been migrated as the owner and
/// roles.sql applied. One lock per database: nodes started at once prepare it once.
fn managed() -> &'static Mutex<std::collections::HashMap<String, Arc<Mutex<bool>>>> {
    static MANAGED: OnceLock<Mutex<std::collections::HashMap<String, Arc<Mutex<bool>>>>> = OnceLock::new();
    MANAGED.get_or_init(Default::default)
}

/// `url` with another user name (URLs of the shared cluster: `postgres://USER@127.0.0.1:PORT/DB`).
fn url_as(url: &str, user: &str) -> String {
    let rest = url.strip_prefix("postgres://postgres@").expect("a superuser URL of the test cluster");
    format!("postgres://{user}@{rest}")
}

/// psql from the cluster's binaries (sql/roles.sql uses psql's variables and `\if`).
pub fn psql() -> PathBuf {
    match nudge::throwaway::server_binaries().map(|bin| bin.join("psql")) {
        Some(psql) if psql.exists() => psql,
        _ => PathBuf::from("psql"),
    }
}

/// Apply sql/roles.sql as `owner_url`'s role with these role names; (success, psql's stderr).
pub fn apply_roles_sql(owner_url: &str, runtime: &str, producer: &str) -> (bool, String) {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/sql/roles.sql");
    let out = Command::new(psql())
        .args(["-X", "-q", "-d", owner_url, "-v", &format!("runtime={runtime}"), "-v"])
        .arg(format!("producer={producer}"))
        .args(["-f", file])
        .stdin(Stdio::null())
        .output()
        .expect("run psql");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

impl TestDb {
    /// A fresh, empty database of its own for one test.
    pub async fn new() -> TestDb {
        let db = TestDb::unborn().await;
        db.create().await;
        db
    }

    /// A name and URL for a database that does not exist yet (`create()` makes it).
    pub async fn unborn() -> TestDb {
        static N: AtomicU64 = AtomicU64::new(0);
        let name = format!("test_{}", N.fetch_add(1, Ordering::SeqCst));
        let url = cluster().await.database_url(&name);
        TestDb { name, url }
    }

    pub async fn create(&self) {
        let admin = pg_connect(&cluster().await.url()).await;
        let name = &self.name;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name}_owner LOGIN; CREATE ROLE {name}_runtime LOGIN; CREATE ROLE {name}_producer LOGIN; \
                 GRANT CREATE ON DATABASE {name} TO {name}_owner;"
            ))
            .await
            .unwrap();
        managed().lock().unwrap().insert(self.url.clone(), Arc::default());
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        pg_connect(&self.url).await
    }

    pub fn role_name(&self, role: Role) -> String {
        format!("{}_{}", self.name, role.suffix())
    }

    /// The URL of this database as one of its roles.
    pub fn role_url(&self, role: Role) -> String {
        url_as(&self.url, &self.role_name(role))
    }

    pub async fn client_as(&self, role: Role) -> tokio_postgres::Client {
        pg_connect(&self.role_url(role)).await
    }

    /// Apply the schema as a deployment does: `nudge migrate` as the owner role, then sql/roles.sql (as the owner).
    /// Once per database; what `Nudge::start` does before it starts nudge as the runtime role.
    pub fn migrate(&self) {
        prepare_as_owner(&self.url);
    }
}

/// Migrate as the owner and apply sql/roles.sql, once per database `TestDb::create` made. False for any other
/// URL (a database the harness does not manage: a proxy's, PgBouncer's, one not created yet).
fn prepare_as_owner(url: &str) -> bool {
    let Some(done) = managed().lock().unwrap().get(url).cloned() else {
        return false;
    };
    let mut done = done.lock().unwrap();
    if !*done {
        let name = url.rsplit('/').next().unwrap();
        let owner = url_as(url, &format!("{name}_owner"));
        let out = nudge_command(&[("NUDGE_DATABASE_URL", &owner)]).arg("migrate").output().unwrap();
        assert!(out.status.success(), "nudge migrate as the owner failed: {}", String::from_utf8_lossy(&out.stderr));
        let (ok, err) = apply_roles_sql(&owner, &format!("{name}_runtime"), &format!("{name}_producer"));
        assert!(ok, "sql/roles.sql failed: {err}");
        *done = true;
    }
    true
}

/// Insert one event and return its id.
pub async fn insert_event(db: &tokio_postgres::Client, topic: &str, kind: &str, data: &str) -> i64 {
    db.query_one(
        "INSERT INTO nudge.events (topic, kind, data) VALUES ($1, $2, $3::text::jsonb) RETURNING id",
        &[&topic, &kind, &data],
    )
    .await
    .unwrap()
    .get(0)
}

pub async fn insert_personal(db: &tokio_postgres::Client, topic: &str, kind: &str, recipients: &[&str]) -> i64 {
    let r: Vec<String> = recipients.iter().map(|s| s.to_string()).collect();
    db.query_one(
        "INSERT INTO nudge.events (topic, kind, recipients) VALUES ($1, $2, $3) RETURNING id",
        &[&topic, &kind, &r],
    )
    .await
    .unwrap()
    .get(0)
}

/// Insert `n` events on `topic` in one statement; returns their ids in order.
pub async fn insert_many(db: &tokio_postgres::Client, topic: &str, n: i64) -> Vec<i64> {
    db.query(
        "INSERT INTO nudge.events (topic, kind, data) \
         SELECT $1, 'k', jsonb_build_object('i', i) FROM generate_series(1, $2::bigint) i RETURNING id",
        &[&topic, &n],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get::<_, i64>(0))
    .collect::<std::collections::BTreeSet<i64>>()
    .into_iter()
    .collect()
}

// ---------------------------------------------------------------------------------------------
// nudge processes
// ---------------------------------------------------------------------------------------------

/// Send a signal (`STOP`, `CONT`, `KILL`, …) to a process.
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status().unwrap();
    assert!(st.success(), "kill -{sig} {pid} failed");
}

pub fn nudge_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nudge")
}

/// A `nudge` command with a clean environment (no inherited NUDGE_* or RUST_LOG) plus `env`.
pub fn nudge_command(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(nudge_bin());
    c.env_clear();
    if let Some(p) = std::env::var_os("PATH") {
        c.env("PATH", p);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdin(Stdio::null());
    c
}

/// Output of a command that must exit by itself within `timeout`.
pub fn run_with_deadline(mut cmd: Command, timeout: Duration) -> (ExitStatus, String, String) {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn nudge");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let e = t_err.join().unwrap();
            panic!("process did not exit within {timeout:?}; stderr:\n{e}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, t_out.join().unwrap(), t_err.join().unwrap())
}

pub struct Nudge {
    child: Child,
    log: Arc<Mutex<String>>,
    pub port: u16,
}

impl Nudge {
    /// Start `nudge serve` on a free port with test defaults (`extra_env` overrides them) and wait until
    /// /readyz says 200: schema migrated, LISTEN connection up.
    pub async fn start(db_url: &str, extra_env: &[(&str, &str)]) -> Nudge {
        let nudge = Self::start_args(db_url, extra_env, &[]).await;
        nudge.wait_ready().await;
        nudge
    }

    /// Like `start`, but only waits for the listening socket.
    pub async fn start_unready(db_url: &str, extra_env: &[(&str, &str)]) -> Nudge {
        Self::start_args(db_url, extra_env, &[]).await
    }

    /// Start `nudge serve` with test defaults. On a database `TestDb` manages, nudge runs as it should in
    /// production: the schema is migrated as the owner role (sql/roles.sql applied) and nudge runs
    /// `--no-migrate` as the runtime role, with only the rights it needs (unless `extra_env` sets
    /// `NUDGE_NO_MIGRATE` itself). Any other URL is used as it is.
    pub async fn start_args(db_url: &str, extra_env: &[(&str, &str)], args: &[&str]) -> Nudge {
        let sets_migrate = extra_env.iter().any(|(k, _)| *k == "NUDGE_NO_MIGRATE");
        let url = db_url.to_owned();
        let runtime = !sets_migrate && tokio::task::spawn_blocking(move || prepare_as_owner(&url)).await.unwrap();
        if !runtime {
            return Self::start_migrating(db_url, extra_env, args).await;
        }
        let name = db_url.rsplit('/').next().unwrap();
        let runtime_url = url_as(db_url, &format!("{name}_runtime"));
        let mut env: Vec<(&str, &str)> = vec![("NUDGE_NO_MIGRATE", "true")];
        for (k, v) in extra_env {
            // A direct URL to the same database (LISTEN, the wake gate) is the runtime role's too.
            env.push((k, if *k == "NUDGE_LISTEN_DATABASE_URL" && *v == db_url { runtime_url.as_str() } else { v }));
        }
        Self::start_migrating(&runtime_url, &env, args).await
    }

    /// Start `nudge serve` with test defaults on `db_url` as it is: as the URL's role, migrating at start unless
    /// `extra_env` says `NUDGE_NO_MIGRATE`.
    pub async fn start_migrating(db_url: &str, extra_env: &[(&str, &str)], args: &[&str]) -> Nudge {
        let mut env: Vec<(&str, &str)> = vec![
            ("NUDGE_DATABASE_URL", db_url),
            ("NUDGE_LISTEN", "127.0.0.1:0"),
            ("NUDGE_JWT_SECRET", SECRET),
            ("NUDGE_POLL_INTERVAL", "1h"),
            ("RUST_LOG", "info,nudge=debug"),
        ];
        env.retain(|(k, _)| !extra_env.iter().any(|(k2, _)| k2 == k));
        env.extend_from_slice(extra_env);
        // An empty value removes a default.
        env.retain(|(_, v)| !v.is_empty());
        let mut cmd = nudge_command(&env);
        cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
        Self::spawn(cmd).await
    }

    pub async fn spawn(mut cmd: Command) -> Nudge {
        let mut child = cmd.spawn().expect("spawn nudge");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                log2.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Some(p) = parse_listen_port(&log.lock().unwrap()) {
                break p;
            }
            if let Some(st) = child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("nudge exited ({st}) before listening; log:\n{}", log.lock().unwrap());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("nudge did not log 'listening on' within 30s; log:\n{}", log.lock().unwrap());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Nudge { child, log, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }

    pub fn sigterm(&self) {
        let st = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(st.success());
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                panic!("nudge did not exit within {timeout:?}; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get_trimmed(self.port, path).await
    }

    /// Sum of the values of every sample of metric `name` (any labels); 0 if absent.
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.get("/metrics").await;
        assert_eq!(status, 200, "/metrics: {body}");
        parse_metric(&body, name).unwrap_or(0.0)
    }

    /// Wait until no claim pass is running or about to run: the passes a start triggers (LISTEN connect, the
    /// poll's first tick) have finished and no new one started for 100 ms. Claim statements are counted when
    /// they return, passes when they start, so "count >= passes" means none is in flight.
    pub async fn wait_idle(&self) {
        let deadline = Instant::now() + SOON;
        loop {
            assert!(Instant::now() < deadline, "nudge never went idle:\n{}", self.log());
            let passes = self.metric("nudge_claim_passes_total").await;
            let done = self.metric("nudge_claim_duration_seconds_count").await;
            if passes >= 1.0 && done >= passes {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if self.metric("nudge_claim_passes_total").await == passes {
                    return;
                }
            } else {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return;
            }
            if Instant::now() > deadline {
                panic!("/readyz still {status} {body:?} after 30s; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nudge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn parse_listen_port(log: &str) -> Option<u16> {
    let i = log.find("listening on 127.0.0.1:")?;
    let rest = &log[i + "listening on 127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

pub fn parse_metric(body: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if rest.starts_with('{') {
            rest.rsplit_once('}').map(|(_, v)| v)
        } else if rest.starts_with(' ') {
            Some(rest)
        } else {
            None
        };
        if let Some(v) = value.and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<f64>().ok()) {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect for HTTP GET");
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut buf)).await.expect("HTTP response in time").unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_string() };
    (status, body)
}

/// Status and trimmed body (a trailing newline is not part of `ok` / `ready`).
pub async fn http_get_trimmed(port: u16, path: &str) -> (u16, String) {
    let (status, body) = http_get(port, path).await;
    (status, body.trim().to_string())
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ---------------------------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------------------------

pub type WsError = tokio_tungstenite::tungstenite::Error;

pub struct Ws {
    pub inner: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
}

#[derive(Debug)]
pub enum Incoming {
    Json(Value),
    Close(u16, String),
    /// The connection ended without a close frame (or with a transport error).
    Gone(String),
}

impl Ws {
    pub async fn connect(url: &str) -> Result<Ws, WsError> {
        Self::connect_with_headers(url, &[]).await
    }

    pub async fn connect_with_headers(url: &str, headers: &[(&'static str, &str)]) -> Result<Ws, WsError> {
        let mut req = url.into_client_request()?;
        for (k, v) in headers {
            req.headers_mut().insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let (inner, _resp) = tokio::time::timeout(SOON, tokio_tungstenite::connect_async(req))
            .await
            .expect("WebSocket handshake timed out")?;
        Ok(Ws { inner })
    }

    /// HTTP status of a refused upgrade (panics if the upgrade succeeded).
    pub async fn refused_status(url: &str, headers: &[(&'static str, &str)]) -> u16 {
        match Self::connect_with_headers(url, headers).await {
            Ok(_) => panic!("upgrade to {url} succeeded, expected an HTTP refusal"),
            Err(WsError::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("upgrade to {url} failed with {e}, expected an HTTP refusal"),
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.inner.send(Message::text(v.to_string())).await.expect("send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.inner.send(Message::text(s.to_string())).await.expect("send");
    }

    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.inner.send(Message::binary(b)).await.expect("send");
    }

    /// Next data frame, close, or end; `None` on timeout. Ping/pong frames are skipped.
    pub async fn next(&mut self, timeout: Duration) -> Option<Incoming> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = match tokio::time::timeout_at(deadline, self.inner.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(Incoming::Gone("stream ended".into())),
                Ok(Some(Err(e))) => return Some(Incoming::Gone(e.to_string())),
                Ok(Some(Ok(m))) => m,
            };
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t)
                        .unwrap_or_else(|e| panic!("server sent non-JSON text frame {t:?}: {e}"));
                    return Some(Incoming::Json(v));
                }
                Message::Binary(b) => panic!("server sent a binary frame ({} bytes)", b.len()),
                Message::Close(Some(f)) => return Some(Incoming::Close(f.code.into(), f.reason.to_string())),
                Message::Close(None) => return Some(Incoming::Close(1005, String::new())),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            }
        }
    }

    pub async fn recv_json(&mut self, timeout: Duration) -> Value {
        match self.next(timeout).await {
            Some(Incoming::Json(v)) => v,
            None => panic!("no message within {timeout:?}"),
            Some(other) => panic!("expected a JSON message, got {other:?}"),
        }
    }

    /// Next message, asserting its `type`.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let v = self.recv_json(SOON).await;
        assert_eq!(v["type"], ty, "expected a {ty:?} message, got {v}");
        v
    }

    /// Next message must be an error with this code.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.recv_json(SOON).await;
        assert_eq!(v["type"], "error", "expected error {code:?}, got {v}");
        assert_eq!(v["code"], code, "expected error {code:?}, got {v}");
        assert!(v["message"].is_string(), "error without a message string: {v}");
        v
    }

    /// The next frame must be a close frame; returns (code, reason).
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        match self.next(timeout).await {
            Some(Incoming::Close(c, r)) => (c, r),
            None => panic!("connection not closed within {timeout:?}"),
            Some(other) => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// Skip data frames until a close frame; returns (code, reason, data frames skipped).
    pub async fn drain_until_close(&mut self, timeout: Duration) -> (u16, String, usize) {
        let deadline = Instant::now() + timeout;
        let mut n = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Incoming::Json(_)) => n += 1,
                Some(Incoming::Close(c, r)) => return (c, r, n),
                Some(Incoming::Gone(e)) => {
                    panic!("connection ended without a close frame after {n} messages: {e}")
                }
                None => panic!("connection not closed within {timeout:?} ({n} messages read)"),
            }
        }
    }

    /// Assert that no data or close frame arrives for `dur` (the only acceptable fixed wait).
    pub async fn expect_silence(&mut self, dur: Duration) {
        if let Some(m) = self.next(dur).await {
            panic!("expected silence, got {m:?}");
        }
    }

    pub async fn ping(&mut self) {
        self.send_json(json!({"type": "ping"})).await;
        self.recv_type("pong").await;
    }

    pub async fn subscribe(&mut self, topic: &str) {
        self.send_json(json!({"type": "subscribe", "topic": topic})).await;
        let v = self.recv_json(SOON).await;
        assert_eq!(v, json!({"type": "subscribed", "topic": topic}), "subscribe {topic}");
    }

    pub async fn auth(&mut self, token: &str) -> Value {
        self.send_json(json!({"type": "auth", "token": token})).await;
        self.recv_json(SOON).await
    }

    /// Next `n` events; returns their ids, asserting they are events.
    pub async fn recv_event_ids(&mut self, n: usize, timeout: Duration) -> Vec<i64> {
        let deadline = Instant::now() + timeout;
        let mut ids = Vec::with_capacity(n);
        while ids.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Incoming::Json(v)) => {
                    assert_eq!(v["type"], "event", "expected an event, got {v}");
                    ids.push(v["id"].as_i64().expect("event id"));
                }
                None => panic!("only {} of {n} events within {timeout:?}", ids.len()),
                Some(other) => panic!("after {} of {n} events: {other:?}", ids.len()),
            }
        }
        ids
    }
}

/// Connect, authenticate with the first message, wait for `ready`.
pub async fn authed(nudge: &Nudge, sub: &str, topics: &[&str]) -> Ws {
    authed_with(nudge, &Claims::new(sub).topics(topics).hs256()).await
}

pub async fn authed_with(nudge: &Nudge, token: &str) -> Ws {
    let mut ws = Ws::connect(&nudge.ws_url()).await.expect("connect");
    let ready = ws.auth(token).await;
    assert_eq!(ready["type"], "ready", "auth reply: {ready}");
    ws
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Claims(pub serde_json::Map<String, Value>);

impl Claims {
    /// `sub` plus `exp` one hour from now.
    pub fn new(sub: &str) -> Claims {
        let mut m = serde_json::Map::new();
        m.insert("sub".into(), json!(sub));
        m.insert("exp".into(), json!(now_secs() + 3600));
        Claims(m)
    }
    pub fn set(mut self, k: &str, v: Value) -> Claims {
        self.0.insert(k.into(), v);
        self
    }
    pub fn without(mut self, k: &str) -> Claims {
        self.0.remove(k);
        self
    }
    pub fn exp_in(self, secs: i64) -> Claims {
        self.set("exp", json!(now_secs() + secs))
    }
    pub fn topics(self, topics: &[&str]) -> Claims {
        self.set("topics", json!(topics))
    }
    pub fn exp(&self) -> i64 {
        self.0["exp"].as_i64().unwrap()
    }
    pub fn hs256(&self) -> String {
        self.sign_secret(jsonwebtoken::Algorithm::HS256, SECRET)
    }
    pub fn sign_secret(&self, alg: jsonwebtoken::Algorithm, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &self.0,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }
    pub fn sign(&self, key: &KeyPair) -> String {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(key.alg), &self.0, &key.encoding_key()).unwrap()
    }
    /// `alg: none`, empty signature.
    pub fn unsigned(&self) -> String {
        format!(
            "{}.{}.",
            b64url(br#"{"alg":"none","typ":"JWT"}"#),
            b64url(Value::Object(self.0.clone()).to_string().as_bytes())
        )
    }
}

pub fn b64url(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A key pair generated with the openssl CLI for one test.
pub struct KeyPair {
    pub alg: jsonwebtoken::Algorithm,
    pub private_pem: Vec<u8>,
    pub public_path: PathBuf,
    dir: PathBuf,
}

impl Drop for KeyPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(args: &[&str], cwd: &Path) {
    let out = Command::new("openssl").args(args).current_dir(cwd).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl KeyPair {
    pub fn generate(alg: jsonwebtoken::Algorithm) -> KeyPair {
        use jsonwebtoken::Algorithm::*;
        let dir = PathBuf::from(format!("/tmp/nudge-test-keys-{}", unique()));
        std::fs::create_dir_all(&dir).unwrap();
        match alg {
            EdDSA => openssl(&["genpkey", "-algorithm", "ed25519", "-out", "private.pem"], &dir),
            ES256 => {
                openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ec.pem"], &dir);
                openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", "ec.pem", "-out", "private.pem"], &dir);
            }
            RS256 => openssl(
                &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "private.pem"],
                &dir,
            ),
            other => panic!("no key generation for {other:?}"),
        }
        openssl(&["pkey", "-in", "private.pem", "-pubout", "-out", "public.pem"], &dir);
        let private_pem = std::fs::read(dir.join("private.pem")).unwrap();
        KeyPair { alg, private_pem, public_path: dir.join("public.pem"), dir }
    }

    pub fn encoding_key(&self) -> jsonwebtoken::EncodingKey {
        use jsonwebtoken::Algorithm::*;
        match self.alg {
            EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(&self.private_pem).unwrap(),
            ES256 => jsonwebtoken::EncodingKey::from_ec_pem(&self.private_pem).unwrap(),
            RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&self.private_pem).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    pub fn public_path_str(&self) -> &str {
        self.public_path.to_str().unwrap()
    }
}

/// Configuration name of an algorithm as nudge expects it.
pub fn alg_name(alg: jsonwebtoken::Algorithm) -> &'static str {
    match alg {
        jsonwebtoken::Algorithm::EdDSA => "EdDSA",
        jsonwebtoken::Algorithm::ES256 => "ES256",
        jsonwebtoken::Algorithm::RS256 => "RS256",
        jsonwebtoken::Algorithm::HS256 => "HS256",
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// LISTEN on our own connection
// ---------------------------------------------------------------------------------------------

/// A connection LISTENing on `channel`; notifications arrive on the returned receiver.
pub async fn listen(
    url: &str,
    channel: &str,
) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, rx) = connect_watching(url, |message| match message {
        tokio_postgres::AsyncMessage::Notification(n) => Some(n.channel().to_string()),
        _ => None,
    })
    .await;
    client.batch_execute(&format!("LISTEN {channel}")).await.unwrap();
    (client, rx)
}

/// A connection driven with `poll_message`: what `keep` makes of its asynchronous messages (notifications,
/// notices) arrives on the returned receiver, each before the reply of the statement that caused it.
pub async fn connect_watching(
    url: &str,
    keep: impl Fn(tokio_postgres::AsyncMessage) -> Option<String> + Send + 'static,
) -> (tokio_postgres::Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (client, mut conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(Ok(message)) = stream.next().await {
            if let Some(kept) = keep(message) {
                let _ = tx.send(kept);
            }
        }
    });
    (client, rx)
}

// ---------------------------------------------------------------------------------------------
// A TCP proxy in front of PostgreSQL, to inject network faults
// ---------------------------------------------------------------------------------------------

/// What becomes of one proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Forward,
    /// Forward nothing, in either direction, and keep both sockets open: no FIN, no RST. (The proxy's kernel
    /// still acknowledges what arrives, keepalive probes included: only a round trip through the server tells.)
    Silent,
    /// Close both sockets with RST (SO_LINGER 0).
    Reset,
}

/// What the proxy does with connections it accepts from now on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Admit {
    Forward,
    /// Accept and hold silently: a network path that drops every packet after the TCP handshake.
    Silent,
    /// Accept and reset at once: nothing listening behind it.
    Refuse,
}

struct ProxyState {
    upstream: u16,
    admit: Mutex<Admit>,
    /// One per connection not yet reset; a dropped receiver means the connection ended.
    connections: Mutex<Vec<tokio::sync::watch::Sender<Fate>>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// A TCP proxy on 127.0.0.1 in front of a PostgreSQL port, with faults on command: `go_silent`, `reset`,
/// `blackhole`, `refuse`, `restore`. Pure tokio; runs on the test's runtime. Dropping it closes everything.
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(ProxyState {
            upstream,
            admit: Mutex::new(Admit::Forward),
            connections: Mutex::new(Vec::new()),
            tasks: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(proxy_accept(listener, state.clone()));
        state.tasks.lock().unwrap().push(accept);
        Proxy { port, state }
    }

    /// The URL of database `name` through this proxy.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Every existing connection goes silent for good (no FIN, no RST); new connections work normally.
    /// Returns how many connections it silenced.
    pub fn go_silent(&self) -> usize {
        *self.state.admit.lock().unwrap() = Admit::Forward;
        self.fate_of_existing(Fate::Silent)
    }

    /// Every existing connection is closed with RST, both towards the client and towards PostgreSQL; new
    /// connections work normally. Returns how many connections it reset.
    pub fn reset(&self) -> usize {
        *self.state.admit.lock().unwrap() = Admit::Forward;
        self.fate_of_existing(Fate::Reset)
    }

    /// The network path is gone: existing connections go silent, new ones are accepted and then hear nothing.
    pub fn blackhole(&self) -> usize {
        *self.state.admit.lock().unwrap() = Admit::Silent;
        self.fate_of_existing(Fate::Silent)
    }

    /// Nothing listens: existing connections are reset, new ones are reset as soon as they are accepted.
    pub fn refuse(&self) -> usize {
        *self.state.admit.lock().unwrap() = Admit::Refuse;
        self.fate_of_existing(Fate::Reset)
    }

    /// New connections are forwarded again. Connections silenced before stay silent (they belong to the path that
    /// failed); `reset` ends them.
    pub fn restore(&self) {
        *self.state.admit.lock().unwrap() = Admit::Forward;
    }

    /// Connections being forwarded now.
    pub fn forwarding(&self) -> usize {
        let mut connections = self.state.connections.lock().unwrap();
        connections.retain(|c| !c.is_closed());
        connections.iter().filter(|c| *c.borrow() == Fate::Forward).count()
    }

    fn fate_of_existing(&self, fate: Fate) -> usize {
        let mut connections = self.state.connections.lock().unwrap();
        connections.retain(|c| !c.is_closed());
        let mut changed = 0;
        for c in connections.iter() {
            if *c.borrow() != fate && c.send(fate).is_ok() {
                changed += 1;
            }
        }
        if fate == Fate::Reset {
            connections.clear();
        }
        changed
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in self.state.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

async fn proxy_accept(listener: tokio::net::TcpListener, state: Arc<ProxyState>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let admit = *state.admit.lock().unwrap();
        let fate = match admit {
            Admit::Refuse => {
                let _ = client.set_zero_linger();
                continue;
            }
            Admit::Silent => Fate::Silent,
            Admit::Forward => Fate::Forward,
        };
        let (tell, fate) = tokio::sync::watch::channel(fate);
        state.connections.lock().unwrap().push(tell);
        let task = tokio::spawn(proxy_connection(client, state.upstream, admit == Admit::Forward, fate));
        let mut tasks = state.tasks.lock().unwrap();
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

async fn proxy_connection(
    mut client: tokio::net::TcpStream,
    upstream_port: u16,
    connect: bool,
    mut fate: tokio::sync::watch::Receiver<Fate>,
) {
    let mut upstream = None;
    if connect {
        match tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await {
            Ok(stream) => upstream = Some(stream),
            Err(_) => {
                // PostgreSQL is down: the client sees what it would see without the proxy, a refusal.
                let _ = client.set_zero_linger();
                return;
            }
        }
    }
    loop {
        let now = *fate.borrow_and_update();
        match (now, upstream.as_mut()) {
            (Fate::Forward, Some(server)) => {
                tokio::select! {
                    // Either side closed (or failed): dropping both ends the other side too.
                    _ = tokio::io::copy_bidirectional(&mut client, server) => return,
                    changed = fate.changed() => if changed.is_err() {
                        return;
                    },
                }
            }
            (Fate::Reset, _) => {
                let _ = client.set_zero_linger();
                if let Some(server) = &upstream {
                    let _ = server.set_zero_linger();
                }
                return;
            }
            // Silent (or admitted silently): hold both sockets and read nothing until told otherwise.
            _ => {
                if fate.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A PostgreSQL cluster of one's own, to stop and start
// ---------------------------------------------------------------------------------------------

/// A PostgreSQL cluster for one test that restarts it, or configures it (the shared `cluster()` serves every test
/// of the binary). Stopped and removed when dropped, or when the test binary exits.
pub struct OwnCluster {
    pub port: u16,
    cluster: nudge::throwaway::Cluster,
}

impl OwnCluster {
    pub async fn start() -> OwnCluster {
        Self::start_with(|builder| builder).await
    }

    /// `start`, with `configure` adding to the harness's [`throwaway`] settings (postgresql.conf, pg_hba.conf,
    /// files in the data directory).
    pub async fn start_with(
        configure: impl FnOnce(nudge::throwaway::Builder) -> nudge::throwaway::Builder,
    ) -> OwnCluster {
        let cluster = configure(throwaway().setting("max_connections", "100"))
            .start()
            .await
            .unwrap_or_else(|e| panic!("throwaway PostgreSQL: {e}"));
        OwnCluster { port: cluster.port(), cluster }
    }

    /// Fast shutdown, as an operator's restart does: every session is ended by the server.
    pub async fn stop(&mut self) {
        self.cluster.stop_server().await.unwrap_or_else(|e| panic!("stopping PostgreSQL: {e}"));
    }

    /// Immediate shutdown: WAL still in the server's memory is lost, as in a crash (`Cluster::crash_server`).
    pub async fn crash(&mut self) {
        self.cluster.crash_server().await.unwrap_or_else(|e| panic!("crashing PostgreSQL: {e}"));
    }

    /// Start again on the same port, waiting until it accepts connections.
    pub async fn start_again(&mut self) {
        self.cluster.start_server().await.unwrap_or_else(|e| panic!("restarting PostgreSQL: {e}"));
    }

    pub fn url(&self, name: &str) -> String {
        self.cluster.database_url(name)
    }

    /// The cluster's data directory.
    pub fn data(&self) -> PathBuf {
        self.cluster.directory().join("data")
    }

    /// Database `name` as `postgres` over the cluster's Unix socket (key=value form): trusted by initdb's pg_hba.conf,
    /// never TLS.
    pub fn socket_url(&self, name: &str) -> String {
        format!("host={} port={} user=postgres dbname={name}", self.cluster.directory().display(), self.port)
    }

    pub async fn create_database(&self, name: &str) {
        let admin = pg_connect(&self.url("postgres")).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    }
}

/// TCP sockets from any process on this host to 127.0.0.1:`port` that are established, with their timer as
/// /proc/net/tcp shows it: (kind, seconds left); kind 0 none, 1 retransmit, 2 keepalive, 4 zero window probe.
pub fn established_to(port: u16) -> Vec<(u8, f64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(fields.get(2)?.rsplit(':').next()?, 16).ok()?;
            if remote_port != port || *fields.get(3)? != "01" {
                return None;
            }
            let (kind, when) = fields.get(5)?.split_once(':')?;
            let kind = u8::from_str_radix(kind, 16).ok()?;
            // In USER_HZ ticks, 100 a second.
            let when = u64::from_str_radix(when, 16).ok()? as f64 / 100.0;
            Some((kind, when))
        })
        .collect()
}
