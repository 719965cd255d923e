//! Authentication: the three ways a token arrives, which tokens are refused, expiry and refresh, topics claims,
//! origins, and tokens never reaching the log.
mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

/// A refused token: HTTP 401 in the header, and `unauthorized` + close 4001 as the first message.
async fn assert_refused(nudge: &Nudge, token: &str) {
    let bearer = format!("Bearer {token}");
    assert_eq!(Ws::refused_status(&nudge.ws_url(), &[("authorization", &bearer)]).await, 401, "header token");
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    ws.send_json(json!({"type": "auth", "token": token})).await;
    ws.expect_error("unauthorized").await;
    assert_eq!(ws.expect_close(SOON).await.0, 4001);
}

async fn assert_accepted(nudge: &Nudge, token: &str, sub: &str) {
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    let ready = ws.auth(token).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    assert_eq!(ready["user"], sub);
}

async fn start(extra: &[(&str, &str)]) -> (TestDb, Nudge) {
    let db = TestDb::new().await;
    let nudge = Nudge::start(&db.url, extra).await;
    (db, nudge)
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_header_with_good_token_opens_authenticated_with_ready_first() {
    let (_db, nudge) = start(&[]).await;
    let claims = Claims::new("alice");
    let bearer = format!("Bearer {}", claims.hs256());
    let mut ws = Ws::connect_with_headers(&nudge.ws_url(), &[("authorization", &bearer)]).await.unwrap();
    let ready = ws.recv_json(SOON).await;
    assert_eq!(ready, json!({"type": "ready", "user": "alice", "expires_at": claims.exp()}));
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_header_with_bad_token_gets_401_before_upgrade() {
    let (_db, nudge) = start(&[]).await;
    let bad = Claims::new("alice").sign_secret(Algorithm::HS256, "not-the-secret");
    let status = Ws::refused_status(&nudge.ws_url(), &[("authorization", &format!("Bearer {bad}"))]).await;
    assert_eq!(status, 401);
    let status = Ws::refused_status(&nudge.ws_url(), &[("authorization", "Bearer garbage")]).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn authorization_header_without_a_bearer_token_gets_401_even_beside_a_good_query_token() {
    let (_db, nudge) = start(&[]).await;
    let good = Claims::new("alice").hs256();
    let with_query = format!("{}?token={good}", nudge.ws_url());
    let other_scheme = format!("Token {good}");
    for value in ["Bearer ", "Bearer", "Basic YWxpY2U6c2VjcmV0", "garbage", &other_scheme] {
        for url in [nudge.ws_url(), with_query.clone()] {
            match Ws::connect_with_headers(&url, &[("authorization", value)]).await {
                Err(WsError::Http(response)) => {
                    assert_eq!(response.status(), 401, "Authorization: {value:?} on {url}");
                    let challenge = response.headers().get("www-authenticate").and_then(|v| v.to_str().ok());
                    assert_eq!(challenge, Some("Bearer error=\"invalid_token\""), "Authorization: {value:?}");
                }
                Ok(_) => panic!("Authorization: {value:?} was let through on {url}"),
                Err(e) => panic!("Authorization: {value:?} on {url}: {e}, expected HTTP 401"),
            }
        }
    }
    // A well-formed Bearer header still wins over the query.
    let bearer = format!("Bearer {good}");
    let bad_query = format!("{}?token=garbage", nudge.ws_url());
    let mut ws = Ws::connect_with_headers(&bad_query, &[("authorization", &bearer)]).await.expect("upgrade");
    assert_eq!(ws.recv_json(SOON).await["type"], "ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn query_token_good_opens_authenticated_with_ready_first() {
    let (_db, nudge) = start(&[]).await;
    let claims = Claims::new("alice");
    let mut ws = Ws::connect(&format!("{}?token={}", nudge.ws_url(), claims.hs256())).await.unwrap();
    let ready = ws.recv_json(SOON).await;
    assert_eq!(ready, json!({"type": "ready", "user": "alice", "expires_at": claims.exp()}));
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn query_token_bad_gets_401_before_upgrade() {
    let (_db, nudge) = start(&[]).await;
    let bad = Claims::new("alice").sign_secret(Algorithm::HS256, "not-the-secret");
    assert_eq!(Ws::refused_status(&format!("{}?token={bad}", nudge.ws_url()), &[]).await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn first_message_auth_gets_ready() {
    let (_db, nudge) = start(&[]).await;
    let claims = Claims::new("alice");
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    // Nothing is sent before auth.
    ws.expect_silence(SILENCE).await;
    let ready = ws.auth(&claims.hs256()).await;
    assert_eq!(ready, json!({"type": "ready", "user": "alice", "expires_at": claims.exp()}));
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn first_message_bad_token_gets_unauthorized_and_4001() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    ws.send_json(json!({"type": "auth", "token": "not.a.jwt"})).await;
    ws.expect_error("unauthorized").await;
    assert_eq!(ws.expect_close(SOON).await.0, 4001);
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_timeout_gets_unauthorized_and_4001() {
    let (_db, nudge) = start(&[("NUDGE_AUTH_TIMEOUT", "300ms")]).await;
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    let err = ws.recv_json(Duration::from_secs(5)).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "unauthorized", "{err}");
    assert_eq!(ws.expect_close(SOON).await.0, 4001);
}

#[tokio::test(flavor = "multi_thread")]
async fn ping_before_auth_gets_pong() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    ws.ping().await;
    let ready = ws.auth(&Claims::new("alice").hs256()).await;
    assert_eq!(ready["type"], "ready");
}

#[tokio::test(flavor = "multi_thread")]
async fn request_before_auth_gets_unauthorized_and_4001() {
    let (_db, nudge) = start(&[]).await;
    for req in [
        json!({"type": "subscribe", "topic": "post:1"}),
        json!({"type": "unsubscribe", "topic": "post:1"}),
        json!({"type": "wakeup"}),
        json!({"type": "refresh", "token": Claims::new("alice").hs256()}),
    ] {
        let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
        ws.send_json(req.clone()).await;
        let err = ws.recv_json(SOON).await;
        assert_eq!(err["code"], "unauthorized", "{req} -> {err}");
        assert_eq!(ws.expect_close(SOON).await.0, 4001, "{req}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_with_alg_none_is_refused() {
    let (_db, nudge) = start(&[]).await;
    assert_refused(&nudge, &Claims::new("alice").unsigned()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_with_another_alg_is_refused() {
    let (_db, nudge) = start(&[]).await;
    // Same secret, valid HS384 signature: only the configured algorithm is accepted.
    assert_refused(&nudge, &Claims::new("alice").sign_secret(Algorithm::HS384, SECRET)).await;
    assert_refused(&nudge, &Claims::new("alice").sign_secret(Algorithm::HS512, SECRET)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_with_bad_signature_is_refused() {
    let (_db, nudge) = start(&[]).await;
    assert_refused(&nudge, &Claims::new("alice").sign_secret(Algorithm::HS256, "another-secret")).await;
    // A good token with its payload swapped for another user's.
    let good = Claims::new("alice").hs256();
    let other = Claims::new("mallory").hs256();
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], other.split('.').nth(1).unwrap(), parts[2]);
    assert_refused(&nudge, &forged).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_without_exp_is_refused() {
    let (_db, nudge) = start(&[]).await;
    assert_refused(&nudge, &Claims::new("alice").without("exp").hs256()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_without_sub_is_refused() {
    let (_db, nudge) = start(&[]).await;
    assert_refused(&nudge, &Claims::new("alice").without("sub").hs256()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_with_past_exp_is_refused() {
    let (_db, nudge) = start(&[]).await;
    assert_refused(&nudge, &Claims::new("alice").exp_in(-5).hs256()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_with_future_nbf_is_refused() {
    let (_db, nudge) = start(&[]).await;
    assert_refused(&nudge, &Claims::new("alice").set("nbf", json!(now_secs() + 60)).hs256()).await;
    // A past nbf is fine.
    assert_accepted(&nudge, &Claims::new("alice").set("nbf", json!(now_secs() - 60)).hs256(), "alice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn audience_is_required_and_checked_when_configured() {
    let (_db, nudge) = start(&[("NUDGE_JWT_AUDIENCE", "nudge-app")]).await;
    assert_refused(&nudge, &Claims::new("alice").set("aud", json!("other-app")).hs256()).await;
    assert_refused(&nudge, &Claims::new("alice").hs256()).await;
    assert_accepted(&nudge, &Claims::new("alice").set("aud", json!("nudge-app")).hs256(), "alice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn issuer_is_required_and_checked_when_configured() {
    let (_db, nudge) = start(&[("NUDGE_JWT_ISSUER", "https://auth.example")]).await;
    assert_refused(&nudge, &Claims::new("alice").set("iss", json!("https://evil.example")).hs256()).await;
    assert_refused(&nudge, &Claims::new("alice").hs256()).await;
    assert_accepted(&nudge, &Claims::new("alice").set("iss", json!("https://auth.example")).hs256(), "alice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn aud_and_iss_are_ignored_when_not_configured() {
    let (_db, nudge) = start(&[]).await;
    let t = Claims::new("alice").set("aud", json!("whatever")).set("iss", json!("whoever")).hs256();
    assert_accepted(&nudge, &t, "alice").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_clock_leeway_by_default() {
    let (_db, nudge) = start(&[]).await;
    assert_refused(&nudge, &Claims::new("alice").exp_in(-5).hs256()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn leeway_accepts_a_token_expired_a_few_seconds_ago() {
    let (_db, nudge) = start(&[("NUDGE_JWT_LEEWAY", "30s")]).await;
    assert_accepted(&nudge, &Claims::new("alice").exp_in(-5).hs256(), "alice").await;
    assert_refused(&nudge, &Claims::new("alice").exp_in(-120).hs256()).await;
}

async fn public_key_algorithm_accepts_its_tokens_only(alg: Algorithm) {
    let key = KeyPair::generate(alg);
    let (_db, nudge) = start(&[
        ("NUDGE_JWT_ALGORITHM", alg_name(alg)),
        ("NUDGE_JWT_PUBLIC_KEY", key.public_path_str()),
        ("NUDGE_JWT_SECRET", ""),
    ])
    .await;
    assert_accepted(&nudge, &Claims::new("alice").sign(&key), "alice").await;
    let bearer = format!("Bearer {}", Claims::new("bob").sign(&key));
    let mut ws = Ws::connect_with_headers(&nudge.ws_url(), &[("authorization", &bearer)]).await.unwrap();
    assert_eq!(ws.recv_type("ready").await["user"], "bob");

    assert_refused(&nudge, &Claims::new("alice").hs256()).await;
    // Another key of the same type.
    let other = KeyPair::generate(alg);
    assert_refused(&nudge, &Claims::new("alice").sign(&other)).await;
    assert_refused(&nudge, &Claims::new("alice").unsigned()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rs256_public_key_accepts_rs256_tokens_and_refuses_others() {
    public_key_algorithm_accepts_its_tokens_only(Algorithm::RS256).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn es256_public_key_accepts_es256_tokens_and_refuses_others() {
    public_key_algorithm_accepts_its_tokens_only(Algorithm::ES256).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn eddsa_public_key_accepts_eddsa_tokens_and_refuses_others() {
    public_key_algorithm_accepts_its_tokens_only(Algorithm::EdDSA).await;
}

/// The RSA family beyond RS256 with a PEM key: NUDGE_JWT_ALGORITHM=PS256 accepts PS256 tokens of that key only.
#[tokio::test(flavor = "multi_thread")]
async fn ps256_public_key_accepts_ps256_tokens_and_refuses_rs256_ones_of_the_same_key() {
    let key = KeyPair::generate(Algorithm::RS256);
    let (_db, nudge) = start(&[
        ("NUDGE_JWT_ALGORITHM", "PS256"),
        ("NUDGE_JWT_PUBLIC_KEY", key.public_path_str()),
        ("NUDGE_JWT_SECRET", ""),
    ])
    .await;
    let sign =
        |alg| jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &Claims::new("alice").0, &key.encoding_key());
    assert_accepted(&nudge, &sign(Algorithm::PS256).unwrap(), "alice").await;
    assert_refused(&nudge, &sign(Algorithm::RS256).unwrap()).await;
    assert_refused(&nudge, &sign(Algorithm::PS384).unwrap()).await;
}

/// NUDGE_JWT_TOPICS_CLAIM with a shared secret: a nested path, its value a space-separated string; the `topics`
/// claim then means nothing.
#[tokio::test(flavor = "multi_thread")]
async fn the_topics_claim_option_reads_a_nested_claim() {
    let (_db, nudge) = start(&[("NUDGE_JWT_TOPICS_CLAIM", "app_metadata.topics")]).await;
    let token = Claims::new("alice")
        .set("app_metadata", json!({"plan": "pro", "topics": "post:* chat:7"}))
        .topics(&["*"])
        .hs256();
    let mut ws = authed_with(&nudge, &token).await;
    ws.subscribe("post:1").await;
    ws.subscribe("chat:7").await;
    ws.send_json(json!({"type": "subscribe", "topic": "other:1"})).await;
    ws.expect_error("forbidden").await;
    // A value that is neither an array of strings nor a string refuses the token.
    let bad = Claims::new("alice").set("app_metadata", json!({"topics": 42})).hs256();
    assert_refused(&nudge, &bad).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_prefix_pattern_allows_only_that_prefix() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["post:*"]).await;
    ws.subscribe("post:42").await;
    ws.subscribe("post:7:comments").await;
    for topic in ["posts:1", "pos", "chat:1"] {
        ws.send_json(json!({"type": "subscribe", "topic": topic})).await;
        ws.expect_error("forbidden").await;
    }
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exact_topic_allows_only_that_topic() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["chat:7"]).await;
    ws.subscribe("chat:7").await;
    for topic in ["chat:70", "chat:", "chat:*"] {
        ws.send_json(json!({"type": "subscribe", "topic": topic})).await;
        ws.expect_error("forbidden").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn star_topic_allows_everything() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["*"]).await;
    for topic in ["post:1", "chat:7", "x"] {
        ws.subscribe(topic).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_topics_claim_subscribe_is_forbidden_but_personal_events_arrive() {
    let (db, nudge) = start(&[]).await;
    let mut ws = authed_with(&nudge, &Claims::new("alice").hs256()).await;
    ws.send_json(json!({"type": "subscribe", "topic": "post:1"})).await;
    ws.expect_error("forbidden").await;
    let pg = db.client().await;
    insert_event(&pg, "post:1", "k", "{}").await;
    let id = insert_personal(&pg, "inbox", "k", &["alice"]).await;
    let ev = ws.recv_type("event").await;
    assert_eq!(ev["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_token_on_open_connection_gets_token_expired_and_4001() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed_with(&nudge, &Claims::new("alice").exp_in(2).hs256()).await;
    let err = ws.recv_json(Duration::from_secs(10)).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], "token_expired", "{err}");
    assert_eq!(ws.expect_close(SOON).await.0, 4001);
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_before_expiry_keeps_the_connection_open() {
    let (_db, nudge) = start(&[]).await;
    let short = Claims::new("alice").exp_in(2).topics(&["*"]);
    let mut ws = authed_with(&nudge, &short.hs256()).await;
    let long = Claims::new("alice").exp_in(3600).topics(&["*"]);
    ws.send_json(json!({"type": "refresh", "token": long.hs256()})).await;
    assert_eq!(ws.recv_json(SOON).await, json!({"type": "refreshed", "expires_at": long.exp()}));
    // Wait (asserting silence) until well past the first token's expiry.
    let past_old_exp = Duration::from_secs((short.exp() - now_secs() + 2).max(0) as u64);
    ws.expect_silence(past_old_exp).await;
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_for_another_user_is_forbidden_and_the_connection_stays() {
    let (db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["post:*"]).await;
    ws.send_json(json!({"type": "refresh", "token": Claims::new("mallory").topics(&["*"]).hs256()})).await;
    ws.expect_error("forbidden").await;
    ws.ping().await;
    // Still alice, still alice's topics.
    ws.send_json(json!({"type": "subscribe", "topic": "chat:1"})).await;
    ws.expect_error("forbidden").await;
    let id = insert_personal(&db.client().await, "inbox", "k", &["alice"]).await;
    assert_eq!(ws.recv_type("event").await["id"], id);
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_with_bad_token_is_unauthorized_and_the_connection_stays() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["post:*"]).await;
    for bad in [
        "garbage".to_string(),
        Claims::new("alice").sign_secret(Algorithm::HS256, "another-secret"),
        Claims::new("alice").exp_in(-10).hs256(),
    ] {
        ws.send_json(json!({"type": "refresh", "token": bad})).await;
        ws.expect_error("unauthorized").await;
        ws.ping().await;
    }
    ws.subscribe("post:1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_dropping_a_topic_permission_unsubscribes_it() {
    let (db, nudge) = start(&[]).await;
    let mut ws = authed(&nudge, "alice", &["post:*", "chat:*"]).await;
    ws.subscribe("post:1").await;
    ws.subscribe("chat:1").await;
    let newer = Claims::new("alice").topics(&["post:*"]);
    ws.send_json(json!({"type": "refresh", "token": newer.hs256()})).await;
    let mut got = vec![ws.recv_json(SOON).await, ws.recv_json(SOON).await];
    got.sort_by_key(|v| v["type"].as_str().unwrap_or("").to_string());
    assert_eq!(
        got,
        vec![
            json!({"type": "refreshed", "expires_at": newer.exp()}),
            json!({"type": "unsubscribed", "topic": "chat:1"})
        ]
    );
    ws.expect_silence(SILENCE).await;

    let pg = db.client().await;
    insert_event(&pg, "chat:1", "k", "{}").await;
    let id = insert_event(&pg, "post:1", "k", "{}").await;
    assert_eq!(ws.recv_type("event").await["id"], id, "chat:1 must no longer be delivered");
    ws.send_json(json!({"type": "subscribe", "topic": "chat:1"})).await;
    ws.expect_error("forbidden").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_never_appear_in_the_log() {
    let (_db, mut nudge) = start(&[]).await;
    let good = Claims::new("alice").topics(&["*"]).hs256();
    let bad = Claims::new("alice").sign_secret(Algorithm::HS256, "another-secret");
    let expired = Claims::new("alice").exp_in(-5).hs256();

    assert_refused(&nudge, &bad).await;
    assert_refused(&nudge, &expired).await;
    assert_eq!(Ws::refused_status(&format!("{}?token={bad}", nudge.ws_url()), &[]).await, 401);
    let mut a = authed_with(&nudge, &good).await;
    a.send_json(json!({"type": "refresh", "token": bad})).await;
    a.expect_error("unauthorized").await;
    a.send_json(json!({"type": "refresh", "token": good})).await;
    a.recv_type("refreshed").await;
    let mut b = Ws::connect(&format!("{}?token={good}", nudge.ws_url())).await.unwrap();
    b.recv_type("ready").await;
    drop((a, b));

    // Stop nudge so every log line is written.
    nudge.sigterm();
    nudge.wait_exit(SOON).await;
    let log = nudge.log();
    for (name, t) in [("good", &good), ("bad", &bad), ("expired", &expired)] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!log.contains(t.as_str()), "the {name} token appears in the log:\n{log}");
        assert!(!log.contains(signature), "the {name} token's signature appears in the log:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn origins_outside_the_allowed_list_get_403() {
    let (_db, nudge) = start(&[("NUDGE_ALLOWED_ORIGINS", "https://app.example,https://admin.example")]).await;
    assert_eq!(Ws::refused_status(&nudge.ws_url(), &[("origin", "https://evil.example")]).await, 403);
    for origin in ["https://app.example", "https://admin.example"] {
        let mut ws = Ws::connect_with_headers(&nudge.ws_url(), &[("origin", origin)]).await.unwrap();
        ws.ping().await;
    }
    let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
    ws.ping().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn any_origin_is_allowed_by_default() {
    let (_db, nudge) = start(&[]).await;
    let mut ws = Ws::connect_with_headers(&nudge.ws_url(), &[("origin", "https://evil.example")]).await.unwrap();
    ws.ping().await;
}

/// An HS256 token over exactly this payload text: numbers no `serde_json::Value` holds (2^64, 1e400) written the
/// way a broken or hostile issuer would write them.
fn hs256_payload(payload: &str) -> String {
    let message = format!("{}.{}", b64url(br#"{"alg":"HS256","typ":"JWT"}"#), b64url(payload.as_bytes()));
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
    format!("{message}.{signature}")
}

/// Status and body of the answer to an upgrade request for `path`, the token (if any) in `Authorization`.
async fn upgrade_answer(nudge: &Nudge, path: &str, bearer: Option<&str>) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = nudge.port;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let authorization = bearer.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{authorization}\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    // A refusal ends the connection; an upgrade (or a task that died) would not answer with a body and close.
    let _ = tokio::time::timeout(SOON, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, body.to_string())
}

/// Validly signed tokens whose `exp`, `nbf` or `iat` is absurd: each gets the documented answer on every path a
/// token takes (header, query string, `auth` message, `refresh`), nothing panics, and the node keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn absurd_time_claims_get_their_documented_answer_and_panic_nothing() {
    let (db, nudge) = start(&[("NUDGE_CLIENT_RATE", "1000")]).await;
    // A client that is there before, during and after: the node must keep serving it.
    let mut bystander = authed(&nudge, "bob", &["post:*"]).await;
    bystander.subscribe("post:1").await;
    // A connection that refreshes with every token: refused ones must leave it as it was.
    let mut refresher = authed(&nudge, "alice", &[]).await;

    let now = now_secs();
    let hour = now + 3600;
    let claims = |time_claims: String| format!(r#"{{"sub":"alice",{time_claims}}}"#);
    let beyond = "token claim exp is after 9999-12-31T23:59:59Z, the latest nudge accepts";
    let not_a_date = |claim: &str| format!("token claim {claim} is not a number of seconds since 1970");
    let refused = [
        (claims(format!(r#""exp":{}"#, 1u64 << 62)), beyond.to_string()),
        (claims(format!(r#""exp":{}"#, u64::MAX)), beyond.to_string()),
        (claims(r#""exp":18446744073709551616"#.into()), beyond.to_string()),
        (claims(r#""exp":1e300"#.into()), beyond.to_string()),
        (claims(r#""exp":1e400"#.into()), beyond.to_string()),
        (claims(r#""exp":253402300800"#.into()), beyond.to_string()),
        (claims(r#""exp":-1"#.into()), "token expired".to_string()),
        (claims(format!(r#""exp":{}"#, i64::MIN)), "token expired".to_string()),
        (claims(r#""exp":-1e400"#.into()), "token expired".to_string()),
        (claims(r#""exp":0"#.into()), "token expired".to_string()),
        (claims(r#""exp":0.5"#.into()), "token expired".to_string()),
        (claims(format!(r#""exp":"{hour}""#)), not_a_date("exp")),
        (claims(r#""exp":null"#.into()), "token lacks the required claim exp".to_string()),
        (claims(format!(r#""exp":{hour},"nbf":1e300"#)), "token is not valid yet (nbf)".to_string()),
        (claims(format!(r#""exp":{hour},"nbf":{}"#, u64::MAX)), "token is not valid yet (nbf)".to_string()),
        (claims(format!(r#""exp":{hour},"nbf":[0]"#)), not_a_date("nbf")),
    ];
    for (payload, reason) in &refused {
        let token = hs256_payload(payload);
        let expected = (401, format!("{reason}\n"));
        assert_eq!(upgrade_answer(&nudge, "/ws", Some(&token)).await, expected, "header, {payload}");
        assert_eq!(upgrade_answer(&nudge, &format!("/ws?token={token}"), None).await, expected, "query, {payload}");

        let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
        ws.send_json(json!({"type": "auth", "token": token})).await;
        assert_eq!(ws.expect_error("unauthorized").await["message"], reason.as_str(), "auth message, {payload}");
        assert_eq!(ws.expect_close(SOON).await.0, 4001, "auth message, {payload}");

        refresher.send_json(json!({"type": "refresh", "token": token})).await;
        assert_eq!(refresher.expect_error("unauthorized").await["message"], reason.as_str(), "refresh, {payload}");
        refresher.ping().await;
    }

    let accepted = [
        // The horizon itself: a connection whose deadline is 8,000 years away.
        (claims(r#""exp":253402300799"#.into()), 253_402_300_799),
        // Fractions of a second are dropped.
        (claims(format!(r#""exp":{hour}.75"#)), hour),
        (claims(format!(r#""exp":{hour}e0,"nbf":0.5"#)), hour),
        (claims(format!(r#""exp":{hour},"nbf":-1e400"#)), hour),
        (claims(format!(r#""exp":{hour},"nbf":{}"#, i64::MIN)), hour),
        // `iat` is not read.
        (claims(format!(r#""exp":{hour},"iat":1e400"#)), hour),
        (claims(format!(r#""exp":{hour},"iat":18446744073709551616"#)), hour),
        (claims(format!(r#""exp":{hour},"iat":-1"#)), hour),
        (claims(format!(r#""exp":{hour},"iat":"yesterday""#)), hour),
    ];
    let mut open = Vec::new();
    for (payload, expires_at) in &accepted {
        let token = hs256_payload(payload);
        let ready = json!({"type": "ready", "user": "alice", "expires_at": expires_at});
        let bearer = format!("Bearer {token}");
        let mut ws = Ws::connect_with_headers(&nudge.ws_url(), &[("authorization", &bearer)]).await.unwrap();
        assert_eq!(ws.recv_json(SOON).await, ready, "header, {payload}");
        open.push(ws);
        let mut ws = Ws::connect(&format!("{}?token={token}", nudge.ws_url())).await.unwrap();
        assert_eq!(ws.recv_json(SOON).await, ready, "query, {payload}");
        open.push(ws);
        let mut ws = Ws::connect(&nudge.ws_url()).await.unwrap();
        assert_eq!(ws.auth(&token).await, ready, "auth message, {payload}");
        open.push(ws);

        refresher.send_json(json!({"type": "refresh", "token": token})).await;
        assert_eq!(refresher.recv_json(SOON).await, json!({"type": "refreshed", "expires_at": expires_at}));
    }
    for ws in &mut open {
        ws.ping().await;
    }
    refresher.ping().await;

    let id = insert_event(&db.client().await, "post:1", "k", "{}").await;
    assert_eq!(bystander.recv_type("event").await["id"], id);
    let mut newcomer = authed(&nudge, "carol", &["post:*"]).await;
    newcomer.ping().await;
    let log = nudge.log();
    assert!(!log.contains("panicked"), "a task panicked:\n{log}");
}
