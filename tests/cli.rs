//! The command line: options, configuration errors, exit codes, migrations, HTTP health endpoints.
mod common;

use std::time::Duration;

use common::*;

const OPTIONS: &[(&str, &str)] = &[
    ("--database-url", "NUDGE_DATABASE_URL"),
    ("--listen", "NUDGE_LISTEN"),
    ("--jwt-secret", "NUDGE_JWT_SECRET"),
    ("--jwt-public-key", "NUDGE_JWT_PUBLIC_KEY"),
    ("--jwt-algorithm", "NUDGE_JWT_ALGORITHM"),
    ("--jwt-audience", "NUDGE_JWT_AUDIENCE"),
    ("--jwt-issuer", "NUDGE_JWT_ISSUER"),
    ("--jwt-leeway", "NUDGE_JWT_LEEWAY"),
    ("--auth-timeout", "NUDGE_AUTH_TIMEOUT"),
    ("--allowed-origins", "NUDGE_ALLOWED_ORIGINS"),
    ("--poll-interval", "NUDGE_POLL_INTERVAL"),
    ("--claim-batch", "NUDGE_CLAIM_BATCH"),
    ("--awake-above", "NUDGE_AWAKE_ABOVE"),
    ("--retention", "NUDGE_RETENTION"),
    ("--max-age", "NUDGE_MAX_AGE"),
    ("--max-connections", "NUDGE_MAX_CONNECTIONS"),
    ("--max-message-size", "NUDGE_MAX_MESSAGE_SIZE"),
    ("--max-subscriptions", "NUDGE_MAX_SUBSCRIPTIONS"),
    ("--outbound-queue", "NUDGE_OUTBOUND_QUEUE"),
    ("--client-rate", "NUDGE_CLIENT_RATE"),
    ("--ping-interval", "NUDGE_PING_INTERVAL"),
    ("--pool-size", "NUDGE_POOL_SIZE"),
    ("--no-migrate", "NUDGE_NO_MIGRATE"),
    ("--database-url-file", "NUDGE_DATABASE_URL_FILE"),
    ("--listen-database-url-file", "NUDGE_LISTEN_DATABASE_URL_FILE"),
    ("--jwt-secret-file", "NUDGE_JWT_SECRET_FILE"),
    ("--metrics-listen", "NUDGE_METRICS_LISTEN"),
];

const WAIT: Duration = Duration::from_secs(30);

/// A configuration error: exit code 2 and exactly one non-empty line on stderr.
fn assert_config_error(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = nudge_command(env);
    cmd.args(args);
    let (status, _out, err) = run_with_deadline(cmd, WAIT);
    assert_eq!(status.code(), Some(2), "exit status for {env:?} {args:?}; stderr:\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "stderr must be one line, got:\n{err}");
    assert!(!lines[0].trim().is_empty());
    err
}

fn unreachable_url() -> String {
    format!("postgres://postgres@127.0.0.1:{}/nothing", free_port())
}

#[test]
fn help_lists_every_option_with_its_environment_variable() {
    let (status, out, err) = run_with_deadline(
        {
            let mut c = nudge_command(&[]);
            c.arg("--help");
            c
        },
        WAIT,
    );
    assert!(status.success(), "--help failed: {err}");
    for (flag, env) in OPTIONS {
        assert!(out.contains(flag), "--help does not mention {flag}:\n{out}");
        assert!(out.contains(env), "--help does not mention {env}:\n{out}");
    }
    assert!(out.contains("migrate"), "--help does not mention the migrate command:\n{out}");
    assert!(out.contains("serve"), "--help does not mention the serve command:\n{out}");
}

#[test]
fn missing_secret_is_a_configuration_error() {
    assert_config_error(&[("NUDGE_DATABASE_URL", &unreachable_url())], &[]);
}

#[test]
fn missing_database_url_is_a_configuration_error() {
    assert_config_error(&[("NUDGE_JWT_SECRET", SECRET)], &[]);
}

#[test]
fn missing_public_key_for_rs256_is_a_configuration_error() {
    assert_config_error(&[("NUDGE_DATABASE_URL", &unreachable_url()), ("NUDGE_JWT_ALGORITHM", "RS256")], &[]);
}

#[test]
fn unreadable_public_key_path_is_a_configuration_error() {
    assert_config_error(
        &[
            ("NUDGE_DATABASE_URL", &unreachable_url()),
            ("NUDGE_JWT_ALGORITHM", "EdDSA"),
            ("NUDGE_JWT_PUBLIC_KEY", "/nonexistent/nudge/key.pem"),
        ],
        &[],
    );
}

#[test]
fn public_key_that_is_not_pem_is_a_configuration_error() {
    let path = format!("/tmp/nudge-test-notpem-{}.pem", std::process::id());
    std::fs::write(&path, "this is not a key\n").unwrap();
    assert_config_error(
        &[
            ("NUDGE_DATABASE_URL", &unreachable_url()),
            ("NUDGE_JWT_ALGORITHM", "ES256"),
            ("NUDGE_JWT_PUBLIC_KEY", &path),
        ],
        &[],
    );
    let _ = std::fs::remove_file(&path);
}

#[test]
fn malformed_database_url_is_a_configuration_error() {
    assert_config_error(
        &[("NUDGE_DATABASE_URL", "postgres://u@127.0.0.1:notaport/db"), ("NUDGE_JWT_SECRET", SECRET)],
        &[],
    );
}

#[test]
fn bad_duration_is_a_configuration_error() {
    assert_config_error(
        &[("NUDGE_DATABASE_URL", &unreachable_url()), ("NUDGE_JWT_SECRET", SECRET), ("NUDGE_POLL_INTERVAL", "soon")],
        &[],
    );
}

#[test]
fn bad_duration_flag_is_a_configuration_error() {
    assert_config_error(
        &[("NUDGE_DATABASE_URL", &unreachable_url()), ("NUDGE_JWT_SECRET", SECRET)],
        &["serve", "--auth-timeout", "10 parsecs"],
    );
}

#[test]
fn an_awake_rate_of_zero_is_a_configuration_error() {
    let err = assert_config_error(
        &[("NUDGE_DATABASE_URL", &unreachable_url()), ("NUDGE_JWT_SECRET", SECRET), ("NUDGE_AWAKE_ABOVE", "0")],
        &[],
    );
    assert!(err.contains("awake-above"), "{err}");
}

#[test]
fn configuration_errors_apply_to_migrate_too() {
    assert_config_error(&[("NUDGE_DATABASE_URL", "postgres://u@127.0.0.1:notaport/db")], &["migrate"]);
}

async fn schema_versions(db: &TestDb) -> Vec<i32> {
    let pg = db.client().await;
    pg.query("SELECT version FROM nudge.schema_migrations ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every migration in sql/, in order.
const ALL_VERSIONS: [i32; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

#[tokio::test(flavor = "multi_thread")]
async fn migrate_twice_is_fine_and_records_every_version() {
    let db = TestDb::new().await;
    for _ in 0..2 {
        let (status, _, err) = run_with_deadline(
            {
                let mut c = nudge_command(&[("NUDGE_DATABASE_URL", &db.url)]);
                c.arg("migrate");
                c
            },
            WAIT,
        );
        assert_eq!(status.code(), Some(0), "nudge migrate: {err}");
    }
    assert_eq!(schema_versions(&db).await, ALL_VERSIONS);
    let pg = db.client().await;
    let id: i64 = pg.query_one("SELECT nudge.publish('t', 'k')", &[]).await.unwrap().get(0);
    assert!(id > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_does_not_reapply_a_file_applied_by_hand() {
    let db = TestDb::new().await;
    let sql = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/0001_events.sql")).unwrap();
    // What `psql -1 -f sql/0001_events.sql` does.
    db.client().await.batch_execute(&format!("BEGIN;\n{sql}\nCOMMIT;")).await.unwrap();
    assert_eq!(schema_versions(&db).await, [1]);

    let mut c = nudge_command(&[("NUDGE_DATABASE_URL", &db.url)]);
    c.arg("migrate");
    let (status, _, err) = run_with_deadline(c, WAIT);
    assert_eq!(status.code(), Some(0), "nudge migrate after a manual apply: {err}");
    // Version 1 is not applied again (it would fail: CREATE TABLE without IF NOT EXISTS); versions 2 and 3 are.
    assert_eq!(schema_versions(&db).await, ALL_VERSIONS);
}

#[test]
fn migrate_against_an_unreachable_database_exits_1() {
    let mut c = nudge_command(&[("NUDGE_DATABASE_URL", &unreachable_url())]);
    c.arg("migrate");
    let (status, _, err) = run_with_deadline(c, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_address_taken_exits_1() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let c = nudge_command(&[("NUDGE_DATABASE_URL", &db.url), ("NUDGE_JWT_SECRET", SECRET), ("NUDGE_LISTEN", &addr)]);
    let (status, _, err) = run_with_deadline(c, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_endpoints_answer_once_up() {
    let db = TestDb::new().await;
    let nudge = Nudge::start_unready(&db.url, &[]).await;
    assert_eq!(nudge.get("/healthz").await, (200, "ok".to_string()));
    eventually!(SOON, "/readyz 200 ready", nudge.get("/readyz").await == (200, "ready".to_string()));
    let (status, body) = nudge.get("/metrics").await;
    assert_eq!(status, 200);
    for name in ["nudge_events_expired_total", "nudge_claim_passes_total"] {
        assert!(parse_metric(&body, name).is_some(), "/metrics lacks {name}:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_connections_and_deliveries() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let (_, before) = nudge.get("/metrics").await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.subscribe("post:1").await;
    insert_event(&db.client().await, "post:1", "k", "{}").await;
    ws.recv_type("event").await;
    // Names are not part of the contract; some sample must have changed.
    eventually!(SOON, "/metrics to change after a connection and a delivery", nudge.get("/metrics").await.1 != before);
    let (_, after) = nudge.get("/metrics").await;
    assert!(nudge.metric("nudge_claim_passes_total").await >= 1.0, "{after}");
    assert!(nudge.metric("nudge_claim_duration_seconds_count").await >= 1.0, "{after}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_with_the_database_down_retries_and_becomes_ready() {
    let db = TestDb::unborn().await;
    let nudge = Nudge::start_unready(&db.url, &[]).await;
    assert_eq!(nudge.get("/healthz").await, (200, "ok".to_string()));
    let (status, reason) = nudge.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(!reason.trim().is_empty(), "/readyz 503 without a reason");

    // Clients may connect meanwhile.
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    ws.ping().await;

    db.create().await;
    eventually!(
        Duration::from_secs(60),
        "/readyz 200 after the database appeared",
        nudge.get("/readyz").await.0 == 200
    );
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:1").await;
    let id = insert_event(&db.client().await, "post:1", "k", "{}").await;
    assert_eq!(alice.recv_type("event").await["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_migrate_leaves_the_schema_alone() {
    let db = TestDb::new().await;
    let nudge = Nudge::start_unready(&db.url, &[("NUDGE_NO_MIGRATE", "true")]).await;
    let (status, reason) = nudge.get("/readyz").await;
    assert_eq!(status, 503, "ready without a schema: {reason}");
    let pg = db.client().await;
    let n: i64 = pg.query_one("SELECT count(*) FROM pg_namespace WHERE nspname = 'nudge'", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "--no-migrate created the schema");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_option_can_be_given_as_a_flag() {
    let db = TestDb::new().await;
    let mut cmd = nudge_command(&[("RUST_LOG", "info")]);
    cmd.args([
        "serve",
        "--database-url",
        &db.url,
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        SECRET,
        "--poll-interval",
        "1h",
        "--max-subscriptions",
        "1",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let nudge = Nudge::spawn(cmd).await;
    nudge.wait_ready().await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    ws.subscribe("a").await;
    ws.send_json(serde_json::json!({"type": "subscribe", "topic": "b"})).await;
    ws.expect_error("forbidden").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_is_the_default_command_and_migrates_at_start() {
    let db = TestDb::new().await;
    // As the URL's role (the superuser), not the harness's owner-migrates-then-runtime-serves.
    let nudge = Nudge::start_migrating(&db.url, &[], &[]).await;
    nudge.wait_ready().await;
    assert_eq!(schema_versions(&db).await, ALL_VERSIONS);
}

/// A file under /tmp with `contents`, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(contents: &str) -> TempFile {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::path::PathBuf::from(format!("/tmp/nudge-test-secret-{}-{n}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_can_come_from_files_and_a_trailing_newline_is_not_part_of_them() {
    let db = TestDb::new().await;
    db.migrate();
    let runtime = db.role_url(Role::Runtime);
    let url_file = TempFile::new(&format!("{runtime}\n"));
    let listen_url_file = TempFile::new(&format!("{runtime}\r\n"));
    let secret_file = TempFile::new(&format!("{SECRET}\n"));
    let nudge = Nudge::start_migrating(
        "",
        &[
            ("NUDGE_DATABASE_URL", ""),
            ("NUDGE_JWT_SECRET", ""),
            ("NUDGE_DATABASE_URL_FILE", url_file.path()),
            ("NUDGE_LISTEN_DATABASE_URL_FILE", listen_url_file.path()),
            ("NUDGE_JWT_SECRET_FILE", secret_file.path()),
            ("NUDGE_NO_MIGRATE", "true"),
        ],
        &[],
    )
    .await;
    nudge.wait_ready().await;
    // Tokens signed with the secret, without the file's newline, are accepted.
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.subscribe("post:1").await;
    let id = insert_event(&db.client().await, "post:1", "k", "{}").await;
    assert_eq!(alice.recv_type("event").await["id"], id);

    // `nudge token` and `nudge status` read the files too.
    let mut token = nudge_command(&[("NUDGE_JWT_SECRET_FILE", secret_file.path())]);
    token.args(["token", "--sub", "bob", "--topics", "*"]);
    let (status, out, err) = run_with_deadline(token, WAIT);
    assert!(status.success(), "nudge token: {err}");
    let mut bob = Ws::connect(&nudge.ws_url()).await.unwrap();
    assert_eq!(bob.auth(out.trim()).await["type"], "ready", "a token signed with the secret from the file");
    let mut status_cmd = nudge_command(&[("NUDGE_DATABASE_URL_FILE", url_file.path())]);
    status_cmd.arg("status");
    let (status, out, err) = run_with_deadline(status_cmd, WAIT);
    assert!(status.success() && out.contains("nodes 1"), "nudge status: {out}{err}");
}

#[test]
fn a_setting_and_its_file_twin_together_are_a_configuration_error_that_shows_neither() {
    let from_file = TempFile::new("postgres://u:password-from-the-file@127.0.0.1:1/db\n");
    let unreachable = unreachable_url();
    for (var, value) in [
        ("NUDGE_DATABASE_URL", "postgres://u:password-from-env@127.0.0.1:1/db"),
        ("NUDGE_LISTEN_DATABASE_URL", "postgres://u:password-from-env@127.0.0.1:1/db"),
        ("NUDGE_JWT_SECRET", "secret-from-env-0123456789abcdef0123456789"),
    ] {
        let file_var = format!("{var}_FILE");
        let mut env = vec![("NUDGE_DATABASE_URL", unreachable.as_str()), ("NUDGE_JWT_SECRET", SECRET)];
        env.retain(|(k, _)| *k != var);
        env.push((var, value));
        env.push((file_var.as_str(), from_file.path()));
        for args in [&[][..], &["migrate"], &["status"]] {
            let err = assert_config_error(&env, args);
            assert!(err.contains(&file_var) && err.contains("both"), "{var}: {err}");
            assert!(!err.contains("from-env") && !err.contains("from-the-file"), "{var}: a secret in: {err}");
        }
    }
    // A flag and a file in the environment are both set too.
    let secret_file = TempFile::new("secret-from-the-file-0123456789abcdef0123\n");
    let err = assert_config_error(
        &[("NUDGE_DATABASE_URL", &unreachable), ("NUDGE_JWT_SECRET_FILE", secret_file.path())],
        &["serve", "--jwt-secret", "secret-from-the-flag-0123456789abcdef0123"],
    );
    assert!(err.contains("NUDGE_JWT_SECRET_FILE") && !err.contains("from-the"), "{err}");
}

#[test]
fn an_unreadable_or_empty_secret_file_is_a_configuration_error() {
    let empty = TempFile::new("\n");
    let unreachable = unreachable_url();
    for (var, path, says) in [
        ("NUDGE_JWT_SECRET_FILE", "/nonexistent/nudge/jwt-secret", "No such file"),
        ("NUDGE_JWT_SECRET_FILE", "/tmp", "directory"),
        ("NUDGE_DATABASE_URL_FILE", empty.path(), "empty"),
        ("NUDGE_LISTEN_DATABASE_URL_FILE", "/nonexistent/nudge/url", "No such file"),
    ] {
        let mut env = vec![(var, path)];
        if var != "NUDGE_DATABASE_URL_FILE" {
            env.push(("NUDGE_DATABASE_URL", &unreachable));
        }
        if var != "NUDGE_JWT_SECRET_FILE" {
            env.push(("NUDGE_JWT_SECRET", SECRET));
        }
        let err = assert_config_error(&env, &[]);
        assert!(err.contains(var) && err.contains(path) && err.contains(says), "{var}={path}: {err}");
    }
}

#[test]
fn a_malformed_url_from_a_file_is_a_configuration_error_without_its_password() {
    let file = TempFile::new("postgres://u:hunter2-from-the-file@127.0.0.1:notaport/db\n");
    let err = assert_config_error(&[("NUDGE_DATABASE_URL_FILE", file.path()), ("NUDGE_JWT_SECRET", SECRET)], &[]);
    assert!(err.contains("NUDGE_DATABASE_URL is malformed") && !err.contains("hunter2"), "{err}");
}

/// The port of the metrics listener, from the log line that announces it.
fn metrics_port(log: &str) -> Option<u16> {
    let at = log.find("serving /metrics on 127.0.0.1:")? + "serving /metrics on 127.0.0.1:".len();
    log[at..].chars().take_while(|c| c.is_ascii_digit()).collect::<String>().parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_listen_serves_metrics_apart_and_the_public_listener_no_longer_does() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[("NUDGE_METRICS_LISTEN", "127.0.0.1:0")]).await;
    let port = metrics_port(&nudge.log()).unwrap_or_else(|| panic!("no metrics listener in the log:\n{}", nudge.log()));
    assert_ne!(port, nudge.port);

    let (status, body) = http_get(port, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    for name in ["nudge_claim_passes_total", "nudge_connections", "nudge_http_pending_connections"] {
        assert!(parse_metric(&body, name).is_some(), "/metrics on the metrics listener lacks {name}:\n{body}");
    }
    // The public listener: everything but /metrics.
    assert_eq!(nudge.get("/metrics").await.0, 404);
    assert_eq!(nudge.get("/healthz").await, (200, "ok".to_string()));
    assert_eq!(nudge.get("/readyz").await, (200, "ready".to_string()));
    // The metrics listener: /metrics only.
    for path in ["/healthz", "/readyz", "/ws", "/"] {
        assert_eq!(http_get(port, path).await.0, 404, "{path} on the metrics listener");
    }
    // Its numbers are the node's.
    let mut alice = authed(&nudge, "alice", &["*"]).await;
    alice.ping().await;
    eventually!(SOON, "nudge_connections 1 on the metrics listener", {
        parse_metric(&http_get(port, "/metrics").await.1, "nudge_connections") == Some(1.0)
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_metrics_address_taken_exits_1() {
    let db = TestDb::new().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let c = nudge_command(&[
        ("NUDGE_DATABASE_URL", &db.url),
        ("NUDGE_JWT_SECRET", SECRET),
        ("NUDGE_LISTEN", "127.0.0.1:0"),
        ("NUDGE_METRICS_LISTEN", &addr),
    ]);
    let (status, _, err) = run_with_deadline(c, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains(&addr), "{err}");
}
