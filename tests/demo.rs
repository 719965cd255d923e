//! `nudge demo`: a throwaway PostgreSQL, the demo page and its API, and the same relay, in one command.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// POST a JSON body over plain HTTP: (status, body).
async fn http_post(port: u16, path: &str, body: &Value) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.trim().to_owned()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_runs_the_comment_thread_end_to_end_and_cleans_up() {
    let mut command = nudge_command(&[("NUDGE_LISTEN", "127.0.0.1:0"), ("RUST_LOG", "info")]);
    command.arg("demo").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut demo = Nudge::spawn(command).await;
    demo.wait_ready().await;
    let tmp = std::env::temp_dir().join(format!("nudge-demo-{}", demo.pid()));
    assert!(tmp.is_dir(), "the throwaway cluster lives in {}", tmp.display());

    let (status, page) = demo.get("/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<title>nudge demo</title>"));
    let (status, client) = demo.get("/demo/nudge-client.js").await;
    assert_eq!(status, 200);
    assert!(client.contains("export class NudgeClient"));

    // A token from the demo's own issuer, as the page gets it.
    let (status, body) = http_post(demo.port, "/demo/token", &json!({"user": "bob"})).await;
    assert_eq!(status, 200, "{body}");
    let token = serde_json::from_str::<Value>(&body).unwrap()["token"].as_str().unwrap().to_owned();
    let mut bob = authed_with(&demo, &token).await;
    bob.subscribe("post:7").await;

    // alice comments: the comment and its event commit together; bob gets the hint and fetches the comment.
    let (status, body) =
        http_post(demo.port, "/demo/posts/7/comments", &json!({"author": "alice", "body": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    let comment_id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_i64().unwrap();
    let event = bob.recv_type("event").await;
    assert_eq!((event["topic"].as_str(), event["kind"].as_str()), (Some("post:7"), Some("comment.created")));
    assert_eq!(event["data"], json!({"comment_id": comment_id}));
    let (_, comments) = demo.get("/demo/posts/7/comments?after=0").await;
    assert!(comments.contains("\"body\":\"hi\""), "{comments}");

    // A personal nudge reaches bob whatever he subscribed to.
    let (status, _) = http_post(demo.port, "/demo/nudge", &json!({"from": "alice", "to": "bob"})).await;
    assert_eq!(status, 200);
    let personal = bob.recv_type("event").await;
    assert_eq!(personal["data"], json!({"from": "alice"}));

    // Who is online, from nudge.presence; disconnecting bob closes his tab with 4003.
    eventually!(
        Duration::from_secs(3),
        "bob listed online",
        demo.get("/demo/online").await.1.contains("\"user\":\"bob\"")
    );
    let (status, _) = http_post(demo.port, "/demo/disconnect", &json!({"user": "bob"})).await;
    assert_eq!(status, 200);
    assert_eq!(bob.recv_type("error").await["code"], "revoked");
    assert_eq!(bob.expect_close(SOON).await.0, 4003);

    // Bad input to the demo API is a clear 400, not a crash.
    let (status, body) = http_post(demo.port, "/demo/posts/7/comments", &json!({"author": "alice", "body": ""})).await;
    assert_eq!(status, 400);
    assert!(body.contains("1 to 2000 characters"), "{body}");

    demo.sigterm();
    assert_eq!(demo.wait_exit(Duration::from_secs(15)).await.code(), Some(0));
    assert!(!tmp.exists(), "the throwaway cluster directory {} must be gone after exit", tmp.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_routes_do_not_exist_under_serve() {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, &[]).await;
    assert_eq!(nudge.get("/").await.0, 404);
    assert_eq!(nudge.get("/demo/nudge-client.js").await.0, 404);
    assert_eq!(http_post(nudge.port, "/demo/token", &json!({"user": "bob"})).await.0, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_uses_a_database_url_given_on_its_command_line() {
    let db = TestDb::new().await;
    let mut command = nudge_command(&[("NUDGE_LISTEN", "127.0.0.1:0")]);
    command
        .args(["demo", "--database-url", &db.url])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let demo = Nudge::spawn(command).await;
    demo.wait_ready().await;
    let tables: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname IN ('nudge', 'demo')", &[])
        .await
        .unwrap()
        .get(0);
    assert!(tables >= 3, "nudge.events, nudge.schema_migrations and demo.comments in the given database");
    assert!(!std::env::temp_dir().join(format!("nudge-demo-{}", demo.pid())).exists());
}

/// The demo signs a token for anyone who asks: production settings lying around in its environment must not
/// reach it. NUDGE_DATABASE_URL, NUDGE_JWT_SECRET and a public NUDGE_LISTEN are ignored.
#[tokio::test(flavor = "multi_thread")]
async fn demo_ignores_production_settings_in_its_environment() {
    let production = TestDb::new().await;
    let env = [
        ("NUDGE_LISTEN", "0.0.0.0:0"),
        ("NUDGE_DATABASE_URL", &production.url),
        ("NUDGE_LISTEN_DATABASE_URL", &production.url),
        ("NUDGE_JWT_SECRET", SECRET),
        ("RUST_LOG", "info"),
    ];
    let mut command = nudge_command(&env);
    command.arg("demo").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    // `spawn` waits for "listening on 127.0.0.1:": loopback, on the port NUDGE_LISTEN named.
    let demo = Nudge::spawn(command).await;
    demo.wait_ready().await;
    assert!(demo.log().contains("listening on 127.0.0.1:"), "{}", demo.log());
    assert!(std::env::temp_dir().join(format!("nudge-demo-{}", demo.pid())).is_dir(), "its own throwaway cluster");
    let tables: i64 = production
        .client()
        .await
        .query_one("SELECT count(*) FROM pg_tables WHERE schemaname IN ('nudge', 'demo')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "the demo must not touch NUDGE_DATABASE_URL's database");

    // A token signed with NUDGE_JWT_SECRET is refused; the demo's own tokens are accepted.
    let production_token = Claims::new("alice").hs256();
    assert_eq!(Ws::refused_status(&format!("{}?token={production_token}", demo.ws_url()), &[]).await, 401);
    let (status, body) = http_post(demo.port, "/demo/token", &json!({"user": "bob"})).await;
    assert_eq!(status, 200, "{body}");
    let token = serde_json::from_str::<Value>(&body).unwrap()["token"].as_str().unwrap().to_owned();
    authed_with(&demo, &token).await;
}
