//! TLS to PostgreSQL with libpq's URL parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`): a cluster of
//! this binary's own with `ssl = on` whose pg_hba.conf refuses every plain-text session, certificates generated
//! here with openssl (a CA, a server certificate for db.nudge.test, localhost and 127.0.0.1, a client certificate,
//! and a second CA that signed none of them), and real nudge processes.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The password of role `nudge` (SCRAM): it must never appear in anything nudge prints or answers.
const PASSWORD: &str = "pw-Zq7xTLS-never-printed";

/// The TLS-only cluster, shared by the tests of this binary.
struct TlsServer {
    cluster: OwnCluster,
    /// Certificates and keys, inside the cluster's directory (removed with it).
    tls: PathBuf,
}

impl TlsServer {
    fn file(&self, name: &str) -> String {
        self.tls.join(name).display().to_string()
    }

    /// A fresh database for one nudge.
    async fn database(&self) -> String {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("tls_{}", N.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        let admin = pg_connect(&self.cluster.socket_url("postgres")).await;
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        name
    }

    /// `postgres://nudge:PASSWORD@host:port/database?query`.
    fn url(&self, host: &str, database: &str, query: &str) -> String {
        let query = if query.is_empty() { String::new() } else { format!("?{query}") };
        format!("postgres://nudge:{PASSWORD}@{host}:{}/{database}{query}", self.cluster.port)
    }
}

async fn server() -> &'static TlsServer {
    static SERVER: tokio::sync::OnceCell<TlsServer> = tokio::sync::OnceCell::const_new();
    SERVER
        .get_or_init(|| async {
            let generated = std::env::temp_dir().join(format!("nudge-db-tls-{}-{}", std::process::id(), free_port()));
            generate_certificates(&generated);
            let certificates = generated.clone();
            let cluster = OwnCluster::start_with(|builder| {
                builder
                    .configure(move |data| copy_dir(&certificates, &data.join("tls")))
                    .postgresql_conf(
                        "ssl = on\nssl_cert_file = 'tls/server.pem'\nssl_key_file = 'tls/server.key'\n\
                         ssl_ca_file = 'tls/ca.pem'",
                    )
                    // First match wins: plain text is refused before any authentication.
                    .pg_hba_conf(
                        "local all all trust\n\
                         hostnossl all all all reject\n\
                         hostssl all certuser 127.0.0.1/32 cert\n\
                         hostssl all all 127.0.0.1/32 scram-sha-256\n",
                    )
            })
            .await;
            let tls = cluster.data().join("tls");
            let _ = std::fs::remove_dir_all(&generated);
            let admin = pg_connect(&cluster.socket_url("postgres")).await;
            admin
                .batch_execute(&format!(
                    "CREATE ROLE nudge LOGIN SUPERUSER PASSWORD '{PASSWORD}'; CREATE ROLE certuser LOGIN SUPERUSER"
                ))
                .await
                .unwrap();
            TlsServer { cluster, tls }
        })
        .await
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    // PostgreSQL refuses a key file others can read.
    set_mode(&to.join("server.key"), 0o600);
    Ok(())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// `ca`, `other-ca` (signed nothing here), `server` (db.nudge.test, localhost, 127.0.0.1) and `client`
/// (CN=certuser), each `.pem` with its `.key`; EC P-256.
fn generate_certificates(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:db.nudge.test,DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let steps = [
        format!("req -x509 {key} -days 2 -subj /CN=nudge-test-CA -keyout ca.key -out ca.pem"),
        format!("req -x509 {key} -days 2 -subj /CN=some-other-CA -keyout other-ca.key -out other-ca.pem"),
        format!("req {key} -subj /CN=db.nudge.test -keyout server.key -out server.csr"),
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext \
         -out server.pem"
            .into(),
        format!("req {key} -subj /CN=certuser -keyout client.key -out client.csr"),
        "x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile client.ext \
         -out client.pem"
            .into(),
    ];
    for step in steps {
        let out = Command::new("openssl").args(step.split(' ')).current_dir(dir).output().expect("run openssl");
        assert!(out.status.success(), "openssl {step}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Start nudge with `database` as NUDGE_DATABASE_URL (and `extra` env), not waiting for readiness.
async fn start(database: &str, extra: &[(&str, &str)]) -> Nudge {
    Nudge::start_unready(database, extra).await
}

/// An event inserted (over the cluster's socket) reaches a subscribed client of `nudge`.
async fn delivers(nudge: &Nudge, server: &TlsServer, database: &str) {
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    let token = Claims::new("alice").exp_in(60).topics(&["post:*"]).hs256();
    assert_eq!(ws.auth(&token).await["type"], "ready");
    ws.subscribe("post:1").await;
    let producer = pg_connect(&server.cluster.socket_url(database)).await;
    let id = insert_event(&producer, "post:1", "comment.created", r#"{"n": 1}"#).await;
    assert_eq!(ws.recv_event_ids(1, SOON).await, vec![id], "log:\n{}", nudge.log());
}

/// nudge's sessions on `database` as PostgreSQL sees them: (application_name, TLS?) for each.
async fn sessions(server: &TlsServer, database: &str) -> Vec<(String, bool)> {
    let admin = pg_connect(&server.cluster.socket_url("postgres")).await;
    admin
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = $1 AND a.application_name LIKE 'nudge%' ORDER BY 1",
            &[&database],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// Wait until `/readyz` answers 503 with a reason containing `expected`; returns the body.
async fn not_ready_because(nudge: &Nudge, expected: &str) -> String {
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let (status, body) = nudge.get("/readyz").await;
        assert_ne!(status, 200, "ready, expected a 503 for {expected:?}; log:\n{}", nudge.log());
        if status == 503 && body.contains(expected) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz: {status} {body:?}, expected a 503 for {expected:?}; log:\n{}",
            nudge.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

fn assert_no_password(nudge: &Nudge, body: &str) {
    assert!(!body.contains(PASSWORD), "password in /readyz: {body}");
    assert!(!nudge.log().contains(PASSWORD), "password in the log:\n{}", nudge.log());
}

/// Every mode that asks for TLS reaches a server that refuses plain text, and every session nudge opens (the
/// pools and LISTEN) is a TLS session: prefer (also when sslmode is absent: libpq's default), require, verify-ca and
/// verify-full, the latter with SCRAM channel binding required and a key=value NUDGE_LISTEN_DATABASE_URL that
/// connects to an address but verifies a host name.
#[tokio::test(flavor = "multi_thread")]
async fn every_mode_that_asks_for_tls_relays_through_a_server_that_refuses_plain_text() {
    let server = server().await;
    let ca = server.file("ca.pem");
    let cases = [
        ("no sslmode", String::new(), None),
        ("prefer", "sslmode=prefer".to_owned(), None),
        ("require", "sslmode=require".to_owned(), None),
        ("verify-ca", format!("sslmode=verify-ca&sslrootcert={ca}"), None),
        ("verify-full", format!("sslrootcert={ca}&sslmode=verify-full&channel_binding=require"), Some(())),
    ];
    for (mode, query, key_value_listen) in cases {
        let database = server.database().await;
        let url = server.url("127.0.0.1", &database, &query);
        let listen = format!(
            "host=db.nudge.test hostaddr=127.0.0.1 port={} user=nudge password='{PASSWORD}' dbname={database} \
             sslmode=verify-full sslrootcert='{ca}' channel_binding=require",
            server.cluster.port
        );
        let env: Vec<(&str, &str)> = match key_value_listen {
            Some(()) => vec![("NUDGE_LISTEN_DATABASE_URL", &listen)],
            None => vec![],
        };
        let nudge = start(&url, &env).await;
        nudge.wait_ready().await;
        delivers(&nudge, server, &database).await;
        let sessions = sessions(server, &database).await;
        assert!(sessions.iter().any(|(name, _)| name == "nudge-listen"), "{mode}: {sessions:?}");
        assert!(sessions.iter().any(|(name, _)| name == "nudge"), "{mode}: {sessions:?}");
        assert!(sessions.iter().all(|(_, tls)| *tls), "{mode}: a session without TLS: {sessions:?}");
        assert_no_password(&nudge, "");
    }
}

/// `nudge migrate` and `nudge status` open their sessions with the same connector.
#[tokio::test(flavor = "multi_thread")]
async fn migrate_and_status_connect_with_tls() {
    let server = server().await;
    let database = server.database().await;
    let url = server.url(
        "db.nudge.test",
        &database,
        &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}", server.file("ca.pem")),
    );
    for command in ["migrate", "status"] {
        let mut cmd = nudge_command(&[("NUDGE_DATABASE_URL", &url)]);
        cmd.arg(command);
        let (status, stdout, stderr) = run_with_deadline(cmd, SOON);
        assert!(status.success(), "nudge {command}: {stderr}");
        assert!(!stdout.contains(PASSWORD) && !stderr.contains(PASSWORD));
        if command == "status" {
            assert!(stdout.starts_with("last seq 0, pending rows 0"), "{stdout}");
        }
    }
}

/// `sslmode=disable` against the TLS-only server: PostgreSQL's refusal is the reason /readyz gives; the same URL
/// with `sslmode=require` connects.
#[tokio::test(flavor = "multi_thread")]
async fn disable_is_refused_by_the_server_and_require_connects() {
    let server = server().await;
    let database = server.database().await;
    let refused = start(&server.url("127.0.0.1", &database, "sslmode=disable"), &[]).await;
    let body = not_ready_because(&refused, "no encryption").await;
    assert!(body.contains("pg_hba.conf rejects connection"), "{body}");
    assert_no_password(&refused, &body);
    drop(refused);

    let nudge = start(&server.url("127.0.0.1", &database, "sslmode=require"), &[]).await;
    nudge.wait_ready().await;
    delivers(&nudge, server, &database).await;
}

/// A server certificate from a CA other than sslrootcert's: one clear reason on /readyz and in the log, while
/// nudge retries. `require` with a root certificate checks the chain too (libpq).
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_from_another_ca_is_refused_with_a_clear_reason() {
    let server = server().await;
    let other = server.file("other-ca.pem");
    for mode in ["verify-full", "verify-ca", "require"] {
        let database = server.database().await;
        let nudge =
            start(&server.url("127.0.0.1", &database, &format!("sslmode={mode}&sslrootcert={other}")), &[]).await;
        let body =
            not_ready_because(&nudge, "certificate verify failed: invalid peer certificate: UnknownIssuer").await;
        assert!(body.contains(&format!("roots: sslrootcert {other}")), "{mode}: {body}");
        assert_eq!(body.lines().count(), 1, "{body}");
        let log = nudge.log();
        assert!(log.contains("certificate verify failed: invalid peer certificate: UnknownIssuer"), "{log}");
        assert_no_password(&nudge, &body);
        assert!(sessions(server, &database).await.is_empty());
    }
}

/// verify-full compares the certificate with the host name it was asked for (not the address it connected to);
/// verify-ca does not look at names.
#[tokio::test(flavor = "multi_thread")]
async fn verify_full_checks_the_host_name_and_verify_ca_does_not() {
    let server = server().await;
    let ca = server.file("ca.pem");
    let database = server.database().await;
    let query = |mode: &str| format!("hostaddr=127.0.0.1&sslmode={mode}&sslrootcert={ca}");

    let wrong = start(&server.url("wrong.nudge.test", &database, &query("verify-full")), &[]).await;
    let body = not_ready_because(&wrong, "certificate not valid for name \"wrong.nudge.test\"").await;
    assert!(body.contains("certificate verify failed"), "{body}");
    assert_no_password(&wrong, &body);
    drop(wrong);

    let nudge = start(&server.url("wrong.nudge.test", &database, &query("verify-ca")), &[]).await;
    nudge.wait_ready().await;
    delivers(&nudge, server, &database).await;
}

/// pg_hba `cert`: the client certificate (sslcert, sslkey) is the credential; without it the server refuses.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_authenticates() {
    let server = server().await;
    let database = server.database().await;
    let base = format!(
        "postgres://certuser@localhost:{}/{database}?sslmode=verify-full&sslrootcert={}",
        server.cluster.port,
        server.file("ca.pem")
    );
    let without = start(&base, &[]).await;
    not_ready_because(&without, "connection requires a valid client certificate").await;
    drop(without);

    let with = format!("{base}&sslcert={}&sslkey={}", server.file("client.pem"), server.file("client.key"));
    let nudge = start(&with, &[]).await;
    nudge.wait_ready().await;
    delivers(&nudge, server, &database).await;
}

/// What cannot work is known at start: one line on stderr, exit code 2, for serve, migrate and status alike, with
/// the variable and the parameter named and the password nowhere.
#[test]
fn unusable_tls_settings_stop_nudge_with_one_line_and_exit_code_2() {
    let dir = std::env::temp_dir().join(format!("nudge-db-tls-bad-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let not_pem = dir.join("not-pem.crt");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let cert = dir.join("cert.pem");
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let (not_pem, cert) = (not_pem.display().to_string(), cert.display().to_string());
    let url = |query: &str| format!("postgres://nudge:{PASSWORD}@127.0.0.1:1/db?{query}");
    let cases = [
        (
            "NUDGE_DATABASE_URL",
            url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem"),
            "NUDGE_DATABASE_URL: cannot read sslrootcert /nonexistent/ca.pem: No such file or directory".to_owned(),
        ),
        (
            "NUDGE_DATABASE_URL",
            url(&format!("sslmode=verify-ca&sslrootcert={not_pem}")),
            format!("NUDGE_DATABASE_URL: sslrootcert {not_pem}: no PEM CERTIFICATE block in it"),
        ),
        (
            "NUDGE_DATABASE_URL",
            url("sslmode=verify_full"),
            "NUDGE_DATABASE_URL: invalid sslmode \"verify_full\"".into(),
        ),
        (
            "NUDGE_DATABASE_URL",
            url("sslmode=verify-full"),
            "NUDGE_DATABASE_URL: sslmode=verify-full needs sslrootcert".into(),
        ),
        (
            "NUDGE_DATABASE_URL",
            url("sslmode=require&sslrootcert=system"),
            "NUDGE_DATABASE_URL: weak sslmode \"require\" may not be used with sslrootcert=system".into(),
        ),
        (
            "NUDGE_LISTEN_DATABASE_URL",
            format!(
                "host=127.0.0.1 port=1 user=nudge password={PASSWORD} sslmode=require sslcert={cert} sslkey={cert}"
            ),
            format!("NUDGE_LISTEN_DATABASE_URL: sslkey {cert}: no PEM private key in it"),
        ),
    ];
    for (variable, value, expected) in cases {
        for command in ["serve", "migrate", "status"] {
            if command == "status" && variable == "NUDGE_LISTEN_DATABASE_URL" {
                // `nudge status` reads the pool's database only.
                continue;
            }
            let mut env = vec![("NUDGE_JWT_SECRET", SECRET), ("NUDGE_DATABASE_URL", "postgres://nudge@127.0.0.1:1/db")];
            env.retain(|(k, _)| *k != variable);
            env.push((variable, &value));
            let mut cmd = nudge_command(&env);
            cmd.arg(command);
            let (status, stdout, stderr) = run_with_deadline(cmd, SOON);
            assert_eq!(status.code(), Some(2), "{command} with {value}: {stderr}");
            assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
            assert!(stderr.starts_with(&format!("error: {expected}")), "{command}: {stderr}");
            assert!(!stderr.contains(PASSWORD) && !stdout.contains(PASSWORD), "{command}: {stderr}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A PgBouncer (transaction pooling) that speaks TLS to its clients (required) and to PostgreSQL, for database
/// `name` as role `nudge`. Run as `postgres` when we are root; stopped when its wrapper's stdin closes.
struct TlsBouncer {
    port: u16,
    dir: PathBuf,
    stdin: Option<std::process::ChildStdin>,
    wrapper: std::process::Child,
}

impl TlsBouncer {
    fn start(server: &TlsServer, name: &str) -> TlsBouncer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("nudge-db-tls-pgbouncer-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("userlist.txt"), "\"nudge\" \"\"\n").unwrap();
        let ini = format!(
            "[databases]\n{name} = host=127.0.0.1 port={pg} dbname={name} user=nudge password={PASSWORD}\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {dir}/userlist.txt\npool_mode = transaction\n\
             client_tls_sslmode = require\nclient_tls_cert_file = {tls}/server.pem\n\
             client_tls_key_file = {tls}/server.key\nserver_tls_sslmode = require\n\
             logfile = {dir}/pgbouncer.log\n",
            pg = server.cluster.port,
            dir = dir.display(),
            tls = server.tls.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        let script = format!(
            "/usr/sbin/pgbouncer '{dir}/pgbouncer.ini' 2>>'{dir}/stderr.log' & pid=$!; read _; kill -TERM $pid; \
             wait $pid; rm -rf '{dir}'",
            dir = dir.display()
        );
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout.trim_ascii() == b"0").unwrap_or(false);
        let mut cmd = if root {
            let st = Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status().unwrap();
            assert!(st.success(), "chown {}", dir.display());
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "/bin/sh", "-c", &script]);
            c
        } else {
            let mut c = Command::new("/bin/sh");
            c.args(["-c", &script]);
            c
        };
        let mut wrapper = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let stdin = wrapper.stdin.take();
        let bouncer = TlsBouncer { port, dir, stdin, wrapper };
        let deadline = std::time::Instant::now() + SOON;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "pgbouncer not listening:\n{}", bouncer.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bouncer
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("pgbouncer.log"))
    }
}

impl Drop for TlsBouncer {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.wrapper.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.wrapper.kill();
        let _ = self.wrapper.wait();
    }
}

/// The pool through a PgBouncer that requires TLS from its clients (verify-full against PgBouncer's certificate),
/// LISTEN and migrations direct to PostgreSQL (verify-full): PgBouncer logs each of nudge's logins as TLS.
#[tokio::test(flavor = "multi_thread")]
async fn the_pool_reaches_postgres_through_pgbouncer_over_tls() {
    let server = server().await;
    let database = server.database().await;
    let bouncer = TlsBouncer::start(server, &database);
    let verify = format!("sslmode=verify-full&sslrootcert={}", server.file("ca.pem"));
    let pooled = format!("postgres://nudge:{PASSWORD}@127.0.0.1:{}/{database}?{verify}", bouncer.port);
    let direct = server.url("127.0.0.1", &database, &verify);
    let nudge = start(&pooled, &[("NUDGE_LISTEN_DATABASE_URL", &direct)]).await;
    nudge.wait_ready().await;
    delivers(&nudge, server, &database).await;
    let log = bouncer.log();
    assert!(log.contains(&format!("login attempt: db={database} user=nudge tls=TLSv1.3")), "{log}");
    assert!(!log.contains("tls=no"), "{log}");
    assert_no_password(&nudge, "");
}

/// libpq's `prefer`: a server that offers TLS but whose handshake fails (here: TLS 1.1 at most, which rustls does
/// not speak) gets a plain-text session instead; `require` does not fall back and says why.
#[tokio::test(flavor = "multi_thread")]
async fn prefer_falls_back_to_plain_text_when_the_handshake_fails() {
    let server = server().await;
    let certificates = server.tls.clone();
    let old = OwnCluster::start_with(|builder| {
        builder.configure(move |data| copy_dir(&certificates, &data.join("tls"))).postgresql_conf(
            "ssl = on\nssl_cert_file = 'tls/server.pem'\nssl_key_file = 'tls/server.key'\n\
             ssl_min_protocol_version = 'TLSv1'\nssl_max_protocol_version = 'TLSv1.1'",
        )
    })
    .await;
    old.create_database("prefer").await;
    let url = |query: &str| format!("postgres://postgres@127.0.0.1:{}/prefer{query}", old.port);

    let require = start(&url("?sslmode=require"), &[]).await;
    let body = not_ready_because(&require, "error performing TLS handshake").await;
    assert!(body.ends_with("(sslmode=require)"), "{body}");
    drop(require);

    let nudge = start(&url(""), &[]).await;
    nudge.wait_ready().await;
    assert!(nudge.log().contains("sslmode=prefer: trying without TLS"), "{}", nudge.log());
    let admin = pg_connect(&old.socket_url("postgres")).await;
    let plain: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.datname = 'prefer' AND a.application_name = 'nudge-listen' AND NOT s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 1);
}
