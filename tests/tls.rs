//! wss: nudge terminating TLS itself with a certificate the test generates, and the `nudge token` command.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::Connector;

/// A test CA and a localhost/127.0.0.1 certificate it signed, generated with openssl into a temp dir.
/// (A self-signed leaf would be a CA certificate, which webpki rightly refuses as a server certificate.)
struct TestCert {
    dir: PathBuf,
}

impl TestCert {
    fn generate() -> TestCert {
        let dir = std::env::temp_dir().join(format!("nudge-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("leaf.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
            .unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let steps: [Vec<&str>; 3] =
            [
                [
                    &[
                        "req",
                        "-x509",
                        "-days",
                        "1",
                        "-subj",
                        "/CN=nudge test CA",
                        "-keyout",
                        "ca.key",
                        "-out",
                        "ca.pem",
                    ][..],
                    &ec,
                ]
                .concat(),
                [&["req", "-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr"][..], &ec].concat(),
                vec![
                    "x509",
                    "-req",
                    "-in",
                    "leaf.csr",
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "1",
                    "-extfile",
                    "leaf.ext",
                    "-out",
                    "cert.pem",
                ],
            ];
        for args in steps {
            let status = Command::new("openssl")
                .args(&args)
                .current_dir(&dir)
                .stderr(std::process::Stdio::null())
                .status()
                .expect("openssl");
            assert!(status.success(), "openssl {args:?} failed");
        }
        TestCert { dir }
    }

    fn cert(&self) -> String {
        self.dir.join("cert.pem").display().to_string()
    }

    fn key(&self) -> String {
        self.dir.join("key.pem").display().to_string()
    }

    /// A client config that trusts exactly the test CA.
    fn client_config(&self) -> rustls::ClientConfig {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.dir.join("ca.pem")).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn start_tls(cert: &TestCert) -> (TestDb, Nudge) {
    let db = TestDb::new().await;
    let nudge =
        Nudge::start_unready(&db.url, &[("NUDGE_TLS_CERT", &cert.cert()), ("NUDGE_TLS_KEY", &cert.key())]).await;
    (db, nudge)
}

#[tokio::test(flavor = "multi_thread")]
async fn wss_carries_the_whole_protocol() {
    let cert = TestCert::generate();
    let (db, nudge) = start_tls(&cert).await;
    let url = format!("wss://localhost:{}/ws", nudge.port);
    let connector = Connector::Rustls(Arc::new(cert.client_config()));
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, false, Some(connector))
        .await
        .expect("wss handshake with the generated certificate");

    let token = Claims::new("alice").exp_in(60).topics(&["post:*"]).hs256();
    ws.send(Message::text(json!({"type": "auth", "token": token}).to_string())).await.unwrap();
    ws.send(Message::text(json!({"type": "subscribe", "topic": "post:1", "ref": 1}).to_string())).await.unwrap();
    let mut replies = Vec::new();
    while replies.len() < 2 {
        let frame = tokio::time::timeout(SOON, ws.next()).await.expect("reply").expect("open").unwrap();
        if let Message::Text(text) = frame {
            replies.push(serde_json::from_str::<Value>(&text).unwrap());
        }
    }
    assert_eq!(replies[0]["type"], "ready");
    assert_eq!(replies[1], json!({"type": "subscribed", "topic": "post:1", "ref": 1}));

    // The database side comes up independently of the socket; wait for it before publishing.
    eventually!(SOON, "/readyz over TLS", http_get_tls(&cert, nudge.port, "/readyz").await.0 == 200);
    let id = insert_event(&db.client().await, "post:1", "comment.created", r#"{"comment_id": 5}"#).await;
    let event = loop {
        let frame = tokio::time::timeout(SOON, ws.next()).await.expect("event").expect("open").unwrap();
        if let Message::Text(text) = frame {
            break serde_json::from_str::<Value>(&text).unwrap();
        }
    };
    assert_eq!(event["id"], id);
    assert_eq!(event["data"], json!({"comment_id": 5}));
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_ws_to_a_tls_port_fails_and_the_server_keeps_serving() {
    let cert = TestCert::generate();
    let (_db, nudge) = start_tls(&cert).await;
    let plain = tokio::time::timeout(SOON, tokio_tungstenite::connect_async(nudge.ws_url())).await.expect("answer");
    assert!(plain.is_err(), "a plain-text upgrade must not succeed on a TLS port");
    assert_eq!(http_get_tls(&cert, nudge.port, "/healthz").await, (200, "ok".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_sockets_that_send_no_request_are_closed_by_the_header_timeout_counted_from_accept() {
    use tokio::io::AsyncReadExt;
    let cert = TestCert::generate();
    let db = TestDb::new().await;
    let env = [("NUDGE_TLS_CERT", cert.cert()), ("NUDGE_TLS_KEY", cert.key()), ("NUDGE_HEADER_TIMEOUT", "1s".into())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let nudge = Nudge::start_unready(&db.url, &env).await;

    // One sends no ClientHello; the other completes the handshake and then sends no request.
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", nudge.port)).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", nudge.port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cert.client_config()));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut handshaken = connector.connect(name, tcp).await.expect("TLS handshake");

    let mut buf = [0u8; 64];
    // End-of-file or an error (no close_notify): closed either way; a timeout means still open.
    let silent_end = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf)).await;
    let handshaken_end = tokio::time::timeout(Duration::from_secs(3), handshaken.read(&mut buf)).await;
    assert!(
        matches!(silent_end, Ok(Ok(0)) | Ok(Err(_))),
        "no ClientHello: {silent_end:?} after {:?}",
        started.elapsed()
    );
    assert!(matches!(handshaken_end, Ok(Ok(0)) | Ok(Err(_))), "no request: {handshaken_end:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "both closed {:?} after connecting", started.elapsed());
    assert_eq!(http_get_tls(&cert, nudge.port, "/healthz").await, (200, "ok".into()));
}

#[test]
fn tls_needs_both_files_and_readable_ones() {
    let cert = TestCert::generate();
    let base = [("NUDGE_DATABASE_URL", "postgres://u@127.0.0.1:1/db"), ("NUDGE_JWT_SECRET", SECRET)];

    let mut half = nudge_command(&base);
    half.env("NUDGE_TLS_CERT", cert.cert());
    let (status, _, stderr) = run_with_deadline(half, SOON);
    assert_eq!(status.code(), Some(2));
    assert_eq!(stderr.trim(), "error: TLS needs both NUDGE_TLS_CERT and NUDGE_TLS_KEY");

    let mut missing = nudge_command(&base);
    missing.env("NUDGE_TLS_CERT", "/nonexistent/cert.pem").env("NUDGE_TLS_KEY", cert.key());
    let (status, _, stderr) = run_with_deadline(missing, SOON);
    assert_eq!(status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: cannot read TLS certificate /nonexistent/cert.pem"), "{stderr}");

    // A key that is not a key: the certificate given twice.
    let mut swapped = nudge_command(&base);
    swapped.env("NUDGE_TLS_CERT", cert.cert()).env("NUDGE_TLS_KEY", cert.cert());
    let (status, _, stderr) = run_with_deadline(swapped, SOON);
    assert_eq!(status.code(), Some(2));
    assert!(stderr.starts_with("error: cannot read TLS key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nudge_token_prints_a_token_that_authenticates() {
    // The server first: starting it (and the test cluster) can take longer than the 5 s the ttl check allows.
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    let mut command = nudge_command(&[("NUDGE_JWT_SECRET", SECRET)]);
    command.args(["token", "--sub", "alice", "--topics", "post:*,chat:7", "--ttl", "10m"]);
    let (status, stdout, stderr) = run_with_deadline(command, SOON);
    assert!(status.success(), "{stderr}");
    let token = stdout.trim();

    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    let ready = ws.auth(token).await;
    assert_eq!(ready["user"], "alice");
    let ttl = ready["expires_at"].as_i64().unwrap() - now_secs();
    assert!((595..=600).contains(&ttl), "expires in {ttl}s, asked for 10m");
    ws.subscribe("chat:7").await;
    ws.subscribe("post:9").await;
}

#[test]
fn nudge_token_without_a_secret_is_a_configuration_error() {
    let mut command = nudge_command(&[]);
    command.args(["token", "--sub", "alice"]);
    let (status, _, stderr) = run_with_deadline(command, SOON);
    assert_eq!(status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("NUDGE_JWT_SECRET"), "{stderr}");
}

/// GET over TLS with the test certificate trusted: (status, trimmed body).
async fn http_get_tls(cert: &TestCert, port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cert.client_config()));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_owned()).unwrap_or_default();
    (status, body)
}
